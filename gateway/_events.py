"""Events for one device (escalation answers, commands, errors): stored briefly, streamed live.

:class:`EventHub` is the seam between what produces events (the escalation outbox, the MQTT
bridge reporting a rejected message, an operator command) and what delivers them (gRPC
``Subscribe``, the MQTT bridge's ``devices/<id>/events``).

- ``publish(device_id, payload)`` stores the event and wakes the device's subscribers; the
  hub assigns the event id, so ids are unique and ordered within one gateway process.
- ``subscribe(device_id, after_event_id)`` replays the stored events after that id (all of
  them when the id is empty or from an earlier process), then yields live ones.
- Memory is bounded: at most ``max_per_device`` events per device (oldest dropped), each kept
  ``ttl_s`` seconds, and at most ``max_devices`` devices with stored events (the device whose
  newest event is oldest goes first). A slow subscriber skips what was dropped rather than
  holding it in memory.

There is no way to ask for another device's events: ``subscribe`` takes the device id the
caller proved with its certificate (``Subscribe`` carries no device field).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "AnsweredObject",
    "Command",
    "DeviceEvent",
    "ErrorEvent",
    "EscalationAnswer",
    "EscalationId",
    "EventHub",
    "EventPayload",
]


class EscalationId(str):
    """An escalation id that also says why the detection was escalated.

    A ``str`` (it is stored, compared and sent as the id), with ``reason``:
    ``uncertain``, ``outside_edge_set`` or ``empty_frame``, which the device sees on the
    detection (``Detection.escalation_reason``).
    """

    reason: str

    def __new__(cls, value: str, reason: str = "") -> EscalationId:
        obj = super().__new__(cls, value)
        obj.reason = reason
        return obj


@dataclass(frozen=True, slots=True)
class AnsweredObject:
    """One object the core is confident about; ``box`` relative to what was escalated."""

    label: str
    score: float
    box: tuple[float, float, float, float]


@dataclass(frozen=True, slots=True)
class EscalationAnswer:
    """The core's final answer for an escalated detection."""

    escalation_id: str
    frame_id: str
    label: str
    score: float
    model_name: str
    still_unknown: bool = False
    edge_label: str = ""
    edge_score: float = 0.0
    #: Every confident object, most probable first (empty when ``still_unknown``).
    objects: tuple[AnsweredObject, ...] = ()
    #: Why it was escalated: ``uncertain``, ``outside_edge_set`` or ``empty_frame``.
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Command:
    """An operator command for the device."""

    name: str
    arguments: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """An error about a message the device sent (``code`` is a gRPC status name)."""

    code: str
    message: str
    frame_id: str = ""


EventPayload = EscalationAnswer | Command | ErrorEvent


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """One event for one device, as stored and delivered."""

    event_id: str
    at: dt.datetime
    payload: EventPayload


@dataclass(slots=True)
class _Slot:
    events: deque[tuple[int, float, DeviceEvent]]
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    subscribers: int = 0


EventListener = Callable[[str, DeviceEvent], None]


class EventHub:
    """Bounded, per-device store of recent events with live fan-out. Event-loop only."""

    def __init__(
        self,
        *,
        max_per_device: int = 64,
        ttl_s: float = 3600.0,
        max_devices: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        if max_per_device < 1 or ttl_s <= 0 or max_devices < 1:
            raise ValueError("max_per_device, ttl_s and max_devices must be positive")
        self._max_per_device = max_per_device
        self._ttl_s = ttl_s
        self._max_devices = max_devices
        self._clock = clock
        self._wall_clock = wall_clock
        # Ids are "<boot>-<n>": n orders events within this process; an id from another
        # process (another boot) means "I have seen nothing of yours", so all is replayed.
        self._boot = secrets.token_hex(4)
        self._counter = 0
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._listeners: list[EventListener] = []

    def add_listener(self, cb: EventListener) -> None:
        """``cb(device_id, event)`` on every publish (e.g. the MQTT bridge). Must not block."""
        self._listeners.append(cb)

    def publish(self, device_id: str, payload: EventPayload | DeviceEvent) -> DeviceEvent:
        """Store an event for ``device_id`` and wake its subscribers; returns it with its id."""
        if isinstance(payload, DeviceEvent):
            payload = payload.payload
        self._counter += 1
        event = DeviceEvent(
            event_id=f"{self._boot}-{self._counter}", at=self._wall_clock(), payload=payload
        )
        slot = self._slots.get(device_id)
        if slot is None:
            slot = _Slot(events=deque(maxlen=self._max_per_device))
            self._slots[device_id] = slot
            self._evict_devices()
        self._slots.move_to_end(device_id)
        slot.events.append((self._counter, self._clock(), event))
        slot.wake.set()
        slot.wake = asyncio.Event()
        for cb in list(self._listeners):
            cb(device_id, event)
        return event

    def stored(self, device_id: str) -> list[DeviceEvent]:
        """Events currently stored for ``device_id`` (expired ones dropped)."""
        slot = self._slots.get(device_id)
        if slot is None:
            return []
        self._expire(slot)
        return [event for _, _, event in slot.events]

    def _parse(self, after_event_id: str) -> int:
        boot, sep, n = after_event_id.rpartition("-")
        if not sep or boot != self._boot or not n.isdigit():
            return 0
        return int(n)

    def _expire(self, slot: _Slot) -> None:
        horizon = self._clock() - self._ttl_s
        while slot.events and slot.events[0][1] < horizon:
            slot.events.popleft()

    def _evict_devices(self) -> None:
        while len(self._slots) > self._max_devices:
            victim = next((d for d, s in self._slots.items() if s.subscribers == 0), None)
            if victim is None:
                return
            del self._slots[victim]

    async def subscribe(
        self, device_id: str, after_event_id: str = ""
    ) -> AsyncGenerator[DeviceEvent, None]:
        """Stored events after ``after_event_id``, then live ones, until the caller stops."""
        last = self._parse(after_event_id)
        slot = self._slots.get(device_id)
        if slot is None:
            slot = _Slot(events=deque(maxlen=self._max_per_device))
            self._slots[device_id] = slot
            self._evict_devices()
        slot.subscribers += 1
        try:
            while True:
                wake = slot.wake
                self._expire(slot)
                pending = [(n, e) for n, _, e in slot.events if n > last]
                for n, event in pending:
                    last = n
                    yield event
                if not pending:
                    await wake.wait()
        finally:
            slot.subscribers -= 1
