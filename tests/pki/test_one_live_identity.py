"""One live identity per device id: a new token voids the unused ones before it, and enrolling
again revokes the certificates of the identity it replaces (through the revocation sequence, so
gateways cut them), while renewal keeps today's overlap."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
from pathlib import Path

import grpc
import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric import ec

import pki
from gateway import Command, status_of
from protos.edgeward.v1 import common_pb2, gateway_pb2
from tests._support.core import running_core, unique_id
from tests._support.gateway import start_gateway
from tests.gateway._helpers import rpc_error, trailing
from tests.pki.conftest import NOW, make_csr
from tests.pki.test_core_service import raw_enroll

HOUR = dt.timedelta(hours=1)


def token(registry: pki.Registry, device_id: str, *, now: dt.datetime = NOW) -> str:
    return pki.create_token(
        registry, device_id=device_id, device_type="pet-camera", region="home", ttl=HOUR, now=now
    )


def authority(pki_dir: Path, registry: pki.Registry) -> pki.EnrollmentAuthority:
    return pki.EnrollmentAuthority(ca=pki.CertificateAuthority.load(pki_dir), registry=registry)


# -- a new token voids the earlier unused ones --------------------------------------------------


def test_a_new_token_voids_the_unused_one_before_it(
    pki_dir: Path, registry: pki.SqliteRegistry
) -> None:
    auth = authority(pki_dir, registry)
    first = token(registry, "cam-void")
    with structlog.testing.capture_logs() as logs:
        second = token(registry, "cam-void")
    (voided,) = [e for e in logs if e["event"] == "token.voided"]
    assert (voided["audit"], voided["device_id"], voided["count"]) == (True, "cam-void", 1)
    text = json.dumps(logs, default=str)
    for secret in (first, second, pki.hash_token(first), pki.hash_token(second)):
        assert secret not in text
        assert secret.split(".")[-1] not in text

    with structlog.testing.capture_logs() as logs, pytest.raises(pki.TokenRejected) as old:
        auth.enroll(first, make_csr("cam-void"), peer="p", now=NOW)
    assert old.value.reason == "token voided by a newer token"  # for the audit log only
    (refused,) = [e for e in logs if e["event"] == "enrolment.refused"]
    assert refused["reason"] == "token voided by a newer token"
    with pytest.raises(pki.TokenRejected) as unknown:
        auth.enroll("cam-void.unknown", make_csr("cam-void"), peer="p", now=NOW)
    # The caller cannot tell a voided token from one that never existed.
    assert str(old.value) == str(unknown.value)
    voided, never_existed = (status_of(exc) for exc in (old.value, unknown.value))
    assert voided.code == "PERMISSION_DENIED"
    assert (voided.code, voided.message, voided.trailing_metadata) == (
        never_existed.code,
        never_existed.message,
        never_existed.trailing_metadata,
    )

    issued = auth.enroll(second, make_csr("cam-void"), peer="p", now=NOW)
    assert issued.identity.id == "cam-void"
    # Still void once the newer token is spent; and a voided token never enrols again.
    with pytest.raises(pki.TokenRejected):
        auth.enroll(first, make_csr("cam-void"), peer="p", now=NOW)
    record = registry.get_token(pki.hash_token(first))
    assert record is not None
    assert record.voided_at == NOW
    assert record.used_at is None


def test_only_live_tokens_are_counted_and_other_devices_are_untouched(
    pki_dir: Path, registry: pki.SqliteRegistry
) -> None:
    auth = authority(pki_dir, registry)
    used = token(registry, "cam-count")
    auth.enroll(used, make_csr("cam-count"), peer="p", now=NOW)
    token(registry, "cam-count", now=NOW - 2 * HOUR)  # expired by NOW
    neighbour = token(registry, "cam-neighbour")
    with structlog.testing.capture_logs() as logs:
        token(registry, "cam-count")
    assert [e for e in logs if e["event"] == "token.voided"] == []  # nothing live was voided
    for _ in range(2):
        token(registry, "cam-count")
    assert auth.enroll(neighbour, make_csr("cam-neighbour"), peer="p", now=NOW).identity.id == (
        "cam-neighbour"
    )


async def test_a_voided_token_gets_the_unknown_tokens_answer_over_grpc(
    pki_dir: Path, tmp_path: Path
) -> None:
    async with running_core(pki_dir, tmp_path) as core:
        device_id = unique_id()
        first = core.token(device_id)
        second = core.token(device_id)
        voided = await raw_enroll(core, first, make_csr(device_id))
        unknown = await raw_enroll(core, f"{device_id}.nope", make_csr(device_id))
        assert voided is not None
        assert unknown is not None
        assert voided.code() is unknown.code() is grpc.StatusCode.PERMISSION_DENIED
        assert voided.details() == unknown.details()
        assert first not in (voided.details() or "")
        assert await raw_enroll(core, second, make_csr(device_id)) is None


# -- enrolling again replaces the identity ------------------------------------------------------


def test_enrolling_again_revokes_the_replaced_certificates(
    pki_dir: Path, registry: pki.SqliteRegistry
) -> None:
    auth = authority(pki_dir, registry)
    first = auth.enroll(token(registry, "cam-reset"), make_csr("cam-reset"), peer="p", now=NOW)
    assert first.replaced == ()
    # Renewal is not re-enrolment: the renewed certificate stays valid alongside the new one.
    renewed = auth.renew(first.certificate, make_csr("cam-reset"), now=NOW)
    assert not registry.is_revoked("cam-reset", first.serial)
    assert registry.last_sequence() == 0

    with structlog.testing.capture_logs() as logs:
        second = auth.enroll(token(registry, "cam-reset"), make_csr("cam-reset"), peer="p", now=NOW)
    replaced = {r.serial: r for r in second.replaced}
    assert set(replaced) == {first.serial, renewed.serial}
    assert sorted(r.sequence for r in second.replaced) == [1, 2]
    assert registry.last_sequence() == 2
    for serial in (first.serial, renewed.serial):
        assert registry.is_revoked("cam-reset", serial)
        cert = registry.get_certificate(serial)
        assert cert is not None
        assert cert.status is pki.Status.REVOKED
        assert replaced[serial].reason == "replaced by a new enrolment"
    # The device id itself stays active with its new certificate.
    device = registry.get_device("cam-reset")
    assert device is not None
    assert device.status is pki.Status.ACTIVE
    assert not registry.is_revoked("cam-reset", second.serial)
    assert [r.serial for r in registry.revocations_since(0)] == sorted(
        replaced, key=lambda s: replaced[s].sequence
    )
    assert all(r.role is pki.Role.DEVICE for r in registry.revocations_since(0))

    revoked_lines = [e for e in logs if e["event"] == "certificate.revoked"]
    assert {e["serial"] for e in revoked_lines} == set(replaced)
    assert all(e["audit"] and e["device_id"] == "cam-reset" for e in revoked_lines)
    (issued_line,) = [e for e in logs if e["event"] == "certificate.issued"]
    assert set(issued_line["replaced_serials"]) == set(replaced)
    assert not [e for e in logs if e["event"] == "device.revoked"]

    crl = pki.build_crl(pki.CertificateAuthority.load(pki_dir), registry, now=NOW)
    listed = {r.serial_number for r in crl.device}
    assert {int(s, 16) for s in replaced} <= listed
    assert second.certificate.serial_number not in listed
    assert len(crl.issuing) == 0
    # The replaced certificates cannot renew; the new one can, and keeps working after it.
    for old in (first, renewed):
        with pytest.raises(pki.CertificateRevoked):
            auth.renew(old.certificate, make_csr("cam-reset"), now=NOW)
    third = auth.renew(second.certificate, make_csr("cam-reset"), now=NOW)
    assert third.replaced == ()
    assert not registry.is_revoked("cam-reset", second.serial)


def test_expired_certificates_are_not_revoked_again(
    pki_dir: Path, registry: pki.SqliteRegistry
) -> None:
    auth = pki.EnrollmentAuthority(
        ca=pki.CertificateAuthority.load(pki_dir),
        registry=registry,
        device_lifetime=dt.timedelta(days=1),
    )
    auth.enroll(token(registry, "cam-old"), make_csr("cam-old"), peer="p", now=NOW)
    later = NOW + dt.timedelta(days=2)
    again = auth.enroll(
        token(registry, "cam-old", now=later), make_csr("cam-old"), peer="p", now=later
    )
    assert again.replaced == ()
    assert registry.last_sequence() == 0


# -- end to end: the old certificate is cut at the gateway, the new one is served --------------


def _write(out: Path, key: ec.EllipticCurvePrivateKey, issued: pki.IssuedCertificate) -> Path:
    out.mkdir(mode=0o700)
    pki.write_private_key(out / "key.pem", key)
    pki.write_identity(
        out,
        certificate=issued.certificate,
        chain_pem=issued.chain_pem,
        ca_bundle_pem=issued.ca_bundle_pem,
        metadata={"id": issued.identity.id, "role": "device"},
    )
    return out


async def test_re_enrolment_cuts_the_old_certificate_at_the_gateway(
    issue, pki_dir: Path, tmp_path: Path, photos: Path
) -> None:
    frame = common_pb2.Frame(image=(photos / "chelsea.jpg").read_bytes(), frame_id="c")
    async with start_gateway(issue=issue, tmp_path=tmp_path) as gw:
        assert gw.registry is not None
        auth = authority(pki_dir, gw.registry)
        now = dt.datetime.now(dt.UTC)

        def enrol(name: str) -> tuple[pki.IssuedCertificate, pki.IdentityFiles]:
            key = ec.generate_private_key(ec.SECP256R1())
            issued = auth.enroll(
                token(gw.registry, "cam-swap", now=now),  # type: ignore[arg-type]
                make_csr("cam-swap", key=key),
                peer="p",
                now=now,
            )
            return issued, pki.IdentityFiles(_write(tmp_path / name, key, issued))

        old_issued, old = enrol("old")
        async with gw.channel(old) as old_channel:
            old_stub = gw.stub(old_channel)
            assert (await old_stub.Detect(frame, timeout=10)).detections
            events = old_stub.Subscribe(gateway_pb2.SubscribeRequest(), timeout=30)
            gw.service.events.publish("cam-swap", Command("hello"))
            assert (await events.read()).command.name == "hello"  # the session is live

            new_issued, new = enrol("new")
            # The old certificate's live session is cut, with the final answer.
            async with asyncio.timeout(10):
                cut = await rpc_error(events.read())
            assert cut.code() is grpc.StatusCode.PERMISSION_DENIED
            assert trailing(cut).get("edgeward-final") == "revoked"
            err = await rpc_error(old_stub.Detect(frame, timeout=10))
            assert err.code() is grpc.StatusCode.PERMISSION_DENIED
            assert trailing(err).get("edgeward-final") == "revoked"
        async with gw.channel(new) as new_channel:
            assert (await gw.stub(new_channel).Detect(frame, timeout=10)).detections
        assert gw.service.revocation.is_revoked("cam-swap", old_issued.serial)
        assert not gw.service.revocation.is_revoked("cam-swap", new_issued.serial)
        assert [r.serial for r in new_issued.replaced] == [old_issued.serial]


def test_tokens_of_a_registry_from_an_earlier_version_still_enrol_and_are_voided(
    pki_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "old.sqlite3"
    old = pki.generate_token("cam-legacy")
    older = pki.generate_token("cam-legacy")
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE tokens (token_hash TEXT PRIMARY KEY, device_id TEXT NOT NULL,"
            " type TEXT NOT NULL, region TEXT NOT NULL, expires_at REAL NOT NULL, used_at REAL,"
            " created_at REAL NOT NULL)"
        )
        for t in (older, old):
            db.execute(
                "INSERT INTO tokens VALUES (?, 'cam-legacy', 'pet-camera', 'home', ?, NULL, ?)",
                (pki.hash_token(t), (NOW + HOUR).timestamp(), NOW.timestamp()),
            )
    with pki.SqliteRegistry(path) as registry:
        auth = authority(pki_dir, registry)
        assert auth.enroll(old, make_csr("cam-legacy"), peer="p", now=NOW).identity.id == (
            "cam-legacy"
        )
        newer = token(registry, "cam-legacy")
        with pytest.raises(pki.TokenRejected) as info:
            auth.enroll(older, make_csr("cam-legacy"), peer="p", now=NOW)
        assert info.value.reason == "token voided by a newer token"
        assert auth.enroll(newer, make_csr("cam-legacy"), peer="p", now=NOW).replaced
