"""The certificate authority: an offline root, two issuing CAs, and the certificate profiles.

Layout of a PKI directory (``edgeward pki init --dir D``)::

    D/root/root.key        offline root key (0600): used by ``edgeward pki`` commands only
    D/root/root.crt
    D/issuing/ca.key       issuing CA key (0600): gateway and core certificates, their CRL, and
    D/issuing/ca.crt       the signed gateway directory
    D/device-issuing/ca.key  device issuing CA key (0600): device certificates and their CRL
    D/device-issuing/ca.crt
    D/ca-bundle.pem        what every party trusts: the root, the issuing CA, the device CA
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

Why devices have their own issuing CA: a device listener (gRPC or MQTT) must admit device
certificates only. Mosquitto cannot look at SANs or key usages, but OpenSSL can be told to trust
one CA certificate *as an anchor for client authentication* (a ``TRUSTED CERTIFICATE`` with
explicit ``clientAuth`` trust, :func:`trusted_client_anchor_pem`). With only the device CA so
trusted, a certificate of the other issuing CA (a gateway's, a core's, or anything mis-issued
there) has no path to an anchor and fails the TLS handshake. The device CA itself carries the
EKU ``clientAuth`` only (RFC 5280 §4.2.1.12 read as a constraint on the subtree, as OpenSSL and
most verifiers do), so nothing under it can serve TLS; it issues the device profile only, from
CSRs checked against an enrolment token (``_enrollment``).

Time is always passed in (``now=``), never read inside, so expiry is testable to the second.
"""

from __future__ import annotations

import base64
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
    "add_device_ca",
    "device_ca_certificates",
    "init_pki",
    "serial_hex",
    "server_ca_certificates",
    "trusted_client_anchor_pem",
]

DEFAULT_DEVICE_LIFETIME = dt.timedelta(days=7)
DEFAULT_SERVER_LIFETIME = dt.timedelta(days=90)
_ROOT_LIFETIME = dt.timedelta(days=3650)
_ISSUING_LIFETIME = dt.timedelta(days=1825)
# X509_CERT_AUX (OpenSSL's "TRUSTED CERTIFICATE" trailer) with one trust OID, id-kp-clientAuth
# (1.3.6.1.5.5.7.3.2): SEQUENCE { trust SEQUENCE { OID } }; what 'openssl x509 -addtrust
# clientAuth' writes after the certificate.
_CLIENT_AUTH_TRUST_AUX = bytes.fromhex("300c300a06082b06010505070302")
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
    def device_key(self) -> Path:
        return self.root / "device-issuing" / "ca.key"

    @property
    def device_cert(self) -> Path:
        return self.root / "device-issuing" / "ca.crt"

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
            for p in (
                self.root_key,
                self.issuing_key,
                self.device_key,
                self.ca_bundle,
                self.trust_domain_file,
            )
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
    client_auth_only: bool = False,
) -> x509.Certificate:
    builder = (
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
    )
    if client_auth_only:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(signing_key, hashes.SHA256())


def _device_ca(
    *,
    trust_domain: str,
    root_cert: x509.Certificate,
    root_key: PrivateKey,
    now: dt.datetime,
) -> tuple[x509.Certificate, PrivateKey]:
    key = generate_private_key("P-256")
    cert = _ca_certificate(
        subject=_name(f"{trust_domain} device issuing CA", trust_domain),
        issuer=root_cert.subject,
        public_key=key.public_key(),
        signing_key=root_key,
        issuer_public_key=root_key.public_key(),
        path_length=0,
        now=now,
        lifetime=_ISSUING_LIFETIME,
        client_auth_only=True,
    )
    return cert, key


def _is_device_ca(cert: x509.Certificate) -> bool:
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return basic.ca and list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def device_ca_certificates(bundle_pem: bytes) -> list[x509.Certificate]:
    """The device issuing CAs of a CA bundle: CA certificates whose EKU is ``clientAuth`` only.

    Empty for a bundle of a PKI created before devices had their own issuing CA.
    """
    return [c for c in x509.load_pem_x509_certificates(bundle_pem) if _is_device_ca(c)]


def server_ca_certificates(bundle_pem: bytes) -> list[x509.Certificate]:
    """The CAs of a CA bundle that a client needs to verify a gateway or a core: all but the
    device issuing CAs, whose certificates carry ``clientAuth`` alone and name no server."""
    return [c for c in x509.load_pem_x509_certificates(bundle_pem) if not _is_device_ca(c)]


def trusted_client_anchor_pem(certificate: x509.Certificate) -> bytes:
    """``certificate`` as an OpenSSL ``TRUSTED CERTIFICATE`` trusted for ``clientAuth`` only.

    OpenSSL accepts such a certificate as a trust anchor for client chains even though it is
    not self-signed, and builds no path past it; the same bytes ``openssl x509 -addtrust
    clientAuth`` writes.
    """
    der = certificate.public_bytes(serialization.Encoding.DER) + _CLIENT_AUTH_TRUST_AUX
    b64 = base64.encodebytes(der).replace(b"\n", b"")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return (
        b"-----BEGIN TRUSTED CERTIFICATE-----\n"
        + b"\n".join(lines)
        + b"\n-----END TRUSTED CERTIFICATE-----\n"
    )


def init_pki(directory: Path, *, trust_domain: str, now: dt.datetime | None = None) -> PkiLayout:
    """Create the root, the issuing CA and the device issuing CA in ``directory``.

    Refuses to overwrite an existing PKI.
    """
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
    device_cert, device_key = _device_ca(
        trust_domain=trust_domain, root_cert=root_cert, root_key=root_key, now=now
    )
    write_private_key(layout.root_key, root_key)
    write_atomic(layout.root_cert, root_cert.public_bytes(serialization.Encoding.PEM))
    write_private_key(layout.issuing_key, issuing_key)
    write_atomic(layout.issuing_cert, issuing_cert.public_bytes(serialization.Encoding.PEM))
    write_private_key(layout.device_key, device_key)
    write_atomic(layout.device_cert, device_cert.public_bytes(serialization.Encoding.PEM))
    _write_bundle(layout, root_cert, issuing_cert, device_cert)
    write_atomic(layout.trust_domain_file, f"{trust_domain}\n".encode())
    return layout


def _write_bundle(layout: PkiLayout, *certs: x509.Certificate) -> None:
    write_atomic(
        layout.ca_bundle, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    )


def add_device_ca(directory: Path, *, now: dt.datetime | None = None) -> PkiLayout:
    """Give a PKI created before device issuing CAs existed its device CA (needs the root key).

    Rewrites ``ca-bundle.pem`` (root, issuing CA, device CA). Devices enrolled before hold
    certificates of the issuing CA, which device listeners no longer admit: they enrol again.
    Gateways need the new bundle in their identity directory.
    """
    layout = PkiLayout(Path(directory))
    if layout.device_key.exists() or layout.device_cert.exists():
        raise PkiExists(f"{directory} already has a device issuing CA")
    for p in (layout.root_key, layout.root_cert, layout.issuing_cert, layout.trust_domain_file):
        if not p.exists():
            raise PkiNotFound(f"{directory} lacks {p.name}; the root key is needed here")
    now = now or dt.datetime.now(dt.UTC)
    trust_domain = validate_trust_domain(layout.trust_domain_file.read_text().strip())
    root_cert = x509.load_pem_x509_certificate(layout.root_cert.read_bytes())
    issuing_cert = x509.load_pem_x509_certificate(layout.issuing_cert.read_bytes())
    device_cert, device_key = _device_ca(
        trust_domain=trust_domain,
        root_cert=root_cert,
        root_key=load_private_key(layout.root_key),
        now=now,
    )
    write_private_key(layout.device_key, device_key)
    write_atomic(layout.device_cert, device_cert.public_bytes(serialization.Encoding.PEM))
    _write_bundle(layout, root_cert, issuing_cert, device_cert)
    return layout


class CertificateAuthority:
    """The issuing CAs as the core uses them: sign leaf certificates, CRLs and the directory.

    ``certificate``/``key``: the issuing CA (gateways, cores, the signed directory);
    ``device_certificate``/``device_key``: the device issuing CA. :meth:`issue` picks the CA
    from the identity's role.
    """

    def __init__(
        self,
        *,
        trust_domain: str,
        certificate: x509.Certificate,
        key: PrivateKey,
        device_certificate: x509.Certificate,
        device_key: PrivateKey,
        bundle_pem: bytes,
    ) -> None:
        self.trust_domain = validate_trust_domain(trust_domain)
        self.certificate = certificate
        self._key = key
        self.device_certificate = device_certificate
        self._device_key = device_key
        self.bundle_pem = bundle_pem
        # Fixed for the life of this CA, and needed for every certificate it issues: derive
        # them once rather than re-encoding the CA certificate and re-hashing its key per call.
        self._certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
        self._device_certificate_pem = device_certificate.public_bytes(serialization.Encoding.PEM)
        self._authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(
            key.public_key()
        )
        self._device_authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(
            device_key.public_key()
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
        if not (layout.device_key.exists() and layout.device_cert.exists()):
            # Never fall back to signing devices with the issuing CA: device listeners would
            # then have to trust it, and with it every gateway and core certificate.
            raise PkiNotFound(
                f"{directory} has no device issuing CA (created by an older edgeward); run "
                f"'edgeward pki add-device-ca --dir {directory}' where the root key is"
            )
        return cls(
            trust_domain=layout.trust_domain_file.read_text().strip(),
            certificate=x509.load_pem_x509_certificate(layout.issuing_cert.read_bytes()),
            key=load_private_key(layout.issuing_key),
            device_certificate=x509.load_pem_x509_certificate(layout.device_cert.read_bytes()),
            device_key=load_private_key(layout.device_key),
            bundle_pem=layout.ca_bundle.read_bytes(),
        )

    @property
    def certificate_pem(self) -> bytes:
        return self._certificate_pem

    @property
    def device_certificate_pem(self) -> bytes:
        return self._device_certificate_pem

    def issuer_certificate(self, role: Role) -> x509.Certificate:
        """The CA that signs certificates of ``role``: the device CA for devices."""
        return self.device_certificate if role is Role.DEVICE else self.certificate

    def chain_pem(self, leaf: x509.Certificate) -> bytes:
        """Leaf then the CA that issued it, as TLS peers send it."""
        ca_pem = (
            self._device_certificate_pem
            if leaf.issuer == self.device_certificate.subject
            else self._certificate_pem
        )
        return leaf.public_bytes(serialization.Encoding.PEM) + ca_pem

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
        device = identity.role is Role.DEVICE
        issuer = self.device_certificate if device else self.certificate
        not_after = min(now + lifetime, issuer.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(_name(identity.id, self.trust_domain))
            .issuer_name(issuer.subject)
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
            .add_extension(
                self._device_authority_key_id if device else self._authority_key_id,
                critical=False,
            )
            .sign(self._device_key if device else self._key, hashes.SHA256())
        )

    def build_crl(
        self,
        revoked: Iterable[tuple[int, dt.datetime]],
        *,
        now: dt.datetime,
        next_update: dt.timedelta = dt.timedelta(hours=1),
        crl_number: int = 1,
        devices: bool = False,
    ) -> x509.CertificateRevocationList:
        """A CRL of ``(serial, revoked_at)`` pairs, signed by the issuing CA, or by the device
        CA when ``devices`` (each CA's CRL lists the certificates that CA issued)."""
        issuer = self.device_certificate if devices else self.certificate
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.subject)
            .last_update(now - _BACKDATE)
            .next_update(now + next_update)
            .add_extension(x509.CRLNumber(crl_number), critical=False)
            .add_extension(
                self._device_authority_key_id if devices else self._authority_key_id,
                critical=False,
            )
        )
        for serial, at in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(at).build()
            )
        return builder.sign(self._device_key if devices else self._key, hashes.SHA256())

    def sign(self, data: bytes) -> bytes:
        """ECDSA-SHA256 signature over ``data`` (the signed gateway directory)."""
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))
