"""Data-parallel training under torchrun (FSDP2 over gloo on CPU): two ranks train one policy.

1. Update equivalence: a fixed batch of traces split over 2 ranks gives the same updated weights
   and metrics as one process updating on the whole batch. Cases: the ranks pack to different
   numbers of micro-batches (zero-loss padding passes), two PPO epochs with gradient clipping
   active (the global norm over sharded gradients), and one rank with no traces at all while the
   other splits its batch into two mini-batches (empty mini-batches on the idle rank).
2. End to end: ``torchrun --nproc-per-node 2 -m harness.cli train --env toy --policy tiny-toy``
   finishes, rank 0 alone prints and writes one ``train_steps`` row per step, the metrics cover
   both ranks' groups, and the checkpoint loads in a single process (weights and optimizer).

The worker side of (1) is this file run as a script under torchrun (``__main__`` below).
Run: .venv/bin/python -m pytest tests/test_distributed.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
VOCAB = 97


def _why_unavailable() -> str | None:
    import torch.distributed as dist

    if not dist.is_available():
        return "this torch build has no torch.distributed"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend (needed for CPU ranks)"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return "torch.distributed.fsdp.fully_shard (FSDP2) is not in this torch"
    return None


pytestmark = pytest.mark.skipif(_why_unavailable() is not None, reason=_why_unavailable() or "")


def _torchrun(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# -- 1. update equivalence ------------------------------------------------------------------------
def _model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.1, tie_word_embeddings=True)
    return Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa", torch_dtype=torch.float32).eval()


def _traces(model, lengths, seed):
    """Prompt then response halves; the response log-probs are the model's own (on-policy), so
    the first epoch has ratio 1 and the second one moves off it."""
    from harness.policy.trace import TokenTrace
    from trainers.losses import token_logprobs

    g = torch.Generator().manual_seed(seed)
    traces = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        cut = max(1, n // 2)
        with torch.no_grad():
            logp = token_logprobs(model(input_ids=torch.tensor([ids]), use_cache=False).logits, torch.tensor([ids]))[0]
        tr = TokenTrace()
        tr.add_prompt(ids[:cut])
        tr.add_response(ids[cut:], logp[cut - 1:].tolist())
        traces.append(tr)
    return traces


# name -> (trace lengths, rank of each trace, method overrides, update settings)
CASES = {
    # rank 0: the long traces (several micro-batches); rank 1: short ones (one micro-batch)
    "uneven_micro_batches": ([30, 28, 26, 24, 22, 5, 6, 7, 4, 6], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
                             {"loss_agg": "seq-mean-token-mean"},
                             {"ppo_epochs": 2, "mini_batches": 1, "micro_batch_tokens": 32, "grad_clip": 0.05}),
    "token_mean_split": ([12, 17, 9, 21, 14, 8, 19, 11], [0, 1, 0, 1, 0, 1, 0, 1],
                         {"loss_agg": "token-mean", "clip_high": 0.28},
                         {"ppo_epochs": 1, "mini_batches": 1, "micro_batch_tokens": 40, "grad_clip": 100.0}),
    # rank 1 holds nothing: it runs empty mini-batches and padding passes only
    "idle_rank": ([15, 9, 20, 12, 7, 18], [0, 0, 0, 0, 0, 0], {"loss_agg": "seq-mean-token-mean"},
                  {"ppo_epochs": 1, "mini_batches": 2, "micro_batch_tokens": 24, "grad_clip": 100.0}),
    # --tis-cap with a perturbed mu: pi_old recomputed with padding passes (rank 0 packs more
    # micro-batches), weights capped and the mismatch metrics summed over ranks
    "tis_uneven": ([30, 28, 26, 5, 6, 7], [0, 0, 0, 1, 1, 1], {"loss_agg": "seq-mean-token-mean"},
                   {"ppo_epochs": 2, "mini_batches": 1, "micro_batch_tokens": 32, "grad_clip": 100.0, "tis_cap": 1.5}),
}
TIS_OFFSETS = (0.6, -0.6, 0.1)
"""log pi_old - log mu cycled over a TIS case's sampled tokens: capped (e^0.6 > 1.5), weighted down, near 1."""
LR = 0.5


def _update(model, traces, advantages, overrides, settings):
    from trainers.methods import Prepared, make_method
    from trainers.update import UpdateSettings, policy_update

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    prepared = Prepared(traces=list(traces), advantages=list(advantages))
    return policy_update(model, optimizer, prepared, make_method("grpo", **overrides), UpdateSettings(**settings),
                         pad_token_id=0, seed=11)


def _update_worker(data_dir: Path) -> None:
    """Under torchrun: each rank updates the sharded model on its share; rank 0 saves the result."""
    from transformers import Qwen2ForCausalLM

    from trainers import distributed

    assert distributed.setup("cpu") and distributed.world_size() == 2
    rank = distributed.rank()
    for name in CASES:
        case = torch.load(data_dir / f"{name}.pt", weights_only=False)
        model = Qwen2ForCausalLM.from_pretrained(data_dir / "init", dtype=torch.float32)
        distributed.shard(model)
        mine = [i for i, r in enumerate(case["ranks"]) if r == rank]
        metrics = _update(model, [case["traces"][i] for i in mine], [case["advantages"][i] for i in mine],
                          case["overrides"], case["settings"])
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"state": state, "metrics": metrics}, data_dir / f"{name}.out.pt")
    distributed.teardown()


def test_split_update_equals_single_process_update(tmp_path):
    from trainers.packing import pack

    model = _model()
    model.save_pretrained(tmp_path / "init")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    expected = {}
    for name, (lengths, ranks, overrides, settings) in CASES.items():
        traces = _traces(model, lengths, seed=len(name))
        if settings.get("tis_cap"):
            for tr in traces:
                for k, p in enumerate(tr.sampled_positions):
                    tr.logprobs[p] -= TIS_OFFSETS[k % len(TIS_OFFSETS)]
        advantages = torch.linspace(-1.0, 1.2, len(traces)).tolist()
        torch.save({"traces": traces, "advantages": advantages, "ranks": ranks, "overrides": overrides,
                    "settings": settings}, tmp_path / f"{name}.pt")
        budget = settings["micro_batch_tokens"]
        counts = [len(pack([t for t, r in zip(traces, ranks) if r == k], None, budget).micro_batches) for k in (0, 1)]
        if name == "uneven_micro_batches":
            assert counts[0] >= counts[1] + 2, counts  # the padding passes are really exercised
        single = _model()  # same seed: the same initial weights
        metrics = _update(single, traces, advantages, overrides, settings)
        expected[name] = ({k: v.detach().clone() for k, v in single.state_dict().items()}, metrics)

    proc = _torchrun([str(Path(__file__).resolve()), "--update-worker", str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    for name, (want, want_metrics) in expected.items():
        got = torch.load(tmp_path / f"{name}.out.pt", weights_only=False)
        assert set(got["state"]) == set(want)
        moved = max(float((want[k] - initial[k]).abs().max()) for k in want)
        assert moved > 1e-3, (name, moved)  # the update did something
        worst = max(float((got["state"][k] - want[k]).abs().max()) for k in want)
        assert worst < 1e-5, f"{name}: distributed weights differ from single-process by {worst}"
        for key in ("loss/policy", "grad/norm", "entropy", "clip/frac", "ratio/mean", "tokens/trained",
                    "update/optimizer_steps"):
            assert got["metrics"][key] == pytest.approx(want_metrics[key], rel=1e-5, abs=1e-6), (name, key)
        tis = sorted(k for k in want_metrics if k.startswith("tis/"))
        assert tis == (["tis/abs_diff_max", "tis/abs_diff_mean", "tis/capped_frac"] if "tis" in name else [])
        for key in tis:
            assert got["metrics"][key] == pytest.approx(want_metrics[key], rel=1e-5, abs=1e-6), (name, key)
    assert expected["tis_uneven"][1]["tis/abs_diff_max"] == pytest.approx(0.6, abs=1e-4)
    assert 0.3 < expected["tis_uneven"][1]["tis/capped_frac"] < 0.4  # every third token is past the cap
    # the clip was active in the first case (the global norm, not a per-rank one, was clipped to)
    assert expected["uneven_micro_batches"][1]["grad/norm"] > CASES["uneven_micro_batches"][3]["grad_clip"]


# -- 2. end to end ---------------------------------------------------------------------------------
def test_torchrun_train_end_to_end(tmp_path):
    from harness.policy.local_policy import load_model_and_tokenizer
    from harness.store import Store, checkpoints, train_steps
    from trainers.checkpoint import load_trainer_state, restore_optimizer
    from trainers.model_setup import make_optimizer, make_scheduler

    db = f"sqlite:///{tmp_path}/h.db"
    out = tmp_path / "out"
    proc = _torchrun(["-m", "harness.cli", "train", "--env", "toy", "--policy", "tiny-toy", "--steps", "2",
                      "--tasks-per-step", "3", "--group-size", "2", "--max-new-tokens", "12", "--eval-every", "2",
                      "--warm-start", "2",
                      "--eval-tasks", "2", "--checkpoint-every", "1", "--lr", "1e-3", "--micro-batch-tokens", "128",
                      "--run-name", "dist", "--db", db, "--out-dir", str(out), "--seed", "3"], cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
    assert proc.returncode == 0, f"torchrun harness train failed:\n{proc.stdout[-3000:]}\n" + "\n".join(errors[-40:])
    # rank 0 alone speaks
    assert proc.stdout.count("step    1 ") == 1 and proc.stdout.count("step    2 ") == 1, proc.stdout
    assert proc.stdout.count("run dist finished") == 1, proc.stdout

    store = Store(db)
    steps = train_steps(store, "dist")
    assert list(steps["step"]) == [0, 1, 2]
    assert [s for s, _ in checkpoints(store, "dist")] == [0, 1, 2]
    assert store.get_run("dist").status == "finished"
    # global metrics: all 3 tasks' groups (2 on rank 0, 1 on rank 1), not rank 0's share
    for _, row in steps[steps["step"] > 0].iterrows():
        assert row["groups/trained"] + row["groups/dropped"] == 3
        assert row["tokens/trained"] > 0 and row["update/optimizer_steps"] == 1
    assert len(store.episodes_df("dist/eval-step-000002")) == 2  # evaluated once, by rank 0

    # the checkpoint is an ordinary single-process policy, and its optimizer state restores here
    ckpt = out / "checkpoints" / "step-000002"
    from safetensors.torch import load_file

    # the same tensors as a single-process save (tied embeddings stored once)
    saved = load_file(str(ckpt / "model.safetensors"))
    assert set(saved) == set(load_file(str(out / "init-tiny-toy" / "model.safetensors")))
    model, tokenizer = load_model_and_tokenizer(str(ckpt), device="cpu", dtype="float32", trainable=True)
    initial, _ = load_model_and_tokenizer(str(out / "init-tiny-toy"), device="cpu", dtype="float32")
    trained = dict(model.named_parameters())
    assert max(float((trained[k] - p).detach().abs().max()) for k, p in initial.named_parameters()) > 0
    optimizer = make_optimizer(model, 1e-3, 0.0)
    make_scheduler(optimizer, "constant", 0, 2)  # as train() does before restoring (adds initial_lr)
    state = load_trainer_state(ckpt)
    assert state["optimizer_format"] == "by_name" and state["step"] == 2
    restore_optimizer(model, optimizer, state)
    # AdamW state for every parameter, two optimizer steps in (RL steps 1 and 2)
    assert all(float(optimizer.state[p]["step"]) == 2 for p in model.parameters())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--update-worker"]:
        _update_worker(Path(sys.argv[2]))
