"""Every revocation reaches the broker's CRLs at once, and a failed or stale fetch is retried
until it does: new connections of the revoked certificate are refused within about a second,
never only at the next periodic refresh (``crl_refresh_s``, ten minutes by default)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiomqtt
import pytest

import pki
from gateway import RevocationEvent
from gateway._mqtt import CrlSnapshot
from tests._support.core import running_core
from tests._support.mqtt import BrokerHarness, device_client, mqtt_gateway
from tests.conftest import IssueFn, require_tool

# Far beyond what a prompt retry needs and far below the periodic refresh: a refusal inside it
# can only come from the revocation path.
BOUND_S = 10.0


async def _accepted(connect: object) -> bool:
    try:
        async with connect:  # type: ignore[attr-defined]
            return True
    except aiomqtt.MqttError:
        return False


async def refused_after(make_client: object, *, bound_s: float = BOUND_S) -> float:
    """Seconds from now until the start of the first connection attempt that is refused
    (polling; a refused attempt itself may take the client's timeout to fail); fails after
    ``bound_s``."""
    started = time.monotonic()
    while time.monotonic() - started < bound_s:
        attempt = time.monotonic()
        if not await _accepted(make_client()):  # type: ignore[operator]
            return attempt - started
        await asyncio.sleep(0.05)
    pytest.fail(f"still accepted {bound_s} s after the revocation")


def _serial(files: pki.IdentityFiles) -> str:
    return pki.serial_hex(files.certificate().serial_number)


@pytest.mark.parametrize("trouble", ["failing_fetches", "stale_fetches"])
async def test_device_refused_soon_when_the_crl_fetch_fails_after_the_revocation(
    trouble: str, harness: BrokerHarness, issue: IssueFn
) -> None:
    device = issue("device", "dev-retry")
    assert await _accepted(device_client(device, harness.port, timeout=3))
    setattr(harness, trouble, 3)  # the next three fetches fail, or serve the old CRLs
    sequence = harness.revoke_serial(device)
    fetches = harness.fetches
    harness.enforcer.on_revocation(RevocationEvent(sequence, "dev-retry", _serial(device), "lost"))
    took = await refused_after(lambda: device_client(device, harness.port, timeout=3))
    assert harness.fetches >= fetches + 4  # three bad answers, then the good one
    assert harness.enforcer.crl_retries >= 3
    snapshot = harness.broker.crl_snapshot
    assert snapshot is not None
    assert snapshot.sequence == sequence
    assert snapshot.lists(_serial(device))
    print(f"refused {took:.2f} s after the revocation, {harness.enforcer.crl_retries} retries")
    # Others are unaffected.
    assert await _accepted(device_client(issue("device", "dev-other"), harness.port, timeout=3))


def _gateway_listener_client(
    harness: BrokerHarness, identity: pki.IdentityFiles, n: list[int]
) -> aiomqtt.Client:
    creds = harness.broker.credentials
    n[0] += 1
    return aiomqtt.Client(
        harness.settings.bridge_host,
        harness.broker.bridge_port,
        username=creds.bridge_username,
        password=creds.bridge_password,
        identifier=f"_edgeward.test-{n[0]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=pki.client_ssl_context(identity),
        timeout=3,
    )


@pytest.mark.parametrize("role", ["gateway", "core"])
async def test_revoked_server_certificate_refused_by_the_broker(
    role: str, harness: BrokerHarness, issue: IssueFn
) -> None:
    """A server certificate's only way into a broker is the gateway's own listener (with the
    per-start password): a revocation of it is enforced there as promptly as a device's."""
    other = issue(role, f"{role}-stolen")
    n = [0]
    assert await _accepted(_gateway_listener_client(harness, other, n))
    sequence = harness.revoke_serial(other)
    # The event as a standalone gateway's registry poller delivers it (the server's id, its
    # serial), then as a core-fed gateway hears of it (a heartbeat beyond its last sequence).
    harness.enforcer.on_revocation(RevocationEvent(sequence, f"{role}-stolen", _serial(other), ""))
    await refused_after(lambda: _gateway_listener_client(harness, other, n))
    # The gateway's own certificate is unaffected.
    assert await _accepted(_gateway_listener_client(harness, harness.gateway, n))


async def test_snapshot_reflects_sequence_and_serial(
    harness: BrokerHarness, issue: IssueFn
) -> None:
    device = issue("device", "dev-snap")
    sequence = harness.revoke_serial(device)
    snapshot = await harness.crl()
    assert snapshot.reflects(sequence, _serial(device))
    assert not snapshot.reflects(sequence + 1, None)  # a later revocation: not yet in it
    assert not snapshot.reflects(0, _serial(issue("device", "dev-not-revoked")))
    unknown = CrlSnapshot(snapshot.crls, None)
    assert unknown.reflects(sequence + 1, None)  # nothing to check it against
    assert not unknown.reflects(sequence + 1, "abc")


async def test_core_fed_gateway_refuses_a_revoked_gateway_certificate_at_once(
    pki_dir: Path, tmp_path: Path
) -> None:
    """``pki revoke --gateway-id`` on the core: the feed does not carry server revocations, but
    the heartbeat that follows them makes every gateway's broker fetch the new CRLs now."""
    require_tool("mosquitto")
    async with (
        running_core(pki_dir, tmp_path, feed_heartbeat_s=30) as core,
        # A quiet feed is re-opened only after a minute: no reconnect explains a refusal.
        mqtt_gateway(tmp_path, core=core, revocation_max_staleness_s=120) as gw,
    ):
        stolen = pki.issue_identity(
            core.pki_dir,
            tmp_path / "gw-stolen",
            role=pki.Role.GATEWAY,
            id="gw-stolen",
            dns_names=("localhost",),
            registry=core.registry,
        )
        secret = _bridge_secret(tmp_path)

        def client() -> aiomqtt.Client:
            return aiomqtt.Client(
                str(secret["host"]),
                int(str(secret["port"])),
                username=str(secret["username"]),
                password=str(secret["password"]),
                protocol=aiomqtt.ProtocolVersion.V5,
                tls_context=pki.client_ssl_context(stolen),
                timeout=3,
            )

        assert await _accepted(client())
        core.server.revoke_gateway("gw-stolen", reason="stolen")
        took = await refused_after(client)
        print(f"refused {took:.2f} s after 'revoke --gateway-id'")
        # The gateway's own bridge is unaffected: frames still flow (its broker still serves).
        assert gw.service is not None


def _bridge_secret(base: Path) -> dict[str, object]:
    (path,) = base.glob("mqtt-*/bridge-credentials.json")
    value: dict[str, object] = json.loads(path.read_text())
    return value
