"""edgeward's identity plane: certificate authority, profiles, identities and TLS settings.

The public surface is what this module lists in ``__all__``; the ``_modules`` behind it are
private. Nothing here reads the environment or configures logging.
"""

from pki._ca import (
    DEFAULT_DEVICE_LIFETIME,
    DEFAULT_SERVER_LIFETIME,
    CertificateAuthority,
    PkiLayout,
    init_pki,
    serial_hex,
)
from pki._files import generate_private_key, load_private_key, write_atomic, write_private_key
from pki._identity import IdentityFiles, issue_identity, write_identity
from pki._names import (
    ID_PATTERN,
    Identity,
    Role,
    identity_from_certificate,
    parse_spiffe_id,
    validate_id,
    validate_trust_domain,
)
from pki._tls import (
    AEAD_CIPHERS_TLS12,
    client_ssl_context,
    grpc_channel_credentials,
    grpc_server_credentials,
    server_ssl_context,
)
from pki.errors import (
    CertificateExpired,
    CertificateRevoked,
    InvalidCsr,
    InvalidIdentity,
    InvalidName,
    PkiError,
    PkiExists,
    PkiNotFound,
    RateLimited,
    RegistryError,
    TokenRejected,
)

__all__ = [
    "AEAD_CIPHERS_TLS12",
    "DEFAULT_DEVICE_LIFETIME",
    "DEFAULT_SERVER_LIFETIME",
    "ID_PATTERN",
    "CertificateAuthority",
    "CertificateExpired",
    "CertificateRevoked",
    "Identity",
    "IdentityFiles",
    "InvalidCsr",
    "InvalidIdentity",
    "InvalidName",
    "PkiError",
    "PkiExists",
    "PkiLayout",
    "PkiNotFound",
    "RateLimited",
    "RegistryError",
    "Role",
    "TokenRejected",
    "client_ssl_context",
    "generate_private_key",
    "grpc_channel_credentials",
    "grpc_server_credentials",
    "identity_from_certificate",
    "init_pki",
    "issue_identity",
    "load_private_key",
    "parse_spiffe_id",
    "serial_hex",
    "server_ssl_context",
    "validate_id",
    "validate_trust_domain",
    "write_atomic",
    "write_identity",
    "write_private_key",
]
