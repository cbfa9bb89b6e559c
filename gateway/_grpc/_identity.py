"""Who is calling: the device identity proven by the TLS peer certificate, judged per call.

The auth context gRPC hands a servicer (``context.auth_context()``) is the only source of
identity; request fields and metadata are never consulted (DESIGN.md, "Identity"). The TLS
layer has already checked the chain against the trust domain's CA bundle and the validity
period against the system clock at the handshake; this module re-judges what a long-lived
connection may have outlived, on every call and every stream message:

- the certificate carries exactly one SPIFFE URI of this trust domain with role ``device``
  (a gateway or core identity may not call device methods: ``PermissionDenied``);
- its extended key usage includes ``clientAuth`` (RFC 5280 §4.2.1.12);
- the device issuing CA issued it (the TLS layer trusts the whole bundle; the MQTT device
  listener trusts the device CA alone, and both admit the same certificates);
- it is within its validity period at ``clock()`` (injected; a connection opened a minute
  before expiry must not carry calls for hours after it);
- neither the device nor this serial is revoked (:class:`RevocationState`).

Parsing a PEM costs tens of microseconds; results are cached by the PEM bytes (bounded), the
time and revocation checks are not.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

import pki
from gateway._revocation import RevocationState
from gateway.errors import DeviceRevoked, PermissionDenied, Unauthenticated

__all__ = ["IdentityJudge", "PeerIdentity"]


AuthContext = Mapping[str, Iterable[bytes]]


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """A device identity proven by the peer certificate of a call."""

    identity: pki.Identity
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def device_id(self) -> str:
        return self.identity.id


@dataclass(frozen=True, slots=True)
class _Parsed:
    peer: PeerIdentity | None
    # Why the certificate can never identify a device (None when it can).
    refusal: Unauthenticated | PermissionDenied | None


class IdentityJudge:
    """Turns a call's auth context into a :class:`PeerIdentity`, or raises.

    Raises :class:`Unauthenticated` (no certificate, not of this trust domain, no clientAuth,
    outside its validity period), :class:`PermissionDenied` (a gateway or core identity), or
    :class:`DeviceRevoked`. The servicer audits each refusal with its reason (through
    :class:`~gateway._refusals.RefusalLog`, bounded per device); the caller is told little.
    """

    def __init__(
        self,
        *,
        trust_domain: str,
        revocation: RevocationState,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        cache_size: int = 4096,
        device_cas: Sequence[x509.Certificate] | None = None,
    ) -> None:
        self._trust_domain = trust_domain
        # None: the issuer is not checked (unit tests of the other rules).
        self._device_cas = None if device_cas is None else tuple(device_cas)
        self._revocation = revocation
        self._clock = clock
        self._cache: OrderedDict[bytes, _Parsed] = OrderedDict()
        self._cache_size = cache_size

    def judge(self, auth_context: AuthContext) -> PeerIdentity:
        """The calling device, checked now (time, revocation)."""
        pems = list(auth_context.get("x509_pem_cert", ()))
        if len(pems) != 1:
            raise Unauthenticated("no client certificate")
        parsed = self._parse(pems[0])
        if parsed.refusal is not None:
            raise parsed.refusal
        assert parsed.peer is not None  # noqa: S101 - no refusal implies a peer
        return self.recheck(parsed.peer)

    def recheck(self, peer: PeerIdentity) -> PeerIdentity:
        """Judge an already-parsed identity again (each message of a stream)."""
        now = self._clock()
        if not peer.not_before <= now <= peer.not_after:
            raise Unauthenticated(
                f"certificate outside its validity period (not after {peer.not_after.isoformat()})"
            )
        if self._revocation.is_revoked(peer.device_id, peer.serial):
            raise DeviceRevoked(peer.device_id, peer.serial)
        return peer

    def _parse(self, pem: bytes) -> _Parsed:
        hit = self._cache.get(pem)
        if hit is not None:
            self._cache.move_to_end(pem)
            return hit
        parsed = self._parse_uncached(pem)
        self._cache[pem] = parsed
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return parsed

    def _parse_uncached(self, pem: bytes) -> _Parsed:
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            return _Parsed(None, Unauthenticated("peer certificate unreadable"))
        try:
            identity = pki.identity_from_certificate(cert, trust_domain=self._trust_domain)
        except pki.InvalidIdentity as exc:
            return _Parsed(None, Unauthenticated(f"no device identity: {exc}"))
        if identity.role is not pki.Role.DEVICE:
            return _Parsed(
                None,
                PermissionDenied(
                    f"a {identity.role.value} identity may not call device methods",
                    reason="not_a_device",
                ),
            )
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            return _Parsed(None, Unauthenticated("certificate has no extended key usage"))
        if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            return _Parsed(None, Unauthenticated("certificate is not for client authentication"))
        if self._device_cas is not None and not any(
            _issued_by(cert, ca) for ca in self._device_cas
        ):
            return _Parsed(None, Unauthenticated("certificate not issued by the device CA"))
        peer = PeerIdentity(
            identity=identity,
            serial=pki.serial_hex(cert.serial_number),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )
        return _Parsed(peer, None)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
