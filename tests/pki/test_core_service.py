"""The core over real TLS on loopback: enrolment, renewal, refusals, the Core API and the feed."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import device_sdk as sdk
import pki
from device_sdk import parse_gateway_directory
from device_sdk.errors import (
    CertificateExpired,
    DeviceRevoked,
    EnrollmentRefused,
    EnrollmentUnavailable,
    IdentityNotWritable,
)
from protos.edgeward.v1 import (
    common_pb2,
    core_pb2,
    core_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
)
from tests._support.core import RunningCore, running_core, unique_id
from tests.pki.conftest import make_csr, tamper_signature

IssueFn = Callable[..., pki.IdentityFiles]


async def enrol(
    core: RunningCore, tmp_path: Path, device_id: str | None = None
) -> sdk.EnrollmentResult:
    device_id = device_id or unique_id()
    return await sdk.enroll(
        endpoint=core.enrol_address,
        ca_bundle_pem=core.ca_bundle_pem,
        token=core.token(device_id),
        out_dir=tmp_path / device_id,
        core_address=core.address,
    )


async def raw_enroll(core: RunningCore, token: str, csr: bytes) -> grpc.aio.AioRpcError | None:
    async with core.channel() as ch:
        try:
            await enrollment_pb2_grpc.EnrollmentStub(ch).Enroll(
                enrollment_pb2.EnrollRequest(token=token, csr=csr), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            return exc
    return None


async def test_happy_path_enrol_then_renew(pki_dir: Path, tmp_path: Path) -> None:
    async with running_core(pki_dir, tmp_path) as core:
        result = await enrol(core, tmp_path, "cam-happy")
        files = result.files
        assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
        assert files.identity("test.example") == pki.Identity(
            "test.example", pki.Role.DEVICE, "cam-happy"
        )
        assert (result.device_type, result.region) == ("pet-camera", "home")
        directory = parse_gateway_directory(
            files.gateway_directory.read_bytes(),
            ca_bundle_pem=core.ca_bundle_pem,
            trust_domain="test.example",
            now=dt.datetime.now(dt.UTC),
        )
        assert directory.trust_domain == "test.example"
        old_key = files.key.read_bytes()
        again = await sdk.enroll(
            endpoint=core.enrol_address,
            ca_bundle_pem=core.ca_bundle_pem,
            token="cam-happy.used-or-not-it-does-not-matter",
            out_dir=files.directory,
        )
        assert again.already_enrolled
        assert again.serial == result.serial
        renewed = await sdk.renew(identity_dir=files.directory)
        assert renewed.serial != result.serial
        assert files.key.read_bytes() != old_key
        assert {c.serial for c in core.registry.list_certificates("cam-happy")} == {
            result.serial,
            renewed.serial,
        }
        # A health check works without a client certificate on the enrolment port.
        async with core.channel() as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reused_token_and_bad_requests_are_refused(pki_dir: Path, tmp_path: Path) -> None:
    async with running_core(pki_dir, tmp_path) as core:
        device_id = unique_id()
        token = core.token(device_id)
        assert await raw_enroll(core, token, make_csr(device_id)) is None
        err = await raw_enroll(core, token, make_csr(device_id))
        assert err is not None
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "used" in (err.details() or "")
        assert token not in (err.details() or "")
        # Unknown token: the same answer, so nothing is learnt about which tokens exist.
        unknown = await raw_enroll(core, f"{device_id}.nope", make_csr(device_id))
        assert unknown is not None
        assert unknown.details() == err.details()

        other = unique_id()
        token = core.token(other)
        cases = {
            "another device": make_csr(unique_id()),
            "bad signature": tamper_signature(make_csr(other)),
            "garbage": os.urandom(300),
            "too large": b"0" * (pki.MAX_CSR_BYTES + 10),
        }
        for what, csr in cases.items():
            err = await raw_enroll(core, token, csr)
            assert err is not None, what
            assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, what
            assert (err.details() or "").startswith("CSR refused: "), what
        # None of those spent the token.
        assert await raw_enroll(core, token, make_csr(other)) is None


async def test_oversized_grpc_request_is_refused(pki_dir: Path, tmp_path: Path) -> None:
    async with running_core(pki_dir, tmp_path, grpc_max_message_bytes=64 * 1024) as core:
        err = await raw_enroll(core, "x.y", b"0" * (100 * 1024))
        assert err is not None
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_expired_token_with_the_core_clock(pki_dir: Path, tmp_path: Path) -> None:
    now = [dt.datetime.now(dt.UTC)]
    async with running_core(pki_dir, tmp_path, clock=lambda: now[0]) as core:
        device_id = unique_id()
        token = core.token(device_id, ttl=dt.timedelta(minutes=10))
        now[0] += dt.timedelta(minutes=10, seconds=1)
        err = await raw_enroll(core, token, make_csr(device_id))
        assert err is not None
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_concurrent_use_of_one_token_has_one_winner(pki_dir: Path, tmp_path: Path) -> None:
    async with running_core(pki_dir, tmp_path) as core:
        device_id = unique_id()
        token = core.token(device_id)
        results = await asyncio.gather(
            *(raw_enroll(core, token, make_csr(device_id)) for _ in range(8))
        )
        assert sum(r is None for r in results) == 1
        assert all(r.code() is grpc.StatusCode.PERMISSION_DENIED for r in results if r)
        assert len(core.registry.list_certificates(device_id)) == 1


async def test_failed_token_attempts_are_rate_limited(pki_dir: Path, tmp_path: Path) -> None:
    t = [0.0]
    async with running_core(
        pki_dir,
        tmp_path,
        limiter_clock=lambda: t[0],
        token_attempts={"burst": 2, "per_minute": 1},
    ) as core:
        codes = [
            (await raw_enroll(core, f"cam-guess.{i}", make_csr("cam-guess"))).code()  # type: ignore[union-attr]
            for i in range(3)
        ]
        assert codes == [
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ]
        t[0] += 61
        err = await raw_enroll(core, "cam-guess.again", make_csr("cam-guess"))
        assert err is not None
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("bad", ["cam+1", "cam#1", "cam/1", "cam\x001", "Cam-1"])
async def test_ids_with_wildcards_are_refused_over_grpc(
    bad: str, pki_dir: Path, tmp_path: Path, issue: IssueFn
) -> None:
    async with running_core(pki_dir, tmp_path) as core:
        err = await raw_enroll(core, f"{bad}.secret", make_csr("cam-fine"))
        assert err is not None
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
        gateway = issue("gateway", "gw-ids")
        async with core.channel(identity=gateway) as ch:
            stub = core_pb2_grpc.CoreStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetDevice(core_pb2.GetDeviceRequest(device_id=bad))
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.AnnounceGateway(
                    common_pb2.GatewayEntry(region=bad, grpc_address="127.0.0.1:1")
                )
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_revoked_device_gets_a_final_answer(pki_dir: Path, tmp_path: Path) -> None:
    async with running_core(pki_dir, tmp_path) as core:
        result = await enrol(core, tmp_path)
        core.server.revoke_device(result.device_id, reason="stolen")
        with pytest.raises(DeviceRevoked):
            await sdk.renew(identity_dir=result.files.directory)


async def test_expired_certificate_cannot_renew_one_second_either_side(
    pki_dir: Path, tmp_path: Path
) -> None:
    now = [dt.datetime.now(dt.UTC)]
    async with running_core(
        pki_dir, tmp_path, clock=lambda: now[0], device_certificate_lifetime=3600
    ) as core:
        result = await enrol(core, tmp_path)
        now[0] = result.not_after + dt.timedelta(seconds=1)
        with pytest.raises(CertificateExpired):
            # The device's own clock still says valid; the core's says expired.
            await sdk.renew(identity_dir=result.files.directory)
        now[0] = result.not_after - dt.timedelta(seconds=1)
        # The device judges the new chain with the same (injected) time as the core.
        renewed = await sdk.renew(identity_dir=result.files.directory, now=now[0])
        assert renewed.serial != result.serial


async def test_foreign_and_server_certificates_cannot_renew(
    pki_dir: Path, tmp_path: Path, issue: IssueFn, issue_foreign: IssueFn
) -> None:
    async with running_core(pki_dir, tmp_path) as core:
        foreign = issue_foreign("device", "cam-foreign")
        async with grpc.aio.secure_channel(
            core.address,
            pki.grpc_channel_credentials(ca_bundle_pem=core.ca_bundle_pem, identity=foreign),
        ) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await enrollment_pb2_grpc.EnrollmentStub(ch).Renew(
                    enrollment_pb2.RenewRequest(csr=make_csr("cam-foreign")), timeout=10
                )
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE  # refused at the handshake
        gateway = issue("gateway", "gw-renew")
        async with core.channel(identity=gateway) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await enrollment_pb2_grpc.EnrollmentStub(ch).Renew(
                    enrollment_pb2.RenewRequest(csr=make_csr("gw-renew")), timeout=10
                )
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
        async with core.channel() as ch:  # enrolment port: no certificate at all
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await enrollment_pb2_grpc.EnrollmentStub(ch).Renew(
                    enrollment_pb2.RenewRequest(csr=make_csr("cam-x1")), timeout=10
                )
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_core_methods_are_for_gateways_only(
    pki_dir: Path, tmp_path: Path, issue: IssueFn
) -> None:
    async with running_core(pki_dir, tmp_path) as core:
        device = (await enrol(core, tmp_path)).files
        for identity, code in (
            (device, grpc.StatusCode.PERMISSION_DENIED),
            (issue("core", "core-other"), grpc.StatusCode.PERMISSION_DENIED),
            (None, grpc.StatusCode.UNAUTHENTICATED),
        ):
            async with core.channel(identity=identity) as ch:
                stub = core_pb2_grpc.CoreStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.GetGatewayDirectory(core_pb2.GetGatewayDirectoryRequest())
                assert info.value.code() is code
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.GetDevice(core_pb2.GetDeviceRequest(device_id="cam-any"))
                assert info.value.code() is code
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in stub.WatchRevocations(core_pb2.WatchRevocationsRequest()):
                        pass
                assert info.value.code() is code
        async with core.channel(identity=issue("gateway", "gw-esc")) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await core_pb2_grpc.CoreStub(ch).Escalate(core_pb2.EscalationRequest())
            assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_directory_announce_and_device_facts(
    pki_dir: Path, tmp_path: Path, issue: IssueFn
) -> None:
    static = [{"id": "gw-static", "region": "eu-west", "grpc_address": "10.0.0.1:7000"}]
    async with running_core(pki_dir, tmp_path, gateways=static) as core:
        device = await enrol(core, tmp_path)
        gateway = issue("gateway", "gw-west")
        async with core.channel(identity=gateway) as ch:
            stub = core_pb2_grpc.CoreStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.AnnounceGateway(
                    common_pb2.GatewayEntry(
                        gateway_id="gw-other", region="west", grpc_address="127.0.0.1:9000"
                    )
                )
            assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
            await stub.AnnounceGateway(
                common_pb2.GatewayEntry(
                    region="west", grpc_address="127.0.0.1:9000", mqtt_address="127.0.0.1:8883"
                )
            )
            signed = await stub.GetGatewayDirectory(core_pb2.GetGatewayDirectoryRequest())
            info_ = await stub.GetDevice(core_pb2.GetDeviceRequest(device_id=device.device_id))
            assert (info_.device_type, info_.region, info_.status) == (
                "pet-camera",
                "home",
                "active",
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetDevice(core_pb2.GetDeviceRequest(device_id="cam-missing"))
            assert info.value.code() is grpc.StatusCode.NOT_FOUND
        now = dt.datetime.now(dt.UTC)
        directory = parse_gateway_directory(
            signed.SerializeToString(),
            ca_bundle_pem=core.ca_bundle_pem,
            trust_domain="test.example",
            now=now,
        )
        assert {(g.gateway_id, g.region) for g in directory.gateways} == {
            ("gw-static", "eu-west"),
            ("gw-west", "west"),
        }
        payload = common_pb2.GatewayDirectoryPayload.FromString(signed.payload)
        payload.gateways[0].grpc_address = "203.0.113.66:7000"
        tampered = common_pb2.SignedGatewayDirectory(
            payload=payload.SerializeToString(),
            signature=signed.signature,
            signer_certificate_pem=signed.signer_certificate_pem,
        )
        with pytest.raises(pki.SignatureInvalid):
            pki.verify_signed_payload(
                tampered.payload,
                tampered.signature,
                tampered.signer_certificate_pem.encode(),
                ca_bundle_pem=core.ca_bundle_pem,
                now=now,
            )


async def test_watch_revocations_resumes_without_gaps_or_repeats(
    pki_dir: Path, tmp_path: Path, issue: IssueFn
) -> None:
    async with running_core(pki_dir, tmp_path, feed_heartbeat_s=0.3) as core:
        devices = [unique_id() for _ in range(6)]
        for d in devices:
            core.registry.upsert_device(
                d, type="pet-camera", region="home", now=dt.datetime.now(dt.UTC)
            )
        for d in devices[:2]:
            core.server.revoke_device(d)
        gateway = issue("gateway", "gw-feed")
        seen: list[int] = []

        async def watch(since: int, count: int) -> None:
            async with core.channel(identity=gateway) as ch:
                stream = core_pb2_grpc.CoreStub(ch).WatchRevocations(
                    core_pb2.WatchRevocationsRequest(since_sequence=since)
                )
                got = 0
                async with asyncio.timeout(10):
                    async for event in stream:
                        if event.heartbeat:
                            continue
                        seen.append(event.sequence)
                        got += 1
                        if got == count:
                            stream.cancel()
                            return

        await watch(0, 1)  # disconnect after the first event
        for d in devices[2:4]:
            core.server.revoke_device(d)
        await watch(seen[-1], 3)
        # Live: a revocation made while the stream is open arrives within a second.
        task = asyncio.create_task(watch(seen[-1], 2))
        await asyncio.sleep(0.2)
        started = asyncio.get_running_loop().time()
        core.server.revoke_device(devices[4])
        core.server.revoke_device(devices[5])
        await task
        assert asyncio.get_running_loop().time() - started < 1.0
        assert seen == list(range(1, 7))


async def test_heartbeats_keep_a_quiet_feed_alive(
    pki_dir: Path, tmp_path: Path, issue: IssueFn
) -> None:
    gateway = issue("gateway", "gw-beat")
    async with (
        running_core(pki_dir, tmp_path, feed_heartbeat_s=0.1) as core,
        core.channel(identity=gateway) as ch,
    ):
        stream = core_pb2_grpc.CoreStub(ch).WatchRevocations(core_pb2.WatchRevocationsRequest())
        beats = 0
        async with asyncio.timeout(5):
            async for event in stream:
                assert event.heartbeat
                assert not event.device_id
                beats += 1
                if beats == 3:
                    break
        stream.cancel()


@pytest.mark.slow
async def test_revoke_from_another_process_reaches_the_feed_and_crl(
    tmp_path: Path, issue: IssueFn
) -> None:
    pki_dir = tmp_path / "pki"
    pki.init_pki(pki_dir, trust_domain="test.example")
    gateway = pki.issue_identity(pki_dir, tmp_path / "gw", role=pki.Role.GATEWAY, id="gw-cli")
    async with running_core(pki_dir, tmp_path, shared_registry=True) as core:
        result = await enrol(core, tmp_path, "cam-cli")
        async with core.channel(identity=gateway) as ch:
            stream = core_pb2_grpc.CoreStub(ch).WatchRevocations(core_pb2.WatchRevocationsRequest())
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                "from edgeward.cli import main; main()",
                "pki",
                "revoke",
                "--dir",
                str(pki_dir),
                "--device-id",
                "cam-cli",
                "--reason",
                "lost",
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            _out, err = await proc.communicate()
            assert proc.returncode == 0, err
            async with asyncio.timeout(5):
                async for event in stream:
                    if not event.heartbeat:
                        break
            stream.cancel()
        assert (event.device_id, event.reason, event.serial) == ("cam-cli", "lost", "")
        async with core.channel() as ch:
            crl = await enrollment_pb2_grpc.EnrollmentStub(ch).GetCrl(
                enrollment_pb2.GetCrlRequest()
            )
        from cryptography import x509

        parsed = x509.load_der_x509_crl(crl.device_crl_der)  # a device's: the device CA's CRL
        assert parsed.get_revoked_certificate_by_serial_number(int(result.serial, 16)) is not None
        assert crl.revocation_sequence == 1


async def test_unreachable_core_is_reported_clearly(pki_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(EnrollmentUnavailable):
        await sdk.enroll(
            endpoint="127.0.0.1:1",
            ca_bundle_pem=pki.PkiLayout(pki_dir).ca_bundle.read_bytes(),
            token="cam-nowhere.secret",
            out_dir=tmp_path / "nowhere",
            timeout_s=2,
        )
    with pytest.raises(EnrollmentRefused, match="malformed"):
        await sdk.enroll(
            endpoint="127.0.0.1:1",
            ca_bundle_pem=b"",
            token="no-device-id",
            out_dir=tmp_path / "nowhere",
        )


async def test_an_unwritable_identity_directory_leaves_the_token_unused(
    pki_dir: Path, tmp_path: Path
) -> None:
    """The token is spent when the core answers, so the device checks first that it can
    store the answer: a failed write must not burn the token or leave an orphan certificate."""
    async with running_core(pki_dir, tmp_path) as core:
        token = core.token("cam-unwritable")
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("a file where the directory should go")
        with pytest.raises(IdentityNotWritable, match="token is still unused"):
            await sdk.enroll(
                endpoint=core.enrol_address,
                ca_bundle_pem=core.ca_bundle_pem,
                token=token,
                out_dir=blocker / "cam-unwritable",
            )
        assert core.registry.get_device("cam-unwritable") is None
        result = await sdk.enroll(
            endpoint=core.enrol_address,
            ca_bundle_pem=core.ca_bundle_pem,
            token=token,
            out_dir=tmp_path / "cam-unwritable",
        )
        assert result.device_id == "cam-unwritable"
