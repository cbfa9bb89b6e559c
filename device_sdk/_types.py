"""Domain types of the device SDK, and their conversion from and to the wire messages.

Protobuf messages stay at the edge of the SDK: callers see these frozen dataclasses, never a
``*_pb2`` object, so the wire format can evolve without breaking firmware code.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2

from protos.edgeward.v1 import common_pb2

__all__ = [
    "Box",
    "ClientState",
    "Command",
    "Detection",
    "DetectionResult",
    "DeviceEvent",
    "ErrorEvent",
    "EscalationAnswer",
    "FrameOutcome",
    "FrameRejected",
    "GatewayDirectory",
    "GatewayInfo",
    "Telemetry",
    "Transport",
]


class Transport(enum.StrEnum):
    """How frames travel to the gateway."""

    GRPC = "grpc"
    #: One long-lived ``StreamDetect`` call per gateway instead of a unary call per frame.
    GRPC_STREAM = "grpc-stream"
    MQTT = "mqtt"


class ClientState(enum.StrEnum):
    """Lifecycle of a :class:`~device_sdk.DeviceClient`.

    ``FAILED`` is final: the device was revoked or its certificate expired
    (:attr:`DeviceClient.final_error` says which).
    """

    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class GatewayInfo:
    """One gateway of the signed directory."""

    gateway_id: str
    region: str
    grpc_address: str
    mqtt_address: str = ""

    @classmethod
    def from_proto(cls, msg: common_pb2.GatewayEntry) -> GatewayInfo:
        return cls(msg.gateway_id, msg.region, msg.grpc_address, msg.mqtt_address)

    def to_proto(self) -> common_pb2.GatewayEntry:
        return common_pb2.GatewayEntry(
            gateway_id=self.gateway_id,
            region=self.region,
            grpc_address=self.grpc_address,
            mqtt_address=self.mqtt_address,
        )


@dataclass(frozen=True, slots=True)
class GatewayDirectory:
    """The verified gateway directory: which gateways serve this trust domain."""

    trust_domain: str
    version: int
    issued_at: dt.datetime | None
    gateways: tuple[GatewayInfo, ...]


@dataclass(frozen=True, slots=True)
class Box:
    """A box normalised to the frame (0..1, origin top left)."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float


@dataclass(frozen=True, slots=True)
class Detection:
    """One object found in a frame.

    ``escalated`` means the gateway asked its core for a better answer; that answer arrives
    later as a :class:`DeviceEvent` whose :class:`EscalationAnswer` carries ``escalation_id``.
    ``escalation_reason`` says why: ``uncertain`` (a score in the region's uncertainty band),
    ``outside_edge_set`` (a label the region does not trust the edge with) or
    ``empty_frame`` (the edge saw nothing; the detection covers the frame).
    """

    label: str
    score: float
    box: Box
    escalated: bool = False
    escalation_id: str = ""
    escalation_reason: str = ""


@dataclass(frozen=True, slots=True)
class DetectionResult:
    """The gateway's answer for one frame."""

    frame_id: str
    detections: tuple[Detection, ...]
    model_name: str
    model_version: str
    inference_ms: float
    from_cache: bool
    gateway_id: str
    transport: Transport = Transport.GRPC

    @classmethod
    def from_proto(
        cls, msg: common_pb2.DetectionResult, *, transport: Transport = Transport.GRPC
    ) -> DetectionResult:
        return cls(
            frame_id=msg.frame_id,
            detections=tuple(
                Detection(
                    label=d.label,
                    score=d.score,
                    box=Box(d.box.x_min, d.box.y_min, d.box.x_max, d.box.y_max),
                    escalated=d.escalated,
                    escalation_id=d.escalation_id,
                    escalation_reason=d.escalation_reason,
                )
                for d in msg.detections
            ),
            model_name=msg.model_name,
            model_version=msg.model_version,
            inference_ms=msg.inference_ms,
            from_cache=msg.from_cache,
            gateway_id=msg.gateway_id,
            transport=transport,
        )


@dataclass(frozen=True, slots=True)
class FrameRejected:
    """A frame the gateway refused for a reason that retrying cannot fix (a corrupt image,
    a device type not allowed to send frames). It has left the queue; ``reason`` is the
    server's own words and ``code`` the gRPC status name (or an MQTT error code)."""

    frame_id: str
    code: str
    reason: str
    gateway_id: str = ""


#: What :meth:`DeviceClient.results` yields for each submitted frame.
FrameOutcome = DetectionResult | FrameRejected


@dataclass(frozen=True, slots=True)
class EscalationAnswer:
    """The core's final answer for an escalated detection."""

    escalation_id: str
    frame_id: str
    label: str
    score: float
    model_name: str
    still_unknown: bool
    edge_label: str
    edge_score: float
    #: Every object the core is confident about, most probable first; boxes relative to
    #: what was escalated (the crop, or the whole frame). Empty when ``still_unknown``.
    objects: tuple[Detection, ...] = ()
    #: Why it was escalated: ``uncertain``, ``outside_edge_set`` or ``empty_frame``.
    escalation_reason: str = ""


@dataclass(frozen=True, slots=True)
class Command:
    """A command sent to the device."""

    name: str
    arguments: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """The gateway's complaint about a message the device sent."""

    code: str
    message: str
    frame_id: str


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """An event for this device: an escalation answer, a command or an error."""

    event_id: str
    at: dt.datetime | None
    kind: EscalationAnswer | Command | ErrorEvent | None

    @classmethod
    def from_proto(cls, msg: common_pb2.DeviceEvent) -> DeviceEvent:
        which = msg.WhichOneof("kind")
        kind: EscalationAnswer | Command | ErrorEvent | None = None
        if which == "escalation":
            e = msg.escalation
            kind = EscalationAnswer(
                escalation_id=e.escalation_id,
                frame_id=e.frame_id,
                label=e.label,
                score=e.score,
                model_name=e.model_name,
                still_unknown=e.still_unknown,
                edge_label=e.edge_label,
                edge_score=e.edge_score,
                escalation_reason=e.escalation_reason,
                objects=tuple(
                    Detection(
                        label=o.label,
                        score=o.score,
                        box=Box(o.box.x_min, o.box.y_min, o.box.x_max, o.box.y_max),
                    )
                    for o in e.objects
                ),
            )
        elif which == "command":
            kind = Command(msg.command.name, dict(msg.command.arguments))
        elif which == "error":
            kind = ErrorEvent(msg.error.code, msg.error.message, msg.error.frame_id)
        at = msg.at.ToDatetime(tzinfo=dt.UTC) if msg.HasField("at") else None
        return cls(event_id=msg.event_id, at=at, kind=kind)


@dataclass(frozen=True, slots=True)
class Telemetry:
    """A telemetry report. ``battery_percent`` is -1 for a device without a battery;
    ``readings`` holds at most 32 free-form numeric values."""

    battery_percent: float = -1.0
    temperature_c: float = 0.0
    firmware_version: str = ""
    readings: Mapping[str, float] = field(default_factory=dict)
    reported_at: dt.datetime | None = None

    def to_proto(self, *, now: dt.datetime) -> common_pb2.Telemetry:
        if len(self.readings) > 32:
            raise ValueError("telemetry carries at most 32 readings")
        msg = common_pb2.Telemetry(
            battery_percent=self.battery_percent,
            temperature_c=self.temperature_c,
            firmware_version=self.firmware_version,
            readings={str(k): float(v) for k, v in self.readings.items()},
        )
        msg.reported_at.CopyFrom(timestamp(self.reported_at or now))
        return msg


def timestamp(when: dt.datetime) -> timestamp_pb2.Timestamp:
    """A protobuf timestamp of an aware datetime."""
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when.astimezone(dt.UTC))
    return ts
