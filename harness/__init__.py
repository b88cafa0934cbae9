"""harness: evaluate and train tool-using LLM agents on τ-bench airline and AppWorld.

Public surface (more in the subpackages): the data contracts in ``harness.types``, the store in
``harness.store``, results tables in ``harness.results``. The CLI is ``harness`` (``harness.cli``).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
