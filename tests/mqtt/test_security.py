"""Who may connect, publish and subscribe: every negative case against a real broker."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import time
from pathlib import Path

import aiomqtt
import pytest

import pki
from gateway._mqtt import MqttBridge
from tests._support.mqtt import (
    BrokerHarness,
    FakeEngine,
    cli_tls_args,
    collect,
    device_client,
    frame_props,
    front_door,
    mint_odd_certificate,
)
from tests.conftest import IssueFn, require_tool

JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 64


def _pub(identity: pki.IdentityFiles, port: int, topic: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            require_tool("mosquitto_pub"),
            *cli_tls_args(identity, port),
            *("-t", topic, "-m", "x", "-q", "1", "-d"),
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


async def _drain(client: aiomqtt.Client) -> None:
    async with asyncio.timeout(5):
        async for _ in client.messages:
            pass


async def _connect_fails(identity: pki.IdentityFiles | None, port: int, **kw: object) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with device_client(identity, port, timeout=1.5, **kw):  # type: ignore[arg-type]
            pass


async def test_device_may_not_publish_to_another_devices_topics(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    a = issue("device", "dev-aaa")
    own = _pub(a, harness.port, "devices/dev-aaa/frames")
    assert "RC:135" not in own.stdout + own.stderr  # allowed (no subscriber: RC 16)
    for topic in (
        "devices/dev-bbb/frames",
        "devices/dev-bbb/telemetry",
        "devices/dev-bbb/detections",
        "devices/dev-aaa/detections",  # only the gateway answers on a device's detections
        "devices/dev-aaa/events",
        "devices/dev-aaa/frames/extra",
        "other/topic",
        "$SYS/broker/x",
    ):
        out = _pub(a, harness.port, topic)
        assert "RC:135" in out.stdout + out.stderr, topic  # 0x87 not authorised


async def test_device_subscriptions_outside_its_subtree_get_nothing(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    """Mosquitto 2.0 grants SUBACK for any filter but checks read access on every delivery."""
    a = issue("device", "dev-aaa")
    b = issue("device", "dev-bbb")
    engine = FakeEngine()
    async with (
        MqttBridge(
            harness.settings,
            connection=harness.bridge_connection(),
            door=front_door(engine, gateway_id="gw-mqtt"),
        ) as bridge,
        device_client(a, harness.port) as spy,
        device_client(b, harness.port) as victim,
    ):
        await bridge.wait_ready()
        for f in (
            "devices/#",
            "#",
            "+/dev-bbb/detections",
            "devices/+/detections",
            "devices/dev-bbb/#",
            "$SYS/#",
            "$share/g/devices/+/frames",
        ):
            await spy.subscribe(f, qos=1)
        await victim.subscribe("devices/dev-bbb/detections", qos=1)
        await victim.publish("devices/dev-bbb/frames", JPEG, qos=1, properties=frame_props("v1"))
        await victim.publish("devices/dev-bbb/telemetry", b"{}", qos=1)
        assert len(await collect(victim, count=1, timeout_s=5)) == 1
        assert await collect(spy, count=1, timeout_s=1) == []


@pytest.mark.parametrize("cn", ["#", "+", "dev-aaa/frames", "DEV-AAA", "dev-aaa/#"])
async def test_odd_common_names_get_nothing(
    harness: BrokerHarness, issue: IssueFn, pki_dir: Path, tmp_path: Path, cn: str
) -> None:
    """A certificate from our CA whose CN is not a device id must be powerless."""
    odd = mint_odd_certificate(pki_dir, tmp_path / "odd", common_name=cn)
    a = issue("device", "dev-aaa")
    engine = FakeEngine()
    async with (
        MqttBridge(
            harness.settings,
            connection=harness.bridge_connection(),
            door=front_door(engine, gateway_id="gw-mqtt"),
        ) as bridge,
        device_client(a, harness.port) as victim,
    ):
        await bridge.wait_ready()
        await victim.subscribe("devices/dev-aaa/detections", qos=1)
        for topic in ("devices/dev-aaa/frames", "devices/x/frames", "devices/dev-aaa/telemetry"):
            out = _pub(odd, harness.port, topic)
            text = out.stdout + out.stderr
            assert "RC:135" in text or "CONNACK" not in text, (cn, topic, text)
        # Its "own" subtree (devices/<CN>/frames) is outside every topic the bridge reads
        # ("devices/+/frames" is one level per id), and the bridge re-checks the id anyway.
        _pub(odd, harness.port, f"devices/{cn}/frames".replace("#", "h").replace("+", "p"))
        sub = await asyncio.create_subprocess_exec(
            require_tool("mosquitto_sub"),
            *cli_tls_args(odd, harness.port),
            *("-t", "#", "-t", "devices/dev-aaa/detections", "-W", "2", "-v"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        await asyncio.sleep(0.3)
        await victim.publish("devices/dev-aaa/frames", JPEG, qos=1, properties=frame_props("o1"))
        assert len(await collect(victim, count=1, timeout_s=5)) == 1
        sub_out, _ = await sub.communicate()
    assert b"devices/" not in sub_out
    assert engine.calls == 1  # only the real device's frame reached the model


async def test_no_certificate_refused(harness: BrokerHarness, pki_dir: Path) -> None:
    await _connect_fails(None, harness.port, ca_bundle=pki.PkiLayout(pki_dir).ca_bundle)


async def test_other_ca_refused(harness: BrokerHarness, issue_foreign: IssueFn) -> None:
    await _connect_fails(issue_foreign("device", "dev-aaa"), harness.port)


async def test_expired_certificate_refused(harness: BrokerHarness, issue: IssueFn) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    await _connect_fails(
        issue("device", "dev-old", now=past, lifetime=dt.timedelta(hours=1)), harness.port
    )


async def test_gateway_listener_refuses_devices(harness: BrokerHarness, issue: IssueFn) -> None:
    """A device certificate (even with the old bridge's name as CN) gets nowhere on it."""
    a = issue("device", "edgeward-bridge")
    await _connect_fails(a, harness.broker.bridge_port)


async def test_revoked_before_connect_refused(harness: BrokerHarness, issue: IssueFn) -> None:
    a = issue("device", "dev-rvk")
    async with device_client(a, harness.port):
        pass
    harness.revoke_serial(a)
    await harness.broker.refresh_crl()
    await asyncio.sleep(0.2)  # SIGHUP is handled on the broker's next loop turn
    await _connect_fails(a, harness.port)
    other = issue("device", "dev-fine")
    async with device_client(other, harness.port):
        pass


async def test_revoked_while_connected_session_gone_within_a_second(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    a = issue("device", "dev-live")
    bystander = issue("device", "dev-stay")
    async with device_client(bystander, harness.port) as stay:
        client = device_client(a, harness.port)
        async with client:
            await client.subscribe("devices/dev-live/detections", qos=1)
            harness.revoke_serial(a)
            started = time.monotonic()
            harness.enforcer.on_revocation(
                type("Ev", (), {"device_id": "dev-live", "serial": None})()
            )
            with pytest.raises(aiomqtt.MqttError):
                await _drain(client)
            cut_after = time.monotonic() - started
        assert cut_after < 1.0, cut_after
        await asyncio.sleep(0.3)
        await _connect_fails(a, harness.port)  # the refreshed CRL refuses the reconnect
        await stay.publish("devices/dev-stay/telemetry", b"{}", qos=1)  # others unaffected


async def test_oversized_payload_refused_before_the_model(
    pki_dir: Path, issue: IssueFn, tmp_path: Path
) -> None:
    require_tool("mosquitto")
    h = BrokerHarness(
        pki_dir=pki_dir,
        gateway=issue("gateway", "gw-small"),
        data_dir=tmp_path / "mqtt-small",
        settings_overrides={"max_payload_bytes": 64 * 1024},
    )
    device = issue("device", "cam-big")
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * (100 * 1024))
    engine = FakeEngine()
    async with (
        h.run(),
        MqttBridge(
            h.settings,
            connection=h.bridge_connection(),
            door=front_door(engine, gateway_id="gw-small"),
        ) as bridge,
    ):
        await bridge.wait_ready()
        out = await asyncio.to_thread(
            subprocess.run,
            [
                require_tool("mosquitto_pub"),
                *cli_tls_args(device, h.port),
                *("-t", "devices/cam-big/frames", "-f", str(big), "-q", "1", "-d"),
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        await asyncio.sleep(0.3)
    text = out.stdout + out.stderr
    # Dropped by the broker (PUBACK 0x83/0x95) or the sender disconnected; never inferred.
    assert "RC:0)" not in text, text
    assert "RC:16)" not in text, text
    assert engine.calls == 0
