"""Enrolment and renewal decisions, and the audit trail of every trust change.

:class:`EnrollmentAuthority` is the server-side logic of the ``Enrollment`` service without any
transport: it takes a token and CSR bytes (or the caller's verified certificate), the peer's
address and the time, and returns the issued certificate or raises a :mod:`pki.errors` error.
The gRPC servicer maps those errors to status codes.

Every issuance, renewal, refusal, token creation (and the tokens it voids) and revocation is
one structlog line with ``audit=True``: device id, serial, reason, peer. Never the token, its
hash, the CSR, a key or a whole certificate.

A device id has one live identity. A new token voids the unused tokens made for the id before
it; enrolling again (a replaced or factory-reset device) revokes the certificates of the
identity it replaces, through the registry's revocation sequence, so gateways cut their live
sessions, while the device itself stays active with its new certificate. Renewal is not
re-enrolment: the certificate it renews stays valid until it expires.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from pki._ca import DEFAULT_DEVICE_LIFETIME, CertificateAuthority, serial_hex
from pki._csr import validate_csr
from pki._names import Identity, Role, identity_from_certificate
from pki._registry import (
    CertificateRecord,
    DeviceRecord,
    Registry,
    RevocationRecord,
    Status,
    TokenRecord,
)
from pki._tokens import generate_token, hash_token, token_device_id
from pki.errors import (
    CertificateExpired,
    CertificateRevoked,
    InvalidCsr,
    InvalidIdentity,
    PkiError,
    RateLimited,
    RegistryError,
    TokenRejected,
)

__all__ = [
    "EnrollmentAuthority",
    "FailureLimiter",
    "IssuedCertificate",
    "create_token",
    "revoke_device",
    "revoke_serial",
    "revoke_server",
]

_audit = structlog.get_logger("pki.audit")


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate just issued, with what the device stores next to it.

    ``replaced`` lists the revocations of the earlier certificates an enrolment replaced
    (empty for a first enrolment and for every renewal).
    """

    certificate: x509.Certificate
    chain_pem: bytes
    ca_bundle_pem: bytes
    device: DeviceRecord
    identity: Identity
    replaced: tuple[RevocationRecord, ...] = ()

    @property
    def serial(self) -> str:
        return serial_hex(self.certificate.serial_number)


class FailureLimiter:
    """Token bucket per peer for failed attempts: ``burst`` failures at once, then
    ``per_minute`` more a minute. Successful attempts cost nothing.

    ``clock`` is a monotonic time source (seconds), injected for tests. Thread-safe: the
    servicer runs decisions in worker threads.
    """

    def __init__(
        self,
        *,
        burst: int = 10,
        per_minute: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_peers: int = 10_000,
    ) -> None:
        if burst < 1 or per_minute <= 0:
            raise ValueError("burst must be at least 1 and per_minute positive")
        self._burst = float(burst)
        self._rate = per_minute / 60.0
        self._clock = clock
        self._max_peers = max_peers
        self._buckets: dict[str, tuple[float, float]] = {}  # peer -> (tokens, at)
        self._lock = threading.Lock()

    def _level(self, peer: str, now: float) -> float:
        tokens, at = self._buckets.get(peer, (self._burst, now))
        return min(self._burst, tokens + (now - at) * self._rate)

    def check(self, peer: str) -> None:
        """Raise :class:`RateLimited` when ``peer`` has no failure left to spend."""
        with self._lock:
            now = self._clock()
            level = self._level(peer, now)
            if level < 1.0:
                raise RateLimited((1.0 - level) / self._rate)

    def failed(self, peer: str) -> None:
        """Record one failed attempt by ``peer``."""
        with self._lock:
            now = self._clock()
            self._buckets[peer] = (self._level(peer, now) - 1.0, now)
            if len(self._buckets) > self._max_peers:
                # Forget peers whose bucket has refilled: they are indistinguishable from new.
                for p in [p for p in self._buckets if self._level(p, now) >= self._burst]:
                    del self._buckets[p]


def create_token(
    registry: Registry,
    *,
    device_id: str,
    device_type: str,
    region: str,
    ttl: dt.timedelta,
    now: dt.datetime,
) -> str:
    """Create a one-time token for ``device_id``; return it (the registry keeps its hash).

    Earlier unused tokens of ``device_id`` stop working. Raises
    :class:`~pki.errors.IdentityConflict` when a gateway or core holds the id and
    :class:`~pki.errors.RegistryError` when the device is revoked; both are audited.
    """
    token = generate_token(device_id)
    try:
        voided = registry.create_token(
            TokenRecord(hash_token(token), device_id, device_type, region, now + ttl, None),
            now=now,
        )
    except RegistryError as exc:
        _audit.warning("token.refused", audit=True, device_id=device_id, reason=str(exc))
        raise
    if voided:
        _audit.info(
            "token.voided",
            audit=True,
            device_id=device_id,
            count=voided,
            reason="replaced by a newer token",
        )
    _audit.info(
        "token.created",
        audit=True,
        device_id=device_id,
        device_type=device_type,
        region=region,
        expires_at=(now + ttl).isoformat(),
    )
    return token


def revoke_device(
    registry: Registry, device_id: str, *, reason: str, now: dt.datetime
) -> RevocationRecord:
    """Revoke a device (every certificate it holds); audit-logged."""
    record = registry.revoke_device(device_id, reason=reason, now=now)
    _audit.info(
        "device.revoked",
        audit=True,
        device_id=record.device_id,
        sequence=record.sequence,
        reason=record.reason,
    )
    return record


def _audit_certificate_revoked(record: RevocationRecord) -> None:
    owner = (
        {"device_id": record.device_id}
        if record.role is Role.DEVICE
        else {"role": record.role.value, f"{record.role.value}_id": record.device_id}
    )
    _audit.info(
        "certificate.revoked",
        audit=True,
        serial=record.serial,
        sequence=record.sequence,
        reason=record.reason,
        **owner,
    )


def revoke_serial(
    registry: Registry, serial: str, *, reason: str, now: dt.datetime
) -> RevocationRecord:
    """Revoke one certificate by serial (a device's, a gateway's or a core's); audit-logged."""
    record = registry.revoke_serial(serial, reason=reason, now=now)
    _audit_certificate_revoked(record)
    return record


def revoke_server(
    registry: Registry, role: Role, server_id: str, *, reason: str, now: dt.datetime
) -> list[RevocationRecord]:
    """Revoke every recorded certificate of a gateway or core; one audit line per serial."""
    records = registry.revoke_server(role, server_id, reason=reason, now=now)
    for record in records:
        _audit_certificate_revoked(record)
    return records


class EnrollmentAuthority:
    """Decides enrolments and renewals; signs with the issuing CA; records in the registry."""

    def __init__(
        self,
        *,
        ca: CertificateAuthority,
        registry: Registry,
        device_lifetime: dt.timedelta = DEFAULT_DEVICE_LIFETIME,
        limiter: FailureLimiter | None = None,
    ) -> None:
        self.ca = ca
        self.registry = registry
        self.device_lifetime = device_lifetime
        self.limiter = limiter or FailureLimiter()

    @property
    def trust_domain(self) -> str:
        return self.ca.trust_domain

    def _issue_renewal(
        self,
        identity: Identity,
        public_key: ec.EllipticCurvePublicKey,
        device: DeviceRecord,
        previous_serial: str,
        now: dt.datetime,
    ) -> IssuedCertificate:
        cert = self.ca.issue(public_key, identity=identity, now=now, lifetime=self.device_lifetime)
        # check_current ran before the signature; a revocation may have landed since. One
        # transaction checks the device and the previous serial again and records the new
        # certificate, so it is handed out only if nothing was revoked in between (a
        # revocation after it covers the new certificate too). Otherwise it is dropped here.
        self.registry.record_renewal(
            previous_serial,
            CertificateRecord(
                serial_hex(cert.serial_number),
                identity.id,
                cert.not_valid_after_utc,
                Status.ACTIVE,
                now,
            ),
        )
        return IssuedCertificate(
            cert, self.ca.chain_pem(cert), self.ca.bundle_pem, device, identity
        )

    def enroll(self, token: str, csr: bytes, *, peer: str, now: dt.datetime) -> IssuedCertificate:
        """Trade a one-time token and a CSR for a device certificate.

        The CSR is checked against the token's device *before* the token is spent, so an
        honest device that sent a bad CSR can fix it and retry with the same token. Failed
        token attempts count against ``peer``'s budget.
        """
        self.limiter.check(peer)
        device_id: str | None = None
        try:
            device_id = token_device_id(token)
            issued = self._enroll(device_id, token, csr, now)
        except TokenRejected as exc:
            self.limiter.failed(peer)
            self._refused("enroll", exc.reason, device_id=device_id, peer=peer)
            raise
        except (InvalidCsr, CertificateRevoked, RegistryError) as exc:
            self._refused("enroll", str(exc), device_id=device_id, peer=peer)
            raise
        device = issued.device
        _audit.info(
            "certificate.issued",
            audit=True,
            device_id=device_id,
            serial=issued.serial,
            not_after=issued.certificate.not_valid_after_utc.isoformat(),
            device_type=device.type,
            region=device.region,
            peer=peer,
            replaced_serials=[r.serial for r in issued.replaced],
        )
        for record in issued.replaced:
            _audit_certificate_revoked(record)
        return issued

    def _enroll(
        self, device_id: str, token: str, csr: bytes, now: dt.datetime
    ) -> IssuedCertificate:
        token_hash = hash_token(token)
        record = self.registry.get_token(token_hash)
        if record is None:
            raise TokenRejected("unknown token")
        if record.voided_at is not None:
            raise TokenRejected("token voided by a newer token")
        if record.used_at is not None:
            raise TokenRejected("token already used")
        if record.expires_at <= now:
            raise TokenRejected("token expired")
        if record.device_id != device_id:  # cannot happen for tokens we made
            raise TokenRejected("token names another device")
        identity = Identity(self.trust_domain, Role.DEVICE, device_id)
        public_key = validate_csr(csr, identity=identity)
        cert = self.ca.issue(public_key, identity=identity, now=now, lifetime=self.device_lifetime)
        # One transaction spends the token (the conditional UPDATE decides among concurrent
        # attempts), refuses a revoked device or an id another role took meanwhile, registers
        # the device, revokes the certificates this one replaces and records it. A
        # certificate signed for a losing attempt is dropped here, never handed out.
        enrolment = self.registry.complete_enrolment(
            token_hash,
            certificate=CertificateRecord(
                serial_hex(cert.serial_number),
                device_id,
                cert.not_valid_after_utc,
                Status.ACTIVE,
                now,
            ),
            now=now,
        )
        return IssuedCertificate(
            cert,
            self.ca.chain_pem(cert),
            self.ca.bundle_pem,
            enrolment.device,
            identity,
            enrolment.replaced,
        )

    def check_current(
        self, current: x509.Certificate, *, now: dt.datetime
    ) -> tuple[Identity, DeviceRecord]:
        """The identity behind a device's current certificate, if it may still renew."""
        identity = identity_from_certificate(
            current, trust_domain=self.trust_domain, role=Role.DEVICE
        )
        try:
            current.verify_directly_issued_by(self.ca.issuer_certificate(Role.DEVICE))
        except Exception:  # noqa: BLE001 - any failure means "not ours"
            raise InvalidIdentity("certificate was not issued by this core's CA") from None
        serial = serial_hex(current.serial_number)
        # Revocation first: a revoked device must get the final answer even when expired.
        if self.registry.is_revoked(identity.id, serial):
            raise CertificateRevoked(identity.id, serial)
        if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
            raise CertificateExpired(identity.id, current.not_valid_after_utc.isoformat())
        device = self.registry.get_device(identity.id)
        if device is None or self.registry.get_certificate(serial) is None:
            raise InvalidIdentity("certificate is not known to the registry; enrol with a token")
        return identity, device

    def renew(
        self, current: x509.Certificate, csr: bytes, *, now: dt.datetime, peer: str = ""
    ) -> IssuedCertificate:
        """A fresh certificate for the holder of ``current`` (a new key is allowed).

        ``current`` must come from the TLS layer (the verified peer certificate), never from
        the request.
        """
        device_id: str | None = None
        try:
            try:
                device_id = identity_from_certificate(current, trust_domain=self.trust_domain).id
            except PkiError:
                device_id = None
            identity, device = self.check_current(current, now=now)
            public_key = validate_csr(csr, identity=identity)
            issued = self._issue_renewal(
                identity, public_key, device, serial_hex(current.serial_number), now
            )
        except (InvalidCsr, InvalidIdentity, CertificateRevoked, CertificateExpired) as exc:
            self._refused("renew", str(exc), device_id=device_id, peer=peer)
            raise
        _audit.info(
            "certificate.renewed",
            audit=True,
            device_id=identity.id,
            serial=issued.serial,
            previous_serial=serial_hex(current.serial_number),
            not_after=issued.certificate.not_valid_after_utc.isoformat(),
            peer=peer,
        )
        return issued

    def revoke_device(self, device_id: str, *, reason: str, now: dt.datetime) -> RevocationRecord:
        return revoke_device(self.registry, device_id, reason=reason, now=now)

    def revoke_serial(self, serial: str, *, reason: str, now: dt.datetime) -> RevocationRecord:
        return revoke_serial(self.registry, serial, reason=reason, now=now)

    @staticmethod
    def _refused(action: str, reason: str, *, device_id: str | None, peer: str) -> None:
        _audit.warning(
            "enrolment.refused" if action == "enroll" else "renewal.refused",
            audit=True,
            action=action,
            device_id=device_id,
            reason=reason,
            peer=peer,
        )
