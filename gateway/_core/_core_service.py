"""The ``Core`` gRPC service for gateways: revocation feed, gateway directory, device facts.

Every method requires a gateway identity, read from the TLS peer certificate (mutual-TLS port);
a device, another core or a caller without a certificate is refused. So is a gateway whose
certificate the registry lists as revoked (``edgeward pki revoke --serial S`` or
``--gateway-id ID``): ``PERMISSION_DENIED`` and an audit line (``gateway.refused``) on every
method; an open ``WatchRevocations`` stream of that certificate ends with the same status as
soon as the feed sees the revocation (``feed_poll_s``). ``Escalate`` is served by a pluggable
handler (:class:`EscalateHandler`) and answers ``UNIMPLEMENTED`` until one is plugged.

The revocation feed replays the registry after ``since_sequence`` and then follows it live. The
registry may be changed by another process (``edgeward pki revoke``, another core replica), so
one :class:`RevocationFeed` task re-reads its last sequence number and wakes every open stream:
at once when the registry pushes changes (PostgreSQL: ``LISTEN``/``NOTIFY``, sent in the same
transaction as the revocation, so a revocation through any replica reaches every replica's
streams within milliseconds), and every ``poll_s`` in any case (SQLite, which cannot push, and
a safety net for a listener that was reconnecting). Each stream reads what it has not sent
yet, in sequence order, so a gateway that reconnects with the last sequence it saw gets no
gap and no repeat. A heartbeat (``heartbeat`` set, ``sequence`` = the last sequence sent)
follows the replay and then comes every ``heartbeat_s`` without events, so a gateway can tell
a quiet feed from a dead one. Revocations of gateway and core certificates take sequence
numbers too but are not sent: the feed is of devices (and of console operators, marked
``role = "operator"``, so that gateway consoles end their sessions). A heartbeat follows
them at once instead; its sequence, beyond the last event the gateway saw, tells it that
newer CRLs exist (its broker fetches them at once).

Metrics (:class:`gateway._metrics.CoreMetrics`): refusals by method and reason, revocations
(each sequence number the feed sees), escalations by status with their latency, and the
number of open revocation streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable
from typing import NoReturn, Protocol

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp

import pki
from gateway._core._config import split_address
from gateway._core._observe import refusal_reason
from gateway._core._publish import DirectoryPublisher
from gateway._core._status import (
    Context,
    NotFound,
    PermissionDenied,
    RequestError,
    Unimplemented,
    peer_host,
    require_peer,
    server_stream,
    status_for,
    unary,
)
from gateway._metrics import CoreMetrics
from protos.edgeward.v1 import common_pb2, core_pb2, core_pb2_grpc

__all__ = ["CoreService", "EscalateHandler", "RevocationFeed"]

_log = structlog.get_logger(__name__)
_audit = structlog.get_logger("pki.audit")
_REPLAY_BATCH = 500


class EscalateHandler(Protocol):
    """Serves ``Core.Escalate`` for an authenticated gateway."""

    async def __call__(
        self,
        request: core_pb2.EscalationRequest,
        context: Context,
        *,
        gateway: pki.Identity,
    ) -> core_pb2.EscalationResult: ...


class RevocationFeed:
    """Follows the registry's last revocation sequence and wakes waiting streams.

    Re-reads on a push from the registry (:meth:`pki.Registry.watch_revocations`), on
    :meth:`poke`, and every ``poll_s``. ``pushes`` counts the pushes received.
    """

    def __init__(
        self, registry: pki.Registry, *, poll_s: float, metrics: CoreMetrics | None = None
    ) -> None:
        self._registry = registry
        self._poll_s = poll_s
        self._metrics = metrics if metrics is not None else CoreMetrics()
        self._last = registry.last_sequence()
        self._changed = asyncio.Condition()
        self._poke = asyncio.Event()
        self.pushed = False
        self.pushes = 0

    @property
    def last_sequence(self) -> int:
        return self._last

    def poke(self) -> None:
        """Check the registry now (after a revocation made in this process)."""
        self._poke.set()

    def _pushed(self, loop: asyncio.AbstractEventLoop) -> None:
        # Called from the registry's listener thread.
        def wake() -> None:
            self.pushes += 1
            self._poke.set()

        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(wake)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = await asyncio.to_thread(self._registry.watch_revocations, lambda: self._pushed(loop))
        self.pushed = stop is not None
        _log.info("revocations.follow", pushed=self.pushed, poll_s=self._poll_s)
        failing = False
        try:
            while True:
                self._poke.clear()
                try:
                    seq = await asyncio.to_thread(self._registry.last_sequence)
                except pki.RegistryError as exc:
                    # The database is away (a restart, a lost network): keep trying at the poll
                    # interval; streams fail on their own reads and gateways reconnect.
                    if not failing:
                        _log.warning("revocations.unreadable", error=str(exc))
                    failing = True
                    seq = self._last
                else:
                    if failing:
                        _log.info("revocations.readable")
                    failing = False
                if seq != self._last:
                    if seq > self._last:
                        self._metrics.revocations.inc(seq - self._last)
                    self._last = seq
                    async with self._changed:
                        self._changed.notify_all()
                try:
                    async with asyncio.timeout(self._poll_s):
                        await self._poke.wait()
                except TimeoutError:
                    pass
        finally:
            if stop is not None:
                stop()

    async def wait_beyond(self, sequence: int, *, max_wait_s: float) -> None:
        """Return when the registry holds events after ``sequence``, or after ``max_wait_s``."""
        try:
            async with asyncio.timeout(max_wait_s), self._changed:
                await self._changed.wait_for(lambda: self._last > sequence)
        except TimeoutError:
            pass


#: Whose revocations the feed sends as events; the others only advance its sequence.
_SENT_ROLES = frozenset({pki.Role.DEVICE, pki.Role.OPERATOR})


def _event(record: pki.RevocationRecord) -> core_pb2.RevocationEvent:
    at = Timestamp()
    at.FromDatetime(record.revoked_at)
    return core_pb2.RevocationEvent(
        sequence=record.sequence,
        device_id=record.device_id,
        serial=record.serial or "",
        reason=record.reason,
        revoked_at=at,
        role="" if record.role is pki.Role.DEVICE else record.role.value,
    )


class CoreService(core_pb2_grpc.CoreServicer):
    def __init__(
        self,
        *,
        trust_domain: str,
        registry: pki.Registry,
        feed: RevocationFeed,
        directory: DirectoryPublisher,
        heartbeat_s: float,
        clock: Callable[[], dt.datetime],
        escalate: EscalateHandler | None = None,
        metrics: CoreMetrics | None = None,
    ) -> None:
        self._metrics = metrics if metrics is not None else CoreMetrics()
        self._trust_domain = trust_domain
        self._registry = registry
        self._feed = feed
        self._directory = directory
        self._heartbeat_s = heartbeat_s
        self._clock = clock
        self._escalate = escalate

    async def _gateway(self, context: Context, method: str) -> tuple[pki.Identity, str]:
        """The calling gateway's identity and certificate serial, unless it is revoked."""
        try:
            gateway, serial = require_peer(
                context, trust_domain=self._trust_domain, role=pki.Role.GATEWAY
            )
        except (pki.PkiError, RequestError) as exc:
            self._metrics.refused(method, refusal_reason(exc))
            raise
        if await asyncio.to_thread(self._revoked, serial):
            self._refuse(context, gateway, serial, method)
        return gateway, serial

    def _revoked(self, serial: str) -> bool:
        # Certificates the registry never recorded (issued before it recorded server
        # certificates, or into another registry) cannot be revoked there; the CRL works the
        # same way (a list of what is revoked, not of what is allowed).
        record = self._registry.get_server_certificate(serial)
        return record is not None and record.status is pki.Status.REVOKED

    def _refuse(
        self, context: Context, gateway: pki.Identity, serial: str, method: str
    ) -> NoReturn:
        self._metrics.refused(method, "gateway_revoked")
        _audit.warning(
            "gateway.refused",
            audit=True,
            gateway_id=gateway.id,
            serial=serial,
            method=method,
            reason="certificate revoked",
            peer=peer_host(context.peer()),
        )
        raise PermissionDenied(
            "this gateway's certificate is revoked: stop retrying and ask the operator for a "
            "new one ('edgeward pki issue-server')"
        )

    @unary
    async def Escalate(
        self, request: core_pb2.EscalationRequest, context: Context
    ) -> core_pb2.EscalationResult:
        gateway, _ = await self._gateway(context, "Escalate")
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await self._answer(request, context, gateway)
        except grpc.aio.AbortError:  # a handler that aborted by hand: its status, if known
            found = context.code()
            code = found if isinstance(found, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
            raise
        except Exception as exc:
            code = status_for(exc)[0]
            raise
        finally:
            self._metrics.escalations.labels(code=code.name).inc()
            self._metrics.escalation_seconds.observe(time.perf_counter() - started)

    async def _answer(
        self, request: core_pb2.EscalationRequest, context: Context, gateway: pki.Identity
    ) -> core_pb2.EscalationResult:
        if self._escalate is None:
            raise Unimplemented("escalation is not enabled on this core")
        return await self._escalate(request, context, gateway=gateway)

    @server_stream
    async def WatchRevocations(
        self, request: core_pb2.WatchRevocationsRequest, context: Context
    ) -> AsyncIterator[core_pb2.RevocationEvent]:
        gateway, serial = await self._gateway(context, "WatchRevocations")
        self._metrics.revocation_streams.inc()
        try:
            async for event in self._watch(request, context, gateway, serial):
                yield event
        finally:
            self._metrics.revocation_streams.dec()

    async def _watch(
        self,
        request: core_pb2.WatchRevocationsRequest,
        context: Context,
        gateway: pki.Identity,
        serial: str,
    ) -> AsyncIterator[core_pb2.RevocationEvent]:
        sent = int(request.since_sequence)
        _log.info("revocations.watch", gateway_id=gateway.id, since_sequence=sent)
        last_beat = float("-inf")  # the first heartbeat marks the end of the replay

        def read(after: int) -> tuple[bool, list[pki.RevocationRecord]]:
            # Own revocation first: a revoked gateway gets nothing more, not even the batch.
            if self._revoked(serial):
                return True, []
            return False, self._registry.revocations_since(after, limit=_REPLAY_BATCH)

        while True:
            seen_last = self._feed.last_sequence
            revoked, records = await asyncio.to_thread(read, sent)
            if revoked:
                self._refuse(context, gateway, serial, "WatchRevocations")
            servers = False
            for record in records:
                sent = record.sequence
                if record.role in _SENT_ROLES:
                    yield _event(record)
                else:
                    servers = True
            if len(records) == _REPLAY_BATCH:
                continue
            wait = self._heartbeat_s - (time.monotonic() - last_beat)
            # A heartbeat at once after gateway or core revocations: its sequence tells the
            # gateway that CRLs newer than its own exist, and its broker fetches them now.
            if wait <= 0 or servers:
                yield core_pb2.RevocationEvent(sequence=sent, heartbeat=True)
                last_beat = time.monotonic()
                continue
            # Wake on any new revocation, even when the gateway asked to resume beyond the
            # registry's last sequence: a revocation of this gateway must end the stream.
            await self._feed.wait_beyond(min(sent, seen_last), max_wait_s=wait)

    @unary
    async def GetGatewayDirectory(
        self, request: core_pb2.GetGatewayDirectoryRequest, context: Context
    ) -> common_pb2.SignedGatewayDirectory:
        await self._gateway(context, "GetGatewayDirectory")
        return await asyncio.to_thread(self._directory.current)

    @unary
    async def AnnounceGateway(
        self, request: common_pb2.GatewayEntry, context: Context
    ) -> common_pb2.Ack:
        gateway, _ = await self._gateway(context, "AnnounceGateway")
        if request.gateway_id and request.gateway_id != gateway.id:
            raise PermissionDenied("a gateway may announce only itself (its certificate's id)")
        region = pki.validate_id(request.region, kind="region")
        try:
            split_address(request.grpc_address)
            if request.mqtt_address:
                split_address(request.mqtt_address)
        except ValueError as exc:
            raise pki.InvalidName("gateway address", str(exc)) from None
        record = pki.GatewayRecord(
            gateway.id, region, request.grpc_address, request.mqtt_address, self._clock()
        )
        version = await asyncio.to_thread(self._registry.upsert_gateway, record)
        _log.info("gateway.announced", gateway_id=gateway.id, region=region, version=version)
        return common_pb2.Ack(id=gateway.id)

    @unary
    async def GetDevice(
        self, request: core_pb2.GetDeviceRequest, context: Context
    ) -> core_pb2.DeviceInfo:
        await self._gateway(context, "GetDevice")
        device_id = pki.validate_id(request.device_id, kind="device id")
        device = await asyncio.to_thread(self._registry.get_device, device_id)
        if device is None:
            raise NotFound(f"no device {device_id} in the registry")
        return core_pb2.DeviceInfo(
            device_id=device.id,
            device_type=device.type,
            region=device.region,
            status=device.status.value,
        )
