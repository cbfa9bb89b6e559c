"""Helpers for the identity-plane tests: CSRs made the way devices and attackers make them."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import pki

NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)


def make_csr(
    cn: str,
    *,
    key: object | None = None,
    sans: list[x509.GeneralName] | None = None,
    der: bool = False,
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algorithm = None if type(key).__name__.startswith("Ed") else hashes.SHA256()
    csr = builder.sign(key, algorithm)  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)


def tamper_signature(csr_pem: bytes) -> bytes:
    """Flip a bit in the signature's last integer: still well-formed DER, no longer valid."""
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    return bytes(der)


@pytest.fixture
def fresh_pki(tmp_path: Path) -> Path:
    d = tmp_path / "fresh-pki"
    pki.init_pki(d, trust_domain="unit.example")
    return d


@pytest.fixture
def registry(tmp_path: Path) -> pki.SqliteRegistry:
    reg = pki.SqliteRegistry(tmp_path / "registry.sqlite3")
    yield reg  # type: ignore[misc]
    reg.close()


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def duplicate_extension_csr(identity: pki.Identity) -> bytes:
    """A correctly signed DER CSR that requests subjectAltName twice.

    cryptography refuses to build one, so it builds a CSR with subjectAltName and
    issuerAltName (same length), renames the second OID in the signed part, and signs again.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    uri = x509.UniformResourceIdentifier(identity.spiffe_id)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.id)]))
        .add_extension(x509.SubjectAlternativeName([uri]), critical=False)
        .add_extension(x509.IssuerAlternativeName([uri]), critical=False)
        .sign(key, hashes.SHA256())
    )
    info = csr.tbs_certrequest_bytes.replace(b"\x06\x03\x55\x1d\x12", b"\x06\x03\x55\x1d\x11")
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    ecdsa_sha256 = b"\x30\x0a\x06\x08\x2a\x86\x48\xce\x3d\x04\x03\x02"
    bits = b"\x03" + _der_length(len(signature) + 1) + b"\x00" + signature
    body = info + ecdsa_sha256 + bits
    return b"\x30" + _der_length(len(body)) + body
