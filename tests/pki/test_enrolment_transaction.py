"""``Registry.complete_enrolment`` on SQLite and PostgreSQL: one transaction spends the token,
registers the device and records its certificate, or does none of it."""

from __future__ import annotations

import datetime as dt

import pytest

import pki

from .conftest import NOW, execute_raw

SERIAL = "0a1b2c3d"


def _token(registry: pki.Registry, device_id: str, *, ttl_s: int = 3600) -> str:
    token = pki.generate_token(device_id)
    registry.create_token(
        pki.TokenRecord(
            pki.hash_token(token),
            device_id,
            "pet-camera",
            "home",
            NOW + dt.timedelta(seconds=ttl_s),
            None,
        ),
        now=NOW,
    )
    return pki.hash_token(token)


def _cert(device_id: str, serial: str = SERIAL) -> pki.CertificateRecord:
    return pki.CertificateRecord(
        serial, device_id, NOW + dt.timedelta(days=30), pki.Status.ACTIVE, NOW
    )


def test_enrolment_registers_the_device_and_records_the_certificate(
    registry: pki.Registry,
) -> None:
    token_hash = _token(registry, "cam-tx1")
    device = registry.complete_enrolment(token_hash, certificate=_cert("cam-tx1"), now=NOW).device
    assert (device.id, device.type, device.region, device.status) == (
        "cam-tx1",
        "pet-camera",
        "home",
        pki.Status.ACTIVE,
    )
    assert registry.get_certificate(SERIAL) is not None
    token = registry.get_token(token_hash)
    assert token is not None
    assert token.used_at == NOW


def test_each_refusal_names_its_reason_and_changes_nothing(
    registry: pki.Registry,
) -> None:
    with pytest.raises(pki.TokenRejected) as unknown:
        registry.complete_enrolment("0" * 64, certificate=_cert("cam-tx2"), now=NOW)
    assert unknown.value.reason == "unknown token"

    expired = _token(registry, "cam-tx2", ttl_s=1)
    later = NOW + dt.timedelta(seconds=2)
    with pytest.raises(pki.TokenRejected) as late:
        registry.complete_enrolment(expired, certificate=_cert("cam-tx2"), now=later)
    assert late.value.reason == "token expired"

    other = _token(registry, "cam-tx3")
    with pytest.raises(pki.TokenRejected) as wrong:
        registry.complete_enrolment(other, certificate=_cert("cam-zzz"), now=NOW)
    assert wrong.value.reason == "token names another device"
    token = registry.get_token(other)
    assert token is not None
    assert token.used_at is None
    assert registry.get_device("cam-tx3") is None
    assert registry.get_certificate(SERIAL) is None

    registry.complete_enrolment(other, certificate=_cert("cam-tx3"), now=NOW)
    with pytest.raises(pki.TokenRejected) as again:
        registry.complete_enrolment(other, certificate=_cert("cam-tx3", "ff01"), now=NOW)
    assert again.value.reason == "token already used"
    assert registry.get_certificate("ff01") is None


def test_a_revoked_device_is_never_registered_again_even_with_a_live_token(
    registry: pki.Registry,
) -> None:
    registry.complete_enrolment(_token(registry, "cam-tx4"), certificate=_cert("cam-tx4"), now=NOW)
    live = _token(registry, "cam-tx4")
    # Revocation normally spends pending tokens too; mark only the device, as a registry
    # written by another tool might, so the transaction's own check is what refuses.
    execute_raw(registry, "UPDATE devices SET status = 'revoked' WHERE id = 'cam-tx4'")
    with pytest.raises(pki.CertificateRevoked):
        registry.complete_enrolment(live, certificate=_cert("cam-tx4", "ff02"), now=NOW)
    device = registry.get_device("cam-tx4")
    assert device is not None
    assert device.status is pki.Status.REVOKED
    assert registry.get_certificate("ff02") is None
    token = registry.get_token(live)
    assert token is not None
    assert token.used_at is None
