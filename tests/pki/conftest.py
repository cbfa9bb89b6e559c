"""Helpers for the identity-plane tests: CSRs made the way devices and attackers make them."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path
from typing import Any

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


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's registry lives: an SQLite file, or a fresh PostgreSQL database.

    Every test that takes ``registry`` (or this) runs once per backend: one contract.
    """
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return str(tmp_path / "registry.sqlite3")


@pytest.fixture
def registry(registry_url: str) -> pki.Registry:
    reg = pki.open_registry(registry_url)
    yield reg  # type: ignore[misc]
    reg.close()


def execute_raw(
    registry: pki.Registry, sql: str, args: tuple[object, ...] = ()
) -> list[tuple[Any, ...]]:
    """Run one SQL statement on the registry's database behind its back (``?`` placeholders),
    as another tool writing to the database might; returns its rows."""
    if isinstance(registry, pki.SqliteRegistry):
        with sqlite3.connect(registry.path) as db:
            return list(db.execute(sql, args).fetchall())
    import psycopg

    assert isinstance(registry, pki.PostgresRegistry)
    with psycopg.connect(registry.url, autocommit=True) as conn:
        cur = conn.execute(sql.replace("?", "%s").encode(), args)
        return list(cur.fetchall()) if cur.description else []


def stored_bytes(registry: pki.Registry) -> bytes:
    """Everything the registry stored, as bytes: the SQLite file (and its WAL), or every row of
    every table of the PostgreSQL database as text."""
    if isinstance(registry, pki.SqliteRegistry):
        raw = registry.path.read_bytes()
        wal = registry.path.with_name(registry.path.name + "-wal")
        return raw + (wal.read_bytes() if wal.exists() else b"")
    tables = [
        str(t)
        for (t,) in execute_raw(
            registry, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        )
    ]
    rows: list[str] = []
    for table in tables:
        # Names from the catalog, not input.
        query = f'SELECT t::text FROM "{table}" t'  # noqa: S608
        rows += [str(r[0]) for r in execute_raw(registry, query)]
    return "\n".join(rows).encode()


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
