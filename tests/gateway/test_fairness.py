"""No device can hold up another: refusals before queueing, turns in round robin per device.

The order in which frames reach the model is checked, not times: a recording seam in front of
the real engine (the front door's ``Detector``) notes whose frame each run was, and holds the
flooder's first frame until the victim's frame is waiting, so the scenario is the same on any
machine. The flooder's excess is refused on receipt (no inference), counted exactly.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

import pki
from gateway import InferenceResult
from gateway._door import FairQueue
from gateway._inference._batcher import MicroBatcher
from gateway.errors import Overloaded, RateLimited
from protos.edgeward.v1 import common_pb2, gateway_pb2_grpc
from tests._support.mqtt import MODELS_DIR, collect, device_client, frame_props, mqtt_gateway
from tests.conftest import PHOTOS, require_tool

BURST = 8  # the flooder's budget: this many frames, then (almost) nothing
FLOOD = 120  # frames the flooder sends


async def _until(predicate: Callable[[], bool], *, timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - polling the gateway's own state
            await asyncio.sleep(0.005)


# -- units -----------------------------------------------------------------------------------


async def test_fair_queue_serves_a_waiting_device_before_a_floods_backlog() -> None:
    fair = FairQueue(slots=1, max_waiting=100)
    order: list[str] = []
    release = asyncio.Event()

    async def frame(device_id: str, hold: bool = False) -> None:
        async with fair.turn(device_id):
            order.append(device_id)
            if hold:
                await release.wait()

    first = asyncio.create_task(frame("flood", hold=True))
    await _until(lambda: fair.busy == 1)
    flood = [asyncio.create_task(frame("flood")) for _ in range(10)]
    await _until(lambda: fair.waiting("flood") == 10)
    victims = [asyncio.create_task(frame("victim")) for _ in range(2)]
    await _until(lambda: fair.waiting("victim") == 2)
    release.set()
    await asyncio.gather(first, *flood, *victims)
    # Turns alternate while both wait: the victim's frames are 3rd and 5th, not 12th and 13th.
    assert order[:6] == ["flood", "flood", "victim", "flood", "victim", "flood"]
    assert (fair.busy, fair.waiting()) == (0, 0)


async def test_fair_queue_keeps_slots_free_for_other_devices() -> None:
    # Four slots, one turn per device: the flood's backlog holds one slot, never all four.
    fair = FairQueue(slots=4, max_waiting=100, per_device=1)
    release = asyncio.Event()
    order: list[str] = []

    async def frame(device_id: str) -> None:
        async with fair.turn(device_id):
            order.append(device_id)
            await release.wait()

    flood = [asyncio.create_task(frame("flood")) for _ in range(10)]
    await _until(lambda: fair.waiting("flood") == 9)
    assert (fair.busy, fair.held("flood")) == (1, 1)
    # A newcomer takes a free slot at once: no turn of the flood's to wait for.
    victims = [asyncio.create_task(frame(f"victim-{i}")) for i in range(3)]
    await _until(lambda: fair.busy == 4)
    assert fair.waiting() == 9
    assert sorted(order) == ["flood", "victim-0", "victim-1", "victim-2"]
    # Full: a fifth device waits, and is served after at most one more of the flood's frames.
    late = asyncio.create_task(frame("late"))
    await _until(lambda: fair.waiting("late") == 1)
    release.set()
    await asyncio.gather(*flood, *victims, late)
    assert order.index("late") < [i for i, d in enumerate(order) if d == "flood"][2]
    assert (fair.busy, fair.waiting(), fair.held("flood")) == (0, 0, 0)


async def test_fair_queue_never_gives_a_device_more_than_its_cap() -> None:
    fair = FairQueue(slots=8, max_waiting=100, per_device=2, shared_per_device=2)
    most = 0
    step = asyncio.Event()

    async def frame(device_id: str) -> None:
        nonlocal most
        async with fair.turn(device_id):
            most = max(most, fair.held(device_id))
            await step.wait()

    tasks = [asyncio.create_task(frame(d)) for d in ("a",) * 12 + ("b",) * 5]
    await _until(lambda: fair.busy == 4)
    assert (fair.held("a"), fair.held("b"), fair.waiting()) == (2, 2, 13)
    step.set()
    await asyncio.gather(*tasks)
    assert most == 2
    assert (fair.busy, fair.waiting()) == (0, 0)


async def test_a_device_holds_a_second_turn_only_while_it_is_alone() -> None:
    now = [0.0]
    fair = FairQueue(slots=8, max_waiting=100, per_device=2, recent_s=2.0, clock=lambda: now[0])
    held: dict[str, list[asyncio.Event]] = {"flood": [], "victim": []}

    async def frame(device_id: str) -> None:
        done = asyncio.Event()
        async with fair.turn(device_id):
            held[device_id].append(done)
            await done.wait()

    def finish(device_id: str) -> None:
        held[device_id].pop(0).set()

    # Alone, the flood holds two turns (its next frame decodes while the model runs).
    flood = [asyncio.create_task(frame("flood")) for _ in range(6)]
    await _until(lambda: fair.waiting("flood") == 4)
    assert (fair.held("flood"), fair.cap("flood")) == (2, 2)
    # Another device arrives: it takes a free turn at once ...
    victim = asyncio.create_task(frame("victim"))
    await _until(lambda: fair.held("victim") == 1)
    assert (fair.cap("flood"), fair.cap("victim")) == (1, 1)
    # ... and the flood's turns ending give it no new one until it is down to one.
    finish("flood")
    await asyncio.sleep(0)
    assert (fair.held("flood"), fair.waiting("flood")) == (1, 4)
    # The victim's frame is done, but it sent one moments ago: the flood stays at one turn,
    # so the victim's next frame finds at most one of the flood's in the engine.
    finish("victim")
    await victim
    for _ in range(2):
        finish("flood")
        await _until(lambda: len(held["flood"]) == 1)
        assert fair.held("flood") == 1
    assert fair.waiting("flood") == 2
    # Once nobody else was seen for recent_s, the flood is alone again: two turns.
    now[0] = 2.5
    finish("flood")
    await _until(lambda: fair.held("flood") == 2)
    assert (fair.waiting("flood"), fair.cap("flood")) == (0, 2)
    while held["flood"]:
        finish("flood")
        await asyncio.sleep(0)
    await asyncio.gather(*flood)
    assert (fair.busy, fair.waiting()) == (0, 0)


async def test_a_waiting_device_makes_others_share() -> None:
    # Every slot busy, the flood holding both: a device waiting for a turn (holding none) is
    # present too, so the flood's next free turn goes to it, not to the flood's backlog.
    fair = FairQueue(slots=2, max_waiting=100, per_device=2)
    order: list[str] = []
    held: list[asyncio.Event] = []

    async def frame(device_id: str) -> None:
        done = asyncio.Event()
        async with fair.turn(device_id):
            order.append(device_id)
            held.append(done)
            await done.wait()

    flood = [asyncio.create_task(frame("flood")) for _ in range(4)]
    await _until(lambda: fair.held("flood") == 2 and fair.waiting("flood") == 2)
    victim = asyncio.create_task(frame("victim"))
    await _until(lambda: fair.waiting("victim") == 1)
    assert fair.cap("flood") == 1
    held[0].set()
    await _until(lambda: len(order) == 3)
    assert order == ["flood", "flood", "victim"]
    assert (fair.held("flood"), fair.held("victim")) == (1, 1)
    while not all(t.done() for t in [*flood, victim]):
        for done in held:
            done.set()
        await asyncio.sleep(0)
    assert (fair.busy, fair.waiting()) == (0, 0)


async def test_fair_queue_bounds_each_devices_backlog() -> None:
    fair = FairQueue(slots=1, max_waiting=100, max_waiting_per_device=2)
    hold = asyncio.Event()

    async def frame(device_id: str) -> None:
        async with fair.turn(device_id):
            await hold.wait()

    tasks = [asyncio.create_task(frame("flood")) for _ in range(3)]
    await _until(lambda: fair.waiting("flood") == 2)
    # The flood's third waiting frame is refused at once; another device still queues.
    with pytest.raises(Overloaded):
        await fair.acquire("flood")
    tasks.append(asyncio.create_task(frame("victim")))
    await _until(lambda: fair.waiting("victim") == 1)
    hold.set()
    await asyncio.gather(*tasks)
    assert (fair.busy, fair.waiting()) == (0, 0)


async def test_fair_queue_is_bounded_and_forgets_cancelled_waiters() -> None:
    fair = FairQueue(slots=1, max_waiting=2)
    hold = asyncio.Event()

    async def frame(device_id: str) -> None:
        async with fair.turn(device_id):
            await hold.wait()

    running = asyncio.create_task(frame("a"))
    await _until(lambda: fair.busy == 1)
    waiting = [asyncio.create_task(frame("a")), asyncio.create_task(frame("b"))]
    await _until(lambda: fair.waiting() == 2)
    with pytest.raises(Overloaded):
        async with fair.turn("c"):
            pass
    waiting[0].cancel()
    await _until(lambda: fair.waiting() == 1)
    assert fair.waiting("a") == 0
    hold.set()
    await asyncio.gather(running, waiting[1])
    assert (fair.busy, fair.waiting()) == (0, 0)


async def test_micro_batches_take_devices_in_turn() -> None:
    batches: list[list[str]] = []
    running, gate = threading.Event(), threading.Event()

    def run(items: Any) -> list[str]:
        # The first batch waits (in the batcher's thread) until everything is queued.
        if not batches:
            running.set()
            gate.wait(timeout=30)
        batches.append(list(items))
        return list(items)

    async with MicroBatcher(run, max_batch=4, max_wait_ms=0, queue_size=64) as batcher:
        first = asyncio.create_task(batcher.submit("f0", key="flood"))
        await _until(running.is_set)
        flood = [asyncio.create_task(batcher.submit(f"f{i}", key="flood")) for i in range(1, 9)]
        victim = asyncio.create_task(batcher.submit("v0", key="victim"))
        await _until(lambda: batcher.queue_depth() == 9)
        gate.set()
        await asyncio.gather(first, victim, *flood)
    assert batches[0] == ["f0"]
    # The victim's one frame is in the next batch, not after the flood's eight.
    assert "v0" in batches[1]
    assert sorted(x for b in batches for x in b) == sorted(
        ["f0", "v0"] + [f"f{i}" for i in range(1, 9)]
    )


async def test_a_batch_holds_at_most_one_frame_per_device() -> None:
    batches: list[list[str]] = []
    running, gate = threading.Event(), threading.Event()

    def run(items: Any) -> list[str]:
        if not batches:
            running.set()
            gate.wait(timeout=30)
        batches.append(list(items))
        return list(items)

    async with MicroBatcher(
        run, max_batch=8, max_per_key=1, max_wait_ms=0, queue_size=64
    ) as batcher:
        first = asyncio.create_task(batcher.submit("f0", key="flood"))
        await _until(running.is_set)
        # The flood's backlog of 20 and one frame each of two other devices, queued last.
        flood = [asyncio.create_task(batcher.submit(f"f{i}", key="flood")) for i in range(1, 21)]
        others = [asyncio.create_task(batcher.submit(f"{d}0", key=d)) for d in ("victim", "other")]
        await _until(lambda: batcher.queue_depth() == 22)
        gate.set()
        await asyncio.gather(first, *flood, *others)
    # The backlog runs one frame per batch; the others' frames are in the very next batch.
    assert batches[1] == ["f1", "victim0", "other0"]
    assert all(sum(x.startswith("f") for x in b) <= 1 for b in batches)
    assert [x for b in batches for x in b if x.startswith("f")] == [f"f{i}" for i in range(21)]


async def test_frames_without_a_key_are_not_capped() -> None:
    batches: list[list[str]] = []
    running, gate = threading.Event(), threading.Event()

    def run(items: Any) -> list[str]:
        if not batches:
            running.set()
            gate.wait(timeout=30)
        batches.append(list(items))
        return list(items)

    async with MicroBatcher(run, max_batch=4, max_per_key=1, max_wait_ms=0) as batcher:
        first = asyncio.create_task(batcher.submit("x0"))
        await _until(running.is_set)
        rest = [asyncio.create_task(batcher.submit(f"x{i}")) for i in range(1, 5)]
        await _until(lambda: batcher.queue_depth() == 4)
        gate.set()
        await asyncio.gather(first, *rest)
    assert batches == [["x0"], ["x1", "x2", "x3", "x4"]]


async def test_a_frame_waiting_for_its_turn_keeps_its_deadline() -> None:
    from gateway import FrontDoor
    from gateway._door import Admitted
    from gateway.errors import DeadlineExceeded
    from tests._support.mqtt import FakeEngine

    class Held(FakeEngine):
        def __init__(self) -> None:
            super().__init__()
            self.release = asyncio.Event()

        async def detect_with_frame(
            self,
            image: bytes,
            *,
            deadline: float | None = None,
            key: str | None = None,
            region: str | None = None,
        ) -> tuple[InferenceResult, None]:
            await self.release.wait()
            return await super().detect_with_frame(image, deadline=deadline, key=key)

    engine = Held()
    door = FrontDoor(gateway_id="gw-1", engine=engine, slots=1, max_waiting=8)
    jpeg = b"\xff\xd8\xff\xe0" + b"\0" * 16
    first = asyncio.create_task(
        door.detect(
            Admitted("cam-a", None, "Detect", None), frame_id="a", image=jpeg, deadline=None
        )
    )
    await _until(lambda: door.fair.busy == 1)
    loop_deadline = time.monotonic() + 0.05
    with pytest.raises(DeadlineExceeded):
        await door.detect(
            Admitted("cam-b", None, "Detect", None),
            frame_id="b",
            image=jpeg,
            deadline=loop_deadline,
        )
    assert door.fair.waiting() == 0  # it left the queue when its deadline passed
    engine.release.set()
    msg, _ = await first
    assert msg.frame_id == "a"
    assert (door.fair.busy, door.fair.waiting()) == (0, 0)


async def test_a_flooding_device_gets_its_refusals_after_a_bounded_hold() -> None:
    from gateway import FrontDoor, LimitsSettings
    from gateway._door import TopicIdentity
    from gateway.errors import RateLimited
    from tests._support.mqtt import FakeEngine

    door = FrontDoor(
        gateway_id="gw-1",
        engine=FakeEngine(),
        limits=LimitsSettings(frames_per_s=0.001, burst=2),
    )
    door.REFUSAL_HOLD_S = 600.0  # held until cancelled: nothing here waits for it
    door.MAX_HELD_PER_DEVICE = 3

    def refused(device_id: str) -> None:
        with pytest.raises(RateLimited):
            door.admit_now("Detect", lambda: TopicIdentity(device_id))

    for _ in range(2):
        assert door.admit_now("Detect", lambda: TopicIdentity("cam-a")) is not None
    # A little over budget (up to its burst of refusals in a row): answered at once.
    for _ in range(2):
        refused("cam-a")
        assert await door.hold_refusal("Detect", "cam-a") == 0.0
    # Flooding: its refusals are held, at most MAX_HELD_PER_DEVICE at once.
    refused("cam-a")
    held = [asyncio.create_task(door.hold_refusal("Detect", "cam-a")) for _ in range(3)]
    await _until(lambda: door.held_refusals("cam-a") == 3)
    assert await door.hold_refusal("Detect", "cam-a") == 0.0
    # Never past the caller's deadline: held for half of what is left of it.
    door.MAX_HELD_PER_DEVICE = 4
    assert await door.hold_refusal("Detect", "cam-a", remaining=0.02) == pytest.approx(0.01)
    # Another device, and methods outside the budget, are not held.
    assert await door.hold_refusal("Detect", "cam-b") == 0.0
    assert await door.hold_refusal("Subscribe", "cam-a") == 0.0
    for task in held:
        task.cancel()
    await asyncio.gather(*held, return_exceptions=True)
    assert door.held_refusals("cam-a") == 0  # nothing left behind


async def test_a_flood_the_budget_lets_through_now_and_then_is_still_held() -> None:
    from gateway import FrontDoor, LimitsSettings
    from gateway._door import RateLimiter, TopicIdentity
    from gateway.errors import RateLimited
    from tests._support.mqtt import FakeEngine

    now = [0.0]
    # Without the flood penalty (its own test below): the budget alone.
    limits = LimitsSettings(frames_per_s=10, burst=2, flood_penalty_s=0)
    door = FrontDoor(gateway_id="gw-1", engine=FakeEngine(), limits=limits)
    door._frames = RateLimiter(rate=10.0, burst=2, clock=lambda: now[0])
    door.REFUSAL_HOLD_S, door.REFUSAL_HOLD_SPREAD_S = 0.001, 0.0

    def send() -> bool:
        try:
            door.admit_now("Detect", lambda: TopicIdentity("cam-a"))
        except RateLimited:
            return False
        return True

    assert [send(), send(), send(), send(), send()] == [True, True, False, False, False]
    assert door.flooding("Detect", "cam-a")
    # A token back after 100 ms: one frame admitted ends the run of refusals in a row ...
    now[0] = 0.1
    assert send()
    assert door.refused_in_row("Detect", "cam-a") == 0
    # ... but not the flood: its next refusal is held, not answered at once.
    assert not send()
    assert door.flooding("Detect", "cam-a")
    assert await door.hold_refusal("Detect", "cam-a") > 0.0
    # A new second without a refusal so far: a little over budget is not a flood.
    now[0] = 1.5
    assert [send(), send(), send()] == [True, True, False]
    assert not door.flooding("Detect", "cam-a")
    assert await door.hold_refusal("Detect", "cam-a") == 0.0


async def test_a_device_caught_flooding_gets_no_frame_through_until_its_penalty_ends() -> None:
    """Refused more than its burst within a second, a device is flooding: the tokens its
    budget gives back would each run the model beside other devices' frames, so its frames
    are refused for ``flood_penalty_s`` (with the time left as retry-after); its telemetry
    and other devices are not touched, and once the penalty ends its budget is back."""
    from gateway import FrontDoor, LimitsSettings
    from gateway._door import RateLimiter, TopicIdentity
    from gateway.errors import RateLimited
    from tests._support.mqtt import FakeEngine

    now = [0.0]
    limits = LimitsSettings(frames_per_s=10, burst=2, flood_penalty_s=2.0)
    door = FrontDoor(gateway_id="gw-1", engine=FakeEngine(), limits=limits)
    door._frames = RateLimiter(rate=10.0, burst=2, clock=lambda: now[0])
    door._reports = RateLimiter(rate=10.0, burst=2, clock=lambda: now[0])
    door._monotonic = lambda: now[0]

    def send(device: str = "cam-a", method: str = "Detect") -> float:
        """0.0 admitted, else the retry-after of the refusal."""
        try:
            door.admit_now(method, lambda: TopicIdentity(device))
        except RateLimited as exc:
            return exc.retry_after_s
        return 0.0

    # Two within the burst, two refusals (a little over budget: not yet a flood) ...
    assert [send() == 0.0 for _ in range(4)] == [True, True, False, False]
    assert door.penalised_for("cam-a") == 0.0
    # ... the third refusal within the second is more than its burst: penalised.
    assert send() > 0.0
    assert door.penalised_for("cam-a") == pytest.approx(2.0)
    # A token is back after 100 ms, but no frame goes through until the penalty ends.
    now[0] = 0.1
    assert send() == pytest.approx(1.9)
    now[0] = 1.9
    assert send() == pytest.approx(0.1)
    assert door.flooding("Detect", "cam-a")  # its refusals are held meanwhile (gRPC)
    # Its telemetry has a budget of its own; another device is not touched.
    assert send(method="ReportTelemetry") == 0.0
    assert send("cam-b") == 0.0
    now[0] = 2.05
    assert door.penalised_for("cam-a") == 0.0
    assert send() == 0.0
    # Off: never penalised.
    off = FrontDoor(
        gateway_id="gw-1",
        engine=FakeEngine(),
        limits=LimitsSettings(frames_per_s=10, burst=2, flood_penalty_s=0),
    )
    off.penalise("cam-a")
    assert off.penalised_for("cam-a") == 0.0


async def test_a_device_caught_flooding_has_its_waiting_frames_refused_not_run() -> None:
    """Caught flooding, a device's frames still waiting for a turn (its burst, admitted
    moments before) are refused with retry-after instead of each running the model while
    other devices wait; the frame in the model finishes and the next device gets the turn."""
    from gateway import FrontDoor, LimitsSettings
    from gateway.errors import RateLimited
    from tests._support.mqtt import FakeEngine

    limits = LimitsSettings(frames_per_s=10, burst=4, flood_penalty_s=2.0)
    door = FrontDoor(gateway_id="gw-1", engine=FakeEngine(), limits=limits, slots=1)
    await door.fair.acquire("cam-a")  # its frame in the model
    waiting = [asyncio.create_task(door.fair.acquire("cam-a")) for _ in range(2)]
    other = asyncio.create_task(door.fair.acquire("cam-b"))
    await asyncio.sleep(0)
    assert door.fair.waiting("cam-a") == 2
    door.penalise("cam-a")
    for task in waiting:
        with pytest.raises(RateLimited) as refused:
            await asyncio.wait_for(task, 5)  # not run: refused at once
        assert refused.value.retry_after_s == pytest.approx(2.0)
    assert door.fair.waiting("cam-a") == 0
    assert door.fair.held("cam-a") == 1  # the run in progress is not touched
    door.fair.release("cam-a")
    await asyncio.wait_for(other, 30)
    assert door.fair.held("cam-b") == 1
    door.fair.release("cam-b")


async def test_a_floods_held_refusals_are_answered_spread_out() -> None:
    from gateway import FrontDoor, LimitsSettings
    from gateway._door import TopicIdentity
    from gateway.errors import RateLimited
    from tests._support.mqtt import FakeEngine

    door = FrontDoor(
        gateway_id="gw-1",
        engine=FakeEngine(),
        limits=LimitsSettings(frames_per_s=0.001, burst=1),
    )
    door.REFUSAL_HOLD_S, door.REFUSAL_HOLD_SPREAD_S = 0.001, 0.004
    assert door.admit_now("Detect", lambda: TopicIdentity("cam-a")) is not None
    for _ in range(2):
        with pytest.raises(RateLimited):
            door.admit_now("Detect", lambda: TopicIdentity("cam-a"))
    # A flood's calls, refused together: held for different times, so they are not
    # answered (and sent again) together.
    holds = await asyncio.gather(*(door.hold_refusal("Detect", "cam-a") for _ in range(64)))
    assert all(0.001 <= h <= 0.005 for h in holds)
    # Any eight in a row cover most of the spread: no stretch of them is answered at once.
    for i in range(len(holds) - 8):
        assert max(holds[i : i + 8]) - min(holds[i : i + 8]) > 0.002
    assert door.held_refusals("cam-a") == 0


def test_the_budget_counts_refusals_in_a_row_and_per_second() -> None:
    from gateway._door import RateLimiter

    now = [0.0]
    budget = RateLimiter(rate=1.0, burst=1, clock=lambda: now[0])
    assert budget.try_take("cam-a") == 0.0
    for t in (0.1, 0.2, 0.3):
        now[0] = t
        assert budget.try_take("cam-a") > 0.0
    assert (budget.refused_in_row("cam-a"), budget.refused_recently("cam-a")) == (3, 3)
    # A token refilled and taken ends the run of refusals, not the second's count.
    now[0] = 1.05
    assert budget.try_take("cam-a") == 0.0
    assert (budget.refused_in_row("cam-a"), budget.refused_recently("cam-a")) == (0, 3)
    now[0] = 1.06
    assert budget.try_take("cam-a") > 0.0
    assert budget.refused_recently("cam-a") == 4
    # A new second, a new count.
    now[0] = 1.2
    assert budget.try_take("cam-a") > 0.0
    assert (budget.refused_in_row("cam-a"), budget.refused_recently("cam-a")) == (2, 1)
    now[0] = 2.5
    assert budget.refused_recently("cam-a") == 0
    assert budget.refused_recently("cam-unknown") == 0


# -- a real gateway, both transports ----------------------------------------------------------


class _Recording:
    """The real engine behind a seam of ours: notes whose frame each run was, and holds the
    flooder's first frame until ``release`` is set."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.done: list[str] = []
        self.release = asyncio.Event()
        self.held = asyncio.Event()

    async def detect_with_frame(
        self,
        image: bytes,
        *,
        deadline: float | None = None,
        key: str | None = None,
        region: str | None = None,
    ) -> tuple[InferenceResult, Any]:
        if key == "cam-flood" and not self.held.is_set():
            self.held.set()
            await self.release.wait()
        out: tuple[InferenceResult, Any] = await self.engine.detect_with_frame(
            image, deadline=deadline, key=key, region=region
        )
        self.done.append(str(key))
        return out


def _denials(service: Any, reason: str) -> float:
    value = service.metrics.registry.get_sample_value(
        "edgeward_gateway_denials_total", {"reason": reason}
    )
    return float(value or 0.0)


async def _victim_waits_then_release(service: Any, recording: _Recording) -> None:
    """Hold the flood's backlog until the victim's frame waits behind it, then let it go."""
    door = service.door
    await _until(lambda: recording.held.is_set() and door.fair.waiting("cam-flood") >= 3)
    await _until(lambda: door.fair.waiting("cam-victim") == 1)
    recording.release.set()


def _check_order(recording: _Recording) -> None:
    assert recording.done.count("cam-victim") == 1
    victim_at = recording.done.index("cam-victim")
    # Served after at most one more of the flood's frames, with its backlog still waiting.
    assert victim_at <= 2, recording.done
    assert recording.done[victim_at + 1 :].count("cam-flood") >= 1, recording.done


@pytest.fixture
async def gateway(tmp_path: Path) -> Any:
    require_tool("mosquitto")
    async with mqtt_gateway(
        tmp_path,
        # One frame in the model at a time, so a backlog forms and its order shows.
        inference={"models_dir": str(MODELS_DIR), "threads": 1, "max_batch": 1},
        # The flooder stays connected: its refusals are what the MQTT test counts (all made
        # by the front door: the broker's own limit has its tests in tests/mqtt).
        mqtt={"disconnect_after_refusals": 0, "ingest_limit_factor": 0},
        # The whole budget may wait (its order is what these tests look at), and stays
        # waiting: no flood penalty refuses it (that has tests of its own above).
        limits={
            "frames_per_s": 0.001,
            "burst": BURST,
            "frames_waiting_per_device": BURST,
            "flood_penalty_s": 0,
        },
    ) as gw:
        yield gw


async def test_mqtt_flood_is_refused_on_receipt_and_the_victim_is_served_in_turn(
    gateway: Any,
) -> None:
    gw = gateway
    service = gw.service
    recording = _Recording(service.door.engine)
    service.door.engine = recording
    flooder = gw.device("cam-flood", device_type="pet_camera")
    victim = gw.device("cam-victim", device_type="pet_camera")
    jpeg = (PHOTOS / "chelsea.jpg").read_bytes()
    async with device_client(flooder, gw.port) as f, device_client(victim, gw.port) as v:
        await f.subscribe("devices/cam-flood/detections", qos=1)
        await v.subscribe("devices/cam-victim/detections", qos=1)
        for i in range(FLOOD):
            await f.publish(
                "devices/cam-flood/frames", jpeg, qos=1, properties=frame_props(f"f-{i}")
            )
        # The excess is refused as it arrives, while the budget's frames wait for the model.
        await _until(lambda: _denials(service, "rate_limited") == FLOOD - BURST)
        releaser = asyncio.create_task(_victim_waits_then_release(service, recording))
        await v.publish("devices/cam-victim/frames", jpeg, qos=1, properties=frame_props("v-1"))
        await releaser
        (answer,) = await collect(v, count=1, timeout_s=60)
        assert json.loads(bytes(answer.payload))["frameId"] == "v-1"  # type: ignore[arg-type]
        flood_answers = await collect(f, count=BURST, timeout_s=60)
    assert len(flood_answers) == BURST
    _check_order(recording)
    # Refused frames never reached the model.
    assert recording.done.count("cam-flood") == BURST
    assert _denials(service, "rate_limited") == FLOOD - BURST


async def test_grpc_flood_is_refused_at_once_and_the_victim_is_served_in_turn(
    gateway: Any,
) -> None:
    gw = gateway
    service = gw.service
    recording = _Recording(service.door.engine)
    service.door.engine = recording
    flooder = gw.device("cam-flood", device_type="pet_camera")
    victim = gw.device("cam-victim", device_type="pet_camera")
    jpeg = (PHOTOS / "chelsea.jpg").read_bytes()

    def channel(identity: pki.IdentityFiles) -> grpc.aio.Channel:
        creds = pki.grpc_channel_credentials(
            ca_bundle_pem=service.identity.ca_bundle.read_bytes(), identity=identity
        )
        return grpc.aio.secure_channel(f"127.0.0.1:{service.grpc_port}", creds)

    async def call(stub: Any, frame_id: str) -> str:
        try:
            await stub.Detect(common_pb2.Frame(image=jpeg, frame_id=frame_id), timeout=120)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return "OK"

    async with channel(flooder) as fc, channel(victim) as vc:
        flood_stub = gateway_pb2_grpc.DeviceGatewayStub(fc)
        # The budget's frames first (they wait for the model), then the excess.
        admitted = [asyncio.create_task(call(flood_stub, f"f-{i}")) for i in range(BURST)]
        await _until(lambda: service.door.fair.waiting("cam-flood") == BURST - 1)
        excess = await asyncio.gather(*(call(flood_stub, f"x-{i}") for i in range(FLOOD)))
        assert excess == ["RESOURCE_EXHAUSTED"] * FLOOD  # refused while the backlog waits
        releaser = asyncio.create_task(_victim_waits_then_release(service, recording))
        assert await call(gateway_pb2_grpc.DeviceGatewayStub(vc), "v-1") == "OK"
        await releaser
        assert await asyncio.gather(*admitted) == ["OK"] * BURST
    _check_order(recording)
    assert recording.done.count("cam-flood") == BURST


async def test_grpc_flood_is_answered_after_a_hold_with_retry_after(gateway: Any) -> None:
    gw = gateway
    service = gw.service
    flooder = gw.device("cam-flood", device_type="pet_camera")
    victim = gw.device("cam-victim", device_type="pet_camera")
    creds = pki.grpc_channel_credentials(
        ca_bundle_pem=service.identity.ca_bundle.read_bytes(), identity=flooder
    )
    victim_creds = pki.grpc_channel_credentials(
        ca_bundle_pem=service.identity.ca_bundle.read_bytes(), identity=victim
    )
    jpeg = (PHOTOS / "chelsea.jpg").read_bytes()
    address = f"127.0.0.1:{service.grpc_port}"
    excess = 2 * BURST + 16

    async def call(stub: Any, frame_id: str) -> grpc.aio.AioRpcError | None:
        try:
            await stub.Detect(common_pb2.Frame(image=jpeg, frame_id=frame_id), timeout=120)
        except grpc.aio.AioRpcError as exc:
            return exc
        return None

    async with (
        grpc.aio.secure_channel(address, creds) as fc,
        grpc.aio.secure_channel(address, victim_creds) as vc,
    ):
        stub = gateway_pb2_grpc.DeviceGatewayStub(fc)
        assert await asyncio.gather(*(call(stub, f"f-{i}") for i in range(BURST))) == [None] * BURST
        # Its burst of refusals in a row is answered at once ...
        quick = await asyncio.gather(*(call(stub, f"q-{i}") for i in range(BURST)))
        assert service.door.held_refusals("cam-flood") == 0
        # ... after that, its refusals wait: its own concurrency limit now paces it.
        calls = [asyncio.create_task(call(stub, f"x-{i}")) for i in range(excess)]
        await _until(lambda: service.door.held_refusals("cam-flood") == excess)
        # Another device is served meanwhile.
        assert await call(gateway_pb2_grpc.DeviceGatewayStub(vc), "v-1") is None
        held = await asyncio.gather(*calls)
    # Every refusal still reaches the device, with its retry-after.
    for exc in quick + held:
        assert exc is not None
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "edgeward-retry-after-s" in dict(exc.trailing_metadata() or ())
    assert service.door.held_refusals("cam-flood") == 0
    assert _denials(service, "rate_limited") == BURST + excess


async def test_refuse_waiting_refuses_one_devices_waiters_and_keeps_the_round() -> None:
    fair = FairQueue(slots=1, max_waiting=10)
    await fair.acquire("flood")  # a run in progress: untouched
    flood = [asyncio.ensure_future(fair.acquire("flood")) for _ in range(3)]
    victim = asyncio.ensure_future(fair.acquire("victim"))
    await asyncio.sleep(0)
    assert fair.waiting() == 4
    assert fair.refuse_waiting("flood", lambda: RateLimited("flood", 1.0)) == 3
    for task in flood:
        with pytest.raises(RateLimited):
            await task
    assert fair.waiting() == 1
    assert fair.refuse_waiting("flood", lambda: RateLimited("flood", 1.0)) == 0
    fair.release("flood")
    await victim  # the next turn is the other device's
    assert fair.held("victim") == 1
    assert fair.held("flood") == 0
