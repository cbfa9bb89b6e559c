"""Telemetry from ``devices/<id>/telemetry``: parsing, validation, and ingest processes.

One asyncio MQTT client tops out near 3k messages a second on a small machine while the broker
does 60k (``reference/anchors.md``), so telemetry is consumed by ``telemetry_workers`` separate
processes, each a plain threaded MQTT client (paho, the library under aiomqtt) on the same MQTT 5
shared subscription ``$share/<group>/devices/+/telemetry``: the broker spreads messages across
them. Each worker validates, keeps only the latest record per device, and every
``flush_s`` sends the parent what changed (latest records, error reports, counts) over a pipe;
the parent's event loop applies it with one read per flush, not one per message.

The bounds are the gRPC ``ReportTelemetry`` ones (``gateway/_door/_telemetry_store.py``): the same
device gets the same answer whichever protocol it speaks. This module imports nothing heavy
(no onnxruntime, no grpc) so a worker process starts quickly.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import multiprocessing
import ssl
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError

import pki
from gateway._mqtt._config import NODELAY
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
            obj = json.loads(payload)
            if not isinstance(obj, dict):
                raise InvalidTelemetry("telemetry must be a JSON object")  # noqa: TRY301
            fast = _plain_json(obj, max_readings)
            if fast is not None:
                return TelemetryReading(device_id, now, None, *fast, protobuf=False)
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
    canonical answer or error. ``tests/mqtt/test_config.py`` checks both agree.
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
    readings: dict[str, float] = {}
    for key, value in raw.items():
        number = _number(value)
        if number is None or READING_KEY.fullmatch(key) is None:
            return None
        readings[key] = number
    return battery, temperature, firmware, readings


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

    def __repr__(self) -> str:  # never show the password
        return f"WorkerOptions(worker={self.worker}, client_id={self.client_id!r})"


def run_worker(opts: WorkerOptions, conn: Connection) -> None:
    """Body of one ingest process: consume, validate, coalesce, flush to ``conn``."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    lock = threading.Lock()
    latest: dict[str, TelemetryReading] = {}
    errors: list[tuple[str, str, bool]] = []
    state = {"received": 0, "connected": False}

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        device_id = device_from_topic(message.topic, "telemetry")
        if device_id is None:
            return
        content_type = getattr(message.properties, "ContentType", None)
        try:
            reading = parse_telemetry(
                device_id,
                message.payload,
                content_type=content_type,
                max_readings=opts.max_readings,
                now=dt.datetime.now(dt.UTC),
            )
        except InvalidTelemetry as exc:
            with lock:
                state["received"] += 1
                if len(errors) < 1000:
                    errors.append((device_id, str(exc), content_type == PROTOBUF_CONTENT_TYPE))
            return
        with lock:
            state["received"] += 1
            latest[device_id] = reading

    def on_connect(client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            state["connected"] = True
            client.subscribe(opts.topic, qos=opts.qos)

    def on_disconnect(*_args: Any) -> None:
        state["connected"] = False

    def on_socket_open(_c: Any, _u: Any, sock: Any) -> None:
        # Without it each PUBACK may wait for the broker's delayed ACK (Nagle).
        for option in NODELAY:
            sock.setsockopt(*option)

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=opts.client_id,
        protocol=mqtt.MQTTv5,
    )
    ctx: ssl.SSLContext = pki.client_ssl_context(
        pki.IdentityFiles(Path(opts.identity_dir)),
        check_hostname=opts.check_hostname,
    )
    client.tls_set_context(ctx)
    if opts.username is not None:
        client.username_pw_set(opts.username, opts.password)
    client.on_message = on_message
    client.on_connect = on_connect
    client.on_socket_open = on_socket_open
    client.on_disconnect = on_disconnect
    client.reconnect_delay_set(
        max(1, round(opts.reconnect_min_s)), max(1, round(opts.reconnect_max_s))
    )
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = opts.session_expiry_s
    client.connect_async(
        opts.host, opts.port, keepalive=opts.keepalive_s, clean_start=False, properties=props
    )
    client.loop_start()
    try:
        while True:
            if conn.poll(opts.flush_s) and conn.recv() == "stop":
                break
            with lock:
                batch = IngestBatch(
                    worker=opts.worker,
                    received=state["received"],
                    latest=tuple(latest.values()),
                    errors=tuple(errors),
                    connected=bool(state["connected"]),
                )
                state["received"] = 0
                latest.clear()
                errors.clear()
            conn.send(batch)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the parent went away: stop quietly
    finally:
        client.disconnect()
        client.loop_stop()


def spawn_context() -> Any:
    """Worker processes are spawned, not forked: the gateway holds threads (onnxruntime)."""
    return multiprocessing.get_context("spawn")
