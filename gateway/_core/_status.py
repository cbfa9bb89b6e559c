"""The one place where the core's errors become gRPC status codes, and where callers'
identities are read from the TLS layer.

Servicer methods raise domain errors (:mod:`pki.errors`, or the request errors below); the
:func:`unary` and :func:`server_stream` decorators turn them into statuses. Messages tell an
honest caller what to fix; anything an attacker could learn from (does this token exist?) stays
in the audit log. A revoked device gets a distinct, final answer: ``PERMISSION_DENIED`` with the
trailing metadata ``edgeward-final: revoked``, so it stops retrying; an expired certificate
gets ``UNAUTHENTICATED`` with ``edgeward-final: expired`` (renewal is impossible: enrol again).
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
import structlog
from cryptography import x509

import pki

__all__ = [
    "FINAL_METADATA_KEY",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "RequestError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unimplemented",
    "abort_for",
    "peer_certificate",
    "peer_host",
    "require_identity",
    "require_peer",
    "server_stream",
    "status_for",
    "unary",
]

FINAL_METADATA_KEY = "edgeward-final"
RETRY_AFTER_METADATA_KEY = "edgeward-retry-after-s"

_log = structlog.get_logger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")
S = TypeVar("S")


class RequestError(Exception):
    """A request the core refuses for a reason that is not a PKI decision."""


class Unauthenticated(RequestError):
    """No usable client certificate."""


class PermissionDenied(RequestError):
    """The caller's identity may not call this method."""


class NotFound(RequestError):
    """The thing asked about does not exist."""


class Unimplemented(RequestError):
    """The method is not enabled on this core."""


class InvalidArgument(RequestError):
    """A request field is malformed or out of bounds (an escalated image, for instance)."""


class ResourceExhausted(RequestError):
    """The core is too busy for this request now; the caller should retry later."""


_ENROL_REFUSED_HELP = (
    "enrolment token refused: check that it was copied completely, has not been used and has "
    "not expired; otherwise ask the operator for a new one"
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """Status code, message and trailing metadata for an error raised by a servicer."""
    match exc:
        case pki.InvalidCsr():
            return grpc.StatusCode.INVALID_ARGUMENT, f"CSR refused: {exc.reason}", ()
        case pki.InvalidName():
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc), ()
        case pki.TokenRejected():
            return grpc.StatusCode.PERMISSION_DENIED, _ENROL_REFUSED_HELP, ()
        case pki.RateLimited():
            return (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many failed enrolment attempts from this address; retry in "
                f"{exc.retry_after_s:.0f} s",
                ((RETRY_AFTER_METADATA_KEY, f"{exc.retry_after_s:.1f}"),),
            )
        case pki.CertificateRevoked():
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                "this device is revoked: stop retrying and contact the operator",
                ((FINAL_METADATA_KEY, "revoked"),),
            )
        case pki.CertificateExpired():
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "the certificate has expired or is not yet valid; enrol again with a new token",
                ((FINAL_METADATA_KEY, "expired"),),
            )
        case pki.InvalidIdentity():
            return grpc.StatusCode.PERMISSION_DENIED, f"identity refused: {exc}", ()
        case Unauthenticated():
            return grpc.StatusCode.UNAUTHENTICATED, str(exc), ()
        case PermissionDenied():
            return grpc.StatusCode.PERMISSION_DENIED, str(exc), ()
        case NotFound():
            return grpc.StatusCode.NOT_FOUND, str(exc), ()
        case Unimplemented():
            return grpc.StatusCode.UNIMPLEMENTED, str(exc), ()
        case InvalidArgument():
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc), ()
        case ResourceExhausted():
            return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), ()
        case pki.RegistryUnavailable():
            # The database is away: retryable, on this core later or on another replica.
            return grpc.StatusCode.UNAVAILABLE, "the registry is unavailable; retry", ()
        case pki.RegistryError():
            return grpc.StatusCode.FAILED_PRECONDITION, str(exc), ()
        case _:
            return grpc.StatusCode.INTERNAL, "internal error", ()


_MAPPED = (pki.PkiError, RequestError)


async def abort_for(context: Context, exc: BaseException) -> NoReturn:
    code, message, trailing = status_for(exc)
    if trailing:
        context.set_trailing_metadata(trailing)
    await context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort always raises


def unary(
    fn: Callable[[S, Req, Context], Awaitable[Resp]],
) -> Callable[[S, Req, Context], Awaitable[Resp]]:
    """Map errors of a unary method to statuses and write one log line per call."""

    @functools.wraps(fn)
    async def wrapper(self: S, request: Req, context: Context) -> Resp:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except _MAPPED as exc:
            code = status_for(exc)[0]
            await abort_for(context, exc)
        except Exception as exc:  # noqa: BLE001 - last resort: logged, answered INTERNAL
            code = grpc.StatusCode.INTERNAL
            _log.exception("rpc.failed", method=fn.__name__)
            await abort_for(context, exc)
        finally:
            _log.info(
                "rpc",
                method=fn.__name__,
                code=code.name,
                ms=round((time.perf_counter() - started) * 1000, 2),
            )

    return wrapper


def server_stream(
    fn: Callable[[S, Req, Context], AsyncIterator[Resp]],
) -> Callable[[S, Req, Context], AsyncIterator[Resp]]:
    """Map errors of a server-streaming method to statuses."""

    @functools.wraps(fn)
    async def wrapper(self: S, request: Req, context: Context) -> AsyncIterator[Resp]:
        try:
            async for item in fn(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except _MAPPED as exc:
            await abort_for(context, exc)
        except Exception as exc:  # noqa: BLE001 - last resort: logged, answered INTERNAL
            _log.exception("rpc.failed", method=fn.__name__)
            await abort_for(context, exc)

    return wrapper


def peer_host(peer: str) -> str:
    """The address part of grpc's ``context.peer()`` (``ipv4:1.2.3.4:5678`` → ``1.2.3.4``)."""
    kind, _, rest = peer.partition(":")
    if kind in {"ipv4", "ipv6"}:
        host = rest.rpartition(":")[0]
        return host.removeprefix("[").removesuffix("]") or rest
    return peer


def peer_certificate(context: Context) -> x509.Certificate | None:
    """The client certificate the TLS layer verified, or None on the enrolment port."""
    pems = list(context.auth_context().get("x509_pem_cert", ()))
    if not pems:
        return None
    try:
        return x509.load_pem_x509_certificate(pems[0])
    except ValueError:
        return None


def require_identity(context: Context, *, trust_domain: str, role: pki.Role) -> pki.Identity:
    """The caller's identity, which must have ``role``; read from the TLS peer only."""
    return require_peer(context, trust_domain=trust_domain, role=role)[0]


def require_peer(
    context: Context, *, trust_domain: str, role: pki.Role
) -> tuple[pki.Identity, str]:
    """The caller's identity (which must have ``role``) and its certificate's serial
    (``pki.serial_hex``), both from the TLS peer certificate only."""
    cert = peer_certificate(context)
    if cert is None:
        raise Unauthenticated(
            "this method needs a client certificate: call the core's mutual-TLS port "
            "with your identity"
        )
    try:
        identity = pki.identity_from_certificate(cert, trust_domain=trust_domain)
    except pki.InvalidIdentity as exc:
        raise PermissionDenied(f"identity refused: {exc}") from None
    if identity.role is not role:
        raise PermissionDenied(
            f"only {role.value} identities may call this method, not {identity.role.value}"
        )
    structlog.contextvars.bind_contextvars(peer_id=identity.id, peer_role=identity.role.value)
    return identity, pki.serial_hex(cert.serial_number)
