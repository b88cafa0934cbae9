"""Toy task generation: "look up the secret code(s) of one or two named items".

Why this family: it is the smallest task that still walks every path tau-airline walks (OpenAI
tool schemas, assistant tool calls, ``role=tool`` results matched by ``tool_call_id``, several
turns, a final text answer), and a tiny transformer trained from scratch on CPU can learn it in
minutes: it only has to copy item names from the user message into ``lookup`` calls and copy the
codes from the tool results into its answer. Codes are drawn per task, so they cannot be memorised.

Everything is a pure function of ``DATA_VERSION``: the same task ids always mean the same tasks.
Splits are disjoint task instances: both ask about the same 20 items, but every task draws
its own codes, so a test task can only be solved by copying, never by recalling a train answer.
"""

from __future__ import annotations

import random
import re
from typing import Any

__all__ = [
    "DATA_VERSION",
    "ITEMS",
    "CODES",
    "SPLITS",
    "TOOL_NAME",
    "generate_split",
    "question_text",
    "answer_text",
    "codes_in",
]

DATA_VERSION = "toy-v2"
"""Bump when the generator, word lists or grading change: stored runs record it."""

# Short, common English words so a byte-level BPE trained on the demonstrations makes each of them
# one token. Items and codes are disjoint, and no code is a word the oracle's or the
# demonstrations' answer text uses ("all", "done", "the", "code", ...), so the codes an answer
# contains can be read off it unambiguously.
ITEMS = (
    "apple", "tiger", "river", "lemon", "cloud", "maple", "otter", "pearl", "raven", "stone",
    "tulip", "whale", "cedar", "mango", "bison", "coral", "eagle", "flint", "grape", "heron",
)
CODES = ("alpha", "bravo", "delta", "echo", "kilo", "lima", "oscar", "sierra", "tango", "victor", "zulu", "omega")

TOOL_NAME = "lookup"

_SEED = 20240501
_TRAIN_TASKS, _TEST_TASKS, _PAIR_FRACTION = 400, 60, 0.25
SPLITS = ("train", "test")
"""``train``: 400 tasks, ``test``: 60; about a quarter of each ask for two items."""


# Names and codes are quoted in the question and the answer so that, with a Qwen-style
# pre-tokenizer, a word is the same token in the question, the tool call ('"name": "apple"'), the
# tool result and the answer: the policy learns to copy tokens, not to map " apple" to "apple".
def question_text(items: list[str]) -> str:
    """The user's message for the asked items."""
    if len(items) == 1:
        return f'What is the code for "{items[0]}"?'
    return f'What are the codes for "{items[0]}" and "{items[1]}"?'


def answer_text(codes: list[str]) -> str:
    """The gold final answer (demonstrations); any text naming the right codes in order scores."""
    if len(codes) == 1:
        return f'The code is "{codes[0]}".'
    return f'The codes are "{codes[0]}" and "{codes[1]}".'


_WORD = re.compile(r"[A-Za-z]+")
_CODE_SET = frozenset(CODES)


def codes_in(text: str | None) -> list[str]:
    """The code words a text names, in order of appearance (case-insensitive, whole words)."""
    return [w for w in (m.group(0).lower() for m in _WORD.finditer(text or "")) if w in _CODE_SET]


def _questions() -> dict[str, list[tuple[str, ...]]]:
    """The asked items of every task: one item in most tasks, two in ``_PAIR_FRACTION`` of them.

    One-item tasks are learnable fast (copy the one item name, then the one code); two-item tasks
    also need the order right, so a warm-started tiny policy is mixed on them and RL has headroom.
    """
    rng = random.Random(f"{DATA_VERSION}/questions/{_SEED}")
    out: dict[str, list[tuple[str, ...]]] = {}
    for split, count in (("train", _TRAIN_TASKS), ("test", _TEST_TASKS)):
        out[split] = [tuple(rng.sample(ITEMS, 2 if rng.random() < _PAIR_FRACTION else 1)) for _ in range(count)]
    return out


def _instance(task: dict[str, Any]) -> tuple:
    """What defines a task for the agent: the asked items and their codes."""
    return tuple(task["items"]), tuple(task["evaluation_criteria"]["communicate_info"])


def _task_data(split: str, index: int, items: tuple[str, ...], avoid: frozenset = frozenset()) -> dict[str, Any]:
    # Each task draws its own code for every item (so looking up the wrong item returns a
    # plausible but wrong code); the asked items get distinct codes so answer order is checkable.
    # A test task that would repeat a train task (same items, same codes) draws again.
    for attempt in range(1000):
        rng = random.Random(f"{DATA_VERSION}/{split}/{index}/{_SEED}/{attempt}")
        codes = {item: rng.choice(CODES) for item in ITEMS}
        asked = rng.sample(CODES, len(items))
        if (tuple(items), tuple(asked)) not in avoid:
            break
    codes.update(zip(items, asked))
    return {
        "id": str(index),
        "items": list(items),
        "codes": codes,
        "question": question_text(list(items)),
        # The keys the ``oracle`` agent replays (same shape as tau's evaluation criteria).
        "evaluation_criteria": {
            "actions": [{"name": TOOL_NAME, "arguments": {"name": item}} for item in items],
            "communicate_info": list(asked),
        },
    }


def generate_split(split: str) -> list[dict[str, Any]]:
    """The raw task dicts of one split, ids ``"0"``.. in order. Raises ``KeyError`` on an unknown
    split (the factory turns it into a ``ConfigError``)."""
    questions = _questions()[split]
    avoid = frozenset(_instance(t) for t in generate_split("train")) if split == "test" else frozenset()
    return [_task_data(split, i, q, avoid) for i, q in enumerate(questions)]
