"""The gateway's one store of device telemetry: the latest validated report per device.

Both transports write here (gRPC ``ReportTelemetry`` through :func:`telemetry_from_pb`, MQTT
``devices/<id>/telemetry`` through :func:`record_from_fields`), after the front door admitted
the device; the CLI, metrics and plug-ins read it.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from gateway._telemetry import InvalidTelemetry, TelemetryFields, validate_telemetry
from gateway.errors import InvalidRequest
from protos.edgeward.v1 import common_pb2

__all__ = ["TelemetryRecord", "TelemetryStore", "record_from_fields", "telemetry_from_pb"]


@dataclass(frozen=True, slots=True)
class TelemetryRecord:
    """The latest telemetry a device reported."""

    device_id: str
    received_at: dt.datetime
    reported_at: dt.datetime | None
    battery_percent: float
    temperature_c: float
    firmware_version: str
    readings: Mapping[str, float]


class TelemetryStore:
    """Latest telemetry per device, bounded (least recently reporting device dropped)."""

    def __init__(self, *, max_devices: int = 100_000) -> None:
        self._max_devices = max_devices
        self._latest: OrderedDict[str, TelemetryRecord] = OrderedDict()

    def put(self, record: TelemetryRecord) -> None:
        self._latest[record.device_id] = record
        self._latest.move_to_end(record.device_id)
        if len(self._latest) > self._max_devices:
            self._latest.popitem(last=False)

    def latest(self, device_id: str) -> TelemetryRecord | None:
        return self._latest.get(device_id)

    def __len__(self) -> int:
        return len(self._latest)


def telemetry_from_pb(
    device_id: str, msg: common_pb2.Telemetry, *, max_readings: int, now: dt.datetime
) -> TelemetryRecord:
    """Validate and convert; raise :class:`InvalidRequest` naming the bad field."""
    try:
        fields = validate_telemetry(msg, max_readings=max_readings)
    except InvalidTelemetry as exc:
        raise InvalidRequest(str(exc)) from None
    return record_from_fields(device_id, fields, received_at=now)


def record_from_fields(
    device_id: str, fields: TelemetryFields, *, received_at: dt.datetime
) -> TelemetryRecord:
    """A validated report as the store's record."""
    return TelemetryRecord(
        device_id=device_id,
        received_at=received_at,
        reported_at=fields.reported_at,
        battery_percent=fields.battery_percent,
        temperature_c=fields.temperature_c,
        firmware_version=fields.firmware_version,
        readings=dict(fields.readings),
    )
