"""Ready-made TLS settings for gRPC and for Python's ssl module (aiomqtt).

Both sides trust only the trust domain's CA bundle. TLS 1.2 is the floor; with TLS 1.2 only
ECDHE key exchange with AEAD ciphers is offered (no CBC: LUCKY13, RFC 7457 §2.8), and TLS 1.3
suites are all AEAD. gRPC's own defaults already meet this (BoringSSL offers no CBC suite to
a gRPC peer); ``GRPC_SSL_CIPHER_SUITES`` is set by the services to make it explicit.
"""

from __future__ import annotations

import ssl
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization

from pki._ca import server_ca_certificates
from pki._identity import IdentityFiles

__all__ = [
    "AEAD_CIPHERS_TLS12",
    "client_ssl_context",
    "grpc_channel_credentials",
    "grpc_server_credentials",
    "server_name_option",
    "server_ssl_context",
]

AEAD_CIPHERS_TLS12 = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


def grpc_server_credentials(
    identity: IdentityFiles, *, require_client_auth: bool = True
) -> grpc.ServerCredentials:
    """Server credentials presenting ``identity``; clients must present a certificate of the
    trust domain unless ``require_client_auth`` is false (enrolment only)."""
    identity.require()
    return grpc.ssl_server_credentials(
        [(identity.key.read_bytes(), identity.chain.read_bytes())],
        root_certificates=identity.ca_bundle.read_bytes(),
        require_client_auth=require_client_auth,
    )


def grpc_channel_credentials(
    *, ca_bundle_pem: bytes, identity: IdentityFiles | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials trusting ``ca_bundle_pem``, presenting ``identity`` when given."""
    if identity is None:
        return grpc.ssl_channel_credentials(root_certificates=ca_bundle_pem)
    identity.require()
    return grpc.ssl_channel_credentials(
        root_certificates=ca_bundle_pem,
        private_key=identity.key.read_bytes(),
        certificate_chain=identity.chain.read_bytes(),
    )


def server_name_option(server_name: str) -> tuple[str, str]:
    """The gRPC channel argument that makes the client demand ``server_name`` of the server.

    gRPC otherwise checks the server's certificate only against the target's host, which
    every gateway and core certificate names (``localhost``); with this option the TLS
    handshake fails unless the certificate carries ``server_name``, one of the role-pinned
    names (:func:`pki.core_server_name`, :func:`pki.gateway_server_name`) that only the CA
    assigns. The channel still connects to the real address given as its target.
    """
    return ("grpc.ssl_target_name_override", server_name)


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(AEAD_CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION  # CRIME (CVE-2012-4929)
    return ctx


class _PinnedNameContext(ssl.SSLContext):
    """A client context that checks the server's certificate against one fixed name.

    MQTT clients pass the broker's host to ``wrap_socket``; this replaces it (as SNI and as
    the name checked), the ``ssl`` counterpart of :func:`server_name_option`.
    """

    pinned_server_name: str

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["server_hostname"] = self.pinned_server_name
        return super().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        kwargs["server_hostname"] = self.pinned_server_name
        return super().wrap_bio(*args, **kwargs)


def client_ssl_context(
    identity: IdentityFiles,
    *,
    check_hostname: bool = True,
    server_name: str | None = None,
    leaf_only: bool = False,
) -> ssl.SSLContext:
    """A client context presenting ``identity`` and trusting only its CA bundle.

    With ``server_name`` (a role-pinned name such as :func:`pki.gateway_server_name`), the
    server's certificate must carry that name, whatever host the connection goes to.

    With ``leaf_only``, a device certificate goes out without its issuing CA, for a server
    that holds that CA as its own anchor: the broker's device listener trusts the device
    issuing CA directly, so the intermediate adds nothing to its check, yet OpenSSL 3 parses
    every certificate a client sends and keeps the chain in the session for the life of the
    connection, about 5 kB per idle device on the broker. Python's ``ssl`` cannot set
    ``SSL_MODE_NO_AUTO_CHAIN``, and with only the leaf loaded OpenSSL completes the chain
    from the context's trust store (``SSL_CTX_add_extra_chain_cert(3)``), sending the root
    too; so this context trusts only the CAs that can issue servers
    (:func:`pki.server_ca_certificates`: the device CA issues no gateway certificate), finds
    no issuer for the leaf and sends it alone. A certificate whose issuer is among those CAs
    (a device of a PKI older than the device CA, or any server identity) is presented with
    its chain as without ``leaf_only``.
    """
    identity.require()
    cafile: str | None = str(identity.ca_bundle)
    cadata: str | None = None
    presented = identity.chain
    if leaf_only:
        trusted = server_ca_certificates(identity.ca_bundle.read_bytes())
        issuer = identity.certificate().issuer
        if all(ca.subject != issuer for ca in trusted):
            presented = identity.cert
        cafile = None
        cadata = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in trusted)
    if server_name is None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile, cadata=cadata)
        ctx.check_hostname = check_hostname
    else:
        # What create_default_context(SERVER_AUTH) sets up, on the pinning subclass.
        ctx = _PinnedNameContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.pinned_server_name = server_name
        ctx.load_verify_locations(cafile=cafile, cadata=cadata)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = True
    ctx.load_cert_chain(str(presented), str(identity.key))
    return _harden(ctx)


def server_ssl_context(
    identity: IdentityFiles, *, require_client_cert: bool = True
) -> ssl.SSLContext:
    """A server context presenting ``identity``; clients must present a trusted certificate."""
    identity.require()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(identity.ca_bundle))
    ctx.load_cert_chain(str(identity.chain), str(identity.key))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    return _harden(ctx)
