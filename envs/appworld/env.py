"""``appworld``: AppWorld tasks played by a ReAct-style code agent over HTTP (appworld.md §5, §7, §8).

Protocol (one episode = one world on one server):
- ``reset`` takes a server from the pool, calls ``/initialize`` (unique experiment name
  ``<run>-<task>-<trial>-<random>``, ``max_interactions``, ``timeout_seconds``) and shows the agent
  a system prompt with the rules, the supervisor and the task. The agent gets no tool schemas;
- each agent turn must hold one ```python block; the env sends the first block to ``/execute``
  and returns the output as a ``user`` message. A turn without a code block gets a short
  "no code found" message. Every agent turn counts as one interaction;
- the episode ends when ``/task_completed`` says so (``agent_stop``) or after ``max_interactions``
  turns (``max_steps``); ``score`` then calls ``/evaluate`` with ``suppress_errors`` and
  ``aclose`` closes the world and gives the server back (``healthy=False`` after a server error,
  so a pool can restart it).

Server failures raise ``ServerGone`` / ``ServerError`` (``InfraError``): the runner records the
episode as ``infra_error`` and a resumed run plays it again.

Task ids come from ``<appworld_root>/data/datasets/<split>.txt`` (one id per line, ``id:tag``
allowed). The official lists (checked against ``shared/data/appworld/splits/``): train 90 tasks /
30 scenarios, dev 57 / 19, test_normal 168 / 56, test_challenge 417 / 139.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from envs.appworld.client import AppWorldClient, AppWorldError
from envs.registry import register_env
from harness.env_spec import EnvFactory, Transport
from harness.errors import ConfigError, DataMissingError
from harness.llm import call_context
from harness.options import option
from harness.types import AgentTurn, Observation, Score, Task, Termination, Usage

__all__ = ["ServerSource", "StaticServers", "AppWorldEnv", "AppWorldFactory", "extract_code",
           "system_prompt", "NO_CODE_MESSAGE"]

NO_CODE_MESSAGE = ("No code found. Reply with exactly one ```python ... ``` block; it will be run and "
                   "its output shown to you.")

_PROMPT = """\
You are an assistant that completes tasks for your supervisor by writing Python code that calls the \
APIs of their apps (a phone, notes, email, music and others).

How this works:
- In every reply, write exactly one code block fenced as ```python ... ```. It runs in a persistent \
Python session: variables and imports stay from one block to the next. What you print is shown to you.
- Call an API as apis.<app>.<api>(argument=value, ...), always with keyword arguments.
- Find out what exists with apis.api_docs.show_app_descriptions(), \
apis.api_docs.show_api_descriptions(app_name=...) and apis.api_docs.show_api_doc(app_name=..., api_name=...). \
Read an API's documentation before you call it.
- Get account passwords with apis.supervisor.show_account_passwords(); most apps need \
apis.<app>.login(username=..., password=...) and the returned access_token.
- Work in small steps and look at the output before going on.
- When you are done, call apis.supervisor.complete_task(answer=...) with the answer if the task \
asks a question (a plain value), or apis.supervisor.complete_task() if it asks you to do something. \
If the task cannot be done, call apis.supervisor.complete_task(status="fail"). That ends the task.

Your supervisor is {first_name} {last_name} (email {email}, phone {phone_number}).
Today is {datetime}.

Task: {instruction}"""


def system_prompt(info: dict[str, Any]) -> str:
    sup = info.get("supervisor") or {}
    return _PROMPT.format(
        first_name=sup.get("first_name", ""), last_name=sup.get("last_name", ""), email=sup.get("email", ""),
        phone_number=sup.get("phone_number", ""), datetime=info.get("datetime", ""),
        instruction=info.get("instruction", ""),
    )


_FENCE = re.compile(r"```[ \t]*(python|py|python3)?[ \t]*\n(.*?)```", re.S | re.I)


def extract_code(text: str | None) -> str | None:
    """The first fenced Python block of ``text`` (an untagged fence counts too), or None."""
    blocks = _FENCE.findall(text or "")
    tagged = [code for tag, code in blocks if tag]
    chosen = tagged or [code for _, code in blocks]
    return chosen[0].strip("\n") if chosen else None


# -- server access --------------------------------------------------------------------------------
class ServerSource(Protocol):
    """Hands out server base URLs, one episode at a time (``ServerPool`` has the same shape)."""

    async def acquire(self) -> str: ...

    def release(self, url: str, healthy: bool) -> None: ...


class StaticServers:
    """Pre-started servers (``--appworld-url``): each URL serves one episode at a time. An
    unhealthy URL goes back too (nothing here can restart it; its next episode fails fast)."""

    def __init__(self, urls: list[str]):
        if not urls:
            raise ConfigError("StaticServers needs at least one server URL")
        self.urls = [u.rstrip("/") for u in urls]
        self._free: deque[str] = deque(self.urls)
        self._waiters: deque[asyncio.Future] = deque()
        self.unhealthy: list[str] = []

    async def acquire(self) -> str:
        if self._free:
            return self._free.popleft()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return await waiter

    def release(self, url: str, healthy: bool) -> None:
        if not healthy:
            self.unhealthy.append(url)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(url)
                return
        self._free.append(url)


# -- env ------------------------------------------------------------------------------------------
class AppWorldEnv:
    def __init__(self, factory: "AppWorldFactory", task: Task, seed: int, trial: int | None):
        self.factory = factory
        self.task = task
        self.seed = seed
        self.experiment_name = "-".join([factory.run_name, task.id, str(trial if trial is not None else "x"),
                                         secrets.token_hex(4)])
        self.messages: list[dict[str, Any]] = []
        self.termination: Termination | None = None
        self.user_usage = Usage()
        self.env_seconds = 0.0
        self.interactions = 0
        self.url: str | None = None
        self.client: AppWorldClient | None = None
        self.healthy = True
        self._score: Score | None = None

    async def _call(self, coro):
        started = time.perf_counter()
        try:
            return await coro
        except AppWorldError:
            self.healthy = False
            raise
        finally:
            self.env_seconds += time.perf_counter() - started

    async def reset(self) -> Observation:
        self.url = await self.factory.servers.acquire()
        f = self.factory
        self.client = AppWorldClient(self.url, timeout=f.http_timeout, execute_timeout=f.timeout_seconds + 30)
        info = await self._call(self.client.initialize(
            self.task.id, experiment_name=self.experiment_name, max_interactions=f.max_interactions,
            timeout_seconds=f.timeout_seconds, random_seed=self.seed,
        ))
        first = {"role": "user", "content": f"Task: {info.get('instruction', '')}\nWrite your first code block."}
        self.messages = [first]
        return Observation(messages=[first], tools=[], system_prompt=system_prompt(info))

    async def step(self, turn: AgentTurn) -> Observation:
        if self.termination is not None:
            raise RuntimeError("step() after the episode ended")
        self.messages.append(turn.to_message())
        self.interactions += 1
        code = extract_code(turn.content)
        if code is None:
            reply = NO_CODE_MESSAGE
        else:
            output = await self._call(self.client.execute(code))
            reply = f"Output:\n```\n{output}\n```"
            if await self._call(self.client.task_completed()):
                self.termination = Termination.AGENT_STOP
        if self.termination is None and self.interactions >= self.factory.max_interactions:
            self.termination = Termination.MAX_STEPS
        msg = {"role": "user", "content": reply}
        self.messages.append(msg)
        return Observation(messages=[msg], done=self.termination is not None)

    def finish(self, termination: Termination) -> None:
        if self.termination is None:
            self.termination = termination

    async def score(self) -> Score:
        """``/evaluate`` once (``suppress_errors``); reward 1.0 only when every test passes."""
        if self.termination is None:
            raise RuntimeError("score() before the episode ended")
        if self._score is None:
            tracker = await self._call(self.client.evaluate())
            passes, failures = list(tracker.get("passes") or []), list(tracker.get("failures") or [])
            success = bool(tracker.get("success"))
            self._score = Score(reward=1.0 if success else 0.0, success=success, breakdown={
                "num_tests": int(tracker.get("num_tests", len(passes) + len(failures))),
                "num_passed": len(passes), "num_failed": len(failures),
                "passes": passes, "failures": failures, "difficulty": tracker.get("difficulty"),
                "interactions": self.interactions, "experiment_name": self.experiment_name,
            })
        return self._score

    async def aclose(self) -> None:
        """Close the world and give the server back (called by the runner in every case)."""
        if self.url is None:
            return
        url, self.url = self.url, None
        try:
            if self.client is not None:
                if self.healthy:
                    try:
                        await self.client.close()
                    except AppWorldError:
                        self.healthy = False
                await self.client.aclose_session()
        finally:
            self.factory.servers.release(url, self.healthy)


@dataclass
class AppWorldOptions:
    appworld_root: str | None = option(None, flags=("--appworld-root",), volatile=True)
    """AppWorld root (holds data/datasets/<split>.txt); default $APPWORLD_ROOT, else the one
    `harness appworld setup` made."""

    appworld_urls: list[str] | None = option(None, flags=("--appworld-url",), volatile=True)
    """Pre-started AppWorld environment server URL (repeatable; one episode per server at a time)."""
    appworld_servers: int = option(1, flags=("--appworld-servers",), minimum=1, volatile=True)
    """Environment server processes to start from the side venv (one episode each at a time), when no
    --appworld-url is given."""

    max_interactions: int = option(50, flags=("--max-interactions",), minimum=1)
    """Code executions per episode (published eval setting: 50)."""


@register_env("appworld")
class AppWorldFactory(EnvFactory):
    """Reads the split lists under ``appworld_root`` and creates one ``AppWorldEnv`` per episode."""

    Options = AppWorldOptions
    default_split = "test_normal"
    heldout_split = "dev"
    """The test splits are for reporting; training evaluates on dev."""

    def __init__(
        self,
        appworld_root: str | None = None,
        server_urls: list[str] | None = None,
        pool: ServerSource | None = None,
        max_interactions: int = 50,
        timeout_seconds: float = 100.0,
        http_timeout: float = 60.0,
        run_name: str = "harness",
    ):
        root = appworld_root or os.environ.get("APPWORLD_ROOT")
        if not root:
            raise ConfigError("appworld needs its data root: pass --appworld-root DIR or set APPWORLD_ROOT "
                              "(the directory that holds data/datasets/<split>.txt)")
        self.root = Path(root)
        self.datasets = self.root / "data" / "datasets"
        if not self.datasets.is_dir():
            raise DataMissingError(f"no AppWorld data at {self.datasets}; run `appworld download data --root "
                                   f"{self.root}` on a machine with internet, or point --appworld-root at a copy")
        if pool is not None and server_urls:
            raise ConfigError("give either AppWorld server URLs or a server pool, not both")
        if pool is None and not server_urls:
            raise ConfigError("appworld needs running environment servers: pass --appworld-url URL (repeatable)")
        if max_interactions < 1:
            raise ConfigError("--max-interactions must be at least 1")
        self.servers: ServerSource = pool if pool is not None else StaticServers(list(server_urls or []))
        self.max_interactions = max_interactions
        self.timeout_seconds = timeout_seconds
        self.http_timeout = http_timeout
        self.run_name = run_name
        version_file = self.root / "data" / "version"
        self.data_version = version_file.read_text().strip() if version_file.is_file() else "unknown"

    def splits(self) -> list[str]:
        return sorted(p.stem for p in self.datasets.glob("*.txt"))

    def tasks(self, split: str, task_ids: list[str] | None = None) -> list[Task]:
        path = self.datasets / f"{split}.txt"
        if not path.is_file():
            raise ConfigError(f"unknown AppWorld split '{split}'; available under {self.datasets}: "
                              f"{', '.join(self.splits()) or 'none'}")
        ids = [line.split(":", 1)[0].strip() for line in path.read_text().splitlines() if line.strip()]
        if task_ids:
            unknown = [t for t in task_ids if t not in ids]
            if unknown:
                raise ConfigError(f"unknown task id(s) {', '.join(unknown)} in AppWorld split '{split}' "
                                  f"({len(ids)} tasks, e.g. {', '.join(ids[:3])})")
            ids = list(task_ids)
        return [Task(env=self.name, id=t, split=split, instruction="", data={"scenario": t.rsplit("_", 1)[0]},
                     version=self.data_version) for t in ids]

    def create(self, task: Task, seed: int) -> AppWorldEnv:
        ctx = call_context.get(None)
        return AppWorldEnv(self, task, seed, trial=getattr(ctx, "trial", None))

    def redaction_literals(self, task: Task) -> list[str]:
        """Literals the SGCD summarizer must never see or write. The harness's AppWorld task data
        holds no credential and no ground-truth answer (only the scenario id; answers and
        passwords live on the AppWorld server), so this is the task and scenario labels only.
        Passwords and tokens that show up in tool outputs are masked by the redactor's
        credential patterns instead."""
        return [task.id, str(task.data.get("scenario") or "")]

    def describe(self) -> dict[str, Any]:
        # Server URLs are transport, not part of what defines a run.
        return {"max_interactions": self.max_interactions, "timeout_seconds": self.timeout_seconds,
                "data_version": self.data_version}

    @classmethod
    def from_options(cls, options: AppWorldOptions, transport: Transport) -> "AppWorldFactory":
        """Pre-started servers (``--appworld-url``), or a managed pool of ``--appworld-servers``
        processes from the side venv (started by whoever runs the episodes, closed after)."""
        from envs.appworld.setup import default_root, default_venv_dir

        root, pool = options.appworld_root, None
        if not options.appworld_urls:
            from envs.appworld.server_pool import ServerPool

            root = root or str(default_root())
            python = default_venv_dir() / "bin" / "python"
            if not python.exists():
                raise ConfigError(f"no AppWorld side venv at {python.parent.parent}: run `harness appworld setup` "
                                  "(or pass --appworld-url for servers you started yourself)")
            pool = ServerPool(max(1, options.appworld_servers), python=str(python), appworld_root=root)
        return cls(appworld_root=root, server_urls=options.appworld_urls, pool=pool,
                   max_interactions=options.max_interactions)

    def managed_servers(self):
        return self.servers if callable(getattr(self.servers, "start", None)) else None

    def begin_run(self, run: str) -> None:
        self.run_name = run  # each episode's experiment is named after the run

    @classmethod
    def run_metrics(cls, store: Any, run: Any) -> dict[str, Any]:
        """TGC / SGC as the official evaluator reports them (``envs.appworld.metrics``)."""
        from envs.appworld.metrics import appworld_summary, episodes_with_breakdown

        return appworld_summary(episodes_with_breakdown(store, run.name))

    @classmethod
    def cli(cls):
        from envs.appworld.cli import appworld_app

        return appworld_app
