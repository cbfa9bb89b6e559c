"""Live calls: a revocation's cut ends exactly the guarded wait it interrupts, in the caller's
own task, and leaves every other cancellation as it was."""

from __future__ import annotations

import asyncio

import pytest

from gateway._grpc import LiveCalls
from gateway.errors import DeviceRevoked


async def test_guarded_wait_runs_in_the_calling_task():
    """No task per wait: a stream frame costs no extra rounds of the event loop."""
    live = LiveCalls(max_streams_per_device=1)

    async def which_task() -> asyncio.Task[object] | None:
        return asyncio.current_task()

    with live.register("cam-1", "aa", "StreamDetect", streaming=True) as call:
        assert await call.guard(which_task()) is asyncio.current_task()


async def test_cut_turns_into_device_revoked_and_the_task_can_go_on_waiting():
    live = LiveCalls(max_streams_per_device=1)
    blocker = asyncio.Event()
    seen: list[object] = []

    async def handler() -> str:
        with live.register("cam-1", "aa", "StreamDetect", streaming=True) as call:
            try:
                await call.guard(blocker.wait())
            except DeviceRevoked as exc:
                seen.append(exc)
            task = asyncio.current_task()
            assert task is not None
            seen.append(task.cancelling())
            # The cut's cancellation was taken back: a timeout in the same task still works
            # and is reported as a timeout, not as a cancellation.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.01):
                    await asyncio.Event().wait()
            # And the call stays cut: the next guarded wait is refused at once.
            with pytest.raises(DeviceRevoked):
                await call.guard(asyncio.sleep(0))
            return "ended"

    task = asyncio.create_task(handler())
    await asyncio.sleep(0)
    assert live.cut("cam-1") == 1
    assert await asyncio.wait_for(task, 5) == "ended"
    assert isinstance(seen[0], DeviceRevoked)
    assert seen[1] == 0


async def test_someone_elses_cancellation_is_not_mistaken_for_a_cut():
    live = LiveCalls(max_streams_per_device=1)

    async def handler() -> None:
        with live.register("cam-1", "aa", "StreamDetect", streaming=True) as call:
            await call.guard(asyncio.Event().wait())

    task = asyncio.create_task(handler())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert live.count() == 0


async def test_a_cancellation_that_comes_with_a_cut_still_propagates():
    """gRPC ending the call (or shutdown) while the device is revoked: the handler's task
    must still end cancelled, not carry on with a revocation error."""
    live = LiveCalls(max_streams_per_device=1)

    async def handler() -> None:
        with live.register("cam-1", "aa", "StreamDetect", streaming=True) as call:
            await call.guard(asyncio.Event().wait())

    task = asyncio.create_task(handler())
    await asyncio.sleep(0)
    live.cut("cam-1")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cut_is_not_lost_when_the_waited_code_swallows_it():
    live = LiveCalls(max_streams_per_device=1)
    started = asyncio.Event()

    async def stubborn() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return "carried on"
        return "unreachable"

    async def handler() -> int:
        with live.register("cam-1", "aa", "Detect", streaming=False) as call:
            with pytest.raises(DeviceRevoked):
                await call.guard(stubborn())
            task = asyncio.current_task()
            assert task is not None
            return task.cancelling()

    task = asyncio.create_task(handler())
    await started.wait()
    live.cut("cam-1")
    assert await asyncio.wait_for(task, 5) == 0


async def test_a_cut_between_the_answer_and_the_resumption_still_refuses():
    """The awaited result is ready but the task has not resumed yet when the cut comes."""
    live = LiveCalls(max_streams_per_device=1)
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handler() -> None:
        with live.register("cam-1", "aa", "Detect", streaming=False) as call:
            await call.guard(future)

    task = asyncio.create_task(handler())
    await asyncio.sleep(0)
    future.set_result("answer")  # the task's wake-up is scheduled, not run
    live.cut("cam-1")
    with pytest.raises(DeviceRevoked):
        await task


async def test_a_call_already_cut_refuses_without_leaving_a_coroutine_behind():
    live = LiveCalls(max_streams_per_device=1)
    ran: list[bool] = []

    async def work() -> None:
        ran.append(True)

    with live.register("cam-1", "aa", "Detect", streaming=False) as call:
        live.cut("cam-1")
        coro = work()
        with pytest.raises(DeviceRevoked):
            await call.guard(coro)
        assert coro.cr_frame is None  # closed: no "never awaited" warning
    assert ran == []
