"""Errors raised by :mod:`pki`.

::

    PkiError
    ├── InvalidName            an id or trust domain outside the allowed pattern
    ├── InvalidIdentity        a certificate that carries no valid edgeward identity
    ├── PkiExists              init over an existing PKI
    ├── PkiNotFound            a PKI directory or identity directory that is missing or incomplete
    ├── InvalidCsr             a CSR that is malformed, badly signed, or names the wrong identity
    ├── TokenRejected          an enrolment token that is unknown, used, expired or mismatched
    ├── RateLimited            too many failed attempts from one peer
    ├── CertificateRevoked     the certificate or its device is revoked (final)
    ├── CertificateExpired     the certificate is outside its validity period
    ├── RegistryError          the registry refused an operation (unknown device, conflict)
    │   ├── IdentityConflict   an id another role already holds (ids are unique across roles)
    │   ├── LastAdmin          revoking the last active admin operator (refused unless forced)
    │   └── RegistryUnavailable  the registry's database cannot be reached now (retry)
    └── SignatureInvalid       a signed payload (the gateway directory) that does not verify

Errors carry data (ids, serials, reasons), never a secret: no token, no key, no whole
certificate.
"""

from __future__ import annotations

__all__ = [
    "CertificateExpired",
    "CertificateRevoked",
    "IdentityConflict",
    "InvalidCsr",
    "InvalidIdentity",
    "InvalidName",
    "LastAdmin",
    "PkiError",
    "PkiExists",
    "PkiNotFound",
    "RateLimited",
    "RegistryError",
    "RegistryUnavailable",
    "SignatureInvalid",
    "TokenRejected",
]


class PkiError(Exception):
    """Root of every error raised by :mod:`pki`."""


class InvalidName(PkiError, ValueError):
    """An id or trust domain that does not match the allowed pattern."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"invalid {kind}: {reason}")
        self.kind = kind
        self.reason = reason


class InvalidIdentity(PkiError):
    """A certificate that carries no valid identity of the expected trust domain."""


class PkiExists(PkiError):
    """``init`` refused to overwrite an existing PKI."""


class PkiNotFound(PkiError):
    """A PKI or identity directory is missing or incomplete."""


class InvalidCsr(PkiError):
    """A certificate signing request that cannot be accepted; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TokenRejected(PkiError):
    """An enrolment token that cannot be used.

    The message given to callers never says whether the token exists; ``reason`` is for the
    audit log only.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(
            "enrolment token rejected: it is unknown, used, expired or not for this device"
        )
        self.reason = reason


class RateLimited(PkiError):
    """Too many failed attempts; retry after ``retry_after_s`` seconds."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"too many failed attempts; retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class CertificateRevoked(PkiError):
    """The certificate (or its whole device) is revoked. Final: the device must stop retrying."""

    def __init__(self, device_id: str, serial: str | None = None) -> None:
        super().__init__(f"device {device_id} is revoked")
        self.device_id = device_id
        self.serial = serial


class CertificateExpired(PkiError):
    """The certificate is not valid at the time it was judged."""

    def __init__(self, subject: str, not_after: str) -> None:
        super().__init__(f"certificate of {subject} is not valid now (not after {not_after})")
        self.subject = subject
        self.not_after = not_after


class RegistryError(PkiError):
    """The registry refused an operation."""


class IdentityConflict(RegistryError):
    """``id`` is already held by another role of the trust domain.

    Ids are unique across roles (DESIGN.md, Identity): a device sharing a gateway's or core's
    id would share its MQTT user name (the certificate CN) and its revocation entries.
    ``holder`` is the role holding the id (``device``, ``gateway`` or ``core``), ``wanted``
    the role that asked for it; ``pending`` is true when the holder is a device known only by
    an unused enrolment token. Ids are not secret: the message names both.
    """

    def __init__(self, id: str, *, holder: str, wanted: str, pending: bool = False) -> None:
        held = f"an unused enrolment token for device {id}" if pending else f"{holder} {id}"
        super().__init__(
            f"id {id} is already taken by {held}: ids are unique across devices, gateways and "
            f"cores; choose another {wanted} id"
        )
        self.id = id
        self.holder = holder
        self.wanted = wanted
        self.pending = pending


class LastAdmin(RegistryError):
    """Revoking ``operator`` would leave no active admin operator, so nobody could act in the
    console any more; refused unless forced (``edgeward pki revoke --operator N --force``)."""

    def __init__(self, operator: str) -> None:
        super().__init__(
            f"operator {operator} is the last active admin: revoking it would leave nobody "
            "able to act in the console; make another admin first, or force it"
        )
        self.operator = operator


class RegistryUnavailable(RegistryError):
    """The registry's database cannot be reached now (connection refused or lost, a server
    restarting): nothing was decided; the caller may retry, here or on another core replica.
    A write whose connection broke while committing may have been committed."""


class SignatureInvalid(PkiError):
    """A signed payload (the gateway directory) whose signer or signature does not verify."""
