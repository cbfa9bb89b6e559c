"""The on-disk outbox: every frame and telemetry report waits here until a gateway has it.

Why on disk and always, not only while offline: a frame is "accepted" once :meth:`put_frame`
returns, and it must survive a crash or a restart of the device in every state, including
the moment a gateway fails with the frame in flight. So every frame goes through this table
and leaves it only when a gateway has answered for it (write-ahead, like a mail outbox).

Storage: one SQLite database in WAL mode (readers never block the writer; a crash keeps
every committed row). ``synchronous=NORMAL`` by default: a committed row survives a process
crash or restart; only a power cut may lose the last few commits. ``durable=True`` selects
``synchronous=FULL`` (an fsync per commit) for devices that lose power without warning.

Policy when full (``max_items`` items, frames and telemetry together, or ``max_bytes``
bytes of payload):

* a new frame first evicts the oldest *telemetry* reports (newer readings supersede older
  ones); if only frames are left, the new frame is refused with :class:`QueueFull`. A frame
  already accepted is never dropped.
* a new telemetry report evicts the oldest telemetry report; if there is none to evict it is
  dropped itself. Each eviction is counted in :attr:`QueueStats.telemetry_dropped`.

Frames are deduplicated by frame id: putting an id that waits in the queue, or that was
delivered recently (the last ``remember_delivered`` ids), is a no-op.

The same database remembers which escalation answers the application has already been given
(the last ``remember_answers`` escalation ids, 4096 by default): a gateway hands its stored
answers out again after it restarts, and a device that moves between gateways may hear an
answer twice, yet the application sees each answer once, across device restarts too.

The methods are synchronous and thread-safe; the client calls them through
``asyncio.to_thread`` so that disk I/O never blocks the event loop.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from device_sdk.errors import QueueFull

__all__ = ["DiskQueue", "QueueStats", "QueuedItem"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('frame', 'telemetry')),
    frame_id TEXT UNIQUE,
    payload BLOB NOT NULL,
    captured_at REAL NOT NULL,
    enqueued_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS delivered (
    frame_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS delivered_seq ON delivered (seq);
CREATE TABLE IF NOT EXISTS answers_seen (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    escalation_id TEXT NOT NULL UNIQUE
);
"""


@dataclass(frozen=True, slots=True)
class QueuedItem:
    """One waiting frame (``frame_id`` set) or telemetry report (``frame_id`` empty)."""

    seq: int
    kind: str
    frame_id: str
    payload: bytes
    captured_at: float


@dataclass(frozen=True, slots=True)
class QueueStats:
    """A snapshot of the queue."""

    frames: int
    telemetry: int
    bytes: int
    telemetry_dropped: int
    duplicates: int


class DiskQueue:
    """A bounded, ordered, deduplicated SQLite outbox (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        max_items: int = 1000,
        max_bytes: int = 256 * 1024 * 1024,
        durable: bool = False,
        remember_delivered: int = 4096,
        remember_answers: int = 4096,
    ) -> None:
        if max_items < 1 or max_bytes < 1 or remember_answers < 1:
            raise ValueError("max_items, max_bytes and remember_answers must be positive")
        self.path = Path(path)
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._remember = remember_delivered
        self.remember_answers = remember_answers
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Frames are camera images: the owner only. SQLite creates the -wal and -shm files
        # with the database file's permissions, so the file is 0600 before the first connect.
        os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self.path.chmod(0o600)
        # check_same_thread=False: calls arrive from asyncio.to_thread workers; the lock
        # serialises them.
        self._db = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=10.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        # A small page cache: the outbox is appended at one end and read at the other, and
        # a device may run many clients (or be small).
        self._db.execute("PRAGMA cache_size=-256")
        self._db.executescript(_SCHEMA)
        frames, telemetry, size = self._db.execute(
            "SELECT COALESCE(SUM(kind = 'frame'), 0), COALESCE(SUM(kind = 'telemetry'), 0),"
            " COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
        ).fetchone()
        self._frames = int(frames)
        self._telemetry = int(telemetry)
        self._bytes = int(size)
        self._telemetry_dropped = 0
        self._duplicates = 0
        self._closed = False

    # -- writers ---------------------------------------------------------------------------

    def put_frame(self, frame_id: str, image: bytes, *, captured_at: float | None = None) -> bool:
        """Accept a frame; ``False`` when the id is already queued or recently delivered.

        Raises :class:`QueueFull` when only frames are left and there is no room.
        """
        with self._lock:
            self._check_open()
            known = self._db.execute(
                "SELECT 1 FROM outbox WHERE frame_id = ? UNION ALL "
                "SELECT 1 FROM delivered WHERE frame_id = ?",
                (frame_id, frame_id),
            ).fetchone()
            if known is not None:
                self._duplicates += 1
                return False
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._make_room(len(image), for_frame=True)
                self._db.execute(
                    "INSERT INTO outbox (kind, frame_id, payload, captured_at, enqueued_at) "
                    "VALUES ('frame', ?, ?, ?, ?)",
                    (frame_id, image, captured_at or time.time(), time.time()),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._reload_counts()
                raise
            self._frames += 1
            self._bytes += len(image)
            return True

    def put_telemetry(self, payload: bytes, *, captured_at: float | None = None) -> bool:
        """Queue a telemetry report; ``False`` when it was dropped for lack of room."""
        with self._lock:
            self._check_open()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if not self._make_room(len(payload), for_frame=False):
                    self._db.execute("COMMIT")
                    self._telemetry_dropped += 1
                    return False
                self._db.execute(
                    "INSERT INTO outbox (kind, frame_id, payload, captured_at, enqueued_at) "
                    "VALUES ('telemetry', NULL, ?, ?, ?)",
                    (payload, captured_at or time.time(), time.time()),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._reload_counts()
                raise
            self._telemetry += 1
            self._bytes += len(payload)
            return True

    def _full(self, extra_bytes: int) -> bool:
        items = self._frames + self._telemetry + 1
        return items > self.max_items or self._bytes + extra_bytes > self.max_bytes

    def _make_room(self, size: int, *, for_frame: bool) -> bool:
        """Evict oldest telemetry until ``size`` more bytes fit; ``False`` if they cannot.

        For a frame that cannot fit, raises :class:`QueueFull` instead.
        """
        while self._full(size):
            row = self._db.execute(
                "SELECT seq, LENGTH(payload) FROM outbox WHERE kind = 'telemetry' "
                "ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                if for_frame:
                    raise QueueFull(self._frames, self._bytes)
                return False
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (row[0],))
            self._telemetry -= 1
            self._bytes -= int(row[1])
            self._telemetry_dropped += 1
        return True

    def remove(self, seq: int) -> None:
        """Forget a delivered item (remembering a frame's id for deduplication)."""
        self.remove_many([seq])

    def remove_many(self, seqs: list[int]) -> None:
        """Forget delivered items in one transaction (one commit for a whole batch)."""
        if not seqs:
            return
        with self._lock:
            self._check_open()
            marks = ",".join("?" * len(seqs))
            rows = self._db.execute(
                f"SELECT seq, kind, frame_id, LENGTH(payload) FROM outbox WHERE seq IN ({marks})",  # noqa: S608 - placeholders only
                seqs,
            ).fetchall()
            if not rows:
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", seqs)  # noqa: S608
                frames = [(f, q) for q, k, f, _ in rows if k == "frame"]
                if frames:
                    self._db.executemany(
                        "INSERT OR REPLACE INTO delivered (frame_id, seq) VALUES (?, ?)", frames
                    )
                    # Keep only the most recent ids: bounded, and enough to catch the
                    # retries a restarting device may make.
                    self._db.execute(
                        "DELETE FROM delivered WHERE seq <= ?",
                        (max(q for _, q in frames) - self._remember,),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            for _, kind, _, size in rows:
                if kind == "frame":
                    self._frames -= 1
                else:
                    self._telemetry -= 1
                self._bytes -= int(size)

    def remember_answer(self, escalation_id: str) -> None:
        """Record that the application was given the answer to ``escalation_id``.

        Idempotent; keeps only the newest ``remember_answers`` ids (one commit).
        """
        with self._lock:
            self._check_open()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO answers_seen (escalation_id) VALUES (?)",
                    (escalation_id,),
                )
                if cur.rowcount and cur.lastrowid is not None:
                    self._db.execute(
                        "DELETE FROM answers_seen WHERE n <= ?",
                        (cur.lastrowid - self.remember_answers,),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- readers ---------------------------------------------------------------------------

    def answers_seen(self) -> list[str]:
        """Escalation ids whose answers the application was given, oldest first (at most
        ``remember_answers``)."""
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT escalation_id FROM answers_seen ORDER BY n DESC LIMIT ?",
                (self.remember_answers,),
            ).fetchall()
        return [str(r[0]) for r in reversed(rows)]

    def peek(self, limit: int, *, exclude: frozenset[int] = frozenset()) -> list[QueuedItem]:
        """The oldest ``limit`` items not in ``exclude`` (those already in flight)."""
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT seq, kind, COALESCE(frame_id, ''), payload, captured_at FROM outbox "
                "ORDER BY seq LIMIT ?",
                (limit + len(exclude),),
            ).fetchall()
        items = [QueuedItem(int(s), str(k), str(f), bytes(p), float(c)) for s, k, f, p, c in rows]
        return [i for i in items if i.seq not in exclude][:limit]

    def __len__(self) -> int:
        return self._frames + self._telemetry

    def stats(self) -> QueueStats:
        return QueueStats(
            frames=self._frames,
            telemetry=self._telemetry,
            bytes=self._bytes,
            telemetry_dropped=self._telemetry_dropped,
            duplicates=self._duplicates,
        )

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("queue is closed")

    def _reload_counts(self) -> None:
        frames, telemetry, size = self._db.execute(
            "SELECT COALESCE(SUM(kind = 'frame'), 0), COALESCE(SUM(kind = 'telemetry'), 0),"
            " COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
        ).fetchone()
        self._frames, self._telemetry, self._bytes = int(frames), int(telemetry), int(size)
