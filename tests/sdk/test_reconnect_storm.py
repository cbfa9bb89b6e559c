"""A fleet cut off at once (a gateway restart) comes back spread out, and loses nothing.

While no gateway answers, each SDK client probes after a pause drawn with full jitter under a
ceiling that doubles per round (``offline_pause``), so a fleet's reconnects spread over the
pause instead of arriving as one storm of TLS handshakes. The end-to-end tests restart a real
gateway (over gRPC; over MQTT with its managed broker) under real SDK clients holding
``Subscribe`` streams and frames in their outboxes: every client comes back, every frame is
answered, none refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

import pki
from device_sdk import ClientOptions, ClientState, DeviceClient, GatewayInfo, Transport
from device_sdk._selection import offline_pause
from edgeward._stack import free_port
from tests._support.gateway import start_gateway
from tests._support.mqtt import mqtt_gateway, standalone_pki
from tests.conftest import PHOTOS, IssueFn, require_tool

DEVICES = 24
IMAGE = (PHOTOS / "chelsea.jpg").read_bytes()


def test_offline_pauses_are_spread_over_a_growing_ceiling() -> None:
    base, cap = 1.0, 15.0
    fleet = [random.Random(seed) for seed in range(2000)]
    first = [offline_pause(0, base_s=base, max_s=cap, rng=r) for r in fleet]
    # Spread over the whole first interval, not bunched near it: every quarter gets its share.
    for q in range(4):
        share = sum(q * base / 4 <= p < (q + 1) * base / 4 for p in first) / len(first)
        assert 0.18 < share < 0.32, (q, share)
    for rounds in range(10):
        ceiling = min(cap, base * 2**rounds)
        pauses = [offline_pause(rounds, base_s=base, max_s=cap, rng=r) for r in fleet]
        assert all(0.0 <= p <= ceiling for p in pauses)
        assert max(pauses) > 0.9 * ceiling  # the ceiling grows while the outage lasts
    # Far into an outage the pause stays under the cap.
    assert offline_pause(1000, base_s=base, max_s=cap, rng=fleet[0]) <= cap


def _options(address: str, *, mqtt: str = "", gateway_id: str = "gw-test") -> ClientOptions:
    return ClientOptions(
        transport=Transport.MQTT if mqtt else Transport.GRPC,
        gateways=[GatewayInfo(gateway_id, "home", address, mqtt)],
        probe_interval_s=0.5,
        offline_probe_interval_s=0.2,
        offline_probe_max_s=2.0,
        probe_timeout_s=2.0,
        down_for_s=0.3,
        call_timeout_s=20.0,
    )


async def _live_subscribers(gw: object, want: int, timeout_s: float) -> int:
    seen = -1
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while True:
                text = gw.metrics_text()  # type: ignore[attr-defined]
                seen = sum(
                    int(float(line.split()[-1]))
                    for line in text.splitlines()
                    if line.startswith("edgeward_gateway_live_streams")
                    and 'method="Subscribe"' in line
                )
                if seen >= want:
                    return seen
                await asyncio.sleep(0.2)
    return seen


async def test_a_fleet_comes_back_after_a_gateway_restart_and_loses_no_frame(
    issue: IssueFn, tmp_path: Path
) -> None:
    port = free_port()
    overrides = {"listen": f"127.0.0.1:{port}"}
    address = f"127.0.0.1:{port}"
    identities = [issue("device", f"storm-{i:02d}") for i in range(DEVICES)]
    async with contextlib.AsyncExitStack() as clients:
        async with start_gateway(issue=issue, tmp_path=tmp_path, overrides=overrides) as gw:
            fleet = [
                await clients.enter_async_context(DeviceClient(i.directory, _options(address)))
                for i in identities
            ]
            for n, c in enumerate(fleet):
                await c.submit(IMAGE, frame_id=f"before-{n}")
            assert all(await asyncio.gather(*(c.flush(120) for c in fleet)))
            assert await _live_subscribers(gw, DEVICES, 60) == DEVICES
        # The gateway is gone: frames wait in each device's outbox.
        for n, c in enumerate(fleet):
            await c.submit(IMAGE, frame_id=f"during-{n}")
        async with start_gateway(issue=issue, tmp_path=tmp_path, overrides=overrides) as gw:
            assert all(await asyncio.gather(*(c.flush(180) for c in fleet)))
            assert await _live_subscribers(gw, DEVICES, 120) == DEVICES
            for c in fleet:
                st = c.stats()
                assert st.state is ClientState.RUNNING, (c.device_id, st.state)
                assert st.gateway_id == "gw-test"
                assert st.submitted == 2
                assert st.answered == 2, (c.device_id, st)
                assert st.rejected == 0
                assert st.queue.frames == 0


async def test_an_mqtt_fleet_comes_back_after_a_gateway_and_broker_restart(
    tmp_path: Path,
) -> None:
    """The same over MQTT: the restart takes the managed broker down too; every device's
    session comes back and every frame queued meanwhile is answered."""
    require_tool("mosquitto")
    pki_dir = standalone_pki(tmp_path)
    grpc_port, mqtt_port, bridge_port = free_port(), free_port(), free_port()
    ports = {"port": mqtt_port, "bridge_port": bridge_port}
    listen = f"127.0.0.1:{grpc_port}"
    identities = [
        pki.issue_identity(pki_dir, tmp_path / f"dev-{i}", role=pki.Role.DEVICE, id=f"mq-{i:02d}")
        for i in range(DEVICES // 2)
    ]
    opts = _options(listen, mqtt=f"127.0.0.1:{mqtt_port}", gateway_id="gw-mqtt-svc")
    async with contextlib.AsyncExitStack() as clients:
        async with mqtt_gateway(tmp_path, mqtt=ports, listen=listen):
            fleet = [
                await clients.enter_async_context(DeviceClient(i.directory, opts))
                for i in identities
            ]
            for n, c in enumerate(fleet):
                await c.submit(IMAGE, frame_id=f"before-{n}")
            assert all(await asyncio.gather(*(c.flush(120) for c in fleet)))
        for n, c in enumerate(fleet):
            await c.submit(IMAGE, frame_id=f"during-{n}")
        async with mqtt_gateway(tmp_path, mqtt=ports, listen=listen):
            assert all(await asyncio.gather(*(c.flush(180) for c in fleet)))
            for c in fleet:
                st = c.stats()
                assert st.state is ClientState.RUNNING, (c.device_id, st.state)
                assert st.gateway_id == "gw-mqtt-svc"
                assert (st.submitted, st.answered, st.rejected) == (2, 2, 0), st
                assert st.queue.frames == 0
