"""The ``[mqtt]`` table through the real service: ``GatewayService`` and ``edgeward gateway run``.

Nothing here builds the bridge by hand: the gateway starts from settings with an ``[mqtt]``
table, so the broker, the revocation enforcer and the bridge come from the plug-in the way an
operator's gateway gets them. Devices are in the gateway's registry (a PKI of the test's own,
standalone) and speak MQTT 5 over mutual TLS with the standard Mosquitto clients or aiomqtt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

import pki
from tests._support.mqtt import (
    MODELS_DIR,
    cli_tls_args,
    collect,
    device_client,
    frame_props,
    mqtt_gateway,
    mqtt_gateway_settings,
    standalone_pki,
)
from tests.conftest import PHOTOS, ROOT, require_tool


async def _run(*args: str, timeout_s: float = 30.0) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out, err


async def _drain(client: aiomqtt.Client) -> None:
    async with asyncio.timeout(5):
        async for _ in client.messages:
            pass


async def _pub_and_sub_a_photo(device: pki.IdentityFiles, device_id: str, port: int) -> Any:
    """``mosquitto_pub`` a photo, ``mosquitto_sub`` its detection; the parsed answer.

    The client id is the certificate CN: a device holds one connection at a time, so a
    mosquitto_sub listening beside mosquitto_pub would end it (and be ended). The two take
    turns on the device's persistent session instead (``-c -x``, as docs/mqtt.md shows):
    subscribe and leave, publish, then collect the answer queued in the session meanwhile.
    An answer faster than mosquitto_pub's own disconnect goes to mosquitto_pub, which
    discards it (a property of the client, seen in its ``-d`` output): publish again then.
    """
    session = [*cli_tls_args(device, port), "-i", device_id, "-c", "-x", "600"]
    detections = ("-t", f"devices/{device_id}/detections", "-q", "1")
    code, _out, err = await _run(require_tool("mosquitto_sub"), *session, *detections, "-E")
    assert code == 0, err
    for _attempt in range(3):
        code, out, err = await _run(
            require_tool("mosquitto_pub"),
            *session,
            *("-t", f"devices/{device_id}/frames", "-f", str(PHOTOS / "chelsea.jpg"), "-q", "1"),
            *("-D", "publish", "correlation-data", "frame-42", "-d"),
        )
        assert code == 0, err
        if b"received PUBLISH" not in out + err:
            break
    code, out, err = await _run(
        require_tool("mosquitto_sub"), *session, *detections, "-C", "1", "-W", "20", "-F", "%j"
    )
    assert code == 0, err
    envelope = json.loads(out)
    return json.loads(envelope["payload"])


async def test_gateway_service_with_mqtt_table_answers_mosquitto_pub(tmp_path: Path) -> None:
    require_tool("mosquitto")
    async with mqtt_gateway(tmp_path) as gw:
        device = gw.device("pet-cam-svc")
        result = await _pub_and_sub_a_photo(device, "pet-cam-svc", gw.port)
    assert result["frameId"] == "frame-42"
    assert result["modelName"] == "edge_ssd_mobilenetv2_oid24"
    assert result["gatewayId"] == "gw-mqtt-svc"
    assert "Cat" in {d["label"] for d in result["detections"]}, result


async def test_revocation_in_the_registry_cuts_the_live_session_and_refuses_reconnects(
    tmp_path: Path,
) -> None:
    require_tool("mosquitto")
    async with mqtt_gateway(tmp_path) as gw:
        victim = gw.device("cam-revoked")
        bystander = gw.device("cam-bystander")
        async with device_client(bystander, gw.port) as stay:
            await stay.subscribe("devices/cam-bystander/detections", qos=1)
            client = device_client(victim, gw.port)
            async with client:
                await client.subscribe("devices/cam-revoked/detections", qos=1)
                started = time.monotonic()
                gw.revoke("cam-revoked")  # what `edgeward pki revoke` does
                with pytest.raises(aiomqtt.MqttError):
                    await _drain(client)
                cut_after = time.monotonic() - started
            # Registry poll (50 ms here) + the kick; the promise is one second.
            assert cut_after < 1.0, cut_after
            assert gw.service.revocation.is_revoked("cam-revoked", "")
            # The CRL the broker reloaded refuses the certificate's next handshake.
            refused = False
            async with asyncio.timeout(5):
                while not refused:
                    try:
                        async with device_client(victim, gw.port, timeout=1.5):
                            await asyncio.sleep(0.1)
                    except aiomqtt.MqttError:
                        refused = True
            # Others carry on: the bystander still gets answers.
            await stay.publish(
                "devices/cam-bystander/frames",
                (PHOTOS / "chelsea.jpg").read_bytes(),
                qos=1,
                properties=frame_props("still-here"),
            )
            (answer,) = await collect(stay, count=1, timeout_s=20)
            assert json.loads(bytes(answer.payload))["frameId"] == "still-here"  # type: ignore[arg-type]


def _model_runs(gw: Any) -> float:
    """Frames the gateway's engine has run through the model (its batch-size histogram)."""
    value = gw.service.metrics.registry.get_sample_value("edgeward_gateway_batch_size_sum")
    return float(value or 0.0)


async def test_a_device_type_without_detect_gets_an_error_event_and_no_inference(
    tmp_path: Path,
) -> None:
    """``[authorisation]`` applies to MQTT as to gRPC: a frame is a ``Detect``, telemetry a
    ``ReportTelemetry``."""
    require_tool("mosquitto")
    policy = {
        "device_types": {
            "pet_camera": ["Detect", "Subscribe"],
            "doorbell": ["ReportTelemetry", "Subscribe"],
        }
    }
    telemetry = json.dumps({"batteryPercent": 80, "firmwareVersion": "2.0"}).encode()
    async with mqtt_gateway(tmp_path, authorisation=policy) as gw:
        bell = gw.device("bell-one", device_type="doorbell")
        cam = gw.device("cam-allowed", device_type="pet-camera")
        jpeg = (PHOTOS / "chelsea.jpg").read_bytes()
        async with device_client(bell, gw.port) as client:
            await client.subscribe("devices/bell-one/events", qos=1)
            await client.subscribe("devices/bell-one/detections", qos=1)
            await client.publish(
                "devices/bell-one/frames", jpeg, qos=1, properties=frame_props("ring-1")
            )
            await client.publish("devices/bell-one/telemetry", telemetry, qos=1)
            got = await collect(client, count=1, timeout_s=10)
            got += await collect(client, count=1, timeout_s=0.5)  # no detection follows
        assert [m.topic.value for m in got] == ["devices/bell-one/events"], got
        error = json.loads(bytes(got[0].payload))["error"]  # type: ignore[arg-type]
        assert error["code"] == "PERMISSION_DENIED"
        assert error["frameId"] == "ring-1"
        assert "doorbell" in error["message"]
        assert _model_runs(gw) == 0  # refused before the engine saw it
        # A doorbell may report telemetry: it is kept (the gateway's store, shared with gRPC).
        store = gw.service.door.telemetry
        assert store.latest("bell-one") is not None
        assert store.latest("bell-one").battery_percent == 80
        # A camera of this policy may detect, but not report telemetry.
        async with device_client(cam, gw.port) as client:
            await client.subscribe("devices/cam-allowed/detections", qos=1)
            await client.subscribe("devices/cam-allowed/events", qos=1)
            await client.publish("devices/cam-allowed/telemetry", telemetry, qos=1)
            await client.publish(
                "devices/cam-allowed/frames", jpeg, qos=1, properties=frame_props("ok-1")
            )
            got = await collect(client, count=2, timeout_s=20)
        by_topic = {m.topic.value: json.loads(bytes(m.payload)) for m in got}  # type: ignore[arg-type]
        assert by_topic["devices/cam-allowed/detections"]["frameId"] == "ok-1"
        refused = by_topic["devices/cam-allowed/events"]["error"]
        assert refused["code"] == "PERMISSION_DENIED"
        assert "ReportTelemetry" in refused["message"]
        assert store.latest("cam-allowed") is None
        assert _model_runs(gw) == 1


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_escalation_over_mqtt_marks_the_frame_and_answers_on_events(
    tmp_path: Path,
) -> None:
    """A motorcycle (no edge class) over MQTT to a gateway with an ``[escalation]`` region
    policy and a real core: the detection carries the pending whole-frame escalation, and
    the core's answer arrives on ``devices/<id>/events`` under the same id."""
    require_tool("mosquitto")
    from gateway import CoreEscalationSettings, EscalateService
    from tests._support.core import running_core

    pki_dir = standalone_pki(tmp_path)
    handler = EscalateService(
        CoreEscalationSettings(
            models_dir=MODELS_DIR,
            providers="cpu",
            answer_store=tmp_path / "core-answers.sqlite3",
        )
    )
    home = {
        "escalate_empty_frames": True,
        "send": "frame",
        "require_face_blur": False,
        "device_budget_per_min": 1000,
        "region_budget_per_min": 1000,
        "empty_frame_budget_per_min": 1000,
    }
    async with running_core(pki_dir, tmp_path, escalate=handler) as core:
        escalation = {
            "core_address": core.address,
            "outbox_path": str(tmp_path / "outbox.sqlite3"),
            "retry_backoff_base_s": 0.05,
            "retry_backoff_max_s": 0.3,
            "regions": {"home": home},
        }
        async with mqtt_gateway(tmp_path, core=core, escalation=escalation) as gw:
            # Both plug-ins came from the tables; escalation hooked the front door after MQTT.
            assert gw.service.door.detection_hook is not None
            moto = gw.device("moto-cam", region="home")
            async with device_client(moto, gw.port) as client:
                await client.subscribe("devices/moto-cam/detections", qos=1)
                await client.subscribe("devices/moto-cam/events", qos=1)
                await client.publish(
                    "devices/moto-cam/frames",
                    (PHOTOS / "motorcycle.jpg").read_bytes(),
                    qos=1,
                    properties=frame_props("m-1"),
                )
                got = await collect(client, count=2, timeout_s=60)
            # The escalator's counts are Prometheus series.
            text = gw.service.metrics.render().decode()
            assert 'edgeward_gateway_escalations_total{outcome="queued"} 1.0' in text, text
    by_topic = {m.topic.value: json.loads(bytes(m.payload)) for m in got}  # type: ignore[arg-type]
    assert set(by_topic) == {"devices/moto-cam/detections", "devices/moto-cam/events"}, got
    result = by_topic["devices/moto-cam/detections"]
    (pending,) = result["detections"]
    assert pending["label"] == "unknown"  # the whole frame, until the core answers
    assert pending["escalated"] is True
    assert pending["escalationId"].startswith("esc-")
    answer = by_topic["devices/moto-cam/events"]["escalation"]
    assert answer["escalationId"] == pending["escalationId"]
    assert answer["frameId"] == "m-1"
    assert answer["label"] == "motorcycle"


# ------------------------------------------------------------------------- the command


def _toml(values: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for the settings dict (strings, numbers, booleans, tables)."""
    lines, tables = [], []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append(_toml(value, f"{prefix}{key}."))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    head = [f"[{prefix[:-1]}]"] if prefix else []
    return "\n".join(head + lines + [""]) + "\n".join(tables)


def _log_record(log: Path, event: str) -> dict[str, Any] | None:
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                return record
    return None


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


def _alive(pid: int) -> bool:
    """A process that runs (a zombie waiting for its reaper does not count)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@contextlib.asynccontextmanager
async def _gateway_run(config: Path, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "from edgeward.cli import main; main()",
            "gateway",
            "run",
            "--config",
            str(config),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_gateway_run_with_mqtt_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    require_tool("mosquitto")
    pki_dir = standalone_pki(tmp_path)
    values = mqtt_gateway_settings(
        tmp_path, pki_dir=pki_dir, gateway_id="gw-cli", mqtt={"telemetry_workers": 1}
    )
    config = tmp_path / "gateway.toml"
    config.write_text(_toml(values))
    port = values["mqtt"]["port"]
    log = tmp_path / "gateway.log"
    device = pki.issue_identity(pki_dir, tmp_path / "cam-cli", role=pki.Role.DEVICE, id="cam-cli")
    async with _gateway_run(config, log) as proc:
        async with asyncio.timeout(30):
            while (started := _log_record(log, "gateway started")) is None:
                assert proc.returncode is None, _tail(log)
                await asyncio.sleep(0.05)
        broker = _log_record(log, "mqtt broker started")
        assert broker is not None, started
        assert broker["port"] == port
        broker_pid = int(broker["pid"])
        assert _alive(broker_pid)
        async with device_client(device, port) as client:
            await client.subscribe("devices/cam-cli/detections", qos=1)
            await client.publish(
                "devices/cam-cli/frames",
                (PHOTOS / "chelsea.jpg").read_bytes(),
                qos=1,
                properties=frame_props("cli-1"),
            )
            (answer,) = await collect(client, count=1, timeout_s=20)
        assert json.loads(bytes(answer.payload))["frameId"] == "cli-1"  # type: ignore[arg-type]

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0, _tail(log)
    assert not _alive(broker_pid), "mosquitto outlived the gateway"
    with pytest.raises(ConnectionRefusedError):  # nothing listens on the devices' port
        await asyncio.open_connection("127.0.0.1", port)
    assert _log_record(log, "mqtt broker stopped") is not None


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_frames_a_killed_gateway_had_received_are_answered_after_its_restart(
    tmp_path: Path,
) -> None:
    """At least once to the model: a frame is acknowledged to the broker only once its
    detection is out, so what a gateway killed with SIGKILL had received comes again."""
    require_tool("mosquitto")
    pki_dir = standalone_pki(tmp_path)
    values = mqtt_gateway_settings(tmp_path, pki_dir=pki_dir, gateway_id="gw-crash")
    config = tmp_path / "gateway.toml"
    config.write_text(_toml(values))
    port = values["mqtt"]["port"]
    device = pki.issue_identity(pki_dir, tmp_path / "cam", role=pki.Role.DEVICE, id="cam-crash")
    jpeg = (PHOTOS / "chelsea.jpg").read_bytes()
    total = 40
    answered: dict[str, int] = {}

    def session() -> aiomqtt.Client:
        # A persistent device session: detections published while it is away wait for it.
        return device_client(
            device, port, identifier="cam-crash", clean_start=False, session_expiry_s=300
        )

    async def started(log: Path, proc: asyncio.subprocess.Process) -> None:
        async with asyncio.timeout(30):
            while _log_record(log, "gateway started") is None:
                assert proc.returncode is None, _tail(log)
                await asyncio.sleep(0.05)

    async with _gateway_run(config, tmp_path / "first.log") as first:
        await started(tmp_path / "first.log", first)
        with contextlib.suppress(aiomqtt.MqttError):
            async with session() as client:
                await client.subscribe("devices/cam-crash/detections", qos=1)
                for i in range(total):
                    await client.publish(
                        "devices/cam-crash/frames", jpeg, qos=1, properties=frame_props(f"k{i}")
                    )
                async for message in client.messages:
                    fid = bytes(message.properties.CorrelationData).decode()  # type: ignore[union-attr]
                    answered[fid] = answered.get(fid, 0) + 1
                    if len(answered) == 1:
                        first.kill()  # the gateway dies with frames received, not answered
                        await first.wait()
    assert len(answered) < total, "every frame was answered before the kill; nothing tested"
    before = len(answered)

    async with _gateway_run(config, tmp_path / "second.log") as second:
        await started(tmp_path / "second.log", second)
        async with asyncio.timeout(30):
            while len(answered) < total:
                with contextlib.suppress(aiomqtt.MqttError):
                    async with session() as client:
                        async for message in client.messages:
                            fid = bytes(message.properties.CorrelationData).decode()  # type: ignore[union-attr]
                            answered[fid] = answered.get(fid, 0) + 1
                            if len(answered) == total:
                                break
                await asyncio.sleep(0.2)
        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), 20) == 0
    assert sorted(answered) == sorted(f"k{i}" for i in range(total)), (before, answered)


async def test_one_frame_budget_per_device_over_mqtt_while_others_are_served(
    tmp_path: Path,
) -> None:
    """A device flooding frames over MQTT is charged the same per-device budget as on gRPC:
    frames past the burst get a RESOURCE_EXHAUSTED error event, and another device is still
    answered."""
    require_tool("mosquitto")
    jpeg = (PHOTOS / "chelsea.jpg").read_bytes()
    # The front door's budget alone: the broker's own ingest limit, above it, would refuse
    # some of these before the bridge sees them (tests/mqtt/test_ingest_limit.py).
    async with mqtt_gateway(
        tmp_path, limits={"frames_per_s": 0.5, "burst": 2}, mqtt={"ingest_limit_factor": 0}
    ) as gw:
        flood = gw.device("cam-flood", device_type="pet_camera")
        calm = gw.device("cam-calm", device_type="pet_camera")
        async with device_client(flood, gw.port) as client:
            await client.subscribe("devices/cam-flood/#", qos=1)
            for i in range(6):
                await client.publish(
                    "devices/cam-flood/frames", jpeg, qos=1, properties=frame_props(f"f-{i}")
                )
            got = await collect(client, count=6, timeout_s=20)
        kinds = [m.topic.value.rsplit("/", 1)[1] for m in got]
        assert kinds.count("detections") == 2, kinds
        errors = [
            json.loads(bytes(m.payload))["error"]  # type: ignore[arg-type]
            for m in got
            if m.topic.value.endswith("/events")
        ]
        assert len(errors) == 4
        assert {e["code"] for e in errors} == {"RESOURCE_EXHAUSTED"}
        async with device_client(calm, gw.port) as client:
            await client.subscribe("devices/cam-calm/detections", qos=1)
            await client.publish(
                "devices/cam-calm/frames", jpeg, qos=1, properties=frame_props("calm-1")
            )
            got = await collect(client, count=1, timeout_s=20)
        assert json.loads(bytes(got[0].payload))["frameId"] == "calm-1"  # type: ignore[arg-type]
        # The bridge's counters are Prometheus series, equal to its own.
        sample = gw.service.metrics.registry.get_sample_value
        assert sample("edgeward_gateway_mqtt_frames_received_total") == 7
        assert sample("edgeward_gateway_mqtt_frames_rejected_total") == 4
        assert sample("edgeward_gateway_mqtt_refused_total", {"reason": "rate_limited"}) == 4
