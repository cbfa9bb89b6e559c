"""Every error the gateway and the core raise, under one root; imports nothing of ours.

::

    GatewayError
    ├── ConfigError              a bad configuration key (start-up only)        INTERNAL
    ├── ListenError (OSError)    a listener cannot bind its address (start-up)
    ├── ModelIntegrityError      a model file does not match its manifest (start-up)
    ├── Unauthenticated          no usable device identity on the connection   UNAUTHENTICATED
    ├── PermissionDenied         identity known, method not allowed             PERMISSION_DENIED
    │   └── DeviceRevoked        the device or certificate is revoked (final)  PERMISSION_DENIED
    │                            + ``edgeward-final: revoked``
    ├── FeedStale                revocation feed lost past its bound           UNAVAILABLE
    ├── RegistryUnavailable      device facts cannot be looked up              UNAVAILABLE
    ├── RateLimited              over the device's budget                      RESOURCE_EXHAUSTED
    │                            + ``edgeward-retry-after-s``
    ├── TooManyStreams           the device holds its limit of open streams    RESOURCE_EXHAUSTED
    ├── InvalidRequest           a field out of bounds (telemetry, frame id)   INVALID_ARGUMENT
    │   └── InvalidTelemetry (ValueError)  a telemetry report outside the contract
    ├── StreamIdle               a stream sent nothing for the idle timeout    DEADLINE_EXCEEDED
    ├── InvalidImage (ValueError)  not a JPEG/PNG, corrupt, too big            INVALID_ARGUMENT
    ├── InferenceError           the engine cannot answer                      UNAVAILABLE
    │   ├── Overloaded           its bounded queue is full                     RESOURCE_EXHAUSTED
    │   ├── DeadlineExceeded                                                   DEADLINE_EXCEEDED
    │   ├── ShuttingDown                                                       UNAVAILABLE
    │   └── ProviderUnavailable  (start-up only) CUDA asked for, not usable
    ├── EscalationError          the escalation component (edge side)
    │   ├── OutboxFull           the outbox holds its maximum: new ones refused
    │   ├── RedactionUnavailable faces must be blurred and the face model cannot run
    │   ├── EscalationFailed     the core refused an escalation for good
    │   └── CoreUnavailable      the core could not answer now: retry later
    └── RequestError             the core refuses a request (not a PKI decision)
        ├── CallerUnauthenticated  no usable client certificate                UNAUTHENTICATED
        ├── CallerNotAllowed     the caller's role may not call the method     PERMISSION_DENIED
        ├── NotFound                                                           NOT_FOUND
        ├── Unimplemented        the method is not enabled                     UNIMPLEMENTED
        ├── InvalidArgument      a request field is malformed                  INVALID_ARGUMENT
        └── ResourceExhausted    too busy now: retry later                     RESOURCE_EXHAUSTED

The PKI's decisions (``pki.errors``: a refused token or CSR, a revoked or expired certificate)
keep the ``pki`` package's own root, ``PkiError``. The right-hand column is what a caller is
told: :func:`gateway._status.status_of` is the one mapping (gRPC statuses and MQTT error
events alike, gateway and core alike). Messages are safe to send to the caller: never a key,
a token or a certificate; an authentication failure says little, the audit log the reason.

This module imports nothing of the project's and nothing outside the standard library, so
``import gateway.errors`` is cheap (no onnxruntime, no numpy, no grpc).
"""

from __future__ import annotations

import errno

__all__ = [
    "CallerNotAllowed",
    "CallerUnauthenticated",
    "ConfigError",
    "CoreUnavailable",
    "DeadlineExceeded",
    "DeviceRevoked",
    "EscalationError",
    "EscalationFailed",
    "FeedStale",
    "GatewayError",
    "InferenceError",
    "InvalidArgument",
    "InvalidImage",
    "InvalidRequest",
    "InvalidTelemetry",
    "ListenError",
    "ModelIntegrityError",
    "NotFound",
    "OutboxFull",
    "Overloaded",
    "PermissionDenied",
    "ProviderUnavailable",
    "RateLimited",
    "RedactionUnavailable",
    "RegistryUnavailable",
    "RequestError",
    "ResourceExhausted",
    "ShuttingDown",
    "StreamIdle",
    "TooManyStreams",
    "Unauthenticated",
    "Unimplemented",
]


class GatewayError(Exception):
    """Root of every error raised by :mod:`gateway` (edge and core)."""


# -- start-up ----------------------------------------------------------------------------------


class ConfigError(GatewayError):
    """The configuration is missing, unreadable or invalid; the message names the keys."""


class ListenError(GatewayError, OSError):
    """A listener cannot bind its address: ``setting`` names the configuration key."""

    def __init__(self, *, setting: str, address: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address} ({setting}): {reason}")
        self.setting = setting
        self.address = address
        self.reason = reason

    @classmethod
    def from_os_error(cls, exc: OSError, *, setting: str, address: str) -> ListenError:
        """The error for a failed ``bind`` of ``address``."""
        return cls(setting=setting, address=address, reason=_bind_reason(exc))


def _bind_reason(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use (is another instance running?)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "address not available on this machine"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    return (exc.strerror or str(exc)).lower()


class ModelIntegrityError(GatewayError):
    """A model file or the manifest cannot be trusted.

    Raised when the manifest is missing or malformed, when a model is not listed in it, when
    its file is missing or escapes the models directory, or when the file's sha256 differs
    from the manifest's. ``model`` names the model (or file) concerned, ``reason`` says what
    is wrong.
    """

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"model {model!r}: {reason}")
        self.model = model
        self.reason = reason


# -- a device's calls and messages -------------------------------------------------------------


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


class InvalidTelemetry(InvalidRequest, ValueError):
    """A telemetry message outside the contract; the message names the field (safe to return)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="invalid_telemetry")


class StreamIdle(GatewayError):
    """A stream sent nothing for ``idle_s`` seconds and was ended to free its slot."""

    def __init__(self, idle_s: float) -> None:
        super().__init__(f"stream sent nothing for {idle_s:g} s")
        self.idle_s = idle_s


# -- inference ---------------------------------------------------------------------------------


class InvalidImage(GatewayError, ValueError):
    """The bytes are not an acceptable image; ``reason`` says why, in a few words.

    The reason is safe to send back to the device: it names the problem, never the decoder's
    internal message.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InferenceError(GatewayError):
    """Root of the errors the inference engine raises for one request."""


class Overloaded(InferenceError):
    """The bounded request queue is full; the caller should back off and retry."""

    def __init__(self, queue_size: int) -> None:
        super().__init__(f"inference queue full ({queue_size} waiting)")
        self.queue_size = queue_size


class DeadlineExceeded(InferenceError):
    """The caller's deadline passed before its answer was ready."""


class ShuttingDown(InferenceError):
    """The engine is closing and accepts no new work."""


class ProviderUnavailable(InferenceError):
    """``providers="cuda"`` was asked for and CUDA cannot run here."""


# -- escalation (edge side) --------------------------------------------------------------------


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


class CoreUnavailable(EscalationError):
    """The core could not answer now (unreachable, overloaded, refused): retry later."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"core unavailable: {code}: {message}")
        self.code = code


# -- the core's requests -----------------------------------------------------------------------


class RequestError(GatewayError):
    """A request the core refuses for a reason that is not a PKI decision."""


class CallerUnauthenticated(RequestError):
    """No usable client certificate; the message tells an honest caller what to do."""


class CallerNotAllowed(RequestError):
    """The caller's identity may not call this method."""


class NotFound(RequestError):
    """The thing asked about does not exist."""


class Unimplemented(RequestError):
    """The method is not enabled on this core."""


class InvalidArgument(RequestError):
    """A request field is malformed or out of bounds (an escalated image, for instance)."""


class ResourceExhausted(RequestError):
    """The core is too busy for this request now; the caller should retry later."""
