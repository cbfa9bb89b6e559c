"""A component's background tasks stop on close, even one whose cancellation was lost.

Before Python 3.12, ``asyncio.wait_for`` returns the awaited result instead of raising when
that future completes in the same loop turn as the cancel; aiomqtt waits for its CONNACK and
its disconnect that way, so a reconnect loop could carry on after its one cancellation and a
closed bridge keep connecting. :meth:`TaskSet.close` cancels what still runs again.
"""

from __future__ import annotations

import asyncio

from gateway._mqtt._tasks import TaskSet


async def test_close_ends_a_loop_that_lost_its_cancellation() -> None:
    """The connect finishes in the very turn the close cancels: the loop still ends."""
    tasks = TaskSet("test")
    connects: list[asyncio.Future[None]] = []
    rounds = [0]
    waiting = asyncio.Event()

    async def reconnect_loop() -> None:
        while True:
            connected = asyncio.get_running_loop().create_future()
            connects.append(connected)
            waiting.set()
            await asyncio.wait_for(connected, timeout=60)  # as aiomqtt waits for CONNACK
            rounds[0] += 1

    task = tasks.spawn(reconnect_loop(), name="reconnect")
    await waiting.wait()
    await asyncio.sleep(0)  # the loop is now inside wait_for
    connects[-1].set_result(None)  # CONNACK read in the same turn as the cancel below
    await tasks.close(timeout_s=60)
    assert rounds[0] >= 1  # the first cancellation was indeed lost
    assert task.cancelled()


async def test_close_is_bounded_for_a_task_that_never_stops() -> None:
    """A task that ignores every cancellation cannot hold close past its bound."""
    tasks = TaskSet("test")
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    task = tasks.spawn(stubborn(), name="stubborn")
    try:
        await asyncio.sleep(0)
        await tasks.close(timeout_s=0.3, recancel_s=0.05)
        assert not task.done()  # close returned although the task still runs (and is logged)
    finally:
        release.set()
        await asyncio.wait({task}, timeout=30)
    assert task.done()
