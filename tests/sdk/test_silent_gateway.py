"""A gateway gone silent (power lost, a dropped NAT entry, a hung host: nothing answers and
nothing closes) is noticed by the device's keepalive, at both transports, and the gateway
does not take the device's keepalive pings for a flood.

Real gateways in process (real model, real mutual TLS), the real managed Mosquitto, and a TCP
relay in front of the gateway in use that goes silent without closing anything
(:class:`FreezingProxy`). The timers are the product's, scaled down by the same factor on
both ends, so the tests run in seconds; the SDK's own slower bounds (``call_timeout_s``, the
probe interval) are set out of reach, so that only the keepalive can notice.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import grpc
import pytest

import device_sdk._grpc as sdk_grpc
import device_sdk._mqtt as sdk_mqtt
import gateway._grpc._server as gateway_server
import pki
from device_sdk import (
    ClientOptions,
    DetectionResult,
    DeviceClient,
    FrameOutcome,
    GatewayInfo,
    Transport,
)
from device_sdk._grpc import ChannelPool, GatewayDown
from device_sdk._mqtt import MqttSession
from protos.edgeward.v1 import gateway_pb2
from tests._support.gateway import RunningGateway, start_gateway
from tests._support.mqtt import BrokerHarness
from tests.conftest import PHOTOS, IssueFn, require_tool
from tests.gateway.test_core_failover import FreezingProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CHELSEA = (PHOTOS / "chelsea.jpg").read_bytes()

#: Product timers divided by this in the tests (both ends alike, so every ratio holds).
SCALE = 20

#: The scaled ping deadline: not shorter than a loaded machine answers a ping in.
PING_TIMEOUT_MS = 1000

#: The transport options before the fix: keepalive time and timeout only. The timeout is not
#: enforced by the installed gRPC, so an unanswered ping closed nothing for 60 s.
_OLD_KEYS = ("grpc.http2.ping_timeout_ms", "grpc.http2.max_pings_without_data")


def _scaled_channel_options(*, old: bool = False) -> tuple[tuple[str, int], ...]:
    timers = {
        "grpc.keepalive_time_ms": sdk_grpc.KEEPALIVE_TIME_MS // SCALE,
        "grpc.keepalive_timeout_ms": PING_TIMEOUT_MS,
        "grpc.http2.ping_timeout_ms": PING_TIMEOUT_MS,
    }
    return tuple(
        (key, timers.get(key, value))
        for key, value in sdk_grpc.CHANNEL_OPTIONS
        if not (old and key in _OLD_KEYS)
    )


@pytest.fixture
def scaled_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's ping policy scaled like the device's timers."""
    monkeypatch.setattr(
        gateway_server, "MIN_PING_INTERVAL_MS", gateway_server.MIN_PING_INTERVAL_MS // SCALE
    )


@asynccontextmanager
async def _gateways(
    issue: IssueFn, tmp_path: Path, device_id: str, *ids: str
) -> AsyncIterator[list[RunningGateway]]:
    async with AsyncExitStack() as stack:
        gateways = []
        for gateway_id in ids:
            gw = await stack.enter_async_context(
                start_gateway(
                    issue=issue, tmp_path=tmp_path, gateway_id=gateway_id, use_registry=False
                )
            )
            gw.register(device_id, "pet_camera")
            gateways.append(gw)
        yield gateways


async def _wait_for(predicate: Callable[[], bool], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - polls state another task updates
            await asyncio.sleep(0.05)


# -- gRPC: failover from a silent gateway ------------------------------------------------------


_CASES = {
    "stream": ("fixed", Transport.GRPC_STREAM),
    "stream-old-options": ("old", Transport.GRPC_STREAM),
    "unary": ("fixed", Transport.GRPC),
}


@pytest.mark.parametrize("case", list(_CASES))
async def test_a_silent_gateway_is_left_within_the_keepalive_bound(
    issue: IssueFn,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scaled_server: None,
    case: str,
) -> None:
    """A device sending frames to the nearer gateway, which goes silent mid-stream: the calls
    on the connection (the frame stream or the unary calls in flight, and the event stream)
    fail once a keepalive ping goes unanswered, the device fails over, and every frame
    (those in flight on the silent connection too) is answered by the other gateway. The
    control, the options before the fix, has not noticed after four times the bound (gRPC's
    own ping deadline, 60 s, is what would end it)."""
    recipe, transport = _CASES[case]
    old = recipe == "old"
    monkeypatch.setattr(sdk_grpc, "CHANNEL_OPTIONS", _scaled_channel_options(old=old))
    bound_s = (sdk_grpc.KEEPALIVE_TIME_MS / SCALE + PING_TIMEOUT_MS) / 1000
    device = issue("device", "cam-silent")
    # The device's region decides between gateways equally near (the relay adds a little).
    metadata = {**device.read_metadata(), "region": "home"}
    device.metadata.write_text(json.dumps(metadata))
    async with (
        _gateways(issue, tmp_path, "cam-silent", "gw-near", "gw-far") as (near, far),
        FreezingProxy(near.address).running() as relay,
    ):
        entries = [
            GatewayInfo("gw-near", "home", relay.address),
            GatewayInfo("gw-far", "away", far.address),
        ]
        options = ClientOptions(
            gateways=entries,
            transport=transport,
            # Equally near by the margin: the one of the device's region is used.
            tie_margin_s=5.0,
            probe_timeout_s=10.0,
            # The SDK's slower bounds out of reach: only the keepalive may notice.
            call_timeout_s=120.0,
            probe_interval_s=120.0,
            max_in_flight=2,
        )
        outcomes: list[FrameOutcome] = []
        sent: list[str] = []
        async with DeviceClient(device.directory, options) as client:
            assert client.gateway == entries[0]

            async def collect() -> None:
                async for outcome in client.results():
                    outcomes.append(outcome)

            camera_off = asyncio.Event()

            async def camera() -> None:
                n = 0
                while not camera_off.is_set():
                    sent.append(await client.submit(CHELSEA, frame_id=f"f-{n:04d}"))
                    n += 1
                    await asyncio.sleep(0.1)

            def answered_by(gateway_id: str) -> int:
                return sum(
                    isinstance(o, DetectionResult) and o.gateway_id == gateway_id for o in outcomes
                )

            async with asyncio.TaskGroup() as tg:
                collector = tg.create_task(collect())
                producer = tg.create_task(camera())
                await _wait_for(lambda: answered_by("gw-near") >= 3, 30)
                relay.freeze()
                frozen_at = time.monotonic()
                if old:
                    # Four times the bound: still waiting on the silent gateway.
                    with pytest.raises(TimeoutError):
                        await _wait_for(lambda: answered_by("gw-far") > 0, 4 * bound_s + 5)
                    assert client.gateway == entries[0]
                    camera_off.set()
                    collector.cancel()
                    return
                # Far below gRPC's own 60 s; generous for a loaded 2-core machine.
                await _wait_for(lambda: answered_by("gw-far") > 0, 4 * bound_s + 5)
                took_s = time.monotonic() - frozen_at
                camera_off.set()
                await producer
                assert client.gateway == entries[1]
                assert client.stats().failovers >= 1
                assert await client.flush(timeout_s=30)
                await asyncio.sleep(0.1)
                collector.cancel()
    print(f"failover after {took_s:.2f} s (bound {bound_s:.2f} s scaled)")
    # Every frame submitted has exactly one answer, none lost to the silent stream.
    assert sorted(o.frame_id for o in outcomes) == sorted(sent)
    assert all(isinstance(o, DetectionResult) for o in outcomes)


# -- gRPC: the gateway accepts the device's pings ----------------------------------------------


@pytest.mark.parametrize("pace", ["sdk", "too-fast"])
async def test_an_idle_device_is_not_disconnected_for_its_pings(
    issue: IssueFn,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scaled_server: None,
    pace: str,
) -> None:
    """The event stream of a device with nothing to send or receive stays open for many
    keepalive intervals: the gateway takes the SDK's ping rate. The control, a gateway
    whose minimum is above the device's pace, cuts it off with ``too_many_pings``, so the
    first case would see it too."""
    options = dict(_scaled_channel_options())
    monkeypatch.setattr(sdk_grpc, "CHANNEL_OPTIONS", tuple(options.items()))
    if pace == "too-fast":
        # gRPC's client does not ping more than once a second: the gateway's minimum is
        # raised above the device's pace instead of the pace below the minimum.
        monkeypatch.setattr(
            gateway_server, "MIN_PING_INTERVAL_MS", 2 * options["grpc.keepalive_time_ms"]
        )
    device = issue("device", "cam-idle")
    async with _gateways(issue, tmp_path, "cam-idle", "gw-idle") as (gw,):
        creds = pki.grpc_channel_credentials(
            ca_bundle_pem=device.ca_bundle.read_bytes(), identity=device
        )
        pool = ChannelPool(creds)
        try:
            async with asyncio.timeout(30):
                await pool.get(gw.address, "gw-idle").channel_ready()
            call = pool.stub(gw.address, "gw-idle").Subscribe(gateway_pb2.SubscribeRequest())
            idle_s = 6 * sdk_grpc.KEEPALIVE_TIME_MS / 1000 / SCALE  # six pings at the SDK's pace
            # A read is the call itself in grpc.aio: cancelling it would end the call.
            reading = asyncio.ensure_future(call.read())
            done, _ = await asyncio.wait({reading}, timeout=idle_s)
            if pace == "sdk":
                assert not done, "the gateway ended an idle device's stream"
                assert not call.done()
            else:
                assert done, "pings faster than the gateway's minimum were accepted"
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    reading.result()
                assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
                said = f"{ended.value.details()} {ended.value.debug_error_string()}".lower()
                assert "too_many_pings" in said or "too many pings" in said, said
            reading.cancel()
            call.cancel()
        finally:
            await pool.close()


def test_the_sdk_pings_no_faster_than_the_gateway_accepts() -> None:
    """The product values themselves, with slack for timers: twice the server's minimum."""
    assert sdk_grpc.KEEPALIVE_TIME_MS >= 2 * gateway_server.MIN_PING_INTERVAL_MS
    options = dict(sdk_grpc.CHANNEL_OPTIONS)
    assert options["grpc.keepalive_time_ms"] == sdk_grpc.KEEPALIVE_TIME_MS
    assert options["grpc.http2.ping_timeout_ms"] == sdk_grpc.KEEPALIVE_TIMEOUT_MS
    assert options["grpc.http2.max_pings_without_data"] == 0


# -- MQTT: a silent broker -------------------------------------------------------------------


@pytest.mark.parametrize("keepalive", ["sdk", "old"])
async def test_a_silent_broker_ends_the_mqtt_session_within_the_keepalive_bound(
    issue: IssueFn,
    pki_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    keepalive: str,
) -> None:
    """An MQTT session through a relay that goes silent ends with ``GatewayDown`` (so the
    client fails over) within two keepalive intervals: paho sends PINGREQ after one interval
    without traffic and gives up when no PINGRESP came in another. The control, the old
    keepalive (30 s), is still connected after several times the bound."""
    require_tool("mosquitto")
    # paho counts whole seconds: the product's interval divided like the gRPC timers, at
    # least 1 s.
    interval_s = max(sdk_mqtt.MQTT_KEEPALIVE_S // SCALE, 1) if keepalive == "sdk" else 30
    monkeypatch.setattr(sdk_mqtt, "MQTT_KEEPALIVE_S", interval_s)
    bound_s = 2 * max(sdk_mqtt.MQTT_KEEPALIVE_S // SCALE, 1) + 1
    harness = BrokerHarness(
        pki_dir=pki_dir, gateway=issue("gateway", "gw-mqtt-silent"), data_dir=tmp_path / "mqtt"
    )
    device = issue("device", "cam-mqtt-silent")
    async with (
        harness.run(),
        FreezingProxy(f"127.0.0.1:{harness.port}").running() as relay,
    ):
        entry = GatewayInfo("gw-mqtt-silent", "home", "127.0.0.1:1", relay.address)
        session = MqttSession(
            device_id="cam-mqtt-silent",
            gateway=entry,
            ssl_context=pki.client_ssl_context(
                device, server_name=pki.gateway_server_name("gw-mqtt-silent")
            ),
            connect_timeout_s=10.0,
            on_event=lambda _event: None,
        )
        stop = asyncio.Event()
        running = asyncio.ensure_future(session.run(stop))
        try:
            async with asyncio.timeout(30):
                await session.ready.wait()
            relay.freeze()
            frozen_at = time.monotonic()
            if keepalive == "old":
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(4 * bound_s + 5):
                        await asyncio.shield(running)
                assert session.ready.is_set()
            else:
                with pytest.raises(GatewayDown, match="MQTT"):
                    async with asyncio.timeout(4 * bound_s + 5):
                        await running
                took_s = time.monotonic() - frozen_at
                print(f"MQTT session ended after {took_s:.2f} s (bound {bound_s} s)")
        finally:
            stop.set()
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
