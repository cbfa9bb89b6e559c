"""The ``DeviceGateway`` servicer: peer certificates and live calls, in front of the front door.

What happens to a call is the front door's (:class:`~gateway._door.FrontDoor`): the revocation
feed must be fresh, the identity good, the device type allowed the method, the device within
its budget; then the frame's fair turn, the engine and the escalation hook. This servicer keeps
what only gRPC has:

* the identity is the TLS peer certificate: it must name a device of the trust domain, for
  client authentication, inside its validity period, not revoked
  (:class:`~gateway._grpc._identity.IdentityJudge`), and streams re-judge it on every message;
* every call registers as live under its device id (:class:`~gateway._grpc._live.LiveCalls`),
  and a revocation event cuts it at once;
* a stream is paced to the device's budget (gRPC flow control slows the sender) rather than
  refused, and a unary call of a device flooding far over its budget is refused only after
  a hold (:meth:`~gateway._door.FrontDoor.hold_refusal`), so the device's own concurrency
  limit slows it instead of the gateway refusing as fast as it can send.

Protobuf stops at the front door: the engine, the event hub and the telemetry store see domain
objects only. Handlers raise domain errors; :meth:`DeviceGatewayServicer._finish` aborts with
the status the one mapping gives (:func:`gateway._status.status_of`, through
:meth:`~gateway._door.FrontDoor.refused`, which also counts and audits the refusal, bounded
per device) — nothing else calls ``context.abort``. One log line per answered call, with the
device id bound through structlog's contextvars.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from gateway._door import Admitted, FrontDoor, telemetry_from_pb
from gateway._door._render import event_to_pb
from gateway._events import DeviceEvent
from gateway._grpc._identity import IdentityJudge, PeerIdentity
from gateway._grpc._live import LiveCall, LiveCalls
from gateway._metrics import GatewayMetrics
from gateway._revocation import RevocationEvent
from gateway._status import Status
from gateway.errors import StreamIdle
from protos.edgeward.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

__all__ = ["DeviceGatewayServicer"]

_log = structlog.get_logger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


class _Peer:
    """A judged peer as the front door's :class:`~gateway._door.Identity`."""

    __slots__ = ("_judge", "peer")

    def __init__(self, judge: IdentityJudge, peer: PeerIdentity) -> None:
        self._judge = judge
        self.peer = peer

    @property
    def device_id(self) -> str:
        return self.peer.device_id

    @property
    def serial(self) -> str | None:
        return self.peer.serial

    def recheck(self) -> None:
        self._judge.recheck(self.peer)


async def _next(iterator: AsyncIterator[Any]) -> Any:
    return await iterator.__anext__()


class DeviceGatewayServicer(gateway_pb2_grpc.DeviceGatewayServicer):
    """``DeviceGateway`` for devices of one trust domain."""

    def __init__(
        self,
        *,
        door: FrontDoor,
        judge: IdentityJudge,
        metrics: GatewayMetrics,
        max_streams_per_device: int,
        stream_idle_timeout_s: float,
    ) -> None:
        self.door = door
        self._judge = judge
        self._metrics = metrics
        self._idle_s = stream_idle_timeout_s
        self.live = LiveCalls(max_streams_per_device=max_streams_per_device)
        if door.revocation is not None:
            door.revocation.add_listener(self._on_revocation)

    def close(self) -> None:
        """Stop listening for revocations."""
        if self.door.revocation is not None:
            self.door.revocation.remove_listener(self._on_revocation)

    # -- revocation -------------------------------------------------------------------------

    def _on_revocation(self, event: RevocationEvent) -> None:
        n = self.live.cut(event.device_id, event.serial)
        if n:
            self._metrics.cut_calls.inc(n)
            _log.warning(
                "live calls cut", audit=True, device_id=event.device_id, calls=n, reason="revoked"
            )

    # -- call scaffolding -------------------------------------------------------------------

    async def _open(self, context: Context, method: str) -> tuple[Admitted, PeerIdentity]:
        """The front door's admission, the identity judged from the peer certificate."""
        judged: list[_Peer] = []

        def identify() -> _Peer:
            peer = self._judge.judge(context.auth_context())
            structlog.contextvars.bind_contextvars(device_id=peer.device_id)
            judged.append(_Peer(self._judge, peer))
            return judged[-1]

        admitted = await self.door.admit(method, identify)
        # Callers register the call right after this returns, with no await in between, so
        # no revocation event can slip through the gap.
        return admitted, judged[-1].peer

    def _status(self, method: str, exc: Exception) -> Status:
        device_id = structlog.contextvars.get_contextvars().get("device_id")
        return self.door.refused(
            exc,
            device_id=device_id if isinstance(device_id, str) else None,
            transport="grpc",
            method=method,
        )

    async def _back_off(self, context: Context, method: str, status: Status) -> None:
        """A flooding device's refusal waits before it is answered (back-pressure, see
        :meth:`~gateway._door.FrontDoor.hold_refusal`); other refusals go out at once."""
        device_id = structlog.contextvars.get_contextvars().get("device_id")
        if status.reason == "rate_limited" and isinstance(device_id, str):
            await self.door.hold_refusal(method, device_id, remaining=context.time_remaining())

    async def _finish(
        self,
        context: Context,
        method: str,
        started: float,
        status: Status | None,
        **fields: Any,
    ) -> None:
        """Count, log the call's one line, and abort with ``status`` when there is one."""
        code = status.code if status is not None else "OK"
        elapsed = time.perf_counter() - started
        self._metrics.requests.labels(method=method, code=code).inc()
        if not method.endswith("Detect") or method == "Detect":
            self._metrics.request_seconds.labels(method=method).observe(elapsed)
        if status is not None and status.reason not in ("idle", "internal"):
            # Refused: audited by the front door's refusal log, bounded per device.
            await context.abort(status.grpc_code, status.message, status.trailing_metadata)
            return
        level = _log.info if status is None or status.reason in ("idle",) else _log.warning
        level(
            "rpc",
            method=method,
            code=code,
            reason=status.reason if status else None,
            ms=round(elapsed * 1000, 2),
            **fields,
        )
        if status is not None:
            await context.abort(status.grpc_code, status.message, status.trailing_metadata)

    def _deadline(self, context: Context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def _infer(
        self, call: LiveCall, context: Context, frame: common_pb2.Frame, admitted: Admitted
    ) -> common_pb2.DetectionResult:
        msg, _result = await self.door.detect(
            admitted,
            frame_id=frame.frame_id,
            image=frame.image,
            deadline=self._deadline(context),
            guard=call.guard,
        )
        return msg

    # -- DeviceGateway ----------------------------------------------------------------------

    async def Detect(
        self, request: common_pb2.Frame, context: Context
    ) -> common_pb2.DetectionResult:
        method, started = "Detect", time.perf_counter()
        structlog.contextvars.bind_contextvars(method=method)
        status: Status | None = None
        response = common_pb2.DetectionResult()
        try:
            admitted, peer = await self._open(context, method)
            with self.live.register(peer.device_id, peer.serial, method, streaming=False) as call:
                response = await self._infer(call, context, request, admitted)
        except Exception as exc:  # noqa: BLE001 - the boundary: every error becomes a status
            status = self._status(method, exc)
            await self._back_off(context, method, status)
        self._metrics.frames.labels(method=method, code=status.code if status else "OK").inc()
        await self._finish(
            context,
            method,
            started,
            status,
            frame_id=request.frame_id,
            detections=len(response.detections),
            from_cache=response.from_cache,
        )
        return response

    async def StreamDetect(
        self, request_iterator: AsyncIterator[common_pb2.Frame], context: Context
    ) -> AsyncIterator[common_pb2.DetectionResult]:
        method, started = "StreamDetect", time.perf_counter()
        structlog.contextvars.bind_contextvars(method=method)
        status: Status | None = None
        frames = 0
        idle_s = self._idle_s
        gauge = self._metrics.live_streams.labels(method=method)
        # Bound once per stream: a label look-up per frame costs a lock and a dictionary.
        frames_ok = self._metrics.frames.labels(method=method, code="OK")
        frame_seconds = self._metrics.request_seconds.labels(method=method)
        try:
            admitted, peer = await self._open(context, method)
            with self.live.register(peer.device_id, peer.serial, method, streaming=True) as call:
                gauge.inc()
                try:
                    while True:
                        try:
                            async with asyncio.timeout(idle_s):
                                frame = await call.guard(_next(request_iterator))
                        except StopAsyncIteration:
                            break
                        except TimeoutError:
                            raise StreamIdle(idle_s) from None
                        frame_started = time.perf_counter()
                        self._judge.recheck(peer)
                        # Pace the stream to the device's budget rather than refuse: gRPC
                        # flow control then slows the sender, and we hold one frame at most.
                        # Within the budget the token is taken at once, with nothing to wait
                        # for (a cuttable wait costs a task).
                        if not self.door.pace_now(peer.device_id):
                            await call.guard(self.door.pace(peer.device_id))
                        result = await self._infer(call, context, frame, admitted)
                        frames += 1
                        frames_ok.inc()
                        frame_seconds.observe(time.perf_counter() - frame_started)
                        yield result
                finally:
                    gauge.dec()
        except Exception as exc:  # noqa: BLE001 - the boundary: every error becomes a status
            status = self._status(method, exc)
            self._metrics.frames.labels(method=method, code=status.code).inc()
        await self._finish(context, method, started, status, frames=frames)

    async def ReportTelemetry(
        self, request: common_pb2.Telemetry, context: Context
    ) -> common_pb2.Ack:
        method, started = "ReportTelemetry", time.perf_counter()
        structlog.contextvars.bind_contextvars(method=method)
        status: Status | None = None
        ack = common_pb2.Ack()
        try:
            admitted, _peer = await self._open(context, method)
            record = telemetry_from_pb(
                admitted.device_id,
                request,
                max_readings=self.door.limits.telemetry_max_readings,
                now=self.door.clock(),
            )
            self.door.keep(record)
            ack = common_pb2.Ack(id=uuid.uuid4().hex)
        except Exception as exc:  # noqa: BLE001 - the boundary: every error becomes a status
            status = self._status(method, exc)
            await self._back_off(context, method, status)
        await self._finish(context, method, started, status, readings=len(request.readings))
        return ack

    async def Subscribe(
        self, request: gateway_pb2.SubscribeRequest, context: Context
    ) -> AsyncIterator[common_pb2.DeviceEvent]:
        method, started = "Subscribe", time.perf_counter()
        structlog.contextvars.bind_contextvars(method=method)
        status: Status | None = None
        sent = 0
        gauge = self._metrics.live_streams.labels(method=method)
        try:
            _admitted, peer = await self._open(context, method)
            with self.live.register(peer.device_id, peer.serial, method, streaming=True) as call:
                gauge.inc()
                # The device id comes from the certificate; the request has no device field,
                # so no device can ask for another's events.
                events = self.door.events.subscribe(peer.device_id, request.after_event_id[:128])
                try:
                    while True:
                        event: DeviceEvent = await call.guard(_next(events))
                        self._judge.recheck(peer)
                        sent += 1
                        yield event_to_pb(event)
                finally:
                    gauge.dec()
                    await events.aclose()
        except Exception as exc:  # noqa: BLE001 - the boundary: every error becomes a status
            status = self._status(method, exc)
        await self._finish(context, method, started, status, events=sent)
