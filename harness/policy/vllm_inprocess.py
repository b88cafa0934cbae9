"""The ``vllm`` rollout engine in the training process: ``vllm.LLM`` beside the trainer, asleep
during the update.

``--rollout-engine vllm`` with no ``--rollout-url``/``--rollout-replicas``/``--rollout-gpus``. The
calls, read from vLLM 0.34.0's source (docs/rollout-engines.md), are the server mode's through the
Python API instead of HTTP:

- **Requests.** One ``LLM.generate`` per batch of turns: ``TokensPrompt`` prompts (the trace prefix
  as ids, nothing re-tokenized) and one ``SamplingParams`` per request with the fields the server
  mode sends (``sampling_params``), seeded ``request_seed(episode seed, turn)``. The ``Sample`` is
  built from ``CompletionOutput.token_ids`` and ``.logprobs`` (per position a ``{id: Logprob}``
  dict: the sampled token and the top K).
- **Memory.** ``LLM(enable_sleep_mode=True)``. After a step's rollouts, before the trainer's
  forward passes, ``before_update`` puts it to sleep: level 2 (weights and KV cache freed; the
  weights are replaced after the update anyway), level 1 under LoRA (the base weights are kept,
  offloaded to CPU memory, since only the adapter changes).
- **Weights.** ``sync_weights`` saves the trainer's model (``save_pretrained``) and wakes the
  weights, reloads them in place (``collective_rpc("reload_weights", weights_path=...)``, vLLM's
  worker method the server mode calls over HTTP), then wakes the KV cache (so it is not resident
  while weights are written) and labels them with the step (``update_weight_version``). Under LoRA
  the requests name the new adapter directory by a new ``LoRARequest`` id (vLLM loads it at the
  next request; ``max_loras=1`` evicts the old one). Every output's ``weight_versions`` must name
  the step, as in the server mode.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import ConfigError, InfraError
from harness.policy.engine import SampleRequest, SamplingSettings
from harness.policy.vllm_engine import (
    LORA_NAME,
    EpisodeStream,
    WeightSyncError,
    drop_previous_sync,
    request_seed,
    sampled_by,
    save_for_sync,
    set_topk,
)

if TYPE_CHECKING:
    from harness.policy.sampler import Sample

__all__ = ["InProcessVllmEngine", "DEFAULT_GPU_MEMORY", "MISSING_VLLM", "llm_arguments", "sampling_params"]

DEFAULT_GPU_MEMORY = 0.5
"""The fraction of the GPU's memory vLLM takes in the training process (its KV cache fills what the
weights leave), unless ``--rollout-gpu-memory`` says otherwise; the trainer keeps the rest while
vLLM is awake, and all of it during the update, when vLLM sleeps."""


class InProcessVllmEngine:
    name = "vllm"
    concurrent = False  # one LLM.generate at a time: it batches the whole list it is given
    where = "vllm in-process"
    syncs_weights = True
    failure = None  # a vLLM error fails the batch it happened in (LocalPolicy): nothing outlives it

    def __init__(self, *, model: str, topk: int, lora_rank: int, adapter_path: str | None, trained: bool,
                 gpu_memory: float | None, seed: int = 0):
        """``model``: what vLLM loads (a LoRA run's base model); ``adapter_path``: a LoRA adapter
        checkpoint every request uses (evaluating it); ``trained``: the trainer gives the weights
        by ``sync_weights`` (and vLLM sleeps during its updates)."""
        try:
            import vllm
        except ImportError:
            raise ConfigError(MISSING_VLLM) from None
        self._vllm = vllm
        self.lora_rank = lora_rank or 0
        self.trained = trained
        self.llm = vllm.LLM(**llm_arguments(model, topk=topk, lora_rank=self.lora_rank,
                                            sleep=trained, gpu_memory=gpu_memory, seed=seed))
        self.asleep = 0
        """The level ``before_update`` put it to sleep at (0: awake)."""
        self.version: str | None = None
        """The weight label every sample must carry (None: never synced, e.g. ``harness eval``)."""
        self._lora: Any = None
        self._lora_ids = 0
        self._weights: Path | None = None
        if adapter_path is not None:
            self._use_adapter(Path(adapter_path))

    # -- the RolloutEngine interface ----------------------------------------------------------------
    def episode_rng(self, seed: int) -> EpisodeStream:
        return EpisodeStream(int(seed))

    def end_episode(self, stream: EpisodeStream) -> None:
        pass

    def sample(self, requests: list[SampleRequest], settings: SamplingSettings) -> list[Sample | BaseException]:
        if self.trained and self.version is None:
            raise RuntimeError("the in-process vLLM got no weights yet: sync_weights comes before the first sample")
        if self.asleep:  # a rollout between before_update and the sync: the weights are the last synced
            self._wake(self._weights)
        params = [self._vllm.SamplingParams(**sampling_params(settings, request_seed(r.rng.seed, r.rng.turns)))
                  for r in requests]
        for request in requests:
            request.rng.turns += 1
        prompts = [self._vllm.TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora)
        if len(outputs) != len(requests):
            raise InfraError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
        results: list[Sample | BaseException] = []
        for request, output in zip(requests, outputs):
            try:
                results.append(self._sample(request, output, settings))
            except InfraError as exc:
                results.append(exc)
        return results

    def before_update(self) -> None:
        """Free the GPU memory vLLM holds for the trainer's forward and backward passes: level 2
        drops the weights (``sync_weights`` reloads them), level 1 under LoRA offloads the base
        weights to CPU memory (only the adapter changes)."""
        if self.trained and not self.asleep:
            level = 1 if self.lora_rank else 2
            self.llm.sleep(level=level)
            self.asleep = level

    def close(self) -> None:
        # ``LLM`` has no close: its engine-core process stops, and its GPU memory is freed, when the
        # object is collected. Collected now, so that the next run of a train-suite in this
        # process finds the memory free when it makes its own.
        self.llm = None
        gc.collect()
        _empty_gpu_cache()

    # -- samples ----------------------------------------------------------------------------------
    def _sample(self, request: SampleRequest, output: Any, settings: SamplingSettings) -> Sample:
        from harness.policy.sampler import Sample

        if list(output.prompt_token_ids or []) != list(request.prompt_ids):
            raise InfraError("vLLM did not sample from the prompt ids it was given (prompt_token_ids differ)")
        completion = output.outputs[0]
        ids = [int(i) for i in completion.token_ids]
        rows = completion.logprobs
        if rows is None or len(rows) != len(ids):
            raise InfraError(f"vLLM returned log-probs for {0 if rows is None else len(rows)} of {len(ids)} "
                             "sampled tokens")
        try:
            values = [float(row[token].logprob) for row, token in zip(rows, ids)]
        except KeyError:
            raise InfraError("vLLM returned a log-prob row without its sampled token") from None
        self._check_version(completion)
        sample = Sample(ids, values, bool(ids) and ids[-1] in settings.stop_ids)
        if settings.topk:
            set_topk(sample, [[(int(i), float(lp.logprob)) for i, lp in row.items()] for row in rows], settings.topk)
        return sample

    def _check_version(self, completion: Any) -> None:
        if self.version is None:
            return
        versions = sorted({str(span.version) for span in completion.weight_versions or []})
        if not sampled_by(versions, self.version):
            raise InfraError(f"the in-process vLLM sampled with weights {versions}, not the trainer's "
                             f"(step {self.version}); samples of other weights are never trained on")

    # -- weights ----------------------------------------------------------------------------------
    def sync_weights(self, model: Any, step: int, directory: Path) -> None:
        """Give vLLM ``model``'s current weights, labelled ``str(step)``, through one directory
        under ``directory`` (only the latest is kept)."""
        target = save_for_sync(model, Path(directory), step)
        if self.asleep:
            self._wake(target)
        elif self.lora_rank:
            self._use_adapter(target)
        else:
            self._reload(target)
            # the prefix cache holds KV computed with the old weights (a sleep would have dropped it)
            if self.llm.reset_prefix_cache() is False:  # vLLM's answer when requests still run
                raise WeightSyncError("the in-process vLLM could not reset its prefix cache after a weight sync")
        self.version, previous, self._weights = str(step), self._weights, target
        self.llm.update_weight_version(self.version)
        drop_previous_sync(previous, target)

    def _wake(self, weights: Path | None) -> None:
        """Wake the weights, load ``weights`` into them, then wake the KV cache."""
        _empty_gpu_cache()  # give back what the trainer's caching allocator holds, for vLLM to take
        if self.lora_rank:
            self._ok(self.llm.wake_up(tags=["weights", "kv_cache"]), "wake_up")
            if weights is not None:
                self._use_adapter(weights)
        else:
            self.llm.wake_up(tags=["weights"])
            if weights is None:
                raise WeightSyncError("the in-process vLLM slept at level 2 before it got weights to wake with")
            self._reload(weights)
            self._ok(self.llm.wake_up(tags=["kv_cache"]), "wake_up")
        self.asleep = 0

    def _reload(self, weights: Path) -> None:
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(weights.resolve())})
        except Exception as exc:  # vLLM raises what its worker raised
            raise WeightSyncError(f"weight sync: the in-process vLLM could not reload {weights}: "
                                  f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None

    def _use_adapter(self, path: Path) -> None:
        """Requests name ``path``'s adapter from now on (a new id: vLLM loads it at the next request)."""
        from vllm.lora.request import LoRARequest

        self._lora_ids += 1
        self._lora = LoRARequest(lora_name=f"{LORA_NAME}-{self._lora_ids}", lora_int_id=self._lora_ids,
                                 lora_path=str(path.resolve()))

    @staticmethod
    def _ok(awake: Any, call: str) -> None:
        if awake is False:
            raise WeightSyncError(f"the in-process vLLM is not fully awake after {call}")


MISSING_VLLM = ("--rollout-engine vllm without --rollout-url/--rollout-replicas/--rollout-gpus runs vLLM in this "
                "process, and the vllm package is not installed: pip install -e .[vllm] on a GPU machine, or give "
                "running servers with --rollout-url")


def llm_arguments(model: str, *, topk: int, lora_rank: int, sleep: bool, gpu_memory: float | None,
                  seed: int = 0) -> dict[str, Any]:
    """``vllm.LLM(**...)``: the arguments of ``LLM.__init__`` and the ``EngineArgs`` fields it
    passes on (vLLM 0.34; the server mode's ``vllm serve`` flags, as keywords)."""
    arguments: dict[str, Any] = {
        "model": model, "seed": seed,
        "gpu_memory_utilization": DEFAULT_GPU_MEMORY if gpu_memory is None else gpu_memory,
        "logprobs_mode": "processed_logprobs",  # the tempered distribution the token was drawn from
        "max_logprobs": max(topk, 1),
        "generation_config": "vllm",  # no sampling defaults from the model's generation_config.json
        "enable_sleep_mode": sleep,
    }
    if lora_rank:
        arguments.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=1)
    return arguments


def sampling_params(settings: SamplingSettings, seed: int) -> dict[str, Any]:
    """``vllm.SamplingParams(**...)`` of one turn: what the server mode sends in its
    ``/v1/completions`` body (``vllm_engine.completion_request``), as ``SamplingParams`` fields."""
    return {
        "n": 1, "max_tokens": settings.max_new_tokens, "temperature": settings.temperature,
        # nothing may warp the distribution the log-probs describe (the hf sampler's rule)
        "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
        "stop_token_ids": sorted(settings.stop_ids), "ignore_eos": False,
        "seed": seed,
        "logprobs": max(settings.topk, 1),
        "detokenize": False,  # the ids are the truth; the policy decodes what it needs
        "skip_special_tokens": False,
    }


def _empty_gpu_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
