"""Per-device limits and the registry of live calls that a revocation cuts.

- :class:`RateLimiter`: one token bucket per device (``rate`` frames/s, ``burst`` deep). A
  unary ``Detect`` over budget is refused at once (RESOURCE_EXHAUSTED with a retry hint); a
  ``StreamDetect`` waits for its token instead, so a stream is paced to the budget by gRPC
  flow control and never queues more than the one frame it is holding.
- :class:`LiveCalls`: every open call registers here under its device id, at most
  ``max_streams`` streaming calls per device. ``cut(device_id, serial)`` cancels whatever the
  device's calls are waiting on (the next message, the model, the next event); each call then
  ends with PERMISSION_DENIED and ``edgeward-final: revoked`` — within milliseconds of the
  event, well inside the one-second promise.

Both are bounded: idle buckets are dropped (a full bucket carries no information), and a
call removes itself when it ends.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway.errors import DeviceRevoked, RateLimited, TooManyStreams

__all__ = ["LiveCall", "LiveCalls", "RateLimiter"]

T = TypeVar("T")


class RateLimiter:
    """Token buckets per device; ``clock`` is monotonic and injectable."""

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_devices: int = 100_000,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._max_devices = max_devices
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def _refill(self, device_id: str) -> float:
        now = self._clock()
        tokens, at = self._buckets.get(device_id, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        self._buckets[device_id] = (tokens, now)
        self._buckets.move_to_end(device_id)
        if len(self._buckets) > self._max_devices:
            # The least recently seen device: its bucket has refilled by now, or soon will.
            self._buckets.popitem(last=False)
        return tokens

    def try_take(self, device_id: str) -> float:
        """Take one token; return 0.0, or the seconds until one is available (nothing taken)."""
        tokens = self._refill(device_id)
        if tokens >= 1.0:
            self._buckets[device_id] = (tokens - 1.0, self._buckets[device_id][1])
            return 0.0
        return (1.0 - tokens) / self._rate

    def take(self, device_id: str) -> None:
        """Take one token or raise :class:`RateLimited`."""
        wait = self.try_take(device_id)
        if wait > 0.0:
            raise RateLimited(device_id, wait)

    async def wait_take(self, device_id: str) -> None:
        """Take one token, sleeping until there is one."""
        while (wait := self.try_take(device_id)) > 0.0:  # noqa: ASYNC110 - exact refill time
            await asyncio.sleep(wait)


@dataclass(eq=False, slots=True)
class LiveCall:
    """One open call of one device; ``guard`` makes its waits cuttable."""

    device_id: str
    serial: str
    method: str
    streaming: bool
    cut: bool = False
    _waiting: set[asyncio.Future[Any]] = field(default_factory=set)

    async def guard(self, aw: Awaitable[T]) -> T:
        """Await ``aw``; if the device is revoked meanwhile, raise :class:`DeviceRevoked`.

        ``aw`` runs as its own task so that cutting it does not cancel the handler's task
        (gRPC owns that one); the handler's own cancellation still propagates untouched.
        """
        if self.cut:
            raise DeviceRevoked(self.device_id, self.serial)
        task: asyncio.Future[T] = asyncio.ensure_future(aw)
        self._waiting.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self.cut and task.cancelled() and (current is None or not current.cancelling()):
                # Our cut cancelled the inner task, not someone cancelling us: convert.
                raise DeviceRevoked(self.device_id, self.serial) from None
            raise
        finally:
            self._waiting.discard(task)
            if not task.done():
                task.cancel()

    def cancel(self) -> None:
        self.cut = True
        for fut in list(self._waiting):
            fut.cancel()


class LiveCalls:
    """Open calls by device, with a per-device cap on streaming calls."""

    def __init__(self, *, max_streams_per_device: int) -> None:
        self._max_streams = max_streams_per_device
        self._calls: dict[str, set[LiveCall]] = {}

    @contextmanager
    def register(
        self, device_id: str, serial: str, method: str, *, streaming: bool
    ) -> Iterator[LiveCall]:
        calls = self._calls.setdefault(device_id, set())
        if streaming and sum(c.streaming for c in calls) >= self._max_streams:
            if not calls:
                del self._calls[device_id]
            raise TooManyStreams(device_id, self._max_streams)
        call = LiveCall(device_id, serial, method, streaming)
        calls.add(call)
        try:
            yield call
        finally:
            calls.discard(call)
            if not calls:
                self._calls.pop(device_id, None)

    def cut(self, device_id: str, serial: str | None = None) -> int:
        """Cancel the device's live calls (only those on ``serial`` when given); how many."""
        n = 0
        for call in list(self._calls.get(device_id, ())):
            if serial is None or call.serial == serial.lower():
                call.cancel()
                n += 1
        return n

    def count(self, device_id: str | None = None, *, method: str | None = None) -> int:
        calls = (
            self._calls.get(device_id, set())
            if device_id is not None
            else {c for cs in self._calls.values() for c in cs}
        )
        return sum(1 for c in calls if method is None or c.method == method)
