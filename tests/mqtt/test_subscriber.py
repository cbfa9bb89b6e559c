"""The telemetry workers' MQTT 5 subscriber: bulk PUBLISH parsing, and hostile input refused.

The reader is fed bytes directly (every malformed form a broker could send); the connection
tests run the subscriber over real mutual TLS against a scripted peer (the packets a real
broker never sends cannot be had from Mosquitto) and against the real broker through the
bridge's worker processes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import socket
import ssl
import struct
import subprocess
import threading
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import structlog

import pki
from gateway import MqttSettings
from gateway._mqtt import BridgeStats, MqttBridge, internal_name
from gateway._mqtt._ingest import TelemetryIngest
from gateway._mqtt._subscriber import (
    PacketReader,
    ProtocolViolation,
    Publish,
    Subscriber,
    encode_varint,
)
from gateway._mqtt._telemetry import (
    IngestBatch,
    WorkerOptions,
    _Collector,
    run_worker,
    spawn_context,
)
from tests._support.mqtt import (
    BrokerHarness,
    FakeEngine,
    cli_tls_args,
    device_client,
    front_door,
    mint_odd_certificate,
)
from tests.conftest import IssueFn, require_tool

MAX = 64 * 1024


def _string(raw: bytes) -> bytes:
    return struct.pack("!H", len(raw)) + raw


def publish(
    topic: bytes,
    payload: bytes,
    *,
    qos: int = 0,
    packet_id: int = 1,
    props: bytes = b"",
    flags: int | None = None,
) -> bytes:
    body = _string(topic) + (struct.pack("!H", packet_id) if qos else b"")
    body += encode_varint(len(props)) + props + payload
    first = 0x30 | (qos << 1) if flags is None else 0x30 | flags
    return bytes([first]) + encode_varint(len(body)) + body


def content_type(value: bytes) -> bytes:
    return b"\x03" + _string(value)


def test_publishes_are_read_in_bulk_whatever_the_chunking() -> None:
    rng = random.Random(7)
    expected: list[Publish] = []
    acks: list[bytes] = []
    stream = b""
    for i in range(300):
        topic = f"devices/dev-{i % 7}/telemetry".encode()
        payload = rng.randbytes(rng.choice([0, 1, 100, 1024, 5000]))
        qos = i % 2
        ctype = "application/x-protobuf" if i % 3 == 0 else None
        props = (
            content_type(ctype.encode()) + b"\x26" + _string(b"k") + _string(b"v") if ctype else b""
        )
        stream += publish(topic, payload, qos=qos, packet_id=i + 1, props=props)
        expected.append((topic, payload, ctype))
        if qos:
            acks.append(struct.pack("!H", i + 1))
    stream += b"\xd0\x00"  # PINGRESP: handed over apart, in order after the publishes
    reader = PacketReader(max_packet_bytes=MAX)
    got: list[Publish] = []
    got_acks: list[bytes] = []
    others: list[tuple[int, bytes]] = []
    at = 0
    while at < len(stream):
        step = rng.choice([1, 2, 3, 7, 100, 1500, 40_000])
        p, a, o = reader.feed(stream[at : at + step])
        got += p
        got_acks += a
        others += o
        at += step
    assert got == expected
    assert got_acks == acks
    assert others == [(0xD0, b"")]
    assert reader.buffered == 0


def test_a_truncated_packet_waits_for_the_rest() -> None:
    packet = publish(b"devices/d/telemetry", b"x" * 300)  # a two-byte remaining length
    reader = PacketReader(max_packet_bytes=MAX)
    for cut in (1, 2, 3, 50):
        reader = PacketReader(max_packet_bytes=MAX)
        assert reader.feed(packet[:cut]) == ([], [], [])
        assert reader.buffered == cut
        assert reader.feed(packet[cut:]) == ([(b"devices/d/telemetry", b"x" * 300, None)], [], [])


_TOPIC = b"devices/d/telemetry"
_MALFORMED = {
    "remaining length over 4 bytes": b"\x30\xff\xff\xff\xff\x7f",
    "remaining length not minimal": b"\x30\x80\x00",
    "remaining length not minimal (3 bytes)": b"\x30\x85\x80\x00" + b"\x00" * 5,
    "oversize (refused before it is read)": b"\x30" + encode_varint(MAX),
    "PUBLISH without a topic length": b"\x30\x01\x00",
    "topic past the packet": b"\x30\x05\x00\x64abc",
    "empty topic": b"\x30\x03\x00\x00\x00",
    "no property length": b"\x30" + encode_varint(len(_string(_TOPIC))) + _string(_TOPIC),
    "QoS 1 without a packet id": b"\x32"
    + encode_varint(len(_string(_TOPIC)) + 1)
    + _string(_TOPIC)
    + b"\x00",
    "QoS 2": publish(_TOPIC, b"{}", flags=0x04),
    "QoS 3": publish(_TOPIC, b"{}", flags=0x06),
    "QoS 0 with DUP": publish(_TOPIC, b"{}", flags=0x08),
    "packet id 0": publish(_TOPIC, b"{}", qos=1, packet_id=0),
    "properties past the packet": b"\x30"
    + encode_varint(len(_string(_TOPIC)) + 2)
    + _string(_TOPIC)
    + b"\x05\x01",
    "property value truncated": publish(_TOPIC, b"", props=b"\x03\x00\x09abc"),
    "unknown property": publish(_TOPIC, b"{}", props=b"\x7f\x00"),
    "property not allowed in PUBLISH": publish(_TOPIC, b"{}", props=b"\x11\x00\x00\x00\x01"),
    "topic alias (none allowed)": publish(_TOPIC, b"{}", props=b"\x23\x00\x01"),
    "content type twice": publish(_TOPIC, b"{}", props=content_type(b"a") + content_type(b"b")),
    "content type not UTF-8": publish(_TOPIC, b"{}", props=content_type(b"\xff\xfe")),
    "content type with U+0000": publish(_TOPIC, b"{}", props=content_type(b"a\x00b")),
}


@pytest.mark.parametrize("packet", _MALFORMED.values(), ids=_MALFORMED.keys())
def test_malformed_packets_are_refused(packet: bytes) -> None:
    reader = PacketReader(max_packet_bytes=MAX)
    good = publish(_TOPIC, b'{"batteryPercent": 5}')
    with pytest.raises(ProtocolViolation) as err:
        reader.feed(good + packet + good)
    assert err.value.reason


def test_largest_packet_announced_is_accepted() -> None:
    packet = publish(_TOPIC, b"")
    packet = publish(_TOPIC, b"x" * (MAX - len(packet) - 2))  # 2 more length bytes
    assert len(packet) == MAX
    assert PacketReader(max_packet_bytes=MAX).feed(packet)[0][0][1] == b"x" * (MAX - 26)
    with pytest.raises(ProtocolViolation, match="over the"):
        PacketReader(max_packet_bytes=MAX - 1).feed(packet)


def test_topics_outside_the_acl_pattern_are_counted_not_attributed() -> None:
    collector = _Collector(max_readings=32)
    body = b'{"batteryPercent": 50}'
    collector.take(
        [
            (b"devices/cam-1/telemetry", body, None),
            (b"devices/CAM-1/telemetry", body, None),  # a CN that is not a device id
            (b"devices/cam-1/frames", body, None),
            (b"devices/cam-1/x/telemetry", body, None),
            (b"devices/+/telemetry", body, None),
            (b"devices/cam-2/telemetry", b"{not json", None),
        ],
        now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    )
    batch = collector.batch(0, connected=True)
    assert [r.device_id for r in batch.latest] == ["cam-1"]
    assert batch.received == 2
    assert batch.rejected_topics == 4
    assert [e[0] for e in batch.errors] == ["cam-2"]
    with pytest.raises(ProtocolViolation, match="UTF-8"):
        collector.take([(b"devices/\xff/telemetry", body, None)], now=batch.latest[0].received_at)


# -- over a connection ---------------------------------------------------------------------


class ScriptedBroker:
    """A mutual-TLS peer on a free port that answers CONNECT and SUBSCRIBE, then sends
    ``script``; it records what the client sent."""

    def __init__(self, identity: pki.IdentityFiles, script: bytes) -> None:
        self._ctx = pki.server_ssl_context(identity)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.script = script
        self.received = b""
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self._listener.settimeout(20)
        raw, _ = self._listener.accept()
        with self._ctx.wrap_socket(raw, server_side=True) as conn:
            conn.settimeout(20)
            self._until(conn, 0x10)
            conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK, success, no properties
            self._until(conn, 0x82)
            conn.sendall(b"\x90\x04\x00\x01\x00\x00")  # SUBACK, QoS 0 granted
            conn.sendall(self.script)
            try:
                while data := conn.recv(65536):
                    self.received += data
            except (OSError, ssl.SSLError):
                pass

    def _until(self, conn: ssl.SSLSocket, first: int) -> None:
        while first not in self.received[-200:]:
            data = conn.recv(65536)
            if not data:
                raise ConnectionError("client went away")
            self.received += data

    def __enter__(self) -> ScriptedBroker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()
        self._thread.join(20)


@pytest.fixture
def identities(issue: IssueFn) -> tuple[pki.IdentityFiles, pki.IdentityFiles]:
    return issue("gateway", "gw-scripted"), issue("gateway", "gw-client")


def _subscriber(client: pki.IdentityFiles, port: int) -> Subscriber:
    return Subscriber(
        host="127.0.0.1",
        port=port,
        ssl_context=pki.client_ssl_context(client),
        client_id="_edgeward.gw.telemetry-0",
        username="_edgeward.gw",
        password="per-start-secret",
        topic_filter="$share/edgeward/devices/+/telemetry",
        qos=0,
        keepalive_s=30,
        session_expiry_s=3600,
        max_packet_bytes=MAX,
        connect_timeout_s=10,
    )


def _read_all(sub: Subscriber, want: int) -> list[Publish]:
    got: list[Publish] = []
    for _ in range(200):
        got += sub.read(0.05)
        if len(got) >= want:
            break
    return got


def test_connects_subscribes_and_reads(
    identities: tuple[pki.IdentityFiles, pki.IdentityFiles],
) -> None:
    server, client = identities
    script = b"".join(publish(_TOPIC, b"%d" % i) for i in range(50))
    with ScriptedBroker(server, script) as broker:
        sub = _subscriber(client, broker.port)
        sub.connect()
        got = _read_all(sub, 50)
        sub.close()
    assert [p[1] for p in got] == [b"%d" % i for i in range(50)]
    sent = broker.received
    # CONNECT: MQTT 5, user name + password, no clean start, keep-alive 30, session expiry
    # and the maximum packet size as properties, then the client id, user name, password.
    assert sent[0] == 0x10
    assert b"\x00\x04MQTT\x05\xc0\x00\x1e" in sent
    assert b"\x11\x00\x00\x0e\x10\x27" + struct.pack("!I", MAX) in sent
    assert _string(b"per-start-secret") in sent
    assert _string(b"$share/edgeward/devices/+/telemetry") + b"\x00" in sent
    assert sent.endswith(b"\xe0\x00")  # a normal DISCONNECT: the session stays


_NEVER_SENT_TO_A_SUBSCRIBER = {
    "PUBACK": b"\x40\x02\x00\x01",
    "a second CONNACK": b"\x20\x03\x00\x00\x00",
    "SUBSCRIBE": b"\x82\x05\x00\x02\x00\x00\x00",
    "PINGREQ": b"\xc0\x00",
    "AUTH": b"\xf0\x00",
    "reserved type 0": b"\x00\x00",
    "PINGRESP with flags": b"\xd1\x00",
    "bad remaining length": b"\x30\xff\xff\xff\xff\x01",
}


@pytest.mark.parametrize(
    "packet", _NEVER_SENT_TO_A_SUBSCRIBER.values(), ids=_NEVER_SENT_TO_A_SUBSCRIBER.keys()
)
def test_wrong_packet_types_close_the_connection(
    identities: tuple[pki.IdentityFiles, pki.IdentityFiles], packet: bytes
) -> None:
    server, client = identities
    with ScriptedBroker(server, publish(_TOPIC, b"before") + packet) as broker:
        sub = _subscriber(client, broker.port)
        sub.connect()
        with pytest.raises(ProtocolViolation) as err:
            _read_all(sub, 1_000)
        assert not sub.connected
    assert err.value.reason


def _pub(identity: pki.IdentityFiles, port: int, topic: str, payload: str, n: int) -> None:
    subprocess.run(
        [
            require_tool("mosquitto_pub"),
            *cli_tls_args(identity, port),
            *("-t", topic, "-m", payload, "-q", "0", "--repeat", str(n)),
        ],
        capture_output=True,
        timeout=30,
        check=True,
    )


@pytest.mark.parametrize("qos", [0, 1])
async def test_worker_counts_odd_topics_and_malformed_payloads(
    harness: BrokerHarness, issue: IssueFn, pki_dir: Path, tmp_path: Path, qos: int
) -> None:
    """A CN that is not a device id may write ``devices/<CN>/telemetry`` (the broker's ACL
    allows it): the worker counts it as a rejected topic and attributes nothing to anyone;
    malformed telemetry is counted as rejected; valid telemetry lands under its topic's id."""
    odd = mint_odd_certificate(pki_dir, tmp_path / "odd", common_name="VAC-ODD")
    device = issue("device", "vac-ok")
    settings = harness.settings.model_copy(update={"telemetry_workers": 1, "qos": qos})
    async with MqttBridge(
        settings,
        connection=harness.bridge_connection(),
        door=front_door(FakeEngine(), gateway_id="gw-mqtt"),
    ) as bridge:
        await bridge.wait_ready(timeout_s=30)
        await asyncio.to_thread(_pub, odd, harness.port, "devices/VAC-ODD/telemetry", "{}", 3)
        async with device_client(device, harness.port) as client:
            for _ in range(20):
                await client.publish("devices/vac-ok/telemetry", b"{not json", qos=qos)
            await client.publish(
                "devices/vac-ok/telemetry", json.dumps({"batteryPercent": 61}).encode(), qos=1
            )
        async with asyncio.timeout(20):
            while bridge.stats.telemetry_received < 21 or bridge.stats.rejected_topics < 3:  # noqa: ASYNC110 - polling the bridge's counters
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # anything more would have come by now
        assert bridge.stats.rejected_topics == 3
        assert bridge.stats.telemetry_received == 21
        assert bridge.stats.telemetry_rejected == 20
        latest = bridge.latest_telemetry("vac-ok")
        assert latest is not None
        assert latest.battery_percent == 61
        assert bridge.latest_telemetry("VAC-ODD") is None
        assert bridge.latest_telemetry("vac-odd") is None


def test_parent_applies_worker_counts_and_logs_connection_notes(tmp_path: Path) -> None:
    """A worker's connection events reach the gateway's log (one line each, with the
    reason); its rejected topics reach the bridge's counter."""
    rejected: list[None] = []
    ingest = TelemetryIngest(
        MqttSettings(data_dir=tmp_path),
        door=front_door(FakeEngine(), gateway_id="gw-mqtt"),
        stats=BridgeStats(),
        worker_options=lambda _i: pytest.fail("no worker is started"),
        prefer=lambda _d, _p: None,
        refused=lambda *_a, **_k: None,
        reject_topic=lambda: rejected.append(None),
        on_connected=lambda: None,
    )
    batch = IngestBatch(
        worker=3,
        received=5,
        latest=(),
        errors=(),
        connected=False,
        rejected_topics=4,
        notes=("connection closed: PUBLISH at QoS 2; subscribed at most QoS 1",),
    )
    with structlog.testing.capture_logs() as logs:
        ingest._apply_batch(batch, proc=object())
    assert ingest.stats.telemetry_received == 5
    assert len(rejected) == 4
    assert [(e["event"], e["worker"], e["detail"]) for e in logs] == [
        (
            "telemetry worker connection",
            3,
            "connection closed: PUBLISH at QoS 2; subscribed at most QoS 1",
        )
    ]


def _next_batch(conn: Connection, timeout_s: float) -> IngestBatch | None:
    """The worker's next batch, or ``None`` when none came within ``timeout_s``."""
    if not conn.poll(timeout_s):
        return None
    batch: IngestBatch = conn.recv()
    return batch


async def test_idle_worker_sends_nothing_until_telemetry_arrives(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    """A telemetry worker tells the gateway it connected, then stays silent while the fleet
    sends nothing (no empty batch waking the gateway's event loop every ``flush_s``); a
    reading that arrives goes out within ``flush_s`` of it, and a stop is obeyed while
    idle."""
    device = issue("device", "vac-quiet")
    bridge = harness.bridge_connection()
    opts = WorkerOptions(
        worker=0,
        host=bridge.host,
        port=bridge.port,
        identity_dir=str(bridge.identity.directory),
        username=bridge.username,
        password=bridge.password,
        client_id=internal_name("gw-mqtt", "telemetry-idle"),
        topic=f"$share/{harness.settings.shared_group}/devices/+/telemetry",
        qos=1,
        max_readings=16,
        session_expiry_s=0,
        keepalive_s=30,
        reconnect_min_s=0.2,
        reconnect_max_s=1.0,
        flush_s=0.05,
    )
    parent, child = spawn_context().Pipe()
    proc = spawn_context().Process(target=run_worker, args=(opts, child), daemon=True)
    proc.start()
    child.close()
    try:
        first = await asyncio.to_thread(_next_batch, parent, 60.0)
        assert first is not None
        assert (first.connected, first.received, first.latest) == (True, 0, ()), first.notes
        # Forty flush intervals with nothing sent: nothing comes (it used to be forty
        # empty batches).
        assert await asyncio.to_thread(_next_batch, parent, 40 * opts.flush_s) is None

        async with device_client(device, harness.port) as client:
            await client.publish(
                "devices/vac-quiet/telemetry", json.dumps({"batteryPercent": 42}).encode(), qos=1
            )
        batch = await asyncio.to_thread(_next_batch, parent, 20.0)
        assert batch is not None
        assert batch.received == 1
        assert [(r.device_id, r.battery_percent) for r in batch.latest] == [("vac-quiet", 42)]
        assert await asyncio.to_thread(_next_batch, parent, 40 * opts.flush_s) is None

        parent.send("stop")
        await asyncio.to_thread(proc.join, 30.0)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.terminate()
        parent.close()
