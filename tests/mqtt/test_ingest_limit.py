"""The managed broker's per-device ingest limit (the ``edgeward_ingest`` Mosquitto plugin).

Against the real broker with the plugin built by ``scripts/build_mqtt_plugin.sh``: what a
device sends beyond its bucket never reaches the gateway's listener (a subscriber there counts
what gets through), a QoS 1 sender is told by PUBACK (``mosquitto_pub`` prints the refusal), a
reconnect does not refill the bucket, frames and other messages have buckets of their own,
another device is not touched, a flood is disconnected by the broker itself, and refusals come
back to the gateway as bounded reports. The plugin's options are checked by the plugin: a bad
one stops the broker at start with a message naming it. On a plain listener of its own: hundreds
of devices keep their buckets through the table's growth, ``max_clients`` bounds what is tracked
(and the broker's memory) while busy devices stay limited, a reload (SIGHUP) during a flood
keeps the buckets, and QoS 0 messages over the bucket are dropped and still reported. Counts are
checked, not times.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
import structlog

from gateway import LimitsSettings, MqttSettings, free_port
from gateway._mqtt import (
    BUILT_PLUGIN,
    PLUGIN_SOURCE,
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
    flood_until_cut,
    frame_props,
    mqtt_gateway,
)
from tests._support.tasks import running
from tests.conftest import IssueFn, require_tool

PHOTO = Path(__file__).resolve().parents[1] / "data" / "photos" / "chelsea.jpg"
HARNESS = Path(__file__).resolve().parent / "ingest_harness.c"

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
async def _reading(
    client: aiomqtt.Client, handle: Callable[[aiomqtt.Message], None]
) -> AsyncIterator[None]:
    """Hands every message ``client`` receives to ``handle`` while the block runs."""

    async def read() -> None:
        async for message in client.messages:
            handle(message)

    async with running(read()):
        yield


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
        async with _reading(client, seen.append):
            yield seen


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


async def test_a_quiet_flooders_pending_refusals_are_reported_while_others_publish(
    pki_dir: Path, issue: IssueFn, tmp_path: Path
) -> None:
    """A device that floods, then stays connected and quiet, still has its refusals reported
    once their interval is over: any other device's message brings the broker to it."""
    flood, calm = issue("device", "cam-flood"), issue("device", "cam-calm")
    limit = IngestLimit(
        frames_per_s=0.001, frames_burst=3, messages_per_s=1000, messages_burst=1000, report_s=0.2
    )
    async with (
        _limited(pki_dir, issue, tmp_path, limit) as (harness, reports),
        device_client(flood, harness.port) as flooder,
        device_client(calm, harness.port) as other,
    ):
        await _publish(flooder, "devices/cam-flood/frames", 8, "f")
        # The first refusal is reported at once, the other four wait for their interval.
        await _until(lambda: _refused(reports, "cam-flood")[0] >= 1)
        for _ in range(600):
            if _refused(reports, "cam-flood") == (5, 0):
                break
            await other.publish("devices/cam-calm/telemetry", b"{}", qos=1)
            await asyncio.sleep(0.05)
        assert _refused(reports, "cam-flood") == (5, 0)
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
        sent = 0
        with contextlib.suppress(aiomqtt.MqttError):  # leaving a connection the broker ended
            async with device_client(flood, harness.port) as client:
                sent = await flood_until_cut(client, 200, payload=JPEG)
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

            def denied() -> float:
                return sample("edgeward_gateway_denials_total", {"reason": "rate_limited"}) or 0

            def inferred() -> float:
                return sample("edgeward_gateway_mqtt_frames_inferred_total") or 0.0

            # The broker's bucket holds 4 (twice the burst of 2): 3 frames refused there, 4
            # reach the bridge. Of those, at most the front door's burst of 2 run the model
            # and the rest are refused: all of them once the broker's first report has made
            # the device a flooder, which may come before the bridge reads the 4.
            await _until(lambda: broker_refused() == 3)
            await _until(lambda: denied() + inferred() == 7)
            assert sample("edgeward_gateway_mqtt_frames_received_total") == 4
            assert inferred() <= 2
            refused = int(denied())
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
    assert audited == refused


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
    mosquitto = require_tool("mosquitto")
    _require_plugin()
    options = {
        "frames_per_s": "1",
        "frames_burst": "1",
        "messages_per_s": "1",
        "messages_burst": "1",
        key: value,
    }
    conf = _plain_conf(tmp_path, free_port(), options)
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


# --- The plugin on a plain loopback listener: many devices, a small table, reloads -----------
#
# Anonymous clients choose their ids here, so one test reaches hundreds of devices in seconds;
# a subscriber on the same listener counts what gets through, the broker's stderr gives the
# reports. The buckets are made either exact (a refill of 0.001/s: nothing comes back during a
# test) or idle at once (1000/s, burst 1: full again a millisecond after a message).


def _plain_conf(tmp_path: Path, port: int, options: dict[str, str]) -> Path:
    """A broker config with the plugin on a plain loopback listener."""
    lines = [
        # Started as root, Mosquitto would become user "mosquitto", who may not read the
        # plugin in a private checkout (a clone in a 0700 temporary directory, as CI makes).
        f"user {pwd.getpwuid(os.geteuid()).pw_name}",
        "per_listener_settings true",
        "log_dest stderr",
        "log_timestamp false",
        *(f"log_type {t}" for t in ("error", "warning", "notice", "information")),
        "max_queued_messages 100000",
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        f"plugin {BUILT_PLUGIN}",
        *(f"plugin_opt_{k} {v}" for k, v in options.items()),
    ]
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


@dataclass
class _PlainBroker:
    port: int
    proc: asyncio.subprocess.Process
    log: list[str]
    reader: asyncio.Task[None]

    async def stop(self) -> None:
        """SIGTERM; returns once the broker has exited cleanly and its log is read to the end."""
        if self.proc.returncode is None:
            self.proc.terminate()
        async with asyncio.timeout(30):
            await self.proc.wait()
            await self.reader
        assert self.proc.returncode == 0, "\n".join(self.log[-20:])

    def refusals(self, device_id: str) -> tuple[int, int]:
        """Frames and other messages of ``device_id`` the broker reported refused."""
        reports = (parse_report(line) for line in self.log)
        return _refused([r for r in reports if r is not None], device_id)

    def count(self, text: str) -> int:
        return sum(1 for line in self.log if text in line)

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1])

    async def reload(self) -> None:
        """SIGHUP, as the gateway sends when the CRL changes; returns once it is done."""
        before = self.count("Reloading config.")
        self.proc.send_signal(signal.SIGHUP)
        await _until(lambda: self.count("Reloading config.") > before)

    def client(self, identifier: str) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1",
            self.port,
            identifier=identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=30,
        )


@contextlib.asynccontextmanager
async def _plain_broker(tmp_path: Path, **options: float) -> AsyncIterator[_PlainBroker]:
    """Mosquitto with the plugin (``options`` over exact buckets of 2) on a plain listener;
    on the way out it must still be running and stop cleanly (the plugin's cleanup too)."""
    mosquitto = require_tool("mosquitto")
    _require_plugin()
    merged = {"frames_per_s": 0.001, "frames_burst": 2, "messages_per_s": 0.001}
    merged |= {"messages_burst": 2, **options}
    port = free_port()
    conf = _plain_conf(tmp_path, port, {k: f"{v:g}" for k, v in merged.items()})
    proc = await asyncio.create_subprocess_exec(
        mosquitto, "-c", str(conf), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    log: list[str] = []

    async def read() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            log.append(line.decode(errors="replace").rstrip())

    broker = _PlainBroker(port, proc, log, asyncio.create_task(read()))
    stopped = False
    try:
        await _until(lambda: broker.count(" running") > 0 or proc.returncode is not None)
        assert proc.returncode is None, "\n".join(log)
        yield broker
        stopped = broker.reader.done()
        assert stopped or proc.returncode is None, "the broker died:\n" + "\n".join(log[-20:])
    finally:
        if not stopped:
            await broker.stop()


@contextlib.asynccontextmanager
async def _watching(broker: _PlainBroker) -> AsyncIterator[Counter[str]]:
    """Counts, by topic, the messages that got through the broker."""
    seen: Counter[str] = Counter()
    async with broker.client("watcher") as client:
        await client.subscribe("devices/#", qos=1)

        def count(message: aiomqtt.Message) -> None:
            seen[message.topic.value] += 1

        async with _reading(client, count):
            yield seen


async def _send(
    broker: _PlainBroker, device_id: str, *, frames: int = 0, telemetry: int = 0, qos: int = 1
) -> None:
    """One connection of ``device_id``: ``frames`` then ``telemetry`` publications. With QoS 1
    each is acknowledged (or refused) before the next, so the broker has seen them all."""
    async with broker.client(device_id) as client:
        for _ in range(frames):
            await client.publish(f"devices/{device_id}/frames", b"f", qos=qos)
        for _ in range(telemetry):
            await client.publish(f"devices/{device_id}/telemetry", b"t", qos=qos)


async def _in_batches(sends: Iterable[Callable[[], Awaitable[None]]], size: int = 25) -> None:
    batch: list[Callable[[], Awaitable[None]]] = []
    for send in [*sends, None]:
        if send is not None:
            batch.append(send)
        if batch and (send is None or len(batch) == size):
            await asyncio.gather(*(s() for s in batch))
            batch = []


def _through(seen: Counter[str], device_id: str) -> tuple[int, int]:
    return seen[f"devices/{device_id}/frames"], seen[f"devices/{device_id}/telemetry"]


async def test_hundreds_of_devices_each_keep_their_own_bucket_as_the_table_grows(
    tmp_path: Path,
) -> None:
    """320 devices at once: the table (64 slots at first, kept at most half full) doubles
    four times, and every device's buckets come through each rebuild exactly."""
    ids = [f"dev-{i:04d}" for i in range(320)]
    async with _plain_broker(tmp_path) as broker, _watching(broker) as seen:
        # Buckets of 2: each device has 1 frame and 1 telemetry message refused.
        await _in_batches(lambda i=i: _send(broker, i, frames=3, telemetry=3) for i in ids)
        # A reconnect, after every later device went in, finds both buckets still empty.
        await _in_batches(lambda i=i: _send(broker, i, frames=1, telemetry=1) for i in ids)
        await _until(lambda: sum(seen.values()) >= 4 * len(ids))
        await _until(lambda: all(broker.refusals(i) == (2, 2) for i in ids))
        # Every device's last messages sent were refused, so nothing more is on its way.
        assert all(_through(seen, i) == (2, 2) for i in ids)
        assert sum(seen.values()) == 4 * len(ids)
        assert broker.count("not limited") == 0


async def test_max_clients_bounds_the_devices_tracked_and_idle_ones_make_room(
    tmp_path: Path,
) -> None:
    """With max_clients 16: devices whose buckets are full again are forgotten to make room,
    busy ones never are; with 16 busy devices a 17th is not limited (its messages go through,
    the broker says so in a bounded line) and the busy ones still are."""
    async with (
        _plain_broker(tmp_path, frames_per_s=1000, frames_burst=1, max_clients=16) as broker,
        _watching(broker) as seen,
    ):
        # 15 devices sending one frame each: tracked, and idle again a millisecond later.
        idle = [f"idle-{i:02d}" for i in range(15)]
        await _in_batches(lambda i=i: _send(broker, i, frames=1) for i in idle)
        await asyncio.sleep(0.05)  # at least the 1 ms their frame buckets take to refill
        # 16 busy devices (telemetry is exact): the idle ones are forgotten to make room, and
        # each busy one is held to its 2 messages.
        busy = [f"busy-{i:02d}" for i in range(16)]
        for device in busy:
            await _send(broker, device, telemetry=3)
        await _until(lambda: all(broker.refusals(i) == (0, 1) for i in busy))
        # Every tracked device is busy: a 17th is not limited, and the broker says so.
        await _send(broker, "dev-17th", telemetry=5)
        await _until(lambda: _through(seen, "dev-17th") == (0, 5))
        await _until(lambda: broker.count("tracking 16 devices (max_clients)") >= 1)
        # The busy devices are still tracked: a reconnect finds their bucket empty.
        for device in busy:
            await _send(broker, device, telemetry=1)
        await _until(lambda: all(broker.refusals(i) == (0, 2) for i in busy))
        assert all(_through(seen, i) == (0, 2) for i in busy)
        assert broker.refusals("dev-17th") == (0, 0)
        assert all(_through(seen, i) == (1, 0) for i in idle)


async def test_new_devices_beyond_max_clients_keep_memory_bounded_and_busy_ones_limited(
    tmp_path: Path,
) -> None:
    """Rounds of new devices (with 32 KiB ids, so that each one tracked costs memory) through
    a table of 16: the broker serves them all, its memory stops growing after the first
    rounds, and a busy device stays tracked and limited throughout, every refusal reported."""
    big = "x" * 32768
    rounds, per_round = 8, 40
    rss: list[int] = []
    async with (
        _plain_broker(tmp_path, frames_per_s=1000, frames_burst=1, max_clients=16) as broker,
        _watching(broker) as seen,
    ):
        await _send(broker, "dev-busy", telemetry=3)
        for r in range(rounds):
            ids = [f"{big}-{r}-{i}" for i in range(per_round)]
            await _in_batches(lambda i=i: _send(broker, i, frames=1) for i in ids)
            # Each round's frames all get through (tracked or not, a frame is within 1 burst).
            total = (r + 1) * per_round
            await _until(lambda t=total: sum(n for k, n in seen.items() if big in k) == t)
            await _send(broker, "dev-busy", telemetry=1)
            rss.append(broker.rss_kib())
        await _until(lambda: broker.refusals("dev-busy") == (0, 1 + rounds))
        assert _through(seen, "dev-busy") == (0, 2)
    # 320 ids of 32 KiB held would be 10 MiB; 16 of them are 0.5 MiB.
    assert rss[-1] - rss[1] < 3 * 1024, rss


async def test_a_reload_during_a_flood_keeps_the_buckets(tmp_path: Path) -> None:
    """SIGHUP (the gateway's CRL reload) while a device floods: the broker keeps running,
    the plugin is not started again (Mosquitto 2.0 keeps v5 plugins across a reload), so the
    flood's bucket stays empty, through the reloads and a reconnect after them."""
    async with _plain_broker(tmp_path) as broker, _watching(broker) as seen:
        sent = 0
        stop = asyncio.Event()

        async def flood() -> None:
            nonlocal sent
            async with broker.client("dev-flood") as client:
                while not stop.is_set():
                    await client.publish("devices/dev-flood/frames", b"f", qos=1)
                    sent += 1

        task = asyncio.create_task(flood())
        for _ in range(3):
            await _until(lambda n=sent: sent >= n + 20)
            await broker.reload()
        await _until(lambda n=sent: sent >= n + 20)
        stop.set()
        await task
        await _send(broker, "dev-flood", frames=5)
        await _send(broker, "dev-calm", frames=3)
        await _until(lambda: _through(seen, "dev-calm") == (2, 0))
        await _until(lambda: broker.refusals("dev-flood") == (sent + 5 - 2, 0))
        assert _through(seen, "dev-flood") == (2, 0)
        assert broker.count("Reloading config.") == 3
        assert broker.refusals("dev-calm") == (1, 0)


async def test_qos0_messages_over_the_bucket_are_dropped_silently_and_reported(
    tmp_path: Path,
) -> None:
    """QoS 0 has no acknowledgement to refuse with: the broker drops what is over the bucket,
    keeps the connection, and still counts every drop in its reports."""
    async with _plain_broker(tmp_path) as broker, _watching(broker) as seen:
        async with broker.client("dev-qos0") as client:
            for _ in range(7):
                await client.publish("devices/dev-qos0/frames", b"f", qos=0)
            # Acknowledged on the same connection, so every frame before it has been seen.
            await client.publish("devices/dev-qos0/telemetry", b"t", qos=1)
            await client.publish("devices/dev-qos0/telemetry", b"t", qos=1)
        await _until(lambda: broker.refusals("dev-qos0") == (5, 0))
        await _until(lambda: _through(seen, "dev-qos0") == (2, 2))
        assert broker.count("dev-qos0 has been disconnected") == 0
        assert broker.count("dev-qos0 disconnected.") == 1


def test_the_plugin_s_table_holds_under_a_harness_with_sanitizers(tmp_path: Path) -> None:
    """What the broker does not show: the plugin's source in ``ingest_harness.c`` with the
    broker's functions stubbed and a clock of its own, checked after every message (the
    table's invariants, max_clients, no allocation per message of a device not tracked,
    every refusal reported once through growth, eviction and disconnects), under
    AddressSanitizer and UndefinedBehaviorSanitizer where the compiler has them."""
    cc = require_tool("cc")
    _require_plugin()  # built from the same source with the same headers
    flags = ["-std=c11", "-D_POSIX_C_SOURCE=200809L", "-O1", "-g", "-Wall", "-Wextra", "-Werror"]
    flags.append(f'-DPLUGIN_SOURCE="{PLUGIN_SOURCE}"')
    sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    binary = tmp_path / "ingest_harness"
    for extra in (sanitizers, []):
        built = subprocess.run(
            [cc, *flags, *extra, str(HARNESS), "-o", str(binary)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if built.returncode == 0:
            break
    assert built.returncode == 0, built.stderr
    done = subprocess.run(
        [str(binary)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


async def test_refusals_pending_when_the_broker_stops_are_reported(tmp_path: Path) -> None:
    """A device still connected when the broker stops gets no disconnect event: what it had
    refused since its last report is reported as the plugin is unloaded."""
    async with _plain_broker(tmp_path, report_s=3600) as broker:
        with contextlib.suppress(aiomqtt.MqttError):
            async with broker.client("dev-open") as client:
                for _ in range(4):
                    await client.publish("devices/dev-open/frames", b"f", qos=1)
                # The first refusal is reported at once, the second waits for the next report.
                await _until(lambda: broker.refusals("dev-open") == (1, 0))
                await broker.stop()
        assert broker.refusals("dev-open") == (2, 0)
