"""The results database (SQLAlchemy 2.x; SQLite by default, any SQLAlchemy URL works).

One schema module (``schema``: every table) and one accessor per concern:

- ``core.Store``: runs and episodes (create, look up, list, store episodes, data frames);
- ``writer.EpisodeWriter``: group commit of finished episodes from the runner's event loop;
- ``train``: training steps and checkpoints;
- ``guidance``: SGCD credit references, cached by group digest, summarizer and prompt version;
- ``credit``: per-token credit of recorded training groups (``harness train --log-credit-every``);
- ``records``: what re-grading, full exports and env metrics read (and re-grading writes);
- ``engine``: opening a URL (read-only where it must), every storage failure as ``StorageError``;
- ``version``: the schema version, checked, migrated and stamped when a ``Store`` opens.

Everything handed out is a plain value (``RunRecord``, ``EpisodeResult``, data frames, dicts).
"""

from harness.store.core import DEFAULT_URL, RUN_STATUSES, DuplicateEpisodeError, RunRecord, Store, code_version
from harness.store.credit import credit_steps, put_token_credit, token_credit_rows
from harness.store.engine import StorageError
from harness.store.guidance import GUIDANCE_COLUMNS, get_guidance, guidance_df, put_guidance
from harness.store.schema import EPISODE_COLUMNS, Base
from harness.store.train import add_checkpoint, checkpoints, log_train_step, train_steps
from harness.store.writer import EpisodeWriter

__all__ = ["DEFAULT_URL", "RUN_STATUSES", "EPISODE_COLUMNS", "Base", "Store", "RunRecord", "DuplicateEpisodeError",
           "StorageError", "EpisodeWriter", "code_version", "log_train_step", "train_steps", "add_checkpoint",
           "checkpoints", "get_guidance", "put_guidance", "guidance_df", "GUIDANCE_COLUMNS",
           "put_token_credit", "token_credit_rows", "credit_steps"]
