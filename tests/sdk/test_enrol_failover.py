"""Devices that know several cores: enrolment and renewal try the next replica when one is
down, keep the core's pin at every address, and never lose a token to a failed attempt.

Replicas here are real cores sharing one SQLite registry (WAL), as on one machine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner

import pki
from device_sdk import enroll, renew
from device_sdk._enrollment import endpoint_list
from device_sdk.errors import EnrollmentRefused, EnrollmentUnavailable
from gateway import free_port
from tests._support.core import running_core, unique_id
from tests.pki.test_role_pinning import serving

pytestmark = [pytest.mark.timeout(120)]


def dead() -> str:
    """An address nothing listens on."""
    return f"127.0.0.1:{free_port()}"


def test_endpoint_lists_keep_order_and_drop_repeats() -> None:
    assert endpoint_list("a:1") == ["a:1"]
    assert endpoint_list(" a:1, b:2,a:1 ") == ["a:1", "b:2"]
    assert endpoint_list(["a:1", "b:2,c:3"]) == ["a:1", "b:2", "c:3"]
    assert endpoint_list("") == []


async def test_enrolment_moves_on_from_a_dead_replica_and_renewal_too(
    pki_dir: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "shared-registry.sqlite3"
    device_id = unique_id("cam")
    out = tmp_path / "cam"
    gone = dead()
    async with (
        running_core(pki_dir, tmp_path, registry=shared) as a,
        running_core(pki_dir, tmp_path, registry=shared) as b,
    ):
        token = a.token(device_id)  # made through one replica, good at every one
        result = await enroll(
            endpoint=[gone, b.enrol_address],
            ca_bundle_pem=b.ca_bundle_pem,
            token=token,
            out_dir=out,
            core_address=f"{gone},{a.address}",
            timeout_s=10,
        )
        assert result.device_id == device_id
        assert not result.already_enrolled
        assert a.registry.get_certificate(result.serial) is not None
        files = pki.IdentityFiles(out)
        assert files.read_metadata()["core_address"] == f"{gone},{a.address}"
        # Renewal with the stored list: the dead address first, then replica A.
        renewed = await renew(identity_dir=out, timeout_s=10)
        assert renewed.serial != result.serial
        assert {c.serial for c in b.registry.list_certificates(device_id)} == {
            result.serial,
            renewed.serial,
        }
        assert files.read_metadata()["core_address"] == f"{gone},{a.address}"


async def test_a_token_survives_every_replica_being_down(pki_dir: Path, tmp_path: Path) -> None:
    device_id = unique_id("cam")
    async with running_core(pki_dir, tmp_path) as core:
        token = core.token(device_id)
        ca = core.ca_bundle_pem
    # The core is gone: every endpoint fails, nothing is spent.
    with pytest.raises(EnrollmentUnavailable):
        await enroll(
            endpoint=[dead(), dead()], ca_bundle_pem=ca, token=token, out_dir=tmp_path / "x"
        )
    async with running_core(pki_dir, tmp_path, registry=core.registry.path) as again:
        result = await enroll(
            endpoint=[dead(), again.enrol_address],
            ca_bundle_pem=ca,
            token=token,
            out_dir=tmp_path / "cam",
            timeout_s=10,
        )
    assert result.device_id == device_id


async def test_no_token_goes_to_a_gateway_in_the_list(issue, pki_dir: Path, tmp_path: Path) -> None:
    """A stolen gateway key listening at the first endpoint is skipped like a dead replica:
    the pin holds at every address, so the token never reaches it."""
    device_id = unique_id("cam")
    async with (
        serving(issue("gateway", "gw-thief-2")) as (rogue_address, rogue),
        running_core(pki_dir, tmp_path) as core,
    ):
        result = await enroll(
            endpoint=f"{rogue_address},{core.enrol_address}",
            ca_bundle_pem=core.ca_bundle_pem,
            token=core.token(device_id),
            out_dir=tmp_path / "cam",
            timeout_s=10,
        )
        assert result.device_id == device_id
        assert rogue.calls == []


async def test_a_refusal_is_an_answer_not_a_reason_to_try_the_next(
    pki_dir: Path, tmp_path: Path
) -> None:
    """Only an unreachable replica makes the device move on; a core that refuses the token
    has answered (its registry is the fleet's), and the refusal spends nothing."""
    device_id = unique_id("cam")
    async with (
        running_core(pki_dir, tmp_path) as elsewhere,  # its own registry: the token is unknown
        running_core(pki_dir, tmp_path) as core,
    ):
        token = core.token(device_id)
        with pytest.raises(EnrollmentRefused):
            await enroll(
                endpoint=[elsewhere.enrol_address, core.enrol_address],
                ca_bundle_pem=core.ca_bundle_pem,
                token=token,
                out_dir=tmp_path / "cam",
                timeout_s=10,
            )
        assert core.registry.list_certificates(device_id) == []
        result = await enroll(
            endpoint=[core.enrol_address],
            ca_bundle_pem=core.ca_bundle_pem,
            token=token,
            out_dir=tmp_path / "cam",
            timeout_s=10,
        )
        assert result.device_id == device_id


async def test_edgeward_enroll_takes_endpoint_repeated(pki_dir: Path, tmp_path: Path) -> None:
    from edgeward.cli import main

    device_id = unique_id("cam")
    async with running_core(pki_dir, tmp_path) as core:
        bundle = tmp_path / "ca-bundle.pem"
        bundle.write_bytes(core.ca_bundle_pem)
        args = [
            "enroll",
            "--endpoint",
            dead(),
            "--endpoint",
            f"{dead()},{core.enrol_address}",
            "--ca-bundle",
            str(bundle),
            "--token",
            core.token(device_id),
            "--out",
            str(tmp_path / "cam"),
            "--core-endpoint",
            core.address,
        ]
        # The command runs its own event loop: give it a thread.
        result = await asyncio.to_thread(CliRunner().invoke, main, args)
        assert result.exit_code == 0, result.output
        assert f"enrolled {device_id}" in result.output
        renew_args = ["enroll", "--renew", "--endpoint", dead(), "--endpoint", core.address]
        renew_args += ["--out", str(tmp_path / "cam")]
        result = await asyncio.to_thread(CliRunner().invoke, main, renew_args)
        assert result.exit_code == 0, result.output
        assert f"renewed {device_id}" in result.output
