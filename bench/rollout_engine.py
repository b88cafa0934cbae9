"""Rollout engines on a GPU: the ``hf`` sampler against ``vllm`` (a server, and ``vllm.LLM`` in this
process, asleep during the update), on one randomly initialised model of a realistic size
(Qwen2.5-1.5B's config), in one run.

NOT RUN YET: it needs a CUDA GPU and vLLM (``pip install -e .[vllm]``); the machine the engine was
written on has neither, and no number from it is in the docs. Run from the repository root:

    .venv/bin/python bench/rollout_engine.py                          # one GPU: trainer and server share it
    .venv/bin/python bench/rollout_engine.py --rollout-gpus 1         # the server on GPU 1, the trainer on 0
    .venv/bin/python bench/rollout_engine.py --modes in-process        # hf and in-process vLLM only

Printed per engine, on the same prompts: generation tokens/s (``engine.sample`` of ``--batch``
random prompts of ``--prompt-len`` tokens, ``--new-tokens`` each, no stop id so every reply runs to
the limit) and the time of a training step (sampling, then the trainer's forward and backward on
the sampled rows, an AdamW step and, for vllm, the weight sync; in-process, vLLM sleeps before the
trainer's passes and wakes in the sync); for vllm also the sync alone (``save_pretrained`` into
the sync directory, then ``reload_weights``; in-process with the wake-up) and the save alone. The
ratios to hf are printed last: compare numbers of one run only.

The model: Qwen2.5-1.5B's architecture with random weights (no download: the config is written
here) and a made-up word-level tokenizer over its whole vocabulary, so that any id the random
model samples decodes. The server is ``vllm serve`` through ``HARNESS_ROLLOUT_SERVER_COMMAND``
(the engine's own flags, plus ``--gpu-memory-utilization`` so that a shared GPU leaves the trainer
room). ``--tiny --device cpu`` with ``HARNESS_ROLLOUT_SERVER_COMMAND`` naming ``harness
serve-policy`` (the CPU double) runs the same code on a toy-sized model: a check that the script
works, not a measurement (that is how it was checked here; the in-process arm then needs
``PYTHONPATH=tests/vllm_inprocess``, the CPU double of vLLM's Python API).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")
"""Qwen/Qwen2.5-1.5B-Instruct's config.json (the architecture fields)."""
TINY = dict(QWEN25_15B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)
"""``--tiny``: the same architecture, small enough for a CPU check of the script."""


def build_model(directory: Path, sizes: dict, seed: int) -> Path:
    """A random Qwen2.5-shaped model and a tokenizer that decodes every id, saved to ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**sizes, torch_dtype="bfloat16")
    Qwen2ForCausalLM(config).save_pretrained(directory)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", pad_token="t0", eos_token="t1").save_pretrained(
        directory)
    return directory


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=rng).tolist()


def generate(policy, batch: list[list[int]], new_tokens: int, seed: int):
    """One ``engine.sample`` of the batch; (samples, seconds)."""
    from harness.policy.engine import SampleRequest, SamplingSettings

    engine = policy.engine
    settings = SamplingSettings(temperature=1.0, max_new_tokens=new_tokens, stop_ids=frozenset())
    requests = [SampleRequest(p, engine.episode_rng(seed + n)) for n, p in enumerate(batch)]
    _synchronize()
    started = time.perf_counter()
    samples = engine.sample(requests, settings)
    _synchronize()
    return samples, time.perf_counter() - started


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_step(model, optimizer, batch: list[list[int]], samples, micro_batch_tokens: int) -> None:
    """The trainer's side of a step: its forward and backward on the sampled rows, packed as the
    update packs them, and an optimizer step (a plain likelihood loss: the cost, not the method)."""
    from harness.policy.trace import TokenTrace
    from trainers.model_setup import autocast
    from trainers.packing import pack
    from trainers.update import policy_forward

    traces = []
    for prompt, sample in zip(batch, samples):
        trace = TokenTrace()
        trace.add_prompt(prompt)
        trace.add_response(sample.ids, sample.logprobs)
        traces.append(trace)
    device = next(model.parameters()).device
    packed = pack(traces, None, micro_batch_tokens)
    optimizer.zero_grad(set_to_none=True)
    for mb in packed.micro_batches:
        mb = mb.to(device)
        with autocast(device):
            logp = policy_forward(model, mb, 1.0, with_entropy=False)[0]
        (-(logp * mb.loss_mask).sum() / max(packed.real_tokens, 1)).backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda:0", help="the trainer's device")
    parser.add_argument("--rollout-gpus", help="GPU ids of the vllm server (default: the trainer's GPU, shared)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45,
                        help="vllm's share of its GPU's memory (leave the trainer room on a shared GPU)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per engine (after one warm-up)")
    parser.add_argument("--micro-batch-tokens", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a toy-sized model: a check of the script, on CPU")
    parser.add_argument("--modes", default="server,in-process",
                        help="vllm modes to compare with hf: server (one replica), in-process, or both")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
        sys.exit("bench/rollout_engine.py needs a CUDA GPU (and vLLM: pip install -e .[vllm])")
    sizes = TINY if args.tiny else QWEN25_15B

    from harness.policy.local_policy import LocalPolicy, PolicyConfig, load_model_and_tokenizer
    from harness.policy.vllm_replicas import SERVER_COMMAND_ENV

    work = Path(tempfile.mkdtemp(prefix="bench-rollout-engine-"))
    path = str(build_model(work / "model", sizes, args.seed))
    os.environ.setdefault(SERVER_COMMAND_ENV,  # the engine's own flags, and vLLM's memory share
        "vllm serve {model} --host 127.0.0.1 --port {port} --logprobs-mode processed_logprobs "
        "--generation-config vllm --max-logprobs {max_logprobs} --dtype bfloat16 "
        f"--gpu-memory-utilization {args.gpu_memory_utilization}")
    batch = prompts(args.batch, args.prompt_len, sizes["vocab_size"], args.seed)
    results: dict[str, dict[str, float]] = {}
    trainer_gpu = args.device.split(":")[1] if ":" in args.device else ("0" if args.device == "cuda" else None)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"server", "in-process"}:
        sys.exit(f"--modes: server, in-process or both, not {args.modes!r}")

    def run(arm: str) -> None:
        engine = "hf" if arm == "hf" else "vllm"
        extra = {"vllm-server": dict(rollout_replicas=1, rollout_gpus=args.rollout_gpus or trainer_gpu,
                                     rollout_log_dir=str(work / "logs"), trained=True),
                 "vllm-in-process": dict(rollout_gpu_memory=args.gpu_memory_utilization, trained=True)}.get(arm, {})
        started = time.perf_counter()
        policy_cfg = PolicyConfig(path=path, max_new_tokens=args.new_tokens, batch_wait_s=None,
                                  rollout_engine=engine, **extra)
        model, tokenizer = load_model_and_tokenizer(path, args.device, "float32", trainable=True)
        policy = LocalPolicy(policy_cfg, model=model, tokenizer=tokenizer)
        startup = time.perf_counter() - started
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        sync = policy.engine.sync_weights if policy.engine.syncs_weights else None
        syncs, saves, gens, steps, tokens = [], [], [], [], 0
        try:
            if sync is not None:
                sync(model, 0, work / "weight-sync")
            for step in range(args.steps + 1):  # step 0 warms up (CUDA graphs, allocator, caches)
                step_started = time.perf_counter()
                samples, seconds = generate(policy, batch, args.new_tokens, args.seed + 1000 * step)
                policy.engine.before_update()  # in-process vLLM sleeps; the others do nothing
                train_step(model, optimizer, batch, samples, args.micro_batch_tokens)
                if sync is not None:
                    sync_started = time.perf_counter()
                    sync(model, step + 1, work / "weight-sync")
                    syncs.append(time.perf_counter() - sync_started)
                    save_started = time.perf_counter()
                    model.save_pretrained(work / "save-alone")
                    saves.append(time.perf_counter() - save_started)
                _synchronize()
                if step:
                    gens.append(seconds)
                    steps.append(time.perf_counter() - step_started - (saves[-1] if saves else 0.0))
                    tokens += sum(len(s.ids) for s in samples)
        finally:
            policy.engine.close()
            del policy, model, optimizer
            gc.collect()  # an in-process vLLM's engine-core process stops when its LLM is collected
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        results[arm] = {"startup_s": startup, "gen_tokens_per_s": tokens / sum(gens),
                        "step_s": statistics.median(steps)}
        if syncs:
            results[arm] |= {"sync_s": statistics.median(syncs[1:] or syncs),
                             "save_s": statistics.median(saves[1:] or saves)}
        print(arm, "  ".join(f"{k}={v:.3f}" for k, v in results[arm].items()), flush=True)

    try:
        for arm in [f"vllm-{m}" for m in modes] + ["hf"]:
            run(arm)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the model and the sync directory: GBs
    hf = results["hf"]
    for arm in [f"vllm-{m}" for m in modes]:
        vllm = results[arm]
        print(f"{arm}/hf: generation tokens/s x{vllm['gen_tokens_per_s'] / hf['gen_tokens_per_s']:.2f}, "
              f"step time x{vllm['step_s'] / hf['step_s']:.2f} (sync {vllm['sync_s']:.2f} s of it; save alone "
              f"{vllm['save_s']:.2f} s)")
    print(f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, "
          f"batch {args.batch} x {args.prompt_len} + {args.new_tokens} tokens, "
          f"{'tiny' if args.tiny else 'Qwen2.5-1.5B'} config, random weights")


if __name__ == "__main__":
    main()
