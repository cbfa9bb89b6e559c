"""Enrolment and renewal, as the device does them.

The key is made on the device and never leaves it; the core only ever sees a CSR. What the core
sends back is checked before anything is stored: the chain must verify against the CA bundle
the device trusts (RFC 5280 path validation, ``clientAuth``), the leaf must carry the key just
made and the device's own identity, and the gateway directory must be signed by a CA of that
bundle. Files are then replaced atomically, key first (0600), so a crash leaves either the old
identity or the new one.

``enroll`` talks to the core's enrolment port (server-authenticated TLS: the device has no
certificate yet); ``renew`` to its mutual-TLS port with the current certificate. Both demand
the core's role-pinned name (``core.edgeward.internal``), which no gateway certificate carries.

Both take several endpoints (replicas of the core on one registry: a sequence or a comma
list). They are tried in order with the same request (same key, same CSR, same token); only
an unreachable or silent replica (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``) makes the device
try the next, any other answer is final for this attempt. A token is spent only in the
transaction that records the new certificate, so an attempt that failed on one replica
leaves it usable on the next. One gap remains: a replica that committed and then died
before replying has spent the token without the device receiving the certificate; such a
device needs a new token.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

import pki
from device_sdk._identity import parse_gateway_directory
from device_sdk.errors import (
    AlreadyEnrolled,
    CertificateExpired,
    DeviceRevoked,
    EnrollmentRefused,
    EnrollmentUnavailable,
    IdentityNotWritable,
    InvalidDirectory,
    NotEnrolled,
)
from protos.edgeward.v1 import enrollment_pb2, enrollment_pb2_grpc
from protos.edgeward.v1.wire import FINAL_METADATA_KEY

__all__ = [
    "EnrollmentResult",
    "default_core_address",
    "endpoint_list",
    "enroll",
    "renew",
    "verify_chain",
]

_log = structlog.get_logger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 15.0
# Both calls go to a core: demand its role-pinned name, so that a gateway (whose certificate
# also names localhost) cannot collect enrolment tokens or hand out certificates.
_CORE_OPTIONS = [pki.server_name_option(pki.core_server_name())]


@dataclass(frozen=True, slots=True)
class EnrollmentResult:
    """The identity now stored in ``files``."""

    files: pki.IdentityFiles
    device_id: str
    spiffe_id: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    region: str
    device_type: str
    already_enrolled: bool = False


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def endpoint_list(endpoints: str | Sequence[str]) -> list[str]:
    """``"a:1,b:2"`` or ``["a:1", "b:2,c:3"]`` → ``["a:1", "b:2", "c:3"]`` (order kept)."""
    items = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    out: list[str] = []
    for item in items:
        for part in item.split(","):
            address = part.strip()
            if address and address not in out:
                out.append(address)
    return out


def default_core_address(enrol_endpoint: str) -> str:
    """The core's mutual-TLS address by the default layout: the enrolment port minus one.

    For a comma list of enrolment endpoints, the list of their mutual-TLS addresses.
    """
    if "," in enrol_endpoint:
        return ",".join(default_core_address(e) for e in endpoint_list(enrol_endpoint))
    host, _, port = enrol_endpoint.rpartition(":")
    if not host or not port.isdigit() or int(port) < 2:
        return enrol_endpoint
    return f"{host}:{int(port) - 1}"


#: Codes after which the same request may succeed at another replica.
_TRY_NEXT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


async def _first_answer(
    endpoints: Sequence[str],
    credentials: grpc.ChannelCredentials,
    send: Callable[[enrollment_pb2_grpc.EnrollmentStub], Awaitable[T]],
) -> T:
    """``send`` on each endpoint in turn until one answers; the last error if none does."""
    last: grpc.aio.AioRpcError | None = None
    for address in endpoints:
        try:
            async with grpc.aio.secure_channel(
                address, credentials, options=_CORE_OPTIONS
            ) as channel:
                return await send(enrollment_pb2_grpc.EnrollmentStub(channel))
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _TRY_NEXT:
                raise
            _log.warning(
                "core replica did not answer; trying the next",
                endpoint=address,
                code=exc.code().name,
            )
            last = exc
    assert last is not None  # noqa: S101 - callers pass at least one endpoint
    raise last


def _csr(key: pki._files.PrivateKey, device_id: str) -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


def _final(exc: grpc.aio.AioRpcError) -> str:
    trailing = cast("tuple[tuple[str, str | bytes], ...]", tuple(exc.trailing_metadata() or ()))
    for key, value in trailing:
        if key == FINAL_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def _translate(exc: grpc.aio.AioRpcError, *, device_id: str, not_after: str = "") -> Exception:
    code = exc.code()
    details = exc.details() or ""
    final = _final(exc)
    if final == "revoked":
        return DeviceRevoked(device_id, "the core refused it")
    if final == "expired":
        return CertificateExpired(device_id, not_after or "an earlier time")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return EnrollmentUnavailable(f"the core did not answer ({code.name}): {details}")
    return EnrollmentRefused(details, code=code.name)


def verify_chain(
    chain_pem: bytes,
    *,
    ca_bundle_pem: bytes,
    device_id: str,
    public_key_der: bytes,
    now: dt.datetime,
) -> tuple[x509.Certificate, pki.Identity]:
    """Check a returned chain; return the leaf and its identity or raise EnrollmentRefused."""
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
        store = Store(x509.load_pem_x509_certificates(ca_bundle_pem))
        verifier = PolicyBuilder().store(store).time(now).build_client_verifier()
        verifier.verify(certs[0], certs[1:])
    except (ValueError, IndexError, VerificationError) as exc:
        raise EnrollmentRefused(f"the core returned a chain that does not verify: {exc}") from None
    leaf = certs[0]
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if spki != public_key_der:
        raise EnrollmentRefused("the core returned a certificate for another key")
    try:
        uri = next(
            u
            for u in leaf.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.UniformResourceIdentifier)
        )
        trust_domain = pki.parse_spiffe_id(uri).trust_domain
        identity = pki.identity_from_certificate(
            leaf, trust_domain=trust_domain, role=pki.Role.DEVICE
        )
    except (StopIteration, x509.ExtensionNotFound, pki.PkiError) as exc:
        raise EnrollmentRefused(
            f"the core returned a certificate without our identity: {exc}"
        ) from None
    if identity.id != device_id:
        raise EnrollmentRefused("the core returned a certificate for another device")
    return leaf, identity


def _store(
    out_dir: Path,
    response: enrollment_pb2.EnrollResponse,
    *,
    key: pki._files.PrivateKey,
    trusted_bundle_pem: bytes,
    device_id: str,
    metadata: dict[str, object],
    now: dt.datetime,
) -> EnrollmentResult:
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    chain = response.certificate_chain_pem.encode()
    leaf, identity = verify_chain(
        chain,
        ca_bundle_pem=trusted_bundle_pem,
        device_id=device_id,
        public_key_der=public_der,
        now=now,
    )
    # The bundle the core sends came over a channel authenticated by the trusted one; keep it
    # only if our own chain verifies against it too (it may add a rotated root).
    bundle = response.ca_bundle_pem.encode() or trusted_bundle_pem
    verify_chain(
        chain, ca_bundle_pem=bundle, device_id=device_id, public_key_der=public_der, now=now
    )
    directory = b""
    if response.HasField("gateway_directory"):
        directory = response.gateway_directory.SerializeToString()
        try:
            parse_gateway_directory(
                directory, ca_bundle_pem=bundle, trust_domain=identity.trust_domain, now=now
            )
        except InvalidDirectory as exc:
            raise EnrollmentRefused(f"the core's gateway directory is not valid: {exc}") from None
    meta: dict[str, object] = {
        "id": identity.id,
        "role": pki.Role.DEVICE.value,
        "trust_domain": identity.trust_domain,
        "region": response.region,
        "device_type": response.device_type,
    }
    meta.update(metadata)
    files = pki.write_identity(
        out_dir,
        certificate=leaf,
        chain_pem=chain,
        ca_bundle_pem=bundle,
        metadata=meta,
        key_pem=pki._files.private_key_pem(key),
    )
    if directory:
        pki.write_atomic(files.gateway_directory, directory)
    return EnrollmentResult(
        files=files,
        device_id=identity.id,
        spiffe_id=identity.spiffe_id,
        serial=pki.serial_hex(leaf.serial_number),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        region=response.region,
        device_type=response.device_type,
    )


def _existing(files: pki.IdentityFiles) -> EnrollmentResult | None:
    if not files.exists():
        return None
    try:
        cert = files.certificate()
        uri = next(
            u
            for u in cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.UniformResourceIdentifier)
        )
        identity = pki.parse_spiffe_id(uri)
    except (ValueError, StopIteration, x509.ExtensionNotFound, pki.PkiError):
        return None
    meta = files.read_metadata()
    return EnrollmentResult(
        files=files,
        device_id=identity.id,
        spiffe_id=identity.spiffe_id,
        serial=pki.serial_hex(cert.serial_number),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        region=str(meta.get("region", "")),
        device_type=str(meta.get("device_type", "")),
        already_enrolled=True,
    )


def _first_missing(directory: Path) -> Path | None:
    """The outermost of ``directory`` and its parents that does not exist yet (``None``: it
    exists): what storing an identity there would create, and a failure must remove."""
    missing = None
    for candidate in (directory, *directory.parents):
        if candidate.exists() or candidate.is_symlink():
            break
        missing = candidate
    return missing


def _check_writable(directory: Path) -> None:
    """Create ``directory`` (0700) and prove a file can be written there, or raise."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise IdentityNotWritable(
            f"cannot store the identity in {directory}: {exc.strerror or exc}; "
            "nothing was sent, the token is still unused"
        ) from None


async def enroll(
    *,
    endpoint: str | Sequence[str],
    ca_bundle_pem: bytes,
    token: str,
    out_dir: Path,
    force: bool = False,
    core_address: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    now: dt.datetime | None = None,
    curve: str = "P-256",
) -> EnrollmentResult:
    """Enrol this device with a one-time ``token`` and store its identity in ``out_dir``.

    Safe to run again: when ``out_dir`` already holds this device's identity, nothing is sent
    and the result has ``already_enrolled`` set (``force`` enrols again, which needs a new
    token). ``endpoint`` is one enrolment endpoint or several replicas (a sequence or a comma
    list), tried in order. ``core_address`` is the core's mutual-TLS address (or a comma
    list of them) used later by :func:`renew` (default: :func:`default_core_address` of each
    endpoint).
    """
    endpoints = endpoint_list(endpoint)
    if not endpoints:
        raise EnrollmentRefused("no enrolment endpoint given")
    try:
        device_id = pki.token_device_id(token)
    except pki.TokenRejected:
        raise EnrollmentRefused(
            "the token is malformed: it reads <device-id>.<secret>; copy it completely"
        ) from None
    files = pki.IdentityFiles(Path(out_dir))
    existing = _existing(files)
    if existing is not None and not force:
        if existing.device_id != device_id:
            raise AlreadyEnrolled(str(out_dir), existing.device_id)
        return existing
    # The token is spent once the core answers: make sure the answer can be stored first.
    # Whatever this creates is removed again unless an identity is stored in the end.
    created = _first_missing(files.directory)
    stored = False
    try:
        _check_writable(files.directory)
        key = pki.generate_private_key(curve)
        request = enrollment_pb2.EnrollRequest(token=token, csr=_csr(key, device_id))
        credentials = pki.grpc_channel_credentials(ca_bundle_pem=ca_bundle_pem)

        async def send(stub: enrollment_pb2_grpc.EnrollmentStub) -> enrollment_pb2.EnrollResponse:
            method: Any = stub.Enroll  # grpc-stubs types it synchronous; on aio it is awaitable
            response: enrollment_pb2.EnrollResponse = await method(request, timeout=timeout_s)
            return response

        try:
            response = await _first_answer(endpoints, credentials, send)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, device_id=device_id) from None
        result = _store(
            files.directory,
            response,
            key=key,
            trusted_bundle_pem=ca_bundle_pem,
            device_id=device_id,
            metadata={
                "enrol_endpoint": ",".join(endpoints),
                "core_address": ",".join(endpoint_list(core_address))
                if core_address
                else default_core_address(",".join(endpoints)),
            },
            now=now or _utcnow(),
        )
        stored = True
        return result
    finally:
        if not stored and created is not None:
            shutil.rmtree(created, ignore_errors=True)


async def renew(
    *,
    identity_dir: Path,
    endpoint: str | Sequence[str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    now: dt.datetime | None = None,
    curve: str = "P-256",
) -> EnrollmentResult:
    """Renew the identity in ``identity_dir`` with a new key, over mutual TLS.

    ``endpoint`` (one or several replicas, tried in order) defaults to the ``core_address``
    stored at enrolment. Raises
    :class:`DeviceRevoked` or :class:`CertificateExpired` (both final), or
    :class:`EnrollmentRefused`/:class:`EnrollmentUnavailable`.
    """
    now = now or _utcnow()
    files = pki.IdentityFiles(Path(identity_dir))
    current = _existing(files)
    if current is None:
        raise NotEnrolled(str(identity_dir), "no complete identity; run 'edgeward enroll'")
    if not current.not_before <= now <= current.not_after:
        raise CertificateExpired(current.device_id, current.not_after.isoformat())
    meta = files.read_metadata()
    addresses = endpoint_list(endpoint or str(meta.get("core_address") or ""))
    if not addresses:
        raise EnrollmentRefused("no core address known for renewal; pass the endpoint")
    key = pki.generate_private_key(curve)
    request = enrollment_pb2.RenewRequest(csr=_csr(key, current.device_id))
    credentials = pki.grpc_channel_credentials(
        ca_bundle_pem=files.ca_bundle.read_bytes(), identity=files
    )

    async def send(stub: enrollment_pb2_grpc.EnrollmentStub) -> enrollment_pb2.EnrollResponse:
        method: Any = stub.Renew  # grpc-stubs types it synchronous; on aio it is awaitable
        response: enrollment_pb2.EnrollResponse = await method(request, timeout=timeout_s)
        return response

    try:
        response = await _first_answer(addresses, credentials, send)
    except grpc.aio.AioRpcError as exc:
        raise _translate(
            exc, device_id=current.device_id, not_after=current.not_after.isoformat()
        ) from None
    keep = {k: v for k, v in meta.items() if k in {"enrol_endpoint", "core_address"}}
    keep["core_address"] = ",".join(addresses)
    return _store(
        files.directory,
        response,
        key=key,
        trusted_bundle_pem=files.ca_bundle.read_bytes(),
        device_id=current.device_id,
        metadata=keep,
        now=now,
    )
