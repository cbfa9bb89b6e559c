"""Telemetry from ``devices/<id>/telemetry``: parsing, validation, and ingest processes.

One asyncio MQTT client tops out near 3k messages a second on a small machine while the broker
does 60k (``reference/anchors.md``), so telemetry is consumed by ``telemetry_workers`` separate
processes, each a lean single-threaded MQTT 5 subscriber (``_subscriber``: bulk reads, PUBLISH
packets parsed in bulk) on the same shared subscription ``$share/<group>/devices/+/telemetry``:
the broker spreads messages across them. Each worker validates every message, keeps only the
latest record per device, and sends the parent what changed (latest records, error reports,
counts) over a pipe at most ``flush_s`` after the first of it arrived; the parent's event loop
applies it with one read per flush, not one per message. A worker with nothing to send sends
nothing: a quiet fleet costs the gateway no periodic work (a worker wakes once a second to
look for its parent's stop, and pings the broker at its keepalive).

The bounds are the gRPC ``ReportTelemetry`` ones (``gateway/_door/_telemetry_store.py``): the same
device gets the same answer whichever protocol it speaks. This module imports nothing heavy
(no onnxruntime, no grpc) so a worker process starts quickly.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import multiprocessing
import random
import ssl
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError

import pki
from gateway._mqtt._subscriber import ConnectRefused, ProtocolViolation, Publish, Subscriber
from gateway._telemetry import FIRMWARE, READING_KEY, InvalidTelemetry, validate_telemetry
from protos.edgeward.v1 import common_pb2
from protos.edgeward.v1.wire import PROTOBUF_CONTENT_TYPE

__all__ = [
    "PROTOBUF_CONTENT_TYPE",
    "IngestBatch",
    "InvalidTelemetry",
    "TelemetryReading",
    "WorkerOptions",
    "parse_telemetry",
    "run_worker",
]


_loads: Callable[[bytes], Any]
try:
    # Compiled JSON parsing: 1.9 µs for the 1 kB benchmark message against the stdlib's
    # 10 µs, which was most of a worker's validation time. Where orjson succeeds it builds
    # the same objects as the stdlib (``tests/mqtt/test_telemetry.py`` compares the answers).
    import orjson

    _loads = orjson.loads
except ImportError:  # a gateway installed without it: the same answers, slower
    _loads = json.loads

#: Largest telemetry payload read at all; a larger one is refused unparsed.
MAX_TELEMETRY_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class TelemetryReading:
    """A validated telemetry message (picklable: it crosses from the worker processes)."""

    device_id: str
    received_at: dt.datetime
    reported_at: dt.datetime | None
    battery_percent: float
    temperature_c: float
    firmware_version: str
    readings: Mapping[str, float]
    protobuf: bool


def parse_telemetry(
    device_id: str,
    payload: bytes,
    *,
    content_type: str | None,
    max_readings: int,
    now: dt.datetime,
) -> TelemetryReading:
    """A JSON object (protobuf's JSON mapping) or a ``Telemetry`` protobuf, validated."""
    if len(payload) > MAX_TELEMETRY_BYTES:
        raise InvalidTelemetry(f"telemetry is {len(payload)} bytes, limit {MAX_TELEMETRY_BYTES}")
    msg = common_pb2.Telemetry()
    protobuf = content_type == PROTOBUF_CONTENT_TYPE
    try:
        if protobuf:
            msg.ParseFromString(payload)
        else:
            try:
                obj = _loads(payload)
            except ValueError:
                obj = None
            fast = _plain_json(obj, max_readings) if type(obj) is dict else None
            if fast is not None:
                return TelemetryReading(device_id, now, None, *fast, protobuf=False)
            # Anything else is answered from the stdlib's parse, the reference: orjson
            # refuses some of what it accepts (NaN, a BOM, UTF-16, lone surrogates, 1e400)
            # and reads integers beyond 64 bits as floats.
            obj = json.loads(payload)
            if not isinstance(obj, dict):
                raise InvalidTelemetry("telemetry must be a JSON object")  # noqa: TRY301
            json_format.ParseDict(obj, msg)
    except InvalidTelemetry:
        raise
    except (DecodeError, ValueError, json_format.ParseError, RecursionError) as exc:
        # Keep the message short:
        # it goes back to the device.
        kind = "protobuf" if protobuf else "JSON"
        raise InvalidTelemetry(f"not a valid Telemetry {kind}: {str(exc)[:160]}") from None
    fields = validate_telemetry(msg, max_readings=max_readings)
    return TelemetryReading(
        device_id=device_id,
        received_at=now,
        reported_at=fields.reported_at,
        battery_percent=fields.battery_percent,
        temperature_c=fields.temperature_c,
        firmware_version=fields.firmware_version,
        readings=fields.readings,
        protobuf=protobuf,
    )


_FLOAT32 = struct.Struct("<f")
_JSON_NAMES = {
    "batteryPercent": "battery",
    "battery_percent": "battery",
    "temperatureC": "temperature",
    "temperature_c": "temperature",
    "firmwareVersion": "firmware",
    "firmware_version": "firmware",
    "readings": "readings",
}
_EXACT_INT = 2**53  # beyond it an int does not convert to a double exactly


def _number(value: object) -> float | None:
    # bool is an int in Python, not a number in protobuf's JSON mapping.
    if type(value) is float:
        return value if math.isfinite(value) else None
    if type(value) is int and -_EXACT_INT <= value <= _EXACT_INT:
        return float(value)
    return None


def _plain_json(
    obj: dict[str, Any], max_readings: int
) -> tuple[float, float, str, dict[str, float]] | None:
    """The fields of a *valid*, plainly written telemetry object, or ``None``.

    protobuf's ``ParseDict`` costs about 100 µs for a 1 kB message, most of the ingest
    budget. The common case (known keys, JSON numbers, a valid firmware string and readings,
    no ``reportedAt``) is read here directly with the same result, floats rounded to 32 bits
    as the ``float`` fields are; anything else (a field twice, numbers as strings, a
    timestamp, any invalid value) returns ``None`` and takes the full path, which gives the
    canonical answer or error. ``tests/mqtt/test_telemetry.py`` checks both agree.

    Readings are checked a whole map at a time (their value types as one set, finiteness
    with one ``map``, keys against the set of keys already seen valid), not one call per
    reading: per-reading calls made this twice as slow as ``json.loads`` itself.
    """
    seen: dict[str, object] = {}
    for key, value in obj.items():
        name = _JSON_NAMES.get(key)
        if name is None or name in seen:
            return None
        seen[name] = value
    values = [0.0, 0.0]
    for i, name in enumerate(("battery", "temperature")):
        if name in seen:
            number = _number(seen[name])
            if number is None:
                return None
            try:
                values[i] = _FLOAT32.unpack(_FLOAT32.pack(number))[0]
            except OverflowError:
                return None
    battery, temperature = values
    if not (battery == -1.0 or 0.0 <= battery <= 100.0) or not -100.0 <= temperature <= 200.0:
        return None
    firmware = seen.get("firmware", "")
    if type(firmware) is not str or FIRMWARE.fullmatch(firmware) is None:
        return None
    raw = seen.get("readings", {})
    if type(raw) is not dict or len(raw) > max_readings:
        return None
    if not _valid_reading_keys(raw):
        return None
    kinds = set(map(type, raw.values()))
    if kinds <= _FLOAT_ONLY:
        # json.loads made this dict for this message alone: it is kept as it is.
        return (
            (battery, temperature, firmware, raw) if all(map(math.isfinite, raw.values())) else None
        )
    if not kinds <= _JSON_NUMBERS:
        return None  # bool, str, list, object, null: the full path says why
    readings: dict[str, float] = {}
    for key, value in raw.items():
        number = _number(value)
        if number is None:
            return None
        readings[key] = number
    return battery, temperature, firmware, readings


_FLOAT_ONLY: frozenset[type] = frozenset({float})
_JSON_NUMBERS: frozenset[type] = frozenset({float, int})
#: Reading keys already matched against ``READING_KEY``. Devices send the same few keys in
#: every message, so a set lookup replaces a regular expression per reading. Bounded: once
#: full, new keys are still checked, just not remembered.
_KNOWN_READING_KEYS: set[str] = set()
_KNOWN_READING_KEYS_MAX = 16_384


def _valid_reading_keys(readings: dict[str, Any]) -> bool:
    known = _KNOWN_READING_KEYS
    if known.issuperset(readings):
        return True
    for key in readings:
        if key not in known:
            if READING_KEY.fullmatch(key) is None:
                return False
            if len(known) < _KNOWN_READING_KEYS_MAX:
                known.add(key)
    return True


def device_from_topic(topic: str, suffix: str) -> str | None:
    """``<id>`` of ``devices/<id>/<suffix>`` when it is a valid device id, else ``None``.

    The broker's ACL already ties the topic to the publisher's certificate CN (a device may
    write only ``devices/<its CN>/…``), so the id in the topic *is* the certificate's. It is
    still checked against the id pattern: a certificate from our CA with an odd CN (upper
    case, ``/``, ``+``) must not become a device id here.
    """
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != "devices" or parts[2] != suffix:
        return None
    if pki.ID_PATTERN.fullmatch(parts[1]) is None:
        return None
    return parts[1]


@dataclass(frozen=True, slots=True)
class IngestBatch:
    """What one worker sends its parent per flush."""

    worker: int
    received: int
    latest: tuple[TelemetryReading, ...]
    errors: tuple[tuple[str, str, bool], ...]  # (device id, message, protobuf?)
    connected: bool
    rejected_topics: int = 0  # topics that are not ``devices/<valid id>/telemetry``
    notes: tuple[str, ...] = ()  # connection events, for the parent's log


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """Everything a worker process needs (sent through the spawn pipe, never on argv)."""

    worker: int
    host: str
    port: int
    identity_dir: str
    username: str | None
    password: str | None
    client_id: str
    topic: str
    qos: int
    max_readings: int
    session_expiry_s: int
    keepalive_s: int
    reconnect_min_s: float
    reconnect_max_s: float
    check_hostname: bool = True
    flush_s: float = 0.05
    #: Largest packet accepted from the broker (the broker's own ``max_packet_size``).
    max_packet_bytes: int = 4 * 1024 * 1024 + 65536
    connect_timeout_s: float = 10.0

    def __repr__(self) -> str:  # never show the password
        return f"WorkerOptions(worker={self.worker}, client_id={self.client_id!r})"


#: Most errors and connection notes one flush carries; the counters stay exact.
_MAX_ERRORS = 1000
_MAX_NOTES = 20
_MAX_TOPICS = 100_000


class _Collector:
    """What a worker gathered since its last flush: counts, latest reading per device, errors.

    Topics are resolved to device ids once per topic (a bounded cache), not per message.
    """

    def __init__(self, max_readings: int) -> None:
        self.max_readings = max_readings
        self.received = 0
        self.rejected_topics = 0
        self.latest: dict[str, TelemetryReading] = {}
        self.errors: list[tuple[str, str, bool]] = []
        self.notes: list[str] = []
        self._devices: dict[bytes, str] = {}  # topic → device id, "" when refused

    def take(self, publishes: list[Publish], now: dt.datetime) -> None:
        devices = self._devices
        latest = self.latest
        max_readings = self.max_readings
        received = 0
        for topic, payload, content_type in publishes:
            device_id = devices.get(topic)
            if device_id is None:
                device_id = self._device(topic)
            if not device_id:
                self.rejected_topics += 1
                continue
            received += 1
            try:
                latest[device_id] = parse_telemetry(
                    device_id,
                    payload,
                    content_type=content_type,
                    max_readings=max_readings,
                    now=now,
                )
            except InvalidTelemetry as exc:
                if len(self.errors) < _MAX_ERRORS:
                    protobuf = content_type == PROTOBUF_CONTENT_TYPE
                    self.errors.append((device_id, str(exc), protobuf))
        self.received += received

    def _device(self, topic: bytes) -> str:
        try:
            text = topic.decode()
        except UnicodeDecodeError:
            raise ProtocolViolation("PUBLISH topic is not valid UTF-8") from None
        device_id = device_from_topic(text, "telemetry") or ""
        if len(self._devices) >= _MAX_TOPICS:
            self._devices.clear()
        self._devices[topic] = device_id
        return device_id

    def pending(self) -> bool:
        """Whether anything was gathered since the last flush."""
        return bool(
            self.received or self.rejected_topics or self.latest or self.errors or self.notes
        )

    def note(self, text: str) -> None:
        if len(self.notes) < _MAX_NOTES:
            self.notes.append(text)

    def batch(self, worker: int, *, connected: bool) -> IngestBatch:
        batch = IngestBatch(
            worker=worker,
            received=self.received,
            latest=tuple(self.latest.values()),
            errors=tuple(self.errors),
            connected=connected,
            rejected_topics=self.rejected_topics,
            notes=tuple(self.notes),
        )
        self.received = self.rejected_topics = 0
        self.latest.clear()
        self.errors.clear()
        self.notes.clear()
        return batch


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ProtocolViolation | ConnectRefused):
        return exc.reason
    return f"{type(exc).__name__}: {exc}"[:200]


#: What ends one connection (the worker connects again after its backoff).
_CONNECTION_ERRORS = (OSError, ProtocolViolation, ConnectRefused)


#: How often an idle worker looks for its parent's ``stop`` (the parent waits 5 s for it).
IDLE_CHECK_S = 1.0


def run_worker(opts: WorkerOptions, conn: Connection) -> None:
    """Body of one ingest process: consume, validate, coalesce, flush to ``conn``.

    One thread: the subscriber's reads wait at most until the gathered batch is due
    (``flush_s`` after its first message) or, with nothing gathered, :data:`IDLE_CHECK_S`.
    A batch goes out only when there is something in it or the connection state changed,
    so an idle fleet wakes neither the worker nor the gateway's event loop periodically.
    """
    ctx: ssl.SSLContext = pki.client_ssl_context(
        pki.IdentityFiles(Path(opts.identity_dir)),
        check_hostname=opts.check_hostname,
    )
    sub = Subscriber(
        host=opts.host,
        port=opts.port,
        ssl_context=ctx,
        client_id=opts.client_id,
        username=opts.username,
        password=opts.password,
        topic_filter=opts.topic,
        qos=opts.qos,
        keepalive_s=opts.keepalive_s,
        session_expiry_s=opts.session_expiry_s,
        max_packet_bytes=opts.max_packet_bytes,
        connect_timeout_s=opts.connect_timeout_s,
    )
    collector = _Collector(opts.max_readings)
    delay = opts.reconnect_min_s
    retry_at = 0.0
    reported = False  # the connection state the parent was last told
    flush_at: float | None = None  # when the gathered batch is due; None: nothing gathered
    check_at = time.monotonic() + IDLE_CHECK_S
    try:
        while True:
            now = time.monotonic()
            wake = check_at if flush_at is None else min(flush_at, check_at)
            if sub.connected:
                try:
                    publishes = sub.read(wake - now)
                    if publishes:
                        collector.take(publishes, dt.datetime.now(dt.UTC))
                except _CONNECTION_ERRORS as exc:
                    sub.close(send_disconnect=False)
                    collector.note(f"connection closed: {_reason(exc)}")
                    retry_at = time.monotonic() + delay * random.uniform(0.5, 1.0)  # noqa: S311
                    delay = min(delay * 2, opts.reconnect_max_s)
            elif now >= retry_at:
                try:
                    sub.connect()
                    delay = opts.reconnect_min_s
                except _CONNECTION_ERRORS as exc:
                    collector.note(f"connect failed: {_reason(exc)}")
                    retry_at = time.monotonic() + delay * random.uniform(0.5, 1.0)  # noqa: S311
                    delay = min(delay * 2, opts.reconnect_max_s)
            elif conn.poll(max(0.0, min(retry_at, wake) - now)) and conn.recv() == "stop":
                break
            now = time.monotonic()
            if flush_at is None and (collector.pending() or sub.connected != reported):
                flush_at = now + opts.flush_s
            due = flush_at is not None and now >= flush_at
            if due or now >= check_at:
                if conn.poll() and conn.recv() == "stop":
                    break
                check_at = now + IDLE_CHECK_S
            if due:
                reported = sub.connected
                conn.send(collector.batch(opts.worker, connected=reported))
                flush_at = None
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the parent went away: stop quietly
    finally:
        sub.close()


def spawn_context() -> Any:
    """Worker processes are spawned, not forked: the gateway holds threads (onnxruntime)."""
    return multiprocessing.get_context("spawn")
