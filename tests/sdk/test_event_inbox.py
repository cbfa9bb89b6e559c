"""The event inbox: each escalation answer reaches the application once, across gateway
restarts (same answer, new event id), both transports (same event id) and device restarts
(the answer ids it was given are kept in the outbox database, bounded)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from device_sdk import Command, DeviceEvent, EscalationAnswer
from device_sdk._events import EventInbox
from device_sdk._queue import DiskQueue


def _answer(event_id: str, escalation_id: str) -> DeviceEvent:
    return DeviceEvent(
        event_id=event_id,
        at=None,
        kind=EscalationAnswer(
            escalation_id=escalation_id,
            frame_id="f-1",
            label="Cat",
            score=0.9,
            model_name="nanodet-coco80",
            still_unknown=False,
            edge_label="Cat",
            edge_score=0.5,
        ),
    )


async def _drain(inbox: EventInbox) -> list[DeviceEvent]:
    stopping = asyncio.Event()
    out = []
    while len(inbox):
        event = await inbox.next(stopping)
        assert event is not None
        out.append(event)
    return out


def _ids(events: list[DeviceEvent]) -> list[str]:
    return [e.kind.escalation_id for e in events if isinstance(e.kind, EscalationAnswer)]


async def test_each_answer_once_across_event_ids_and_device_restarts(tmp_path: Path) -> None:
    queue = DiskQueue(tmp_path / "outbox.sqlite3")
    inbox = EventInbox(maxsize=16, store=lambda: queue)
    await inbox.load()
    assert inbox.offer(_answer("boot1-1", "esc-a"))
    assert not inbox.offer(_answer("boot1-1", "esc-a")), "same event over gRPC and MQTT"
    assert not inbox.offer(_answer("boot2-1", "esc-a")), "re-handed after a gateway restart"
    assert inbox.offer(_answer("boot1-2", "esc-b"))
    assert inbox.offer(DeviceEvent("boot1-3", None, Command("reboot", {})))
    assert _ids(await _drain(inbox)) == ["esc-a", "esc-b"]
    # Given already: a copy from another gateway is not given again.
    assert not inbox.offer(_answer("other-9", "esc-b"))
    assert inbox.duplicates == 2, "answers heard again (the same event twice is not counted)"
    queue.close()

    # The device restarts: the gateway hands everything out again; only the new one passes.
    queue = DiskQueue(tmp_path / "outbox.sqlite3")
    inbox = EventInbox(maxsize=16, store=lambda: queue)
    await inbox.load()
    for n, esc in enumerate(("esc-a", "esc-b", "esc-c")):
        inbox.offer(_answer(f"boot3-{n}", esc))
    assert _ids(await _drain(inbox)) == ["esc-c"]
    queue.close()


async def test_answers_not_yet_given_come_again_and_the_record_is_bounded(
    tmp_path: Path,
) -> None:
    queue = DiskQueue(tmp_path / "outbox.sqlite3", remember_answers=3)
    inbox = EventInbox(maxsize=2, store=lambda: queue)
    await inbox.load()
    for n in range(3):
        inbox.offer(_answer(f"b-{n}", f"esc-{n}"))
    assert inbox.dropped == 1, "full: the oldest went"
    assert inbox.offer(_answer("c-0", "esc-0")), "a dropped answer was never given"
    assert _ids(await _drain(inbox)) == ["esc-2", "esc-0"]
    for n in range(3, 6):
        inbox.offer(_answer(f"d-{n}", f"esc-{n}"))
        await _drain(inbox)
    assert queue.answers_seen() == ["esc-3", "esc-4", "esc-5"], "the newest 3 ids only"
    queue.close()


async def test_next_returns_none_when_stopping(tmp_path: Path) -> None:
    queue = DiskQueue(tmp_path / "outbox.sqlite3")
    inbox = EventInbox(maxsize=4, store=lambda: queue)
    stopping = asyncio.Event()
    waiter = asyncio.create_task(inbox.next(stopping))
    await asyncio.sleep(0.01)
    stopping.set()
    assert await asyncio.wait_for(waiter, 1) is None
    queue.close()
