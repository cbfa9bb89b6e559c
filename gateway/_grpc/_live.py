"""The registry of live gRPC calls that a revocation cuts.

- :class:`LiveCalls`: every open call registers here under its device id, at most
  ``max_streams`` streaming calls per device. ``cut(device_id, serial)`` cancels whatever the
  device's calls are waiting on (the next message, the model, the next event); each call then
  ends with PERMISSION_DENIED and ``edgeward-final: revoked`` — within milliseconds of the
  event, well inside the one-second promise.

Bounded: a call removes itself when it ends. The per-device frame budget is the front
door's (:mod:`gateway._door._budget`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway.errors import DeviceRevoked, TooManyStreams

__all__ = ["LiveCall", "LiveCalls"]

T = TypeVar("T")


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
