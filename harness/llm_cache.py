"""Optional response cache (``harness eval --cache``): a SQLite file of chat completions.

The key covers everything that determines a reply: model, endpoint, messages, tools, sampler
settings, seed **and the trial index** — without the trial index, the k trials of a pass^k run at
temperature 0 with a fixed seed would all get the first trial's answer. A cache hit costs nothing
and is recorded as such in the per-call accounting.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

__all__ = ["ResponseCache", "cache_key"]


def cache_key(request: dict[str, Any], trial: int | None) -> str:
    payload = json.dumps({"request": request, "trial": trial}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, reply TEXT NOT NULL)")
        self._db.commit()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT reply FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(row[0])

    def put(self, key: str, reply: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses (key, reply) VALUES (?, ?)", (key, json.dumps(reply)))
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()
