"""End to end with the real engine and model, the standard clients, and a broker restart."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import aiomqtt
import pytest

from gateway import InferenceEngine
from gateway._mqtt import MqttBridge
from tests._support.mqtt import (
    BrokerHarness,
    FakeEngine,
    cli_tls_args,
    device_client,
    frame_props,
    front_door,
)
from tests.conftest import IssueFn, require_tool


class CountingEngine:
    """The real engine, counting model calls (a seam we own, not a mock of onnxruntime).

    With ``gate``, each frame waits for it before the model runs: the test decides when the
    answer may exist.
    """

    def __init__(self, engine: InferenceEngine, gate: asyncio.Event | None = None) -> None:
        self.engine = engine
        self.calls = 0
        self.gate = gate

    async def detect_with_frame(
        self,
        image: bytes,
        *,
        deadline: float | None = None,
        key: str | None = None,
        region: str | None = None,
    ):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        return await self.engine.detect_with_frame(image, deadline=deadline)


async def _cli(*args: str) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out, err


@pytest.mark.slow
async def test_mosquitto_pub_jpeg_gets_cat_detection_with_mosquitto_sub(
    harness: BrokerHarness, issue: IssueFn, photos: Path, models_dir: Path
) -> None:
    """The literal ``mosquitto_pub -f chelsea.jpg``; the answer read by ``mosquitto_sub``.

    The client id is the certificate CN, so a device holds one connection at a time and
    mosquitto_sub cannot listen beside mosquitto_pub (each would end the other). The standard
    clients take turns on one persistent session instead: mosquitto_sub subscribes and leaves,
    mosquitto_pub publishes on the same session, and the answer queued there meanwhile is what
    mosquitto_sub reads when it comes back. (The model waits until mosquitto_pub is gone: an
    answer arriving while it is connected would be delivered to it, and it reads nothing.)
    """
    device = issue("device", "pet-cam-1")
    gate = asyncio.Event()
    async with (
        InferenceEngine(models_dir=models_dir) as engine,
        MqttBridge(
            harness.settings,
            connection=harness.bridge_connection(),
            door=front_door(CountingEngine(engine, gate), gateway_id="gw-mqtt"),
        ) as bridge,
    ):
        await bridge.wait_ready()
        session = [*cli_tls_args(device, harness.port), "-i", "pet-cam-1", "-c", "-x", "600"]
        detections = ("-t", "devices/pet-cam-1/detections", "-q", "1")
        sub = require_tool("mosquitto_sub")
        code, _out, err = await _cli(sub, *session, *detections, "-E")
        assert code == 0, err
        code, _out, err = await _cli(
            require_tool("mosquitto_pub"),
            *session,
            *("-t", "devices/pet-cam-1/frames", "-f", str(photos / "chelsea.jpg"), "-q", "1"),
            *("-D", "publish", "correlation-data", "frame-42"),
        )
        assert code == 0, err
        gate.set()
        code, out, err = await _cli(sub, *session, *detections, "-C", "1", "-W", "20", "-F", "%j")
    assert code == 0, err
    envelope = json.loads(out)
    result = json.loads(envelope["payload"])
    assert result["frameId"] == "frame-42"
    assert result["modelName"] == "edge_ssd_mobilenetv2_oid24"
    assert "Cat" in {d["label"] for d in result["detections"]}, result


@pytest.mark.slow
async def test_broker_restart_mid_stream_loses_nothing_and_runs_no_frame_twice(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    """QoS 1 frames in flight when the broker stops: all answered after it is back, each
    frame id through the model once even though devices resend what was not answered."""
    device = issue("device", "cam-restart")
    engine = FakeEngine(delay_s=0.02)
    jpeg = b"\xff\xd8\xff\xe0" + b"\0" * 64
    total = 60
    answered: set[str] = set()
    async with MqttBridge(
        harness.settings.model_copy(update={"max_in_flight": 4}),
        connection=harness.bridge_connection(),
        door=front_door(engine, gateway_id="gw-mqtt"),
    ) as bridge:
        await bridge.wait_ready()

        async def device_loop(first_pass: bool) -> None:
            client = device_client(
                device, harness.port, identifier="cam-restart", clean_start=False
            )
            async with client:
                await client.subscribe("devices/cam-restart/detections", qos=1)
                ids = [f"f-{i}" for i in range(total) if f"f-{i}" not in answered]
                for n, fid in enumerate(ids):
                    await client.publish(
                        "devices/cam-restart/frames", jpeg, qos=1, properties=frame_props(fid)
                    )
                    if first_pass and n == total // 2:
                        harness.broker.signal(signal.SIGTERM)  # saves its database, exits
                        break
                async with asyncio.timeout(4):
                    async for m in client.messages:
                        answered.add(bytes(m.properties.CorrelationData).decode())  # type: ignore[union-attr]
                        if len(answered) == total:
                            return

        with pytest.raises((aiomqtt.MqttError, TimeoutError)):
            await device_loop(first_pass=True)
        async with asyncio.timeout(15):
            while harness.broker.restarts < 1:  # noqa: ASYNC110 - polling the supervisor
                await asyncio.sleep(0.05)
        await harness.broker.wait_running()
        # The device reconnects and resends every frame it has no answer for (same ids).
        for _ in range(3):
            try:
                await device_loop(first_pass=False)
                break
            except (aiomqtt.MqttError, TimeoutError):
                await asyncio.sleep(0.5)
    missing = {f"f-{i}" for i in range(total)} - answered
    assert not missing, (sorted(missing), engine.calls, bridge.stats)
    assert engine.calls == total, (engine.calls, bridge.stats)
    assert bridge.stats.reconnects >= 1
