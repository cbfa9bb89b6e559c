"""The device-facing gRPC side of the gateway (private; see :mod:`gateway`)."""

from gateway._grpc._auth import (
    Authoriser,
    CoreDeviceDirectory,
    DeviceDirectory,
    DeviceInfo,
    RegistryDeviceDirectory,
    StaticDeviceDirectory,
)
from gateway._grpc._identity import IdentityJudge, PeerIdentity
from gateway._grpc._limits import LiveCall, LiveCalls, RateLimiter
from gateway._grpc._server import SERVICE_NAME, GatewayServer
from gateway._grpc._servicer import (
    WHOLE_FRAME_LABEL,
    DetectionHook,
    Detector,
    DeviceGatewayServicer,
    EscalationMarks,
    EscalationMemory,
    TelemetryRecord,
    TelemetryStore,
    event_to_pb,
    result_to_pb,
)

__all__ = [
    "SERVICE_NAME",
    "WHOLE_FRAME_LABEL",
    "Authoriser",
    "CoreDeviceDirectory",
    "DetectionHook",
    "Detector",
    "DeviceDirectory",
    "DeviceGatewayServicer",
    "DeviceInfo",
    "EscalationMarks",
    "EscalationMemory",
    "GatewayServer",
    "IdentityJudge",
    "LiveCall",
    "LiveCalls",
    "PeerIdentity",
    "RateLimiter",
    "RegistryDeviceDirectory",
    "StaticDeviceDirectory",
    "TelemetryRecord",
    "TelemetryStore",
    "event_to_pb",
    "result_to_pb",
]
