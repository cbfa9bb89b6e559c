"""Escalation answers reach the application once, against real services: a core with its
larger models, a gateway (an ``edgeward gateway run`` process) that stores its answers,
is SIGKILLed and restarted (and then hands them all out again), and a device restart."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from device_sdk import ClientOptions, DeviceClient, EscalationAnswer
from edgeward._stack import DemoStack
from tests._support.core import unique_id
from tests.conftest import PHOTOS

pytestmark = pytest.mark.slow

GATEWAY = "kr-seoul"
#: Photos whose edge detections fall in the demo's uncertainty band (0.5-0.7).
UNSURE = [(PHOTOS / n).read_bytes() for n in ("dog.jpg", "person.jpg")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStack]:
    s = DemoStack(
        tmp_path_factory.mktemp("answers"),
        gateways=[(GATEWAY, GATEWAY)],
        mqtt=False,
        escalation=True,
        cache=False,
    )
    if not s.escalation:
        pytest.fail("the escalation component is missing from this build")

    async def up() -> None:
        await s.setup()
        await s.start_core()
        await s.start_gateway(GATEWAY)

    try:
        asyncio.run(up())
        yield s
    finally:
        s.stop_all()
        assert s.leftovers() == []


def _options() -> ClientOptions:
    return ClientOptions(
        probe_interval_s=0.3, offline_probe_interval_s=0.2, down_for_s=0.3, call_timeout_s=10
    )


async def _until(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_each_answer_once_across_gateway_and_device_restarts(stack: DemoStack) -> None:
    device = await stack.enrol(unique_id("cam"), device_type="pet_camera", region=GATEWAY)
    given: Counter[str] = Counter()

    async def collect(client: DeviceClient) -> None:
        async for event in client.events():
            if isinstance(event.kind, EscalationAnswer):
                given[event.kind.escalation_id] += 1

    def escalations(results: list[object]) -> set[str]:
        return {
            d.escalation_id
            for r in results
            for d in getattr(r, "detections", ())
            if d.escalated and d.escalation_id
        }

    async with DeviceClient(device, _options()) as client:
        collector = asyncio.create_task(collect(client))
        expected = escalations([await client.detect(img, timeout_s=20) for img in UNSURE])
        assert expected, "the photos must escalate (uncertainty band 0.5-0.7)"
        await _until(lambda: set(given) >= expected, "every escalation is answered")

        # The gateway crashes and restarts: it hands its stored answers out again, under
        # new event ids; the device hears them and gives none of them twice.
        stack.kill_gateway(GATEWAY)
        await stack.start_gateway(GATEWAY)
        await _until(
            lambda: client.stats().answers_repeated >= len(expected),
            "the restarted gateway re-sends its stored answers",
        )
        await asyncio.sleep(0.3)
        collector.cancel()
    assert given == dict.fromkeys(expected, 1)

    # The device restarts: the gateway replays everything to a new subscriber; the answers
    # given before are remembered on disk. A new escalation still gets through.
    async with DeviceClient(device, _options()) as client:
        collector = asyncio.create_task(collect(client))
        await _until(
            lambda: client.stats().answers_repeated >= len(expected),
            "the gateway replays its answers to the restarted device",
        )
        new = escalations([await client.detect(UNSURE[0], timeout_s=20)]) - expected
        assert new
        await _until(lambda: set(given) >= expected | new, "the new escalation is answered")
        await asyncio.sleep(0.3)
        collector.cancel()
    assert given == dict.fromkeys(expected | new, 1), "each answer given exactly once"
