"""The durable outbox: stored before pending, bounded with refusal, answers once, TTL."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
from pathlib import Path

import pytest

from gateway import AnsweredObject, ErrorEvent, EscalationAnswer
from gateway._escalation import Outbox, OutboxEntry
from gateway.errors import OutboxFull


def entry(n: int, *, at: float = 100.0, address: str = "127.0.0.1:1") -> OutboxEntry:
    return OutboxEntry(
        escalation_id=f"esc-{n}",
        device_id="dev-1",
        region="home",
        frame_id=f"f{n}",
        core_address=address,
        image=b"\xff\xd8\xff" + bytes([n]),
        is_full_frame=False,
        edge_label="Cat",
        edge_score=0.55,
        created_at=at + n,
        next_attempt_at=at + n,
    )


def answer(n: int) -> EscalationAnswer:
    return EscalationAnswer(f"esc-{n}", f"f{n}", "Cat", 0.9, "efficientnet-lite2")


def test_full_outbox_refuses_new_and_keeps_stored(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3", max_entries=2, max_answers=10)
    box.add(entry(1))
    box.add(entry(2))
    with pytest.raises(OutboxFull, match="full \\(2 entries"):
        box.add(entry(3))
    assert box.pending_ids() == ["esc-1", "esc-2"]
    assert box.complete("esc-1", "dev-1", answer(1), now=200.0, ttl_s=60.0)
    box.add(entry(3))  # room again once one is answered
    assert box.pending_ids() == ["esc-2", "esc-3"]


def test_survives_reopen_and_completes_once(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    box = Outbox(path, max_entries=10, max_answers=10)
    box.add(entry(1))
    box.add(entry(2))
    box.close()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    box = Outbox(path, max_entries=10, max_answers=10)
    assert [e.escalation_id for e in box.due(1000.0, limit=10, skip_addresses=frozenset())] == [
        "esc-1",
        "esc-2",
    ]
    assert box.complete("esc-1", "dev-1", answer(1), now=200.0, ttl_s=60.0)
    assert not box.complete("esc-1", "dev-1", answer(1), now=201.0, ttl_s=60.0)
    error = ErrorEvent("INVALID_ARGUMENT", "bad", "f2")
    assert box.complete("esc-2", "dev-1", error, now=202.0, ttl_s=60.0)
    box.close()
    box = Outbox(path, max_entries=10, max_answers=10)
    stored = box.stored_answers(now=210.0)
    assert [(s.escalation_id, s.payload) for s in stored] == [
        ("esc-1", answer(1)),
        ("esc-2", error),
    ]
    assert box.pending_count() == 0
    # TTL: gone after 60 s.
    assert box.expire_answers(now=261.0) == 1
    assert [s.escalation_id for s in box.stored_answers(now=261.0)] == ["esc-2"]


def test_due_respects_backoff_and_addresses(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3", max_entries=10, max_answers=10)
    box.add(entry(1, address="core-a:1"))
    box.add(entry(2, address="core-b:1"))
    box.retry_later("esc-1", next_attempt_at=500.0, error="UNAVAILABLE")
    assert [e.escalation_id for e in box.due(200.0, limit=5, skip_addresses=frozenset())] == [
        "esc-2"
    ]
    assert box.due(200.0, limit=5, skip_addresses=frozenset({"core-b:1"})) == []
    due = box.due(600.0, limit=5, skip_addresses=frozenset())
    assert [(e.escalation_id, e.attempts, e.last_error) for e in due] == [
        ("esc-2", 0, ""),
        ("esc-1", 1, "UNAVAILABLE"),
    ]
    assert box.next_due_at() == 102.0


def test_answers_are_bounded(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3", max_entries=10, max_answers=2)
    for n in range(1, 5):
        box.add(entry(n))
        box.complete(f"esc-{n}", "dev-1", answer(n), now=200.0 + n, ttl_s=600.0)
    assert [s.escalation_id for s in box.stored_answers(now=210.0)] == ["esc-3", "esc-4"]


def _completion_steps(path: Path, *, stored: int, max_answers: int) -> int:
    """SQLite VM steps (in hundreds) of one completion with ``stored`` answers kept."""
    Outbox(path, max_entries=10, max_answers=max_answers).close()  # creates the schema
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO answers VALUES (?,?,?,?,?,?)",
            ((f"old-{i}", "dev-1", "answer", "{}", float(i), 1e9) for i in range(stored)),
        )
    box = Outbox(path, max_entries=10, max_answers=max_answers)
    box.add(entry(1, at=1e6))
    steps = 0

    def tick() -> int:
        nonlocal steps
        steps += 1
        return 0

    box._db.set_progress_handler(tick, 100)
    assert box.complete("esc-1", "dev-1", answer(1), now=2e6, ttl_s=60.0)
    box._db.set_progress_handler(None, 100)
    assert box.answer_count() == min(stored + 1, max_answers)
    box.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        kept = {row[0] for row in db.execute("SELECT escalation_id FROM answers")}
    assert "esc-1" in kept
    assert ("old-0" in kept) == (stored < max_answers)  # when full, the oldest went
    return steps


@pytest.mark.parametrize("full", [False, True], ids=["room", "full"])
def test_a_completion_costs_the_same_however_many_answers_are_kept(
    tmp_path: Path, full: bool
) -> None:
    """Bounding the answers table must not sort it on every completion: a gateway keeps up
    to a day of answers, and each answer reaches its device only after this commit."""
    few, many = 50, 5_000
    cost = {
        n: _completion_steps(tmp_path / f"o{n}.sqlite3", stored=n, max_answers=n if full else 2 * n)
        for n in (few, many)
    }
    assert cost[many] <= 2 * cost[few] + 2, cost


def test_write_ahead_log_holding_images_is_private_too(tmp_path: Path) -> None:
    """The -wal and -shm files hold the same crops as the database: 0600 as well."""
    path = tmp_path / "o.sqlite3"
    box = Outbox(path, max_entries=10, max_answers=10)
    box.add(entry(1))
    side_files = [p for p in tmp_path.iterdir() if p.name != "o.sqlite3"]
    assert side_files, "WAL mode should have created the -wal file"
    for p in [path, *side_files]:
        assert oct(p.stat().st_mode & 0o777) == "0o600", p.name
    box.close()


def test_the_reason_and_the_objects_survive_the_outbox(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3", max_entries=10, max_answers=10)
    box.add(dataclasses.replace(entry(1), reason="outside_edge_set"))
    (due,) = box.due(500.0, limit=10, skip_addresses=frozenset())
    assert due.reason == "outside_edge_set"
    full = dataclasses.replace(
        answer(1),
        reason="outside_edge_set",
        objects=(AnsweredObject("Dog", 0.97, (0.1, 0.2, 0.5, 0.9)),),
    )
    assert box.complete("esc-1", "dev-1", full, now=200.0, ttl_s=60.0)
    box.close()
    reopened = Outbox(tmp_path / "o.sqlite3", max_entries=10, max_answers=10)
    (stored,) = reopened.stored_answers(210.0)
    assert stored.payload == full


def test_an_outbox_from_before_reasons_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE outbox (escalation_id TEXT PRIMARY KEY, device_id TEXT NOT NULL,"
        " region TEXT NOT NULL, frame_id TEXT NOT NULL, core_address TEXT NOT NULL,"
        " image BLOB NOT NULL, is_full_frame INTEGER NOT NULL, edge_label TEXT NOT NULL,"
        " edge_score REAL NOT NULL, created_at REAL NOT NULL, attempts INTEGER NOT NULL"
        " DEFAULT 0, next_attempt_at REAL NOT NULL, last_error TEXT NOT NULL DEFAULT '');"
        "INSERT INTO outbox VALUES ('esc-old', 'dev-1', 'home', 'f0', '127.0.0.1:1',"
        " x'ffd8ff', 0, 'Cat', 0.55, 100.0, 0, 100.0, '');"
    )
    old.commit()
    old.close()
    box = Outbox(path, max_entries=10, max_answers=10)
    (waiting,) = box.due(500.0, limit=10, skip_addresses=frozenset())
    assert (waiting.escalation_id, waiting.reason) == ("esc-old", "")
    box.add(dataclasses.replace(entry(2), reason="uncertain"))
    assert [e.reason for e in box.due(500.0, limit=10, skip_addresses=frozenset())] == [
        "",
        "uncertain",
    ]
