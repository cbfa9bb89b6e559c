"""Atomic file writes with safe permissions, and key generation and loading."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "PrivateKey",
    "generate_private_key",
    "load_private_key",
    "private_key_pem",
    "write_atomic",
    "write_private_key",
]

PrivateKey = ec.EllipticCurvePrivateKey


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a part.

    The temporary file is created with ``mode`` from the start (no window in which a key is
    world-readable), fsynced, then renamed over the target.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def generate_private_key(curve: str = "P-256") -> PrivateKey:
    """A new EC key (P-256 by default, P-384 on request)."""
    curves: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}
    if curve not in curves:
        raise ValueError(f"unsupported curve {curve!r}; use P-256 or P-384")
    return ec.generate_private_key(curves[curve])


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private_key(path: Path, key: PrivateKey) -> None:
    """Write a key as PKCS#8 PEM, atomically, mode 0600."""
    write_atomic(path, private_key_pem(key), mode=0o600)


def load_private_key(path: Path) -> PrivateKey:
    """The unencrypted PEM EC private key at ``path`` (``TypeError`` for another kind)."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{path} does not hold an EC private key")
    return key
