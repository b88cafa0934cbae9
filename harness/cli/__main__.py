"""``python -m harness.cli ...`` (what ``torchrun -m harness.cli train ...`` runs)."""

from harness.cli.app import main

main()
