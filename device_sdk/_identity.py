"""The device's identity directory and its signed gateway directory, loaded and checked.

``edgeward enroll`` writes the directory (see :class:`pki.IdentityFiles`); this module reads it
back, checks that it is a device identity whose key matches its certificate, and verifies the
gateway directory's signature against the trust domain's CA bundle before any address in it
is used: an attacker who can write ``directory.pb`` must not be able to point the device at
a gateway of their choosing.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import DecodeError

import pki
from device_sdk._types import GatewayDirectory, GatewayInfo
from device_sdk.errors import InvalidDirectory, NotEnrolled
from protos.edgeward.v1 import common_pb2

__all__ = ["DeviceIdentity", "load_gateway_directory", "parse_gateway_directory"]


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """A loaded device identity: who the device is and how long its certificate lasts."""

    files: pki.IdentityFiles
    device_id: str
    trust_domain: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    region: str = ""
    device_type: str = ""
    core_address: str = ""

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/device/{self.device_id}"

    @classmethod
    def load(cls, directory: Path) -> DeviceIdentity:
        """Read and check the identity in ``directory``; :class:`NotEnrolled` if there is none.

        The checks are local (files present, a device certificate of its trust domain, the key
        matches): they turn a half-written or copied directory into a clear error at start-up
        instead of a TLS failure at the first call.
        """
        files = pki.IdentityFiles(Path(directory))
        if not files.directory.is_dir():
            raise NotEnrolled(str(directory), "the directory does not exist")
        missing = [
            p.name for p in (files.key, files.cert, files.chain, files.ca_bundle) if not p.exists()
        ]
        if missing:
            raise NotEnrolled(str(directory), "missing " + ", ".join(missing))
        try:
            cert = files.certificate()
            trust_domain = files.trust_domain
            ident = pki.identity_from_certificate(
                cert, trust_domain=trust_domain, role=pki.Role.DEVICE
            )
            key = pki.load_private_key(files.key)
        except (ValueError, TypeError, pki.PkiError, StopIteration) as exc:
            raise NotEnrolled(str(directory), f"unusable identity: {exc}") from exc
        if key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise NotEnrolled(str(directory), "key.pem does not belong to cert.pem")
        meta = files.read_metadata()

        def text(*keys: str) -> str:
            for k in keys:
                v = meta.get(k)
                if isinstance(v, str) and v:
                    return v
            return ""

        return cls(
            files=files,
            device_id=ident.id,
            trust_domain=trust_domain,
            serial=pki.serial_hex(cert.serial_number),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            region=text("region"),
            device_type=text("device_type", "type"),
            core_address=text("core_address", "endpoint", "core_endpoint"),
        )


def parse_gateway_directory(
    data: bytes, *, ca_bundle_pem: bytes, trust_domain: str, now: dt.datetime
) -> GatewayDirectory:
    """Verify a serialised ``SignedGatewayDirectory`` and return its gateways.

    Raises :class:`InvalidDirectory` when it cannot be parsed, is not signed by a CA of the
    bundle, or belongs to another trust domain.
    """
    try:
        signed = common_pb2.SignedGatewayDirectory.FromString(data)
    except DecodeError as exc:
        raise InvalidDirectory("the gateway directory cannot be parsed") from exc
    try:
        pki.verify_signed_payload(
            signed.payload,
            signed.signature,
            signed.signer_certificate_pem.encode(),
            ca_bundle_pem=ca_bundle_pem,
            now=now,
        )
    except pki.SignatureInvalid as exc:
        raise InvalidDirectory(f"the gateway directory does not verify: {exc}") from exc
    try:
        payload = common_pb2.GatewayDirectoryPayload.FromString(signed.payload)
    except DecodeError as exc:
        raise InvalidDirectory("the signed gateway directory payload cannot be parsed") from exc
    if payload.trust_domain != trust_domain:
        raise InvalidDirectory(
            f"the gateway directory is for trust domain {payload.trust_domain!r}, "
            f"not {trust_domain!r}"
        )
    issued = payload.issued_at.ToDatetime(tzinfo=dt.UTC) if payload.HasField("issued_at") else None
    return GatewayDirectory(
        trust_domain=payload.trust_domain,
        version=payload.version,
        issued_at=issued,
        gateways=tuple(GatewayInfo.from_proto(g) for g in payload.gateways),
    )


def load_gateway_directory(identity: DeviceIdentity, *, now: dt.datetime) -> GatewayDirectory:
    """The verified directory stored next to the identity (``directory.pb``)."""
    path = identity.files.gateway_directory
    if not path.exists():
        raise InvalidDirectory(
            f"{path} is missing: enrolment stores the gateway directory there; pass "
            "gateways explicitly or renew to fetch it"
        )
    return parse_gateway_directory(
        path.read_bytes(),
        ca_bundle_pem=identity.files.ca_bundle.read_bytes(),
        trust_domain=identity.trust_domain,
        now=now,
    )


def certificate_validity(cert_pem: bytes) -> tuple[dt.datetime, dt.datetime]:
    """``(not_before, not_after)`` of a PEM certificate (the first of a chain)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.not_valid_before_utc, cert.not_valid_after_utc
