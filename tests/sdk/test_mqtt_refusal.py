"""A publication the broker refuses is "busy", at once, over the SDK's MQTT transport.

The managed broker's per-device ingest limit (the ``edgeward_ingest`` plugin) refuses what a
device sends beyond its bucket with PUBACK 0x87, and the message never reaches the gateway,
so no answer will ever come for it. Against the real broker with the plugin, the gateway's
real bridge and a device identity from our own PKI: the refused frame and the refused
telemetry raise :class:`Busy` (what ``RESOURCE_EXHAUSTED`` raises over gRPC) with the SDK's
retry-after, not :class:`GatewayDown` after the call's timeout (60 s here, so code that waits
for it fails on the error's type); a frame within the budget, in flight at the same time, is
still answered; and the device client keeps the refused items queued, backs off and sends
them again without failing over or being disconnected for flooding.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from device_sdk import ClientOptions, DetectionResult, DeviceClient, GatewayInfo, Telemetry
from device_sdk import Transport as SdkTransport
from device_sdk._grpc import MAX_RETRY_AFTER_S, Busy
from device_sdk._mqtt import (
    BROKER_REFUSAL_RETRY_AFTER_S,
    MqttSession,
    _PubAck,
    mqtt_ssl_context,
)
from gateway._mqtt import BUILT_PLUGIN, BrokerRefusal, IngestLimit, MqttBridge
from protos.edgeward.v1 import common_pb2
from protos.edgeward.v1.wire import RETRY_AFTER_METADATA_KEY
from tests._support.gateway import start_gateway
from tests._support.mqtt import BrokerHarness, FakeEngine, front_door
from tests.conftest import PHOTOS, IssueFn, require_tool
from tests.sdk.conftest import give_directory

pytestmark = pytest.mark.slow

JPEG = (PHOTOS / "chelsea.jpg").read_bytes()
#: Long enough that waiting for it (the old behaviour) ends in GatewayDown, never in Busy.
TIMEOUT_S = 60.0


def _require_plugin() -> None:
    require_tool("mosquitto")
    if not BUILT_PLUGIN.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{BUILT_PLUGIN} missing (scripts/setup.sh builds it)")
        pytest.skip("the ingest limit plugin is not built; run scripts/build_mqtt_plugin.sh")


async def _until(predicate: Callable[[], bool], *, timeout_s: float = 45.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - polling what the broker reported
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def _limited_broker(
    pki_dir: Path, issue: IssueFn, tmp_path: Path, limit: IngestLimit
) -> AsyncIterator[tuple[BrokerHarness, list[BrokerRefusal]]]:
    """The managed broker with the ingest limit, and the gateway's bridge behind it (its own
    budget generous: what the broker lets through is answered)."""
    _require_plugin()
    harness = BrokerHarness(
        pki_dir=pki_dir, gateway=issue("gateway", "gw-mqtt"), data_dir=tmp_path / "mqtt"
    )
    harness.ingest = limit
    reports: list[BrokerRefusal] = []
    async with (
        harness.run(),
        MqttBridge(
            harness.settings,
            connection=harness.bridge_connection(),
            door=front_door(FakeEngine(), gateway_id="gw-mqtt"),
        ) as bridge,
    ):
        assert harness.broker.ingest_plugin == BUILT_PLUGIN
        harness.broker.add_refusal_listener(reports.append)
        await bridge.wait_ready()
        yield harness, reports


def _refused(reports: list[BrokerRefusal], device_id: str) -> tuple[int, int]:
    mine = [r for r in reports if r.device_id == device_id]
    return sum(r.frames for r in mine), sum(r.other for r in mine)


async def _outcome(call: Awaitable[object]) -> object:
    try:
        return await call
    except Exception as exc:
        return exc


async def test_a_publication_the_broker_refuses_is_busy_at_once(
    pki_dir: Path, issue: IssueFn, tmp_path: Path
) -> None:
    # One frame and one telemetry report, then (practically) no refill.
    limit = IngestLimit(frames_per_s=0.001, frames_burst=1, messages_per_s=0.001, messages_burst=1)
    device = issue("device", "cam-refused")
    async with _limited_broker(pki_dir, issue, tmp_path, limit) as (harness, reports):
        entry = GatewayInfo("gw-mqtt", "home", "127.0.0.1:1", f"127.0.0.1:{harness.port}")
        session = MqttSession(
            device_id="cam-refused",
            gateway=entry,
            ssl_context=mqtt_ssl_context(device, "gw-mqtt"),
            connect_timeout_s=10.0,
            on_event=lambda _event: None,
        )
        stop = asyncio.Event()
        running = asyncio.ensure_future(session.run(stop))
        try:
            async with asyncio.timeout(30):
                await session.ready.wait()
            now = time.time()
            # Both in flight at once: the first is within the bucket and its answer is
            # awaited while the broker refuses the second.
            within = asyncio.ensure_future(session.detect("f-0", JPEG, now, timeout_s=TIMEOUT_S))
            over = asyncio.ensure_future(session.detect("f-1", JPEG, now, timeout_s=TIMEOUT_S))
            refused = await _outcome(over)
            answered = await _outcome(within)
            assert isinstance(refused, Busy), refused
            assert "PUBACK 0x87" in str(refused)
            assert refused.retry_after_s == BROKER_REFUSAL_RETRY_AFTER_S
            assert isinstance(answered, DetectionResult), answered
            assert answered.frame_id == "f-0"
            assert answered.detections[0].label == "Cat"

            report = common_pb2.Telemetry(battery_percent=70).SerializeToString()
            await session.telemetry(report, timeout_s=TIMEOUT_S)  # within its own bucket
            with pytest.raises(Busy, match="refused the telemetry") as told:
                await session.telemetry(report, timeout_s=TIMEOUT_S)
            assert told.value.retry_after_s == BROKER_REFUSAL_RETRY_AFTER_S
            # Nothing is left waiting for an acknowledgement, and the session carries on.
            assert session.publications_in_flight == 0
            assert session.ready.is_set()
            assert not running.done()
        finally:
            stop.set()
            await asyncio.gather(running, return_exceptions=True)
        # The refusals were the broker's (the rest of its count is reported at the disconnect).
        await _until(lambda: _refused(reports, "cam-refused") == (1, 1))


async def test_the_client_backs_off_and_keeps_refused_items_without_failing_over(
    pki_dir: Path, issue: IssueFn, tmp_path: Path
) -> None:
    # Two frames and two telemetry reports; the broker disconnects a device refused 5 times
    # within a second (the client's back-off keeps it well under that).
    limit = IngestLimit(
        frames_per_s=0.001,
        frames_burst=2,
        messages_per_s=0.001,
        messages_burst=2,
        disconnect_after=5,
    )
    async with (
        _limited_broker(pki_dir, issue, tmp_path, limit) as (harness, reports),
        start_gateway(issue=issue, tmp_path=tmp_path, gateway_id="gw-mqtt") as gw,
    ):
        entry = GatewayInfo("gw-mqtt", "home", gw.address, f"127.0.0.1:{harness.port}")
        device = give_directory(issue("device", "cam-busy"), pki_dir, [entry])
        options = ClientOptions(
            transport=SdkTransport.MQTT,
            call_timeout_s=TIMEOUT_S,
            max_in_flight=2,
            subscribe_events=False,
        )
        async with DeviceClient(device.directory, options) as client:
            assert client.gateway == entry
            ids = [await client.submit(JPEG, frame_id=f"f-{i}") for i in range(3)]
            for level in (90, 80, 70):
                assert await client.report_telemetry(Telemetry(battery_percent=level))
            got: list[str] = []
            async with asyncio.timeout(TIMEOUT_S):
                async for outcome in client.results():
                    assert isinstance(outcome, DetectionResult), outcome
                    got.append(outcome.frame_id)
                    if len(got) == 2:
                        break
            # Whichever two reached the broker first were answered (the sender keeps two in
            # flight, not their order). The other frame and the third report are refused, wait
            # out the back-off and are refused again: at least twice each, long before one
            # call's timeout.
            await _until(lambda: (r := _refused(reports, "cam-busy"))[0] >= 2 and r[1] >= 2)
            stats = client.stats()
            assert len(set(got)) == 2
            assert set(got) < set(ids)
            assert stats.failovers == 0
            assert client.gateway == entry
            assert stats.rejected == 0
            assert stats.telemetry_sent == 2
            # Neither was lost: both wait in the outbox for the bucket to refill.
            assert (stats.queue.frames, stats.queue.telemetry) == (1, 1)
        assert not any(r.disconnected for r in reports)


def _ack(code: int, retry_after: str | None = None) -> _PubAck:
    props = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
    props.UserProperty = ("reason", "over budget")
    if retry_after is not None:
        props.UserProperty = (RETRY_AFTER_METADATA_KEY, retry_after)
    return _PubAck(
        mid=1,
        reason=ReasonCode(PacketTypes.PUBACK, identifier=code),  # type: ignore[no-untyped-call]
        properties=props,
    )


def test_only_failure_codes_are_refusals_and_a_retry_after_given_is_bounded() -> None:
    # 0x00 Success and 0x10 No matching subscribers are successes (MQTT 5 §3.4.2.1).
    assert _ack(0x00).refusal("frame") is None
    assert _ack(0x10).refusal("frame") is None
    for code in (0x80, 0x87, 0x97):
        busy = _ack(code).refusal("frame")
        assert isinstance(busy, Busy)
        assert busy.retry_after_s == BROKER_REFUSAL_RETRY_AFTER_S
    now = _ack(0x97, retry_after="0").refusal("frame")
    assert now is not None
    assert now.retry_after_s == 0.0
    told = _ack(0x97, retry_after="2.5").refusal("frame")
    assert told is not None
    assert told.retry_after_s == 2.5
    hostile = _ack(0x97, retry_after="1e9").refusal("frame")
    assert hostile is not None
    assert hostile.retry_after_s == MAX_RETRY_AFTER_S
    nonsense = _ack(0x87, retry_after="soon").refusal("frame")
    assert nonsense is not None
    assert nonsense.retry_after_s == BROKER_REFUSAL_RETRY_AFTER_S
    assert _PubAck().refusal("frame") is None  # no PUBACK yet
