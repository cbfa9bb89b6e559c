"""The identity plane without a network: tokens, registry, CSR checks, enrolment decisions,
renewal thresholds, revocation, CRL and the signed directory."""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import stat
import subprocess
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

import pki
from tests.conftest import require_tool
from tests.pki.conftest import NOW, make_csr, stored_bytes, tamper_signature

BAD_IDS = ["cam+1", "cam#1", "cam/1", "cam\x001", "Cam-1", "ab", "-cam", "cam 1", "", "a" * 64]


def authority(pki_dir: Path, registry: pki.SqliteRegistry, **kw: object) -> pki.EnrollmentAuthority:
    return pki.EnrollmentAuthority(
        ca=pki.CertificateAuthority.load(pki_dir),
        registry=registry,
        **kw,  # type: ignore[arg-type]
    )


def token_for(registry: pki.SqliteRegistry, device_id: str, ttl_s: int = 3600) -> str:
    return pki.create_token(
        registry,
        device_id=device_id,
        device_type="pet-camera",
        region="home",
        ttl=dt.timedelta(seconds=ttl_s),
        now=NOW,
    )


def token_now(registry: pki.SqliteRegistry, device_id: str) -> str:
    return pki.create_token(
        registry,
        device_id=device_id,
        device_type="pet-camera",
        region="home",
        ttl=dt.timedelta(hours=1),
        now=dt.datetime.now(dt.UTC),
    )


# -- names and tokens ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_IDS)
def test_ids_outside_the_pattern_are_refused_everywhere(
    bad: str, registry: pki.SqliteRegistry
) -> None:
    with pytest.raises(pki.InvalidName):
        pki.validate_id(bad)
    with pytest.raises(pki.InvalidName):
        pki.generate_token(bad)
    with pytest.raises(pki.TokenRejected):
        pki.token_device_id(f"{bad}.secret")
    with pytest.raises(pki.InvalidName):
        pki.create_token(
            registry,
            device_id=bad,
            device_type="pet-camera",
            region="home",
            ttl=dt.timedelta(hours=1),
            now=NOW,
        )
    with pytest.raises(pki.InvalidName):
        registry.upsert_device("cam-ok1", type="pet-camera", region=bad or "x", now=NOW)


def test_ttl_parsing() -> None:
    assert pki.parse_ttl("24h") == dt.timedelta(hours=24)
    assert pki.parse_ttl("15m") == dt.timedelta(minutes=15)
    assert pki.parse_ttl("7d") == dt.timedelta(days=7)
    for bad in ("0h", "24", "1y", "-1h", "31d", "h"):
        with pytest.raises(ValueError, match="invalid lifetime"):
            pki.parse_ttl(bad)


def test_registry_stores_only_the_token_hash(registry: pki.Registry) -> None:
    token = token_for(registry, "cam-hash")
    secret = token.split(".", 1)[1]
    raw = stored_bytes(registry)
    assert secret.encode() not in raw
    assert token.encode() not in raw
    assert pki.hash_token(token).encode() in raw


def test_token_is_single_use_under_concurrent_attempts(
    registry_url: str, registry: pki.Registry
) -> None:
    token = token_for(registry, "cam-race")

    def attempt(_: int) -> str:
        # One connection per attempt: as separate processes (or core replicas) would race.
        with contextlib.closing(pki.open_registry(registry_url)) as reg:
            try:
                reg.consume_token(pki.hash_token(token), now=NOW)
            except pki.TokenRejected as exc:
                return exc.reason
            return "won"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(16)))
    assert results.count("won") == 1
    assert set(results) == {"won", "token already used"}


def test_expired_token_one_second_either_side(pki_dir: Path, registry: pki.SqliteRegistry) -> None:
    auth = authority(pki_dir, registry)
    token = token_for(registry, "cam-ttl", ttl_s=60)
    expiry = NOW + dt.timedelta(seconds=60)
    with pytest.raises(pki.TokenRejected) as info:
        auth.enroll(token, make_csr("cam-ttl"), peer="p", now=expiry + dt.timedelta(seconds=1))
    assert info.value.reason == "token expired"
    issued = auth.enroll(token, make_csr("cam-ttl"), peer="p", now=expiry - dt.timedelta(seconds=1))
    assert issued.identity.id == "cam-ttl"
    with pytest.raises(pki.TokenRejected, match="unknown, used, expired") as info:
        auth.enroll(token, make_csr("cam-ttl"), peer="p", now=NOW)
    assert info.value.reason == "token already used"


def test_unknown_and_malformed_tokens(pki_dir: Path, registry: pki.SqliteRegistry) -> None:
    auth = authority(pki_dir, registry)
    for token in ("cam-none.AAAA", "no-dot", "x" * 500, "cam+1.AAAA"):
        with pytest.raises(pki.TokenRejected):
            auth.enroll(token, make_csr("cam-none"), peer="p", now=NOW)


# -- CSR checks ------------------------------------------------------------------------------


IDENT = pki.Identity("test.example", pki.Role.DEVICE, "cam-csr")


def test_valid_csr_pem_and_der_with_or_without_the_spiffe_san() -> None:
    for csr in (
        make_csr("cam-csr"),
        make_csr("cam-csr", der=True),
        make_csr("cam-csr", sans=[x509.UniformResourceIdentifier(IDENT.spiffe_id)]),
        make_csr("cam-csr", key=ec.generate_private_key(ec.SECP384R1())),
    ):
        assert isinstance(pki.validate_csr(csr, identity=IDENT), ec.EllipticCurvePublicKey)


@pytest.mark.parametrize(
    ("csr", "reason"),
    [
        (lambda: make_csr("cam-other"), "CN is not the device id"),
        (lambda: tamper_signature(make_csr("cam-csr")), "proof of possession"),
        (lambda: make_csr("cam-csr", key=rsa.generate_private_key(65537, 1024)), "RSA-1024"),  # noqa: S505
        (lambda: make_csr("cam-csr", key=ed25519.Ed25519PrivateKey.generate()), "Ed25519"),
        (lambda: make_csr("cam-csr", key=ec.generate_private_key(ec.SECP521R1())), "secp521r1"),
        (lambda: b"\x00garbage\xff" * 10, "not a PKCS#10"),
        (lambda: b"", "no certificate signing request"),
        (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "not a PKCS#10"),
        (lambda: b"0" * (pki.MAX_CSR_BYTES + 1), "larger than"),
        (
            lambda: make_csr("cam-csr", sans=[x509.DNSName("*.example")]),
            "subjectAltName must be exactly",
        ),
        (
            lambda: make_csr(
                "cam-csr",
                sans=[
                    x509.UniformResourceIdentifier(IDENT.spiffe_id),
                    x509.UniformResourceIdentifier("spiffe://test.example/device/cam-other"),
                ],
            ),
            "subjectAltName must be exactly",
        ),
        (
            lambda: make_csr(
                "cam-csr",
                sans=[x509.UniformResourceIdentifier("spiffe://test.example/gateway/cam-csr")],
            ),
            "subjectAltName must be exactly",
        ),
    ],
)
def test_bad_csrs_are_refused_with_a_reason(csr: object, reason: str) -> None:
    with pytest.raises(pki.InvalidCsr, match=reason):
        pki.validate_csr(csr(), identity=IDENT)  # type: ignore[operator]


def test_bad_csr_does_not_spend_the_token(pki_dir: Path, registry: pki.SqliteRegistry) -> None:
    auth = authority(pki_dir, registry)
    token = token_for(registry, "cam-retry")
    with pytest.raises(pki.InvalidCsr):
        auth.enroll(token, make_csr("cam-other"), peer="p", now=NOW)
    assert auth.enroll(token, make_csr("cam-retry"), peer="p", now=NOW).identity.id == "cam-retry"


# -- rate limiting -------------------------------------------------------------------------


def test_failed_token_attempts_are_rate_limited_per_peer(
    pki_dir: Path, registry: pki.SqliteRegistry
) -> None:
    t = [0.0]
    auth = authority(
        pki_dir, registry, limiter=pki.FailureLimiter(burst=3, per_minute=6, clock=lambda: t[0])
    )
    for _ in range(3):
        with pytest.raises(pki.TokenRejected):
            auth.enroll("cam-rl.wrong", make_csr("cam-rl"), peer="10.0.0.9", now=NOW)
    with pytest.raises(pki.RateLimited) as info:
        auth.enroll("cam-rl.wrong", make_csr("cam-rl"), peer="10.0.0.9", now=NOW)
    assert 9 < info.value.retry_after_s <= 10
    # Another peer is not affected; a good token from the limited peer must wait too.
    with pytest.raises(pki.TokenRejected):
        auth.enroll("cam-rl.wrong", make_csr("cam-rl"), peer="10.0.0.8", now=NOW)
    good = token_for(registry, "cam-rl")
    with pytest.raises(pki.RateLimited):
        auth.enroll(good, make_csr("cam-rl"), peer="10.0.0.9", now=NOW)
    t[0] += 10.0  # one attempt regained (6 a minute)
    assert auth.enroll(good, make_csr("cam-rl"), peer="10.0.0.9", now=NOW).identity.id == "cam-rl"


# -- renewal, expiry and revocation --------------------------------------------------------


def enrolled(
    pki_dir: Path, registry: pki.SqliteRegistry, device_id: str
) -> tuple[pki.EnrollmentAuthority, pki.IssuedCertificate]:
    auth = authority(pki_dir, registry, device_lifetime=dt.timedelta(days=1))
    return auth, auth.enroll(token_for(registry, device_id), make_csr(device_id), peer="p", now=NOW)


def test_renewal_allows_a_new_key_and_judges_expiry_to_the_second(
    pki_dir: Path, registry: pki.SqliteRegistry
) -> None:
    auth, issued = enrolled(pki_dir, registry, "cam-exp")
    not_after = issued.certificate.not_valid_after_utc
    second = dt.timedelta(seconds=1)
    renewed = auth.renew(issued.certificate, make_csr("cam-exp"), now=not_after - second)
    assert renewed.certificate.public_key() != issued.certificate.public_key()
    assert renewed.serial != issued.serial
    with pytest.raises(pki.CertificateExpired):
        auth.renew(issued.certificate, make_csr("cam-exp"), now=not_after + second)
    not_before = issued.certificate.not_valid_before_utc
    with pytest.raises(pki.CertificateExpired):
        auth.renew(issued.certificate, make_csr("cam-exp"), now=not_before - second)


def test_revoked_device_cannot_renew_or_enrol_again(
    pki_dir: Path, registry: pki.SqliteRegistry
) -> None:
    auth, issued = enrolled(pki_dir, registry, "cam-rev")
    pending = token_for(registry, "cam-rev")
    record = auth.revoke_device("cam-rev", reason="stolen", now=NOW)
    assert record.sequence == registry.last_sequence()
    with pytest.raises(pki.CertificateRevoked):
        auth.renew(issued.certificate, make_csr("cam-rev"), now=NOW)
    with pytest.raises(pki.TokenRejected):  # the pending token died with the device
        auth.enroll(pending, make_csr("cam-rev"), peer="p", now=NOW)
    with pytest.raises(pki.RegistryError, match="revoked"):
        token_for(registry, "cam-rev")


def test_revoking_one_serial_leaves_the_device_its_other_certificates(
    pki_dir: Path, registry: pki.SqliteRegistry
) -> None:
    auth, first = enrolled(pki_dir, registry, "cam-ser")
    second = auth.renew(first.certificate, make_csr("cam-ser"), now=NOW)
    auth.revoke_serial(first.serial, reason="key exposed", now=NOW)
    assert registry.is_revoked("cam-ser", first.serial)
    assert not registry.is_revoked("cam-ser", second.serial)
    with pytest.raises(pki.CertificateRevoked):
        auth.renew(first.certificate, make_csr("cam-ser"), now=NOW)
    auth.renew(second.certificate, make_csr("cam-ser"), now=NOW)


def test_revocation_sequence_is_monotonic_and_resumable(registry: pki.SqliteRegistry) -> None:
    for i in range(5):
        registry.upsert_device(f"cam-seq{i}", type="pet-camera", region="home", now=NOW)
    seqs = [registry.revoke_device(f"cam-seq{i}", reason="r", now=NOW).sequence for i in range(5)]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 5
    assert [r.sequence for r in registry.revocations_since(seqs[1])] == seqs[2:]
    assert registry.revocations_since(seqs[-1]) == []
    with pytest.raises(pki.RegistryError):
        registry.revoke_device("cam-unknown", reason="r", now=NOW)


def test_certificate_from_another_ca_or_role_cannot_renew(
    pki_dir: Path,
    registry: pki.SqliteRegistry,
    issue: object,
    issue_foreign: object,
) -> None:
    auth, _ = enrolled(pki_dir, registry, "cam-foreign")
    foreign = issue_foreign("device", "cam-foreign").certificate()  # type: ignore[operator]
    with pytest.raises(pki.InvalidIdentity, match="not issued by this core"):
        auth.renew(foreign, make_csr("cam-foreign"), now=dt.datetime.now(dt.UTC))
    gateway = issue("gateway", "gw-one").certificate()  # type: ignore[operator]
    with pytest.raises(pki.InvalidIdentity, match="gateway identity"):
        auth.renew(gateway, make_csr("gw-one"), now=dt.datetime.now(dt.UTC))
    stray = issue("device", "cam-stray").certificate()  # type: ignore[operator]
    with pytest.raises(pki.InvalidIdentity, match="not known to the registry"):
        auth.renew(stray, make_csr("cam-stray"), now=dt.datetime.now(dt.UTC))


# -- audit ---------------------------------------------------------------------------------


def test_audit_lines_cover_every_decision_and_hold_no_secret(
    pki_dir: Path, registry: pki.SqliteRegistry
) -> None:
    auth = authority(pki_dir, registry)
    with structlog.testing.capture_logs() as logs:
        token = token_for(registry, "cam-aud")
        csr = make_csr("cam-aud")
        with pytest.raises(pki.InvalidCsr):
            auth.enroll(token, make_csr("cam-zzz"), peer="10.1.1.1", now=NOW)
        issued = auth.enroll(token, csr, peer="10.1.1.1", now=NOW)
        with pytest.raises(pki.TokenRejected):
            auth.enroll(token, csr, peer="10.1.1.1", now=NOW)
        auth.renew(issued.certificate, make_csr("cam-aud"), now=NOW)
        auth.revoke_device("cam-aud", reason="test", now=NOW)
        with pytest.raises(pki.CertificateRevoked):
            auth.renew(issued.certificate, make_csr("cam-aud"), now=NOW)
    events = [e["event"] for e in logs if e.get("audit")]
    assert events == [
        "token.created",
        "enrolment.refused",
        "certificate.issued",
        "enrolment.refused",
        "certificate.renewed",
        "device.revoked",
        "renewal.refused",
    ]
    text = repr(logs)
    secret = token.split(".", 1)[1]
    assert secret not in text
    assert pki.hash_token(token) not in text
    assert "BEGIN" not in text
    assert csr.decode()[40:80] not in text
    assert all(e.get("device_id") == "cam-aud" for e in logs if e.get("audit"))


# -- files, init, openssl interop ----------------------------------------------------------


def test_init_refuses_to_overwrite_and_keys_are_0600(fresh_pki: Path, tmp_path: Path) -> None:
    with pytest.raises(pki.PkiExists):
        pki.init_pki(fresh_pki, trust_domain="unit.example")
    layout = pki.PkiLayout(fresh_pki)
    for key in (layout.root_key, layout.issuing_key, layout.device_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    files = pki.issue_identity(fresh_pki, tmp_path / "gw", role=pki.Role.GATEWAY, id="gw-keys")
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600


def test_issued_chain_and_crl_interoperate_with_openssl(fresh_pki: Path, tmp_path: Path) -> None:
    openssl = require_tool("openssl")
    now = dt.datetime.now(dt.UTC)
    layout = pki.PkiLayout(fresh_pki)
    ca = pki.CertificateAuthority.load(fresh_pki)
    with pki.SqliteRegistry(layout.registry) as reg:
        auth = pki.EnrollmentAuthority(ca=ca, registry=reg)
        good = auth.enroll(token_now(reg, "cam-good"), make_csr("cam-good"), peer="p", now=now)
        bad = auth.enroll(token_now(reg, "cam-bad"), make_csr("cam-bad"), peer="p", now=now)
        auth.revoke_device("cam-bad", reason="stolen", now=now)
        crl1 = pki.build_crl(ca, reg, now=now).device
        crl2 = pki.build_crl(ca, reg, now=now).device
    number = crl1.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert crl2.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number
    assert crl1.get_revoked_certificate_by_serial_number(bad.certificate.serial_number)
    assert crl1.get_revoked_certificate_by_serial_number(good.certificate.serial_number) is None
    crl_pem = tmp_path / "crl.pem"
    crl_pem.write_bytes(pki.crl_bytes(crl1))
    (tmp_path / "crl.der").write_bytes(pki.crl_bytes(crl1, der=True))
    for cert, name in ((good, "good"), (bad, "bad")):
        (tmp_path / f"{name}.pem").write_bytes(cert.chain_pem)
    run = lambda *a: subprocess.run(  # noqa: E731
        [openssl, *a], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert run("crl", "-in", "crl.pem", "-noout", "-text").returncode == 0
    assert run("crl", "-inform", "DER", "-in", "crl.der", "-noout").returncode == 0
    untrusted = ["-untrusted", str(layout.device_cert)]
    ok = run("verify", "-CAfile", str(layout.root_cert), *untrusted, "good.pem")
    assert ok.returncode == 0, ok.stderr + ok.stdout
    crl_file = tmp_path / "crl+ca.pem"
    crl_file.write_bytes(crl_pem.read_bytes() + layout.ca_bundle.read_bytes())
    checked = run("verify", "-crl_check", "-CAfile", str(crl_file), *untrusted, "good.pem")
    assert checked.returncode == 0, checked.stderr + checked.stdout
    refused = run("verify", "-crl_check", "-CAfile", str(crl_file), *untrusted, "bad.pem")
    assert refused.returncode != 0
    assert "revoked" in refused.stdout + refused.stderr


# -- signed directory ----------------------------------------------------------------------


def test_signed_payload_verifies_and_tampering_is_refused(
    pki_dir: Path, other_pki_dir: Path
) -> None:
    ca = pki.CertificateAuthority.load(pki_dir)
    bundle = pki.PkiLayout(pki_dir).ca_bundle.read_bytes()
    now = dt.datetime.now(dt.UTC)
    signed = pki.sign_payload(ca, b"directory v1")
    pki.verify_signed_payload(
        signed.payload,
        signed.signature,
        signed.signer_certificate_pem,
        ca_bundle_pem=bundle,
        now=now,
    )
    with pytest.raises(pki.SignatureInvalid, match="does not match"):
        pki.verify_signed_payload(
            b"directory v2",
            signed.signature,
            signed.signer_certificate_pem,
            ca_bundle_pem=bundle,
            now=now,
        )
    other = pki.CertificateAuthority.load(other_pki_dir)
    forged = pki.sign_payload(other, b"directory v1")
    with pytest.raises(pki.SignatureInvalid, match="not a CA of this trust domain"):
        pki.verify_signed_payload(
            forged.payload,
            forged.signature,
            forged.signer_certificate_pem,
            ca_bundle_pem=bundle,
            now=now,
        )
    leaf = pki.issue_identity(
        pki_dir, Path(str(pki_dir) + "-leaf"), role=pki.Role.GATEWAY, id="gw-signer"
    )
    key = pki.load_private_key(leaf.key)
    sig = key.sign(b"directory v1", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(pki.SignatureInvalid):
        pki.verify_signed_payload(
            b"directory v1", sig, leaf.cert.read_bytes(), ca_bundle_pem=bundle, now=now
        )
