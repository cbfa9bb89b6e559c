"""MicroBatcher with a fake batch function (a seam we own): batching, bounds, lifecycle."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from gateway._inference._batcher import (
    DeadlineExceeded,
    MicroBatcher,
    Overloaded,
    ShuttingDown,
)


class Recorder:
    """A batch function that doubles its items and records what it saw, where."""

    def __init__(self, *, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.started.set()
        self.threads.add(threading.get_ident())
        self.gate.wait(5)
        if self.delay:
            time.sleep(self.delay)
        if -1 in items:
            raise ValueError("boom")
        self.batches.append(list(items))
        return [i * 2 for i in items]

    @property
    def seen(self) -> list[int]:
        return [i for b in self.batches for i in b]


async def _wait_started(rec: Recorder) -> None:
    # The batch function runs in a thread; poll its flag without blocking the loop.
    for _ in range(500):
        if rec.started.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the batch function never started")


async def test_concurrent_submits_are_batched_and_answered_in_order() -> None:
    rec = Recorder(delay=0.01)
    sizes: list[int] = []
    async with MicroBatcher(
        rec, max_batch=8, max_wait_ms=20, queue_size=64, on_batch=lambda n, _s: sizes.append(n)
    ) as batcher:
        results = await asyncio.gather(*(batcher.submit(i) for i in range(30)))
    assert results == [i * 2 for i in range(30)]
    assert sorted(rec.seen) == list(range(30))
    assert max(sizes) > 1
    assert all(1 <= s <= 8 for s in sizes)
    assert sum(sizes) == 30


async def test_batch_function_runs_off_the_event_loop() -> None:
    rec = Recorder()
    async with MicroBatcher(rec, max_batch=4, max_wait_ms=1) as batcher:
        await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    assert rec.threads
    assert threading.get_ident() not in rec.threads


async def test_lone_request_waits_at_most_max_wait() -> None:
    rec = Recorder()
    async with MicroBatcher(rec, max_batch=8, max_wait_ms=5) as batcher:
        started = time.monotonic()
        assert await batcher.submit(21) == 42
        # Generous: a loaded CI host; what matters is it is not waiting for a full batch.
        assert time.monotonic() - started < 0.5


async def test_no_wait_when_nothing_more_is_coming() -> None:
    rec = Recorder()
    coming = {"n": 0}
    async with MicroBatcher(
        rec, max_batch=8, max_wait_ms=2000, more_coming=lambda: coming["n"] > 0
    ) as batcher:
        started = time.monotonic()
        assert await batcher.submit(1) == 2
        # Far below max_wait: with nothing on its way the lone item runs at once.
        assert time.monotonic() - started < 1.0

        # Something is on its way: the first item waits for it and they run together.
        coming["n"] = 1
        first = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0.05)
        coming["n"] = 0
        assert await asyncio.gather(first, batcher.submit(3)) == [4, 6]
    assert rec.batches == [[1], [2, 3]]


async def test_full_queue_answers_overloaded_at_once() -> None:
    rec = Recorder()
    rec.gate.clear()
    async with MicroBatcher(rec, max_batch=1, max_wait_ms=0, queue_size=2) as batcher:
        running = asyncio.create_task(batcher.submit(1))
        await _wait_started(rec)
        queued = [asyncio.create_task(batcher.submit(i)) for i in (2, 3)]
        await asyncio.sleep(0)
        assert batcher.queue_depth() == 2
        started = time.monotonic()
        with pytest.raises(Overloaded):
            await batcher.submit(4)
        assert time.monotonic() - started < 0.05
        assert batcher.queue_depth() == 2  # never grows past the bound
        rec.gate.set()
        assert await asyncio.gather(running, *queued) == [2, 4, 6]
    assert 4 not in rec.seen


async def test_deadline_passed_in_the_queue_is_dropped() -> None:
    rec = Recorder()
    rec.gate.clear()
    async with MicroBatcher(rec, max_batch=1, max_wait_ms=0, queue_size=8) as batcher:
        running = asyncio.create_task(batcher.submit(1))
        await _wait_started(rec)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(2, deadline=time.monotonic() + 0.05)
        # Answered at its deadline, not when the blocked batch finished.
        assert time.monotonic() - started < 1.0
        assert batcher.queue_depth() == 0
        rec.gate.set()
        assert await running == 2
        assert await batcher.submit(3) == 6
    assert rec.seen == [1, 3]


async def test_deadline_already_past_is_refused() -> None:
    async with MicroBatcher(Recorder()) as batcher:
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(1, deadline=time.monotonic() - 1)


async def test_expired_items_are_dropped_when_the_batch_starts() -> None:
    # The worker's own check: items whose deadline passes while the worker assembles the
    # batch (here: waiting max_wait for more) are answered DeadlineExceeded, not run.
    rec = Recorder()
    async with MicroBatcher(rec, max_batch=8, max_wait_ms=200) as batcher:
        doomed = asyncio.create_task(batcher.submit(1, deadline=time.monotonic() + 0.02))
        kept = asyncio.create_task(batcher.submit(2))
        with pytest.raises(DeadlineExceeded):
            await doomed
        assert await kept == 4
    assert rec.seen == [2]


async def test_cancelled_caller_is_skipped_and_frees_its_slot() -> None:
    rec = Recorder()
    rec.gate.clear()
    async with MicroBatcher(rec, max_batch=1, max_wait_ms=0, queue_size=1) as batcher:
        running = asyncio.create_task(batcher.submit(1))
        await _wait_started(rec)
        victim = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0)
        assert batcher.queue_depth() == 1
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        assert batcher.queue_depth() == 0
        after = asyncio.create_task(batcher.submit(3))  # the freed slot takes a new item
        await asyncio.sleep(0)
        rec.gate.set()
        assert list(await asyncio.gather(running, after)) == [2, 6]
    assert rec.seen == [1, 3]


async def test_failing_batch_fails_only_its_callers() -> None:
    rec = Recorder()
    async with MicroBatcher(rec, max_batch=1, max_wait_ms=0) as batcher:
        outcomes = await asyncio.gather(
            batcher.submit(5), batcher.submit(-1), batcher.submit(7), return_exceptions=True
        )
        assert outcomes[0] == 10
        assert isinstance(outcomes[1], ValueError)
        assert outcomes[2] == 14
        assert await batcher.submit(8) == 16  # the worker survived


async def test_wrong_number_of_results_fails_the_batch() -> None:
    def short(items: Sequence[int]) -> list[int]:
        return [0]

    async with MicroBatcher(short, max_batch=4, max_wait_ms=50) as batcher:
        outcomes = await asyncio.gather(
            batcher.submit(1), batcher.submit(2), return_exceptions=True
        )
    assert all(isinstance(o, RuntimeError) for o in outcomes)


async def test_exit_drains_the_queue_then_refuses() -> None:
    rec = Recorder(delay=0.02)
    batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch=2, max_wait_ms=0)
    async with batcher:
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(6)]
        await asyncio.sleep(0)
    # Leaving waited for every queued item.
    assert all(t.done() for t in tasks)
    assert [t.result() for t in tasks] == [i * 2 for i in range(6)]
    with pytest.raises(ShuttingDown):
        await batcher.submit(9)


async def test_submit_while_closing_is_refused() -> None:
    rec = Recorder()
    rec.gate.clear()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch=1, max_wait_ms=0)
    entered, leave = asyncio.Event(), asyncio.Event()

    async def owner() -> None:
        async with batcher:
            entered.set()
            await leave.wait()

    async with asyncio.TaskGroup() as tg:
        closing = tg.create_task(owner())
        await entered.wait()
        first = tg.create_task(batcher.submit(1))
        await _wait_started(rec)
        leave.set()
        await asyncio.sleep(0.01)  # the owner is now in __aexit__, draining
        assert not closing.done()
        with pytest.raises(ShuttingDown):
            await batcher.submit(2)
        rec.gate.set()
        assert await first == 2
    assert rec.seen == [1]


async def test_cancelled_owner_fails_waiting_callers() -> None:
    rec = Recorder()
    rec.gate.clear()
    batcher: MicroBatcher[int, int] = MicroBatcher(rec, max_batch=1, max_wait_ms=0)
    callers: list[asyncio.Task[int]] = []

    async def owner() -> None:
        async with batcher:
            callers.extend(asyncio.create_task(batcher.submit(i)) for i in range(3))
            await asyncio.Event().wait()

    task = asyncio.create_task(owner())
    await _wait_started(rec)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rec.gate.set()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(o, ShuttingDown) for o in outcomes)


async def test_observer_failure_does_not_stop_the_worker() -> None:
    def bad(_n: int, _s: float) -> None:
        raise RuntimeError("metrics bug")

    async with MicroBatcher(Recorder(), on_batch=bad) as batcher:
        assert await batcher.submit(1) == 2
        assert await batcher.submit(2) == 4


async def test_entered_once() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(Recorder())
    async with batcher:
        pass
    with pytest.raises(RuntimeError):
        async with batcher:
            pass


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(Recorder(), max_batch=0)
    with pytest.raises(ValueError, match="queue_size"):
        MicroBatcher(Recorder(), queue_size=0)


async def test_run_alone_runs_in_the_batchers_thread_and_batches_wait_behind_it() -> None:
    rec = Recorder()
    gate = threading.Event()
    ran_in: list[int] = []

    def job() -> str:
        ran_in.append(threading.get_ident())
        gate.wait(5)
        return "alone"

    async with MicroBatcher(rec, max_batch=8, max_wait_ms=0) as batcher:
        assert batcher.idle()
        await batcher.submit(1)  # the batcher's thread, seen by the recorder
        alone = asyncio.create_task(batcher.run_alone(job))
        await asyncio.sleep(0)
        assert not batcher.idle()  # a lone job runs: a new frame must not go alone too
        later = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0.05)
        assert not later.done()  # its batch waits for the one thread
        gate.set()
        assert await alone == "alone"
        assert await later == 4
        assert batcher.idle()
    assert ran_in
    assert set(ran_in) == rec.threads
    assert threading.get_ident() not in rec.threads


async def test_cancelled_run_alone_keeps_the_thread_busy_until_the_job_ends() -> None:
    gate = threading.Event()
    started = threading.Event()

    def job() -> None:
        started.set()
        gate.wait(5)

    async with MicroBatcher(Recorder(), max_batch=8, max_wait_ms=0) as batcher:
        alone = asyncio.create_task(batcher.run_alone(job))
        for _ in range(500):
            if started.is_set():
                break
            await asyncio.sleep(0.01)
        alone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await alone
        assert not batcher.idle()  # the job still holds the thread
        gate.set()
        for _ in range(500):
            if batcher.idle():
                break
            await asyncio.sleep(0.01)
        assert batcher.idle()


async def test_run_alone_is_refused_once_closing() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(Recorder())
    with pytest.raises(ShuttingDown):
        await batcher.run_alone(lambda: 1)  # never entered
    async with batcher:
        assert await batcher.run_alone(lambda: 7) == 7
    with pytest.raises(ShuttingDown):
        await batcher.run_alone(lambda: 1)
