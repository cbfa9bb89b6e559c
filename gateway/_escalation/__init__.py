"""Escalation of what the edge model cannot name to the core's larger models.

``edgeward gateway run`` finds :func:`plugin` when the ``[escalation]`` table is present.
Embedded, the gateway service builds one :class:`Escalator` from the ``[escalation]`` table
(:class:`EscalationSettings`, validated with ``GatewaySettings.section``), calls
:meth:`Escalator.escalate` after each edge detection, marks the result with
:func:`mark_detection_result`, and passes ``EventHub.publish`` as the sink of answers.

Errors (all :class:`gateway.errors.GatewayError`)::

    EscalationError
    ├── OutboxFull              new escalations refused; stored ones kept
    ├── RedactionUnavailable    faces must be blurred and the face model cannot run
    └── EscalationFailed        the core refused an escalation for good
"""

from gateway.errors import EscalationError, EscalationFailed, OutboxFull, RedactionUnavailable

from ._client import MAX_MESSAGE_BYTES, CoreClient, CoreUnavailable
from ._config import EscalationSettings, RegionPolicy
from ._crop import FaceRedactor, Upload, crop_with_margin, prepare_upload
from ._escalator import (
    AnswerSink,
    EscalationOutcome,
    Escalator,
    PendingEscalation,
    RefusedEscalation,
    mark_detection_result,
)
from ._outbox import Outbox, OutboxEntry, StoredAnswer
from ._plugin import EscalationPlugin, plugin
from ._policy import Budgets, Candidate, EscalationReason, select

__all__ = [
    "MAX_MESSAGE_BYTES",
    "AnswerSink",
    "Budgets",
    "Candidate",
    "CoreClient",
    "CoreUnavailable",
    "EscalationError",
    "EscalationFailed",
    "EscalationOutcome",
    "EscalationPlugin",
    "EscalationReason",
    "EscalationSettings",
    "Escalator",
    "FaceRedactor",
    "Outbox",
    "OutboxEntry",
    "OutboxFull",
    "PendingEscalation",
    "RedactionUnavailable",
    "RefusedEscalation",
    "RegionPolicy",
    "StoredAnswer",
    "Upload",
    "crop_with_margin",
    "mark_detection_result",
    "plugin",
    "prepare_upload",
    "select",
]
