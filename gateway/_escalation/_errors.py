"""Errors of the escalation component (all under :class:`gateway.errors.GatewayError`).

::

    GatewayError
    └── EscalationError
        ├── OutboxFull              the outbox holds max_outbox_entries: new ones refused
        ├── RedactionUnavailable    faces must be blurred and the face model cannot run
        └── EscalationFailed        the core refused an escalation for good (not retried)
"""

from __future__ import annotations

from gateway.errors import GatewayError

__all__ = ["EscalationError", "EscalationFailed", "OutboxFull", "RedactionUnavailable"]


class EscalationError(GatewayError):
    """Root of the escalation component's errors."""


class OutboxFull(EscalationError):
    """The outbox is full; the escalation was refused and nothing stored was dropped."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"escalation outbox is full ({limit} entries waiting for the core); "
            "new escalations are refused until it drains"
        )
        self.limit = limit


class RedactionUnavailable(EscalationError):
    """The region requires faces blurred and the face model cannot run: nothing is sent."""


class EscalationFailed(EscalationError):
    """The core refused the escalation with a final status; ``code`` is its gRPC name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"core refused the escalation: {code}: {message}")
        self.code = code
        self.detail = message
