"""What the device sees of an escalation: why it happened, and every object the core named."""

from __future__ import annotations

from device_sdk import DetectionResult, DeviceEvent, EscalationAnswer
from protos.edgeward.v1 import common_pb2


def test_a_detection_says_why_it_was_escalated() -> None:
    msg = common_pb2.DetectionResult(frame_id="f1")
    msg.detections.add(
        label="Person",
        score=0.6,
        escalated=True,
        escalation_id="esc-1",
        escalation_reason="uncertain",
    )
    msg.detections.add(label="Cat", score=0.9)
    result = DetectionResult.from_proto(msg)
    assert [(d.escalation_id, d.escalation_reason) for d in result.detections] == [
        ("esc-1", "uncertain"),
        ("", ""),
    ]


def test_an_answer_carries_every_object_the_core_named() -> None:
    answer = common_pb2.EscalationAnswer(
        escalation_id="esc-2", label="Dog", score=0.97, escalation_reason="empty_frame"
    )
    for x in (0.1, 0.4, 0.7):
        answer.objects.add(
            label="Dog",
            score=0.95,
            box=common_pb2.Box(x_min=x, y_min=0.2, x_max=x + 0.2, y_max=0.9),
        )
    event = DeviceEvent.from_proto(common_pb2.DeviceEvent(event_id="e1", escalation=answer))
    assert isinstance(event.kind, EscalationAnswer)
    assert event.kind.escalation_reason == "empty_frame"
    assert [(o.label, round(o.box.x_min, 2)) for o in event.kind.objects] == [
        ("Dog", 0.1),
        ("Dog", 0.4),
        ("Dog", 0.7),
    ]
