"""The gateway's front door (private; see :mod:`gateway`): one way in for every transport.

:class:`FrontDoor` owns admission (revocation feed fresh → identity → authorisation by device
type → the device's budget), the frame pipeline (a fair turn per device → engine → escalation
hook → marks), the one telemetry store, refusals (the one status mapping, counts, bounded
audit lines and error events) and rendering for the wire. The gRPC servicer
(:mod:`gateway._grpc`) keeps peer-certificate judging and its live calls; the MQTT bridge
(:mod:`gateway._mqtt`) keeps topics, acknowledgements and de-duplication. Neither transport
imports the other.
"""

from gateway._door._authorise import (
    Authoriser,
    CoreDeviceDirectory,
    DeviceDirectory,
    DeviceInfo,
    RegistryDeviceDirectory,
    StaticDeviceDirectory,
)
from gateway._door._budget import RateLimiter
from gateway._door._fair import FairQueue
from gateway._door._frontdoor import Admitted, Detector, FrontDoor, Identity, TopicIdentity
from gateway._door._marks import (
    WHOLE_FRAME_LABEL,
    DetectionHook,
    EscalationMarks,
    EscalationMemory,
)
from gateway._door._render import encode, event_to_pb, result_to_pb
from gateway._door._telemetry_store import (
    TelemetryRecord,
    TelemetryStore,
    record_from_fields,
    telemetry_from_pb,
)

__all__ = [
    "WHOLE_FRAME_LABEL",
    "Admitted",
    "Authoriser",
    "CoreDeviceDirectory",
    "DetectionHook",
    "Detector",
    "DeviceDirectory",
    "DeviceInfo",
    "EscalationMarks",
    "EscalationMemory",
    "FairQueue",
    "FrontDoor",
    "Identity",
    "RateLimiter",
    "RegistryDeviceDirectory",
    "StaticDeviceDirectory",
    "TelemetryRecord",
    "TelemetryStore",
    "TopicIdentity",
    "encode",
    "event_to_pb",
    "record_from_fields",
    "result_to_pb",
    "telemetry_from_pb",
]
