"""Micro-batching of concurrent requests in front of a model.

Errors (``InferenceError`` and its ``Overloaded``, ``DeadlineExceeded``, ``ShuttingDown``) are
defined in :mod:`gateway.errors`, under the gateway's one root.

Many devices send single frames at once; a model run over N frames costs less than N runs
(much less on a GPU, a little less on a CPU), so requests that arrive within ``max_wait_ms`` of
each other share one run. The queue is bounded: when it is full the caller is told at once
(``Overloaded``) rather than waiting behind work the gateway cannot finish in time.

Fair across devices: each request may carry a ``key`` (the device id), and a batch takes the
waiting requests round robin over keys (each key's own in arrival order), at most
``max_per_key`` of one key, so a device with many frames waiting never fills a batch: its
backlog runs over several batches, each of which another device's frame can join, and a
newcomer waits for at most the batch in progress. A request without a key is its own key.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Generic, Self, TypeVar

import structlog

from gateway.errors import DeadlineExceeded, InferenceError, Overloaded, ShuttingDown

__all__ = [
    "DeadlineExceeded",
    "InferenceError",
    "MicroBatcher",
    "Overloaded",
    "ShuttingDown",
]

_log = structlog.get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")
A = TypeVar("A")


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(slots=True, eq=False)
class _Pending(Generic[T, R]):
    item: T
    deadline: float | None  # time.monotonic() value
    enqueued: float  # time.monotonic() value
    future: asyncio.Future[R] = field(repr=False)
    key: object = None


class _FairPending(Generic[T, R]):
    """Waiting requests, one queue per key; taken round robin over keys."""

    def __init__(self) -> None:
        self._by_key: OrderedDict[object, deque[_Pending[T, R]]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def append(self, p: _Pending[T, R]) -> None:
        queue = self._by_key.get(p.key)
        if queue is None:
            queue = self._by_key[p.key] = deque()
        queue.append(p)
        self._count += 1

    def put_back(self, items: list[_Pending[T, R]]) -> None:
        """Return taken items to the front of their keys' queues."""
        for p in reversed(items):
            queue = self._by_key.get(p.key)
            if queue is None:
                queue = self._by_key[p.key] = deque()
                self._by_key.move_to_end(p.key, last=False)
            queue.appendleft(p)
            self._count += 1

    def remove(self, p: _Pending[T, R]) -> None:
        """Remove ``p``; ``ValueError`` when it is not waiting."""
        queue = self._by_key.get(p.key)
        if queue is None:
            raise ValueError("not waiting")
        queue.remove(p)
        self._count -= 1
        if not queue:
            del self._by_key[p.key]

    def oldest(self) -> float:
        """When the longest-waiting request arrived."""
        return min(q[0].enqueued for q in self._by_key.values())

    def takeable(self, per_key: int | None) -> int:
        """How many requests one batch could take now (``per_key`` of each key at most)."""
        if per_key is None:
            return self._count
        return sum(min(per_key, len(q)) for q in self._by_key.values())

    def take(self, count: int, per_key: int | None) -> list[_Pending[T, R]]:
        """Up to ``count`` requests in the round, at most ``per_key`` of one key."""
        if per_key is None:
            return [self.popleft() for _ in range(min(count, self._count))]
        taken: list[_Pending[T, R]] = []
        for _ in range(per_key):
            # One pass of the round: each key that has a request gives its first one.
            for _key in range(len(self._by_key)):
                if len(taken) == count:
                    return taken
                taken.append(self.popleft())
        return taken

    def popleft(self) -> _Pending[T, R]:
        """The next request in the round: the first key's first; that key goes to the end."""
        key, queue = next(iter(self._by_key.items()))
        p = queue.popleft()
        self._count -= 1
        if queue:
            self._by_key.move_to_end(key)
        else:
            del self._by_key[key]
        return p


class MicroBatcher(Generic[T, R]):
    """Groups concurrent :meth:`submit` calls into batches for ``batch_fn``.

    ``batch_fn`` receives up to ``max_batch`` items, at most ``max_per_key`` of one key
    (``None``: no cap), and must return one result per item, in order. It runs in one
    dedicated thread, never on the event loop, one batch at a time. The worker takes the
    first waiting item, then waits at most ``max_wait_ms`` after that item arrived for more
    (while a batch could take more), so a lone request pays at most ``max_wait_ms`` of extra
    latency and a backlog is drained in full batches without waiting.

    Use it as an async context manager: entering starts the worker (in its own task group);
    leaving stops accepting (:class:`ShuttingDown`), finishes everything already queued, then
    returns. ``on_batch(size, seconds)`` is called on the event loop after each batch run,
    ``on_queue_depth(n)`` whenever the number of waiting items changes.
    ``more_coming()``, when given, says whether an item is on its way that could still join
    the batch; once it is ``False`` the worker stops waiting and runs what it has (a lone
    request then pays no wait at all; under load, items that arrive while a batch runs still
    form the next batch).
    Loop-only: call :meth:`submit` from the loop that entered the batcher.
    """

    def __init__(
        self,
        batch_fn: Callable[[Sequence[T]], Sequence[R]],
        *,
        max_batch: int = 8,
        max_per_key: int | None = None,
        max_wait_ms: float = 2.0,
        queue_size: int = 64,
        name: str = "batcher",
        on_batch: Callable[[int, float], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        more_coming: Callable[[], bool] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        if max_per_key is not None and max_per_key < 1:
            raise ValueError(f"max_per_key must be at least 1, got {max_per_key}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must not be negative, got {max_wait_ms}")
        self._batch_fn = batch_fn
        self._max_batch = max_batch
        self._max_per_key = max_per_key
        self._max_wait = max_wait_ms / 1000.0
        self._queue_size = queue_size
        self._name = name
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth
        self._more_coming = more_coming
        self._pending: _FairPending[T, R] = _FairPending()
        self._running: list[_Pending[T, R]] = []
        self._wakeup = asyncio.Event()
        self._state = _State.NEW
        self._stack = contextlib.AsyncExitStack()
        self._executor: ThreadPoolExecutor | None = None
        self._alone = 0  # run_alone jobs submitted and not finished

    def queue_depth(self) -> int:
        """How many items wait for a batch (the running batch not included)."""
        return len(self._pending)

    def idle(self) -> bool:
        """Nothing waits, no batch runs and no :meth:`run_alone` job runs: the thread is free."""
        return not self._pending and not self._running and not self._alone

    async def run_alone(self, job: Callable[[], A]) -> A:
        """Run ``job`` in the batcher's thread at once, for a request that no other joins.

        For a caller that found the batcher :meth:`idle` (with no await in between): a lone
        request then crosses to a thread and back once, rather than through the worker's
        queue. Batches that form meanwhile run after it, in the same thread. Cancelling the
        caller does not stop a job already running; the batcher counts it as busy until it
        ends. Raises :class:`ShuttingDown` once the batcher is closing.
        """
        executor = self._executor
        if self._state is not _State.OPEN or executor is None:
            raise ShuttingDown(f"{self._name} is not accepting work ({self._state.value})")
        loop = asyncio.get_running_loop()
        future = executor.submit(job)
        self._alone += 1
        try:
            return await asyncio.wrap_future(future, loop=loop)
        finally:
            if future.done():
                self._alone -= 1
            else:
                future.add_done_callback(lambda _: _call_soon(loop, self._alone_ended))

    def _alone_ended(self) -> None:
        self._alone -= 1

    async def __aenter__(self) -> Self:
        if self._state is not _State.NEW:
            raise RuntimeError(f"{self._name} can be entered once ({self._state.value})")
        # One thread: batches run one after another, and the model never sees two callers'
        # threads (onnxruntime parallelises inside a run with its own intra-op pool).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        self._stack.callback(self._executor.shutdown, wait=False, cancel_futures=True)
        tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
        tasks.create_task(self._work(self._executor), name=f"{self._name}-worker")
        self._state = _State.OPEN
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._state = _State.CLOSING
        self._wakeup.set()
        try:
            return await self._stack.__aexit__(exc_type, exc, tb)
        finally:
            self._state = _State.CLOSED
            # Only reached with items left when the worker was cancelled (the owner was
            # cancelled or failed): nobody will run them, so tell their callers.
            self._fail_all(ShuttingDown(f"{self._name} stopped"))

    async def submit(self, item: T, *, deadline: float | None = None, key: object = None) -> R:
        """Queue ``item`` for the next batch and wait for its result.

        ``key`` (a device id) is what batches are fair across: see the module docstring.

        ``deadline`` is a :func:`time.monotonic` value: past it the call raises
        :class:`DeadlineExceeded` (a queued item is dropped; a result that arrives later is
        discarded). Raises :class:`Overloaded` at once when the queue is full and
        :class:`ShuttingDown` once the batcher is closing. Whatever ``batch_fn`` raises is
        raised to the callers of that batch only.
        """
        if self._state is not _State.OPEN:
            raise ShuttingDown(f"{self._name} is not accepting work ({self._state.value})")
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded("deadline passed before the request was queued")
        if len(self._pending) >= self._queue_size:
            raise Overloaded(self._queue_size)
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        pending = _Pending(
            item=item,
            deadline=deadline,
            enqueued=now,
            future=future,
            key=key if key is not None else object(),
        )
        self._pending.append(pending)
        self._wakeup.set()
        self._notify(self._on_queue_depth, len(self._pending))
        timeout = None if deadline is None else deadline - now
        try:
            async with asyncio.timeout(timeout):
                # Cancelling this await (caller cancelled, or the timeout) cancels the future,
                # which is how the worker knows to skip the item.
                return await future
        except TimeoutError:
            raise DeadlineExceeded("deadline passed while waiting for inference") from None
        finally:
            if not future.done() or future.cancelled():
                # Free the slot at once rather than when the worker reaches it.
                with contextlib.suppress(ValueError):
                    self._pending.remove(pending)
                    self._notify(self._on_queue_depth, len(self._pending))

    async def _work(self, executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                batch = await self._next_batch()
                if batch is None:
                    return
                self._running = live = self._drop_dead(batch)
                if not live:
                    continue
                call = functools.partial(self._timed_batch, [p.item for p in live])
                try:
                    results, seconds = await loop.run_in_executor(executor, call)
                except Exception as exc:  # noqa: BLE001 - the batch's callers get it, not us
                    self._running = []
                    for p in live:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    continue
                self._running = []
                for p, result in zip(live, results, strict=True):
                    if not p.future.done():
                        p.future.set_result(result)
                self._notify(self._on_batch, len(live), seconds)
        finally:
            # Only with work left when cancelled: its callers must not wait forever.
            self._pending.put_back(self._running)
            self._fail_all(ShuttingDown(f"{self._name} stopped"))

    def _notify(self, hook: Callable[..., None] | None, *args: float) -> None:
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:  # noqa: BLE001 - a metrics bug must not stop inference
            _log.exception("batcher observer failed", batcher=self._name)

    def _timed_batch(self, items: list[T]) -> tuple[Sequence[R], float]:
        started = time.perf_counter()
        results = self._batch_fn(items)
        if len(results) != len(items):
            raise RuntimeError(
                f"{self._name}: batch function returned {len(results)} results "
                f"for {len(items)} items"
            )
        return results, time.perf_counter() - started

    async def _next_batch(self) -> list[_Pending[T, R]] | None:
        """Wait for work; ``None`` once closing with nothing left to do."""
        while not self._pending:
            if self._state is not _State.OPEN:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        # The wait is counted from the first item's arrival: an item that already waited
        # behind a running batch is not made to wait again.
        until = self._pending.oldest() + self._max_wait
        while (
            self._pending.takeable(self._max_per_key) < self._max_batch
            and self._state is _State.OPEN
        ):
            if self._more_coming is not None and not self._more_coming():
                break
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                break
        batch = self._pending.take(self._max_batch, self._max_per_key)
        self._notify(self._on_queue_depth, len(self._pending))
        return batch

    @staticmethod
    def _drop_dead(batch: list[_Pending[T, R]]) -> list[_Pending[T, R]]:
        now = time.monotonic()
        live: list[_Pending[T, R]] = []
        for p in batch:
            if p.future.done():  # the caller was cancelled or timed out
                continue
            if p.deadline is not None and p.deadline <= now:
                p.future.set_exception(DeadlineExceeded("deadline passed before the batch started"))
                continue
            live.append(p)
        return live

    def _fail_all(self, exc: InferenceError) -> None:
        while self._pending:
            p = self._pending.popleft()
            if not p.future.done():
                p.future.set_exception(exc)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    """Schedule ``callback`` on ``loop`` from any thread (nothing to do once it is closed)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)
