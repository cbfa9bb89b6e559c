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
from collections.abc import Awaitable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway.errors import DeviceRevoked, TooManyStreams

__all__ = ["LiveCall", "LiveCalls"]

T = TypeVar("T")


class _Waiter:
    """A task inside :meth:`LiveCall.guard`: its cancel count on entry, and whether the cut
    cancelled it."""

    __slots__ = ("cancelled", "entry")

    def __init__(self, entry: int) -> None:
        self.entry = entry
        self.cancelled = False


@dataclass(eq=False, slots=True)
class LiveCall:
    """One open call of one device; ``guard`` makes its waits cuttable."""

    device_id: str
    serial: str
    method: str
    streaming: bool
    cut: bool = False
    _waiting: dict[asyncio.Task[Any], _Waiter] = field(default_factory=dict)

    async def guard(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` in the calling task; if the device is revoked meanwhile, raise
        :class:`DeviceRevoked`.

        A cut cancels the calling task while it waits here, and the cancellation is taken
        back (``Task.uncancel``, as :func:`asyncio.timeout` does) and turned into
        :class:`DeviceRevoked` when it was the cut's alone. A cancellation of the task by
        anyone else (gRPC ending the call, shutdown) propagates untouched, even when it comes
        together with a cut. No task is created per wait: a stream frame costs no extra
        rounds of the event loop.
        """
        if self.cut:
            _close(aw)
            raise DeviceRevoked(self.device_id, self.serial)
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("LiveCall.guard needs a running task")
        if task in self._waiting:  # nested in a guard of this call: the outer one cuts
            return await aw
        waiter = self._waiting[task] = _Waiter(task.cancelling())
        try:
            result = await aw
        except asyncio.CancelledError:
            if waiter.cancelled and task.uncancel() <= waiter.entry:
                # Our cut cancelled the task, and nobody else did: convert.
                raise DeviceRevoked(self.device_id, self.serial) from None
            raise
        except BaseException as exc:
            if waiter.cancelled:  # the cut's cancellation was swallowed on the way
                task.uncancel()
                if isinstance(exc, Exception):  # not GeneratorExit: a closing stream closes
                    raise DeviceRevoked(self.device_id, self.serial) from None
            raise
        finally:
            del self._waiting[task]
        if waiter.cancelled:  # cut after ``aw`` finished, before this task resumed
            task.uncancel()
            raise DeviceRevoked(self.device_id, self.serial)
        return result

    def cancel(self) -> None:
        self.cut = True
        current = asyncio.current_task()
        for task, waiter in self._waiting.items():
            # A task cutting its own call is not waiting: its guard sees ``cut`` next time.
            if task is not current and not waiter.cancelled:
                waiter.cancelled = True
                task.cancel()


def _close(aw: Awaitable[Any]) -> None:
    """Close a coroutine that will not be awaited (no "never awaited" warning)."""
    if isinstance(aw, Coroutine):
        aw.close()


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
