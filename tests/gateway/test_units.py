"""Gateway parts on their own: error mapping, settings, revocation state, events, limits,
identity judgement with an injected clock, authorisation."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

import gateway
from gateway import (
    AuthorisationSettings,
    Command,
    ConfigError,
    ErrorEvent,
    EventHub,
    GatewaySettings,
    RevocationEvent,
    RevocationState,
    StaticDeviceDirectory,
    load_gateway_settings,
)
from gateway._door import Authoriser, RateLimiter, telemetry_from_pb
from gateway._grpc import LiveCalls
from gateway._grpc._identity import IdentityJudge
from gateway._revocation import RegistryRevocationPoller
from gateway.errors import (
    DeviceRevoked,
    InvalidRequest,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
)
from protos.edgeward.v1 import common_pb2
from tests.conftest import TRUST_DOMAIN
from tests.gateway._helpers import wait_until


def test_public_surface_resolves():
    for name in gateway.__all__:
        assert getattr(gateway, name) is not None


# -- settings -------------------------------------------------------------------------------------


def test_settings_from_toml_env_and_overrides(tmp_path, monkeypatch):
    path = tmp_path / "gateway.toml"
    path.write_text(
        'identity_dir = "/id"\ncore_address = "core.example:7443"\n'
        "[inference]\nmax_batch = 4\n[limits]\nburst = 5\n"
        "[mqtt]\nport = 8883\n"
    )
    monkeypatch.setenv("EDGEWARD_GATEWAY_LIMITS__BURST", "7")
    settings = load_gateway_settings(path, overrides={"region": "eu"})
    assert isinstance(settings, GatewaySettings)
    assert settings.inference.max_batch == 4
    assert settings.limits.burst == 7
    assert settings.region == "eu"
    assert settings.mqtt == {"port": 8883}
    assert settings.authorisation.allowed("pet_camera") >= {"StreamDetect"}
    assert settings.authorisation.allowed("pet-camera") >= {"StreamDetect"}
    assert "StreamDetect" not in settings.authorisation.allowed("toaster")
    assert "StreamDetect" not in settings.authorisation.allowed(None)


def test_a_misspelled_environment_override_stops_start_up(tmp_path, monkeypatch):
    """A typo in an override must not be ignored silently (the file's typos are not)."""
    path = tmp_path / "gateway.toml"
    path.write_text('identity_dir = "/id"\npki_dir = "/p"\n')
    monkeypatch.setenv("EDGEWARD_GATEWAY_CORE_ADRESS", "core.example:7443")
    with pytest.raises(ConfigError, match="EDGEWARD_GATEWAY_CORE_ADRESS: unknown key"):
        load_gateway_settings(path)


def test_settings_errors_name_the_key_and_its_override(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text('identity_dir = "/id"\npki_dir = "/p"\n[inference]\nmax_batch = 0\nbogus = 1\n')
    with pytest.raises(ConfigError) as info:
        load_gateway_settings(path)
    text = str(info.value)
    assert "inference.max_batch" in text
    assert "EDGEWARD_GATEWAY_INFERENCE__MAX_BATCH" in text
    assert "inference.bogus: unknown key" in text


def test_settings_need_a_revocation_source():
    with pytest.raises(ConfigError, match="core_address"):
        load_gateway_settings(None, overrides={"identity_dir": "/id"})


def test_every_setting_is_described():
    from gateway import describe_settings

    rows = describe_settings()
    assert all(" None (`" not in row for row in rows)
    assert any("limits.frames_per_s" in row for row in rows)


# -- revocation state ------------------------------------------------------------------------------


async def test_revocation_state_staleness_follows_the_clock():
    now = [100.0]
    state = RevocationState(max_staleness_s=5.0, clock=lambda: now[0])
    assert not state.healthy()  # never heard from the feed
    state.mark_fresh()
    now[0] = 105.0
    assert state.healthy()
    now[0] = 105.1
    assert not state.healthy()
    await state.apply(RevocationEvent(1, "cam-1", None, "stolen"))
    assert state.healthy()


async def test_revocation_by_device_or_serial_and_listeners():
    state = RevocationState(max_staleness_s=5.0)
    seen: list[RevocationEvent] = []
    seen_async: list[str] = []

    async def async_listener(event: RevocationEvent) -> None:
        seen_async.append(event.device_id)

    def broken(event: RevocationEvent) -> None:
        raise RuntimeError("listener bug")

    state.add_listener(broken)
    state.add_listener(seen.append)
    state.add_listener(async_listener)
    assert await state.apply(RevocationEvent(1, "cam-1", None, "r"))
    assert await state.apply(RevocationEvent(2, "cam-2", "AB12", "r"))
    assert not await state.apply(RevocationEvent(2, "cam-2", "ab12", "r"))  # replay
    assert state.is_revoked("cam-1", "anything")
    assert state.is_revoked("cam-2", "ab12")
    assert not state.is_revoked("cam-2", "cd34")
    assert state.last_sequence == 2
    assert [e.sequence for e in seen] == [1, 2]
    assert seen_async == ["cam-1", "cam-2"]


async def test_registry_poller_applies_in_order_and_resumes():
    rows = [RevocationEvent(1, "cam-1", None, "r"), RevocationEvent(2, "cam-2", None, "r")]
    asked: list[int] = []

    def reader(after: int):
        asked.append(after)
        return [r for r in rows if r.sequence > after]

    state = RevocationState(max_staleness_s=5.0)
    async with RegistryRevocationPoller(state, reader=reader, interval_s=0.01):
        assert state.healthy()  # first poll happens on entry
        rows.append(RevocationEvent(3, "cam-3", None, "r"))
        await wait_until(lambda: state.is_revoked("cam-3", "x"))
    assert asked[0] == 0
    assert 2 in asked
    assert state.last_sequence == 3


async def test_failing_registry_lets_the_state_go_stale():
    import pki

    now = [0.0]

    def reader(after: int):
        raise pki.RegistryError("locked")

    state = RevocationState(max_staleness_s=1.0, clock=lambda: now[0])
    poller = RegistryRevocationPoller(state, reader=reader, interval_s=10)
    assert not await poller.poll_once()
    assert not state.healthy()


# -- events ---------------------------------------------------------------------------------------


async def test_event_hub_replays_after_id_bounds_memory_and_expires():
    now = [0.0]
    hub = EventHub(max_per_device=3, ttl_s=10.0, clock=lambda: now[0])
    ids = [hub.publish("cam-a", Command(f"c{i}")).event_id for i in range(5)]
    hub.publish("cam-b", ErrorEvent("INVALID_ARGUMENT", "b"))
    assert [e.payload.name for e in hub.stored("cam-a")] == ["c2", "c3", "c4"]  # type: ignore[union-attr]
    sub = hub.subscribe("cam-a", ids[2])
    got = [await anext(sub), await anext(sub)]
    assert [e.event_id for e in got] == ids[3:]
    live = asyncio.ensure_future(anext(sub))
    await asyncio.sleep(0)
    assert not live.done()
    hub.publish("cam-b", Command("not for a"))
    await asyncio.sleep(0)
    assert not live.done()
    hub.publish("cam-a", Command("live"))
    assert (await live).payload.name == "live"  # type: ignore[union-attr]
    await sub.aclose()
    now[0] = 11.0
    assert hub.stored("cam-a") == []
    # An id from another process (or garbage) replays everything stored.
    hub.publish("cam-a", Command("x"))
    sub2 = hub.subscribe("cam-a", "deadbeef-1")
    assert (await anext(sub2)).payload.name == "x"  # type: ignore[union-attr]
    await sub2.aclose()


def test_event_hub_bounds_devices():
    hub = EventHub(max_devices=2)
    for device in ("cam-a", "cam-b", "cam-c"):
        hub.publish(device, Command("x"))
    assert hub.stored("cam-a") == []
    assert len(hub.stored("cam-c")) == 1


# -- limits ---------------------------------------------------------------------------------------


def test_token_bucket_refills_at_rate():
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=2, clock=lambda: now[0])
    limiter.take("cam-1")
    limiter.take("cam-1")
    with pytest.raises(RateLimited) as info:
        limiter.take("cam-1")
    assert info.value.retry_after_s == pytest.approx(0.5)
    limiter.take("cam-2")  # another device has its own bucket
    now[0] = 0.5
    limiter.take("cam-1")


async def test_stream_pacing_takes_a_token_at_once_or_waits_for_one():
    from gateway import FrontDoor, LimitsSettings
    from tests._support.mqtt import FakeEngine

    door = FrontDoor(
        gateway_id="gw-1",
        engine=FakeEngine(),
        limits=LimitsSettings(frames_per_s=20.0, burst=2),
    )
    assert door.pace_now("cam-1")
    assert door.pace_now("cam-1")
    assert not door.pace_now("cam-1")  # the budget is spent: nothing taken, the stream waits
    assert door.pace_now("cam-2")  # another device has its own budget
    async with asyncio.timeout(30):
        await door.pace("cam-1")  # a token refills (1/20 s), and pace takes it
    assert not door.pace_now("cam-1")
    door.close()


async def test_live_calls_cut_only_the_revoked_device_and_cap_streams():
    from gateway.errors import TooManyStreams

    live = LiveCalls(max_streams_per_device=1)
    blocker = asyncio.Event()
    with (
        live.register("cam-1", "aa", "StreamDetect", streaming=True) as a,
        live.register("cam-2", "bb", "StreamDetect", streaming=True) as b,
    ):
        with (
            pytest.raises(TooManyStreams),
            live.register("cam-1", "aa", "Subscribe", streaming=True),
        ):
            pass
        wait_a = asyncio.ensure_future(a.guard(blocker.wait()))
        wait_b = asyncio.ensure_future(b.guard(blocker.wait()))
        await asyncio.sleep(0)
        assert live.cut("cam-1", "other-serial") == 0
        assert live.cut("cam-1") == 1
        with pytest.raises(DeviceRevoked):
            await wait_a
        assert not wait_b.done()
        blocker.set()
        assert await wait_b is True
    assert live.count() == 0


# -- identity -------------------------------------------------------------------------------------


def _ctx(identity) -> dict[str, list[bytes]]:
    return {"x509_pem_cert": [identity.cert.read_bytes()]}


def test_identity_judge_checks_role_time_and_revocation(issue):
    device = issue("device", "cam-judge", lifetime=dt.timedelta(hours=2))
    cert = device.certificate()
    now = [cert.not_valid_before_utc]
    state = RevocationState(max_staleness_s=5.0)
    judge = IdentityJudge(trust_domain=TRUST_DOMAIN, revocation=state, clock=lambda: now[0])
    peer = judge.judge(_ctx(device))
    assert peer.device_id == "cam-judge"
    now[0] = cert.not_valid_before_utc - dt.timedelta(seconds=1)
    with pytest.raises(Unauthenticated):
        judge.judge(_ctx(device))
    now[0] = cert.not_valid_after_utc
    judge.judge(_ctx(device))
    now[0] = cert.not_valid_after_utc + dt.timedelta(seconds=1)
    with pytest.raises(Unauthenticated):
        judge.recheck(peer)
    with pytest.raises(Unauthenticated):
        judge.judge({})
    now[0] = cert.not_valid_before_utc
    state._serials[peer.serial] = RevocationEvent(1, "cam-judge", peer.serial, "r")
    with pytest.raises(DeviceRevoked):
        judge.recheck(peer)


def test_identity_judge_refuses_servers_and_other_trust_domains(issue):
    state = RevocationState(max_staleness_s=5.0)
    judge = IdentityJudge(trust_domain=TRUST_DOMAIN, revocation=state)
    with pytest.raises(PermissionDenied) as info:
        judge.judge(_ctx(issue("gateway", "gw-judge")))
    assert not isinstance(info.value, DeviceRevoked)
    other = IdentityJudge(trust_domain="elsewhere.example", revocation=state)
    with pytest.raises(Unauthenticated):
        other.judge(_ctx(issue("device", "cam-judge")))
    with pytest.raises(Unauthenticated):
        judge.judge({"x509_pem_cert": [b"-----BEGIN CERTIFICATE-----\nnope\n"]})


# -- authorisation --------------------------------------------------------------------------------


async def test_authoriser_caches_with_ttl_and_refuses_by_type():
    now = [0.0]
    types = {"cam-1": "pet_camera", "tv-1": "television"}
    authoriser = Authoriser(
        StaticDeviceDirectory(types),
        AuthorisationSettings(device_info_ttl_s=10.0),
        clock=lambda: now[0],
    )
    await authoriser.check("cam-1", "StreamDetect")
    with pytest.raises(PermissionDenied):
        await authoriser.check("tv-1", "StreamDetect")
    await authoriser.check("tv-1", "Detect")
    await authoriser.check("stranger", "Detect")  # unknown device: default methods
    with pytest.raises(PermissionDenied):
        await authoriser.check("stranger", "StreamDetect")
    types["tv-1"] = "pet_camera"
    with pytest.raises(PermissionDenied):  # still cached
        await authoriser.check("tv-1", "StreamDetect")
    now[0] = 11.0
    await authoriser.check("tv-1", "StreamDetect")


def test_telemetry_bounds():
    now = dt.datetime.now(dt.UTC)
    ok = telemetry_from_pb(
        "cam-1",
        common_pb2.Telemetry(battery_percent=-1, readings={"wifi_rssi": -50}),
        max_readings=32,
        now=now,
    )
    assert ok.battery_percent == -1
    for bad in (
        common_pb2.Telemetry(battery_percent=-2),
        common_pb2.Telemetry(temperature_c=1e9),
        common_pb2.Telemetry(readings={"": 1.0}),
        common_pb2.Telemetry(readings={"x": float("inf")}),
    ):
        with pytest.raises(InvalidRequest):
            telemetry_from_pb("cam-1", bad, max_readings=32, now=now)
