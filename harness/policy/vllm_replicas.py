"""The vLLM servers a ``vllm`` rollout engine samples from: given ones (``--rollout-url``) or
managed ones (``--rollout-replicas`` / ``--rollout-gpus``: the harness starts ``vllm serve``, waits
for ``/health``, restarts one that dies and stops them all at the end).

Every server is checked before use: ``/v1/models`` names the model it serves, and its config
(``/server_info``, a dev-mode route: the weight sync needs dev mode too) shows
``logprobs_mode = processed_logprobs``, the log-probs of the tempered distribution the tokens are
drawn from, which the trace records (docs/rollout-engines.md).

``HARNESS_ROLLOUT_SERVER_COMMAND`` replaces ``vllm serve`` for managed replicas: a command template
with ``{model}``, ``{port}``, ``{max_logprobs}`` and ``{lora_rank}`` (0: no LoRA) placeholders. It is
for tests (which start ``harness serve-policy``, the CPU double of the same HTTP subset) and for
custom launchers (a container, a wrapper script).
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from harness.errors import ConfigError, RunFailed

__all__ = ["Replica", "ReplicaPool", "RolloutServersGone", "ServerSpec", "SERVER_COMMAND_ENV", "check_server",
           "managed_command", "split_gpus"]

SERVER_COMMAND_ENV = "HARNESS_ROLLOUT_SERVER_COMMAND"
PROCESSED = "processed_logprobs"
START_TIMEOUT_S = float(os.environ.get("HARNESS_ROLLOUT_START_TIMEOUT", "1200"))
"""How long a managed server may take to answer ``/health`` (vLLM loads weights and captures CUDA
graphs first: minutes for a large model)."""
STOP_GRACE_S = 30.0


class RolloutServersGone(RunFailed):
    """Every given rollout server stopped answering: the run cannot sample any more (exit 1)."""


@dataclass
class ServerSpec:
    """What a managed replica serves and how it is started."""

    model: str
    """What ``vllm serve`` loads: the policy's directory (or hub id), the base model under LoRA."""
    max_logprobs: int
    lora_rank: int = 0
    """> 0: started with ``--enable-lora --max-lora-rank`` and runtime adapter loading."""
    log_dir: Path | None = None
    """Each replica's output goes to ``replica-N.log`` here (None: a temporary directory)."""
    gpu_memory: float | None = None
    """``--gpu-memory-utilization`` (``--rollout-gpu-memory``); None: vLLM's default (0.9)."""


@dataclass
class Replica:
    """One server. ``incarnation`` grows at every restart: an episode pinned to an older one is
    played again (its server lost its state and may have missed nothing or everything)."""

    index: int
    url: str
    managed: bool
    gpus: str | None = None
    port: int = 0
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    served: str = ""
    """The model name ``/v1/models`` lists (requests name it, or a LoRA adapter)."""
    incarnation: int = 0
    open_episodes: int = 0
    alive: bool = True


def managed_command(spec: ServerSpec, port: int, gpus_per_replica: int) -> list[str]:
    """The argv that starts one managed server (``HARNESS_ROLLOUT_SERVER_COMMAND`` when set)."""
    template = os.environ.get(SERVER_COMMAND_ENV)
    if template:
        return shlex.split(template.format(model=spec.model, port=port, max_logprobs=spec.max_logprobs,
                                           lora_rank=spec.lora_rank))
    argv = ["vllm", "serve", spec.model, "--host", "127.0.0.1", "--port", str(port),
            "--logprobs-mode", PROCESSED,
            # the model's generation_config.json must not become the server's sampling defaults
            "--generation-config", "vllm", "--max-logprobs", str(spec.max_logprobs)]
    if gpus_per_replica > 1:
        argv += ["--tensor-parallel-size", str(gpus_per_replica)]
    if spec.lora_rank:
        argv += ["--enable-lora", "--max-lora-rank", str(spec.lora_rank)]
    if spec.gpu_memory is not None:
        argv += ["--gpu-memory-utilization", str(spec.gpu_memory)]
    return argv


def check_server(client: httpx.Client, url: str, *, want_model: str | None, topk: int) -> str:
    """Refuse (``ConfigError``, one line) a server the engine cannot use; return the model name it
    serves. ``want_model``: the name it must serve (None: any, the trainer's weights replace it)."""
    try:
        models = client.get(f"{url}/v1/models", timeout=30)
    except httpx.HTTPError as exc:
        raise ConfigError(f"rollout server {url} does not answer ({type(exc).__name__}: {exc}); start it, "
                          "or check --rollout-url") from None
    if models.status_code != 200:
        raise ConfigError(f"rollout server {url}: GET /v1/models answered HTTP {models.status_code}; is it a vLLM "
                          "OpenAI-compatible server?")
    served = [m.get("id") for m in models.json().get("data", [])]
    if not served:
        raise ConfigError(f"rollout server {url} serves no model")
    if want_model is not None and want_model not in served:
        raise ConfigError(f"rollout server {url} serves {', '.join(served)}, not {want_model}; start it with "
                          f"`vllm serve {want_model}` (or --served-model-name {want_model})")
    info = client.get(f"{url}/server_info", params={"config_format": "json"}, timeout=30)
    if info.status_code == 404:
        raise ConfigError(f"rollout server {url} has no /server_info: start it with VLLM_SERVER_DEV_MODE=1 (the "
                          "harness checks its logprobs mode and syncs weights through vLLM's dev routes)")
    info.raise_for_status()
    model_config = (info.json().get("vllm_config") or {}).get("model_config") or {}
    mode = model_config.get("logprobs_mode")
    if mode != PROCESSED:
        raise ConfigError(f"rollout server {url} returns {mode} log-probs; start it with --logprobs-mode {PROCESSED} "
                          "(the trace records the log-probs of the tempered sampling distribution)")
    most = model_config.get("max_logprobs")
    if topk and most is not None and 0 <= int(most) < topk:
        raise ConfigError(f"rollout server {url} returns at most {most} log-probs per token but the method records "
                          f"the top {topk}; start it with --max-logprobs {topk}")
    return want_model if want_model is not None else served[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def split_gpus(gpus: str | None, replicas: int) -> list[str | None]:
    """``--rollout-gpus 0,1,2,3`` over N replicas: N equal consecutive shares (tensor parallel
    within one); without it every replica sees the GPUs the harness sees."""
    if not gpus:
        return [None] * replicas
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids or len(ids) % replicas:
        raise ConfigError(f"--rollout-gpus {gpus} cannot be shared by {replicas} replicas equally; give a multiple "
                          f"of --rollout-replicas GPU ids")
    share = len(ids) // replicas
    return [",".join(ids[i * share:(i + 1) * share]) for i in range(replicas)]


class ReplicaPool:
    """The engine's servers, checked, and restarted (managed) or dropped (given) when they die."""

    def __init__(self, client: httpx.Client, *, urls: list[str], replicas: int, gpus: str | None,
                 spec: ServerSpec, topk: int, fixed_model: str | None):
        self.client, self.spec, self.topk = client, spec, topk
        self.fixed_model = fixed_model
        """The model name a given server must serve (None: any; its weights are synced over)."""
        self._tmp: Path | None = None
        if urls:
            self.replicas = [Replica(i, u.rstrip("/"), managed=False) for i, u in enumerate(urls)]
        else:
            # one replica per GPU unless told otherwise
            count = replicas or (len([g for g in gpus.split(",") if g.strip()]) if gpus else 1)
            self.replicas = [Replica(i, "", managed=True, gpus=share)
                             for i, share in enumerate(split_gpus(gpus, count))]

    # -- start / stop ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the managed servers (all at once, then wait for each), check every server."""
        if any(r.managed for r in self.replicas):
            atexit.register(self.close)  # a run that raises still stops its servers
            for replica in self.replicas:
                self._launch(replica)
        for replica in self.replicas:
            if replica.managed:
                self._wait_healthy(replica)
            replica.served = check_server(self.client, replica.url, want_model=self.fixed_model, topk=self.topk)

    def _launch(self, replica: Replica) -> None:
        replica.port = _free_port()
        replica.url = f"http://127.0.0.1:{replica.port}"
        gpus_each = len(replica.gpus.split(",")) if replica.gpus else 1
        argv = managed_command(self.spec, replica.port, gpus_each)
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
        if self.spec.lora_rank:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
        if replica.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = replica.gpus
        log_dir = self.spec.log_dir or self._temp_dir()
        log_dir.mkdir(parents=True, exist_ok=True)
        replica.log_path = log_dir / f"replica-{replica.index}.log"
        with open(replica.log_path, "ab") as log:
            try:
                replica.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                   stdin=subprocess.DEVNULL)
            except OSError as exc:
                raise ConfigError(f"cannot start rollout server `{shlex.join(argv)}`: {exc}") from None
        replica.alive = True

    def _temp_dir(self) -> Path:
        if self._tmp is None:
            import tempfile

            self._tmp = Path(tempfile.mkdtemp(prefix="harness-rollout-"))
        return self._tmp

    def _wait_healthy(self, replica: Replica) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if replica.process is not None and replica.process.poll() is not None:
                raise ConfigError(f"rollout server {replica.index} exited with status {replica.process.returncode} "
                                  f"while starting: {_last_line(replica.log_path)} (log: {replica.log_path})")
            try:
                if self.client.get(f"{replica.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise ConfigError(f"rollout server {replica.index} did not answer /health within {START_TIMEOUT_S:.0f} s "
                          f"(log: {replica.log_path}); set HARNESS_ROLLOUT_START_TIMEOUT for a slow start")

    def close(self) -> None:
        """Stop the managed servers (SIGTERM, then SIGKILL after a grace period)."""
        for replica in self.replicas:
            _stop(replica.process)
            replica.process = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # -- choosing and losing replicas ---------------------------------------------------------------
    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    def least_busy(self) -> Replica:
        live = self.live()
        if not live:
            raise RolloutServersGone("no rollout server is left: every --rollout-url server stopped answering")
        return min(live, key=lambda r: (r.open_episodes, r.index))

    def recover(self, replica: Replica, why: str) -> bool:
        """A replica stopped answering: restart it (managed; True once it is up again) or drop it
        with a warning (given; False). Raises when no server is left."""
        if not replica.alive:
            return replica.managed
        replica.alive = False
        replica.incarnation += 1
        replica.open_episodes = 0
        if not replica.managed:
            print(f"warning: rollout server {replica.url} stopped answering ({why}); continuing without it, on "
                  f"{len(self.live())} server(s)", file=sys.stderr, flush=True)
            if not self.live():
                raise RolloutServersGone(f"no rollout server is left: the last one, {replica.url}, stopped answering "
                                         f"({why})")
            return False
        print(f"warning: rollout server {replica.index} ({replica.url}) stopped answering ({why}); restarting it",
              file=sys.stderr, flush=True)
        _stop(replica.process)
        self._launch(replica)
        self._wait_healthy(replica)
        replica.served = check_server(self.client, replica.url, want_model=self.fixed_model, topk=self.topk)
        return True


def _stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _last_line(path: Path | None) -> str:
    try:
        lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except (OSError, TypeError):
        return "no output"
    return lines[-1].strip()[:300] if lines else "no output"
