"""The on-disk outbox: ordered, deduplicated, bounded with the documented policy, durable."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from device_sdk._queue import DiskQueue
from device_sdk.errors import QueueFull


def test_order_and_removal(tmp_path: Path) -> None:
    q = DiskQueue(tmp_path / "q.sqlite3")
    for i in range(5):
        assert q.put_frame(f"f{i}", b"x" * 10)
    q.put_telemetry(b"t")
    assert [i.frame_id for i in q.peek(10)] == ["f0", "f1", "f2", "f3", "f4", ""]
    first = q.peek(1)[0]
    q.remove(first.seq)
    assert [i.frame_id for i in q.peek(2)] == ["f1", "f2"]
    assert [i.frame_id for i in q.peek(2, exclude=frozenset({q.peek(1)[0].seq}))] == ["f2", "f3"]
    assert len(q) == 5
    assert (tmp_path / "q.sqlite3").stat().st_mode & 0o777 == 0o600


def test_deduplicated_by_frame_id_while_queued_and_after_delivery(tmp_path: Path) -> None:
    q = DiskQueue(tmp_path / "q.sqlite3")
    assert q.put_frame("a", b"1")
    assert not q.put_frame("a", b"2")
    q.remove(q.peek(1)[0].seq)
    assert not q.put_frame("a", b"3"), "a delivered id is remembered"
    assert len(q) == 0
    assert q.stats().duplicates == 2


def test_full_evicts_oldest_telemetry_then_refuses_frames(tmp_path: Path) -> None:
    q = DiskQueue(tmp_path / "q.sqlite3", max_items=3)
    q.put_telemetry(b"t1")
    q.put_telemetry(b"t2")
    q.put_frame("a", b"1")
    q.put_frame("b", b"2")  # evicts t1
    q.put_frame("c", b"3")  # evicts t2
    assert q.stats().telemetry_dropped == 2
    with pytest.raises(QueueFull) as info:
        q.put_frame("d", b"4")
    assert info.value.frames == 3
    # Telemetry cannot displace a frame: it is dropped itself.
    assert not q.put_telemetry(b"t3")
    assert [i.frame_id for i in q.peek(10)] == ["a", "b", "c"]


def test_byte_bound(tmp_path: Path) -> None:
    q = DiskQueue(tmp_path / "q.sqlite3", max_bytes=100)
    q.put_frame("a", b"x" * 60)
    with pytest.raises(QueueFull):
        q.put_frame("b", b"x" * 60)
    assert q.stats().bytes == 60


def _writer(path: str, n: int) -> None:
    q = DiskQueue(Path(path))
    for i in range(n):
        q.put_frame(f"frame-{i}", os.urandom(64))
    # Die without closing: every committed frame must still be there.
    os._exit(0)


def test_survives_a_process_dying_without_close(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    proc = multiprocessing.get_context("spawn").Process(target=_writer, args=(str(path), 50))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    q = DiskQueue(path)
    assert [i.frame_id for i in q.peek(100)] == [f"frame-{i}" for i in range(50)]
    assert q.stats().frames == 50


def test_write_ahead_log_of_queued_frames_is_private_too(tmp_path: Path) -> None:
    """The -wal and -shm files hold the same camera frames: 0600 like the database."""
    q = DiskQueue(tmp_path / "q.sqlite3")
    assert q.put_frame("f0", b"jpeg bytes")
    files = list(tmp_path.iterdir())
    assert len(files) > 1, "WAL mode should have created the -wal file"
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o600, p.name
