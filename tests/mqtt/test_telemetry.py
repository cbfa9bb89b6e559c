"""Telemetry parsing: the fast path for plain JSON gives exactly the full path's answers."""

from __future__ import annotations

import datetime as dt
import json
import random
from typing import Any

import pytest

from gateway._mqtt import _telemetry
from gateway._mqtt._telemetry import TelemetryReading, parse_telemetry
from gateway.errors import InvalidTelemetry

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

_VALUES: list[Any] = [
    0,
    -1,
    57,
    57.1,
    100,
    100.0001,
    -100,
    200.5,
    1e39,
    -1e39,
    2**60,
    2**64,
    10**30,
    -(2**63) - 1,
    3.4e38,
    True,
    False,
    None,
    "57",
    "NaN",
    "",
    [],
    {},
    float("nan"),
    float("inf"),
]
_KEYS = [
    "batteryPercent",
    "battery_percent",
    "temperatureC",
    "temperature_c",
    "firmwareVersion",
    "firmware_version",
    "readings",
    "reportedAt",
    "colour",
]
_FIRMWARE = ["1.4.2", "", "with space", "x" * 64, "x" * 65, "é", 7]
_READING_KEYS = ["wifi_rssi", "a", "A", "dust.bin-full", "", "x" * 64, "x" * 65, "bad key"]


def _random_object(rng: random.Random) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key in rng.sample(_KEYS, rng.randint(0, 4)):
        if key.startswith("firmware"):
            obj[key] = rng.choice(_FIRMWARE)
        elif key == "readings":
            if rng.random() < 0.1:
                obj[key] = rng.choice(_VALUES)
            else:
                size = rng.choice([0, 1, 3, 32, 33])
                obj[key] = {
                    rng.choice(_READING_KEYS) + (str(i) if size > 3 else ""): rng.choice(_VALUES)
                    for i in range(size)
                }
        elif key == "reportedAt":
            obj[key] = rng.choice(["2026-01-01T00:00:00Z", "yesterday", 5])
        else:
            obj[key] = rng.choice(_VALUES)
    return obj


def _outcome(payload: bytes) -> TelemetryReading | str:
    try:
        return parse_telemetry("dev-a", payload, content_type=None, max_readings=32, now=NOW)
    except InvalidTelemetry as exc:
        return f"error: {exc}"


def _same(fast: TelemetryReading | str, full: TelemetryReading | str) -> bool:
    if isinstance(fast, str) or isinstance(full, str):
        return fast == full
    # Valid readings are finite (NaN is refused), so equality is well defined; the readings
    # compare as mappings (protobuf's map order is its own).
    return fast == full


def test_fast_path_agrees_with_protobuf_parse_dict(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(20260101)
    payloads = [json.dumps(_random_object(rng), allow_nan=True).encode() for _ in range(3000)]
    payloads.append(
        b'{"batteryPercent": 57.1, "temperatureC": 31.5, "firmwareVersion": "1.4.2",'
        b' "readings": {"wifi_rssi": -61}}'
    )
    fast = [_outcome(p) for p in payloads]
    taken = sum(1 for p in payloads if _telemetry._plain_json(json.loads(p), 32) is not None)
    # The reference: the stdlib's JSON parser and protobuf's ParseDict for everything.
    monkeypatch.setattr(_telemetry, "_plain_json", lambda _obj, _max: None)
    monkeypatch.setattr(_telemetry, "_loads", json.loads)
    full = [_outcome(p) for p in payloads]
    mismatches = [
        (p, a, b) for p, a, b in zip(payloads, fast, full, strict=True) if not _same(a, b)
    ]
    assert not mismatches, mismatches[:3]
    # Both kinds of input occur: the comparison covers the fast path and the fallbacks
    assert 100 < taken < len(payloads) - 100, taken
    assert isinstance(full[-1], TelemetryReading)
    assert full[-1].battery_percent == pytest.approx(57.1, abs=1e-5)
