"""edgeward's device SDK: what device firmware embeds to talk to edgeward gateways.

* :class:`DeviceClient` (async) and :class:`SyncDeviceClient` (blocking) load the identity
  written by ``edgeward enroll``, pick the nearest gateway from the signed directory, send
  frames over gRPC (unary or a stream) or MQTT through an on-disk outbox
  (store-and-forward), receive detections and escalation answers, report telemetry, and
  renew the certificate in the background.
* Errors live in :mod:`device_sdk.errors`; ``DeviceRevoked`` and ``CertificateExpired`` are
  final.

The public surface is what ``__all__`` lists. The SDK never reads the environment and never
configures logging (it logs through structlog; the application decides where that goes). It
never imports the gateway package: a device installs no inference runtime.
"""

from device_sdk._client import ClientOptions, ClientStats, DeviceClient
from device_sdk._enrollment import EnrollmentResult, enroll, renew
from device_sdk._identity import DeviceIdentity, parse_gateway_directory
from device_sdk._queue import QueueStats
from device_sdk._renewal import RenewalPlan, plan_renewal
from device_sdk._sync import SyncDeviceClient
from device_sdk._types import (
    Box,
    ClientState,
    Command,
    Detection,
    DetectionResult,
    DeviceEvent,
    ErrorEvent,
    EscalationAnswer,
    FrameOutcome,
    FrameRejected,
    GatewayDirectory,
    GatewayInfo,
    Telemetry,
    Transport,
)
from device_sdk.errors import (
    AlreadyEnrolled,
    CertificateExpired,
    ClientClosed,
    DeviceRevoked,
    DeviceSdkError,
    EnrollmentRefused,
    EnrollmentUnavailable,
    IdentityNotWritable,
    InvalidDirectory,
    NoGateway,
    NotEnrolled,
    QueueFull,
    RequestRefused,
)

__all__ = [
    "AlreadyEnrolled",
    "Box",
    "CertificateExpired",
    "ClientClosed",
    "ClientOptions",
    "ClientState",
    "ClientStats",
    "Command",
    "Detection",
    "DetectionResult",
    "DeviceClient",
    "DeviceEvent",
    "DeviceIdentity",
    "DeviceRevoked",
    "DeviceSdkError",
    "EnrollmentRefused",
    "EnrollmentResult",
    "EnrollmentUnavailable",
    "ErrorEvent",
    "EscalationAnswer",
    "FrameOutcome",
    "FrameRejected",
    "GatewayDirectory",
    "GatewayInfo",
    "IdentityNotWritable",
    "InvalidDirectory",
    "NoGateway",
    "NotEnrolled",
    "QueueFull",
    "QueueStats",
    "RenewalPlan",
    "RequestRefused",
    "SyncDeviceClient",
    "Telemetry",
    "Transport",
    "enroll",
    "parse_gateway_directory",
    "plan_renewal",
    "renew",
]
