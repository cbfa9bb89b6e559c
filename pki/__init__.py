"""edgeward's identity plane: CA, profiles, identities, TLS settings, enrolment, registry, CRL.

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
from pki._crl import DEFAULT_CRL_VALIDITY, build_crl, crl_bytes
from pki._csr import MAX_CSR_BYTES, load_csr, validate_csr
from pki._directory import SignedPayload, sign_payload, verify_signed_payload
from pki._enrollment import (
    EnrollmentAuthority,
    FailureLimiter,
    IssuedCertificate,
    create_token,
    revoke_device,
    revoke_serial,
)
from pki._files import generate_private_key, load_private_key, write_atomic, write_private_key
from pki._identity import IdentityFiles, issue_identity, write_identity
from pki._names import (
    ID_PATTERN,
    Identity,
    Role,
    identity_from_certificate,
    parse_spiffe_id,
    validate_device_type,
    validate_id,
    validate_trust_domain,
)
from pki._registry import (
    CertificateRecord,
    DeviceRecord,
    GatewayRecord,
    Registry,
    RevocationRecord,
    SqliteRegistry,
    Status,
    TokenRecord,
)
from pki._tls import (
    AEAD_CIPHERS_TLS12,
    client_ssl_context,
    grpc_channel_credentials,
    grpc_server_credentials,
    server_ssl_context,
)
from pki._tokens import MAX_TOKEN_LENGTH, generate_token, hash_token, parse_ttl, token_device_id
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
    SignatureInvalid,
    TokenRejected,
)

__all__ = [
    "AEAD_CIPHERS_TLS12",
    "DEFAULT_CRL_VALIDITY",
    "DEFAULT_DEVICE_LIFETIME",
    "DEFAULT_SERVER_LIFETIME",
    "ID_PATTERN",
    "MAX_CSR_BYTES",
    "MAX_TOKEN_LENGTH",
    "CertificateAuthority",
    "CertificateExpired",
    "CertificateRecord",
    "CertificateRevoked",
    "DeviceRecord",
    "EnrollmentAuthority",
    "FailureLimiter",
    "GatewayRecord",
    "Identity",
    "IdentityFiles",
    "InvalidCsr",
    "InvalidIdentity",
    "InvalidName",
    "IssuedCertificate",
    "PkiError",
    "PkiExists",
    "PkiLayout",
    "PkiNotFound",
    "RateLimited",
    "Registry",
    "RegistryError",
    "RevocationRecord",
    "Role",
    "SignatureInvalid",
    "SignedPayload",
    "SqliteRegistry",
    "Status",
    "TokenRecord",
    "TokenRejected",
    "build_crl",
    "client_ssl_context",
    "create_token",
    "crl_bytes",
    "generate_private_key",
    "generate_token",
    "grpc_channel_credentials",
    "grpc_server_credentials",
    "hash_token",
    "identity_from_certificate",
    "init_pki",
    "issue_identity",
    "load_csr",
    "load_private_key",
    "parse_spiffe_id",
    "parse_ttl",
    "revoke_device",
    "revoke_serial",
    "serial_hex",
    "server_ssl_context",
    "sign_payload",
    "token_device_id",
    "validate_csr",
    "validate_device_type",
    "validate_id",
    "validate_trust_domain",
    "verify_signed_payload",
    "write_atomic",
    "write_identity",
    "write_private_key",
]
