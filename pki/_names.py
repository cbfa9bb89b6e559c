"""Identity names: ids, trust domains and SPIFFE-style URIs.

An id ends up inside MQTT topics (``devices/<id>/…``), file names and certificate CNs, so the
pattern excludes MQTT wildcards (``+``, ``#``), separators (``/``), NUL, upper case and
everything else that could change the meaning of a topic or a path (MQTT 5 §4.7.1).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from pki.errors import InvalidIdentity, InvalidName

__all__ = [
    "ID_PATTERN",
    "Identity",
    "Role",
    "identity_from_certificate",
    "parse_spiffe_id",
    "validate_device_type",
    "validate_id",
    "validate_trust_domain",
]

ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{2,62}")
# Device types (``pet_camera``, ``robot_vacuum``) live in the registry and in policy tables,
# never in topics or file names, so snake case is allowed; still no wildcard or separator.
DEVICE_TYPE_PATTERN = re.compile(r"[a-z][a-z0-9_-]{1,31}")
# DNS-like: labels of [a-z0-9-], not starting or ending with '-', at most 253 characters.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_TRUST_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


class Role(enum.StrEnum):
    """What an identity is: the path segment after the trust domain."""

    DEVICE = "device"
    GATEWAY = "gateway"
    CORE = "core"


def validate_id(value: str, *, kind: str = "id") -> str:
    """Return ``value`` if it is a valid id, else raise :class:`InvalidName`."""
    if not isinstance(value, str) or ID_PATTERN.fullmatch(value) is None:
        raise InvalidName(
            kind,
            "must be 3-63 characters of a-z, 0-9 and '-', starting with a letter or digit",
        )
    return value


def validate_device_type(value: str) -> str:
    """Return ``value`` if it is a valid device type (``pet_camera``), else raise."""
    if not isinstance(value, str) or DEVICE_TYPE_PATTERN.fullmatch(value) is None:
        raise InvalidName(
            "device type",
            "must be 2-32 characters of a-z, 0-9, '_' and '-', starting with a letter",
        )
    return value


def validate_trust_domain(value: str) -> str:
    """Return ``value`` if it is a valid trust domain, else raise :class:`InvalidName`."""
    if not isinstance(value, str) or len(value) > 253 or _TRUST_DOMAIN.fullmatch(value) is None:
        raise InvalidName("trust domain", "must be a lower-case DNS name such as home.example")
    return value


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified identity: ``spiffe://<trust_domain>/<role>/<id>``."""

    trust_domain: str
    role: Role
    id: str

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        validate_id(self.id, kind=f"{self.role.value} id")

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/{self.role.value}/{self.id}"

    def __str__(self) -> str:
        return self.spiffe_id


def parse_spiffe_id(uri: str, *, trust_domain: str | None = None) -> Identity:
    """Parse ``spiffe://td/role/id``; with ``trust_domain`` set, it must match."""
    prefix = "spiffe://"
    if not uri.startswith(prefix):
        raise InvalidIdentity("not a spiffe:// URI")
    parts = uri[len(prefix) :].split("/")
    if len(parts) != 3:
        raise InvalidIdentity("SPIFFE id must be spiffe://<trust-domain>/<role>/<id>")
    td, role_s, ident = parts
    try:
        role = Role(role_s)
    except ValueError:
        raise InvalidIdentity(f"unknown role {role_s!r}") from None
    try:
        identity = Identity(td, role, ident)
    except InvalidName as exc:
        raise InvalidIdentity(str(exc)) from exc
    if trust_domain is not None and identity.trust_domain != trust_domain:
        raise InvalidIdentity("identity belongs to another trust domain")
    return identity


def identity_from_certificate(
    cert: x509.Certificate, *, trust_domain: str, role: Role | None = None
) -> Identity:
    """The identity a certificate carries: exactly one SPIFFE URI SAN, and CN equal to its id.

    Raises :class:`InvalidIdentity` when the certificate carries none, several, one of another
    trust domain or role, or a CN that disagrees.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidIdentity("certificate has no subject alternative name") from None
    uris = list(san.get_values_for_type(x509.UniformResourceIdentifier))
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    if len(spiffe) != 1:
        raise InvalidIdentity("certificate must carry exactly one spiffe:// URI SAN")
    identity = parse_spiffe_id(spiffe[0], trust_domain=trust_domain)
    if role is not None and identity.role is not role:
        raise InvalidIdentity(f"certificate is a {identity.role.value} identity, not {role.value}")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or cns[0].value != identity.id:
        raise InvalidIdentity("certificate CN does not repeat the identity's id")
    return identity
