"""One device's refused flood costs a bounded amount of log and of error events.

A real gateway (mTLS gRPC and the managed Mosquitto with its bridge) with a rate limit that
leaves one frame per device: thousands of frames from one device are refused (rate limited,
malformed) over both transports while structlog's output is captured. The refusal lines of
that device stay under a small constant, their counts add up to what was sent, Prometheus
counts every refusal, the device gets a bounded number of error events with the count of the
rest, and another device is served meanwhile. :class:`RefusalLog` itself is checked at an
injected clock.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import grpc
import pytest
import structlog

import pki
from gateway._refusals import RefusalLog
from protos.edgeward.v1 import common_pb2, gateway_pb2_grpc
from tests._support.mqtt import collect, device_client, frame_props, mqtt_gateway
from tests.conftest import PHOTOS, require_tool

GRPC_FRAMES = 1500
MQTT_FRAMES = 1200
MQTT_MALFORMED = 300
REFUSAL_EVENTS = ("message refused", "messages refused")


def _refusal_lines(
    logs: Sequence[MutableMapping[str, Any]], device_id: str
) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] in REFUSAL_EVENTS and e.get("device_id") == device_id]


def _counts(lines: Sequence[MutableMapping[str, Any]]) -> dict[str, int]:
    """Refusals per reason as the lines report them (first lines count 1, then sums)."""
    out: dict[str, int] = {}
    for line in lines:
        counts = {line["reason"]: line["count"]} if "reason" in line else line["counts"]
        for reason, n in counts.items():
            out[reason] = out.get(reason, 0) + n
    return out


def _error_event(message: aiomqtt.Message) -> dict[str, str]:
    """An error event as JSON fields, whichever encoding the device's last frame asked for."""
    body = bytes(message.payload)  # type: ignore[arg-type]
    content_type = getattr(message.properties, "ContentType", "")
    if content_type == "application/x-protobuf":
        error = common_pb2.DeviceEvent.FromString(body).error
        return {"code": error.code, "message": error.message}
    fields: dict[str, str] = json.loads(body)["error"]
    return fields


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.compile(rf"^edgeward_gateway_{name}\{{{re.escape(want)}\}} (\S+)$", re.M)
    match = pattern.search(text)
    return float(match.group(1)) if match else 0.0


def _metrics_text(service: Any) -> str:
    import urllib.request

    url = f"http://127.0.0.1:{service.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def _channel(service: Any, identity: pki.IdentityFiles) -> grpc.aio.Channel:
    creds = pki.grpc_channel_credentials(
        ca_bundle_pem=service.identity.ca_bundle.read_bytes(), identity=identity
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{service.grpc_port}", creds)


async def _grpc_flood(stub: Any, n: int) -> dict[str, int]:
    """``n`` Detect calls, 64 at a time; status name → how many."""
    codes: dict[str, int] = {}
    window = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        async with window:
            try:
                await stub.Detect(common_pb2.Frame(image=b"not an image", frame_id=f"g-{i}"))
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            codes[code] = codes.get(code, 0) + 1

    await asyncio.gather(*(one(i) for i in range(n)))
    return codes


async def test_a_refused_flood_writes_bounded_log_and_events_with_exact_counts(
    tmp_path: Path,
) -> None:
    require_tool("mosquitto")
    jpeg = (PHOTOS / "chelsea.jpg").read_bytes()
    limits = {
        "frames_per_s": 0.001,  # one token for the whole test, then every frame is refused
        "burst": 1,
        "refusal_log_interval_s": 3600.0,  # the whole flood falls in one interval
        "refusal_events_per_interval": 4,
    }
    with structlog.testing.capture_logs() as logs:
        # Every refused frame is read and counted here: the flooder stays connected, and the
        # broker's own limit (tests/mqtt/test_ingest_limit.py) leaves them all to the bridge.
        mqtt = {"disconnect_after_refusals": 0, "ingest_limit_factor": 0}
        async with mqtt_gateway(tmp_path, limits=limits, mqtt=mqtt) as gw:
            service = gw.service
            flood = gw.device("cam-flood", device_type="pet_camera")
            calm = gw.device("cam-calm", device_type="pet_camera")
            async with device_client(flood, gw.port) as client:
                await client.subscribe("devices/cam-flood/events", qos=1)
                # gRPC: the first frame takes the one token and is refused as not an image;
                # the rest are rate limited. The other device is served meanwhile.
                async with _channel(service, flood) as ch, _channel(service, calm) as calm_ch:
                    calm_stub = gateway_pb2_grpc.DeviceGatewayStub(calm_ch)
                    codes, answer = await asyncio.gather(
                        _grpc_flood(gateway_pb2_grpc.DeviceGatewayStub(ch), GRPC_FRAMES),
                        calm_stub.Detect(common_pb2.Frame(image=jpeg, frame_id="calm-1")),
                    )
                    assert answer.frame_id == "calm-1"
                    assert "Cat" in {d.label for d in answer.detections}
                assert codes == {"INVALID_ARGUMENT": 1, "RESOURCE_EXHAUSTED": GRPC_FRAMES - 1}
                # MQTT: malformed protobuf frames, then frames, all refused by the same
                # per-device budget on receipt, before any of them is parsed.
                for i in range(MQTT_MALFORMED):
                    await client.publish(
                        "devices/cam-flood/frames",
                        b"\xff\xff\xff",
                        qos=1,
                        properties=frame_props(f"bad-{i}", protobuf=True),
                    )
                for i in range(MQTT_FRAMES):
                    await client.publish(
                        "devices/cam-flood/frames", b"x", qos=1, properties=frame_props(f"m-{i}")
                    )
                rate_limited = GRPC_FRAMES - 1 + MQTT_MALFORMED + MQTT_FRAMES
                deadline = time.monotonic() + 120
                while _metric(_metrics_text(service), "denials_total", reason="rate_limited") < (
                    rate_limited
                ):
                    assert time.monotonic() < deadline, "the bridge did not judge every frame"
                    await asyncio.sleep(0.2)
                # The interval is an hour: end it now, as stopping the gateway does.
                service.door.refusals.flush()
                events = await collect(client, count=4 + 1, timeout_s=20)
                events += await collect(client, count=1, timeout_s=1.0)  # nothing more comes
            text = _metrics_text(service)
            # Another device is served over MQTT after the flood (its own one-frame budget).
            async with device_client(gw.device("cam-other"), gw.port) as other:
                await other.subscribe("devices/cam-other/detections", qos=1)
                await other.publish(
                    "devices/cam-other/frames", jpeg, qos=1, properties=frame_props("calm-2")
                )
                (got,) = await collect(other, count=1, timeout_s=30)
            assert json.loads(bytes(got.payload))["frameId"] == "calm-2"  # type: ignore[arg-type]

    # Prometheus counts every refusal exactly.
    assert _metric(text, "denials_total", reason="rate_limited") == rate_limited
    assert _metric(text, "requests_total", method="Detect", code="RESOURCE_EXHAUSTED") == (
        GRPC_FRAMES - 1
    )
    # The log: a handful of lines for 3,000 refusals, whose counts add up exactly.
    lines = _refusal_lines(logs, "cam-flood")
    assert len(lines) <= 6, lines
    assert all(line["audit"] is True for line in lines)
    assert _counts(lines) == {"invalid_image": 1, "rate_limited": rate_limited}
    everything = [e for e in logs if e.get("device_id") == "cam-flood"]
    assert len(everything) <= 10, [e["event"] for e in everything]
    # Error events: at most 4 one by one, then one that carries the count of the rest.
    errors = [_error_event(m) for m in events]
    assert len(errors) == 5, errors
    summary = errors[-1]["message"]
    held = MQTT_MALFORMED + MQTT_FRAMES - 4
    assert {e["code"] for e in errors} <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
    assert summary.startswith(f"{held} more refused messages not reported"), summary


def _fake_log() -> tuple[RefusalLog, list[tuple[str, dict[str, Any]]], list[float]]:
    now = [0.0]
    lines: list[tuple[str, dict[str, Any]]] = []

    class Sink:
        def warning(self, event: str, **kw: Any) -> None:
            lines.append((event, kw))

    return (
        RefusalLog(
            interval_s=10.0, events_per_interval=2, max_devices=3, clock=lambda: now[0],
            logger=Sink(),
        ),
        lines,
        now,
    )  # fmt: skip


def test_refusal_log_first_at_once_then_one_count_per_interval() -> None:
    refusals, lines, now = _fake_log()
    for _ in range(1000):
        refusals.refused("cam-a", "rate_limited")
    refusals.refused("cam-a", "invalid_image")
    assert [(e, kw["reason"]) for e, kw in lines] == [
        ("message refused", "rate_limited"),
        ("message refused", "invalid_image"),
    ]
    now[0] = 9.9
    refusals.refused("cam-a", "rate_limited")
    assert len(lines) == 2  # still inside the interval: counted only
    now[0] = 10.0
    refusals.refused("cam-a", "rate_limited")  # the interval ended: its count, then anew
    assert lines[2] == (
        "messages refused",
        {
            "audit": True,
            "device_id": "cam-a",
            "counts": {"rate_limited": 1000},
            "total": 1000,
            "interval_s": 10.0,
        },
    )
    assert lines[3][0] == "message refused"
    assert len(lines) == 4


def test_refusal_log_memory_is_bounded_and_evicted_counts_are_logged() -> None:
    refusals, lines, now = _fake_log()
    for device in ("cam-a", "cam-b", "cam-c"):
        refusals.refused(device, "rate_limited")
        refusals.refused(device, "rate_limited")
    refusals.refused("cam-d", "rate_limited")  # a fourth device: cam-a is reported, forgotten
    assert len(refusals) == 3
    assert [e for e, _ in lines[-2:]] == ["messages refused", "message refused"]
    evicted = [kw for e, kw in lines if e == "messages refused"]
    assert evicted == [
        {
            "audit": True,
            "device_id": "cam-a",
            "counts": {"rate_limited": 1},
            "total": 1,
            "interval_s": 10.0,
        }
    ]
    refusals.close()
    totals = {kw["device_id"]: kw["total"] for e, kw in lines if e == "messages refused"}
    assert totals == {"cam-a": 1, "cam-b": 1, "cam-c": 1}  # cam-d had only its first line
    assert len(refusals) == 0
    del now


def test_error_events_are_bounded_per_device_and_the_rest_is_reported() -> None:
    refusals, _lines, now = _fake_log()
    suppressed: list[tuple[str, int, str]] = []
    refusals.on_suppressed = lambda d, n, code: suppressed.append((d, n, code))
    allowed = [refusals.allow_event("cam-a", "RESOURCE_EXHAUSTED") for _ in range(50)]
    assert allowed[:2] == [0, 0]
    assert allowed[2:] == [None] * 48
    assert refusals.allow_event("cam-b", "INVALID_ARGUMENT") == 0  # per device
    now[0] = 10.0
    refusals.flush()
    assert suppressed == [("cam-a", 48, "RESOURCE_EXHAUSTED")]
    # A new interval: events flow again.
    assert refusals.allow_event("cam-a", "RESOURCE_EXHAUSTED") == 0


def test_refusal_log_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="positive"):
        RefusalLog(interval_s=0)


def test_refusal_settings_are_configuration_keys(tmp_path: Path) -> None:
    from gateway import load_gateway_settings

    settings = load_gateway_settings(
        None,
        overrides={
            "identity_dir": str(tmp_path),
            "pki_dir": str(tmp_path),
            "limits": {"refusal_log_interval_s": 2.5, "refusal_events_per_interval": 1},
        },
    )
    assert settings.limits.refusal_log_interval_s == 2.5
    assert settings.limits.refusal_events_per_interval == 1
