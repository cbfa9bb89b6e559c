"""A device that floods the managed broker is disconnected, told why, and nobody else notices.

Against the real managed broker and its dynamic security plugin: once the front door counts a
device refused ``disconnect_after_refusals`` frames in a row, the bridge has the broker close the
device's connection. The bridge's own connections are not disturbed, another device is served,
the flooder finds the reason on its events when it comes back (persistent session), and a
device that stays within its budget is never disconnected. Counts are checked, not times.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt
import pytest

import pki
from gateway import LimitsSettings
from gateway._mqtt import FloodGate, MqttBridge
from tests._support.mqtt import (
    BrokerHarness,
    FakeEngine,
    collect,
    device_client,
    flood_until_cut,
    frame_props,
    front_door,
)
from tests.conftest import IssueFn

JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 64
BURST = 2
AFTER = 10  # refusals in a row that get a device disconnected


async def _until(predicate: Callable[[], bool], *, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - polling the bridge's own state
            await asyncio.sleep(0.01)


def _bridge(harness: BrokerHarness, engine: Any, *, after: int = AFTER) -> MqttBridge:
    door = front_door(engine, limits=LimitsSettings(frames_per_s=0.001, burst=BURST))
    settings = harness.settings.model_copy(update={"disconnect_after_refusals": after})
    return MqttBridge(
        settings, connection=harness.bridge_connection(), door=door, control=harness.control
    )


async def test_a_flooding_device_is_disconnected_and_told_why(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    flood, victim = issue("device", "cam-flood"), issue("device", "cam-victim")
    engine = FakeEngine()
    async with _bridge(harness, engine) as bridge, device_client(victim, harness.port) as v:
        await bridge.wait_ready(timeout_s=20)
        gate = bridge.gate
        assert gate is not None
        await v.subscribe("devices/cam-victim/detections", qos=1)
        persistent: dict[str, Any] = {"clean_start": False, "session_expiry_s": 600}
        async with device_client(flood, harness.port, **persistent) as f:
            await f.subscribe("devices/cam-flood/events", qos=1)
            # Its budget, then AFTER refusals in a row: cut.
            sent = await flood_until_cut(f, 500, payload=JPEG)
        assert gate.disconnected >= 1
        assert sent < 500  # the connection ended under the flood
        # Another device is served; the bridge itself was not disturbed.
        await v.publish("devices/cam-victim/frames", JPEG, qos=1, properties=frame_props("v-1"))
        (answer,) = await collect(v, count=1, timeout_s=30)
        assert json.loads(bytes(answer.payload))["frameId"] == "v-1"  # type: ignore[arg-type]
        assert bridge.stats.reconnects == 0
        assert engine.calls == BURST + 1
        # Back on its persistent session, the device finds why.
        async with device_client(flood, harness.port, **persistent) as f:
            events = await collect(f, count=AFTER + 5, timeout_s=5)
        messages = [json.loads(bytes(m.payload))["error"]["message"] for m in events]  # type: ignore[arg-type]
        assert any("disconnected" in m for m in messages), messages


async def test_a_device_a_little_over_its_budget_stays_connected(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    calm = issue("device", "cam-calm")
    async with _bridge(harness, FakeEngine()) as bridge, device_client(calm, harness.port) as c:
        await bridge.wait_ready(timeout_s=20)
        assert bridge.gate is not None
        await c.subscribe("devices/cam-calm/detections", qos=1)
        # Its burst, then one refusal short of being cut: over budget, not flooding.
        for i in range(BURST + AFTER - 1):
            await c.publish("devices/cam-calm/frames", JPEG, qos=1, properties=frame_props(f"c{i}"))
        await _until(lambda: bridge.stats.frames_rejected == AFTER - 1)
        answers = await collect(c, count=BURST, timeout_s=30)
        assert len(answers) == BURST
        # Still connected: a round trip to the broker (another frame now would be the refusal
        # that crosses the threshold, within the same second).
        await c.subscribe("devices/cam-calm/events", qos=1)
        assert bridge.gate.disconnected == 0


async def test_with_the_gate_off_a_flood_is_only_refused(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    flood = issue("device", "cam-flood")
    async with _bridge(harness, FakeEngine(), after=0) as bridge:
        await bridge.wait_ready(timeout_s=20)
        assert bridge.gate is None
        async with device_client(flood, harness.port) as f:
            for i in range(50):
                await f.publish(
                    "devices/cam-flood/frames", JPEG, qos=1, properties=frame_props(f"f{i}")
                )
            await _until(lambda: bridge.stats.frames_rejected == 50 - BURST)
    door = front_door(FakeEngine())
    unmanaged = MqttBridge(harness.settings, connection=harness.bridge_connection(), door=door)
    assert unmanaged.gate is None  # no broker control: nothing to disconnect with


@pytest.mark.parametrize("device_id", ["_edgeward.bridge", "bad/id"])
async def test_the_gate_disconnects_device_ids_only(harness: BrokerHarness, device_id: str) -> None:
    async with _bridge(harness, FakeEngine()) as bridge:
        await bridge.wait_ready(timeout_s=20)
        assert bridge.gate is not None
        bridge.gate.flooding(device_id)
        await asyncio.sleep(0)
        await _until(lambda: len(bridge.gate._tasks) == 0)  # type: ignore[union-attr]
        assert bridge.gate.disconnected == 0
        assert bridge.stats.reconnects == 0


class _Recorder:
    """A :class:`~gateway._mqtt._floodgate.Kicker` that records what was sent, and when."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.confirmed: list[str] = []

    def kick_now(self, username: str) -> Awaitable[None]:
        self.sent.append(username)

        async def confirmed() -> None:
            self.confirmed.append(username)

        return confirmed()


async def test_the_kick_leaves_within_the_refusal_that_crosses_the_threshold() -> None:
    # Every moment until the broker acts lets it read more of the flood: the command is
    # sent by flooding() itself, not by a task that runs on a later turn of the loop.
    control, told = _Recorder(), []
    gate = FloodGate(control, tell=told.append)
    gate.flooding("cam-flood")
    assert told == ["cam-flood"]
    assert control.sent == ["cam-flood"]  # before this test yields to the loop
    await _until(lambda: gate.disconnected == 1)
    gate.flooding("cam-flood")  # within the cooldown: not again
    assert control.sent == ["cam-flood"]
    await gate.aclose()


async def _until_closed(client: aiomqtt.Client) -> None:
    async with asyncio.timeout(30):
        async for _ in client.messages:  # ends when the broker closes the connection
            pass


async def test_kick_now_writes_the_command_before_it_returns(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    flood = issue("device", "cam-flood")
    async with device_client(flood, harness.port) as f:
        await f.subscribe("devices/cam-flood/events", qos=1)
        confirmed = harness.control.kick_now("cam-flood")
        paho = harness.control._client._client  # type: ignore[union-attr]
        assert not paho.want_write()  # on the socket already, not waiting for the loop
        await confirmed
        with pytest.raises(aiomqtt.MqttError):
            await _until_closed(f)
    with pytest.raises(pki.InvalidName):
        harness.control.kick_now("_edgeward.bridge")


class _HeldEngine(FakeEngine):
    """Every run waits for ``go``: frames admitted meanwhile wait for a turn."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()

    async def detect_with_frame(self, image: bytes, **kwargs: Any) -> Any:
        result = await super().detect_with_frame(image, **kwargs)
        await self.go.wait()
        return result


async def test_a_cut_devices_frames_waiting_for_a_turn_are_refused_not_run(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    # Its budget lets the flooder in with more frames than it may run at once; once it is
    # cut, those still waiting for a turn are refused (each still answered), so no other
    # device waits behind them.
    flood = issue("device", "cam-flood")
    engine = _HeldEngine()
    burst = 6
    door = front_door(engine, limits=LimitsSettings(frames_per_s=0.001, burst=burst))
    # A frame's deadline far beyond the waits below: no refusal here is a deadline's.
    settings = harness.settings.model_copy(
        update={"disconnect_after_refusals": AFTER, "frame_deadline_s": 600.0}
    )
    bridge = MqttBridge(
        settings, connection=harness.bridge_connection(), door=door, control=harness.control
    )
    async with bridge:
        await bridge.wait_ready(timeout_s=20)
        gate = bridge.gate
        assert gate is not None
        async with device_client(flood, harness.port) as f:
            sent = await flood_until_cut(f, 500, payload=JPEG)
        await _until(lambda: gate.disconnected >= 1)
        running = engine.calls
        assert 1 <= running < burst  # the rest of its burst was waiting for a turn
        stats = bridge.stats
        await _until(lambda: stats.frames_rejected == sent - running)
        engine.go.set()
        await _until(lambda: stats.frames_inferred == running)
        assert engine.calls == running
        assert door.fair.waiting("cam-flood") == 0
        assert set(stats.by_reason) == {"rate_limited"}
