"""Loading the identity directory and verifying the signed gateway directory (and refusing)."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest

import pki
from device_sdk import (
    DeviceClient,
    DeviceIdentity,
    GatewayInfo,
    InvalidDirectory,
    NotEnrolled,
    SyncDeviceClient,
)
from device_sdk._identity import load_gateway_directory
from tests.conftest import TRUST_DOMAIN, IssueFn
from tests.sdk.conftest import give_directory, signed_directory

GW = [GatewayInfo("kr-seoul", "kr-seoul", "127.0.0.1:5001", "127.0.0.1:5002")]
NOW = dt.datetime.now(dt.UTC)


def test_not_enrolled_says_how_to_enrol(tmp_path: Path) -> None:
    with pytest.raises(NotEnrolled) as info:
        DeviceClient(tmp_path / "nothing-here")
    assert "edgeward enroll" in str(info.value)
    assert "--token" in str(info.value)
    with pytest.raises(NotEnrolled):
        SyncDeviceClient(tmp_path)


def test_incomplete_or_foreign_directories_are_not_enrolled(issue: IssueFn, tmp_path: Path) -> None:
    dev = issue("device", "cam-1")
    half = tmp_path / "half"
    shutil.copytree(dev.directory, half)
    (half / "key.pem").unlink()
    with pytest.raises(NotEnrolled, match=r"missing key\.pem"):
        DeviceIdentity.load(half)
    gw = issue("gateway", "gw-1")
    with pytest.raises(NotEnrolled, match="unusable identity"):
        DeviceIdentity.load(gw.directory)
    other = issue("device", "cam-2")
    mixed = tmp_path / "mixed"
    shutil.copytree(dev.directory, mixed)
    shutil.copy(other.key, mixed / "key.pem")
    with pytest.raises(NotEnrolled, match="does not belong"):
        DeviceIdentity.load(mixed)


def test_loads_identity_and_verifies_directory(issue: IssueFn, pki_dir: Path) -> None:
    dev = give_directory(issue("device", "cam-1"), pki_dir, GW)
    ident = DeviceIdentity.load(dev.directory)
    assert ident.device_id == "cam-1"
    assert ident.trust_domain == TRUST_DOMAIN
    assert ident.spiffe_id == f"spiffe://{TRUST_DOMAIN}/device/cam-1"
    directory = load_gateway_directory(ident, now=NOW)
    assert directory.gateways == tuple(GW)


def test_directory_signed_by_another_ca_is_refused(issue: IssueFn, other_pki_dir: Path) -> None:
    dev = give_directory(issue("device", "cam-1"), other_pki_dir, GW)
    with pytest.raises(InvalidDirectory, match="does not verify"):
        load_gateway_directory(DeviceIdentity.load(dev.directory), now=NOW)


def test_tampered_directory_is_refused(issue: IssueFn, pki_dir: Path) -> None:
    dev = issue("device", "cam-1")
    data = bytearray(signed_directory(pki_dir, GW))
    i = data.find(b"127.0.0.1:5001")
    data[i : i + 14] = b"203.0.113.9:55"
    pki.write_atomic(dev.gateway_directory, bytes(data))
    with pytest.raises(InvalidDirectory):
        load_gateway_directory(DeviceIdentity.load(dev.directory), now=NOW)


def test_directory_of_another_trust_domain_is_refused(issue: IssueFn, pki_dir: Path) -> None:
    dev = issue("device", "cam-1")
    pki.write_atomic(
        dev.gateway_directory, signed_directory(pki_dir, GW, trust_domain="evil.example")
    )
    with pytest.raises(InvalidDirectory, match="trust domain"):
        load_gateway_directory(DeviceIdentity.load(dev.directory), now=NOW)


async def test_missing_directory_is_a_clear_error(issue: IssueFn) -> None:
    dev = issue("device", "cam-1")
    with pytest.raises(InvalidDirectory, match=r"directory\.pb is missing"):
        async with DeviceClient(dev.directory):
            pass
