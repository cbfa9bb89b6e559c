"""The gateway's revocation state and the feeds that keep it current.

Python gRPC has no CRL option, so the gateway checks revocation itself, from the peer
certificate, on every call and on every message of a stream (``reference/anchors.md``). The
state it checks against is :class:`RevocationState`:

- ``is_revoked(device_id, serial)``: the device, or that certificate serial, is revoked;
- ``healthy()``: an event or heartbeat arrived within ``max_staleness_s``. When it is false
  the gateway refuses *new* sessions (``FeedStale`` → UNAVAILABLE) rather than trust a list
  that may be missing a revocation; calls already open continue until an event says
  otherwise (cutting every device because the core blinked would be a self-inflicted outage);
- ``add_listener(cb)``: ``cb(event)`` runs on every revocation event (the gRPC layer cancels
  the device's live calls, the MQTT bridge kicks its session). Sync or async callbacks.
- ``operator_revoked(name)`` and ``add_operator_listener(cb)``: console operators revoked at
  the core (events with ``role == "operator"``); the gateway's console ends their sessions
  and refuses their logins. Device listeners never hear of them.

Two feeds fill it, each an async context manager owning one background task:

- :class:`CoreRevocationFeed`: the core's ``Core.WatchRevocations`` stream over mutual TLS
  with the gateway's own identity. After a disconnect it resumes from the last sequence seen,
  on the next of the gateway's cores, with jittered exponential backoff (so a core restart is
  not met by every gateway at once).
  Heartbeats (``heartbeat=true``, no device) keep the state fresh; one whose sequence is beyond
  the last event seen means gateway or core certificates were revoked (the feed does not carry
  those): listeners hear of it (:meth:`RevocationState.advance`) and the broker fetches the
  CRLs that list them.
- :class:`RegistryRevocationPoller`: standalone gateways poll the PKI registry
  (``Registry.revocations_since``, sequence-ordered) every ``interval_s``. Each successful
  poll counts as a heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self

import grpc
import structlog

import pki
from gateway._core_endpoints import CoreEndpoints
from protos.edgeward.v1 import core_pb2, core_pb2_grpc

__all__ = [
    "OPERATOR_ROLE",
    "CoreRevocationFeed",
    "RegistryRevocationPoller",
    "RevocationEvent",
    "RevocationListener",
    "RevocationReader",
    "RevocationState",
    "registry_revocation_reader",
]

_log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RevocationEvent:
    """One revocation: a whole device (``serial is None``) or one of its certificates."""

    sequence: int
    device_id: str
    serial: str | None
    reason: str
    #: "" for a device; "operator" for a console operator (``device_id`` is its name).
    role: str = ""


#: The ``role`` of an operator's revocation event.
OPERATOR_ROLE = "operator"

RevocationListener = Callable[[RevocationEvent], Awaitable[None] | None]


class RevocationState:
    """What the gateway knows is revoked, and whether that knowledge is fresh.

    ``clock`` is a monotonic clock (injected so staleness is testable without sleeping).
    A new state is *not* healthy until its feed delivers something: a gateway that never
    heard from its feed does not know what is revoked.
    """

    def __init__(
        self, *, max_staleness_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_staleness_s <= 0:
            raise ValueError("max_staleness_s must be positive")
        self._max_staleness_s = max_staleness_s
        self._clock = clock
        self._devices: dict[str, RevocationEvent] = {}
        self._serials: dict[str, RevocationEvent] = {}
        self._last_sequence = 0
        self._fresh_at: float | None = None
        self._listeners: list[RevocationListener] = []
        self._operators: dict[str, RevocationEvent] = {}
        self._operator_listeners: list[RevocationListener] = []
        self._fresh = asyncio.Event()

    # -- queries ----------------------------------------------------------------------------

    def is_revoked(self, device_id: str, serial: str) -> bool:
        """True when the device, or this certificate serial (lower-case hex), is revoked."""
        return device_id in self._devices or serial.lower() in self._serials

    def operator_revoked(self, name: str) -> bool:
        """True when console operator ``name`` is revoked (any certificate of it, too)."""
        return name in self._operators

    def healthy(self) -> bool:
        """True while the feed delivered an event or heartbeat within the bound."""
        return self._fresh_at is not None and (
            self._clock() - self._fresh_at <= self._max_staleness_s
        )

    def stale_for(self) -> float:
        """Seconds since the feed was last heard from (``inf`` if never)."""
        if self._fresh_at is None:
            return float("inf")
        return max(0.0, self._clock() - self._fresh_at)

    @property
    def last_sequence(self) -> int:
        """Highest revocation sequence applied (0 before any)."""
        return self._last_sequence

    @property
    def revoked_count(self) -> int:
        return len(self._devices) + len(self._serials)

    async def wait_fresh(self) -> None:
        """Return once the feed has delivered anything at all."""
        await self._fresh.wait()

    # -- updates ----------------------------------------------------------------------------

    def add_listener(self, cb: RevocationListener) -> None:
        """Call ``cb(event)`` for each new revocation event (after the state is updated)."""
        self._listeners.append(cb)

    def remove_listener(self, cb: RevocationListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(cb)

    def add_operator_listener(self, cb: RevocationListener) -> None:
        """Call ``cb(event)`` for each new revocation of a console operator."""
        self._operator_listeners.append(cb)

    def remove_operator_listener(self, cb: RevocationListener) -> None:
        with contextlib.suppress(ValueError):
            self._operator_listeners.remove(cb)

    def mark_fresh(self) -> None:
        """The feed is alive (a heartbeat, a successful poll)."""
        self._fresh_at = self._clock()
        self._fresh.set()

    async def advance(self, sequence: int) -> bool:
        """The feed passed revocations it does not carry (gateways', cores') up to ``sequence``.

        Listeners get an event without a device (``device_id`` ""), so that CRL holders
        refresh; False when ``sequence`` brings nothing new.
        """
        self.mark_fresh()
        if sequence <= self._last_sequence:
            return False
        self._last_sequence = sequence
        _log.info("server certificate revocations seen", sequence=sequence)
        await self._notify(
            RevocationEvent(
                sequence=sequence,
                device_id="",
                serial=None,
                reason="gateway or core certificate revoked",
            )
        )
        return True

    async def _notify(self, event: RevocationEvent) -> None:
        listeners = self._operator_listeners if event.role == OPERATOR_ROLE else self._listeners
        for cb in list(listeners):
            try:
                result = cb(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - isolate listeners from each other
                # One broken listener must not keep the others from cutting the device.
                _log.exception("revocation listener failed", device_id=event.device_id)

    async def apply(self, event: RevocationEvent) -> bool:
        """Record ``event`` and notify listeners; False if it was already applied."""
        self.mark_fresh()
        if event.sequence and event.sequence <= self._last_sequence:
            return False  # a replay after a resume: already known
        self._last_sequence = max(self._last_sequence, event.sequence)
        if event.role == OPERATOR_ROLE:
            self._operators.setdefault(event.device_id, event)
            _log.warning(
                "operator revocation applied",
                audit=True,
                operator=event.device_id,
                serial=event.serial,
                sequence=event.sequence,
                reason=event.reason,
            )
            await self._notify(event)
            return True
        if event.serial:
            self._serials[event.serial.lower()] = event
        else:
            self._devices[event.device_id] = event
        _log.warning(
            "revocation applied",
            audit=True,
            device_id=event.device_id,
            serial=event.serial,
            sequence=event.sequence,
            reason=event.reason,
        )
        await self._notify(event)
        return True


# -- the core's stream ------------------------------------------------------------------------


def _backoff(attempt: int, *, base: float = 0.1, cap: float = 5.0) -> float:
    """Full-jitter exponential backoff (so gateways do not reconnect in lockstep)."""
    return random.uniform(0.0, min(cap, base * 2**attempt))  # noqa: S311 - not a secret


class _Background:
    """A source that runs one background task (``_run``) in its own task group while entered."""

    _task_name = "edgeward-revocation"

    def __init__(self) -> None:
        self._tg: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._task = self._tg.create_task(self._run(), name=self._task_name)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None  # noqa: S101 - entered
        if self._task is not None:
            self._task.cancel()
        await self._tg.__aexit__(exc_type, exc, tb)


class CoreRevocationFeed(_Background):
    """Keeps ``state`` current from the cores' ``WatchRevocations`` stream.

    ``endpoints`` are the gateway's cores (:class:`~gateway._core_endpoints.CoreEndpoints`:
    pinned mTLS channels, failover order). The feed streams from one core at a time; when the
    stream fails (the core is unreachable, cuts it, ends it, or is silent for
    ``stream_timeout_s``) it moves to the next core and resumes from the last sequence it
    applied. Replicas share one registry and so one global sequence: nothing is missed, and
    an event the new core sends again is dropped by :meth:`RevocationState.apply`. The
    state's staleness bound does not reset on a failover, only on an event or heartbeat.
    """

    _task_name = "edgeward-revocation-feed"

    def __init__(
        self,
        state: RevocationState,
        *,
        endpoints: CoreEndpoints,
        stream_timeout_s: float,
    ) -> None:
        self._state = state
        self._endpoints = endpoints
        self._stream_timeout_s = stream_timeout_s
        super().__init__()
        self.connects = 0
        #: The core the feed is streaming from (or trying next).
        self.address = endpoints.current

    async def _run(self) -> None:
        attempt = 0
        while True:
            address = self.address = self._endpoints.current
            reason = "ended"
            try:
                async with self._endpoints.channel(address) as channel:
                    stub = core_pb2_grpc.CoreStub(channel)
                    call = stub.WatchRevocations(
                        core_pb2.WatchRevocationsRequest(since_sequence=self._state.last_sequence)
                    )
                    self.connects += 1
                    async for message in _with_silence_bound(call, self._stream_timeout_s):
                        if attempt:
                            _log.info("revocation feed connected", core=address)
                        attempt = 0
                        self._endpoints.succeeded(address)
                        if message.heartbeat or not message.device_id:
                            await self._state.advance(int(message.sequence))
                            continue
                        await self._state.apply(
                            RevocationEvent(
                                sequence=int(message.sequence),
                                device_id=message.device_id,
                                serial=message.serial or None,
                                reason=message.reason,
                                role=OPERATOR_ROLE if message.role == OPERATOR_ROLE else "",
                            )
                        )
                    _log.info("revocation feed ended by the core; reconnecting", core=address)
            except (grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
                reason = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "silent"
                _log.warning("revocation feed lost", core=address, error=reason, attempt=attempt)
            # A replica that is going away (or gone) is left for the next one, which resumes
            # from the same sequence.
            self._endpoints.failed(address, reason)
            delay = _backoff(attempt)
            attempt += 1
            await asyncio.sleep(delay)


async def _with_silence_bound(
    call: Any, silence_s: float
) -> Any:  # AsyncIterator[core_pb2.RevocationEvent]
    """Iterate a response stream, raising TimeoutError if it is silent for ``silence_s``."""
    iterator = call.__aiter__()
    try:
        while True:
            try:
                async with asyncio.timeout(silence_s):
                    message = await iterator.__anext__()
            except StopAsyncIteration:
                return
            yield message
    finally:
        call.cancel()


# -- the standalone registry ------------------------------------------------------------------


class RevocationReader(Protocol):
    """Reads revocations with a sequence above ``after``, in sequence order (blocking)."""

    def __call__(self, after: int) -> Sequence[RevocationEvent]: ...


def registry_revocation_reader(registry: pki.Registry, *, batch: int = 1000) -> RevocationReader:
    """A reader over the PKI registry's revocations (``revocations_since``)."""

    def read(after: int) -> Sequence[RevocationEvent]:
        return [
            RevocationEvent(
                sequence=r.sequence,
                device_id=r.device_id,
                serial=r.serial.lower() if r.serial else None,
                reason=r.reason,
                role=OPERATOR_ROLE if r.role is pki.Role.OPERATOR else "",
            )
            for r in registry.revocations_since(after, limit=batch)
        ]

    return read


class RegistryRevocationPoller(_Background):
    """Keeps ``state`` current by polling a registry (standalone gateways).

    The first poll happens on entry, so a freshly started gateway knows what is revoked
    before it serves anyone.
    """

    _task_name = "edgeward-revocation-poll"

    def __init__(
        self, state: RevocationState, *, reader: RevocationReader, interval_s: float
    ) -> None:
        self._state = state
        self._reader = reader
        self._interval_s = interval_s
        super().__init__()

    async def __aenter__(self) -> Self:
        await self.poll_once()
        return await super().__aenter__()

    async def poll_once(self) -> bool:
        """Read and apply new revocations; False (and no freshness) when the read failed."""
        try:
            events = await asyncio.to_thread(self._reader, self._state.last_sequence)
        except (pki.RegistryError, OSError) as exc:
            _log.warning("revocation registry unreadable", error=str(exc))
            return False
        for event in events:
            await self._state.apply(event)
        self._state.mark_fresh()
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.poll_once()
