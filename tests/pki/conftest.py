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
