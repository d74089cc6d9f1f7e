"""What `crucible serve` remembers so feedback can name a response by id: every choice it sent,
in a SQLite file under `$CRUCIBLE_HOME/serve/` (the newest `limit`; older ones are dropped),
and the feedback it takes, appended to the feedback folder in the format the `feedback` job
reads (crucible_assets/feedback.py)."""

from __future__ import annotations

import fcntl
import json
import sqlite3
import threading
import time
from pathlib import Path

from crucible_assets.feedback import feedback_folder, validate_feedback
from resources.store.artifact_store import atomic_write_text


class UnknownResponse(KeyError):
    pass


class ResponseLog:
    def __init__(self, path: Path, limit: int = 100_000):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.limit = limit
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit is durable across crashes, without an fsync per answer
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (id TEXT, choice INTEGER, created REAL, model_version TEXT, "
                         "prompt TEXT, response TEXT, PRIMARY KEY (id, choice))")

    def add(self, response_id: str, model_version: str, prompt: str | list[dict], texts: list[str]) -> None:
        rows = [(response_id, i, time.time(), model_version, json.dumps(prompt), t) for i, t in enumerate(texts)]
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)", rows)
            self._db.execute("DELETE FROM responses WHERE rowid <= (SELECT MAX(rowid) FROM responses) - ?", (self.limit,))

    def get(self, response_id: str, choice: int) -> dict:
        with self._lock:
            row = self._db.execute("SELECT model_version, prompt, response FROM responses WHERE id = ? AND choice = ?",
                                   (response_id, choice)).fetchone()
        if row is None:
            raise UnknownResponse(f"no response {response_id!r} (choice {choice}) is kept by this server: it never "
                                  f"answered it, or it was among the oldest beyond the last {self.limit}")
        return {"model_version": row[0], "prompt": json.loads(row[1]), "response": row[2]}

    def close(self) -> None:
        self._db.close()


def append_feedback(record: dict, folder: Path | None = None) -> Path:
    """Validate the record as the feedback job will, then add it to today's file: the file is
    rewritten under a lock to a temp name and renamed, so a reader never sees half a line."""
    folder = folder or feedback_folder()
    record = validate_feedback(record, "POST /v1/feedback", "the request")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"served-{time.strftime('%Y-%m-%d', time.gmtime())}.jsonl"
    with open(folder / ".served.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = path.read_text() if path.exists() else ""
        atomic_write_text(path, before + json.dumps(record, sort_keys=True) + "\n")
    return path
