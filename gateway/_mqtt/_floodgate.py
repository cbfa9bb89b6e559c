"""Disconnecting a device that floods, before its flood costs the gateway and the others.

The bridge refuses a frame over its device's budget on receipt, but reading it still costs the
broker and the bridge the frame's TLS and parsing, and the broker hands every device's frames
to the bridge first-in-first-out: while one device floods faster than the bridge drains,
other devices' frames wait behind its flood and its CPU. A refusal cannot slow an MQTT
publisher (the broker acknowledges its publications itself, at once), so :class:`FloodGate`
ends the connection instead: once the front door counts a device refused
``disconnect_after_refusals`` frames within one second
(:meth:`~gateway._door.FrontDoor.refused_recently`), the device is told on its events and its
connections are closed through the dynamic security plugin (the revocation enforcer's
:meth:`~gateway._mqtt._enforcer.BrokerControl.kick`; MQTT 5 reason 0x98). A device that honours
retry-after never gets there; one that reconnects and floods again is disconnected again, at
most once per ``cooldown_s``.

The disconnect command is written to the broker within the refusal that crosses the
threshold (:meth:`~gateway._mqtt._enforcer.BrokerControl.kick_now`); only its confirmation is
awaited in a task: until the broker acts, it keeps taking in the flood and queueing it ahead
of other devices' frames. Frames the gateway had already received are answered as ever (on
the device's persistent session, if it has one), except that the bridge refuses those still
waiting for a turn instead of running them; nothing the gateway acknowledged is dropped.
Bounded: at most ``max_devices`` devices remembered. Managed broker only (an external broker
is not ours to manage). Modifying the bridge's own role instead (a deny rule for the device's
topic) would make the plugin disconnect every bridge connection at each change.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

import pki
from gateway._mqtt._tasks import TaskSet

__all__ = ["FloodGate"]

_log = structlog.get_logger(__name__)


class Kicker(Protocol):
    """What the gate needs of :class:`~gateway._mqtt._enforcer.BrokerControl`."""

    def kick_now(self, username: str) -> Awaitable[None]: ...


class FloodGate:
    """Disconnects flooding devices (see the module docstring)."""

    def __init__(
        self,
        control: Kicker,
        *,
        tell: Callable[[str], None],
        cooldown_s: float = 1.0,
        max_devices: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._control = control
        self._tell = tell
        self._cooldown_s = cooldown_s
        self._max_devices = max_devices
        self._clock = clock
        self._last: OrderedDict[str, float] = OrderedDict()  # device id → when last kicked
        self._tasks = TaskSet("mqtt-floodgate")
        #: Devices disconnected so far (exported with the bridge's counters).
        self.disconnected = 0

    def flooding(self, device_id: str) -> bool:
        """``device_id`` is flooding: disconnect it, unless it was moments ago; whether the
        disconnect was sent now."""
        now = self._clock()
        last = self._last.get(device_id)
        if last is not None and now - last < self._cooldown_s:
            return False
        self._last[device_id] = now
        self._last.move_to_end(device_id)
        while len(self._last) > self._max_devices:
            self._last.popitem(last=False)
        # Told first: a persistent session receives the event even as the connection ends.
        self._tell(device_id)
        # The command leaves now, within the refusal that crossed the threshold: every
        # moment until the broker acts lets the broker read more of the flood, and queue
        # it ahead of other devices' frames. Only the confirmation is awaited in a task.
        try:
            confirmed = self._control.kick_now(device_id)
        except (ConnectionError, pki.InvalidName) as exc:
            _log.warning("flooding device not disconnected", device_id=device_id, error=str(exc))
            return False
        self._tasks.spawn(self._confirmed(device_id, confirmed), name="mqtt-floodgate-kick")
        return True

    async def aclose(self) -> None:
        """Stop (kicks under way are cancelled)."""
        await self._tasks.close()

    async def _confirmed(self, device_id: str, confirmed: Awaitable[None]) -> None:
        try:
            await confirmed
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            _log.warning("flooding device not disconnected", device_id=device_id, error=str(exc))
            return
        self.disconnected += 1
        _log.warning("flooding device disconnected", audit=True, device_id=device_id)
