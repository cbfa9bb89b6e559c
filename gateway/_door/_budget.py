"""The per-device budget: one token bucket per device, whichever transport carries the frame.

:class:`RateLimiter` keeps ``burst`` tokens per device, refilled at ``rate`` a second. A unary
``Detect`` (or an MQTT frame) over budget is refused at once, before any of its work queues
(``RateLimited`` with a retry-after); a ``StreamDetect`` waits for its token instead, so a
stream is paced to the budget by gRPC flow control and never queues more than the one frame
it is holding. Bounded: idle buckets are dropped (a full bucket carries no information).

Each bucket also counts the device's refusals since its last admitted frame
(:meth:`RateLimiter.refused_in_row`) and per one-second window
(:meth:`RateLimiter.refused_recently`, which an admitted frame does not reset): more than
``burst`` of either is a flood, not a device a little over budget, and the front door answers
it with back-pressure rather than at once (:meth:`~gateway._door.FrontDoor.hold_refusal`);
the MQTT bridge disconnects a device refused too many frames within a second.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

from gateway.errors import RateLimited

__all__ = ["RateLimiter"]

#: The window of :meth:`RateLimiter.refused_recently`.
_WINDOW_S = 1.0


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
        # tokens, at, refusals since the last token taken, refusals in the window since
        self._buckets: OrderedDict[str, tuple[float, float, int, int, float]] = OrderedDict()

    @property
    def burst(self) -> int:
        """Tokens a full bucket holds."""
        return int(self._burst)

    def try_take(self, device_id: str) -> float:
        """Take one token; return 0.0, or the seconds until one is available (nothing taken)."""
        return self._charge(device_id, take=True)

    def count_refusal(self, device_id: str) -> None:
        """Count a refusal of ``device_id`` made without asking for a token (a device
        penalised for flooding): its flood still shows in :meth:`refused_in_row` and
        :meth:`refused_recently`, and its bucket keeps refilling."""
        self._charge(device_id, take=False)

    def _charge(self, device_id: str, *, take: bool) -> float:
        now = self._clock()
        tokens, at, in_row, recent, since = self._buckets.get(
            device_id, (self._burst, now, 0, 0, now)
        )
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        if take and tokens >= 1.0:
            self._buckets[device_id] = (tokens - 1.0, now, 0, recent, since)
            wait = 0.0
        else:
            if recent == 0 or now - since >= _WINDOW_S:
                recent, since = 0, now  # a window starts at its first refusal
            self._buckets[device_id] = (tokens, now, in_row + 1, recent + 1, since)
            wait = (1.0 - tokens) / self._rate
        self._buckets.move_to_end(device_id)
        if len(self._buckets) > self._max_devices:
            # The least recently seen device: its bucket has refilled by now, or soon will.
            self._buckets.popitem(last=False)
        return wait

    def refused_in_row(self, device_id: str) -> int:
        """Refusals of ``device_id`` since it last took a token."""
        bucket = self._buckets.get(device_id)
        return 0 if bucket is None else bucket[2]

    def refused_recently(self, device_id: str) -> int:
        """Refusals of ``device_id`` in its current one-second window (a rate, unlike
        :meth:`refused_in_row`, which the budget's refill resets)."""
        bucket = self._buckets.get(device_id)
        if bucket is None or self._clock() - bucket[4] >= _WINDOW_S:
            return 0
        return bucket[3]

    def take(self, device_id: str) -> None:
        """Take one token or raise :class:`RateLimited`."""
        wait = self.try_take(device_id)
        if wait > 0.0:
            raise RateLimited(device_id, wait)

    async def wait_take(self, device_id: str) -> None:
        """Take one token, sleeping until there is one."""
        while (wait := self.try_take(device_id)) > 0.0:  # noqa: ASYNC110 - exact refill time
            await asyncio.sleep(wait)
