"""edgeward's edge gateway: mutual-TLS gRPC for devices, live revocation, local inference.

The public surface is what ``__all__`` lists; the ``_modules`` behind it are private. Names are
imported lazily (PEP 562), so ``import gateway._settings`` — which the core and the CLI do —
does not load onnxruntime. Nothing here reads the environment or configures logging; the
entry point (``edgeward gateway run``) does, once.

Typical embedding::

    settings = load_gateway_settings(Path("gateway.toml"))
    async with GatewayService(settings) as service:
        await service.run_until_signalled()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway._config import (
        AuthorisationSettings,
        CacheSettings,
        GatewaySettings,
        InferenceSettings,
        LimitsSettings,
        load_gateway_settings,
    )
    from gateway._door import (
        DetectionHook,
        DeviceDirectory,
        DeviceInfo,
        FrontDoor,
        StaticDeviceDirectory,
        TelemetryRecord,
        event_to_pb,
    )
    from gateway._events import (
        Command,
        DeviceEvent,
        ErrorEvent,
        EscalationAnswer,
        EventHub,
        EventPayload,
    )
    from gateway._metrics import GatewayMetrics
    from gateway._revocation import RevocationEvent, RevocationListener, RevocationState
    from gateway._service import GatewayPlugin, GatewayRuntime, GatewayService
    from gateway._status import Status, status_of
    from gateway.errors import (
        ConfigError,
        DeviceRevoked,
        FeedStale,
        GatewayError,
        PermissionDenied,
        RateLimited,
        Unauthenticated,
    )

_EXPORTS: dict[str, str] = {
    "AuthorisationSettings": "gateway._config",
    "CacheSettings": "gateway._config",
    "GatewaySettings": "gateway._config",
    "InferenceSettings": "gateway._config",
    "LimitsSettings": "gateway._config",
    "load_gateway_settings": "gateway._config",
    "Command": "gateway._events",
    "DeviceEvent": "gateway._events",
    "ErrorEvent": "gateway._events",
    "EscalationAnswer": "gateway._events",
    "EventHub": "gateway._events",
    "EventPayload": "gateway._events",
    "DetectionHook": "gateway._door",
    "DeviceDirectory": "gateway._door",
    "DeviceInfo": "gateway._door",
    "FrontDoor": "gateway._door",
    "StaticDeviceDirectory": "gateway._door",
    "TelemetryRecord": "gateway._door",
    "event_to_pb": "gateway._door",
    "GatewayMetrics": "gateway._metrics",
    "RevocationEvent": "gateway._revocation",
    "RevocationListener": "gateway._revocation",
    "RevocationState": "gateway._revocation",
    "GatewayPlugin": "gateway._service",
    "GatewayRuntime": "gateway._service",
    "GatewayService": "gateway._service",
    "ConfigError": "gateway.errors",
    "DeviceRevoked": "gateway.errors",
    "FeedStale": "gateway.errors",
    "GatewayError": "gateway.errors",
    "PermissionDenied": "gateway.errors",
    "RateLimited": "gateway.errors",
    "Unauthenticated": "gateway.errors",
    "Status": "gateway._status",
    "status_of": "gateway._status",
}

__all__ = [
    "AuthorisationSettings",
    "CacheSettings",
    "Command",
    "ConfigError",
    "DetectionHook",
    "DeviceDirectory",
    "DeviceEvent",
    "DeviceInfo",
    "DeviceRevoked",
    "ErrorEvent",
    "EscalationAnswer",
    "EventHub",
    "EventPayload",
    "FeedStale",
    "FrontDoor",
    "GatewayError",
    "GatewayMetrics",
    "GatewayPlugin",
    "GatewayRuntime",
    "GatewayService",
    "GatewaySettings",
    "InferenceSettings",
    "LimitsSettings",
    "PermissionDenied",
    "RateLimited",
    "RevocationEvent",
    "RevocationListener",
    "RevocationState",
    "StaticDeviceDirectory",
    "Status",
    "TelemetryRecord",
    "Unauthenticated",
    "event_to_pb",
    "load_gateway_settings",
    "status_of",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
