"""The first attempt runs while the outbox row is being stored: order and a close in between.

The outbox thread is held (a job queued on it ahead of the row's commit) so that the call to
the core and its answer happen, for certain, before the row is durable.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from gateway import EscalateService, EscalationAnswer
from gateway._escalation import Escalator
from gateway._escalation._outbox import Outbox
from protos.edgeward.v1 import core_pb2
from tests._support.core import ObservedCore

from .conftest import Cores, EscalatorFactory, Recorder, frame_of, region

FRAMES = region(escalate_empty_frames=True, send="frame")
MOTORCYCLE = frame_of("motorcycle.jpg")


class Counting(ObservedCore):
    """A Core.Escalate handler that counts the requests, then lets the real one answer."""

    def __init__(self, inner: EscalateService) -> None:
        super().__init__(inner)
        self.requests: list[str] = []

    def seen(self, request: core_pb2.EscalationRequest) -> None:
        self.requests.append(request.escalation_id)


async def wait_for(predicate: Any, limit_s: float = 60.0) -> None:
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110 - state of other threads and a real core
            await asyncio.sleep(0.02)


def hold_outbox_thread(esc: Escalator) -> threading.Event:
    """Queue a job on the escalator's outbox thread that blocks it until the event is set."""
    gate = threading.Event()
    # The one seam that orders the commit after the call: the escalator's outbox thread.
    pool = esc._db_pool
    assert pool is not None
    pool.submit(gate.wait, 120)
    return gate


async def test_an_answer_that_comes_first_waits_for_its_durable_row(
    cores: Cores, make_escalator: EscalatorFactory
) -> None:
    sink = Recorder()
    handler = Counting(cores.service())
    async with cores.run(handler) as core, make_escalator(core.address, sink, policy=FRAMES) as esc:
        gate = hold_outbox_thread(esc)
        try:
            task = asyncio.create_task(
                esc.escalate(device_id="dev-1", frame_id="f1", detections=(), frame=MOTORCYCLE)
            )
            # The core is asked and answers while the row is still not written.
            await wait_for(lambda: handler.inner.store.count() == 1)
            (sent,) = handler.requests
            await asyncio.sleep(0.3)  # room for an answer that overtook its row to show
            assert sink.events == []  # nothing before the row is durable …
            assert not task.done()  # … and the device has not been told "pending" yet
        finally:
            gate.set()
        outcome = await task
        (pending,) = outcome.pending
        assert pending.escalation_id == sent
        await wait_for(lambda: len(sink.events) == 1)
        await asyncio.sleep(0.3)  # a second delivery, were there one, would land now
        assert await esc.pending_count() == 0
    assert sink.ids() == [sent]
    (_, answer) = sink.events[0]
    assert isinstance(answer, EscalationAnswer)
    assert answer.label == "motorcycle"
    # One call: the delivery loop left the row to the attempt already under way.
    assert handler.requests == [sent]
    assert cores.runs == 1


async def test_closed_between_the_call_and_the_commit_nothing_lost_answered_once(
    cores: Cores, make_escalator: EscalatorFactory
) -> None:
    first_sink = Recorder()
    handler = Counting(cores.service())
    async with cores.run(handler) as core:
        esc = make_escalator(core.address, first_sink, policy=FRAMES)
        await esc.__aenter__()
        gate = hold_outbox_thread(esc)
        try:
            task = asyncio.create_task(
                esc.escalate(device_id="dev-1", frame_id="f1", detections=(), frame=MOTORCYCLE)
            )
            await wait_for(lambda: handler.inner.store.count() == 1)  # the core has answered
            # The gateway closes with the answer in hand and the row not yet committed.
            closing = asyncio.create_task(esc.__aexit__(None, None, None))
            await asyncio.sleep(0)  # the close begins: the attempt is cut before storing
        finally:
            gate.set()
        outcome = await task
        await closing
        (pending,) = outcome.pending  # the row did commit: the device was told "pending"
        assert first_sink.events == []  # the cut attempt stored and handed over nothing
        outbox = Outbox(esc.settings.outbox_path, max_entries=10, max_answers=10)
        try:
            assert outbox.pending_ids() == [pending.escalation_id]
            assert outbox.answer_count() == 0
        finally:
            outbox.close()

        # The next start sends it again under the same id; the core replays its answer.
        second_sink = Recorder()
        async with make_escalator(core.address, second_sink, policy=FRAMES) as again:
            await wait_for(lambda: len(second_sink.events) == 1)
            await asyncio.sleep(0.3)  # a duplicate, were there one, would land now
            assert await again.pending_count() == 0
    assert second_sink.ids() == [pending.escalation_id]
    assert handler.requests == [pending.escalation_id] * 2
    assert cores.runs == 1  # the models ran once; the second call got the stored answer
