"""The gateway fed by a real core: device facts from ``GetDevice``, revocations from
``WatchRevocations`` over mutual TLS, and what happens when the core goes away."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import grpc
import pytest

import pki
from protos.edgeward.v1 import common_pb2
from tests._support.core import running_core, unique_id
from tests._support.gateway import start_gateway
from tests.gateway._helpers import rpc_error, trailing

pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]


def chelsea(photos: Path) -> common_pb2.Frame:
    return common_pb2.Frame(image=(photos / "chelsea.jpg").read_bytes(), frame_id="c")


async def test_core_fed_gateway_authorises_and_cuts_on_revocation(issue, pki_dir, tmp_path, photos):
    async with running_core(pki_dir, tmp_path, feed_heartbeat_s=0.2) as core:
        cam = unique_id("cam")
        core.registry.upsert_device(
            cam, type="pet-camera", region="home", now=dt.datetime.now(dt.UTC)
        )
        overrides = {"core_address": core.address, "pki_dir": None}
        async with start_gateway(
            issue=issue, tmp_path=tmp_path, gateway_id="gw-core", overrides=overrides
        ) as gw:
            assert gw.service.revocation.healthy()
            queue: asyncio.Queue[common_pb2.Frame | None] = asyncio.Queue()

            async def frames():
                while (item := await queue.get()) is not None:
                    yield item

            async with gw.channel(issue("device", cam)) as channel:
                stream = gw.stub(channel).StreamDetect(frames(), timeout=30)  # pet camera: allowed
                await queue.put(chelsea(photos))
                assert "Cat" in {d.label for d in (await stream.read()).detections}
                loop = asyncio.get_running_loop()
                started = loop.time()
                pki.revoke_device(core.registry, cam, reason="stolen", now=dt.datetime.now(dt.UTC))
                err = await rpc_error(stream.read())
                elapsed = loop.time() - started
                assert err.code() is grpc.StatusCode.PERMISSION_DENIED
                assert trailing(err).get("edgeward-final") == "revoked"
                assert elapsed < 1.0
                err = await rpc_error(gw.stub(channel).Detect(chelsea(photos), timeout=5))
                assert trailing(err).get("edgeward-final") == "revoked"
                await queue.put(None)


async def test_losing_the_core_makes_the_gateway_refuse_new_sessions(
    issue, pki_dir, tmp_path, photos
):
    overrides = {"revocation_max_staleness_s": 0.8, "pki_dir": None}
    async with running_core(pki_dir, tmp_path, feed_heartbeat_s=0.2) as core:
        overrides["core_address"] = core.address
        cam = unique_id("cam")
        core.registry.upsert_device(
            cam, type="pet-camera", region="home", now=dt.datetime.now(dt.UTC)
        )
        gateway_cm = start_gateway(
            issue=issue, tmp_path=tmp_path, gateway_id="gw-lonely", overrides=overrides
        )
        gw = await gateway_cm.__aenter__()
        try:
            async with gw.channel(issue("device", cam)) as channel:
                assert (await gw.stub(channel).Detect(chelsea(photos), timeout=10)).detections
        except BaseException:
            await gateway_cm.__aexit__(None, None, None)
            raise
    try:
        # The core is gone: after the bound, new sessions are refused.
        await asyncio.sleep(1.2)
        assert not gw.service.revocation.healthy()
        async with gw.channel(issue("device", cam)) as channel:
            err = await rpc_error(gw.stub(channel).Detect(chelsea(photos), timeout=5))
        assert err.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await gateway_cm.__aexit__(None, None, None)


async def test_a_gateway_announces_itself_into_the_signed_directory(issue, pki_dir, tmp_path):
    """Devices find gateways in the signed directory: a gateway with a core announces its own
    address (identity from its certificate), and a wildcard listen without an advertised
    address announces nothing."""
    async with running_core(pki_dir, tmp_path, feed_heartbeat_s=0.2) as core:
        overrides = {"core_address": core.address, "pki_dir": None, "region": "kr-seoul"}
        async with start_gateway(
            issue=issue, tmp_path=tmp_path, gateway_id="gw-announce", overrides=overrides
        ) as gw:
            for _ in range(100):
                listed = {g.id: g for g in core.registry.list_gateways()}
                if "gw-announce" in listed:
                    break
                await asyncio.sleep(0.05)
            entry = listed["gw-announce"]
            assert entry.region == "kr-seoul"
            assert entry.grpc_address == f"127.0.0.1:{gw.service.grpc_port}"
        wildcard = {**overrides, "listen": "0.0.0.0:0"}
        async with start_gateway(
            issue=issue, tmp_path=tmp_path, gateway_id="gw-wild", overrides=wildcard
        ):
            await asyncio.sleep(0.5)
            assert "gw-wild" not in {g.id for g in core.registry.list_gateways()}
