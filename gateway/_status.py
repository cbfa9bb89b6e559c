"""The one mapping from an error to what the caller is told: a gRPC status or an MQTT error event.

:func:`status_of` gives a :class:`Status` for any exception: its gRPC status code (by name,
so that the MQTT side's ``ErrorEvent.code`` reads the same), a message safe to send to the
caller, trailing metadata (:mod:`protos.edgeward.v1.wire`: ``edgeward-final``,
``edgeward-retry-after-s``) and a short, stable reason for metrics and audit lines. The
gateway's servicer and bridge (through the front door) and the core's servicers all use it;
an exception it does not know is an internal error (``INTERNAL``, reason ``internal``), whose
details stay in the log. Subclasses are matched before their parents.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

import pki
from gateway import errors as e
from protos.edgeward.v1.wire import (
    FINAL_EXPIRED,
    FINAL_METADATA_KEY,
    FINAL_REVOKED,
    RETRY_AFTER_METADATA_KEY,
)

__all__ = ["Status", "status_of"]

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Status:
    """What a refused caller is told; ``code`` is a ``grpc.StatusCode`` name."""

    code: str
    message: str
    trailing_metadata: Metadata = ()
    #: Short, stable label for metrics and logs ("revoked", "rate_limited", …).
    reason: str = ""

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return grpc.StatusCode[self.code]


def _retry_after(seconds: float) -> Metadata:
    return ((RETRY_AFTER_METADATA_KEY, f"{max(seconds, 0.0):.3f}"),)


_FINAL_REVOKED: Metadata = ((FINAL_METADATA_KEY, FINAL_REVOKED),)
_FINAL_EXPIRED: Metadata = ((FINAL_METADATA_KEY, FINAL_EXPIRED),)


def status_of(exc: BaseException) -> Status:
    """The status for ``exc`` (see the module docstring)."""
    match exc:
        # The gateway's device plane.
        case e.DeviceRevoked():
            return Status("PERMISSION_DENIED", str(exc), _FINAL_REVOKED, "revoked")
        case e.PermissionDenied():
            return Status("PERMISSION_DENIED", str(exc), (), exc.reason)
        case e.Unauthenticated():
            return Status("UNAUTHENTICATED", str(exc), (), "unauthenticated")
        case e.FeedStale():
            return Status("UNAVAILABLE", str(exc), (), "feed_stale")
        case e.RegistryUnavailable():
            return Status("UNAVAILABLE", "device registry unavailable", (), "registry")
        case e.TooManyStreams():
            return Status("RESOURCE_EXHAUSTED", str(exc), (), "too_many_streams")
        case e.RateLimited():
            return Status(
                "RESOURCE_EXHAUSTED", str(exc), _retry_after(exc.retry_after_s), "rate_limited"
            )
        case e.InvalidRequest():
            return Status("INVALID_ARGUMENT", str(exc), (), exc.reason)
        case e.StreamIdle():
            return Status("DEADLINE_EXCEEDED", str(exc), (), "idle")
        # Inference.
        case e.InvalidImage():
            return Status("INVALID_ARGUMENT", f"invalid image: {exc.reason}", (), "invalid_image")
        case e.Overloaded():
            return Status("RESOURCE_EXHAUSTED", "gateway overloaded; retry later", (), "overloaded")
        case e.DeadlineExceeded():
            return Status("DEADLINE_EXCEEDED", "deadline exceeded", (), "deadline")
        case e.ShuttingDown():
            return Status("UNAVAILABLE", "gateway is shutting down", (), "shutting_down")
        case e.InferenceError():
            return Status("UNAVAILABLE", "inference unavailable", (), "inference")
        case e.ConfigError():
            return Status("INTERNAL", "gateway misconfigured", (), "config")
        # The core's requests.
        case e.CallerUnauthenticated():
            return Status("UNAUTHENTICATED", str(exc), (), "unauthenticated")
        case e.CallerNotAllowed():
            return Status("PERMISSION_DENIED", str(exc), (), "not_allowed")
        case e.NotFound():
            return Status("NOT_FOUND", str(exc), (), "not_found")
        case e.Unimplemented():
            return Status("UNIMPLEMENTED", str(exc), (), "unimplemented")
        case e.InvalidArgument():
            return Status("INVALID_ARGUMENT", str(exc), (), "invalid_argument")
        case e.ResourceExhausted():
            return Status("RESOURCE_EXHAUSTED", str(exc), (), "busy")
        case _:
            return _pki_status(exc)


_ENROL_REFUSED_HELP = (
    "enrolment token refused: check that it was copied completely, has not been used and has "
    "not expired; otherwise ask the operator for a new one"
)


def _pki_status(exc: BaseException) -> Status:
    """The PKI's decisions (the core's enrolment and renewal), else an internal error."""
    match exc:
        case pki.InvalidCsr():
            return Status("INVALID_ARGUMENT", f"CSR refused: {exc.reason}", (), "invalid_csr")
        case pki.InvalidName():
            return Status("INVALID_ARGUMENT", str(exc), (), "invalid_name")
        case pki.TokenRejected():
            return Status("PERMISSION_DENIED", _ENROL_REFUSED_HELP, (), "token_rejected")
        case pki.RateLimited():
            return Status(
                "RESOURCE_EXHAUSTED",
                "too many failed enrolment attempts from this address; retry in "
                f"{exc.retry_after_s:.0f} s",
                _retry_after(exc.retry_after_s),
                "rate_limited",
            )
        case pki.CertificateRevoked():
            return Status(
                "PERMISSION_DENIED",
                "this device is revoked: stop retrying and contact the operator",
                _FINAL_REVOKED,
                "revoked",
            )
        case pki.CertificateExpired():
            return Status(
                "UNAUTHENTICATED",
                "the certificate has expired or is not yet valid; enrol again with a new token",
                _FINAL_EXPIRED,
                "expired",
            )
        case pki.InvalidIdentity():
            return Status("PERMISSION_DENIED", f"identity refused: {exc}", (), "invalid_identity")
        case pki.RegistryUnavailable():
            # The database is away: retryable, on this core later or on another replica.
            return Status(
                "UNAVAILABLE", "the registry is unavailable; retry", (), "registry_unavailable"
            )
        case pki.RegistryError():
            return Status("FAILED_PRECONDITION", str(exc), (), "registry")
        case _:
            return Status("INTERNAL", "internal error", (), "internal")
