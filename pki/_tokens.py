"""One-time enrolment tokens: generation, hashing, and lifetimes written as ``24h``.

A token reads ``<device-id>.<secret>``. The device id is not secret: it tells the device which
name to put in its CSR, so the operator hands over one string. The secret is 32 random bytes
(``secrets.token_urlsafe``, 256 bits), so guessing is hopeless and the registry can store a plain
SHA-256 of the whole token (no salt or slow hash needed for a uniformly random secret).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets

from pki._names import validate_id
from pki.errors import TokenRejected

__all__ = [
    "MAX_TOKEN_LENGTH",
    "generate_token",
    "hash_token",
    "parse_ttl",
    "token_device_id",
]

# Far above a real token (id ≤ 63 + 1 + 43); bounds the work an attacker can ask for.
MAX_TOKEN_LENGTH = 160
_TTL = re.compile(r"(\d{1,6})([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TTL = dt.timedelta(days=30)


def generate_token(device_id: str) -> str:
    """A new token for ``device_id``; show it once, store only :func:`hash_token` of it."""
    validate_id(device_id, kind="device id")
    return f"{device_id}.{secrets.token_urlsafe(32)}"


def hash_token(token: str) -> str:
    """The hex SHA-256 of the token, which is all the registry keeps."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def token_device_id(token: str) -> str:
    """The device id a token names; :class:`TokenRejected` when the token is malformed."""
    if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
        raise TokenRejected("malformed token (length)")
    device_id, sep, secret = token.partition(".")
    if not sep or not secret:
        raise TokenRejected("malformed token (no device id)")
    try:
        return validate_id(device_id, kind="device id")
    except ValueError:
        raise TokenRejected("malformed token (device id)") from None


def parse_ttl(text: str) -> dt.timedelta:
    """Parse ``90s``, ``15m``, ``24h`` or ``7d`` (at most 30 days) into a timedelta."""
    m = _TTL.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"invalid lifetime {text!r}: use a number and s, m, h or d, e.g. 24h")
    ttl = dt.timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
    if ttl <= dt.timedelta(0) or ttl > MAX_TTL:
        raise ValueError(f"invalid lifetime {text!r}: must be more than 0 and at most 30d")
    return ttl
