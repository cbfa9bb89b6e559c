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
    "CORE_SERVER_NAME",
    "GATEWAY_SERVER_NAME_SUFFIX",
    "ID_PATTERN",
    "RESERVED_DNS_SUFFIX",
    "Identity",
    "Role",
    "core_server_name",
    "gateway_server_name",
    "identity_from_certificate",
    "is_reserved_dns_name",
    "parse_spiffe_id",
    "reserved_dns_names",
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

# Role-pinned server names. Python gRPC clients cannot look at the server's certificate after
# the handshake, so a client that wants "the core" or "gateway kr-seoul" demands a DNS name
# only that identity's certificate carries (``grpc.ssl_target_name_override``), while it
# still connects to the real address. The CA adds these names by role and refuses them (and
# anything else under RESERVED_DNS_SUFFIX) as requested names, so a stolen gateway key can
# neither pose as the core nor as another gateway, however its other SANs read.
# ``.internal`` is reserved by ICANN for private use and never delegated in the public DNS,
# so these names cannot collide with a real host, and no public CA can issue them.
#: Every name under this suffix is the CA's to assign; none can be requested.
RESERVED_DNS_SUFFIX = "edgeward.internal"
#: The DNS SAN every core certificate carries (all cores share it: any core is "the core").
CORE_SERVER_NAME = f"core.{RESERVED_DNS_SUFFIX}"
#: A gateway's certificate carries ``<gateway-id>`` + this suffix.
GATEWAY_SERVER_NAME_SUFFIX = f".gateway.{RESERVED_DNS_SUFFIX}"


class Role(enum.StrEnum):
    """What an identity is: the path segment after the trust domain."""

    DEVICE = "device"
    GATEWAY = "gateway"
    CORE = "core"
    #: A person using the console; viewer or admin is recorded in the registry, not here.
    OPERATOR = "operator"


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


def core_server_name() -> str:
    """The name a client demands of a core (``grpc.ssl_target_name_override``)."""
    return CORE_SERVER_NAME


def gateway_server_name(gateway_id: str) -> str:
    """The name a client demands of gateway ``gateway_id``: ``<id>.gateway.edgeward.internal``.

    Ids contain no dot, so no gateway's name can be another's, nor the core's.
    """
    return validate_id(gateway_id, kind="gateway id") + GATEWAY_SERVER_NAME_SUFFIX


def reserved_dns_names(identity: Identity) -> tuple[str, ...]:
    """The reserved names the CA puts into ``identity``'s certificate (none for devices)."""
    if identity.role is Role.CORE:
        return (core_server_name(),)
    if identity.role is Role.GATEWAY:
        return (gateway_server_name(identity.id),)
    return ()


def is_reserved_dns_name(name: str) -> bool:
    """Whether ``name`` (as requested for a certificate) could match a reserved name.

    Case-insensitive, ignores a trailing dot, and also true for a wildcard that could cover
    one: ``*.gateway.edgeward.internal``, ``*.edgeward.internal``, ``*.internal``. The
    reserved suffix is compared without its leading dot, so ``xedgeward.internal`` is refused
    too: nobody needs it, and a looser rule is one more thing to get wrong.
    """
    n = name.strip().rstrip(".").lower()
    if n.endswith(RESERVED_DNS_SUFFIX):
        return True
    if "*" in n:
        # A wildcard matches within its own label; what follows that label must not be a
        # suffix of any reserved name (``internal``, ``edgeward.internal``, …).
        _, _, rest = n.partition(".")
        longest = GATEWAY_SERVER_NAME_SUFFIX.lstrip(".")
        return rest in ("", longest) or longest.endswith("." + rest)
    return False


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
