"""Data-parallel training under ``torchrun`` with FSDP2 (``torch.distributed.fsdp.fully_shard``).

``torchrun --nproc-per-node N -m harness.cli train ...`` starts N copies of ``harness train``;
each finds ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in its environment and ``setup`` joins them
into one process group (nccl on CUDA, one GPU per rank: ``cuda:LOCAL_RANK``; gloo on CPU). Without
those variables (or with ``WORLD_SIZE=1``) nothing here does anything: every helper returns its
input, so a single-process run takes exactly the code path it always took.

Who does what under N ranks (README "Multi-GPU" has the user-facing version):

- **Model.** ``shard`` applies ``fully_shard`` to every decoder layer, then to the root: each rank
  keeps 1/N of every parameter, of its gradient and of the AdamW state.
- **Rollouts.** All ranks take the same tasks from the task stream, and each plays its share
  (``my_share``: every N-th task), so the union of the ranks' groups is the single-process
  step's. Generation runs between ``gather_weights`` and ``release_weights``: every rank all-gathers
  the full parameters once (``FSDPModule.unshard`` on every FSDP module, with reshard-after-forward
  off) and keeps them until the rollout and the method's ``prepare`` are done, so a forward issues
  no collective and ranks may run any number of them (different episode lengths, dynamic
  sampling, a teacher pass in ``prepare``). Memory: one full copy of the weights per GPU for that
  phase, on top of the shards; the same as an unsharded model, which generation needs anyway.
- **Update.** Each rank packs its own traces. The loss normalisers (``LossNorm``: loss tokens,
  sequences) are summed over ranks (``global_norm``), so each rank's loss is its share of the
  loss of the union batch. FSDP2 *averages* gradients over ranks; ``grad_scale()`` (= N) multiplies
  each backward so the reduced gradient is the *sum* of the shares: the gradient of the
  single-process full-batch loss. Ranks that packed fewer micro-batches run zero-loss passes
  (``pad_pass``) until all ran the same number, because every forward/backward issues FSDP
  collectives that all ranks must join. ``clip_grad_norm_`` over the sharded (DTensor) gradients
  takes the global norm.
- **Checkpoints.** ``full_state`` gathers the full model and optimizer state dicts to rank 0's
  CPU (a collective); rank 0 writes them, so a checkpoint directory is an ordinary
  ``save_pretrained`` policy, and the optimizer state is keyed by parameter name, which any world
  size (1 included) restores (``checkpoint.restore_optimizer``).
- **Logging.** Rank 0 alone writes the database, prints, evaluates and saves; metrics are global
  (``all_sum`` / ``all_max`` / ``merge_metrics``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from harness.errors import ConfigError

__all__ = ["setup", "teardown", "enabled", "rank", "world_size", "is_main", "device_option", "barrier",
           "main_first", "my_share", "all_sum", "all_max", "all_gather_objects", "broadcast_object",
           "merge_metrics", "decoder_layers", "shard", "gather_weights", "release_weights", "gathered", "grad_scale",
           "global_norm", "pad_pass", "full_state", "TIMEOUT_ENV"]

TIMEOUT_ENV = "HARNESS_DIST_TIMEOUT_S"
"""Seconds a rank waits in a collective before it gives up (default 7200): rank 0 evaluates alone
while the others wait, and rollouts of long tau/AppWorld episodes can differ by many minutes."""

_device: torch.device | None = None
_owned = False


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def enabled() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if enabled() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if enabled() else 1


def is_main() -> bool:
    return rank() == 0


def device_option(device: str) -> str:
    """The ``--device`` value a rank uses: ``cuda`` / ``auto`` become this rank's GPU."""
    if not enabled() or _device is None:
        return device
    return str(_device)


def setup(device: str = "auto") -> bool:
    """Join the torchrun process group if this process was launched as one of several ranks.
    Returns True if distributed (idempotent; False, and nothing done, for a single process). A
    process group someone else opened (same world) is used as it is."""
    global _device, _owned
    if _env_world() <= 1:
        return False
    if not dist.is_available():
        raise ConfigError("launched with WORLD_SIZE > 1, but this torch build has no torch.distributed")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for, but torch sees no CUDA device")
    if dist.is_initialized():
        use_cuda = dist.get_backend() == "nccl"
    else:
        use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices are visible; "
                              "start at most one rank per GPU (torchrun --nproc-per-node)")
        _device = torch.device("cuda", local)
        torch.cuda.set_device(_device)
    else:
        _device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "7200")))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout,
                                **({"device_id": _device} if use_cuda else {}))
        _owned = True
    return True


def teardown() -> None:
    """Leave the process group ``setup`` opened (one opened by someone else stays open)."""
    global _device, _owned
    if _owned and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _device, _owned = None, False


def barrier() -> None:
    if enabled():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. builds a shared file), the other ranks after it."""
    if enabled() and not is_main():
        dist.barrier()
    try:
        yield
    finally:
        if enabled() and is_main():
            dist.barrier()


def my_share(items: list) -> list:
    """This rank's items: every ``world``-th one starting at ``rank`` (all of them single-process)."""
    return items[rank()::world_size()] if enabled() else items


# -- collectives on numbers and small objects ----------------------------------------------------
def _reduce(values: list[float], op) -> list[float]:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device or "cpu")
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_sum(*values: float) -> Any:
    """Sum over ranks of each value (one all-reduce); a single value comes back as a number."""
    if not enabled():
        return values[0] if len(values) == 1 else list(values)
    out = _reduce(list(values), dist.ReduceOp.SUM)
    return out[0] if len(values) == 1 else out


def all_max(*values: float) -> Any:
    if not enabled():
        return values[0] if len(values) == 1 else list(values)
    out = _reduce(list(values), dist.ReduceOp.MAX)
    return out[0] if len(values) == 1 else out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not enabled():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not enabled():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


_SUM_PREFIXES = ("groups/", "episodes/", "tokens/", "summarizer/")
_SUM_SUFFIXES = ("_groups", "/tokens", "/calls", "/cached", "/fallbacks", "/leaks", "/cost_usd", "/infra_errors")


def _reduction(name: str) -> str:
    if name.startswith("time/"):
        return "max"  # the step waits for the slowest rank
    if name.endswith("_frac") or name.endswith("/latency_s"):
        return "mean"
    if name.startswith(_SUM_PREFIXES) or name.endswith(_SUM_SUFFIXES):
        return "sum"
    return "mean"


def merge_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Combine per-rank method metrics (``Prepared.metrics``) into one dict on every rank: counts
    (``groups/*``, ``episodes/*``, ``tokens/*``, ``summarizer/*``, ``*_groups``, ``*/tokens`` ...)
    are summed, ``time/*`` takes the maximum, everything else (fractions, means) the mean over the
    ranks that reported it. A rank-unweighted mean: methods report averages, not their sums."""
    if not enabled():
        return metrics
    parts = all_gather_objects({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    out: dict[str, Any] = {}
    for name in sorted({k for p in parts for k in p}):
        values = [float(p[name]) for p in parts if name in p]
        how = _reduction(name)
        out[name] = sum(values) if how == "sum" else max(values) if how == "max" else sum(values) / len(values)
    return out


# -- the model ---------------------------------------------------------------------------------
def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks to shard one by one: the classes a transformers model
    names in ``_no_split_modules`` (Qwen2DecoderLayer, LlamaDecoderLayer, ...), else the entries of
    a ``ModuleList`` called ``layers`` / ``h`` / ``blocks`` (``model.model.layers`` for Qwen2/Llama,
    also under a peft wrapper). A clear error when neither is found."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks") and len(m):
            return list(m)
    raise ConfigError(f"cannot find the decoder layers of {type(model).__name__} to shard with FSDP (no "
                      "_no_split_modules classes and no ModuleList named layers / h / blocks); "
                      "run it single-process, or add its block class to trainers/distributed.decoder_layers")


def _fsdp():
    """(fully_shard, FSDPModule): public in torch.distributed.fsdp from torch 2.6, under
    torch.distributed._composable.fsdp before."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule, fully_shard
        except ImportError:
            raise ConfigError("multi-GPU training needs FSDP2 (torch.distributed.fsdp.fully_shard); "
                              f"torch {torch.__version__} has none: upgrade torch") from None
    return fully_shard, FSDPModule


def _fsdp_modules(model: torch.nn.Module) -> list:
    fsdp_module = _fsdp()[1]
    return [m for m in model.modules() if isinstance(m, fsdp_module)]


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` every decoder layer, then the root (embeddings, final norm, LM head: one
    group, so tied input/output embeddings stay one parameter). In place; returns the model.
    Call before building the optimizer (it must hold the sharded DTensor parameters)."""
    if not enabled():
        return model
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = _fsdp()[0]
    mesh = init_device_mesh(_device.type, (world_size(),))
    for layer in reversed(decoder_layers(model)):  # innermost first, should blocks ever nest
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _set_reshard(model: torch.nn.Module, on: bool) -> None:
    # FSDP's own defaults: layers free their gathered weights after forward; the root keeps its
    # (they are gathered again at once for backward).
    for m in _fsdp_modules(model):
        m.set_reshard_after_forward(on and m is not model, recurse=False)


def gather_weights(model: torch.nn.Module) -> None:
    """Full (unsharded) parameters on every rank until ``release_weights``, e.g. for a rollout:
    all ranks call it together (one all-gather per FSDP module); afterwards forwards issue no
    collectives, so each rank may generate as much as its own episodes need. No-op single-process."""
    if not enabled() or not _fsdp_modules(model):
        return
    _set_reshard(model, False)
    for m in _fsdp_modules(model):
        m.unshard()


def release_weights(model: torch.nn.Module) -> None:
    """Back to shards (frees the gathered copy; local, no collective)."""
    if not enabled() or not _fsdp_modules(model):
        return
    for m in _fsdp_modules(model):
        m.reshard()
    _set_reshard(model, True)


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """``gather_weights`` for the block, ``release_weights`` after it."""
    gather_weights(model)
    try:
        yield
    finally:
        release_weights(model)


def grad_scale() -> float:
    """Factor on each backward so FSDP's gradient average over ranks becomes their sum."""
    return float(world_size())


def global_norm(norm):
    """A ``LossNorm`` with the token and sequence totals summed over ranks (the union batch's)."""
    if not enabled():
        return norm
    from trainers.losses import LossNorm

    tokens, seqs = all_sum(norm.num_tokens, norm.num_seqs)
    return LossNorm(num_tokens=tokens, num_seqs=int(round(seqs)), constant=norm.constant)


def pad_pass(model: torch.nn.Module, device: torch.device, pad_token_id: int, *, backward: bool) -> None:
    """One forward (and backward) of a 2-token dummy row whose loss is 0: it joins the FSDP
    collectives of a micro-batch another rank runs, and adds a zero gradient."""
    ids = torch.full((1, 2), int(pad_token_id), dtype=torch.long, device=device)
    pos = torch.arange(2, device=device)[None]
    with torch.set_grad_enabled(backward):
        logits = model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False).logits
        if backward:
            (logits.float().sum() * 0.0).backward()


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
    """(full model state dict, full optimizer state dict keyed by parameter name), on rank 0's
    CPU; ``(None, None)`` single-process (the checkpoint then uses the model and optimizer as
    they are). A collective: every rank calls it."""
    if not enabled():
        return None, None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    # a tied parameter (input/output embeddings) is listed under each name; keep the first, as a
    # single-process save_pretrained does
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    model_state = {k: v for k, v in model_state.items() if k not in tied}
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    return model_state, optim_state
