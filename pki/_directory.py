"""Signing and verifying the gateway directory (or any small payload) with the issuing CA.

The core signs the serialised directory with the issuing CA's key (ECDSA, SHA-256, over the
exact bytes) and ships the signer's certificate with it. A device verifies that the signer is a
CA of its trust domain (a certificate in its CA bundle, or a CA certificate issued directly by
one of them and valid now), then the signature. This module works on bytes so that ``pki``
stays free of the wire format; ``device_sdk`` and the core wrap it in the protobuf messages.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pki._ca import CertificateAuthority
from pki.errors import SignatureInvalid

__all__ = ["SignedPayload", "sign_payload", "verify_signed_payload"]


@dataclass(frozen=True, slots=True)
class SignedPayload:
    payload: bytes
    signature: bytes
    signer_certificate_pem: bytes


def sign_payload(ca: CertificateAuthority, payload: bytes) -> SignedPayload:
    """Sign ``payload`` with the issuing CA."""
    return SignedPayload(payload, ca.sign(payload), ca.certificate_pem)


def _load_bundle(ca_bundle_pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(ca_bundle_pem)
    except ValueError:
        raise SignatureInvalid("the CA bundle holds no readable certificate") from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def verify_signed_payload(
    payload: bytes,
    signature: bytes,
    signer_certificate_pem: bytes,
    *,
    ca_bundle_pem: bytes,
    now: dt.datetime,
) -> None:
    """Raise :class:`SignatureInvalid` unless a CA of the bundle signed ``payload``."""
    try:
        signer = x509.load_pem_x509_certificate(signer_certificate_pem)
    except ValueError:
        raise SignatureInvalid("the signer certificate cannot be read") from None
    bundle = _load_bundle(ca_bundle_pem)
    der = signer.public_bytes(serialization.Encoding.DER)
    trusted = any(c.public_bytes(serialization.Encoding.DER) == der for c in bundle)
    if not trusted:
        for anchor in bundle:
            try:
                signer.verify_directly_issued_by(anchor)
            except (ValueError, TypeError, InvalidSignature):
                continue
            trusted = _is_ca(anchor)
            break
    if not trusted or not _is_ca(signer):
        raise SignatureInvalid("the signer is not a CA of this trust domain")
    if not signer.not_valid_before_utc <= now <= signer.not_valid_after_utc:
        raise SignatureInvalid("the signer's certificate is not valid now")
    key = signer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SignatureInvalid("the signer's key is not an EC key")
    try:
        key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureInvalid("the signature does not match the payload") from None
