"""Errors raised by :mod:`gateway`, and the one place where they become gRPC statuses.

::

    GatewayError
    ├── Unauthenticated          no usable device identity on the connection   UNAUTHENTICATED
    ├── PermissionDenied         identity known, method not allowed             PERMISSION_DENIED
    │   └── DeviceRevoked        the device or certificate is revoked (final)  PERMISSION_DENIED
    │                            + trailing metadata ``edgeward-final: revoked``
    ├── FeedStale                revocation feed lost past its bound           UNAVAILABLE
    ├── RegistryUnavailable      device facts cannot be looked up              UNAVAILABLE
    ├── RateLimited              the device sends faster than its budget       RESOURCE_EXHAUSTED
    ├── TooManyStreams           the device holds its limit of open streams    RESOURCE_EXHAUSTED
    ├── InvalidRequest           a field out of bounds (telemetry and the like) INVALID_ARGUMENT
    └── StreamIdle               a stream sent nothing for the idle timeout    DEADLINE_EXCEEDED

    Inference errors (defined by the engine, mapped here, not re-parented):
    InferenceError
    ├── Overloaded               queue full                                    RESOURCE_EXHAUSTED
    ├── DeadlineExceeded                                                       DEADLINE_EXCEEDED
    ├── ShuttingDown                                                           UNAVAILABLE
    └── ProviderUnavailable      (start-up only)                               UNAVAILABLE
    InvalidImage (ValueError)    not a JPEG/PNG, corrupt, too big              INVALID_ARGUMENT

    ConfigError                  (``gateway._settings``, shared with the core) a bad key,
                                 raised at start-up only; re-exported here

The inference errors and ``ConfigError`` keep their own roots (their modules are lower layers
and must not import this one); :data:`InferenceErrors` names the former so callers can catch
both trees with ``except (GatewayError, *InferenceErrors)``.

:func:`grpc_status` is the single mapping from a domain error to a gRPC status; the servicers
raise and a wrapper around every handler calls it (they never abort by hand). Messages are
safe to send to the caller: they never carry a key, a token or a certificate. An
authentication failure says little to the caller; the audit log gets the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from gateway._inference import (
    DeadlineExceeded,
    InferenceError,
    InvalidImage,
    Overloaded,
    ShuttingDown,
)
from gateway._settings import ConfigError

__all__ = [
    "FINAL_METADATA_KEY",
    "ConfigError",
    "DeadlineExceeded",
    "DeviceRevoked",
    "FeedStale",
    "GatewayError",
    "GrpcStatus",
    "InferenceError",
    "InferenceErrors",
    "InvalidImage",
    "InvalidRequest",
    "Overloaded",
    "PermissionDenied",
    "RateLimited",
    "RegistryUnavailable",
    "ShuttingDown",
    "StreamIdle",
    "TooManyStreams",
    "Unauthenticated",
    "grpc_status",
]

#: Trailing metadata key telling a device that a refusal is final (stop retrying).
FINAL_METADATA_KEY = "edgeward-final"


class GatewayError(Exception):
    """Root of every error raised by :mod:`gateway` (except the inference engine's own tree)."""


class Unauthenticated(GatewayError):
    """The connection carries no valid device identity of this trust domain.

    ``reason`` is for the audit log only; the caller is told just that it is not authenticated.
    """

    def __init__(self, reason: str) -> None:
        super().__init__("not authenticated")
        self.reason = reason


class PermissionDenied(GatewayError):
    """An authenticated identity asked for something it may not do."""

    def __init__(self, message: str, *, reason: str = "not_allowed") -> None:
        super().__init__(message)
        self.reason = reason


class DeviceRevoked(PermissionDenied):
    """The device, or the certificate it uses, is revoked. Final: the device must re-enrol."""

    def __init__(self, device_id: str, serial: str | None = None) -> None:
        super().__init__(
            f"device {device_id} is revoked; it must stop retrying and re-enrol",
            reason="revoked",
        )
        self.device_id = device_id
        self.serial = serial


class FeedStale(GatewayError):
    """The gateway lost its revocation feed for longer than its bound: new sessions refused."""

    def __init__(self, stale_for_s: float) -> None:
        super().__init__("gateway revocation state is stale; try another gateway or retry later")
        self.stale_for_s = stale_for_s


class RegistryUnavailable(GatewayError):
    """The registry (core or PKI file) could not be asked about a device; retry later."""


class TooManyStreams(GatewayError):
    """The device already holds its limit of open streaming calls."""

    def __init__(self, device_id: str, limit: int) -> None:
        super().__init__(f"too many open streams (limit {limit})")
        self.device_id = device_id
        self.limit = limit


class RateLimited(GatewayError):
    """The device exceeded its frame budget; it may retry after ``retry_after_s`` seconds."""

    def __init__(self, device_id: str, retry_after_s: float) -> None:
        super().__init__(f"rate limit exceeded; retry in {retry_after_s:.2f} s")
        self.device_id = device_id
        self.retry_after_s = retry_after_s


class InvalidRequest(GatewayError):
    """A request field is out of bounds (telemetry readings, a frame id, for instance)."""

    def __init__(self, message: str, *, reason: str = "invalid_request") -> None:
        super().__init__(message)
        self.reason = reason


class StreamIdle(GatewayError):
    """A stream sent nothing for ``idle_s`` seconds and was ended to free its slot."""

    def __init__(self, idle_s: float) -> None:
        super().__init__(f"stream sent nothing for {idle_s:g} s")
        self.idle_s = idle_s


#: The engine's errors, which keep their own root; catch with ``except (GatewayError, *…)``.
InferenceErrors: tuple[type[Exception], ...] = (InferenceError, InvalidImage)


@dataclass(frozen=True, slots=True)
class GrpcStatus:
    """A gRPC status for a domain error: code, caller-safe message, trailing metadata."""

    code: grpc.StatusCode
    message: str
    trailing_metadata: tuple[tuple[str, str], ...] = ()
    #: Short, stable label for metrics and logs ("revoked", "rate_limited", …).
    reason: str = ""


def grpc_status(exc: BaseException) -> GrpcStatus | None:
    """The gRPC status for ``exc``, or ``None`` when it is not a domain error (a bug: INTERNAL).

    The order matters: subclasses before their parents.
    """
    code = grpc.StatusCode
    match exc:
        case DeviceRevoked():
            return GrpcStatus(
                code.PERMISSION_DENIED,
                str(exc),
                ((FINAL_METADATA_KEY, "revoked"),),
                "revoked",
            )
        case PermissionDenied():
            return GrpcStatus(code.PERMISSION_DENIED, str(exc), (), exc.reason)
        case Unauthenticated():
            return GrpcStatus(code.UNAUTHENTICATED, str(exc), (), "unauthenticated")
        case FeedStale():
            return GrpcStatus(code.UNAVAILABLE, str(exc), (), "feed_stale")
        case RegistryUnavailable():
            return GrpcStatus(code.UNAVAILABLE, "device registry unavailable", (), "registry")
        case TooManyStreams():
            return GrpcStatus(code.RESOURCE_EXHAUSTED, str(exc), (), "too_many_streams")
        case RateLimited():
            return GrpcStatus(
                code.RESOURCE_EXHAUSTED,
                str(exc),
                (("retry-after-ms", str(round(exc.retry_after_s * 1000))),),
                "rate_limited",
            )
        case InvalidRequest():
            return GrpcStatus(code.INVALID_ARGUMENT, str(exc), (), "invalid_request")
        case StreamIdle():
            return GrpcStatus(code.DEADLINE_EXCEEDED, str(exc), (), "idle")
        case InvalidImage():
            return GrpcStatus(
                code.INVALID_ARGUMENT, f"invalid image: {exc.reason}", (), "invalid_image"
            )
        case Overloaded():
            return GrpcStatus(
                code.RESOURCE_EXHAUSTED, "gateway overloaded; retry later", (), "overloaded"
            )
        case DeadlineExceeded():
            return GrpcStatus(code.DEADLINE_EXCEEDED, "deadline exceeded", (), "deadline")
        case ShuttingDown():
            return GrpcStatus(code.UNAVAILABLE, "gateway is shutting down", (), "shutting_down")
        case InferenceError():
            return GrpcStatus(code.UNAVAILABLE, "inference unavailable", (), "inference")
        case ConfigError():
            return GrpcStatus(code.INTERNAL, "gateway misconfigured", (), "config")
        case _:
            return None
