"""The SDK honours a gateway's retry-after: a device over its budget pauses, not hammers.

A real gateway (in process, real model, real mutual TLS) with a budget of one frame a second;
a device client sends a handful of frames at once. Every frame is delivered, and the gateway
refuses only about one call per frame (the one that learns when to come back), where a client
that ignored the trailer would be refused several times per frame by its short backoff.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from device_sdk import ClientOptions, DetectionResult, DeviceClient, FrameOutcome, GatewayInfo
from device_sdk._grpc import MAX_RETRY_AFTER_S, Busy, classify, retry_after
from protos.edgeward.v1.wire import RETRY_AFTER_METADATA_KEY
from tests._support.gateway import start_gateway
from tests.conftest import PHOTOS, IssueFn

FRAMES = 4


def _error(code: grpc.StatusCode, trailing: tuple[tuple[str, str], ...]) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), "no")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0.250", 0.25), ("3", 3.0), ("1e9", MAX_RETRY_AFTER_S), ("-1", None), ("nan", None),
     ("soon", None)],
)  # fmt: skip
def test_retry_after_is_read_and_bounded(value: str, expected: float | None) -> None:
    exc = _error(grpc.StatusCode.RESOURCE_EXHAUSTED, ((RETRY_AFTER_METADATA_KEY, value),))
    assert retry_after(exc) == expected
    busy = classify(exc, device_id="cam-1")
    assert isinstance(busy, Busy)
    assert busy.retry_after_s == expected


def test_busy_without_the_trailer_has_no_retry_after() -> None:
    busy = classify(_error(grpc.StatusCode.RESOURCE_EXHAUSTED, ()), device_id="cam-1")
    assert isinstance(busy, Busy)
    assert busy.retry_after_s is None


async def test_a_device_over_its_budget_waits_as_told(issue: IssueFn, tmp_path: Path) -> None:
    jpeg = (PHOTOS / "chelsea.jpg").read_bytes()
    async with start_gateway(
        issue=issue,
        tmp_path=tmp_path,
        gateway_id="gw-budget",
        use_registry=False,
        overrides={"limits": {"frames_per_s": 1.0, "burst": 1}},
    ) as gw:
        gw.register("cam-budget", "pet_camera")
        device = issue("device", "cam-budget")
        options = ClientOptions(
            gateways=[GatewayInfo("gw-budget", "home", gw.address)],
            max_in_flight=1,
            subscribe_events=False,
            call_timeout_s=10.0,
        )
        outcomes: list[FrameOutcome] = []
        async with DeviceClient(device.directory, options) as client:
            for i in range(FRAMES):
                await client.submit(jpeg, frame_id=f"f-{i}")
            async with asyncio.timeout(60):
                async for outcome in client.results():
                    outcomes.append(outcome)
                    if len(outcomes) == FRAMES:
                        break
        refused = gw.service.metrics.registry.get_sample_value(
            "edgeward_gateway_denials_total", {"reason": "rate_limited"}
        )
    assert sorted(o.frame_id for o in outcomes) == [f"f-{i}" for i in range(FRAMES)]
    assert all(isinstance(o, DetectionResult) for o in outcomes)
    # Each frame after the first learns once when to come back, then comes back then.
    assert (refused or 0.0) <= FRAMES + 1
