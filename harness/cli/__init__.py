"""The ``harness`` command line: the top layer, the only one that knows every other.

Layers, from the bottom up (``tests/test_layering.py`` checks that no import runs upward):

1. the kernel, ``harness/`` without this package: types, the env contract, LLM access, agents,
   the local policy, the episode runner, the store and the results tables;
2. ``envs/``: the benchmarks (each one an ``EnvFactory`` registered by name);
3. ``trainers/``: rollouts, methods, the update, the training loop;
4. ``harness.cli``: one module per command group, each command's settings one dataclass.
"""

from harness.cli.app import app, main

__all__ = ["app", "main"]
