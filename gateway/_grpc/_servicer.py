"""The ``DeviceGateway`` servicer: identity, authorisation, limits, inference, events.

Every call goes through the same steps, in this order, before any of its work:

1. the revocation feed must be fresh (else ``FeedStale``: a gateway that may have missed a
   revocation refuses *new* sessions);
2. the peer certificate must name a device of the trust domain, for client authentication,
   inside its validity period, not revoked (:class:`~gateway._grpc._identity.IdentityJudge`);
3. the device's type must allow the method (:class:`~gateway._grpc._auth.Authoriser`);
4. the call registers as live under its device id (cut by a revocation event) and, per frame,
   takes a token from the device's bucket.

Streams re-judge the identity (time, revocation) on every message. Protobuf stops here: the
engine, the event hub and the telemetry store see domain objects only. Handlers raise domain
errors; :meth:`DeviceGatewayServicer._finish` maps them through :func:`gateway.errors.grpc_status`
(the one mapping) and aborts — nothing else calls ``context.abort``. One log line per answered
call, with the device id bound through structlog's contextvars; refused calls are audited
through :class:`~gateway._refusals.RefusalLog` (shared with the MQTT bridge), which logs the
first refusal of each reason at once and then a count per device per interval, so a device
cannot flood the log. Prometheus still counts every refusal.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np
import numpy.typing as npt
import structlog
from google.protobuf import timestamp_pb2

from gateway._config import GatewaySettings
from gateway._events import Command, DeviceEvent, ErrorEvent, EscalationAnswer, EventHub
from gateway._grpc._auth import Authoriser
from gateway._grpc._identity import IdentityJudge, PeerIdentity
from gateway._grpc._limits import LiveCall, LiveCalls, RateLimiter
from gateway._inference import InferenceResult
from gateway._metrics import GatewayMetrics
from gateway._refusals import RefusalLog
from gateway._revocation import RevocationEvent, RevocationState
from gateway._telemetry import InvalidTelemetry, validate_telemetry
from gateway.errors import (
    FeedStale,
    GrpcStatus,
    InvalidRequest,
    StreamIdle,
    Unauthenticated,
    grpc_status,
)
from protos.edgeward.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

__all__ = [
    "WHOLE_FRAME_LABEL",
    "DetectionHook",
    "Detector",
    "DeviceGatewayServicer",
    "EscalationMarks",
    "EscalationMemory",
    "TelemetryRecord",
    "TelemetryStore",
    "event_to_pb",
    "result_to_pb",
]

_log = structlog.get_logger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

_DENIAL_CODES = frozenset(
    {"PERMISSION_DENIED", "UNAUTHENTICATED", "UNAVAILABLE", "RESOURCE_EXHAUSTED"}
)
Frame = npt.NDArray[np.uint8]

# Telemetry bounds: physically plausible values; anything else is a broken or hostile device.


class Detector(Protocol):
    """What the servicer needs of the inference engine."""

    async def detect_with_frame(
        self, image: bytes, *, deadline: float | None = None
    ) -> tuple[InferenceResult, Frame | None]: ...


#: What a detection hook escalated: detection index → escalation id, and ``None`` → the id
#: of an escalation of the whole frame (rendered as one extra detection, see
#: :func:`result_to_pb`).
EscalationMarks = Mapping[int | None, str]

#: Label of the extra detection standing for an escalated whole frame (the edge found
#: nothing it could name); score 0, box the whole frame.
WHOLE_FRAME_LABEL = "unknown"


class DetectionHook(Protocol):
    """Called with every fresh result, empty ones included (the escalation plug-in).

    The hook's policy decides what escalates: detections, or (``None`` key) the whole frame,
    e.g. when the edge found nothing. The servicer marks them ``escalated`` in the answer.
    It must not block (store work, return). Called through :class:`EscalationMemory`: not
    again for a device's repeat of a picture it already had judged (the response cache
    answers it, and the first answer's marks are given again), nor when no hook is installed.
    """

    async def __call__(
        self,
        *,
        device_id: str,
        region: str | None,
        frame_id: str,
        result: InferenceResult,
        frame: Frame | None,
    ) -> EscalationMarks: ...


class EscalationMemory:
    """The escalation marks given with each answer, so that a cached answer carries them too.

    The response cache repeats the engine's result (same detections, same ``result_id``) but
    not what the detection hook decided about it. This remembers, per (device, result), the
    marks of the first answer: when the same device sends the same picture again and the
    cache answers, the answer carries the same ``escalated`` flags and the *same* escalation
    ids. The picture is not escalated a second time: the core's final answer for that id
    comes once, on ``Subscribe`` or ``devices/<id>/events``, and answers both.

    Another device whose frame hits the cache entry gets its own judgement (the hook is
    called for it, with the decoded frame when there is one; an exact-cache hit has none, so
    nothing can be cropped and nothing escalates for it): escalation answers go to the
    device that was given the id, never to another. Bounded: the least recently used of
    ``max_entries`` is forgotten (a forgotten repeat is judged again, as a fresh one).
    Both transports (gRPC servicer, MQTT bridge) share one. Event-loop only.
    """

    def __init__(self, *, max_entries: int = 8192) -> None:
        self._max_entries = max_entries
        self._marks: OrderedDict[tuple[str, str], EscalationMarks] = OrderedDict()

    def __len__(self) -> int:
        return len(self._marks)

    async def marks(
        self,
        hook: DetectionHook | None,
        *,
        device_id: str,
        region: str | None,
        frame_id: str,
        result: InferenceResult,
        frame: Frame | None,
    ) -> EscalationMarks:
        """The marks for this answer: remembered for a cached repeat, else the hook's."""
        if hook is None:
            # No hook (escalation not configured): no call, nothing added to the hot path.
            return {}
        key = (device_id, result.result_id)
        if result.from_cache and result.result_id:
            known = self._marks.get(key)
            if known is not None:
                self._marks.move_to_end(key)
                return known
        # Empty results too: the region's policy may escalate frames the edge found nothing
        # in.
        try:
            marks = await hook(
                device_id=device_id, region=region, frame_id=frame_id, result=result, frame=frame
            )
        except Exception:  # noqa: BLE001 - escalation is best effort: the edge answer stands
            _log.exception("detection hook failed", device_id=device_id, frame_id=frame_id)
            return {}
        if result.result_id:
            self._marks[key] = dict(marks)
            self._marks.move_to_end(key)
            while len(self._marks) > self._max_entries:
                self._marks.popitem(last=False)
        return marks


@dataclass(frozen=True, slots=True)
class TelemetryRecord:
    """The latest telemetry a device reported."""

    device_id: str
    received_at: dt.datetime
    reported_at: dt.datetime | None
    battery_percent: float
    temperature_c: float
    firmware_version: str
    readings: Mapping[str, float]


class TelemetryStore:
    """Latest telemetry per device, bounded (least recently reporting device dropped)."""

    def __init__(self, *, max_devices: int = 100_000) -> None:
        self._max_devices = max_devices
        self._latest: OrderedDict[str, TelemetryRecord] = OrderedDict()

    def put(self, record: TelemetryRecord) -> None:
        self._latest[record.device_id] = record
        self._latest.move_to_end(record.device_id)
        if len(self._latest) > self._max_devices:
            self._latest.popitem(last=False)

    def latest(self, device_id: str) -> TelemetryRecord | None:
        return self._latest.get(device_id)

    def __len__(self) -> int:
        return len(self._latest)


def _telemetry_from_pb(
    device_id: str, msg: common_pb2.Telemetry, *, max_readings: int, now: dt.datetime
) -> TelemetryRecord:
    """Validate and convert; raise :class:`InvalidRequest` naming the bad field."""
    try:
        fields = validate_telemetry(msg, max_readings=max_readings)
    except InvalidTelemetry as exc:
        raise InvalidRequest(str(exc)) from None
    return TelemetryRecord(
        device_id=device_id,
        received_at=now,
        reported_at=fields.reported_at,
        battery_percent=fields.battery_percent,
        temperature_c=fields.temperature_c,
        firmware_version=fields.firmware_version,
        readings=dict(fields.readings),
    )


def result_to_pb(
    result: InferenceResult, *, frame_id: str, gateway_id: str, escalated: EscalationMarks
) -> common_pb2.DetectionResult:
    """The engine's result as the wire's ``DetectionResult``, escalations marked.

    A whole-frame escalation (key ``None``) becomes one more detection, labelled
    :data:`WHOLE_FRAME_LABEL` with score 0 and the whole frame as its box, so the device
    sees that an answer is coming and under which id.
    """
    msg = common_pb2.DetectionResult(
        frame_id=frame_id,
        detections=[
            common_pb2.Detection(
                label=d.label,
                score=d.score,
                box=common_pb2.Box(
                    x_min=d.box.x_min, y_min=d.box.y_min, x_max=d.box.x_max, y_max=d.box.y_max
                ),
                escalated=i in escalated,
                escalation_id=escalated.get(i, ""),
                escalation_reason=getattr(escalated.get(i), "reason", ""),
            )
            for i, d in enumerate(result.detections)
        ],
        model_name=result.model_name,
        model_version=result.model_version,
        inference_ms=result.inference_ms,
        from_cache=result.from_cache,
        gateway_id=gateway_id,
    )
    frame_escalation = escalated.get(None)
    if frame_escalation is not None:
        msg.detections.append(
            common_pb2.Detection(
                label=WHOLE_FRAME_LABEL,
                score=0.0,
                box=common_pb2.Box(x_min=0.0, y_min=0.0, x_max=1.0, y_max=1.0),
                escalated=True,
                escalation_id=frame_escalation,
                escalation_reason=getattr(frame_escalation, "reason", ""),
            )
        )
    return msg


def event_to_pb(event: DeviceEvent) -> common_pb2.DeviceEvent:
    """A stored event as the wire's ``DeviceEvent`` (also used by the MQTT bridge)."""
    at = timestamp_pb2.Timestamp()
    at.FromDatetime(event.at)
    msg = common_pb2.DeviceEvent(event_id=event.event_id, at=at)
    p = event.payload
    if isinstance(p, EscalationAnswer):
        msg.escalation.CopyFrom(
            common_pb2.EscalationAnswer(
                escalation_id=p.escalation_id,
                frame_id=p.frame_id,
                label=p.label,
                score=p.score,
                model_name=p.model_name,
                still_unknown=p.still_unknown,
                edge_label=p.edge_label,
                edge_score=p.edge_score,
                escalation_reason=p.reason,
                objects=[
                    common_pb2.Detection(
                        label=o.label,
                        score=o.score,
                        box=common_pb2.Box(
                            x_min=o.box[0], y_min=o.box[1], x_max=o.box[2], y_max=o.box[3]
                        ),
                    )
                    for o in p.objects
                ],
            )
        )
    elif isinstance(p, Command):
        msg.command.CopyFrom(common_pb2.Command(name=p.name, arguments=dict(p.arguments)))
    elif isinstance(p, ErrorEvent):
        msg.error.CopyFrom(
            common_pb2.ErrorEvent(code=p.code, message=p.message, frame_id=p.frame_id)
        )
    return msg


async def _next(iterator: AsyncIterator[Any]) -> Any:
    return await iterator.__anext__()


class DeviceGatewayServicer(gateway_pb2_grpc.DeviceGatewayServicer):
    """``DeviceGateway`` for devices of one trust domain."""

    def __init__(
        self,
        *,
        settings: GatewaySettings,
        gateway_id: str,
        engine: Detector,
        judge: IdentityJudge,
        authoriser: Authoriser,
        revocation: RevocationState,
        events: EventHub,
        metrics: GatewayMetrics,
        telemetry: TelemetryStore | None = None,
        detection_hook: DetectionHook | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        refusals: RefusalLog | None = None,
    ) -> None:
        self._settings = settings
        self._gateway_id = gateway_id
        self._engine = engine
        self._judge = judge
        self._authoriser = authoriser
        self._revocation = revocation
        self._events = events
        self._metrics = metrics
        self.telemetry = telemetry if telemetry is not None else TelemetryStore()
        self.detection_hook = detection_hook
        self._clock = clock
        limits = settings.limits
        self._frames = RateLimiter(rate=limits.frames_per_s, burst=limits.burst)
        self._reports = RateLimiter(rate=limits.frames_per_s, burst=limits.burst)
        self.live = LiveCalls(max_streams_per_device=limits.max_streams_per_device)
        #: Escalation marks of answers, given again with cached repeats (the bridge shares it).
        self.escalations = EscalationMemory()
        #: Audit of refused calls and messages, bounded per device (the MQTT bridge shares it).
        self.refusals = refusals or RefusalLog(
            interval_s=limits.refusal_log_interval_s,
            events_per_interval=limits.refusal_events_per_interval,
        )
        revocation.add_listener(self._on_revocation)

    def take_token(self, device_id: str, method: str) -> None:
        """Charge ``device_id``'s per-device budget for ``method``, or raise ``RateLimited``.

        Other front ends (the MQTT bridge) call this so that one device has one budget,
        whichever transport it uses.
        """
        (self._reports if method == "ReportTelemetry" else self._frames).take(device_id)

    def count_refusal(self, code: str, reason: str) -> None:
        """Count one refused call or message in ``denials_total`` (the MQTT bridge's too).

        Denials are refusals of who is asking or how much: not authenticated, not allowed,
        revoked, over budget, or a gateway that cannot judge (stale feed, no registry).
        """
        if code in _DENIAL_CODES:
            self._metrics.denials.labels(reason=reason).inc()

    # -- revocation -------------------------------------------------------------------------

    def _on_revocation(self, event: RevocationEvent) -> None:
        self._metrics.revocation_events.inc()
        self._authoriser.forget(event.device_id)
        n = self.live.cut(event.device_id, event.serial)
        if n:
            self._metrics.cut_calls.inc(n)
            _log.warning(
                "live calls cut", audit=True, device_id=event.device_id, calls=n, reason="revoked"
            )

    # -- call scaffolding -------------------------------------------------------------------

    async def _open(self, context: Context, method: str) -> tuple[PeerIdentity, str | None]:
        """Steps 1-3 of the module docstring; returns the peer and its region."""
        if not self._revocation.healthy():
            raise FeedStale(self._revocation.stale_for())
        peer = self._judge.judge(context.auth_context())
        structlog.contextvars.bind_contextvars(device_id=peer.device_id)
        info = await self._authoriser.check(peer.device_id, method, serial=peer.serial)
        # A revocation applied while the authoriser was waiting (a registry look-up on a cache
        # miss) found no live call of this device to cut: judge again now. Callers register
        # the call right after this returns, with no await in between, so no event can slip
        # through the gap.
        self._judge.recheck(peer)
        return peer, info.region

    def _status(self, method: str, exc: Exception) -> GrpcStatus:
        status = grpc_status(exc)
        if status is None:
            _log.exception("unexpected error", method=method)
            return GrpcStatus(grpc.StatusCode.INTERNAL, "internal error", (), "internal")
        self.count_refusal(status.code.name, status.reason)
        if status.reason != "idle":
            # The call's line: the first of each reason per device at once, then counted.
            fields: dict[str, Any] = {"method": method, "code": status.code.name}
            if isinstance(exc, Unauthenticated):
                fields["detail"] = exc.reason  # for the audit only, never for the caller
            device_id = structlog.contextvars.get_contextvars().get("device_id")
            self.refusals.refused(
                device_id if isinstance(device_id, str) else None,
                status.reason,
                transport="grpc",
                **fields,
            )
        return status

    async def _finish(
        self,
        context: Context,
        method: str,
        started: float,
        status: GrpcStatus | None,
        **fields: Any,
    ) -> None:
        """Count, log the call's one line, and abort with ``status`` when there is one."""
        code = status.code.name if status is not None else "OK"
        elapsed = time.perf_counter() - started
        self._metrics.requests.labels(method=method, code=code).inc()
        if not method.endswith("Detect") or method == "Detect":
            self._metrics.request_seconds.labels(method=method).observe(elapsed)
        if status is not None and status.reason not in ("idle", "internal"):
            # Refused: audited by ``_status`` through the refusal log, bounded per device.
            await context.abort(status.code, status.message, status.trailing_metadata)
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
            await context.abort(status.code, status.message, status.trailing_metadata)

    def _deadline(self, context: Context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def _infer(
        self,
        call: LiveCall,
        context: Context,
        frame: common_pb2.Frame,
        region: str | None,
    ) -> common_pb2.DetectionResult:
        result, decoded = await call.guard(
            self._engine.detect_with_frame(frame.image, deadline=self._deadline(context))
        )
        escalated = await self.escalations.marks(
            self.detection_hook,
            device_id=call.device_id,
            region=region,
            frame_id=frame.frame_id,
            result=result,
            frame=decoded,
        )
        return result_to_pb(
            result, frame_id=frame.frame_id, gateway_id=self._gateway_id, escalated=escalated
        )

    # -- DeviceGateway ----------------------------------------------------------------------

    async def Detect(
        self, request: common_pb2.Frame, context: Context
    ) -> common_pb2.DetectionResult:
        method, started = "Detect", time.perf_counter()
        structlog.contextvars.bind_contextvars(method=method)
        status: GrpcStatus | None = None
        response = common_pb2.DetectionResult()
        try:
            peer, region = await self._open(context, method)
            with self.live.register(peer.device_id, peer.serial, method, streaming=False) as call:
                self._frames.take(peer.device_id)
                response = await self._infer(call, context, request, region)
        except Exception as exc:  # noqa: BLE001 - the boundary: every error becomes a status
            status = self._status(method, exc)
        self._metrics.frames.labels(method=method, code=status.code.name if status else "OK").inc()
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
        status: GrpcStatus | None = None
        frames = 0
        idle_s = self._settings.limits.stream_idle_timeout_s
        gauge = self._metrics.live_streams.labels(method=method)
        try:
            peer, region = await self._open(context, method)
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
                        await call.guard(self._frames.wait_take(peer.device_id))
                        result = await self._infer(call, context, frame, region)
                        frames += 1
                        self._metrics.frames.labels(method=method, code="OK").inc()
                        self._metrics.request_seconds.labels(method=method).observe(
                            time.perf_counter() - frame_started
                        )
                        yield result
                finally:
                    gauge.dec()
        except Exception as exc:  # noqa: BLE001 - the boundary: every error becomes a status
            status = self._status(method, exc)
            self._metrics.frames.labels(method=method, code=status.code.name).inc()
        await self._finish(context, method, started, status, frames=frames)

    async def ReportTelemetry(
        self, request: common_pb2.Telemetry, context: Context
    ) -> common_pb2.Ack:
        method, started = "ReportTelemetry", time.perf_counter()
        structlog.contextvars.bind_contextvars(method=method)
        status: GrpcStatus | None = None
        ack = common_pb2.Ack()
        try:
            peer, _region = await self._open(context, method)
            self._reports.take(peer.device_id)
            record = _telemetry_from_pb(
                peer.device_id,
                request,
                max_readings=self._settings.limits.telemetry_max_readings,
                now=self._clock(),
            )
            self.telemetry.put(record)
            ack = common_pb2.Ack(id=uuid.uuid4().hex)
        except Exception as exc:  # noqa: BLE001 - the boundary: every error becomes a status
            status = self._status(method, exc)
        await self._finish(context, method, started, status, readings=len(request.readings))
        return ack

    async def Subscribe(
        self, request: gateway_pb2.SubscribeRequest, context: Context
    ) -> AsyncIterator[common_pb2.DeviceEvent]:
        method, started = "Subscribe", time.perf_counter()
        structlog.contextvars.bind_contextvars(method=method)
        status: GrpcStatus | None = None
        sent = 0
        gauge = self._metrics.live_streams.labels(method=method)
        try:
            peer, _region = await self._open(context, method)
            with self.live.register(peer.device_id, peer.serial, method, streaming=True) as call:
                gauge.inc()
                # The device id comes from the certificate; the request has no device field,
                # so no device can ask for another's events.
                events = self._events.subscribe(peer.device_id, request.after_event_id[:128])
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
