"""Client ids and internal names: no device can disturb the gateway's own MQTT clients.

Mosquitto keeps one client-id namespace across all listeners, and a connection with a client
id already in use ends the older one (with a clean start it also wipes that session). The
devices' listener therefore replaces every device's client id with its certificate CN, and
the gateway's own clients (control, frame and telemetry consumers) use ``_edgeward.…`` names,
which no device id can be. These tests play the device that tries anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from types import SimpleNamespace

import aiomqtt
import pytest

import pki
from gateway._mqtt import MqttBridge
from gateway._mqtt._tasks import TaskSet
from tests._support.mqtt import (
    BrokerHarness,
    FakeEngine,
    collect,
    device_client,
    frame_props,
    front_door,
)
from tests.conftest import IssueFn

JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 64
# Mosquitto 2.0 logs "New client connected from <addr> as <client id> (…, u'<username>')."
CONNECTED = re.compile(r"New client connected from \S+ as (\S+) \(.*u'([^']*)'\)")
TAKEOVER = "already connected, closing old connection"


def _connections(harness: BrokerHarness) -> list[tuple[str, str]]:
    """(client id, username) of every connection the broker has logged."""
    found = (CONNECTED.search(line) for line in harness.broker.recent_log)
    return [(m[1], m[2]) for m in found if m]


def _internal_ids(harness: BrokerHarness) -> set[str]:
    """Client ids the gateway's own clients hold now (read from the broker's log)."""
    creds = harness.broker.credentials
    users = {creds.bridge_username, creds.control_username}
    live: set[str] = set()
    for line in harness.broker.recent_log:
        if (m := CONNECTED.search(line)) and m[2] in users:
            live.add(m[1])
        elif line.startswith("Client ") and ("disconnected" in line or "closed its" in line):
            live.discard(line.split()[1].rstrip("."))
    return live


async def _drain(client: aiomqtt.Client) -> None:
    async with asyncio.timeout(5):
        async for _ in client.messages:
            pass


@contextlib.asynccontextmanager
async def _attacker(
    identity: pki.IdentityFiles, port: int, ids: list[str]
) -> AsyncIterator[list[int]]:
    """A device looping over ``ids`` as its client id, clean and persistent, until left.

    It stops on a flag as well as on cancellation: aiomqtt's connect and disconnect can lose
    a cancellation (``asyncio.wait_for`` before Python 3.12), which left the loop running.
    """
    rounds = [0]
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            for cid in ids:
                for clean in (True, False):
                    with contextlib.suppress(aiomqtt.MqttError):
                        client = device_client(
                            identity,
                            port,
                            identifier=cid,
                            clean_start=clean,
                            session_expiry_s=None if clean else 3600,
                            timeout=2.0,
                        )
                        async with client:
                            await asyncio.sleep(0.02)
            rounds[0] += 1

    tasks = TaskSet("attacker")
    task = tasks.spawn(loop(), name="attacker")
    try:
        yield rounds
    finally:
        stop.set()
        await tasks.close(timeout_s=30)
        assert task.done()


async def test_device_posing_as_the_gateways_clients_disturbs_nothing(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    """Control, frame consumer, publisher and telemetry consumer ids: all answered, nobody
    reconnects."""
    evil = issue("device", "evil-one")
    cam = issue("device", "cam-honest")
    victim = issue("device", "cam-victim")
    engine = FakeEngine()
    settings = harness.settings.model_copy(update={"telemetry_workers": 1})
    async with MqttBridge(
        settings,
        connection=harness.bridge_connection(),
        door=front_door(engine, gateway_id="gw-mqtt"),
    ) as bridge:
        await bridge.wait_ready(timeout_s=20)
        internal = _internal_ids(harness)
        # Control, frames-0, publisher-0, telemetry-0: the ids to steal, as the broker saw them.
        assert {i.rsplit(".", 1)[-1] for i in internal} == {
            "control",
            "frames-0",
            "publisher-0",
            "telemetry-0",
        }
        # ... and what they were before (a device could pick those too).
        legacy = ["edgeward-control", "edgeward-gw-mqtt-frames-0", "edgeward-gw-mqtt-telemetry-0"]
        async with (
            device_client(cam, harness.port) as honest,
            device_client(victim, harness.port) as doomed,
            _attacker(evil, harness.port, sorted(internal) + legacy) as rounds,
        ):
            await honest.subscribe("devices/cam-honest/detections", qos=1)
            await doomed.subscribe("devices/cam-victim/detections", qos=1)
            for i in range(20):
                await honest.publish(
                    "devices/cam-honest/frames", JPEG, qos=1, properties=frame_props(f"f{i}")
                )
                await honest.publish(
                    "devices/cam-honest/telemetry", b'{"batteryPercent": 50}', qos=1
                )
                await asyncio.sleep(0.05)
            answers = await collect(honest, count=20, timeout_s=10)
            # A revocation during the attack: the control connection still kicks (the bound is
            # for a loaded machine; bench/mqtt.py measures the figure).
            harness.revoke_serial(victim)
            async with asyncio.timeout(15):
                await harness.enforcer.revoke("cam-victim")
                with pytest.raises(aiomqtt.MqttError):
                    await _drain(doomed)
            async with asyncio.timeout(10):
                while bridge.stats.telemetry_received < 20:  # noqa: ASYNC110 - worker batches
                    await asyncio.sleep(0.05)
            assert rounds[0] >= 1  # the attacker went through every id, both ways
        attacked = [u for cid, u in _connections(harness) if u == "evil-one"]
    assert sorted(bytes(m.properties.CorrelationData) for m in answers) == sorted(  # type: ignore[union-attr]
        f"f{i}".encode() for i in range(20)
    )
    assert engine.calls == 20
    assert bridge.stats.reconnects == 0
    assert bridge.stats.telemetry_received == 20
    assert harness.control.connects == 1
    # The broker gave the attacker its own CN as client id every time; nothing was taken over.
    assert attacked
    assert all(cid == "evil-one" for cid, u in _connections(harness) if u == "evil-one")
    assert not [line for line in harness.broker.recent_log if TAKEOVER in line]


async def test_clean_start_under_a_consumer_id_keeps_the_bridges_session(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    """Frames queued in the bridge's persistent session while it is away all come through."""
    evil = issue("device", "evil-two")
    cam = issue("device", "cam-queued")
    engine = FakeEngine()

    def bridge() -> MqttBridge:
        return MqttBridge(
            harness.settings,
            connection=harness.bridge_connection(),
            door=front_door(engine, gateway_id="gw-mqtt"),
        )

    async with bridge() as first:
        await first.wait_ready()
        (consumer,) = [i for i in _internal_ids(harness) if i.endswith(".frames-0")]
    async with device_client(cam, harness.port) as client:
        await client.subscribe("devices/cam-queued/detections", qos=1)
        for i in range(5):
            await client.publish(
                "devices/cam-queued/frames", JPEG, qos=1, properties=frame_props(f"q{i}")
            )
        # With the consumer's id, clean start and no session expiry: what used to discard
        # the bridge's session (and the frames queued in it) at once.
        for cid in (consumer, "edgeward-gw-mqtt-frames-0"):
            async with device_client(evil, harness.port, identifier=cid, clean_start=True):
                pass
        async with bridge() as second:
            await second.wait_ready()
            answers = await collect(client, count=5, timeout_s=10)
    assert sorted(bytes(m.properties.CorrelationData) for m in answers) == [  # type: ignore[union-attr]
        f"q{i}".encode() for i in range(5)
    ]
    assert engine.calls == 5


async def test_another_devices_client_id_is_replaced_by_the_cn(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    """A device picking another device's client id neither ends its connection nor reads it."""
    a = issue("device", "dev-aaa")
    b = issue("device", "dev-bbb")
    async with MqttBridge(
        harness.settings,
        connection=harness.bridge_connection(),
        door=front_door(FakeEngine(), gateway_id="gw-mqtt"),
    ) as bridge:
        await bridge.wait_ready()
        async with device_client(b, harness.port, identifier="dev-bbb") as victim:
            await victim.subscribe("devices/dev-bbb/detections", qos=1)
            for clean in (True, False):
                intruder = device_client(a, harness.port, identifier="dev-bbb", clean_start=clean)
                async with intruder:
                    await victim.publish(
                        "devices/dev-bbb/frames", JPEG, qos=1, properties=frame_props(f"v{clean}")
                    )
                    assert len(await collect(victim, count=1, timeout_s=5)) == 1
                    assert await collect(intruder, count=1, timeout_s=0.5) == []
    assert ("dev-aaa", "dev-aaa") in _connections(harness)
    assert not [line for line in harness.broker.recent_log if TAKEOVER in line]


async def test_one_connection_per_device(harness: BrokerHarness, issue: IssueFn) -> None:
    """The client id is the CN: a device's second connection replaces its first."""
    a = issue("device", "dev-twice")
    async with (
        device_client(a, harness.port, identifier="first") as first,
        device_client(a, harness.port, identifier="second"),
    ):
        with pytest.raises(aiomqtt.MqttError):
            await _drain(first)


async def test_revoking_devices_named_like_the_gateways_users_leaves_mqtt_working(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    """Revocations of ``edgeward-bridge``/``edgeward-control`` (valid device ids, the old
    internal names) cut those devices only; internal names cannot be kicked at all."""
    cam = issue("device", "cam-after")
    names = ("edgeward-bridge", "edgeward-control")
    lookalikes = [(name, issue("device", name)) for name in names]
    creds = harness.broker.credentials
    engine = FakeEngine()
    async with MqttBridge(
        harness.settings,
        connection=harness.bridge_connection(),
        door=front_door(engine, gateway_id="gw-mqtt"),
    ) as bridge:
        await bridge.wait_ready()
        for device_id, identity in lookalikes:
            async with device_client(identity, harness.port) as client:
                harness.revoke_serial(identity)
                await harness.enforcer.revoke(device_id)
                with pytest.raises(aiomqtt.MqttError):
                    await _drain(client)
        for name in (creds.bridge_username, creds.control_username, "#", "a/b", ""):
            with pytest.raises(pki.InvalidName):
                await harness.control.kick(name)
            with pytest.raises(pki.InvalidName):
                await harness.enforcer.revoke(name)
            # A revocation event naming it: a CRL refresh, no kick.
            harness.enforcer.on_revocation(SimpleNamespace(device_id=name, serial=None))
        await asyncio.sleep(0.5)
        # The gateway's users are all still there, and the plane still works.
        (listed,) = await harness.control.command([{"command": "listClients"}])
        users = set(listed["data"]["clients"])
        assert {creds.bridge_username, creds.control_username} <= users, listed
        async with device_client(cam, harness.port) as client:
            await client.subscribe("devices/cam-after/detections", qos=1)
            await client.publish(
                "devices/cam-after/frames", JPEG, qos=1, properties=frame_props("after")
            )
            assert len(await collect(client, count=1, timeout_s=5)) == 1
        victim = issue("device", "cam-last")
        async with device_client(victim, harness.port) as client:
            await harness.enforcer.revoke("cam-last")
            with pytest.raises(aiomqtt.MqttError):
                await _drain(client)
    assert bridge.stats.reconnects == 0
    assert harness.control.connects == 1
