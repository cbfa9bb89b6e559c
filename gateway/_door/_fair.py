"""Turns into the inference engine, given to devices in round robin.

A device that floods the gateway must not hold up the others: its frames over budget are
refused before they queue (:mod:`gateway._door._budget`), and what it may send still waits its
turn here. :class:`FairQueue` lets ``slots`` frames into the engine at once; the rest wait in
one queue *per device*, and each freed slot goes to the next device in turn (round robin over
devices with waiting work, each device's own frames in arrival order). A device with one frame
waiting is therefore served after at most one frame of every other waiting device, however
many those have queued, and the micro-batcher behind it keeps the same order
(:class:`~gateway._inference._batcher.MicroBatcher` batches round robin by device too).

Bounded: at most ``max_waiting`` frames wait in all; one more is refused at once with
:class:`~gateway.errors.Overloaded` (retry later) rather than growing the queue.
Event-loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator

from gateway._inference import Overloaded

__all__ = ["FairQueue"]


class FairQueue:
    """``slots`` concurrent turns, handed out round robin across devices."""

    def __init__(self, *, slots: int, max_waiting: int) -> None:
        if slots < 1 or max_waiting < 0:
            raise ValueError("slots must be at least 1 and max_waiting not negative")
        self._slots = slots
        self._max_waiting = max_waiting
        self._busy = 0
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self._count = 0

    @property
    def busy(self) -> int:
        """Turns being used now."""
        return self._busy

    def waiting(self, device_id: str | None = None) -> int:
        """Frames waiting for a turn (of ``device_id`` only, when given)."""
        if device_id is None:
            return self._count
        return len(self._waiting.get(device_id, ()))

    @contextlib.asynccontextmanager
    async def turn(self, device_id: str) -> AsyncIterator[None]:
        """Wait for ``device_id``'s turn, hold it for the block, then pass it on."""
        await self.acquire(device_id)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, device_id: str) -> None:
        """Wait for ``device_id``'s turn (``Overloaded`` at once when too many wait); pair
        with :meth:`release`. Cancelled while waiting, it leaves no trace."""
        if self._busy < self._slots and not self._count:
            self._busy += 1
            return
        if self._count >= self._max_waiting:
            raise Overloaded(self._max_waiting)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiting.get(device_id)
        if queue is None:
            # A device that had nothing waiting joins at the end of the round.
            queue = self._waiting[device_id] = deque()
        queue.append(fut)
        self._count += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Granted and cancelled in the same step: pass the turn on.
                self.release()
            else:
                self._forget(device_id, fut)
            raise

    def _forget(self, device_id: str, fut: asyncio.Future[None]) -> None:
        queue = self._waiting.get(device_id)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(fut)
            self._count -= 1
        if not queue:
            del self._waiting[device_id]

    def release(self) -> None:
        """Give the turn back: to the next device in the round, or free."""
        while self._waiting:
            device_id, queue = next(iter(self._waiting.items()))
            fut = queue.popleft()
            self._count -= 1
            if queue:
                self._waiting.move_to_end(device_id)  # its next frame waits a whole round
            else:
                del self._waiting[device_id]
            if not fut.done():
                fut.set_result(None)  # the turn passes to it: busy unchanged
                return
        self._busy -= 1
