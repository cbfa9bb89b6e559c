"""The SDK's MQTT transport against a real managed Mosquitto and the gateway's real bridge
and model: frames and telemetry over MQTT 5 with mutual TLS, answers matched by correlation
data, failover to gRPC-probed gateways unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_sdk import (
    ClientOptions,
    DetectionResult,
    DeviceClient,
    GatewayInfo,
    Telemetry,
    Transport,
)
from gateway import InferenceEngine
from gateway._mqtt import MqttBridge
from tests._support.gateway import start_gateway
from tests._support.mqtt import BrokerHarness, front_door
from tests.conftest import IssueFn, require_tool
from tests.sdk.conftest import give_directory

MODELS = Path(__file__).resolve().parents[2] / "models"
pytestmark = pytest.mark.slow


async def test_frames_and_telemetry_over_mqtt(
    issue: IssueFn, pki_dir: Path, tmp_path: Path, photos: Path
) -> None:
    require_tool("mosquitto")
    harness = BrokerHarness(
        pki_dir=pki_dir, gateway=issue("gateway", "gw-mqtt"), data_dir=tmp_path / "mqtt"
    )
    async with (
        start_gateway(issue=issue, tmp_path=tmp_path, gateway_id="gw-mqtt") as gw,
        harness.run(),
        InferenceEngine(models_dir=MODELS) as engine,
        MqttBridge(
            harness.settings,
            connection=harness.bridge_connection(),
            door=front_door(engine, gateway_id="gw-mqtt"),
        ) as bridge,
    ):
        await bridge.wait_ready()
        entry = GatewayInfo("gw-mqtt", "home", gw.address, f"127.0.0.1:{harness.port}")
        device = give_directory(issue("device", "cam-mqtt"), pki_dir, [entry])
        options = ClientOptions(transport=Transport.MQTT, call_timeout_s=20)
        async with DeviceClient(device.directory, options) as client:
            assert client.gateway == entry
            result = await client.detect((photos / "chelsea.jpg").read_bytes(), timeout_s=30)
            assert isinstance(result, DetectionResult)
            assert result.transport is Transport.MQTT
            assert result.detections[0].label == "Cat"
            ids = [await client.submit((photos / "dog.jpg").read_bytes()) for _ in range(5)]
            assert await client.report_telemetry(Telemetry(battery_percent=70, temperature_c=30))
            got = []
            async for outcome in client.results():
                got.append(outcome.frame_id)
                if len(got) == len(ids):
                    break
            assert sorted(got) == sorted(ids)
            assert await client.flush(timeout_s=20)
            assert client.stats().telemetry_sent == 1
