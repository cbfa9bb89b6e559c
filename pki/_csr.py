"""Checking a certificate signing request before the CA signs anything for it.

A CSR is accepted only when all of these hold; otherwise :class:`InvalidCsr` says which failed,
in words an honest device can act on:

* it parses as PKCS#10, PEM or DER, within :data:`MAX_CSR_BYTES`;
* its signature verifies with the key it carries: proof that the requester holds the private
  key (RFC 2986 §3);
* the key is EC P-256 or P-384 (what the devices and our TLS settings use; RSA and Ed25519 are
  refused so every identity has the same strength and TLS compatibility);
* the subject is exactly ``CN=<device id>``; a subjectAltName, if present, is exactly the
  device's SPIFFE URI; no other extension is requested, and none twice. The profile (key usage,
  EKU, lifetime) is set by the CA, never copied from the request.

cryptography parses a CSR's subject and extensions lazily, when they are first read, so those
reads can raise its own errors (``DuplicateExtension``, ``ValueError`` for a malformed
extension); :func:`_check_names` turns every one of them into :class:`InvalidCsr`.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import DuplicateExtension, UnsupportedGeneralNameType
from cryptography.x509.oid import NameOID

from pki._names import Identity
from pki.errors import InvalidCsr

__all__ = ["ALLOWED_CURVES", "MAX_CSR_BYTES", "load_csr", "validate_csr"]

MAX_CSR_BYTES = 16 * 1024
ALLOWED_CURVES = frozenset({"secp256r1", "secp384r1"})


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM or DER CSR, bounded in size; :class:`InvalidCsr` when it is not one."""
    if not isinstance(data, bytes | bytearray) or not data:
        raise InvalidCsr("no certificate signing request was sent")
    if len(data) > MAX_CSR_BYTES:
        raise InvalidCsr(f"certificate signing request is larger than {MAX_CSR_BYTES} bytes")
    data = bytes(data)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidCsr("not a PKCS#10 certificate signing request (PEM or DER)") from None


def _check_key(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey:
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidCsr("the CSR's public key cannot be read; use an EC P-256 key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        kind = type(key).__name__.removesuffix("PublicKey").removeprefix("_") or "this"
        size = getattr(key, "key_size", None)
        what = f"{kind}-{size}" if size else kind
        raise InvalidCsr(f"{what} keys are not accepted; use an EC P-256 or P-384 key")
    if key.curve.name not in ALLOWED_CURVES:
        raise InvalidCsr(f"EC curve {key.curve.name} is not accepted; use an EC P-256 or P-384 key")
    return key


def _check_signature(csr: x509.CertificateSigningRequest) -> None:
    try:
        ok = csr.is_signature_valid
    except (ValueError, InvalidSignature, UnsupportedAlgorithm):
        ok = False
    if not ok:
        raise InvalidCsr(
            "the CSR's signature does not verify: it must be signed with the private key "
            "whose public key it carries (proof of possession)"
        )


def _parsed_names(
    csr: x509.CertificateSigningRequest,
) -> tuple[list[x509.NameAttribute[str | bytes]], list[x509.Extension[x509.ExtensionType]]]:
    """The CSR's subject attributes and requested extensions, or :class:`InvalidCsr`."""
    try:
        attrs = list(csr.subject)
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidCsr("the CSR's subject cannot be parsed") from None
    try:
        extensions = list(csr.extensions)
    except DuplicateExtension as exc:
        raise InvalidCsr(
            f"the CSR requests extension {exc.oid.dotted_string} more than once"
        ) from None
    except (ValueError, UnsupportedGeneralNameType, UnsupportedAlgorithm):
        raise InvalidCsr("the CSR's requested extensions cannot be parsed") from None
    return attrs, extensions


def _check_names(csr: x509.CertificateSigningRequest, identity: Identity) -> None:
    attrs, extensions = _parsed_names(csr)
    cns = [a for a in attrs if a.oid == NameOID.COMMON_NAME]
    if len(attrs) != 1 or len(cns) != 1:
        raise InvalidCsr("the CSR's subject must be exactly CN=<device id>, with nothing else")
    if cns[0].value != identity.id:
        # Do not echo the expected id: the caller may be guessing tokens' devices.
        raise InvalidCsr(
            "the CSR's subject CN is not the device id the token or certificate is for"
        )
    for ext in extensions:
        if not isinstance(ext.value, x509.SubjectAlternativeName):
            raise InvalidCsr(
                f"the CSR requests extension {ext.oid.dotted_string}; only subjectAltName is "
                "accepted (the certificate profile is set by the core)"
            )
        names = list(ext.value)
        if names != [x509.UniformResourceIdentifier(identity.spiffe_id)]:
            raise InvalidCsr(
                "the CSR's subjectAltName must be exactly the device's spiffe:// URI, "
                "with no DNS names, IP addresses, wildcards or other entries"
            )


def validate_csr(data: bytes, *, identity: Identity) -> ec.EllipticCurvePublicKey:
    """Check ``data`` against ``identity``; return the public key to certify."""
    csr = load_csr(data)
    key = _check_key(csr)
    _check_signature(csr)
    _check_names(csr, identity)
    return key
