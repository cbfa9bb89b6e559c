"""Devices have their own issuing CA: layout, issuance by role, one CRL per CA, the OpenSSL
trust anchor that admits the device CA's certificates only, and PKIs made before it."""

from __future__ import annotations

import base64
import datetime as dt
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import pki
from edgeward.cli import main
from tests.conftest import require_tool

NOW = dt.datetime.now(dt.UTC)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _issue(pki_dir: Path, out: Path, role: pki.Role, id: str) -> pki.IdentityFiles:
    server = role is not pki.Role.DEVICE
    return pki.issue_identity(
        pki_dir, out / id, role=role, id=id, dns_names=("localhost",) if server else ()
    )


def test_init_creates_a_device_ca_under_the_root(fresh_pki: Path) -> None:
    layout = pki.PkiLayout(fresh_pki)
    root, issuing, device = (
        _cert(p) for p in (layout.root_cert, layout.issuing_cert, layout.device_cert)
    )
    device.verify_directly_issued_by(root)
    assert stat.S_IMODE(layout.device_key.stat().st_mode) == 0o600
    basic = device.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert (basic.ca, basic.path_length) == (True, 0)
    eku = device.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # nothing under it serves TLS
    bundle = layout.ca_bundle.read_bytes()
    assert x509.load_pem_x509_certificates(bundle) == [root, issuing, device]
    assert pki.device_ca_certificates(bundle) == [device]
    assert pki.server_ca_certificates(bundle) == [root, issuing]  # what verifies a server
    assert device.subject != issuing.subject


def test_devices_are_issued_by_the_device_ca_and_servers_by_the_issuing_ca(
    fresh_pki: Path, tmp_path: Path
) -> None:
    layout = pki.PkiLayout(fresh_pki)
    ca = pki.CertificateAuthority.load(fresh_pki)
    for role, id, ca_path in (
        (pki.Role.DEVICE, "cam-1", layout.device_cert),
        (pki.Role.GATEWAY, "gw-1", layout.issuing_cert),
        (pki.Role.CORE, "core-1", layout.issuing_cert),
    ):
        files = _issue(fresh_pki, tmp_path, role, id)
        issuer = _cert(ca_path)
        files.certificate().verify_directly_issued_by(issuer)
        assert ca.issuer_certificate(role) == issuer
        _leaf, chain_ca = x509.load_pem_x509_certificates(files.chain.read_bytes())
        assert chain_ca == issuer  # peers send leaf + its own issuing CA


def test_trusted_anchor_is_what_openssl_addtrust_writes(fresh_pki: Path, tmp_path: Path) -> None:
    openssl = require_tool("openssl")
    device_cert = pki.PkiLayout(fresh_pki).device_cert
    out = subprocess.run(
        [openssl, "x509", "-in", str(device_cert), "-addtrust", "clientAuth"],
        capture_output=True,
        check=True,
    ).stdout
    ours = pki.trusted_client_anchor_pem(_cert(device_cert))

    def der(pem: bytes) -> bytes:
        body = pem.split(b"-----BEGIN TRUSTED CERTIFICATE-----")[1].split(b"-----END")[0]
        return base64.b64decode(b"".join(body.split()))

    assert der(ours) == der(out)
    assert ours.startswith(b"-----BEGIN TRUSTED CERTIFICATE-----\n")


def _mint_with_issuing_ca(fresh_pki: Path, out: Path, device_id: str) -> Path:
    """The exact device profile, signed with the issuing CA's key (mis-issuance)."""
    layout = pki.PkiLayout(fresh_pki)
    ca_cert = _cert(layout.issuing_cert)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://unit.example/device/{device_id}")]
            ),
            critical=False,
        )
        .sign(pki.load_private_key(layout.issuing_key), hashes.SHA256())
    )
    path = out / f"{device_id}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_openssl_admits_only_device_ca_leaves_with_the_anchor(
    fresh_pki: Path, tmp_path: Path
) -> None:
    """What Mosquitto's device listener does with its cafile (OpenSSL, purpose sslclient)."""
    openssl = require_tool("openssl")
    layout = pki.PkiLayout(fresh_pki)
    anchor = tmp_path / "device-anchor.pem"
    anchor.write_bytes(pki.trusted_client_anchor_pem(_cert(layout.device_cert)))
    device = _issue(fresh_pki, tmp_path, pki.Role.DEVICE, "cam-ok")
    gateway = _issue(fresh_pki, tmp_path, pki.Role.GATEWAY, "gw-no")
    wrong_ca = _mint_with_issuing_ca(fresh_pki, tmp_path, "cam-wrong-ca")
    sent_chain = tmp_path / "issuing-and-root.pem"  # what a client may send: up to the root
    sent_chain.write_bytes(layout.issuing_cert.read_bytes() + layout.root_cert.read_bytes())

    def verify(leaf: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *(openssl, "verify", "-CAfile", str(anchor), "-purpose", "sslclient"),
                *("-untrusted", str(sent_chain), str(leaf)),
            ],
            capture_output=True,
            text=True,
            check=False,
        )

    ok = verify(device.cert)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for leaf in (gateway.cert, wrong_ca):
        refused = verify(leaf)
        assert refused.returncode != 0, refused.stdout


def test_each_ca_signs_the_crl_of_its_own_certificates(fresh_pki: Path, tmp_path: Path) -> None:
    layout = pki.PkiLayout(fresh_pki)
    ca = pki.CertificateAuthority.load(fresh_pki)
    with pki.SqliteRegistry(layout.registry) as reg:
        device = _issue(fresh_pki, tmp_path, pki.Role.DEVICE, "cam-rev")
        dserial = pki.serial_hex(device.certificate().serial_number)
        reg.upsert_device("cam-rev", type="pet-camera", region="home", now=NOW)
        reg.record_certificate(
            pki.CertificateRecord(dserial, "cam-rev", NOW, pki.Status.ACTIVE, NOW)
        )
        gateway = pki.issue_identity(
            fresh_pki, tmp_path / "gw", role=pki.Role.GATEWAY, id="gw-rev", registry=reg
        )
        pki.revoke_serial(reg, dserial, reason="lost", now=NOW)
        pki.revoke_server(reg, pki.Role.GATEWAY, "gw-rev", reason="stolen", now=NOW)
        crls = pki.build_crl(ca, reg, now=NOW)
    dnum, gnum = device.certificate().serial_number, gateway.certificate().serial_number
    assert crls.device.get_revoked_certificate_by_serial_number(dnum) is not None
    assert crls.device.get_revoked_certificate_by_serial_number(gnum) is None
    assert crls.issuing.get_revoked_certificate_by_serial_number(gnum) is not None
    assert crls.issuing.get_revoked_certificate_by_serial_number(dnum) is None
    assert crls.lists(dnum)
    assert crls.lists(gnum)
    assert crls.device.issuer == _cert(layout.device_cert).subject
    assert crls.device.is_signature_valid(_cert(layout.device_cert).public_key())  # type: ignore[arg-type]
    assert crls.issuing.is_signature_valid(_cert(layout.issuing_cert).public_key())  # type: ignore[arg-type]
    number = x509.CRLNumber
    assert (
        crls.device.extensions.get_extension_for_class(number).value.crl_number
        == crls.issuing.extensions.get_extension_for_class(number).value.crl_number
    )
    with pytest.raises(ValueError, match="DER holds one CRL"):
        pki.crl_bytes(crls, der=True)


def _make_old(pki_dir: Path) -> None:
    """What a PKI directory made by an older edgeward looks like: no device CA."""
    layout = pki.PkiLayout(pki_dir)
    shutil.rmtree(layout.device_key.parent)
    layout.ca_bundle.write_bytes(layout.root_cert.read_bytes() + layout.issuing_cert.read_bytes())


def test_an_older_pki_gets_a_clear_error_then_an_explicit_upgrade(fresh_pki: Path) -> None:
    _make_old(fresh_pki)
    with pytest.raises(pki.PkiNotFound, match="add-device-ca"):
        pki.CertificateAuthority.load(fresh_pki)
    runner = CliRunner()
    d = str(fresh_pki)
    result = runner.invoke(
        main,
        [
            *("pki", "token", "--dir", d, "--device-id", "cam-x"),
            *("--type", "pet-camera", "--region", "home"),
        ],
    )
    assert result.exit_code == 1
    assert "add-device-ca" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = runner.invoke(main, ["pki", "add-device-ca", "--dir", d])
    assert result.exit_code == 0, result.stderr
    ca = pki.CertificateAuthority.load(fresh_pki)
    assert pki.device_ca_certificates(ca.bundle_pem) == [ca.device_certificate]
    root = _cert(pki.PkiLayout(fresh_pki).root_cert)
    ca.device_certificate.verify_directly_issued_by(root)
    again = runner.invoke(main, ["pki", "add-device-ca", "--dir", d])
    assert again.exit_code == 1
    assert "already has a device issuing CA" in again.stderr
