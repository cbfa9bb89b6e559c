"""Revoking gateways and cores over real TLS: the core refuses a revoked gateway on every Core
method, cuts its open revocation stream, keeps server revocations off the device feed, serves
them in the CRL, and replaces its own certificate when it is revoked."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import structlog
from cryptography import x509

import pki
from protos.edgeward.v1 import common_pb2, core_pb2, core_pb2_grpc, enrollment_pb2_grpc
from protos.edgeward.v1.enrollment_pb2 import GetCrlRequest
from tests._support.core import RunningCore, running_core, unique_id


def recorded_gateway(core: RunningCore, tmp_path: Path, gateway_id: str) -> pki.IdentityFiles:
    """A gateway identity recorded in the core's registry, as 'pki issue-server' records it."""
    return pki.issue_identity(
        core.pki_dir,
        tmp_path / f"{gateway_id}-{unique_id('id')}",
        role=pki.Role.GATEWAY,
        id=gateway_id,
        dns_names=("localhost",),
        ip_addresses=("127.0.0.1",),
        registry=core.registry,
    )


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def serial_of(files: pki.IdentityFiles) -> str:
    return pki.serial_hex(files.certificate().serial_number)


async def every_core_method(stub: core_pb2_grpc.CoreStub) -> dict[str, grpc.StatusCode]:
    """The status each Core method answers (OK when it succeeds)."""

    async def code(call: object) -> grpc.StatusCode:
        try:
            await call  # type: ignore[misc]
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    async def stream_code() -> grpc.StatusCode:
        call = stub.WatchRevocations(core_pb2.WatchRevocationsRequest(), timeout=5)
        try:
            async for _ in call:
                return grpc.StatusCode.OK  # the first heartbeat: the stream is open
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        finally:
            call.cancel()
        return grpc.StatusCode.OK

    return {
        "GetGatewayDirectory": await code(
            stub.GetGatewayDirectory(core_pb2.GetGatewayDirectoryRequest(), timeout=5)
        ),
        "GetDevice": await code(
            stub.GetDevice(core_pb2.GetDeviceRequest(device_id="cam-absent"), timeout=5)
        ),
        "AnnounceGateway": await code(
            stub.AnnounceGateway(
                common_pb2.GatewayEntry(region="home", grpc_address="127.0.0.1:9"), timeout=5
            )
        ),
        "Escalate": await code(stub.Escalate(core_pb2.EscalationRequest(), timeout=5)),
        "WatchRevocations": await stream_code(),
    }


async def test_revoked_gateway_is_refused_on_every_core_method(
    pki_dir: Path, tmp_path: Path
) -> None:
    async with running_core(pki_dir, tmp_path) as core:
        gateway = recorded_gateway(core, tmp_path, "gw-every")
        async with core.channel(identity=gateway) as ch:
            before = await every_core_method(core_pb2_grpc.CoreStub(ch))
        assert before == {
            "GetGatewayDirectory": grpc.StatusCode.OK,
            "GetDevice": grpc.StatusCode.NOT_FOUND,
            "AnnounceGateway": grpc.StatusCode.OK,
            "Escalate": grpc.StatusCode.UNIMPLEMENTED,
            "WatchRevocations": grpc.StatusCode.OK,
        }
        core.server.revoke_serial(serial_of(gateway), reason="host compromised")
        with structlog.testing.capture_logs() as logs:
            async with core.channel(identity=gateway) as ch:
                after = await every_core_method(core_pb2_grpc.CoreStub(ch))
        assert set(after.values()) == {grpc.StatusCode.PERMISSION_DENIED}, after
        refused = [e for e in logs if e.get("event") == "gateway.refused"]
        # Every method's refusal is audited (the stream opened before the revocation may be
        # cut while this runs and be audited a second time).
        assert {e["method"] for e in refused} == set(after)
        assert all(e["audit"] is True and e["gateway_id"] == "gw-every" for e in refused)
        assert all(e["serial"] == serial_of(gateway) for e in refused)
        # A new certificate for the same gateway (issued after the revocation) is accepted,
        # and so is a gateway certificate the registry never recorded.
        fresh = recorded_gateway(core, tmp_path, "gw-every")
        unrecorded = pki.issue_identity(
            pki_dir,
            tmp_path / "gw-unrecorded",
            role=pki.Role.GATEWAY,
            id="gw-every",
            ip_addresses=("127.0.0.1",),
        )
        for files in (fresh, unrecorded):
            async with core.channel(identity=files) as ch:
                await core_pb2_grpc.CoreStub(ch).GetGatewayDirectory(
                    core_pb2.GetGatewayDirectoryRequest(), timeout=5
                )


@contextlib.asynccontextmanager
async def open_stream(
    core: RunningCore, gateway: pki.IdentityFiles
) -> AsyncIterator[grpc.aio.UnaryStreamCall[object, core_pb2.RevocationEvent]]:
    """A WatchRevocations stream that has delivered its first heartbeat (replay done)."""
    async with core.channel(identity=gateway) as ch:
        call = core_pb2_grpc.CoreStub(ch).WatchRevocations(core_pb2.WatchRevocationsRequest())
        async with asyncio.timeout(10):
            while not (await call.read()).heartbeat:  # type: ignore[union-attr]
                pass
        try:
            yield call  # type: ignore[misc]
        finally:
            call.cancel()


async def drain(call: object) -> None:
    async with asyncio.timeout(5):
        while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
            pass


async def ended_within(call: object, *, revoke: object) -> tuple[float, grpc.StatusCode, str]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    revoke()  # type: ignore[operator]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await drain(call)
    return loop.time() - started, info.value.code(), info.value.details() or ""


@pytest.mark.parametrize("how", ["gateway-id in process", "serial from the registry file"])
async def test_open_stream_of_a_revoked_gateway_ends_within_a_second(
    how: str, pki_dir: Path, tmp_path: Path
) -> None:
    async with running_core(pki_dir, tmp_path, feed_heartbeat_s=30) as core:
        gateway = recorded_gateway(core, tmp_path, "gw-cut")
        bystander = recorded_gateway(core, tmp_path, "gw-stays")
        if how.startswith("gateway-id"):

            def revoke() -> None:
                core.server.revoke_gateway("gw-cut", reason="stolen")
        else:
            # What 'edgeward pki revoke' in another process does: only the registry changes,
            # and the core's feed polls it.
            def revoke() -> None:
                with pki.SqliteRegistry(core.registry.path) as other:
                    pki.revoke_serial(other, serial_of(gateway), reason="stolen", now=utcnow())

        async with open_stream(core, gateway) as call, open_stream(core, bystander) as other:
            took, code, details = await ended_within(call, revoke=revoke)
            assert code is grpc.StatusCode.PERMISSION_DENIED
            assert "revoked" in details
            assert took < 1.0
            # The other gateway's stream stays open and is not told about a server revocation
            # as if it were a device's; the next device revocation still reaches it.
            device = unique_id()
            core.registry.upsert_device(device, type="pet-camera", region="home", now=utcnow())
            core.server.revoke_device(device, reason="lost")
            async with asyncio.timeout(5):
                event = await other.read()
                while event.heartbeat:  # type: ignore[union-attr]
                    event = await other.read()
            assert event.device_id == device  # type: ignore[union-attr]
            assert event.sequence == core.registry.last_sequence()  # type: ignore[union-attr]


async def test_revoked_gateway_certificates_are_in_the_served_crl(
    pki_dir: Path, tmp_path: Path
) -> None:
    async with running_core(pki_dir, tmp_path) as core:
        gateways = [recorded_gateway(core, tmp_path, "gw-crl") for _ in range(2)]
        core.server.revoke_gateway("gw-crl", reason="retired")
        async with core.channel() as ch:
            reply = await enrollment_pb2_grpc.EnrollmentStub(ch).GetCrl(GetCrlRequest(), timeout=5)
        crl = x509.load_der_x509_crl(reply.crl_der)
        assert reply.revocation_sequence == core.registry.last_sequence()
        for files in gateways:
            serial = files.certificate().serial_number
            assert crl.get_revoked_certificate_by_serial_number(serial) is not None


async def test_core_records_its_certificate_and_replaces_it_when_revoked(
    pki_dir: Path, tmp_path: Path
) -> None:
    settings = {
        "identity_dir": tmp_path / "core-id",
        "registry": tmp_path / "core-registry.sqlite3",
    }
    async with running_core(pki_dir, tmp_path, **settings) as core:
        first = core.server.identity.certificate()
        serial = pki.serial_hex(first.serial_number)
        record = core.registry.get_server_certificate(serial)
        assert record is not None
        assert (record.role, record.server_id) == (pki.Role.CORE, "core-1")
    async with running_core(pki_dir, tmp_path, **settings) as core:  # kept across restarts
        assert core.server.identity.certificate().serial_number == first.serial_number
        core.server.revoke_serial(serial, reason="key exposed")
    async with running_core(pki_dir, tmp_path, **settings) as core:  # revoked: issued again
        second = core.server.identity.certificate()
        assert second.serial_number != first.serial_number
        assert core.registry.get_server_certificate(pki.serial_hex(second.serial_number))
