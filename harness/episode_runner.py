"""Plays agents against envs: one asyncio task per episode, bounded by ``concurrency``.

Every finished episode is written to the store at once (one row per (run, task, trial)), so a
killed run loses only the episodes in flight. Failures are classified:
- the provider failed after retries (``InfraError``) or the harness itself raised: ``infra``,
  excluded from scores;
- the conversation outgrew the context window: ``agent``, a task failure with reward 0 (as in the
  official τ² runner);
- the episode outlived its wall-clock budget (``EpisodeBounds.seconds``, ``--episode-timeout``):
  ``infra``, like a provider that stayed too slow (docs/decisions.md);
- the env voided the attempt (``ReplayEpisode``; tau-airline on an empty agent message): the
  episode is played again from the start with a fresh env and agent and the same seed, up to the
  number of times the env asks for, then stored as ``infra``, like the official τ² runner's
  re-runs (past the response cache, which would repeat the voided replies). Tokens, cost and
  LLM calls of the voided attempts stay counted.
An assistant message runs at most ``EpisodeBounds.tool_calls`` tool calls; the calls past it are
not given to the env and are answered with a tool error each, so the conversation stays
well-formed for the next model call.
An env's ``score()`` may be a coroutine (AppWorld asks its server), and an env or an agent may have
an async ``aclose()`` (AppWorld gives its server back, a local policy leaves its generation batch);
all are awaited here. An agent with a ``trace`` attribute (a local policy's token trace) hands it
to the result, for the trainer.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any, Callable

from harness.agents.base import Agent, AgentSpec
from harness.defaults import MAX_TOOL_CALLS
from harness.env_spec import Env, EnvFactory
from harness.errors import ConfigError, FatalProviderError, ReplayEpisode
from harness.llm import CallContext, ContextWindowError, InfraError, call_context
from harness.llm_cache import ResponseCache
from harness.llm_limits import LimiterRegistry
from harness.openai_direct import DirectClient
from harness.types import AgentTurn, EpisodeResult, ErrorClass, Score, Task, Termination, Usage

__all__ = ["trial_seeds", "play_episode", "EpisodeBounds", "EpisodeJob", "StopRun", "run_episodes", "run_loop",
           "loop_name"]


@dataclass(frozen=True)
class EpisodeBounds:
    """What keeps one episode finite whatever the model or the provider does."""

    seconds: float | None = None
    """Wall-clock budget of playing the episode (reset and every turn; scoring excluded); None: no limit."""
    tool_calls: int = MAX_TOOL_CALLS
    """Tool calls run per assistant message; the rest are answered with a tool error."""


def trial_seeds(seed: int, trials: int) -> list[int]:
    """One seed per trial, drawn like the official τ² runner draws them, so a given ``--seed``
    gives the same per-trial seeds here and there. Repeats (rare) are redrawn: siblings must
    differ."""
    rng = random.Random(seed)
    seeds: list[int] = []
    while len(seeds) < trials:
        value = rng.randint(0, 1_000_000)
        if value not in seeds:
            seeds.append(value)
    return seeds


async def play_episode(
    factory: EnvFactory,
    agent_spec: AgentSpec,
    task: Task,
    trial: int,
    seed: int,
    limits: LimiterRegistry | None = None,
    cache: ResponseCache | None = None,
    group_id: str | None = None,
    http: DirectClient | None = None,
    bounds: EpisodeBounds = EpisodeBounds(),
) -> EpisodeResult:
    started = time.perf_counter()
    calls: list[dict[str, Any]] = []
    # Runs inside this episode's own asyncio task, so the context is private to the episode.
    call_context.set(CallContext(trial=trial, calls=calls, limits=limits, cache=cache, http=http))
    agent_usage, user_usage, env_seconds = Usage(), Usage(), 0.0  # over every attempt: all were paid for
    error_class, error, fatal = ErrorClass.NONE, None, False
    deadline = asyncio.timeout(bounds.seconds)  # one budget for the episode, however many attempts
    replays = 0
    env = factory.create(task, seed)
    agent = agent_spec.create(task, seed)
    try:
        async with deadline:
            while True:
                try:
                    await _converse(env, agent, bounds, agent_usage)
                    break
                except ReplayEpisode as exc:
                    if replays >= exc.retries:
                        raise
                # The env voided this attempt: play the episode again from the start, same seed.
                # Past the response cache, which would serve the voided replies again (the same
                # requests); the official package turns its cache off for such a retry too.
                replays += 1
                call_context.set(CallContext(trial=trial, calls=calls, limits=limits, cache=None, http=http))
                user_usage.add(env.user_usage)
                env_seconds += env.env_seconds
                await _close(env, agent)
                env, agent = factory.create(task, seed), agent_spec.create(task, seed)
    except TimeoutError as exc:
        env.finish(Termination.INFRASTRUCTURE_ERROR)
        error_class = ErrorClass.INFRA
        if deadline.expired():  # (a TimeoutError of the env's own is a bug, reported as below)
            error = (f"episode timeout: not finished within {bounds.seconds:g}s (--episode-timeout); "
                     "a resume plays it again")
        else:
            error = _crash(exc)
    except ContextWindowError as exc:
        env.finish(Termination.CONTEXT_WINDOW_EXCEEDED)
        error_class, error = ErrorClass.AGENT, f"context window exceeded: {exc}"
    except ReplayEpisode as exc:
        env.finish(Termination.INFRASTRUCTURE_ERROR)
        error_class = ErrorClass.INFRA
        error = f"{exc}, in each of {replays + 1} attempt(s); a resume plays it again"
    except InfraError as exc:
        env.finish(Termination.INFRASTRUCTURE_ERROR)
        error_class, error, fatal = ErrorClass.INFRA, str(exc), isinstance(exc, FatalProviderError)
    except Exception as exc:  # a bug in an agent, env or the harness: keep the run going
        env.finish(Termination.INFRASTRUCTURE_ERROR)
        error_class, error = ErrorClass.INFRA, _crash(exc)

    try:
        if error_class is not ErrorClass.INFRA:
            try:
                score = env.score()
                if inspect.isawaitable(score):  # envs graded by a server (AppWorld) score async
                    score = await score
            except InfraError as exc:
                env.termination = Termination.INFRASTRUCTURE_ERROR
                error_class, error = ErrorClass.INFRA, f"scoring failed: {exc}"
                fatal = isinstance(exc, FatalProviderError)
        if error_class is ErrorClass.INFRA:
            score = Score(reward=0.0, success=False, breakdown={"note": "not graded: infrastructure error"})
    finally:
        await _close(env, agent)
    user_usage.add(env.user_usage)
    return EpisodeResult(
        task_id=task.id,
        trial=trial,
        seed=seed,
        messages=env.messages,  # the last attempt's: the one that counts
        termination=env.termination,
        score=score,
        error_class=error_class,
        error=error,
        agent_usage=agent_usage,
        user_usage=user_usage,
        wall_seconds=time.perf_counter() - started,
        env_seconds=env_seconds + env.env_seconds,
        group_id=group_id,
        llm_calls=calls,
        trace=getattr(agent, "trace", None),
        fatal=fatal,
    )


async def _converse(env: Env, agent: Agent, bounds: EpisodeBounds, agent_usage: Usage) -> None:
    """One attempt at the episode: reset, then agent turns until the env says it is done."""
    obs = await env.reset()
    history: list[dict[str, Any]] = [{"role": "system", "content": obs.system_prompt}, *obs.messages]
    tools = obs.tools or []
    while not obs.done:
        turn = _capped(await agent.act(history, tools), bounds.tool_calls)
        agent_usage.add(turn.usage)
        history.append(turn.to_message())
        obs = await env.step(turn)
        history.extend(obs.messages)
        history.extend(_refuse(env, turn))


async def _close(env: Env, agent: Agent) -> None:
    """Envs holding a server give it back here; a local policy stops waiting for this episode in
    its generation batches."""
    for closer in (getattr(env, "aclose", None), getattr(agent, "aclose", None)):
        if closer is not None:
            try:
                await closer()
            except Exception:  # noqa: BLE001 (closing must not lose the episode)
                pass


def _crash(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__}: {exc} ({where.filename}:{where.lineno})"


def _capped(turn: AgentTurn, limit: int) -> AgentTurn:
    """``turn`` with at most ``limit`` tool calls for the env to run; the rest move to
    ``refused_tool_calls`` (still part of the assistant message)."""
    if len(turn.tool_calls) <= limit:
        return turn
    return replace(turn, tool_calls=turn.tool_calls[:limit], refused_tool_calls=turn.tool_calls[limit:])


def _refuse(env: Env, turn: AgentTurn) -> list[dict[str, Any]]:
    """One tool error per refused call, after the env's results: every call id in the assistant
    message gets its answer, as chat APIs require. Stored with the episode (``env.messages``)."""
    made, limit = len(turn.tool_calls) + len(turn.refused_tool_calls), len(turn.tool_calls)
    refusals = [{"role": "tool", "tool_call_id": call.id, "name": call.name,
                 "content": f"Error: not run: this message made {made} tool calls and at most {limit} are run "
                            "per message; make the remaining calls in a later message."}
                for call in turn.refused_tool_calls]
    env.messages.extend(refusals)
    return refusals


class StopRun(Exception):
    """Raised by ``run_episodes`` when its ``stop`` callback ended the run early (e.g. the provider
    refuses the key); ``str(exc)`` is the reason."""


@dataclass(frozen=True)
class EpisodeJob:
    task: Task
    trial: int
    seed: int
    group_id: str | None = None


async def run_episodes(
    factory: EnvFactory,
    agent_spec: AgentSpec,
    jobs: list[EpisodeJob],
    concurrency: int,
    on_result: Callable[[EpisodeResult], Any],
    cache: ResponseCache | None = None,
    stop: Callable[[EpisodeResult], str | None] | None = None,
    bounds: EpisodeBounds = EpisodeBounds(),
) -> LimiterRegistry:
    """Play ``jobs`` with at most ``concurrency`` episodes in flight; ``on_result`` is called
    (on the event loop) as each one ends, in completion order, and awaited if it returns an
    awaitable. LLM calls are additionally throttled per model by an adaptive limiter (halved on
    429, recovering on success); the registry is returned for its statistics.

    An awaited ``on_result`` (e.g. a group-committed store write) no longer holds the episode's
    slot: the next episode starts while the finished one is being stored, so store latency does
    not stretch every episode. ``run_episodes`` still returns only after every ``on_result`` has
    finished.

    ``stop(result)``, called as each episode ends (before its ``on_result``), may end the run by
    returning a reason: no new episode starts, those in flight are cancelled (a resume plays them),
    the finished ones' ``on_result`` complete (this one's included), and ``StopRun(reason)`` is
    raised. An ``on_result`` that raises stops the run the same way and its exception is raised.

    ``bounds`` limits each episode's wall-clock time and tool calls per message (``EpisodeBounds``)."""
    gate = asyncio.Semaphore(max(1, concurrency))
    limits = LimiterRegistry(max_limit=max(1, concurrency))
    http = DirectClient()  # opens a session only if some model uses --llm-client direct
    failures: list[Exception] = []
    playing: set[asyncio.Task] = set()

    def halt(exc: Exception) -> None:
        if not failures:
            for episode in list(playing):
                episode.cancel()
        failures.append(exc)

    async def one(job: EpisodeJob) -> None:
        async with gate:
            if failures:
                return
            episode = asyncio.ensure_future(play_episode(factory, agent_spec, job.task, job.trial, job.seed,
                                                         limits=limits, cache=cache, group_id=job.group_id, http=http,
                                                         bounds=bounds))
            playing.add(episode)
            try:
                result = await episode
            except asyncio.CancelledError:
                if failures and not _being_cancelled():
                    return  # the run was stopped: this episode is not stored
                raise
            finally:
                playing.discard(episode)
            reason = stop(result) if stop is not None and not failures else None
            if reason:
                halt(StopRun(reason))  # before the slot is free: no other episode starts
            done = on_result(result)
        if inspect.isawaitable(done):
            await done

    async def guarded(job: EpisodeJob) -> None:
        try:
            await one(job)
        except Exception as exc:  # noqa: BLE001 (re-raised below, after the run has wound down)
            halt(exc)

    try:
        await asyncio.gather(*(guarded(job) for job in jobs))
    finally:
        await http.close()
    if failures:
        raise failures[0]
    return limits


def _being_cancelled() -> bool:
    """Whether the current task itself is being cancelled (Ctrl-C), not just something it awaited."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def run_loop(main: Any, loop: str = "auto") -> Any:
    """Run the coroutine ``main`` to completion on a new event loop, as ``asyncio.run`` does.

    ``loop="auto"`` uses uvloop when it is installed (``pip install 'harness[fast]'``): the same
    asyncio code on a libuv loop written in C, which takes part of the per-call CPU off the runner
    when hundreds of episodes are in flight. Without it, or with ``loop="asyncio"``, the standard
    loop runs; results are the same either way."""
    factory = None
    try:
        name = loop_name(loop)
    except ConfigError:
        main.close()  # never started: close it, or Python warns it was never awaited
        raise
    if name == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.get_loop().set_exception_handler(_quiet_cancellation_races)
        return runner.run(main)


def _quiet_cancellation_races(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's handler for errors no task awaits. A stop (Ctrl-C, SIGTERM, a stopped run)
    cancels requests while replies are arriving; aiohttp then sets a result on a future that was
    just cancelled, and asyncio reports ``InvalidStateError`` with a traceback after the one line
    the stop prints. That race is harmless (the episode is cancelled either way): dropped. Anything
    else keeps asyncio's default report."""
    if isinstance(context.get("exception"), asyncio.InvalidStateError):
        return
    loop.default_exception_handler(context)


def loop_name(loop: str = "auto") -> str:
    """The loop ``run_loop(..., loop)`` uses: ``uvloop`` or ``asyncio``."""
    if loop == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if loop == "uvloop":
            raise ConfigError("uvloop is not installed: pip install 'harness[fast]'") from None
        return "asyncio"
    return "uvloop"
