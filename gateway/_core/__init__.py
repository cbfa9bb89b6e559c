"""The core role: enrolment, the revocation feed and the gateway directory (escalation plugs in).

Run by ``edgeward core run``; embeddable as ``async with CoreServer(settings) as core: …``.
"""

from gateway._core._config import (
    ENV_PREFIX,
    CoreSettings,
    StaticGateway,
    TokenAttempts,
    load_core_settings,
    split_address,
)
from gateway._core._core_service import CoreService, EscalateHandler, RevocationFeed
from gateway._core._enrollment_service import EnrollmentService
from gateway._core._server import CoreServer, ensure_server_identity
from gateway._core._status import FINAL_METADATA_KEY, status_for

__all__ = [
    "ENV_PREFIX",
    "FINAL_METADATA_KEY",
    "CoreServer",
    "CoreService",
    "CoreSettings",
    "EnrollmentService",
    "EscalateHandler",
    "RevocationFeed",
    "StaticGateway",
    "TokenAttempts",
    "ensure_server_identity",
    "load_core_settings",
    "split_address",
    "status_for",
]
