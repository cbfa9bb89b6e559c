"""The streaming gRPC transport (``grpc-stream``) against real gateway processes.

One stack for the module (PKI, core, ``kr-seoul`` and ``us-nyc`` gateway processes) whose
gateways end a stream idle for 1 s, so that the idle end is exercised for real; the rate
limit is raised so that bursts are not paced by the per-device budget.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterator

import pytest

from device_sdk import (
    ClientOptions,
    ClientState,
    DetectionResult,
    DeviceClient,
    DeviceRevoked,
    FrameOutcome,
    FrameRejected,
    Transport,
)
from edgeward._stack import DemoStack
from tests._support.core import unique_id
from tests.conftest import PHOTOS

pytestmark = pytest.mark.slow

CHELSEA = (PHOTOS / "chelsea.jpg").read_bytes()
DOG = (PHOTOS / "dog.jpg").read_bytes()
IDLE_S = 1.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStack]:
    s = DemoStack(
        tmp_path_factory.mktemp("stream-stack"),
        mqtt=False,
        escalation=False,
        cache=False,
        gateway_overrides={
            "limits": {"stream_idle_timeout_s": IDLE_S, "frames_per_s": 1000.0, "burst": 1000}
        },
    )

    async def up() -> None:
        await s.setup()
        await s.start_core()
        await asyncio.gather(*(s.start_gateway(g) for g in s.plans))

    try:
        asyncio.run(up())
        yield s
    finally:
        s.stop_all()
        assert s.leftovers() == []


def _options(**kw: object) -> ClientOptions:
    base: dict[str, object] = {
        "transport": Transport.GRPC_STREAM,
        "probe_interval_s": 0.3,
        "offline_probe_interval_s": 0.2,
        "probe_timeout_s": 1.0,
        "down_for_s": 0.3,
        "call_timeout_s": 5.0,
        "subscribe_events": False,
    }
    base.update(kw)
    return ClientOptions(**base)  # type: ignore[arg-type]


async def _collect(client: DeviceClient, into: list[FrameOutcome]) -> None:
    async for outcome in client.results():
        into.append(outcome)


async def _ensure_up(stack: DemoStack, *gateway_ids: str) -> None:
    for gateway_id in gateway_ids:
        if gateway_id not in stack.gateways or not stack.gateways[gateway_id].alive:
            await stack.start_gateway(gateway_id)


def _streams_opened(client: DeviceClient) -> int:
    streams = client._delivery.streams
    assert streams is not None, "the stream transport is in use"
    return streams.opened


async def test_frames_on_one_stream_are_each_answered_once(stack: DemoStack) -> None:
    await _ensure_up(stack, "kr-seoul", "us-nyc")
    device = await stack.enrol(unique_id("cam"), device_type="pet_camera", region="kr-seoul")
    outcomes: list[FrameOutcome] = []
    async with DeviceClient(device, _options()) as client:
        collector = asyncio.create_task(_collect(client, outcomes))
        ids = [await client.submit(CHELSEA, frame_id=f"s-{n:02d}") for n in range(30)]
        assert await client.flush(timeout_s=30)
        await asyncio.sleep(0.05)
        collector.cancel()
        assert _streams_opened(client) == 1, "one stream carried every frame"
        assert client.stats().failovers == 0
    assert sorted(o.frame_id for o in outcomes) == ids
    for outcome in outcomes:
        assert isinstance(outcome, DetectionResult)
        assert outcome.transport is Transport.GRPC_STREAM
        assert outcome.gateway_id == "kr-seoul"
        assert "Cat" in {d.label for d in outcome.detections}


async def test_a_garbage_frame_mid_stream_is_rejected_and_the_rest_answered(
    stack: DemoStack,
) -> None:
    await _ensure_up(stack, "kr-seoul", "us-nyc")
    device = await stack.enrol(unique_id("cam"), device_type="pet_camera", region="kr-seoul")
    outcomes: list[FrameOutcome] = []
    async with DeviceClient(device, _options()) as client:
        collector = asyncio.create_task(_collect(client, outcomes))
        for n in range(20):
            image = b"not an image at all" if n == 10 else (CHELSEA if n % 2 else DOG)
            await client.submit(image, frame_id=f"g-{n:02d}")
        assert await client.flush(timeout_s=30)
        await asyncio.sleep(0.05)
        collector.cancel()
        stats = client.stats()
        # The refusal ended that stream, not the gateway: no failover, a new stream after.
        assert stats.failovers == 0
        assert stats.answered == 19
        assert stats.rejected == 1
        assert _streams_opened(client) >= 2
        # detect() reports the refusal to its caller too, and the stream goes on.
        good = await client.detect(CHELSEA, timeout_s=10)
        assert "Cat" in {d.label for d in good.detections}
    by_id = {o.frame_id: o for o in outcomes}
    assert sorted(by_id) == [f"g-{n:02d}" for n in range(20)]
    assert len(outcomes) == 20, "each frame has exactly one outcome"
    rejected = by_id["g-10"]
    assert isinstance(rejected, FrameRejected)
    assert rejected.code == "INVALID_ARGUMENT"
    assert "invalid image" in rejected.reason
    assert all(isinstance(o, DetectionResult) for k, o in by_id.items() if k != "g-10")


async def test_the_idle_end_reopens_quietly(stack: DemoStack) -> None:
    await _ensure_up(stack, "kr-seoul", "us-nyc")
    device = await stack.enrol(unique_id("cam"), device_type="pet_camera", region="kr-seoul")
    async with DeviceClient(device, _options()) as client:
        first = await client.detect(CHELSEA, timeout_s=10)
        await asyncio.sleep(IDLE_S * 2.5)  # the gateway ends the stream meanwhile
        second = await client.detect(CHELSEA, timeout_s=10)
        assert first.gateway_id == second.gateway_id == "kr-seoul", "no failover"
        stats = client.stats()
        assert stats.failovers == 0
        assert set(stats.gateways_up) == {"kr-seoul", "us-nyc"}
        assert _streams_opened(client) == 2
        assert client.state is ClientState.RUNNING


async def test_failover_on_the_stream_loses_nothing(stack: DemoStack) -> None:
    await _ensure_up(stack, "kr-seoul", "us-nyc")
    device = await stack.enrol(unique_id("cam"), device_type="pet_camera", region="kr-seoul")
    submitted: list[str] = []
    outcomes: list[FrameOutcome] = []
    try:
        async with DeviceClient(device, _options()) as client:
            assert client.gateway is not None
            assert client.gateway.gateway_id == "kr-seoul"
            collector = asyncio.create_task(_collect(client, outcomes))
            for n in range(60):
                submitted.append(await client.submit(CHELSEA, frame_id=f"f-{n:03d}"))
                if n == 20:
                    stack.kill_gateway("kr-seoul")
                await asyncio.sleep(0.03)
            assert await client.flush(timeout_s=30)
            await asyncio.sleep(0.05)
            collector.cancel()
            assert client.stats().failovers >= 1
            assert client.stats().queue.frames == 0
    finally:
        await _ensure_up(stack, "kr-seoul")
    ids = [o.frame_id for o in outcomes]
    assert len(ids) == len(set(ids)) == 60, "each frame answered exactly once"
    assert sorted(ids) == sorted(submitted)
    assert all(isinstance(o, DetectionResult) for o in outcomes)
    assert {o.gateway_id for o in outcomes if isinstance(o, DetectionResult)} == {
        "kr-seoul",
        "us-nyc",
    }


async def test_a_revoked_device_on_a_stream_gets_the_final_error(stack: DemoStack) -> None:
    await _ensure_up(stack, "kr-seoul", "us-nyc")
    device_id = unique_id("cam")
    device = await stack.enrol(device_id, device_type="pet_camera", region="us-nyc")
    async with DeviceClient(device, _options()) as client:
        await client.detect(CHELSEA, timeout_s=10)
        await stack.revoke(device_id, "test: stolen")

        async def keep_sending() -> None:
            for _ in range(300):
                await client.submit(CHELSEA)
                await asyncio.sleep(0.02)

        started = time.monotonic()
        with pytest.raises(DeviceRevoked) as info:
            await keep_sending()
        assert info.value.final
        assert time.monotonic() - started < 6.0
        assert client.state is ClientState.FAILED
        assert isinstance(client.final_error, DeviceRevoked)
        with pytest.raises(DeviceRevoked):
            await client.detect(CHELSEA, timeout_s=1)


async def test_renewal_moves_new_frames_to_a_new_stream_and_drops_none(stack: DemoStack) -> None:
    await _ensure_up(stack, "kr-seoul", "us-nyc")
    device = await stack.enrol(unique_id("cam"), device_type="pet_camera", region="us-nyc")
    offset = dt.timedelta()
    old_serial = ""

    def clock() -> dt.datetime:
        # Jump ahead once: the renewed certificate is judged by the real time again.
        renewed = client.identity.serial != old_serial
        return dt.datetime.now(dt.UTC) + (dt.timedelta() if renewed else offset)

    outcomes: list[FrameOutcome] = []
    client = DeviceClient(device, _options(clock=clock, renewal_check_s=0.05, renew_jitter=0.0))
    old_serial = client.identity.serial
    async with client:
        plan = client.renewal_plan
        assert plan is not None
        collector = asyncio.create_task(_collect(client, outcomes))
        submitted: list[str] = []

        async def load(n: int) -> None:
            for k in range(n):
                submitted.append(await client.submit(CHELSEA, frame_id=f"r-{len(submitted):03d}"))
                await asyncio.sleep(0.02 if k % 4 else 0)

        await load(15)
        offset = plan.renew_at - dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
        deadline = time.monotonic() + 15
        while client.stats().renewals < 1:
            assert time.monotonic() < deadline, "no renewal"
            await load(1)
        await load(15)
        assert await client.flush(timeout_s=30)
        await asyncio.sleep(0.05)
        collector.cancel()
        assert client.identity.serial != old_serial
        assert client.state is ClientState.RUNNING
        assert client.stats().failovers == 0
        assert _streams_opened(client) >= 2, "frames after the renewal went on a new stream"
    ids = [o.frame_id for o in outcomes]
    assert len(ids) == len(set(ids)) == len(submitted)
    assert sorted(ids) == sorted(submitted)
    assert all(isinstance(o, DetectionResult) for o in outcomes)
