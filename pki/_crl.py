"""The certificate revocation lists, built from the registry: one per issuing CA.

Each issuing CA signs the CRL of the certificates it issued (RFC 5280 §5: a CRL's scope is its
issuer's certificates): the device CA's lists revoked device certificates (revoked one by one,
or with their whole device), the issuing CA's lists revoked gateway and core certificates. Both
carry the same CRL number, which grows with every set built (RFC 5280 §5.2.3). Mosquitto reads
them for new connections (``crlfile``; one file may hold both); gRPC services check the
registry's revocation set themselves because Python gRPC has no CRL option.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pki._ca import CertificateAuthority
from pki._registry import Registry

__all__ = ["DEFAULT_CRL_VALIDITY", "CrlSet", "build_crl", "crl_bytes"]

DEFAULT_CRL_VALIDITY = dt.timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class CrlSet:
    """The CRL of each issuing CA: ``issuing`` (gateways, cores) and ``device`` (devices)."""

    issuing: x509.CertificateRevocationList
    device: x509.CertificateRevocationList

    def __iter__(self) -> Iterator[x509.CertificateRevocationList]:
        return iter((self.issuing, self.device))

    def __len__(self) -> int:
        """Revoked certificates listed, both CRLs together."""
        return len(self.issuing) + len(self.device)

    def lists(self, serial: int) -> bool:
        """True when either CRL lists ``serial``."""
        return any(c.get_revoked_certificate_by_serial_number(serial) is not None for c in self)


def build_crl(
    ca: CertificateAuthority,
    registry: Registry,
    *,
    now: dt.datetime,
    validity: dt.timedelta = DEFAULT_CRL_VALIDITY,
) -> CrlSet:
    """Both signed CRLs of the registry's revoked serials, with the next CRL number."""
    servers = {r.serial for r in registry.list_server_certificates()}
    device: list[tuple[int, dt.datetime]] = []
    issuing: list[tuple[int, dt.datetime]] = []
    for serial, at in registry.revoked_serials():
        (issuing if serial in servers else device).append((int(serial, 16), at))
    number = registry.next_crl_number()
    return CrlSet(
        issuing=ca.build_crl(issuing, now=now, next_update=validity, crl_number=number),
        device=ca.build_crl(device, now=now, next_update=validity, crl_number=number, devices=True),
    )


def crl_bytes(crl: x509.CertificateRevocationList | CrlSet, *, der: bool = False) -> bytes:
    """A CRL as PEM (default) or DER; a :class:`CrlSet` as both PEM CRLs, one after the other
    (what Mosquitto's ``crlfile`` and ``openssl verify -CRLfile`` read)."""
    if isinstance(crl, CrlSet):
        if der:
            raise ValueError("DER holds one CRL: write crl.issuing and crl.device separately")
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crl)
    return crl.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)
