"""The certificate revocation list, built from the registry.

The CRL lists every revoked certificate (revoked one by one, or with its whole device), signed by
the issuing CA, with a CRL number that grows with every CRL built (RFC 5280 §5.2.3). Mosquitto
reads it for new connections (``crlfile``); gRPC services check the registry's revocation set
themselves because Python gRPC has no CRL option.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pki._ca import CertificateAuthority
from pki._registry import Registry

__all__ = ["DEFAULT_CRL_VALIDITY", "build_crl", "crl_bytes"]

DEFAULT_CRL_VALIDITY = dt.timedelta(hours=24)


def build_crl(
    ca: CertificateAuthority,
    registry: Registry,
    *,
    now: dt.datetime,
    validity: dt.timedelta = DEFAULT_CRL_VALIDITY,
) -> x509.CertificateRevocationList:
    """A signed CRL of the registry's revoked serials, with the next CRL number."""
    revoked = [(int(serial, 16), at) for serial, at in registry.revoked_serials()]
    return ca.build_crl(
        revoked, now=now, next_update=validity, crl_number=registry.next_crl_number()
    )


def crl_bytes(crl: x509.CertificateRevocationList, *, der: bool = False) -> bytes:
    """The CRL as PEM (default) or DER."""
    return crl.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)
