"""Login links from the core's console to a gateway's, signed by the issuing CA.

A gateway has no registry, so it cannot look an operator up; the core can. When an operator
opens a gateway's live view from the core's console, the core signs a short statement with the
issuing CA's key (the key that signs every certificate and the gateway directory): *operator
N, role R, for gateway G, until T, nonce X*. The gateway verifies it with the trust domain's CA
bundle it already holds, checks that it is for itself and unexpired, spends the nonce once,
and opens its own session. The link travels in the URL's fragment (``/login#link=…``), which
browsers never send to a server, so it appears in no access log or ``Referer``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

import pki

__all__ = ["LINK_TTL_S", "LinkVerifier", "LoginLink", "mint_link"]

#: A link is for clicking now: it expires a minute after it is made, and works once.
LINK_TTL_S = 60
_MAX_LINK = 2048


@dataclass(frozen=True, slots=True)
class LoginLink:
    gateway_id: str
    operator: str
    role: pki.OperatorRole
    expires_at: float
    nonce: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def mint_link(
    ca: pki.CertificateAuthority,
    *,
    gateway_id: str,
    operator: str,
    role: pki.OperatorRole,
    now: float | None = None,
) -> str:
    """The signed login statement (``<payload>.<signature>``, base64url)."""
    now = time.time() if now is None else now
    payload = json.dumps(
        {
            "v": 1,
            "td": ca.trust_domain,
            "aud": gateway_id,
            "sub": operator,
            "role": role.value,
            "exp": int(now) + LINK_TTL_S,
            "nonce": secrets.token_hex(16),
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    return f"{_b64(payload)}.{_b64(ca.sign(payload))}"


class LinkVerifier:
    """Checks links for one gateway: CA signature, audience, expiry, one use per nonce."""

    def __init__(
        self,
        *,
        gateway_id: str,
        trust_domain: str,
        ca_bundle_pem: bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._gateway_id = gateway_id
        self._trust_domain = trust_domain
        self._bundle = ca_bundle_pem
        self._clock = clock
        self._signers = [
            c.public_bytes(serialization.Encoding.PEM)
            for c in x509.load_pem_x509_certificates(ca_bundle_pem)
        ]
        self._spent: OrderedDict[str, float] = OrderedDict()

    def verify(self, link: str) -> LoginLink:
        """The statement, or :class:`pki.SignatureInvalid` saying what is wrong with it."""
        if len(link) > _MAX_LINK or link.count(".") != 1:
            raise pki.SignatureInvalid("malformed login link")
        payload_b64, sig_b64 = link.split(".")
        try:
            payload, signature = _unb64(payload_b64), _unb64(sig_b64)
        except (binascii.Error, ValueError):
            raise pki.SignatureInvalid("malformed login link") from None
        now = self._clock()
        when = dt.datetime.fromtimestamp(now, dt.UTC)
        for signer in self._signers:
            try:
                pki.verify_signed_payload(
                    payload, signature, signer, ca_bundle_pem=self._bundle, now=when
                )
                break
            except pki.SignatureInvalid:
                continue
        else:
            raise pki.SignatureInvalid("login link not signed by this trust domain's CA")
        try:
            data = json.loads(payload)
            link_data = LoginLink(
                gateway_id=str(data["aud"]),
                operator=pki.validate_id(str(data["sub"]), kind="operator name"),
                role=pki.OperatorRole(data["role"]),
                expires_at=float(data["exp"]),
                nonce=str(data["nonce"]),
            )
            td = str(data["td"])
        except (ValueError, KeyError, TypeError):
            raise pki.SignatureInvalid("malformed login link") from None
        if td != self._trust_domain or link_data.gateway_id != self._gateway_id:
            raise pki.SignatureInvalid("login link is for another gateway")
        if link_data.expires_at < now or link_data.expires_at > now + 2 * LINK_TTL_S:
            raise pki.SignatureInvalid("login link expired")
        while self._spent and next(iter(self._spent.values())) < now:
            self._spent.popitem(last=False)
        if link_data.nonce in self._spent:
            raise pki.SignatureInvalid("login link already used")
        self._spent[link_data.nonce] = link_data.expires_at
        return link_data
