"""Validation of device telemetry, shared by the gRPC servicer and the MQTT ingest workers.

It imports protobuf but neither grpc nor onnxruntime, so the MQTT ingest worker processes can
use it without loading either.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import InvalidTelemetry
from protos.edgeward.v1 import common_pb2

__all__ = [
    "FIRMWARE",
    "READING_KEY",
    "InvalidTelemetry",
    "TelemetryFields",
    "validate_telemetry",
]

READING_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
FIRMWARE = re.compile(r"[\x21-\x7e]{0,64}")


@dataclass(frozen=True, slots=True)
class TelemetryFields:
    """The validated content of a ``Telemetry`` message."""

    reported_at: dt.datetime | None
    battery_percent: float
    temperature_c: float
    firmware_version: str
    readings: Mapping[str, float]


def validate_telemetry(msg: common_pb2.Telemetry, *, max_readings: int) -> TelemetryFields:
    """Check every field's bounds; raise :class:`InvalidTelemetry` naming the first bad one."""
    battery = float(msg.battery_percent)
    if not (battery == -1.0 or 0.0 <= battery <= 100.0):
        raise InvalidTelemetry("battery_percent must be 0..100, or -1 without a battery")
    temperature = float(msg.temperature_c)
    if not -100.0 <= temperature <= 200.0:
        raise InvalidTelemetry("temperature_c must be within -100..200")
    if FIRMWARE.fullmatch(msg.firmware_version) is None:
        raise InvalidTelemetry("firmware_version must be at most 64 printable ASCII characters")
    if len(msg.readings) > max_readings:
        raise InvalidTelemetry(f"at most {max_readings} readings")
    readings: dict[str, float] = {}
    for key, value in msg.readings.items():
        if READING_KEY.fullmatch(key) is None:
            raise InvalidTelemetry("reading keys must be 1-64 characters of a-z, 0-9, _ . -")
        if not math.isfinite(value):
            raise InvalidTelemetry(f"reading {key} is not a finite number")
        readings[key] = float(value)
    reported_at = None
    if msg.HasField("reported_at"):
        try:
            reported_at = msg.reported_at.ToDatetime(tzinfo=dt.UTC)
        except (ValueError, OverflowError):
            raise InvalidTelemetry("reported_at is not a valid time") from None
    return TelemetryFields(
        reported_at=reported_at,
        battery_percent=battery,
        temperature_c=temperature,
        firmware_version=msg.firmware_version,
        readings=readings,
    )
