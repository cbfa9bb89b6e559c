"""An identity directory: what a device, gateway or core holds to prove who it is.

Layout (written by ``edgeward enroll`` and ``edgeward pki issue-server``)::

    DIR/key.pem            private key, 0600, generated in place and never sent anywhere
    DIR/cert.pem           the leaf certificate
    DIR/chain.pem          leaf then issuing CA, as presented in TLS
    DIR/ca-bundle.pem      the trust domain's CAs, to verify peers
    DIR/identity.json      id, role, trust domain, region, type, serial, not-after (no secret)
    DIR/directory.pb       the signed gateway directory (devices only, optional)
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pki._ca import CertificateAuthority, PkiLayout, serial_hex
from pki._files import generate_private_key, write_atomic, write_private_key
from pki._names import Identity, Role, identity_from_certificate
from pki._registry import OperatorRegistry, Registry, ServerCertificateRecord, Status
from pki.errors import PkiNotFound, RegistryError

__all__ = ["IdentityFiles", "issue_identity", "write_identity"]

_audit = structlog.get_logger("pki.audit")


@dataclass(frozen=True, slots=True)
class IdentityFiles:
    """Paths of an identity directory, and readers for what it holds."""

    directory: Path

    @property
    def key(self) -> Path:
        return self.directory / "key.pem"

    @property
    def cert(self) -> Path:
        return self.directory / "cert.pem"

    @property
    def chain(self) -> Path:
        return self.directory / "chain.pem"

    @property
    def ca_bundle(self) -> Path:
        return self.directory / "ca-bundle.pem"

    @property
    def metadata(self) -> Path:
        return self.directory / "identity.json"

    @property
    def gateway_directory(self) -> Path:
        return self.directory / "directory.pb"

    def exists(self) -> bool:
        return all(p.exists() for p in (self.key, self.cert, self.chain, self.ca_bundle))

    def require(self) -> IdentityFiles:
        if not self.exists():
            raise PkiNotFound(
                f"{self.directory} holds no complete identity (key, cert, chain, CA bundle)"
            )
        return self

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert.read_bytes())

    def identity(self, trust_domain: str) -> Identity:
        return identity_from_certificate(self.certificate(), trust_domain=trust_domain)

    def read_metadata(self) -> dict[str, object]:
        if not self.metadata.exists():
            return {}
        data = json.loads(self.metadata.read_text())
        return data if isinstance(data, dict) else {}

    @property
    def trust_domain(self) -> str:
        td = self.read_metadata().get("trust_domain")
        if isinstance(td, str):
            return td
        uri = self.certificate().extensions.get_extension_for_class(x509.SubjectAlternativeName)
        spiffe = next(u for u in uri.value.get_values_for_type(x509.UniformResourceIdentifier))
        return spiffe.removeprefix("spiffe://").split("/")[0]


def write_identity(
    directory: Path,
    *,
    certificate: x509.Certificate,
    chain_pem: bytes,
    ca_bundle_pem: bytes,
    metadata: dict[str, object],
    key_pem: bytes | None = None,
) -> IdentityFiles:
    """Write certificate, chain, bundle and metadata; the key too when given (0600).

    Each file is replaced atomically. The key is written first, so a crash between files
    leaves the old certificate with the old key or the new key waiting for its certificate,
    never a certificate whose key is missing.
    """
    files = IdentityFiles(Path(directory))
    _private_directory(files.directory)
    if key_pem is not None:
        write_atomic(files.key, key_pem, mode=0o600)
    write_atomic(files.cert, certificate.public_bytes(serialization.Encoding.PEM))
    write_atomic(files.chain, chain_pem)
    write_atomic(files.ca_bundle, ca_bundle_pem)
    meta = dict(metadata)
    meta.update(
        serial=serial_hex(certificate.serial_number),
        not_before=certificate.not_valid_before_utc.isoformat(),
        not_after=certificate.not_valid_after_utc.isoformat(),
    )
    write_atomic(files.metadata, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return files


def _private_directory(directory: Path) -> None:
    """Create ``directory`` (0700) or tighten it to 0700, before any key goes into it."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)  # mkdir's mode is masked by the umask, and exist_ok keeps old modes


def _record_operator_certificate(
    registry: object, cert: x509.Certificate, *, id: str, now: dt.datetime
) -> None:
    if not isinstance(registry, OperatorRegistry):
        raise TypeError("operator certificates are recorded in a registry that keeps operators")
    serial = serial_hex(cert.serial_number)
    try:
        registry.record_operator_certificate(
            serial, operator_id=id, not_after=cert.not_valid_after_utc, now=now
        )
    except RegistryError as exc:
        _audit.warning("operator_certificate.refused", audit=True, operator=id, reason=str(exc))
        raise
    _audit.info(
        "operator_certificate.issued",
        audit=True,
        operator=id,
        serial=serial,
        not_after=cert.not_valid_after_utc.isoformat(),
    )


def issue_identity(
    pki_dir: Path,
    out_dir: Path,
    *,
    role: Role,
    id: str,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    lifetime: dt.timedelta | None = None,
    now: dt.datetime | None = None,
    metadata: dict[str, object] | None = None,
    registry: Registry | None = None,
) -> IdentityFiles:
    """Generate a key in ``out_dir`` (0700; the key 0600) and have the PKI's issuing CA
    certify it.

    Used for gateway and core identities (``edgeward pki issue-server``, the core's own) and by
    tests. Devices enrol with a token instead, so that their key never leaves them. With
    ``registry``, a gateway or core certificate is recorded there *before* any file is
    written, so every certificate in use can be revoked (``edgeward pki revoke --serial``);
    an operator's is recorded for its operator (which must be registered), so that
    revoking the operator revokes it and the CRL lists it.
    """
    if registry is not None and role is Role.DEVICE:
        raise ValueError("device certificates are recorded by enrolment; pass no registry")
    ca = CertificateAuthority.load(pki_dir)
    now = now or dt.datetime.now(dt.UTC)
    identity = Identity(ca.trust_domain, role, id)
    key = generate_private_key()
    cert = ca.issue(
        key.public_key(),
        identity=identity,
        now=now,
        lifetime=lifetime,
        dns_names=dns_names,
        ip_addresses=ip_addresses,
    )
    if registry is not None and role is Role.OPERATOR:
        _record_operator_certificate(registry, cert, id=id, now=now)
    elif registry is not None:
        serial = serial_hex(cert.serial_number)
        try:
            registry.record_server_certificate(
                ServerCertificateRecord(
                    serial, role, id, cert.not_valid_after_utc, Status.ACTIVE, now
                )
            )
        except RegistryError as exc:  # an id another role holds, among others
            _audit.warning(
                "server_certificate.refused", audit=True, role=role.value, id=id, reason=str(exc)
            )
            raise
        _audit.info(
            "server_certificate.issued",
            audit=True,
            role=role.value,
            id=id,
            serial=serial,
            not_after=cert.not_valid_after_utc.isoformat(),
        )
    out = IdentityFiles(Path(out_dir))
    _private_directory(out.directory)
    write_private_key(out.key, key)
    meta: dict[str, object] = {"id": id, "role": role.value, "trust_domain": ca.trust_domain}
    meta.update(metadata or {})
    return write_identity(
        out.directory,
        certificate=cert,
        chain_pem=ca.chain_pem(cert),
        ca_bundle_pem=PkiLayout(Path(pki_dir)).ca_bundle.read_bytes(),
        metadata=meta,
    )
