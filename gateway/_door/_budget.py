"""The per-device budget: one token bucket per device, whichever transport carries the frame.

:class:`RateLimiter` keeps ``burst`` tokens per device, refilled at ``rate`` a second. A unary
``Detect`` (or an MQTT frame) over budget is refused at once, before any of its work queues
(``RateLimited`` with a retry-after); a ``StreamDetect`` waits for its token instead, so a
stream is paced to the budget by gRPC flow control and never queues more than the one frame
it is holding. Bounded: idle buckets are dropped (a full bucket carries no information).

Each bucket also counts the device's refusals since its last admitted frame
(:meth:`RateLimiter.refused_in_row`): more than ``burst`` of them in a row is a flood, not a
device a little over budget, and the front door answers it with back-pressure rather than at
once (:meth:`~gateway._door.FrontDoor.hold_refusal`).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

from gateway.errors import RateLimited

__all__ = ["RateLimiter"]


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
        # tokens, at, refusals since the last token taken
        self._buckets: OrderedDict[str, tuple[float, float, int]] = OrderedDict()

    @property
    def burst(self) -> int:
        """Tokens a full bucket holds."""
        return int(self._burst)

    def try_take(self, device_id: str) -> float:
        """Take one token; return 0.0, or the seconds until one is available (nothing taken)."""
        now = self._clock()
        tokens, at, refused = self._buckets.get(device_id, (self._burst, now, 0))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        if tokens >= 1.0:
            self._buckets[device_id] = (tokens - 1.0, now, 0)
            wait = 0.0
        else:
            self._buckets[device_id] = (tokens, now, refused + 1)
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

    def take(self, device_id: str) -> None:
        """Take one token or raise :class:`RateLimited`."""
        wait = self.try_take(device_id)
        if wait > 0.0:
            raise RateLimited(device_id, wait)

    async def wait_take(self, device_id: str) -> None:
        """Take one token, sleeping until there is one."""
        while (wait := self.try_take(device_id)) > 0.0:  # noqa: ASYNC110 - exact refill time
            await asyncio.sleep(wait)
