"""The ``vllm`` rollout engine: replies sampled by vLLM OpenAI-compatible servers, token-exact.

Each turn is one ``POST /v1/completions`` whose prompt is the trace prefix as token ids (nothing
is re-tokenized); the ``Sample`` is built from the ids, log-probs and top-K the server returns
(``return_token_ids``, ``return_tokens_as_token_ids``), never from text. The field names and what
they mean were read from vLLM 0.34.0's source: docs/rollout-engines.md.

- **Seeds.** An episode's stream (``episode_rng``) is a counter: its n-th request carries the seed
  ``request_seed(episode seed, n)``, so an episode replays identically on the same server and weights.
- **Replicas.** An episode is pinned to one server for all its turns (its prefix stays in that
  server's prefix cache); a new episode goes to the server with the fewest open episodes. A server
  that stops answering (connection refused or 5xx after a short retry) is restarted (managed) or
  dropped (given), and the episodes pinned to it are played again from the start with the same
  seeds (``ReplayEpisode``, the runner's infra retry).
- **Weights.** ``sync_weights`` after every optimizer step (and once when training starts): the
  trainer's model is saved (``save_pretrained``) to one directory, and every server, paused,
  reloads it (``collective_rpc reload_weights``, or ``load_lora_adapter`` for a LoRA adapter) and is
  labelled with the step (``update_weight_version``). Every sampled choice must name that label
  (``weight_versions``): a sample from other weights is an error, never trained on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from harness.errors import ConfigError, HarnessError, InfraError, ReplayEpisode, RunFailed
from harness.policy.engine import SampleRequest, SamplingSettings
from harness.policy.vllm_replicas import Replica, ReplicaPool, RolloutServersGone, ServerSpec

if TYPE_CHECKING:
    from harness.policy.sampler import Sample

__all__ = ["VllmEngine", "EpisodeStream", "request_seed", "completion_request", "sample_from_choice",
           "make_vllm_engine", "LORA_NAME"]

LORA_NAME = "harness-policy"
"""The adapter name requests use under LoRA."""
RETRIES = 3
"""Extra attempts of a request whose server did not answer (0.5, 1, 2 s apart), before the server
counts as dead."""
REQUEST_TIMEOUT = httpx.Timeout(1800.0, connect=10.0)
"""A reply may queue behind a whole batch of long ones; a server silent for 30 minutes is dead."""
REPLAYS = 2
"""How many times an episode whose server died is played again (then stored as infra)."""
_CLAMPED = -9999.0  # vLLM clamps log-probs at this value (-inf does not serialize)


def request_seed(seed: int, turn: int) -> int:
    """The seed of an episode's ``turn``-th request: an int64 (vLLM's range) from both."""
    digest = hashlib.sha256(f"{int(seed)}:{int(turn)}".encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


@dataclass
class EpisodeStream:
    """One episode's random stream and where it is pinned."""

    seed: int
    turns: int = 0
    replica: Replica | None = None
    incarnation: int = 0


class _ReplicaDown(Exception):
    def __init__(self, replica: Replica, why: str):
        super().__init__(why)
        self.replica, self.why = replica, why


class StaleWeights(InfraError):
    """A server sampled with weights other than the ones last synced (another run or person synced it,
    or it was restarted behind the harness's back): the run stops rather than train on such samples."""


class WeightSyncError(HarnessError):
    """vLLM refused the weight update (a server that answered with an error, not a dead one: that
    one is restarted or dropped; or vLLM in this process)."""

    exit_code = 1


class VllmEngine:
    name = "vllm"
    concurrent = True  # servers batch continuously: a batch need not wait for the one before
    where = "vllm servers"
    syncs_weights = True

    def __init__(self, *, urls: list[str], replicas: int, gpus: str | None, topk: int,
                 lora_rank: int, adapter_path: str | None, base_model: str, fixed_model: str | None,
                 gpu_memory: float | None = None, log_dir: Path | None = None):
        """``adapter_path``: a LoRA adapter the servers load before any request (evaluating an
        adapter checkpoint); ``base_model``: what a managed server loads; ``fixed_model``: the
        model name a given server must serve (None: any, its weights are synced over, and no
        request goes out before the first ``sync_weights``)."""
        self.lora = bool(lora_rank or adapter_path)
        self.client = httpx.Client(timeout=REQUEST_TIMEOUT,
                                   limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        spec = ServerSpec(model=base_model, max_logprobs=max(topk, 1), lora_rank=lora_rank, log_dir=log_dir,
                          gpu_memory=gpu_memory)
        self.pool = ReplicaPool(self.client, urls=urls, replicas=replicas, gpus=gpus, spec=spec, topk=topk,
                                fixed_model=fixed_model)
        self.version: str | None = None
        """The weight label every sample must carry (None: never synced, e.g. ``harness eval``)."""
        self._weights: Path | None = Path(adapter_path) if adapter_path else None
        """What a (re)started server must load before use: the latest synced directory."""
        self.failure: HarnessError | None = None
        """Set when no server is left; the caller raises it after the episodes in flight end."""
        self._lock = threading.Lock()
        self._recover_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=256, thread_name_prefix="vllm-request")
        try:
            self.pool.start()
            if self._weights is not None:
                for replica in self.pool.live():
                    self._load(replica, self._weights, None)
        except BaseException:
            self.close()
            raise

    # -- the RolloutEngine interface -----------------------------------------------------------------
    def episode_rng(self, seed: int) -> EpisodeStream:
        return EpisodeStream(int(seed))

    def end_episode(self, stream: EpisodeStream) -> None:
        with self._lock:
            if stream.replica is not None and stream.incarnation == stream.replica.incarnation:
                stream.replica.open_episodes -= 1
            stream.replica = None

    def sample(self, requests: list[SampleRequest], settings: SamplingSettings) -> list[Sample | BaseException]:
        """One reply per request, sent all at once. A request whose server died gets a
        ``ReplayEpisode`` instead of a ``Sample`` (its episode is played again), after the server
        was restarted or dropped."""
        if self.failure is not None:
            raise self.failure
        if self.pool.fixed_model is None and self.version is None:  # a trainer that forgot to sync
            raise RuntimeError("the rollout servers got no weights yet: sync_weights comes before the first sample")
        jobs: list[Any] = []
        with self._lock:
            for request in requests:
                stream = request.rng
                if stream.replica is None:
                    stream.replica = self.pool.least_busy()
                    stream.incarnation = stream.replica.incarnation
                    stream.replica.open_episodes += 1
                if stream.incarnation != stream.replica.incarnation:
                    jobs.append(self._replay(stream.replica, "its rollout server was restarted or dropped"))
                    continue
                body = self._body(request, settings, stream.replica)
                stream.turns += 1
                jobs.append((self._executor.submit(self._complete, stream.replica, body, settings),
                             stream.incarnation))
        results: list[Sample | BaseException] = []
        down: dict[int, tuple[_ReplicaDown, int]] = {}
        for job in jobs:
            if isinstance(job, BaseException):
                results.append(job)
                continue
            job, incarnation = job
            try:
                results.append(job.result())
            except _ReplicaDown as exc:
                down.setdefault(exc.replica.index, (exc, incarnation))
                results.append(self._replay(exc.replica, exc.why))
            except StaleWeights as exc:  # another process changed the server's weights: stop the run
                self.failure = self.failure or RunFailed(str(exc))
                results.append(exc)
            except InfraError as exc:
                results.append(exc)
            except (ValueError, KeyError, IndexError, TypeError) as exc:  # a reply not shaped as vLLM's
                results.append(InfraError(f"unreadable reply from a rollout server: {type(exc).__name__}: {exc}"))
        for exc, incarnation in down.values():
            self._recover(exc.replica, exc.why, incarnation)
        return results

    # -- requests -------------------------------------------------------------------------------------
    def _body(self, request: SampleRequest, settings: SamplingSettings, replica: Replica) -> dict[str, Any]:
        return completion_request(LORA_NAME if self.lora else replica.served, request.prompt_ids,
                                  request_seed(request.rng.seed, request.rng.turns), settings)

    def _post(self, replica: Replica, path: str, body: dict[str, Any] | None = None, *,
              params: dict[str, str] | None = None, timeout: Any = REQUEST_TIMEOUT) -> httpx.Response:
        """POST, retried while the server does not answer or answers 5xx; ``_ReplicaDown`` when it
        still does after the retries. Any other answer (4xx included) is returned."""
        why = ""
        for attempt in range(RETRIES + 1):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            try:
                response = self.client.post(f"{replica.url}{path}", json=body, params=params, timeout=timeout)
            except httpx.TransportError as exc:  # refused, reset, timed out
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            if response.status_code < 500 or attempt == RETRIES:
                if response.status_code >= 500:
                    raise _ReplicaDown(replica, f"HTTP {response.status_code} {response.text[:200]}")
                return response
            why = f"HTTP {response.status_code}"
        raise _ReplicaDown(replica, why)

    def _complete(self, replica: Replica, body: dict[str, Any], settings: SamplingSettings) -> Sample:
        response = self._post(replica, "/v1/completions", body)
        if response.status_code != 200:
            raise InfraError(f"rollout server {replica.url} refused a completion: HTTP {response.status_code} "
                             f"{' '.join(response.text.split())[:300]}")
        choice = response.json()["choices"][0]
        if choice.get("prompt_token_ids") != body["prompt"]:
            raise InfraError(f"rollout server {replica.url} did not sample from the prompt ids it was sent "
                             "(prompt_token_ids differ); is it a vLLM server with return_token_ids?")
        self._check_version(replica, choice)
        return sample_from_choice(choice, settings)

    def _check_version(self, replica: Replica, choice: dict[str, Any]) -> None:
        if self.version is None:
            return
        spans = choice.get("weight_versions")
        versions = sorted({str(span.get("version")) for span in spans or []})
        if spans is None or not sampled_by(versions, self.version):
            raise StaleWeights(f"rollout server {replica.url} sampled with weights {versions or 'unlabelled'}, not the "
                               f"trainer's (step {self.version}): another process syncs it too? A run needs its "
                               "servers to itself; samples of other weights are never trained on")

    def _replay(self, replica: Replica, why: str) -> ReplayEpisode:
        return ReplayEpisode(f"rollout server {replica.url} failed ({why}); the episode is played again", REPLAYS)

    def _recover(self, replica: Replica, why: str, incarnation: int) -> None:
        """Restart or drop ``replica``, which failed a request sent to its ``incarnation``."""
        try:
            # Not under ``_lock``: a restart takes minutes, and episodes ending meanwhile take it.
            # Under its own: two batches in flight may both find the server dead (the second finds
            # it restarted already), and no episode may be pinned to it before it has the weights.
            with self._recover_lock:
                if replica.incarnation != incarnation:
                    return
                if self.pool.recover(replica, why) and self._weights is not None:
                    replica.alive = False
                    self._load(replica, self._weights, self.version)
                    replica.alive = True
        except RolloutServersGone as exc:
            self.failure = exc
        except (ConfigError, WeightSyncError, _ReplicaDown) as exc:  # the restart, or its first sync, failed
            self.failure = RolloutServersGone(f"rollout server {replica.index} could not be restarted: {exc}")

    # -- weights ----------------------------------------------------------------------------------------
    def sync_weights(self, model: Any, step: int, directory: Path) -> None:
        """Make every server serve ``model``'s current weights, labelled ``str(step)``. The weights
        go through one directory under ``directory`` (only the latest is kept: a restarted server
        loads it)."""
        target = save_for_sync(model, Path(directory), step)
        version = str(step)
        for replica in list(self.pool.live()):
            try:
                self._load(replica, target, version)
            except _ReplicaDown as exc:
                self._recover(exc.replica, exc.why, exc.replica.incarnation)  # restarted: loads ``_weights``
                if self.failure is not None:
                    raise self.failure from None
                if replica.alive:
                    try:
                        self._load(replica, target, version)
                    except _ReplicaDown as again:
                        raise RolloutServersGone(f"rollout server {replica.url} stopped answering again right after "
                                                 f"its restart ({again.why}); see its log") from None
        self.version, previous, self._weights = version, self._weights, target
        drop_previous_sync(previous, target)

    def _load(self, replica: Replica, path: Path, version: str | None) -> None:
        """Pause ``replica`` (in-flight requests finish first), load ``path``, label it, resume."""
        self._call(replica, "/pause", params={"mode": "wait"})
        try:
            if self.lora:
                self._call(replica, "/v1/load_lora_adapter",
                           {"lora_name": LORA_NAME, "lora_path": str(path.resolve()), "load_inplace": True})
            else:
                self._call(replica, "/collective_rpc",
                           {"method": "reload_weights", "kwargs": {"weights_path": str(path.resolve())}})
            if version is not None:
                self._call(replica, "/update_weight_version", {"new_version": version})
        finally:
            self._call(replica, "/resume")
        if version is not None:
            try:
                served = self.client.get(f"{replica.url}/weight_info", timeout=30).json().get("weight_version")
            except (httpx.HTTPError, ValueError) as exc:
                raise _ReplicaDown(replica, f"GET /weight_info: {type(exc).__name__}: {exc}") from None
            if str(served) != version:
                raise WeightSyncError(f"rollout server {replica.url} reports weights {served} after the sync to "
                                      f"step {version}")

    def _call(self, replica: Replica, path: str, body: dict[str, Any] | None = None, *,
              params: dict[str, str] | None = None) -> None:
        response = self._post(replica, path, body, params=params, timeout=httpx.Timeout(3600.0, connect=10.0))
        if response.status_code != 200:
            raise WeightSyncError(f"weight sync: rollout server {replica.url} answered POST {path} with HTTP "
                                  f"{response.status_code}: {' '.join(response.text.split())[:300]}")

    def before_update(self) -> None:
        pass  # the servers keep their memory: they run on GPUs of their own

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.pool.close()
        self.client.close()


def save_for_sync(model: Any, directory: Path, step: int) -> Path:
    """``model``'s weights (a peft model: its adapter only) saved to ``directory/step-N`` for the
    engine to load; the directory's path."""
    target = directory / f"step-{step:06d}"
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    return target


def drop_previous_sync(previous: Path | None, target: Path) -> None:
    """Delete the sync directory before ``target`` (only the latest is kept: a restarted or woken
    engine loads it), unless it is not one of ours (an adapter checkpoint being evaluated)."""
    if previous is not None and previous != target and previous.parent == target.parent:
        shutil.rmtree(previous, ignore_errors=True)


def sampled_by(versions: list[str], current: str) -> bool:
    """Whether a sample whose ``weight_versions`` name ``versions`` (sorted, distinct) came from the
    weights labelled ``current`` (an empty reply names none)."""
    return versions in ([current], [])


def completion_request(model: str, prompt: list[int], seed: int, settings: SamplingSettings) -> dict[str, Any]:
    """The ``POST /v1/completions`` body of one turn (vLLM 0.34's field names; why each is sent:
    docs/rollout-engines.md)."""
    return {
        "model": model,
        "prompt": list(prompt),
        "max_tokens": settings.max_new_tokens,
        "temperature": settings.temperature,
        # nothing may warp the distribution the log-probs describe (the hf sampler's rule)
        "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
        "stop_token_ids": sorted(settings.stop_ids), "ignore_eos": False,
        "seed": seed,
        "logprobs": max(settings.topk, 1),
        "add_special_tokens": False, "skip_special_tokens": False,
        "return_tokens_as_token_ids": True, "return_token_ids": True, "return_weight_versions": True,
    }


def sample_from_choice(choice: dict[str, Any], settings: SamplingSettings) -> Sample:
    """A ``Sample`` from one ``/v1/completions`` choice: the sampled ids, their log-probs, whether
    the reply ended on a stop id, and with top-K the K most likely ids and log-probs at every
    position, in descending order of log-prob (as ``torch.topk`` gives them in the hf sampler)."""
    from harness.policy.sampler import Sample

    ids = [int(i) for i in choice["token_ids"]]
    logprobs = choice.get("logprobs") or {}
    tokens = logprobs.get("tokens") or []
    if tokens != [f"token_id:{i}" for i in ids]:
        raise InfraError("rollout server returned log-prob tokens that are not the sampled ids; send "
                         "return_tokens_as_token_ids (a vLLM server too old for it?)")
    values = [_unclamp(x) for x in logprobs.get("token_logprobs") or []]
    if len(values) != len(ids):
        raise InfraError(f"rollout server returned {len(values)} log-probs for {len(ids)} sampled tokens")
    sample = Sample(ids, values, bool(ids) and ids[-1] in settings.stop_ids)
    if settings.topk:
        rows = logprobs.get("top_logprobs") or []
        set_topk(sample, [[(_token_id(key), _unclamp(lp)) for key, lp in row.items()] for row in rows], settings.topk)
    return sample


def set_topk(sample: Sample, rows: list[list[tuple[int, float]]], k: int) -> None:
    """Give ``sample`` its ``[n, K]`` top-K ids and log-probs from vLLM's per-position entries
    (the sampled token first, then the top K: K + 1 entries when it is not among them), in
    descending order of log-prob, as ``torch.topk`` gives them in the hf sampler."""
    import torch

    n = len(sample.ids)
    if len(rows) != n:
        raise InfraError(f"rollout engine returned top log-probs for {len(rows)} of {n} positions")
    top_ids, top_lp = [], []
    for row in rows:
        ranked = sorted(row, key=lambda kv: -kv[1])[:k]
        if len(ranked) < k:
            raise InfraError(f"rollout engine returned {len(ranked)} top log-probs, not {k}; start it with "
                             f"--max-logprobs {k} or more")
        top_ids.append([i for i, _ in ranked])
        top_lp.append([lp for _, lp in ranked])
    sample.topk_ids = torch.tensor(top_ids, dtype=torch.int32).reshape(n, k)
    sample.topk_logprobs = torch.tensor(top_lp, dtype=torch.float32).reshape(n, k)


def _unclamp(value: Any) -> float:
    value = float(value)
    return float("-inf") if value <= _CLAMPED else value


def _token_id(key: str) -> int:
    if not key.startswith("token_id:"):
        raise InfraError(f"rollout server returned a top log-prob keyed {json.dumps(key)}, not token_id:N")
    return int(key.split(":", 1)[1])


def served_model(cfg: Any, model: Any) -> tuple[str, int, str | None]:
    """What vLLM loads for a ``PolicyConfig``: (model, LoRA rank or 0, adapter checkpoint or None).
    A policy being trained under LoRA: its base model, the adapters synced over. An adapter
    checkpoint evaluated as it is: its base model, with that adapter on every request."""
    from harness.policy.local_policy import check_model_path

    peft_config = getattr(model, "peft_config", None)
    if peft_config:  # training LoRA adapters over a base model
        settings = next(iter(peft_config.values()))
        return settings.base_model_name_or_path, int(settings.r), None
    if check_model_path(cfg.path) and not cfg.trained:  # evaluating an adapter checkpoint
        saved = json.loads((Path(cfg.path).expanduser() / "adapter_config.json").read_text())
        return saved["base_model_name_or_path"], int(saved["r"]), cfg.path
    return cfg.path, 0, None


def make_vllm_engine(cfg: Any, model: Any) -> Any:
    """The engine a ``PolicyConfig`` asks for: servers (given or started), or, with none named,
    vLLM in this process (``vllm_inprocess``). A policy being trained (``cfg.trained``) gets its
    weights to the engine by ``sync_weights``, so a given server may serve any model of the same
    architecture; one evaluated as it is must be served by name (or, a LoRA adapter checkpoint, by
    its base model's name: the engine loads the adapter)."""
    base, rank, adapter = served_model(cfg, model)
    if not (cfg.rollout_urls or cfg.rollout_replicas or cfg.rollout_gpus):
        from harness.policy.vllm_inprocess import InProcessVllmEngine

        return InProcessVllmEngine(model=base, topk=cfg.record_topk, lora_rank=rank, adapter_path=adapter,
                                   trained=cfg.trained, gpu_memory=cfg.rollout_gpu_memory)
    return VllmEngine(urls=list(cfg.rollout_urls or []), replicas=cfg.rollout_replicas,
                      gpus=cfg.rollout_gpus, topk=cfg.record_topk, lora_rank=rank,
                      adapter_path=adapter, base_model=base, fixed_model=None if cfg.trained else base,
                      gpu_memory=cfg.rollout_gpu_memory,
                      log_dir=Path(cfg.rollout_log_dir) if cfg.rollout_log_dir else None)
