"""Helpers for the gateway tests: hostile images, crafted certificates, status checks."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image

import pki


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width × height`` with a few bytes of data (a cheap bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def tiny_jpeg(size: tuple[int, int] = (1, 1)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 80, 40)).save(buf, "JPEG")
    return buf.getvalue()


async def wait_until(predicate: Callable[[], bool], *, within_s: float = 5.0) -> None:
    """Poll ``predicate`` until true (state owned by another task; no event to wait on)."""
    async with asyncio.timeout(within_s):
        while not predicate():  # noqa: ASYNC110 - polling another component's state
            await asyncio.sleep(0.002)


async def rpc_error(aw: object) -> grpc.aio.AioRpcError:
    """Await a call that must fail; return its error."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await aw  # type: ignore[misc]
    return info.value


def trailing(err: grpc.aio.AioRpcError) -> dict[str, str]:
    return {k: str(v) for k, v in (err.trailing_metadata() or ())}


def server_auth_only_device(pki_dir: Path, out: Path, device_id: str) -> pki.IdentityFiles:
    """A device-named certificate from the real issuing CA whose EKU is serverAuth only."""
    layout = pki.PkiLayout(pki_dir)
    ca_key = pki.load_private_key(layout.issuing_key)
    ca_cert = x509.load_pem_x509_certificate(layout.issuing_cert.read_bytes())
    key = pki.generate_private_key()
    now = dt.datetime.now(dt.UTC)
    td = layout.trust_domain_file.read_text().strip()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{td}/device/{device_id}")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    out.mkdir(parents=True)
    pki.write_private_key(out / "key.pem", key)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    return pki.write_identity(
        out,
        certificate=cert,
        chain_pem=pem + layout.issuing_cert.read_bytes(),
        ca_bundle_pem=layout.ca_bundle.read_bytes(),
        metadata={"id": device_id, "role": "device", "trust_domain": td},
    )
