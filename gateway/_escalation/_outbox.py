"""The durable escalation outbox, and the answers kept for devices, in one SQLite file (WAL).

Two tables, one file, one connection:

- ``outbox``: escalations waiting for the core. A row is written, and committed with
  ``synchronous=FULL``, *before* the device is told its detection is pending, so a pending
  mark always has a stored escalation behind it, across a crash or a power cut. Completions
  (answer stored, row removed) commit without an fsync (WAL + ``NORMAL``): they survive a
  process crash; a power cut can only undo them, which means one more delivery of the same
  answer, never a lost one (see :meth:`Outbox.complete`). A row leaves
  the table only in the same transaction that stores its answer (or its final error) in
  ``answers``, so no escalation is ever in neither table.
- ``answers``: the final answer for each escalation id, kept ``ttl`` seconds for a device
  that is offline, bounded in number (oldest expire first). The primary key is the
  escalation id, so an answer arriving twice (a retry whose first reply was lost) is stored
  once.

When the outbox holds ``max_entries`` rows, :meth:`Outbox.add` raises :class:`OutboxFull`:
new escalations are refused and stored ones are never dropped.

Every method is blocking; the escalator calls them from one dedicated thread, so the
connection is only ever used by one thread at a time.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from gateway._events import AnsweredObject, ErrorEvent, EscalationAnswer
from gateway.errors import OutboxFull

__all__ = ["Outbox", "OutboxEntry", "StoredAnswer"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    escalation_id   TEXT PRIMARY KEY,
    device_id       TEXT NOT NULL,
    region          TEXT NOT NULL,
    frame_id        TEXT NOT NULL,
    core_address    TEXT NOT NULL,
    image           BLOB NOT NULL,
    is_full_frame   INTEGER NOT NULL,
    edge_label      TEXT NOT NULL,
    edge_score      REAL NOT NULL,
    created_at      REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error      TEXT NOT NULL DEFAULT '',
    reason          TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_at);
CREATE TABLE IF NOT EXISTS answers (
    escalation_id TEXT PRIMARY KEY,
    device_id     TEXT NOT NULL,
    kind          TEXT NOT NULL,
    payload       TEXT NOT NULL,
    created_at    REAL NOT NULL,
    expires_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_expiry ON answers (expires_at);
CREATE INDEX IF NOT EXISTS answers_age ON answers (created_at);
"""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One escalation waiting for the core; ``escalation_id`` is its idempotency key."""

    escalation_id: str
    device_id: str
    region: str
    frame_id: str
    core_address: str
    image: bytes
    is_full_frame: bool
    edge_label: str
    edge_score: float
    created_at: float
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str = ""
    #: Why it was escalated (``uncertain``, ``outside_edge_set``, ``empty_frame``).
    reason: str = ""


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """An answer (or final error) kept for a device."""

    escalation_id: str
    device_id: str
    payload: EscalationAnswer | ErrorEvent
    created_at: float
    expires_at: float


def _encode(payload: EscalationAnswer | ErrorEvent) -> tuple[str, str]:
    kind = "answer" if isinstance(payload, EscalationAnswer) else "error"
    return kind, json.dumps(asdict(payload), separators=(",", ":"))


def _decode(kind: str, text: str) -> EscalationAnswer | ErrorEvent:
    data: dict[str, Any] = json.loads(text)
    if kind == "answer":
        objects = tuple(
            AnsweredObject(
                o["label"], o["score"], (o["box"][0], o["box"][1], o["box"][2], o["box"][3])
            )
            for o in data.pop("objects", ())
        )
        return EscalationAnswer(**data, objects=objects)
    return ErrorEvent(**data)


class Outbox:
    """SQLite storage of the outbox and of answers for devices (blocking, single-threaded)."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_entries: int,
        max_answers: int,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> None:
        if max_entries < 1 or max_answers < 1:
            raise ValueError("max_entries and max_answers must be positive")
        self.path = Path(path)
        self.max_entries = max_entries
        self.max_answers = max_answers
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The file holds device images: readable by the gateway's user only. SQLite creates
        # the -wal and -shm files with the database file's permissions, so the file is made
        # 0600 before the first connection, not after.
        os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self.path.chmod(0o600)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE … COMMIT), so a
        # check-then-insert cannot interleave with another process opening the same file.
        self._db = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=10.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: each commit is fsynced, so "stored" survives a power cut, not only a crash.
        self._synchronous = synchronous
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(_SCHEMA)
        # An outbox written before escalations recorded their reason gains the column; its
        # waiting entries are delivered with an empty reason.
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
        if "reason" not in columns:
            self._db.execute("ALTER TABLE outbox ADD COLUMN reason TEXT NOT NULL DEFAULT ''")
        # Answers stored, counted once here and then kept by every write (this connection is
        # the file's only writer), so bounding the table costs nothing until it is full.
        (self._answers,) = self._db.execute("SELECT COUNT(*) FROM answers").fetchone()

    def close(self) -> None:
        """Close the connection (the WAL is checkpointed by SQLite)."""
        self._db.close()

    # -------------------------------------------------------------------- outbox
    def add(self, entry: OutboxEntry) -> None:
        """Store ``entry`` durably, or raise :class:`OutboxFull` (nothing stored is dropped)."""
        db = self._db
        db.execute(f"PRAGMA synchronous={self._synchronous}")
        db.execute("BEGIN IMMEDIATE")
        try:
            (count,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            if count >= self.max_entries:
                raise OutboxFull(self.max_entries)  # noqa: TRY301 - rolled back just below
            db.execute(
                "INSERT INTO outbox (escalation_id, device_id, region, frame_id, core_address,"
                " image, is_full_frame, edge_label, edge_score, created_at, attempts,"
                " next_attempt_at, last_error, reason) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    entry.escalation_id,
                    entry.device_id,
                    entry.region,
                    entry.frame_id,
                    entry.core_address,
                    entry.image,
                    int(entry.is_full_frame),
                    entry.edge_label,
                    entry.edge_score,
                    entry.created_at,
                    entry.attempts,
                    entry.next_attempt_at,
                    entry.last_error,
                    entry.reason,
                ),
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def due(
        self,
        now: float,
        *,
        limit: int,
        skip_addresses: frozenset[str],
        skip_ids: frozenset[str] = frozenset(),
    ) -> list[OutboxEntry]:
        """Entries whose next attempt is due, oldest first, not for a core in back-off.

        ``skip_ids``: escalations already on their way to the core (sent while their row
        was being stored), left to that attempt.
        """
        skip = sorted(skip_addresses)
        ids = sorted(skip_ids)
        marks = ",".join("?" * len(skip))
        id_marks = ",".join("?" * len(ids))
        # Only "?" placeholders are formatted into the query; the values are bound.
        rows = self._db.execute(
            "SELECT escalation_id, device_id, region, frame_id, core_address, image,"  # noqa: S608
            " is_full_frame, edge_label, edge_score, created_at, attempts, next_attempt_at,"
            f" last_error, reason FROM outbox WHERE next_attempt_at <= ?"
            f" AND core_address NOT IN ({marks}) AND escalation_id NOT IN ({id_marks})"
            " ORDER BY next_attempt_at, created_at LIMIT ?",
            (now, *skip, *ids, limit),
        ).fetchall()
        return [
            OutboxEntry(
                escalation_id=r[0],
                device_id=r[1],
                region=r[2],
                frame_id=r[3],
                core_address=r[4],
                image=bytes(r[5]),
                is_full_frame=bool(r[6]),
                edge_label=r[7],
                edge_score=float(r[8]),
                created_at=float(r[9]),
                attempts=int(r[10]),
                next_attempt_at=float(r[11]),
                last_error=r[12],
                reason=r[13],
            )
            for r in rows
        ]

    def next_due_at(self, *, skip_ids: frozenset[str] = frozenset()) -> float | None:
        """When the earliest entry (not in ``skip_ids``) is next due; ``None``: there is none."""
        ids = sorted(skip_ids)
        marks = ",".join("?" * len(ids))
        # Only "?" placeholders are formatted into the query; the values are bound.
        (at,) = self._db.execute(
            f"SELECT MIN(next_attempt_at) FROM outbox WHERE escalation_id NOT IN ({marks})",  # noqa: S608
            ids,
        ).fetchone()
        return None if at is None else float(at)

    def retry_later(self, escalation_id: str, *, next_attempt_at: float, error: str) -> None:
        """Count a failed attempt and set when to try again."""
        self._db.execute(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?"
            " WHERE escalation_id = ?",
            (next_attempt_at, error[:500], escalation_id),
        )

    def pending_count(self) -> int:
        """Escalations waiting for the core."""
        (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(count)

    def pending_ids(self) -> list[str]:
        """Ids of the escalations waiting for the core (oldest first)."""
        rows = self._db.execute("SELECT escalation_id FROM outbox ORDER BY created_at").fetchall()
        return [r[0] for r in rows]

    # -------------------------------------------------------------------- answers
    def complete(
        self,
        escalation_id: str,
        device_id: str,
        payload: EscalationAnswer | ErrorEvent,
        *,
        now: float,
        ttl_s: float,
    ) -> bool:
        """Store the answer and remove the outbox entry, atomically.

        Returns ``False`` when the escalation was already completed (nothing changes, so an
        answer is never stored or published twice).
        """
        kind, text = _encode(payload)
        db = self._db
        # Not fsynced (WAL + NORMAL), unlike add(): the commit is in the WAL, so it survives
        # a crash of the process (kill -9); only a power cut or OS crash can roll it back,
        # and then the entry is simply back in the outbox: it is sent again, the core
        # replays its stored answer (same escalation id) and the device gets that answer
        # again, which it already recognises by id. The next add() fsyncs the WAL, and with
        # it this commit. "Stored before pending" (add) keeps its fsync.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("BEGIN IMMEDIATE")
        try:
            deleted = db.execute(
                "DELETE FROM outbox WHERE escalation_id = ?", (escalation_id,)
            ).rowcount
            if deleted == 0:
                db.execute("ROLLBACK")
                return False
            answers = (
                self._answers
                + db.execute(
                    "INSERT OR IGNORE INTO answers (escalation_id, device_id, kind, payload,"
                    " created_at, expires_at) VALUES (?,?,?,?,?,?)",
                    (escalation_id, device_id, kind, text, now, now + ttl_s),
                ).rowcount
            )
            # Bound the table: beyond max_answers the oldest answers expire early. Only the
            # excess is touched, oldest first along the created_at index: a completion costs
            # the same with 100,000 answers stored as with none (it used to sort them all).
            excess = answers - self.max_answers
            if excess > 0:
                answers -= db.execute(
                    "DELETE FROM answers WHERE escalation_id IN (SELECT escalation_id"
                    " FROM answers ORDER BY created_at LIMIT ?)",
                    (excess,),
                ).rowcount
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        self._answers = answers
        return True

    def stored_answers(self, now: float) -> list[StoredAnswer]:
        """Answers not yet expired, oldest first (replayed into the event hub at start)."""
        rows = self._db.execute(
            "SELECT escalation_id, device_id, kind, payload, created_at, expires_at FROM answers"
            " WHERE expires_at > ? ORDER BY created_at",
            (now,),
        ).fetchall()
        return [
            StoredAnswer(r[0], r[1], _decode(r[2], r[3]), float(r[4]), float(r[5])) for r in rows
        ]

    def expire_answers(self, now: float) -> int:
        """Delete answers past their TTL; return how many."""
        removed = int(
            self._db.execute("DELETE FROM answers WHERE expires_at <= ?", (now,)).rowcount
        )
        self._answers -= removed
        return removed

    def answer_count(self) -> int:
        """Answers currently stored."""
        (count,) = self._db.execute("SELECT COUNT(*) FROM answers").fetchone()
        return int(count)
