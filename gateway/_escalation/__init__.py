"""Escalation of what the edge model cannot name to the core's larger models.

``edgeward gateway run`` finds :func:`plugin` when the ``[escalation]`` table is present.
The plug-in builds one :class:`Escalator` from the ``[escalation]`` table
(:class:`EscalationSettings`, validated with ``GatewaySettings.section``) and installs its
hook on the gateway's front door, which calls :meth:`Escalator.escalate` after each fresh edge
detection and renders the marks into the answer (``gateway._door.result_to_pb``);
``EventHub.publish`` is the sink of answers.

Errors (all :class:`gateway.errors.GatewayError`)::

    EscalationError
    ├── OutboxFull              new escalations refused; stored ones kept
    ├── RedactionUnavailable    faces must be blurred and the face model cannot run
    ├── EscalationFailed        the core refused an escalation for good
    └── CoreUnavailable         the core could not answer now: retried later
"""

from gateway.errors import (
    CoreUnavailable,
    EscalationError,
    EscalationFailed,
    OutboxFull,
    RedactionUnavailable,
)

from ._client import MAX_MESSAGE_BYTES, CoreClient
from ._config import EscalationSettings, RegionPolicy
from ._crop import FaceRedactor, Upload, crop_with_margin, prepare_upload
from ._escalator import (
    AnswerSink,
    EscalationOutcome,
    Escalator,
    PendingEscalation,
    RefusedEscalation,
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
    "plugin",
    "prepare_upload",
    "select",
]
