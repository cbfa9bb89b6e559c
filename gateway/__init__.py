"""edgeward's edge gateway: mutual-TLS gRPC for devices, live revocation, local inference.

The public surface is what ``__all__`` lists; the ``_modules`` behind it are private. Names are
imported lazily (PEP 562), so ``import gateway._settings`` — which the core and the CLI do —
does not load onnxruntime. Nothing here reads the environment or configures logging; the
entry point (``edgeward gateway run``) does, once.

Typical embedding::

    settings = load_gateway_settings(Path("gateway.toml"))
    async with GatewayService(settings) as service:
        await service.run_until_signalled()

The surface, by who needs it:

- running a gateway: :class:`GatewayService`, its settings and :func:`load_gateway_settings`,
  :func:`describe_settings` (every key), :func:`find_models_dir`;
- plug-in authors: :class:`GatewayRuntime` (what a plug-in gets), the :class:`FrontDoor` and
  its :data:`DetectionHook` (called with an :class:`InferenceResult`, whose detections are
  :class:`Detection` with a :class:`Box`), events (an :class:`EscalationAnswer` names
  :class:`AnsweredObject`), revocation
  listeners, metrics, and the plug-ins' own tables (:class:`MqttSettings`,
  :class:`EscalationSettings` with its :class:`RegionPolicy`);
- running a core (the same package holds the core role): :class:`CoreServer`,
  :class:`CoreSettings`, :func:`load_core_settings`, and :class:`EscalateService` with its
  :class:`CoreEscalationSettings` to answer escalations (any :class:`EscalateHandler` will do:
  it is the type of ``CoreServer(settings, escalate=…)``);
- running inference alone: :class:`InferenceEngine`, with its optional :class:`ResponseCache`
  and an :class:`EngineObserver` for metrics (told each batch and each cache outcome, a
  :data:`CacheKind`);
- wiring processes that must know a port before they bind it: :func:`free_port`.

Everything else (the transports, the front door's stages, the channels to the core) is
private; the command line, the benchmarks and the tests use only these names (a test that
exercises one internal unit on its own names it, with the reason), and a test holds them to it.
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
        describe_settings,
        load_gateway_settings,
    )
    from gateway._core import CoreServer, CoreSettings, EscalateHandler, load_core_settings
    from gateway._core._escalate import CoreEscalationSettings, EscalateService
    from gateway._door import (
        DetectionHook,
        DeviceDirectory,
        DeviceInfo,
        FrontDoor,
        StaticDeviceDirectory,
        TelemetryRecord,
        event_to_pb,
    )
    from gateway._escalation import EscalationSettings, RegionPolicy
    from gateway._events import (
        AnsweredObject,
        Command,
        DeviceEvent,
        ErrorEvent,
        EscalationAnswer,
        EventHub,
        EventPayload,
    )
    from gateway._inference import (
        Box,
        CacheKind,
        Detection,
        EngineObserver,
        InferenceEngine,
        InferenceResult,
        ResponseCache,
    )
    from gateway._metrics import GatewayMetrics
    from gateway._models import MODELS_NOT_FOUND_HINT, find_models_dir
    from gateway._mqtt import MqttSettings
    from gateway._ports import free_port
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
    "describe_settings": "gateway._config",
    "load_gateway_settings": "gateway._config",
    "CoreServer": "gateway._core",
    "CoreSettings": "gateway._core",
    "load_core_settings": "gateway._core",
    "EscalateHandler": "gateway._core",
    "CoreEscalationSettings": "gateway._core._escalate",
    "EscalateService": "gateway._core._escalate",
    "EscalationSettings": "gateway._escalation",
    "RegionPolicy": "gateway._escalation",
    "InferenceEngine": "gateway._inference",
    "InferenceResult": "gateway._inference",
    "Box": "gateway._inference",
    "Detection": "gateway._inference",
    "CacheKind": "gateway._inference",
    "EngineObserver": "gateway._inference",
    "ResponseCache": "gateway._inference",
    "MODELS_NOT_FOUND_HINT": "gateway._models",
    "find_models_dir": "gateway._models",
    "MqttSettings": "gateway._mqtt",
    "free_port": "gateway._ports",
    "AnsweredObject": "gateway._events",
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
    "MODELS_NOT_FOUND_HINT",
    "AnsweredObject",
    "AuthorisationSettings",
    "Box",
    "CacheKind",
    "CacheSettings",
    "Command",
    "ConfigError",
    "CoreEscalationSettings",
    "CoreServer",
    "CoreSettings",
    "Detection",
    "DetectionHook",
    "DeviceDirectory",
    "DeviceEvent",
    "DeviceInfo",
    "DeviceRevoked",
    "EngineObserver",
    "ErrorEvent",
    "EscalateHandler",
    "EscalateService",
    "EscalationAnswer",
    "EscalationSettings",
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
    "InferenceEngine",
    "InferenceResult",
    "InferenceSettings",
    "LimitsSettings",
    "MqttSettings",
    "PermissionDenied",
    "RateLimited",
    "RegionPolicy",
    "ResponseCache",
    "RevocationEvent",
    "RevocationListener",
    "RevocationState",
    "StaticDeviceDirectory",
    "Status",
    "TelemetryRecord",
    "Unauthenticated",
    "describe_settings",
    "event_to_pb",
    "find_models_dir",
    "free_port",
    "load_core_settings",
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
