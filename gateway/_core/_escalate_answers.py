"""The core's answers, kept so that a retried escalation is answered again, not re-run.

:class:`AnswerStore` keeps every answer, keyed by (gateway, escalation id), in SQLite: a retry
of an escalation whose reply was lost gets the stored answer and the models do not run again.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from protos.edgeward.v1 import core_pb2

__all__ = ["AnswerStore"]


class AnswerStore:
    """Answers by (gateway id, escalation id) in SQLite (WAL); bounded in number and age.

    The key includes the gateway: an id is only meaningful to the gateway that made it, and
    one gateway must not read another's answer by guessing its id. Thread-safe.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        max_entries: int,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._lock = threading.Lock()
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._clock = clock
        self._writes = 0
        target = ":memory:" if path is None else str(path)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
        if path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS answers (gateway_id TEXT NOT NULL, escalation_id TEXT"
            " NOT NULL, result BLOB NOT NULL, created_at REAL NOT NULL,"
            " PRIMARY KEY (gateway_id, escalation_id))"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS answers_age ON answers (created_at)")

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def get(self, gateway_id: str, escalation_id: str) -> core_pb2.EscalationResult | None:
        """The stored result, or ``None``."""
        with self._lock:
            row = self._db.execute(
                "SELECT result FROM answers WHERE gateway_id = ? AND escalation_id = ?"
                " AND created_at > ?",
                (gateway_id, escalation_id, self._clock() - self._ttl_s),
            ).fetchone()
        return None if row is None else core_pb2.EscalationResult.FromString(bytes(row[0]))

    def put(self, gateway_id: str, escalation_id: str, result: core_pb2.EscalationResult) -> None:
        """Store ``result`` (first write wins); prune now and then."""
        now = self._clock()
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO answers (gateway_id, escalation_id, result, created_at)"
                " VALUES (?,?,?,?)",
                (gateway_id, escalation_id, result.SerializeToString(), now),
            )
            self._writes += 1
            if self._writes % 256 == 0:
                self._prune(now)

    def _prune(self, now: float) -> None:
        self._db.execute("DELETE FROM answers WHERE created_at <= ?", (now - self._ttl_s,))
        self._db.execute(
            "DELETE FROM answers WHERE rowid IN (SELECT rowid FROM answers"
            " ORDER BY created_at DESC LIMIT -1 OFFSET ?)",
            (self._max_entries,),
        )

    def count(self) -> int:
        """Answers stored."""
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM answers").fetchone()
        return int(n)
