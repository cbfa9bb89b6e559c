"""What the core console keeps in memory: escalations (bounded in count and bytes, keyed by
gateway) and the audit ring (audit lines only, after the redaction of secret keys)."""

from __future__ import annotations

import structlog

from edgeward._logging import configure_logging
from gateway._console import AuditRing, EscalationLog, install_audit_ring, uninstall_audit_ring
from protos.edgeward.v1 import common_pb2, core_pb2


def _request(escalation_id: str, size: int, device: str = "cam-1") -> core_pb2.EscalationRequest:
    return core_pb2.EscalationRequest(
        escalation_id=escalation_id, device_id=device, image=b"\xff\xd8" + b"x" * size
    )


def _result(label: str) -> core_pb2.EscalationResult:
    return core_pb2.EscalationResult(answer=common_pb2.EscalationAnswer(label=label, score=0.9))


def test_escalations_are_bounded_in_count_and_bytes() -> None:
    log = EscalationLog(max_entries=3, max_bytes=10_000)
    for i in range(5):
        log.add("gw-a", _request(f"e-{i}", 100), _result("Cat"), 5.0)
    assert [r.escalation_id for r in log.recent()] == ["e-4", "e-3", "e-2"]
    log.add("gw-a", _request("big", 9_000), _result("Dog"), 5.0)
    kept = [r.escalation_id for r in log.recent()]
    assert kept[0] == "big"
    assert sum(len(r.image) for r in log.recent()) <= 10_000
    # The same id from another gateway is another escalation.
    log.add("gw-b", _request("big", 10), _result("Cup"), 1.0)
    assert log.get("gw-a", "big").label == "Dog"  # type: ignore[union-attr]
    assert log.get("gw-b", "big").label == "Cup"  # type: ignore[union-attr]
    assert log.get("gw-c", "big") is None
    assert log.get("gw-a", "big").image_type == "image/jpeg"  # type: ignore[union-attr]


def test_the_audit_ring_keeps_audit_lines_only_and_redacted() -> None:
    configure_logging(level="info", json=True)
    ring = AuditRing(size=2)
    install_audit_ring(ring)
    try:
        log = structlog.get_logger("test")
        log.info("not audited", device_id="cam-1")
        log.info("first", audit=True, device_id="cam-1", token="cam-1.secret")
        log.warning("second", audit=True, reason="x")
        log.info("third", audit=True, reason="y")
    finally:
        uninstall_audit_ring(ring)
    entries = list(ring.entries())
    assert [e.event for e in entries] == ["third", "second"]
    assert entries[1].level == "warning"
    assert entries[0].matches("y")
    assert not entries[0].matches("cam-1")
    ring2 = AuditRing()
    install_audit_ring(ring2)
    try:
        structlog.get_logger("test").info("t", audit=True, token="cam-1.secret")
    finally:
        uninstall_audit_ring(ring2)
    (entry,) = ring2.entries()
    assert entry.fields["token"] == "[redacted]"
