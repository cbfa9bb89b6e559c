"""Turns into the inference engine, given to devices in round robin.

A device that floods the gateway must not hold up the others: its frames over budget are
refused before they queue (:mod:`gateway._door._budget`), and what it may send still waits its
turn here. :class:`FairQueue` lets ``slots`` frames into the engine at once, at most
``per_device`` of them from one device; the rest wait in one queue *per device*, and each
freed slot goes to the next device in turn that is under its cap (round robin over devices
with waiting work, each device's own frames in arrival order).

So one device never fills the engine: with ``per_device`` 1 a device's frames go through one
after another while every other device finds a slot free (at most ``slots - 1`` other devices
busy), and the micro-batcher behind it never holds more than one frame of a device in a batch
(:class:`~gateway._inference._batcher.MicroBatcher` caps frames per device per batch too). A
newcomer's frame therefore waits for at most the model run in progress, not for a backlog.

A device alone may hold ``per_device`` turns (two: its next frame decodes while the model runs
its last), but only while it *is* alone: while another device holds or waits for a turn, or
took one within the last ``recent_s`` seconds, each device holds at most ``shared_per_device``
(one). A device that sends now and then counts as present between its frames, so a flood never
has a second frame in the engine when the other device's next frame arrives: that frame waits
for the one run in progress, not for two (the flood's second frame would otherwise run in the
same batch as it, or before it).

Bounded: at most ``max_waiting`` frames wait in all, and at most ``max_waiting_per_device``
of one device; one more is refused at once with :class:`~gateway.errors.Overloaded` (retry
later) rather than growing the queue. The per-device bound also bounds how long an admitted
frame waits (a few turns), which MQTT needs: the bridge acknowledges frames in the order they
arrived, so one long-waiting frame would hold back the acknowledgements behind it.
Event-loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable

from gateway._inference import Overloaded

__all__ = ["FairQueue"]


class FairQueue:
    """``slots`` concurrent turns, at most ``per_device`` per device (``shared_per_device``
    while other devices are present), handed out round robin across devices."""

    #: Devices remembered as recently present at most (the oldest are forgotten first).
    MAX_RECENT = 100_000

    def __init__(
        self,
        *,
        slots: int,
        max_waiting: int,
        per_device: int = 1,
        max_waiting_per_device: int | None = None,
        shared_per_device: int = 1,
        recent_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slots < 1 or per_device < 1 or shared_per_device < 1 or max_waiting < 0:
            raise ValueError(
                "slots, per_device and shared_per_device must be at least 1, "
                "max_waiting not negative"
            )
        if max_waiting_per_device is not None and max_waiting_per_device < 0:
            raise ValueError("max_waiting_per_device must not be negative")
        if recent_s < 0:
            raise ValueError("recent_s must not be negative")
        self._slots = slots
        self._per_device = per_device
        self._shared_per_device = min(shared_per_device, per_device)
        self._recent_s = recent_s
        self._clock = clock
        # When each device last took a turn, oldest first (only within recent_s).
        self._recent: OrderedDict[str, float] = OrderedDict()
        self._max_waiting = max_waiting
        self._max_waiting_per_device = (
            max_waiting if max_waiting_per_device is None else max_waiting_per_device
        )
        self._busy = 0
        self._held: dict[str, int] = {}  # turns held per device (only devices holding any)
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self._count = 0

    @property
    def busy(self) -> int:
        """Turns being used now."""
        return self._busy

    def held(self, device_id: str) -> int:
        """Turns ``device_id`` holds now (at most ``per_device``)."""
        return self._held.get(device_id, 0)

    def cap(self, device_id: str) -> int:
        """Turns ``device_id`` may hold now: ``per_device`` while it is alone,
        ``shared_per_device`` while another device holds or waits for a turn or took one
        within ``recent_s``."""
        if self._shared_per_device == self._per_device:
            return self._per_device
        return self._shared_per_device if self._others_present(device_id) else self._per_device

    def _others_present(self, device_id: str) -> bool:
        if len(self._held) > (device_id in self._held):
            return True
        if len(self._waiting) > (device_id in self._waiting):
            return True
        horizon = self._clock() - self._recent_s
        recent = self._recent
        while recent and next(iter(recent.values())) < horizon:
            recent.popitem(last=False)
        return len(recent) > (device_id in recent)

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
            self.release(device_id)

    async def acquire(self, device_id: str) -> None:
        """Wait for ``device_id``'s turn (``Overloaded`` at once when too many wait); pair
        with :meth:`release`. Cancelled while waiting, it leaves no trace."""
        # Whoever waits is at its device's cap, or every slot is busy (``_grant`` keeps it
        # so): a device under its cap that finds a free slot goes ahead of no one.
        if (
            self._busy < self._slots
            and device_id not in self._waiting
            and self.held(device_id) < self.cap(device_id)
        ):
            self._take(device_id)
            return
        if self._count >= self._max_waiting:
            raise Overloaded(self._max_waiting)
        if self.waiting(device_id) >= self._max_waiting_per_device:
            raise Overloaded(self._max_waiting_per_device)
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
                self.release(device_id)
            else:
                self._forget(device_id, fut)
            raise

    def release(self, device_id: str) -> None:
        """Give ``device_id``'s turn back: to the next device in the round, or free."""
        held = self._held.get(device_id, 0)
        if held <= 0:
            raise RuntimeError(f"{device_id!r} holds no turn")
        if held == 1:
            del self._held[device_id]
        else:
            self._held[device_id] = held - 1
        self._busy -= 1
        self._grant()

    def _take(self, device_id: str) -> None:
        self._busy += 1
        self._held[device_id] = self._held.get(device_id, 0) + 1
        self._recent[device_id] = self._clock()
        self._recent.move_to_end(device_id)
        if len(self._recent) > self.MAX_RECENT:
            self._recent.popitem(last=False)

    def _grant(self) -> None:
        """Hand free slots to waiting devices under their cap, in the round's order."""
        while self._busy < self._slots:
            for device_id in self._waiting:
                if self.held(device_id) < self.cap(device_id):
                    break
            else:
                return  # nobody waiting, or every waiting device at its cap
            queue = self._waiting[device_id]
            fut = queue.popleft()
            self._count -= 1
            if queue:
                self._waiting.move_to_end(device_id)  # its next frame waits a whole round
            else:
                del self._waiting[device_id]
            if not fut.done():
                self._take(device_id)
                fut.set_result(None)  # the turn passes to it

    def refuse_waiting(self, device_id: str, refusal: Callable[[], BaseException]) -> int:
        """Refuse ``device_id``'s frames still waiting for a turn: each waiter's
        :meth:`acquire` raises ``refusal()`` (its own instance); how many. Turns held are
        not touched (a run in progress finishes). For a device cut off for flooding: what
        it was admitted still gets an answer, a refusal, but no model run that would make
        every other device's next frame wait behind it."""
        queue = self._waiting.pop(device_id, None)
        if queue is None:
            return 0
        self._count -= len(queue)
        refused = 0
        for fut in queue:
            if not fut.done():
                fut.set_exception(refusal())
                refused += 1
        return refused

    def _forget(self, device_id: str, fut: asyncio.Future[None]) -> None:
        queue = self._waiting.get(device_id)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(fut)
            self._count -= 1
        if not queue:
            del self._waiting[device_id]
