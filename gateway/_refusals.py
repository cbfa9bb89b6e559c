"""Refused messages, logged per device in bounded amounts: one device cannot flood the log.

Every message a gateway refuses (rate limited, not authorised, malformed, from a revoked
device…), on gRPC or MQTT, is reported here with the device id (``None`` when the peer has
no usable device identity) and a short, stable reason (``rate_limited``, ``invalid_image``).
:class:`RefusalLog` turns them into audit lines:

* the first refusal of a (device, reason) is logged at once: ``message refused``, with the
  caller's fields (method, transport, detail) and ``count=1``;
* after that, the device's refusals are counted, and at most one line per device per
  ``interval_s`` says how many there were since its last line, by reason:
  ``messages refused`` with ``counts={"rate_limited": 4211}`` and ``total``. A device that
  stops being refused gets its last line when its interval ends (a timer on the event loop)
  or when the log is closed, so the counts in the lines add up to every refusal;
* at most ``max_devices`` devices are tracked: the one tracked longest is reported (its
  pending counts logged) and forgotten to make room, so memory is bounded too.

A device flooding with refused messages therefore costs at most (its distinct reasons + 1)
lines per interval, whatever it sends. Counting for metrics is not done here: Prometheus
counts every refusal exactly, where it is refused.

**Error events.** The MQTT side tells a device about a refused message on
``devices/<id>/events``. :meth:`RefusalLog.allow_event` bounds those too: at most
``events_per_interval`` per device per interval; the rest are counted, and the device gets
one more event when the interval ends saying how many were not reported (through the
``on_suppressed`` callback), so a flooding device learns the count, not each refusal.

Event-loop only (no lock): both transports call it from the gateway's loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

__all__ = ["RefusalLog", "SuppressedEvents"]

_log = structlog.get_logger("gateway.refusals")

#: ``on_suppressed(device_id, count, last_code)``: error events not sent in the interval.
SuppressedEvents = Callable[[str, int, str], None]

#: How the log names a peer without a usable device identity.
_NO_DEVICE = ""


@dataclass(slots=True)
class _Device:
    """What is known of one device's refusals since its current interval started."""

    started: float
    seen: set[str] = field(default_factory=set)  # reasons already logged at once
    pending: Counter[str] = field(default_factory=Counter)  # refusals not yet in a line
    events: int = 0  # error events allowed in this interval
    suppressed: int = 0  # error events held back in this interval
    last_code: str = ""


class RefusalLog:
    """Aggregates refusals per device (see the module docstring).

    ``clock`` is monotonic and injectable; the end-of-interval timer needs a running loop
    (without one, lines wait for the next refusal, :meth:`flush` or :meth:`close`).
    """

    def __init__(
        self,
        *,
        interval_s: float = 10.0,
        events_per_interval: int = 5,
        max_devices: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        logger: Any = None,
    ) -> None:
        if interval_s <= 0 or events_per_interval < 0 or max_devices < 1:
            raise ValueError("interval_s and max_devices must be positive")
        self.interval_s = interval_s
        self.events_per_interval = events_per_interval
        self._max_devices = max_devices
        self._clock = clock
        self._log = logger if logger is not None else _log
        # Ordered by interval start: the front is the first whose interval ends.
        self._devices: OrderedDict[str, _Device] = OrderedDict()
        self._timer: asyncio.TimerHandle | None = None
        self.on_suppressed: SuppressedEvents | None = None

    def __len__(self) -> int:
        return len(self._devices)

    def refused(self, device_id: str | None, reason: str, *, times: int = 1, **fields: Any) -> None:
        """Record ``times`` refusals of ``device_id`` for ``reason`` (more than one: counted
        elsewhere, the broker's ingest limit); log the first now, count the rest."""
        if times < 1:
            return
        now = self._clock()
        self._roll(now)
        key = device_id or _NO_DEVICE
        state = self._state(key, now)
        if reason not in state.seen:
            state.seen.add(reason)
            self._log.warning(
                "message refused",
                audit=True,
                device_id=device_id,
                reason=reason,
                count=1,
                **fields,
            )
            times -= 1
        if times:
            state.pending[reason] += times
        self._arm()

    def allow_event(self, device_id: str, code: str) -> int | None:
        """May an error event about a refused message go to ``device_id`` now?

        ``None``: no (it is counted and reported when the interval ends). Otherwise the
        number of events held back before this one (0 normally), for the event's text.
        """
        now = self._clock()
        self._roll(now)
        state = self._state(device_id, now)
        state.last_code = code
        if state.events >= self.events_per_interval:
            state.suppressed += 1
            self._arm()
            return None
        state.events += 1
        held, state.suppressed = state.suppressed, 0
        return held

    def flush(self) -> None:
        """Log every pending count and report held-back events now (interval or not)."""
        for key in list(self._devices):
            self._report(key, self._devices.pop(key))

    def close(self) -> None:
        """Cancel the timer and flush (the gateway is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()

    # -- internals --------------------------------------------------------------------------

    def _state(self, key: str, now: float) -> _Device:
        state = self._devices.get(key)
        if state is None:
            state = _Device(started=now)
            self._devices[key] = state
            while len(self._devices) > self._max_devices:
                oldest, evicted = self._devices.popitem(last=False)
                self._report(oldest, evicted)
        return state

    def _roll(self, now: float) -> None:
        """End the intervals that are over: report them and forget those devices."""
        while self._devices:
            key, state = next(iter(self._devices.items()))
            if now < state.started + self.interval_s:
                return
            del self._devices[key]
            self._report(key, state)

    def _report(self, key: str, state: _Device) -> None:
        total = sum(state.pending.values())
        if total:
            self._log.warning(
                "messages refused",
                audit=True,
                device_id=key or None,
                counts=dict(state.pending),
                total=total,
                interval_s=self.interval_s,
            )
        if state.suppressed and key and self.on_suppressed is not None:
            self.on_suppressed(key, state.suppressed, state.last_code)

    def _arm(self) -> None:
        """Make sure a timer ends the first open interval (the last counts get their line)."""
        if self._timer is not None or not self._devices:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        first = next(iter(self._devices.values()))
        delay = max(0.0, first.started + self.interval_s - self._clock())
        self._timer = loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._roll(self._clock())
        if any(s.pending or s.suppressed for s in self._devices.values()):
            self._arm()
