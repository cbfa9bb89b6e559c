"""The certificate authority: an offline root, an issuing CA, and the certificate profiles.

Layout of a PKI directory (``edgeward pki init --dir D``)::

    D/root/root.key        offline root key (0600): used by ``edgeward pki`` commands only
    D/root/root.crt
    D/issuing/ca.key       issuing CA key (0600): used by the core to sign certificates and CRLs
    D/issuing/ca.crt
    D/ca-bundle.pem        what every party trusts: the root, then the issuing CA
    D/trust-domain         the trust domain, one line
    D/registry.sqlite3     devices, certificates, tokens, revocations (see ``_registry``)

Profiles (RFC 5280 §4.2.1.3 key usage, §4.2.1.12 extended key usage):

* device: ``digitalSignature``; EKU ``clientAuth`` only, so a device certificate can never
  serve TLS; URI SAN ``spiffe://td/device/<id>``; CN = id; default lifetime 7 days.
* operator: as a device (``clientAuth`` only, no DNS or IP names), URI SAN
  ``spiffe://td/operator/<name>``; it logs in to the console; its viewer or admin role lives
  in the registry.
* gateway, core: ``digitalSignature``; EKU ``serverAuth`` and ``clientAuth``; DNS and IP SANs
  plus the URI SAN; default lifetime 90 days. Each also carries its role-pinned DNS name
  (``core.edgeward.internal``, ``<gateway-id>.gateway.edgeward.internal``; see ``_names``),
  which clients demand; no requested name may fall under ``edgeward.internal``.

Time is always passed in (``now=``), never read inside, so expiry is testable to the second.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki._files import (
    PrivateKey,
    generate_private_key,
    load_private_key,
    write_atomic,
    write_private_key,
)
from pki._names import (
    Identity,
    Role,
    is_reserved_dns_name,
    reserved_dns_names,
    validate_trust_domain,
)
from pki.errors import InvalidName, PkiExists, PkiNotFound

__all__ = [
    "DEFAULT_DEVICE_LIFETIME",
    "DEFAULT_SERVER_LIFETIME",
    "CertificateAuthority",
    "PkiLayout",
    "init_pki",
    "serial_hex",
]

DEFAULT_DEVICE_LIFETIME = dt.timedelta(days=7)
DEFAULT_SERVER_LIFETIME = dt.timedelta(days=90)
_ROOT_LIFETIME = dt.timedelta(days=3650)
_ISSUING_LIFETIME = dt.timedelta(days=1825)
# Tolerate small clock differences between the core and devices (RFC 5280 allows any
# notBefore; backdating a minute avoids "not yet valid" on a device a little behind).
_BACKDATE = dt.timedelta(minutes=1)
# Identities that only ever act as TLS clients: EKU clientAuth, no DNS or IP names.
_CLIENT_ONLY_ROLES = frozenset({Role.DEVICE, Role.OPERATOR})


def serial_hex(serial: int) -> str:
    """The canonical text form of a serial number: lower-case hex, no leading zeros."""
    return format(serial, "x")


@dataclass(frozen=True, slots=True)
class PkiLayout:
    """Where each file of a PKI directory lives."""

    root: Path

    @property
    def root_key(self) -> Path:
        return self.root / "root" / "root.key"

    @property
    def root_cert(self) -> Path:
        return self.root / "root" / "root.crt"

    @property
    def issuing_key(self) -> Path:
        return self.root / "issuing" / "ca.key"

    @property
    def issuing_cert(self) -> Path:
        return self.root / "issuing" / "ca.crt"

    @property
    def ca_bundle(self) -> Path:
        return self.root / "ca-bundle.pem"

    @property
    def trust_domain_file(self) -> Path:
        return self.root / "trust-domain"

    @property
    def registry(self) -> Path:
        return self.root / "registry.sqlite3"

    @property
    def servers(self) -> Path:
        return self.root / "servers"

    def exists(self) -> bool:
        return any(
            p.exists()
            for p in (self.root_key, self.issuing_key, self.ca_bundle, self.trust_domain_file)
        )


def _name(cn: str, trust_domain: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _ca_certificate(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signing_key: PrivateKey,
    issuer_public_key: ec.EllipticCurvePublicKey,
    path_length: int | None,
    now: dt.datetime,
    lifetime: dt.timedelta,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public_key),
            critical=False,
        )
        .sign(signing_key, hashes.SHA256())
    )


def init_pki(directory: Path, *, trust_domain: str, now: dt.datetime | None = None) -> PkiLayout:
    """Create the root and issuing CA in ``directory``; refuse to overwrite an existing PKI."""
    validate_trust_domain(trust_domain)
    layout = PkiLayout(Path(directory))
    if layout.exists():
        raise PkiExists(f"{directory} already holds a PKI; refusing to overwrite it")
    now = now or dt.datetime.now(dt.UTC)
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.root.chmod(0o700)

    root_key = generate_private_key("P-384")
    root_name = _name(f"{trust_domain} root CA", trust_domain)
    root_cert = _ca_certificate(
        subject=root_name,
        issuer=root_name,
        public_key=root_key.public_key(),
        signing_key=root_key,
        issuer_public_key=root_key.public_key(),
        path_length=1,
        now=now,
        lifetime=_ROOT_LIFETIME,
    )
    issuing_key = generate_private_key("P-256")
    issuing_cert = _ca_certificate(
        subject=_name(f"{trust_domain} issuing CA", trust_domain),
        issuer=root_name,
        public_key=issuing_key.public_key(),
        signing_key=root_key,
        issuer_public_key=root_key.public_key(),
        path_length=0,
        now=now,
        lifetime=_ISSUING_LIFETIME,
    )
    write_private_key(layout.root_key, root_key)
    write_atomic(layout.root_cert, root_cert.public_bytes(serialization.Encoding.PEM))
    write_private_key(layout.issuing_key, issuing_key)
    write_atomic(layout.issuing_cert, issuing_cert.public_bytes(serialization.Encoding.PEM))
    write_atomic(
        layout.ca_bundle,
        root_cert.public_bytes(serialization.Encoding.PEM)
        + issuing_cert.public_bytes(serialization.Encoding.PEM),
    )
    write_atomic(layout.trust_domain_file, f"{trust_domain}\n".encode())
    return layout


class CertificateAuthority:
    """The issuing CA as the core uses it: signs leaf certificates, CRLs and the directory."""

    def __init__(
        self,
        *,
        trust_domain: str,
        certificate: x509.Certificate,
        key: PrivateKey,
        bundle_pem: bytes,
    ) -> None:
        self.trust_domain = validate_trust_domain(trust_domain)
        self.certificate = certificate
        self._key = key
        self.bundle_pem = bundle_pem
        # Fixed for the life of this CA, and needed for every certificate it issues: derive
        # them once rather than re-encoding the CA certificate and re-hashing its key per call.
        self._certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
        self._authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(
            key.public_key()
        )

    def __repr__(self) -> str:  # never show the key
        return f"CertificateAuthority(trust_domain={self.trust_domain!r})"

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        layout = PkiLayout(Path(directory))
        for p in (
            layout.issuing_key,
            layout.issuing_cert,
            layout.ca_bundle,
            layout.trust_domain_file,
        ):
            if not p.exists():
                raise PkiNotFound(
                    f"{directory} is not an edgeward PKI (missing {p.name}); "
                    "run 'edgeward pki init'"
                )
        return cls(
            trust_domain=layout.trust_domain_file.read_text().strip(),
            certificate=x509.load_pem_x509_certificate(layout.issuing_cert.read_bytes()),
            key=load_private_key(layout.issuing_key),
            bundle_pem=layout.ca_bundle.read_bytes(),
        )

    @property
    def certificate_pem(self) -> bytes:
        return self._certificate_pem

    def chain_pem(self, leaf: x509.Certificate) -> bytes:
        """Leaf then issuing CA, as TLS peers send it."""
        return leaf.public_bytes(serialization.Encoding.PEM) + self.certificate_pem

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        *,
        identity: Identity,
        now: dt.datetime,
        lifetime: dt.timedelta | None = None,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
    ) -> x509.Certificate:
        """A leaf certificate for ``identity`` with the profile of its role.

        Gateway and core certificates get their role-pinned name added; a requested DNS name
        under ``edgeward.internal`` (any case, wildcards too) raises :class:`InvalidName`, so
        that no identity can obtain another's pinned name.
        """
        if identity.trust_domain != self.trust_domain:
            raise ValueError("identity belongs to another trust domain")
        if lifetime is None:
            lifetime = (
                DEFAULT_DEVICE_LIFETIME
                if identity.role in _CLIENT_ONLY_ROLES
                else DEFAULT_SERVER_LIFETIME
            )
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.spiffe_id)]
        if identity.role in _CLIENT_ONLY_ROLES:
            if dns_names or ip_addresses:
                raise ValueError(f"{identity.role.value} certificates carry no DNS or IP names")
            eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
        else:
            for d in dns_names:
                if is_reserved_dns_name(d):
                    raise InvalidName(
                        "DNS name",
                        f"{d!r} is reserved: names under edgeward.internal are assigned by "
                        "the CA from the certificate's role and id",
                    )
            sans += [x509.DNSName(d) for d in reserved_dns_names(identity)]
            sans += [x509.DNSName(d) for d in dns_names]
            sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
            eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        not_after = min(now + lifetime, self.certificate.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(_name(identity.id, self.trust_domain))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            # RFC 5280 §4.2.1.6: the subject is in the SAN; it is critical only when the
            # subject is empty, which ours never is.
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._authority_key_id, critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def build_crl(
        self,
        revoked: Iterable[tuple[int, dt.datetime]],
        *,
        now: dt.datetime,
        next_update: dt.timedelta = dt.timedelta(hours=1),
        crl_number: int = 1,
    ) -> x509.CertificateRevocationList:
        """A CRL of ``(serial, revoked_at)`` pairs, signed by the issuing CA."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - _BACKDATE)
            .next_update(now + next_update)
            .add_extension(x509.CRLNumber(crl_number), critical=False)
            .add_extension(self._authority_key_id, critical=False)
        )
        for serial, at in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(at).build()
            )
        return builder.sign(self._key, hashes.SHA256())

    def sign(self, data: bytes) -> bytes:
        """ECDSA-SHA256 signature over ``data`` (the signed gateway directory)."""
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))
