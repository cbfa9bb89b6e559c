"""Who may call, end to end: mTLS refusals, identity roles, revocation (live), a stale feed."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway import Command, RevocationEvent
from protos.edgeward.v1 import common_pb2, gateway_pb2
from tests._support.gateway import ManualFeed, start_gateway
from tests._support.tasks import running
from tests.gateway._helpers import rpc_error, server_auth_only_device, trailing, wait_until

pytestmark = pytest.mark.timeout(60)


def chelsea(photos: Path) -> common_pb2.Frame:
    return common_pb2.Frame(image=(photos / "chelsea.jpg").read_bytes(), frame_id="c")


# -- refused at the TLS handshake ---------------------------------------------------------------


async def test_no_client_certificate_fails_the_handshake(issue, tmp_path, photos):
    async with start_gateway(issue=issue, tmp_path=tmp_path, use_registry=False) as gw:
        async with gw.channel(None) as channel:
            err = await rpc_error(gw.stub(channel).Detect(chelsea(photos), timeout=5))
        assert err.code() is grpc.StatusCode.UNAVAILABLE
        assert gw.service.metrics.requests.labels(method="Detect", code="OK")._value.get() == 0


async def test_certificate_from_another_ca_fails_the_handshake(
    issue, issue_foreign, tmp_path, photos
):
    async with start_gateway(issue=issue, tmp_path=tmp_path, use_registry=False) as gw:
        foreign = issue_foreign("device", "cam-foreign")
        async with gw.channel(foreign) as channel:
            err = await rpc_error(gw.stub(channel).Detect(chelsea(photos), timeout=5))
        assert err.code() is grpc.StatusCode.UNAVAILABLE


async def test_expired_certificate_fails_the_handshake(issue, tmp_path, photos):
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    expired = issue("device", "cam-expired", now=past, lifetime=dt.timedelta(days=1))
    async with start_gateway(issue=issue, tmp_path=tmp_path, use_registry=False) as gw:
        async with gw.channel(expired) as channel:
            err = await rpc_error(gw.stub(channel).Detect(chelsea(photos), timeout=5))
        assert err.code() is grpc.StatusCode.UNAVAILABLE


async def test_certificate_judged_with_the_gateways_clock_on_every_call(issue, tmp_path, photos):
    """A connection outliving its certificate: the per-call check refuses it."""
    device = issue("device", "cam-clock", lifetime=dt.timedelta(hours=1))
    not_after = device.certificate().not_valid_after_utc
    now = [dt.datetime.now(dt.UTC)]
    async with start_gateway(
        issue=issue, tmp_path=tmp_path, use_registry=False, clock=lambda: now[0]
    ) as gw:
        async with gw.channel(device) as channel:
            stub = gw.stub(channel)
            now[0] = not_after
            assert (await stub.Detect(chelsea(photos), timeout=10)).detections
            now[0] = not_after + dt.timedelta(seconds=1)
            err = await rpc_error(stub.Detect(chelsea(photos), timeout=10))
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        assert err.details() == "not authenticated"  # says little to the caller


# -- identities that are not devices ------------------------------------------------------------


@pytest.mark.parametrize("role", ["gateway", "core"])
async def test_gateway_or_core_identity_may_not_call_device_methods(issue, tmp_path, photos, role):
    async with start_gateway(issue=issue, tmp_path=tmp_path, use_registry=False) as gw:
        other = issue(role, f"{role}-intruder")
        async with gw.channel(other) as channel:
            stub = gw.stub(channel)
            err = await rpc_error(stub.Detect(chelsea(photos), timeout=5))
            assert err.code() is grpc.StatusCode.PERMISSION_DENIED
            err = await rpc_error(stub.Subscribe(gateway_pb2.SubscribeRequest(), timeout=5).read())
            assert err.code() is grpc.StatusCode.PERMISSION_DENIED
        assert 'denials_total{reason="not_a_device"} 2.0' in gw.metrics_text()


async def test_server_auth_only_certificate_is_refused(issue, tmp_path, photos, pki_dir):
    rogue = server_auth_only_device(pki_dir, tmp_path / "rogue", "cam-rogue")
    async with (
        start_gateway(issue=issue, tmp_path=tmp_path, use_registry=False) as gw,
        gw.channel(rogue) as channel,
    ):
        err = await rpc_error(gw.stub(channel).Detect(chelsea(photos), timeout=5))
    # BoringSSL refuses a client certificate without clientAuth at the handshake; were it
    # ever let through, the per-call EKU check answers UNAUTHENTICATED.
    assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


# -- revocation ---------------------------------------------------------------------------------


async def test_revoked_before_call_is_refused_with_a_final_status(issue, tmp_path, photos):
    async with start_gateway(issue=issue, tmp_path=tmp_path) as gw:
        gw.register("cam-gone", "pet_camera")
        device = issue("device", "cam-gone")
        async with gw.channel(device) as channel:
            stub = gw.stub(channel)
            assert (await stub.Detect(chelsea(photos), timeout=10)).detections
            gw.revoke("cam-gone", reason="stolen")
            await wait_until(lambda: gw.service.revocation.is_revoked("cam-gone", "0"))
            err = await rpc_error(stub.Detect(chelsea(photos), timeout=5))
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
        assert trailing(err).get("edgeward-final") == "revoked"
        assert "re-enrol" in (err.details() or "")


async def test_revoked_serial_only_refuses_that_certificate(issue, tmp_path, photos):
    async with start_gateway(issue=issue, tmp_path=tmp_path) as gw:
        gw.register("cam-two-certs", "pet_camera")
        old = issue("device", "cam-two-certs")
        new = issue("device", "cam-two-certs")
        serial = gw.record_certificate(old)
        gw.record_certificate(new)
        assert gw.registry is not None
        gw.registry.revoke_serial(serial, reason="key lost", now=dt.datetime.now(dt.UTC))
        await wait_until(lambda: gw.service.revocation.is_revoked("cam-two-certs", serial))
        async with gw.channel(old) as channel:
            err = await rpc_error(gw.stub(channel).Detect(chelsea(photos), timeout=5))
            assert trailing(err).get("edgeward-final") == "revoked"
        async with gw.channel(new) as channel:
            assert (await gw.stub(channel).Detect(chelsea(photos), timeout=10)).detections


async def test_revoked_mid_stream_is_cut_within_a_second(issue, tmp_path, photos):
    async with start_gateway(issue=issue, tmp_path=tmp_path) as gw:
        gw.register("cam-live", "pet_camera")
        gw.register("cam-bystander", "pet_camera")
        sending = asyncio.Queue[common_pb2.Frame | None]()

        async def frames():
            while (item := await sending.get()) is not None:
                yield item

        async with (
            gw.channel(issue("device", "cam-live")) as channel,
            gw.channel(issue("device", "cam-bystander")) as other,
        ):
            stub = gw.stub(channel)
            stream = stub.StreamDetect(frames(), timeout=30)
            events = stub.Subscribe(gateway_pb2.SubscribeRequest(), timeout=30)
            bystander = gw.stub(other).Subscribe(gateway_pb2.SubscribeRequest(), timeout=30)
            await sending.put(chelsea(photos))
            assert (await stream.read()).detections
            gw.service.events.publish("cam-live", Command("hello"))
            assert (await events.read()).command.name == "hello"

            loop = asyncio.get_running_loop()
            revoked_at = loop.time()
            gw.revoke("cam-live", reason="compromised")
            cut = await asyncio.gather(rpc_error(stream.read()), rpc_error(events.read()))
            elapsed = loop.time() - revoked_at
            for err in cut:
                assert err.code() is grpc.StatusCode.PERMISSION_DENIED
                assert trailing(err).get("edgeward-final") == "revoked"
            # Registry write, 50 ms poll, event, cut: far below the one-second promise.
            assert elapsed < 1.0
            # Another device's stream is untouched.
            gw.service.events.publish("cam-bystander", Command("still-here"))
            assert (await bystander.read()).command.name == "still-here"
            bystander.cancel()
            await sending.put(None)
        text = gw.metrics_text()
        assert "edgeward_gateway_cut_calls_total 2.0" in text
        assert "edgeward_gateway_revocation_events_total 1.0" in text


async def test_registry_status_revoked_is_refused_even_before_the_feed(issue, tmp_path, photos):
    async with start_gateway(issue=issue, tmp_path=tmp_path, use_registry=False) as gw:
        gw.register("cam-marked", "pet_camera")
        authoriser = gw.service.door._authoriser  # type: ignore[union-attr]
        authoriser._directory._revoked = frozenset({"cam-marked"})
        async with gw.channel(issue("device", "cam-marked")) as channel:
            err = await rpc_error(gw.stub(channel).Detect(chelsea(photos), timeout=5))
        assert trailing(err).get("edgeward-final") == "revoked"


# -- the feed ------------------------------------------------------------------------------------


async def test_never_fresh_feed_refuses_new_sessions(issue, tmp_path, photos):
    def never(state):
        return ManualFeed(state, fresh=False)

    overrides = {"core_timeout_s": 0.2}
    async with start_gateway(
        issue=issue,
        tmp_path=tmp_path,
        use_registry=False,
        revocation_source=never,
        overrides=overrides,
    ) as gw:
        async with gw.channel(issue("device", "cam-early")) as channel:
            err = await rpc_error(gw.stub(channel).Detect(chelsea(photos), timeout=5))
        assert err.code() is grpc.StatusCode.UNAVAILABLE
        assert 'denials_total{reason="feed_stale"} 1.0' in gw.metrics_text()


@contextlib.asynccontextmanager
async def _feed_alive(state: Any) -> AsyncIterator[None]:
    """Heartbeats every 50 ms while the block runs, as a live feed sends them: what the block
    does is judged on a fresh feed however long a loaded machine takes to do it."""

    async def beat() -> None:
        while True:
            state.mark_fresh()
            await asyncio.sleep(0.05)

    async with running(beat()):
        yield


async def test_stale_feed_refuses_new_sessions_but_open_ones_continue(issue, tmp_path, photos):
    overrides = {"revocation_max_staleness_s": 0.3}
    async with (
        start_gateway(
            issue=issue, tmp_path=tmp_path, use_registry=False, overrides=overrides
        ) as gw,
        gw.channel(issue("device", "cam-stale")) as channel,
    ):
        state = gw.service.revocation
        stub = gw.stub(channel)
        async with _feed_alive(state):
            events = stub.Subscribe(gateway_pb2.SubscribeRequest(), timeout=60)
            gw.service.events.publish("cam-stale", Command("before"))
            assert (await events.read()).command.name == "before"
        # The manual feed says nothing from here on: wait until it is stale.
        await wait_until(lambda: not state.healthy(), within_s=30)
        err = await rpc_error(stub.Detect(chelsea(photos), timeout=30))
        assert err.code() is grpc.StatusCode.UNAVAILABLE
        gw.service.events.publish("cam-stale", Command("after"))
        assert (await events.read()).command.name == "after"
        # The feed comes back: new sessions are accepted again.
        await state.apply(RevocationEvent(1, "someone-else", None, "x"))
        async with _feed_alive(state):
            assert (await stub.Detect(chelsea(photos), timeout=30)).detections
        # ...and an event for this device still cuts the open stream.
        await state.apply(RevocationEvent(2, "cam-stale", None, "x"))
        err = await rpc_error(events.read())
        assert trailing(err).get("edgeward-final") == "revoked"


class _SlowDirectory:
    """A device directory whose look-ups take a while (a registry far away)."""

    def __init__(self, inner: object, delay_s: float) -> None:
        self._inner = inner
        self._delay_s = delay_s

    async def get_device(self, device_id: str) -> object:
        await asyncio.sleep(self._delay_s)
        return await self._inner.get_device(device_id)  # type: ignore[attr-defined]


async def test_revocation_while_a_call_awaits_authorisation_still_ends_it(issue, tmp_path):
    """A revocation applied while a new Subscribe waits for the device's registry facts must
    not leave that stream open: it is judged again before it becomes a live call."""
    async with start_gateway(
        issue=issue,
        tmp_path=tmp_path,
        use_registry=False,
        wrap_directory=lambda d: _SlowDirectory(d, 0.5),
    ) as gw:
        gw.register("cam-race", "pet_camera")
        device = issue("device", "cam-race")
        async with gw.channel(device) as channel:
            call = gw.stub(channel).Subscribe(gateway_pb2.SubscribeRequest())

            async def drain() -> grpc.StatusCode:
                try:
                    async for _ in call:
                        pass
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            ended = asyncio.ensure_future(drain())
            await asyncio.sleep(0.2)  # the handler is inside the directory look-up
            await gw.service.revocation.apply(RevocationEvent(1, "cam-race", None, "stolen"))
            code = await asyncio.wait_for(ended, timeout=3.0)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert gw.service.servicer.live.count("cam-race") == 0
