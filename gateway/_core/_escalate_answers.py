"""The core's answers, kept so that a retried escalation is answered again, not re-run.

An answer is keyed by (gateway id, escalation id); the first answer stored for a key is the
answer, for good (:class:`Answers`). A retry of an escalation whose reply was lost gets the
stored answer and the models do not run again. :meth:`Answers.put` stores an answer unless one
is already there and returns the stored one, so two core replicas that answer the same
escalation at once (a gateway retried on another replica while the first was still running)
both reply with the same first-stored answer: the gateway can never see two different answers
to one escalation.

- :class:`AnswerStore` keeps them in SQLite (the default; one file, or memory).
- :class:`PostgresAnswerStore` keeps them in the registry's PostgreSQL database (table
  ``escalation_answers``), shared by every replica, with ``INSERT … ON CONFLICT`` followed by a
  read of the stored row (an expired answer is replaced, as if absent).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pki
from protos.edgeward.v1 import core_pb2

if TYPE_CHECKING:
    import psycopg_pool

__all__ = ["AnswerStore", "Answers", "PostgresAnswerStore"]

_CREATE_LOCK = 0x6564_6765_7761_7203  # advisory lock key: table creation by replicas at once
_PRUNE_EVERY = 256


class Answers(Protocol):
    """Escalation answers by (gateway id, escalation id); thread-safe."""

    def get(self, gateway_id: str, escalation_id: str) -> core_pb2.EscalationResult | None:
        """The stored answer (still within its time to live), or ``None``."""
        ...

    def put(
        self, gateway_id: str, escalation_id: str, result: core_pb2.EscalationResult
    ) -> core_pb2.EscalationResult:
        """Store ``result`` unless an answer is stored already; return the stored answer."""
        ...

    def count(self) -> int: ...
    def close(self) -> None: ...


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

    def put(
        self, gateway_id: str, escalation_id: str, result: core_pb2.EscalationResult
    ) -> core_pb2.EscalationResult:
        """Store ``result`` unless an answer is stored (first write wins); return the stored
        answer. Prune now and then."""
        now = self._clock()
        with self._lock:
            # First write wins; an expired answer counts as absent and is replaced.
            self._db.execute(
                "INSERT INTO answers (gateway_id, escalation_id, result, created_at)"
                " VALUES (?,?,?,?) ON CONFLICT (gateway_id, escalation_id) DO UPDATE"
                " SET result = excluded.result, created_at = excluded.created_at"
                " WHERE answers.created_at <= ?",
                (gateway_id, escalation_id, result.SerializeToString(), now, now - self._ttl_s),
            )
            row = self._db.execute(
                "SELECT result FROM answers WHERE gateway_id = ? AND escalation_id = ?",
                (gateway_id, escalation_id),
            ).fetchone()
            self._writes += 1
            if self._writes % _PRUNE_EVERY == 0:
                self._prune(now)
        return result if row is None else core_pb2.EscalationResult.FromString(bytes(row[0]))

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


class PostgresAnswerStore:
    """:class:`Answers` in a PostgreSQL database shared by every core replica.

    Bounded like the SQLite store: answers older than ``ttl_s`` are ignored and pruned, and
    at most ``max_entries`` are kept (the oldest go). Errors become :class:`pki.RegistryError`
    without the URL's password.
    """

    def __init__(
        self,
        url: str,
        *,
        max_entries: int,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
        pool_size: int = 4,
    ) -> None:
        try:
            import psycopg
            import psycopg_pool
        except ImportError as exc:
            raise pki.RegistryError(
                "answers on PostgreSQL need psycopg: pip install 'edgeward[gateway]'"
            ) from exc
        self._psycopg = psycopg
        self._pool_timeout = psycopg_pool.PoolTimeout
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._clock = clock
        self._writes = 0
        self._lock = threading.Lock()
        self.url = url
        kwargs: dict[str, Any] = {"connect_timeout": 10, "application_name": "edgeward-answers"}
        try:
            # One direct connection first: the table, and a clear error when it cannot open.
            with psycopg.connect(url, **kwargs) as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CREATE_LOCK,))
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS escalation_answers ("
                    " gateway_id TEXT NOT NULL, escalation_id TEXT NOT NULL,"
                    " result BYTEA NOT NULL, created_at DOUBLE PRECISION NOT NULL,"
                    " PRIMARY KEY (gateway_id, escalation_id))"
                )
                conn.execute(
                    "CREATE INDEX IF NOT EXISTS escalation_answers_age"
                    " ON escalation_answers (created_at)"
                )
            self._pool: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
                url,
                min_size=1,
                max_size=max(1, pool_size),
                kwargs=kwargs,
                check=psycopg_pool.ConnectionPool.check_connection,
                timeout=5,
                open=False,
                name="edgeward-answers",
            )
            self._pool.open(wait=True, timeout=5)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise self._error(f"cannot open answers in {pki.redacted_url(url)}", exc) from None

    @staticmethod
    def _error(what: str, exc: BaseException) -> pki.RegistryError:
        # Unreachable database: RegistryUnavailable (UNAVAILABLE, the gateway retries).
        import psycopg
        import psycopg_pool

        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolTimeout):
            return pki.RegistryUnavailable(f"{what}: {text}")
        return pki.RegistryError(f"{what}: {text}")

    def __repr__(self) -> str:
        return f"PostgresAnswerStore({pki.redacted_url(self.url)!r})"

    def close(self) -> None:
        self._pool.close()

    def get(self, gateway_id: str, escalation_id: str) -> core_pb2.EscalationResult | None:
        try:
            with self._pool.connection() as conn:
                row = conn.execute(
                    "SELECT result FROM escalation_answers WHERE gateway_id = %s"
                    " AND escalation_id = %s AND created_at > %s",
                    (gateway_id, escalation_id, self._clock() - self._ttl_s),
                ).fetchone()
        except (self._psycopg.Error, self._pool_timeout) as exc:
            raise self._error("answers read failed", exc) from None
        return None if row is None else core_pb2.EscalationResult.FromString(bytes(row[0]))

    def put(
        self, gateway_id: str, escalation_id: str, result: core_pb2.EscalationResult
    ) -> core_pb2.EscalationResult:
        now = self._clock()
        try:
            with self._pool.connection() as conn, conn.transaction():
                # First write wins; an expired answer counts as absent and is replaced.
                conn.execute(
                    "INSERT INTO escalation_answers (gateway_id, escalation_id, result,"
                    " created_at) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (gateway_id, escalation_id) DO UPDATE"
                    " SET result = excluded.result, created_at = excluded.created_at"
                    " WHERE escalation_answers.created_at <= %s",
                    (gateway_id, escalation_id, result.SerializeToString(), now, now - self._ttl_s),
                )
                row = conn.execute(
                    "SELECT result FROM escalation_answers WHERE gateway_id = %s"
                    " AND escalation_id = %s",
                    (gateway_id, escalation_id),
                ).fetchone()
                with self._lock:
                    self._writes += 1
                    prune = self._writes % _PRUNE_EVERY == 0
                if prune:
                    self._prune(conn, now)
        except (self._psycopg.Error, self._pool_timeout) as exc:
            raise self._error("answers write failed", exc) from None
        return result if row is None else core_pb2.EscalationResult.FromString(bytes(row[0]))

    def _prune(self, conn: Any, now: float) -> None:
        conn.execute("DELETE FROM escalation_answers WHERE created_at <= %s", (now - self._ttl_s,))
        conn.execute(
            "DELETE FROM escalation_answers WHERE ctid IN (SELECT ctid FROM escalation_answers"
            " ORDER BY created_at DESC OFFSET %s)",
            (self._max_entries,),
        )

    def count(self) -> int:
        try:
            with self._pool.connection() as conn:
                row = conn.execute("SELECT COUNT(*) FROM escalation_answers").fetchone()
        except (self._psycopg.Error, self._pool_timeout) as exc:
            raise self._error("answers read failed", exc) from None
        return int(row[0]) if row else 0
