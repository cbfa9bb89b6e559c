"""The bridge against a real broker: frames in, detections out, errors, telemetry, events."""

from __future__ import annotations

import asyncio
import json

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import Command, EventHub, RevocationEvent, RevocationState
from gateway._mqtt import MqttBridge
from protos.edgeward.v1 import common_pb2
from tests._support.mqtt import (
    BrokerHarness,
    FakeEngine,
    collect,
    device_client,
    frame_props,
    front_door,
)
from tests.conftest import IssueFn

JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 64


async def test_frame_to_detection_json_and_protobuf(harness: BrokerHarness, issue: IssueFn) -> None:
    device = issue("device", "cam-one")
    engine = FakeEngine()
    async with MqttBridge(
        harness.settings,
        connection=harness.bridge_connection(),
        door=front_door(engine, gateway_id="gw-mqtt"),
    ) as bridge:
        await bridge.wait_ready()
        async with device_client(device, harness.port) as client:
            await client.subscribe("devices/cam-one/detections", qos=1)
            await client.publish(
                "devices/cam-one/frames", JPEG, qos=1, properties=frame_props("f-1")
            )
            frame = common_pb2.Frame(image=JPEG, frame_id="f-2")
            await client.publish(
                "devices/cam-one/frames",
                frame.SerializeToString(),
                qos=1,
                properties=frame_props("f-2", protobuf=True),
            )
            got = await collect(client, count=2, timeout_s=5)
    assert len(got) == 2
    by_corr = {bytes(m.properties.CorrelationData): m for m in got}  # type: ignore[union-attr]
    as_json = json.loads(bytes(by_corr[b"f-1"].payload))  # type: ignore[arg-type]
    assert as_json["frameId"] == "f-1"
    assert as_json["detections"][0]["label"] == "Cat"
    assert as_json["gatewayId"] == "gw-mqtt"
    assert by_corr[b"f-1"].properties.ContentType == "application/json"  # type: ignore[union-attr]
    as_pb = common_pb2.DetectionResult.FromString(bytes(by_corr[b"f-2"].payload))  # type: ignore[arg-type]
    assert as_pb.frame_id == "f-2"
    assert as_pb.detections[0].label == "Cat"
    assert engine.calls == 2


async def test_malformed_frame_and_telemetry_give_error_events_and_bridge_goes_on(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    device = issue("device", "cam-bad")
    engine = FakeEngine()
    hub = EventHub()
    async with MqttBridge(
        harness.settings,
        connection=harness.bridge_connection(),
        door=front_door(engine, gateway_id="gw-mqtt", events=hub),
    ) as bridge:
        await bridge.wait_ready()
        async with device_client(device, harness.port) as client:
            await client.subscribe("devices/cam-bad/events", qos=1)
            await client.subscribe("devices/cam-bad/detections", qos=1)
            await client.publish(
                "devices/cam-bad/frames", b"not an image", qos=1, properties=frame_props("x-1")
            )
            await client.publish(
                "devices/cam-bad/frames",
                b"\x08\x96\x01garbage",
                qos=1,
                properties=frame_props("x-2", protobuf=True),
            )
            await client.publish("devices/cam-bad/telemetry", b"{not json", qos=1)
            await client.publish(
                "devices/cam-bad/telemetry", json.dumps({"batteryPercent": 250}).encode(), qos=1
            )
            await client.publish(
                "devices/cam-bad/frames", JPEG, qos=1, properties=frame_props("ok-1")
            )
            got = await collect(client, count=5, timeout_s=5)
    events = [m for m in got if m.topic.matches("devices/cam-bad/events")]
    detections = [m for m in got if m.topic.matches("devices/cam-bad/detections")]
    assert len(detections) == 1  # the good frame after the bad ones was answered
    codes = []
    for m in events:
        body = bytes(m.payload)  # type: ignore[arg-type]
        if m.properties is not None and getattr(m.properties, "ContentType", "") == (
            "application/x-protobuf"
        ):
            codes.append(common_pb2.DeviceEvent.FromString(body).error.code)
        else:
            codes.append(json.loads(body)["error"]["code"])
    assert codes.count("INVALID_ARGUMENT") == 4
    assert engine.calls == 1
    assert bridge.stats.frames_rejected == 2
    assert bridge.stats.telemetry_rejected == 2
    assert len(hub.stored("cam-bad")) == 4  # gRPC Subscribe sees the same errors


async def test_hub_events_are_forwarded(harness: BrokerHarness, issue: IssueFn) -> None:
    device = issue("device", "cam-evt")
    hub = EventHub()
    async with MqttBridge(
        harness.settings,
        connection=harness.bridge_connection(),
        door=front_door(FakeEngine(), gateway_id="gw-mqtt", events=hub),
    ) as bridge:
        await bridge.wait_ready()
        async with device_client(device, harness.port) as client:
            await client.subscribe("devices/cam-evt/events", qos=1)
            await asyncio.sleep(0.1)
            hub.publish("cam-evt", Command(name="reboot", arguments={"in": "5s"}))
            hub.publish("other-dev", Command(name="reboot"))
            got = await collect(client, count=2, timeout_s=2)
    assert len(got) == 1
    body = json.loads(bytes(got[0].payload))  # type: ignore[arg-type]
    assert body["command"] == {"name": "reboot", "arguments": {"in": "5s"}}


async def test_telemetry_in_bridge_and_in_worker_processes(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    device = issue("device", "vac-tel")
    for workers in (0, 1):
        settings = harness.settings.model_copy(update={"telemetry_workers": workers})
        async with MqttBridge(
            settings,
            connection=harness.bridge_connection(),
            door=front_door(FakeEngine(), gateway_id="gw-mqtt"),
        ) as bridge:
            await bridge.wait_ready(timeout_s=20)
            async with device_client(device, harness.port) as client:
                await client.publish(
                    "devices/vac-tel/telemetry",
                    json.dumps(
                        {"batteryPercent": 40 + workers, "readings": {"wifi_rssi": -61}}
                    ).encode(),
                    qos=1,
                )
                tel = common_pb2.Telemetry(battery_percent=77, firmware_version="1.2.3")
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.ContentType = "application/x-protobuf"
                await client.publish(
                    "devices/vac-tel/telemetry", tel.SerializeToString(), qos=1, properties=props
                )
            async with asyncio.timeout(5):
                while (r := bridge.latest_telemetry("vac-tel")) is None or r.battery_percent != 77:  # noqa: ASYNC110 - polling the bridge's state
                    await asyncio.sleep(0.02)
            assert r.firmware_version == "1.2.3"
            assert bridge.speaks_protobuf("vac-tel")  # its events go out as protobuf
            assert bridge.stats.telemetry_received >= 2


async def test_revoked_device_frames_are_dropped_by_the_bridge(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    device = issue("device", "cam-rev")
    engine = FakeEngine()
    revocation = RevocationState(max_staleness_s=60)
    revocation.mark_fresh()
    await revocation.apply(
        RevocationEvent(sequence=1, device_id="cam-rev", serial=None, reason="test")
    )
    async with MqttBridge(
        harness.settings,
        connection=harness.bridge_connection(),
        door=front_door(engine, gateway_id="gw-mqtt", revocation=revocation),
    ) as bridge:
        await bridge.wait_ready()
        async with device_client(device, harness.port) as client:
            await client.subscribe("devices/cam-rev/detections", qos=1)
            await client.publish(
                "devices/cam-rev/frames", JPEG, qos=1, properties=frame_props("r-1")
            )
            got = await collect(client, count=1, timeout_s=1)
    assert got == []
    assert engine.calls == 0
    assert bridge.stats.by_reason == {"revoked": 1}


async def test_unauthorised_bridge_login_refused(harness: BrokerHarness) -> None:
    """The gateway's listener wants the per-start password as well as the certificate."""
    conn = harness.bridge_connection()
    import pki

    client = aiomqtt.Client(
        conn.host,
        conn.port,
        username=conn.username,
        password="wrong",
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=pki.client_ssl_context(conn.identity),
        timeout=5,
    )
    try:
        async with client:
            raise AssertionError("connected with a wrong password")
    except aiomqtt.MqttError:
        pass
