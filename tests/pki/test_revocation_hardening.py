"""Revocation without gaps: renewals racing a revocation, the CRL of a revoked device, gateway
and core certificates in the registry, malformed CSR extensions, identity directory modes."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import stat
from pathlib import Path

import pytest
import structlog

import pki
from tests.pki.conftest import NOW, duplicate_extension_csr, execute_raw, make_csr


def authority(pki_dir: Path, registry: pki.SqliteRegistry) -> pki.EnrollmentAuthority:
    return pki.EnrollmentAuthority(ca=pki.CertificateAuthority.load(pki_dir), registry=registry)


def enrol(
    auth: pki.EnrollmentAuthority, registry: pki.SqliteRegistry, device_id: str
) -> pki.IssuedCertificate:
    token = pki.create_token(
        registry,
        device_id=device_id,
        device_type="pet-camera",
        region="home",
        ttl=dt.timedelta(hours=1),
        now=NOW,
    )
    return auth.enroll(token, make_csr(device_id), peer="p", now=NOW)


def crl_serials(pki_dir: Path, registry: pki.SqliteRegistry) -> set[int]:
    crls = pki.build_crl(pki.CertificateAuthority.load(pki_dir), registry, now=NOW)
    return {r.serial_number for crl in crls for r in crl}


# -- 1. a renewal that races a revocation ---------------------------------------------------


@pytest.mark.parametrize("revoke", ["device", "serial"])
def test_revocation_between_check_and_insert_refuses_the_renewal(
    revoke: str,
    pki_dir: Path,
    registry: pki.SqliteRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auth = authority(pki_dir, registry)
    issued = enrol(auth, registry, "cam-race")
    real = registry.record_renewal
    calls: list[str] = []

    def revoke_first(previous_serial: str, certificate: pki.CertificateRecord) -> None:
        # The seam: runs after check_current and the signature, before the insert.
        calls.append(certificate.serial)
        if revoke == "device":
            pki.revoke_device(registry, "cam-race", reason="stolen", now=NOW)
        else:
            pki.revoke_serial(registry, previous_serial, reason="key exposed", now=NOW)
        real(previous_serial, certificate)

    monkeypatch.setattr(registry, "record_renewal", revoke_first)
    with structlog.testing.capture_logs() as logs, pytest.raises(pki.CertificateRevoked):
        auth.renew(issued.certificate, make_csr("cam-race"), now=NOW)
    assert len(calls) == 1  # the new certificate was signed, then refused
    assert [c.serial for c in registry.list_certificates("cam-race")] == [issued.serial]
    assert registry.get_certificate(calls[0]) is None
    refused = [e for e in logs if e.get("event") == "renewal.refused"]
    assert refused
    assert refused[0]["audit"] is True
    assert issued.certificate.serial_number in crl_serials(pki_dir, registry)


def test_renewal_of_an_unknown_or_foreign_serial_is_refused_in_the_transaction(
    pki_dir: Path, registry: pki.SqliteRegistry
) -> None:
    auth = authority(pki_dir, registry)
    one = enrol(auth, registry, "cam-one")
    enrol(auth, registry, "cam-two")
    new = pki.CertificateRecord("abc123", "cam-two", NOW, pki.Status.ACTIVE, NOW)
    with pytest.raises(pki.InvalidIdentity):  # cam-one's serial presented for cam-two
        registry.record_renewal(one.serial, new)
    with pytest.raises(pki.InvalidIdentity):
        registry.record_renewal("deadbeef", new)
    ghost = pki.CertificateRecord("abc124", "cam-ghost", NOW, pki.Status.ACTIVE, NOW)
    with pytest.raises(pki.InvalidIdentity):
        registry.record_renewal(one.serial, ghost)
    assert registry.get_certificate("abc123") is None
    assert registry.get_certificate("abc124") is None


def test_crl_lists_every_certificate_of_a_revoked_device(
    pki_dir: Path, registry: pki.SqliteRegistry
) -> None:
    auth = authority(pki_dir, registry)
    first = enrol(auth, registry, "cam-all")
    second = auth.renew(first.certificate, make_csr("cam-all"), now=NOW)
    keeper = enrol(auth, registry, "cam-keep")
    pki.revoke_device(registry, "cam-all", reason="stolen", now=NOW)
    # What the old race left behind: a certificate recorded 'active' after the revocation.
    late = pki.CertificateRecord("5ca1ab1e", "cam-all", NOW, pki.Status.ACTIVE, NOW)
    registry.record_certificate(late)
    listed = crl_serials(pki_dir, registry)
    assert {first.certificate.serial_number, second.certificate.serial_number} <= listed
    assert int(late.serial, 16) in listed
    assert keeper.certificate.serial_number not in listed
    revoked_at = dict(registry.revoked_serials())
    assert revoked_at[late.serial] == NOW


# -- 2. gateway and core certificates -------------------------------------------------------


def test_server_certificates_are_recorded_and_revocable_by_serial_and_by_id(
    pki_dir: Path, registry: pki.SqliteRegistry, tmp_path: Path
) -> None:
    gw1 = pki.issue_identity(
        pki_dir, tmp_path / "gw1", role=pki.Role.GATEWAY, id="gw-twin", registry=registry
    )
    gw2 = pki.issue_identity(
        pki_dir, tmp_path / "gw2", role=pki.Role.GATEWAY, id="gw-twin", registry=registry
    )
    core = pki.issue_identity(
        pki_dir, tmp_path / "core", role=pki.Role.CORE, id="core-9", registry=registry
    )
    serial = {
        name: pki.serial_hex(f.certificate().serial_number)
        for name, f in (("gw1", gw1), ("gw2", gw2), ("core", core))
    }
    recorded = registry.list_server_certificates(pki.Role.GATEWAY, "gw-twin")
    assert {r.serial for r in recorded} == {serial["gw1"], serial["gw2"]}
    assert all(r.status is pki.Status.ACTIVE for r in recorded)
    core_record = registry.get_server_certificate(serial["core"])
    assert core_record is not None
    assert (core_record.role, core_record.server_id) == (pki.Role.CORE, "core-9")
    # Ids are unique across roles now, but a registry written by an earlier version may hold a
    # device that shares the gateway's id: revoking the gateway must not touch it.
    twin_serial = "7e1a"
    execute_raw(
        registry,
        "INSERT INTO devices VALUES ('gw-twin', 'pet-camera', 'home', 'active', ?)",
        (NOW.timestamp(),),
    )
    execute_raw(
        registry,
        "INSERT INTO certificates VALUES (?, 'gw-twin', ?, 'active', ?)",
        (twin_serial, NOW.timestamp() + 86400, NOW.timestamp()),
    )

    with structlog.testing.capture_logs() as logs:
        one = pki.revoke_serial(registry, serial["core"].upper(), reason="host lost", now=NOW)
    assert (one.role, one.device_id, one.serial) == (pki.Role.CORE, "core-9", serial["core"])
    line = next(e for e in logs if e["event"] == "certificate.revoked")
    assert line["audit"] is True
    assert line["core_id"] == "core-9"
    assert "device_id" not in line

    records = pki.revoke_server(registry, pki.Role.GATEWAY, "gw-twin", reason="stolen", now=NOW)
    assert {r.serial for r in records} == {serial["gw1"], serial["gw2"]}
    assert all(r.role is pki.Role.GATEWAY for r in records)
    assert [r.sequence for r in records] == sorted(r.sequence for r in records)
    assert pki.revoke_server(registry, pki.Role.GATEWAY, "gw-twin", reason="x", now=NOW) == []
    with pytest.raises(pki.RegistryError, match="no certificate of gateway gw-none"):
        pki.revoke_server(registry, pki.Role.GATEWAY, "gw-none", reason="x", now=NOW)

    feed = registry.revocations_since(0)
    assert [r.role for r in feed] == [pki.Role.CORE, pki.Role.GATEWAY, pki.Role.GATEWAY]
    assert all(r.serial for r in feed)  # never a whole-"device" record for a server
    listed = crl_serials(pki_dir, registry)
    assert {int(s, 16) for s in serial.values()} <= listed
    # The device twin is untouched.
    assert not registry.is_revoked("gw-twin", twin_serial)
    assert int(twin_serial, 16) not in listed
    assert registry.get_device("gw-twin").status is pki.Status.ACTIVE  # type: ignore[union-attr]


def test_device_certificates_are_not_recorded_as_servers(
    pki_dir: Path, registry: pki.SqliteRegistry, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="enrolment"):
        pki.issue_identity(
            pki_dir, tmp_path / "d", role=pki.Role.DEVICE, id="cam-srv", registry=registry
        )
    assert not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match="revoke_device"):
        registry.revoke_server(pki.Role.DEVICE, "cam-srv", reason="x", now=NOW)


def test_a_registry_from_an_earlier_version_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE revocations (sequence INTEGER PRIMARY KEY AUTOINCREMENT,"
        " device_id TEXT NOT NULL, serial TEXT, reason TEXT NOT NULL, revoked_at REAL NOT NULL);"
        "INSERT INTO revocations (device_id, serial, reason, revoked_at)"
        " VALUES ('cam-old', NULL, 'stolen', 1.0);"
    )
    db.commit()
    db.close()
    with pki.SqliteRegistry(path) as reg:
        (old,) = reg.revocations_since(0)
        assert (old.device_id, old.role) == ("cam-old", pki.Role.DEVICE)
    with pki.SqliteRegistry(path) as reg:  # a second open finds nothing left to do
        assert reg.last_sequence() == 1


# -- 3. CSRs that cryptography cannot parse --------------------------------------------------


def test_duplicate_extension_csr_is_invalid_argument_with_an_audit_line(
    pki_dir: Path, registry: pki.SqliteRegistry
) -> None:
    auth = authority(pki_dir, registry)
    identity = pki.Identity(auth.trust_domain, pki.Role.DEVICE, "cam-dup")
    csr = duplicate_extension_csr(identity)
    with pytest.raises(pki.InvalidCsr, match="more than once"):
        pki.validate_csr(csr, identity=identity)
    token = pki.create_token(
        registry,
        device_id="cam-dup",
        device_type="pet-camera",
        region="home",
        ttl=dt.timedelta(hours=1),
        now=NOW,
    )
    with structlog.testing.capture_logs() as logs, pytest.raises(pki.InvalidCsr):
        auth.enroll(token, csr, peer="10.9.9.9", now=NOW)
    refused = [e for e in logs if e.get("event") == "enrolment.refused"]
    assert len(refused) == 1
    assert refused[0]["audit"] is True
    assert "more than once" in refused[0]["reason"]
    # The token was not spent: the device can retry with a good CSR.
    assert auth.enroll(token, make_csr("cam-dup"), peer="10.9.9.9", now=NOW)


# -- 4. identity directories -----------------------------------------------------------------


@pytest.mark.parametrize("role", [pki.Role.GATEWAY, pki.Role.CORE])
def test_server_identity_directory_is_0700_and_key_0600(
    role: pki.Role, pki_dir: Path, tmp_path: Path
) -> None:
    old_umask = os.umask(0o022)
    try:
        fresh = tmp_path / "new" / f"{role.value}-a"
        existing = tmp_path / f"{role.value}-b"
        existing.mkdir(mode=0o755)
        existing.chmod(0o755)
        for directory in (fresh, existing):
            files = pki.issue_identity(pki_dir, directory, role=role, id=f"{role.value}-modes")
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
            assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
            assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]
    finally:
        os.umask(old_umask)
