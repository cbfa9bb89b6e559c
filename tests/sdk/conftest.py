"""SDK test helpers: signed gateway directories and device identities with one."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import pki
from device_sdk import GatewayInfo
from protos.edgeward.v1 import common_pb2


def signed_directory(
    pki_dir: Path, gateways: Sequence[GatewayInfo], *, trust_domain: str | None = None
) -> bytes:
    """A ``SignedGatewayDirectory`` as the core makes it, signed by ``pki_dir``'s issuing CA."""
    ca = pki.CertificateAuthority.load(pki_dir)
    payload = common_pb2.GatewayDirectoryPayload(
        trust_domain=trust_domain or ca.trust_domain,
        version=1,
        gateways=[g.to_proto() for g in gateways],
    )
    payload.issued_at.FromDatetime(dt.datetime.now(dt.UTC))
    signed = pki.sign_payload(ca, payload.SerializeToString())
    return common_pb2.SignedGatewayDirectory(
        payload=signed.payload,
        signature=signed.signature,
        signer_certificate_pem=signed.signer_certificate_pem.decode(),
    ).SerializeToString()


def give_directory(
    identity: pki.IdentityFiles, pki_dir: Path, gateways: Sequence[GatewayInfo]
) -> pki.IdentityFiles:
    """Store a signed directory in an identity directory, as enrolment does."""
    pki.write_atomic(identity.gateway_directory, signed_directory(pki_dir, gateways))
    return identity
