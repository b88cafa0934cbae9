"""``toy``: a tiny, deterministic multi-turn tool-use env (look up secret codes, then answer) for
testing and demonstrating training on CPU. See ``envs/toy/env.py`` for the protocol."""

from envs.toy.env import SYSTEM_PROMPT, TOOL_SCHEMAS, ToyEnv, ToyFactory, demonstration, toy_regrader
from envs.toy.grading import grade
from envs.toy.tasks import CODES, DATA_VERSION, ITEMS, SPLITS, generate_split

__all__ = [
    "ToyFactory", "ToyEnv", "SYSTEM_PROMPT", "TOOL_SCHEMAS", "demonstration", "toy_regrader", "grade",
    "CODES", "ITEMS", "DATA_VERSION", "SPLITS", "generate_split",
]
