"""A long supervised warm start says how far it got (issue 21: on a busy machine it took 20
minutes with nothing printed). Real tiny toy model, real demonstrations."""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")

from toy_groups import load_tiny_toy  # noqa: E402

from envs.toy import ToyFactory  # noqa: E402
from trainers.sft import demonstration_traces, warm_start  # noqa: E402


def test_warm_start_reports_step_loss_and_time_while_it_runs(tiny_toy_dir):
    model, tokenizer = load_tiny_toy(tiny_toy_dir)
    factory = ToyFactory()
    traces = demonstration_traces(factory, tokenizer, factory.tasks("train")[:4], "test")
    said: list[str] = []
    losses = warm_start(model, traces, steps=3, lr=1e-3, batch_size=2, seed=0, progress=said.append, every_s=0)
    # steps 1 and 2, not 3: after the last step the caller reports the result
    assert len(said) == 2, said
    for n, line in zip((1, 2), said):
        assert re.fullmatch(rf"warm start: step {n}/3, loss {losses[n - 1]:.4f} \(\d+ s\)", line), line
    quiet: list[str] = []
    warm_start(model, traces, steps=3, lr=1e-3, batch_size=2, seed=0, progress=quiet.append)
    assert quiet == [], "at most one line every 5 s: none in a run this short"
