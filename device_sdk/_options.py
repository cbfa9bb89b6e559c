"""How a :class:`~device_sdk.DeviceClient` behaves (:class:`ClientOptions`) and what it
counts (:class:`ClientStats`)."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from device_sdk._queue import QueueStats
from device_sdk._types import ClientState, GatewayInfo, Transport

__all__ = ["ClientOptions", "ClientStats", "options_with"]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientOptions:
    """How a :class:`DeviceClient` behaves. Every field has a production default."""

    #: ``grpc`` (a unary call per frame), ``grpc-stream`` (frames on one long-lived
    #: ``StreamDetect`` call) or ``mqtt``.
    transport: Transport = Transport.GRPC
    #: Gateways to use instead of the signed directory in the identity directory.
    gateways: Sequence[GatewayInfo] | None = None
    #: ``host:port`` of the core's Enrollment service for renewal; defaults to the address
    #: recorded at enrolment (``identity.json``). Without one, renewal is off.
    core_address: str | None = None
    #: The outbox database; defaults to ``outbox.sqlite3`` in the identity directory.
    queue_path: Path | None = None
    queue_max_items: int = 1000
    queue_max_bytes: int = 256 * 1024 * 1024
    #: fsync every commit (for devices that lose power without warning).
    durable_queue: bool = False
    #: Frames sent concurrently to the gateway (its micro-batcher likes a few at a time).
    max_in_flight: int = 4
    call_timeout_s: float = 10.0
    probe_interval_s: float = 10.0
    #: While no gateway is reachable: the first probe comes within this long, then the
    #: ceiling doubles each round up to ``offline_probe_max_s`` (full jitter; a fleet cut off
    #: at once, by a gateway restart, comes back spread out).
    offline_probe_interval_s: float = 1.0
    offline_probe_max_s: float = 15.0
    probe_timeout_s: float = 2.0
    connect_timeout_s: float = 5.0
    tie_margin_s: float = 0.010
    down_for_s: float = 1.0
    renew_fraction: float = 2 / 3
    renew_jitter: float = 0.05
    renewal_check_s: float = 30.0
    #: Receive escalation answers and commands (``Subscribe`` / the events topic).
    subscribe_events: bool = True
    #: Outcomes kept for :meth:`DeviceClient.results`; the oldest go first when full.
    results_buffer: int = 1024
    events_buffer: int = 1024
    #: Wall clock used to judge the certificate (injected by tests).
    clock: Callable[[], dt.datetime] = _utcnow
    rng: random.Random | None = None


@dataclass(frozen=True, slots=True)
class ClientStats:
    """Counters since the client started.

    Every frame the client is responsible for is in exactly one place, so at rest
    ``answered + rejected + queue.frames == carried_over + submitted`` (a frame leaves the
    outbox when its outcome is counted): ``answered`` can never pass what was sent.
    """

    state: ClientState
    gateway_id: str | None
    submitted: int
    answered: int
    rejected: int
    telemetry_sent: int
    failovers: int
    renewals: int
    results_dropped: int
    queue: QueueStats
    gateways_up: tuple[str, ...] = field(default_factory=tuple)
    #: Escalation answers heard again (gateway restart, another gateway) and not handed
    #: to the application a second time.
    answers_repeated: int = 0
    #: Frames already waiting in the outbox when the client started (submitted by an
    #: earlier run): sent by this client, so their outcomes count in ``answered`` and
    #: ``rejected`` although ``submitted`` does not include them.
    carried_over: int = 0


def options_with(options: ClientOptions | None, **changes: Any) -> ClientOptions:
    """A copy of ``options`` (or the defaults) with ``changes`` applied."""
    return replace(options or ClientOptions(), **changes)
