"""The managed broker's per-device ingest limit (the ``edgeward_ingest`` Mosquitto plugin).

Against the real broker with the plugin built by ``scripts/build_mqtt_plugin.sh``: what a
device sends beyond its bucket never reaches the gateway's listener (a subscriber there counts
what gets through), a QoS 1 sender is told by PUBACK (``mosquitto_pub`` prints the refusal), a
reconnect does not refill the bucket, frames and other messages have buckets of their own,
another device is not touched, a flood is disconnected by the broker itself, and refusals come
back to the gateway as bounded reports. The plugin's options are checked by the plugin: a bad
one stops the broker at start with a message naming it. Counts are checked, not times.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiomqtt
import pytest
import structlog

import pki
from gateway import LimitsSettings, MqttSettings, free_port
from gateway._mqtt import (
    BUILT_PLUGIN,
    BrokerFiles,
    BrokerRefusal,
    IngestLimit,
    internal_name,
    parse_report,
    render_mosquitto_conf,
)
from gateway._mqtt import _broker as broker_module
from tests._support.mqtt import (
    BrokerHarness,
    cli_tls_args,
    collect,
    device_client,
    frame_props,
    mqtt_gateway,
)
from tests.conftest import IssueFn, require_tool

PHOTO = Path(__file__).resolve().parents[1] / "data" / "photos" / "chelsea.jpg"

JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 64
# Frames: a burst of 3 and (practically) no refill; other messages: a burst of 2.
LIMIT = IngestLimit(frames_per_s=0.001, frames_burst=3, messages_per_s=0.001, messages_burst=2)


def _require_plugin() -> None:
    if not BUILT_PLUGIN.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{BUILT_PLUGIN} missing (scripts/setup.sh builds it)")
        pytest.skip("the ingest limit plugin is not built; run scripts/build_mqtt_plugin.sh")


async def _until(predicate: Callable[[], bool], *, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - polling what the broker reported
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _limited(
    pki_dir: Path, issue: IssueFn, tmp_path: Path, limit: IngestLimit = LIMIT
) -> AsyncIterator[tuple[BrokerHarness, list[BrokerRefusal]]]:
    require_tool("mosquitto")
    _require_plugin()
    harness = BrokerHarness(
        pki_dir=pki_dir, gateway=issue("gateway", "gw-mqtt"), data_dir=tmp_path / "mqtt"
    )
    harness.ingest = limit
    reports: list[BrokerRefusal] = []
    async with harness.run():
        assert harness.broker.ingest_plugin == BUILT_PLUGIN
        harness.broker.add_refusal_listener(reports.append)
        yield harness, reports


@contextlib.asynccontextmanager
async def _gateway_side(harness: BrokerHarness) -> AsyncIterator[list[aiomqtt.Message]]:
    """A client on the gateway's listener (the bridge's rights) keeping what gets through."""
    conn = harness.bridge_connection()
    seen: list[aiomqtt.Message] = []
    async with aiomqtt.Client(
        conn.host,
        conn.port,
        username=conn.username,
        password=conn.password,
        identifier=internal_name("gw-mqtt", "ingest-test"),
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=conn.ssl_context(),
    ) as client:
        await client.subscribe([("devices/+/frames", 1), ("devices/+/telemetry", 1)])

        async def keep() -> None:
            async for message in client.messages:
                seen.append(message)

        task = asyncio.create_task(keep())
        try:
            yield seen
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _from(seen: list[aiomqtt.Message], topic: str) -> int:
    return sum(1 for m in seen if m.topic.value == topic)


def _refused(reports: list[BrokerRefusal], device_id: str) -> tuple[int, int]:
    mine = [r for r in reports if r.device_id == device_id]
    return sum(r.frames for r in mine), sum(r.other for r in mine)


async def _publish(client: aiomqtt.Client, topic: str, n: int, tag: str) -> None:
    for i in range(n):
        await client.publish(topic, JPEG, qos=1, properties=frame_props(f"{tag}-{i}"))


async def test_over_its_bucket_a_device_is_refused_by_the_broker_and_nobody_else(
    pki_dir: Path, issue: IssueFn, tmp_path: Path
) -> None:
    flood, calm = issue("device", "cam-flood"), issue("device", "cam-calm")
    async with (
        _limited(pki_dir, issue, tmp_path) as (harness, reports),
        _gateway_side(harness) as seen,
    ):
        async with device_client(flood, harness.port) as client:
            await _publish(client, "devices/cam-flood/frames", 8, "a")
            # Its telemetry has a bucket of its own, not spent by the frames.
            await _publish(client, "devices/cam-flood/telemetry", 4, "t")
        # A reconnect does not refill the bucket: the id is the certificate's CN.
        async with device_client(flood, harness.port) as client:
            await _publish(client, "devices/cam-flood/frames", 3, "b")
        async with device_client(calm, harness.port) as client:
            await _publish(client, "devices/cam-calm/frames", 3, "c")
        # Every refusal is reported (the rest at each disconnect), and the calm device's
        # frames, sent last, arrive after everything the broker let through.
        await _until(lambda: _refused(reports, "cam-flood") == (8, 2))
        await _until(lambda: _from(seen, "devices/cam-calm/frames") == 3)
        assert _from(seen, "devices/cam-flood/frames") == 3
        assert _from(seen, "devices/cam-flood/telemetry") == 2
        assert _refused(reports, "cam-calm") == (0, 0)
        assert not any(r.disconnected for r in reports)


async def test_a_qos1_sender_is_told_by_puback(
    pki_dir: Path, issue: IssueFn, tmp_path: Path
) -> None:
    """``mosquitto_pub`` (the C client) reports each refused publication: PUBACK 0x87."""
    require_tool("mosquitto_pub")
    device = issue("device", "cam-cli")
    async with (
        _limited(pki_dir, issue, tmp_path) as (harness, reports),
        _gateway_side(harness) as seen,
    ):
        proc = await asyncio.create_subprocess_exec(
            "mosquitto_pub",
            *cli_tls_args(device, harness.port),
            "-t",
            "devices/cam-cli/frames",
            "-m",
            "x",
            "-q",
            "1",
            "--repeat",
            "5",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _out, err = await proc.communicate()
        assert proc.returncode == 0
        assert err.decode().count("Not authorized") == 2
        await _until(lambda: _refused(reports, "cam-cli") == (2, 0))
        await _until(lambda: _from(seen, "devices/cam-cli/frames") == 3)


async def _flood_until_cut(identity: pki.IdentityFiles, port: int, n: int) -> int:
    """Publish up to ``n`` frames; how many went out before the broker closed the connection."""
    sent = 0
    with contextlib.suppress(aiomqtt.MqttError):
        async with device_client(identity, port) as client:
            for i in range(n):
                await client.publish(
                    "devices/cam-flood/frames", JPEG, qos=1, properties=frame_props(f"f{i}")
                )
                sent += 1
            async with asyncio.timeout(30):
                async for _ in client.messages:  # ends when the broker closes the connection
                    pass
    return sent


async def test_a_flood_is_disconnected_by_the_broker(
    pki_dir: Path, issue: IssueFn, tmp_path: Path
) -> None:
    flood, calm = issue("device", "cam-flood"), issue("device", "cam-calm")
    limit = IngestLimit(
        frames_per_s=0.001, frames_burst=3, messages_per_s=1, messages_burst=1, disconnect_after=5
    )
    async with (
        _limited(pki_dir, issue, tmp_path, limit) as (harness, reports),
        _gateway_side(harness) as seen,
    ):
        sent = await _flood_until_cut(flood, harness.port, 200)
        # 3 let through, 4 refused, the 5th refusal ends the connection (not acknowledged).
        assert sent < 200
        await _until(lambda: any(r.disconnected for r in reports))
        assert _refused(reports, "cam-flood") == (5, 0)
        async with device_client(calm, harness.port) as client:
            await _publish(client, "devices/cam-calm/frames", 2, "c")
        await _until(lambda: _from(seen, "devices/cam-calm/frames") == 2)
        assert _from(seen, "devices/cam-flood/frames") == 3
        assert any(
            "cam-flood been disconnected by administrative action" in line
            for line in harness.broker.recent_log
        )


async def test_the_gateway_counts_audits_and_tells_broker_refusals(tmp_path: Path) -> None:
    """Through the whole gateway: the bridge counts what the broker refused in Prometheus
    and the bounded audit log, and the device hears of it on its events."""
    require_tool("mosquitto")
    _require_plugin()
    jpeg = PHOTO.read_bytes()
    with structlog.testing.capture_logs() as logs:
        async with mqtt_gateway(
            tmp_path,
            limits={"frames_per_s": 0.001, "burst": 2, "flood_penalty_s": 600},
            mqtt={"ingest_limit_factor": 2},
        ) as gw:
            device = gw.device("cam-flood", device_type="pet_camera")
            async with device_client(device, gw.port) as client:
                await client.subscribe("devices/cam-flood/events", qos=1)
                for i in range(7):
                    await client.publish(
                        "devices/cam-flood/frames", jpeg, qos=1, properties=frame_props(f"f{i}")
                    )
                events = await collect(client, count=1, timeout_s=30)
            sample = gw.service.metrics.registry.get_sample_value

            def broker_refused() -> float:
                return sample("edgeward_gateway_mqtt_broker_refused_total") or 0.0

            # The broker's bucket holds 4 (twice the burst of 2): 3 frames refused there.
            await _until(lambda: broker_refused() == 3)
            assert sample("edgeward_gateway_mqtt_frames_received_total") == 4
            denied = sample("edgeward_gateway_denials_total", {"reason": "rate_limited"})
            # 4 reached the bridge: 2 within the front door's burst of 2, 2 refused there;
            # 3 refused by the broker.
            assert denied == 5
            # Refused by the broker: flooding, so the front door admits none of its frames
            # for a while either (its retry-after says how long).
            assert gw.service.door.penalised_for("cam-flood") > 500
    codes = {json.loads(bytes(m.payload))["error"]["code"] for m in events}  # type: ignore[arg-type]
    assert codes == {"RESOURCE_EXHAUSTED"}
    # Every refusal, the broker's too, is in the audit log, in bounded lines: the first at
    # once, the rest counted (the log is flushed when the gateway stops).
    audited = sum(
        e.get("count", 0) if e["event"] == "message refused" else e["counts"]["rate_limited"]
        for e in logs
        if e.get("audit")
        and e.get("device_id") == "cam-flood"
        and e["event"] in ("message refused", "messages refused")
        and (e.get("reason") == "rate_limited" or "rate_limited" in e.get("counts", {}))
    )
    assert audited == 5


def test_reports_are_read_strictly() -> None:
    assert parse_report("edgeward-ingest: refused cam-1 frames=12 other=0") == BrokerRefusal(
        "cam-1", 12, 0
    )
    assert parse_report("edgeward-ingest: refused cam-1 frames=1 other=2 disconnected") == (
        BrokerRefusal("cam-1", 1, 2, disconnected=True)
    )
    for line in (
        "Client cam-1 disconnected.",
        "x edgeward-ingest: refused cam-1 frames=1 other=0",  # not at the line's start
        "edgeward-ingest: refused cam-1 frames=1 other=0 and more",
        "edgeward-ingest: refused ../etc frames=1 other=0",  # not a device id
        "edgeward-ingest: refused _edgeward.gw.frames-0 frames=1 other=0",
        "edgeward-ingest: refused cam-1 frames=-1 other=0",
        "edgeward-ingest: refused cam-1 frames=99999999999999999999 other=0",
    ):
        assert parse_report(line) is None, line


def test_the_limit_sits_above_the_budget() -> None:
    limit = IngestLimit.above(LimitsSettings(frames_per_s=10, burst=7), 2.0, disconnect_after=20)
    assert (limit.frames_per_s, limit.frames_burst) == (20.0, 14)
    assert (limit.messages_per_s, limit.messages_burst) == (20.0, 14)
    with pytest.raises(ValueError, match="at least the device's budget"):
        IngestLimit.above(LimitsSettings(), 0.5)
    with pytest.raises(ValueError, match="ingest_limit_factor"):
        MqttSettings(ingest_limit_factor=0.5)
    assert MqttSettings(ingest_limit_factor=0).ingest_limit_factor == 0


def test_the_plugin_is_loaded_on_the_devices_listener_only(issue: IssueFn, tmp_path: Path) -> None:
    settings = MqttSettings(data_dir=tmp_path)
    conf = render_mosquitto_conf(
        settings,
        identity=issue("gateway", "gw-1"),
        files=BrokerFiles(tmp_path),
        port=8883,
        bridge_port=8884,
        device_plugin=LIMIT.conf_lines(Path("/opt/edgeward_ingest.so")),
    )
    devices, bridge = conf.split("\nlistener 8884 ")
    assert "plugin /opt/edgeward_ingest.so" in devices.split("\nlistener 8883 ")[1]
    assert "edgeward_ingest" not in bridge
    assert "plugin_opt_frames_burst 3" in devices


@pytest.mark.parametrize(
    ("key", "value", "complaint"),
    [
        ("frames_burst", "0", "plugin_opt_frames_burst must be a number from 1"),
        ("frames_per_s", "-1", "plugin_opt_frames_per_s must be a number"),
        ("messages_per_s", "fast", "plugin_opt_messages_per_s must be a number"),
        ("messages_burst", "1e999", "plugin_opt_messages_burst must be a number"),
        ("report_s", "0", "plugin_opt_report_s must be a number"),
        ("disconnect_after", "-5", "plugin_opt_disconnect_after must be a number"),
        ("frames_per_sec", "5", "unknown option plugin_opt_frames_per_sec"),
    ],
)
def test_a_bad_option_stops_the_broker_at_start(
    tmp_path: Path, key: str, value: str, complaint: str
) -> None:
    require_tool("mosquitto")
    _require_plugin()
    options = {
        "frames_per_s": "1",
        "frames_burst": "1",
        "messages_per_s": "1",
        "messages_burst": "1",
        key: value,
    }
    lines = [
        "per_listener_settings true",
        "log_dest stderr",
        "log_type all",
        f"listener {free_port()} 127.0.0.1",
        "allow_anonymous true",
        f"plugin {BUILT_PLUGIN}",
        *(f"plugin_opt_{k} {v}" for k, v in options.items()),
    ]
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    mosquitto = require_tool("mosquitto")
    done = subprocess.run(
        [mosquitto, "-c", str(conf)], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode != 0
    assert complaint in done.stderr


async def test_without_the_built_plugin_the_broker_runs_unlimited_and_says_so(
    pki_dir: Path, issue: IssueFn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_tool("mosquitto")
    monkeypatch.setattr(broker_module, "BUILT_PLUGIN", tmp_path / "missing.so")
    harness = BrokerHarness(
        pki_dir=pki_dir, gateway=issue("gateway", "gw-mqtt"), data_dir=tmp_path / "mqtt"
    )
    harness.ingest = LIMIT
    with structlog.testing.capture_logs() as logs:
        async with harness.run():
            assert harness.broker.ingest_plugin is None
            assert "edgeward_ingest" not in harness.broker.files.conf.read_text()
    assert any("without its per-device ingest limit" in e["event"] for e in logs)


async def test_a_configured_plugin_that_is_missing_stops_the_start(
    pki_dir: Path, issue: IssueFn, tmp_path: Path
) -> None:
    require_tool("mosquitto")
    harness = BrokerHarness(
        pki_dir=pki_dir,
        gateway=issue("gateway", "gw-mqtt"),
        data_dir=tmp_path / "mqtt",
        settings_overrides={"ingest_plugin": tmp_path / "nowhere.so"},
    )
    harness.ingest = LIMIT
    with pytest.raises(FileNotFoundError, match=r"mqtt\.ingest_plugin"):
        async with harness.run():
            pass
