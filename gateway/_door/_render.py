"""Rendering for the wire: domain results and events as protobuf messages, for both transports.

gRPC sends these messages as they are; the MQTT bridge sends them as protobuf or as JSON
(protobuf's JSON mapping), see :func:`encode`.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, timestamp_pb2

from gateway._door._marks import WHOLE_FRAME_LABEL, EscalationMarks
from gateway._events import Command, DeviceEvent, ErrorEvent, EscalationAnswer
from gateway._inference import InferenceResult
from protos.edgeward.v1 import common_pb2
from protos.edgeward.v1.wire import JSON_CONTENT_TYPE, PROTOBUF_CONTENT_TYPE

__all__ = [
    "JSON_CONTENT_TYPE",
    "PROTOBUF_CONTENT_TYPE",
    "encode",
    "event_to_pb",
    "result_to_pb",
]


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
    """A stored event as the wire's ``DeviceEvent`` (``Subscribe`` and ``devices/<id>/events``)."""
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


def encode(msg: Any, protobuf: bool) -> tuple[bytes, str]:
    """``msg`` as an MQTT payload and its content type: protobuf, or protobuf's JSON mapping."""
    if protobuf:
        return msg.SerializeToString(), PROTOBUF_CONTENT_TYPE
    text = json_format.MessageToJson(msg, indent=None, always_print_fields_with_no_presence=True)
    return text.encode(), JSON_CONTENT_TYPE
