"""The toy env's policy: a tiny from-scratch model whose tokenizer is trained on toy text.

``harness train --policy tiny-toy`` builds one (``trainers.model_setup``); tests and benchmarks
call ``build_toy_policy`` directly. Toy words (items, codes, the tool name) become single tokens
and a whole toy episode stays under ``TOY_TOKEN_BUDGET`` tokens, so a model of ~0.1-1M
parameters can learn the task on a CPU in minutes.

    python -c "from envs.toy.policy import build_toy_policy; print(build_toy_policy('/tmp/toy-policy'))"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.policy.tiny_model import build_tiny_policy, render_chat

__all__ = ["TOY_TOKEN_BUDGET", "toy_texts", "build_toy_policy"]

TOY_TOKEN_BUDGET = 120
"""Every toy demonstration, system prompt and tools included, fits in this many tokens with the
tokenizer ``build_toy_policy`` trains (asserted by tests/test_tiny_model.py)."""


def toy_texts() -> list[str]:
    """Tokenizer training text for the toy env: every train-split demonstration rendered through
    the chat template (with the tool list), plus strings the env and the oracle agent emit. Test
    demonstrations are left out on purpose (their words all occur in train; anything else still
    encodes through byte fallback)."""
    from envs.toy.env import TOOL_SCHEMAS, ToyFactory
    from envs.toy.tasks import CODES, ITEMS

    factory = ToyFactory()
    texts = [render_chat(factory.demonstration(t), TOOL_SCHEMAS) for t in factory.tasks("train")]
    texts += [
        "All done with your request. For your information: " + "; ".join(CODES) + ".",
        "Error: unknown tool; the only tool is lookup(name)",
        "Error: no item named; Error: tool arguments are not valid JSON",
        " ".join(ITEMS) + " " + " ".join(CODES),
        "0123456789 .,:;!?-'\"()[]{}",
    ]
    return texts


def build_toy_policy(out_dir: str | Path, seed: int = 0, **sizes: Any) -> Path:
    """``build_tiny_policy`` with the tokenizer trained on ``toy_texts()``; ``sizes`` are
    ``vocab_size``, ``hidden_size``, ``num_layers``, ``num_heads``."""
    return build_tiny_policy(out_dir, toy_texts(), seed=seed, **sizes)
