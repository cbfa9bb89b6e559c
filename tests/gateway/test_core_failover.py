"""A gateway that knows several cores: configuration, failover with the same pinning, and
the revocation feed resuming on another replica without missing or repeating an event.

Two real cores share one SQLite registry (WAL), as replicas on one machine do."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

import gateway._core_endpoints as core_endpoints
import pki
from gateway import (
    ConfigError,
    GatewaySettings,
    RevocationEvent,
    RevocationState,
    free_port,
    load_gateway_settings,
)
from gateway._core_endpoints import CoreEndpoints, parse_core_addresses
from gateway._door import CoreDeviceDirectory
from gateway._revocation import CoreRevocationFeed
from tests._support.core import running_core, unique_id
from tests._support.gateway import start_gateway
from tests.pki.test_role_pinning import serving

pytestmark = [pytest.mark.timeout(120)]


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - polls state another task updates
            await asyncio.sleep(0.02)


# -- configuration ---------------------------------------------------------------------------


def test_core_address_takes_one_a_comma_list_or_a_toml_list(tmp_path: Path) -> None:
    one = GatewaySettings(identity_dir=tmp_path, core_address="a:1")
    assert one.core_addresses == ("a:1",)
    comma = GatewaySettings(identity_dir=tmp_path, core_address=" a:1, b:2 ,a:1")
    assert comma.core_addresses == ("a:1", "b:2")
    toml = tmp_path / "gw.toml"
    toml.write_text(f'identity_dir = "{tmp_path}"\ncore_address = ["a:1", "b:2", "c:3"]\n')
    assert load_gateway_settings(toml).core_addresses == ("a:1", "b:2", "c:3")
    standalone = GatewaySettings(identity_dir=tmp_path, pki_dir=tmp_path)
    assert standalone.core_addresses == ()


def test_core_address_list_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEWARD_GATEWAY_IDENTITY_DIR", str(tmp_path))
    monkeypatch.setenv("EDGEWARD_GATEWAY_CORE_ADDRESS", "core-a:7443,core-b:7443")
    assert load_gateway_settings(None).core_addresses == ("core-a:7443", "core-b:7443")


@pytest.mark.parametrize("bad", ["a:1,b", "a:1,,:2", ",", "a:99999"])
def test_a_bad_address_in_the_list_names_the_key(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match="core_address"):
        load_gateway_settings(None, overrides={"identity_dir": tmp_path, "core_address": bad})
    with pytest.raises(ValueError):  # noqa: PT011 - pydantic's own message
        parse_core_addresses(bad)


def test_gateway_run_takes_core_repeated_and_comma_lists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgeward._cli_gateway import _core_option

    assert _core_option(("a:1", "b:2,c:3")) == "a:1,b:2,c:3"
    assert _core_option(()) is None
    from edgeward.cli import main

    result = CliRunner().invoke(
        main,
        ["gateway", "run", "--identity", str(tmp_path), "--core", "a:1", "--core", "b"],
    )
    assert result.exit_code != 0
    assert "core_address" in result.output


# -- failover of unary calls, with the pin -----------------------------------------------------


async def test_device_facts_come_from_the_next_core_when_the_first_is_down(
    issue, pki_dir: Path, tmp_path: Path
) -> None:
    gw = issue("gateway", "gw-facts")
    cam = unique_id("cam")
    dead = f"127.0.0.1:{free_port()}"
    async with running_core(pki_dir, tmp_path) as core:
        core.registry.upsert_device(
            cam, type="pet-camera", region="home", now=dt.datetime.now(dt.UTC)
        )
        async with CoreEndpoints.for_identity([dead, core.address], gw) as cores:
            directory = CoreDeviceDirectory(cores, timeout_s=5.0)
            info = await directory.get_device(cam)
            assert info is not None
            assert (info.device_id, info.device_type, info.region) == (cam, "pet-camera", "home")
            assert cores.current == core.address
            assert cores.failovers == 1
            # Sticky: the next call goes straight to the core that answered.
            assert await directory.get_device(cam) == info
            assert cores.failovers == 1


async def test_failover_never_trusts_a_gateway_posing_as_a_core(
    issue, pki_dir: Path, tmp_path: Path
) -> None:
    """A stolen gateway key at the first address is skipped like a dead replica."""
    gw = issue("gateway", "gw-facts-2")
    cam = unique_id("cam")
    async with (
        serving(issue("gateway", "gw-rogue"), require_client_auth=True) as (rogue_addr, rogue),
        running_core(pki_dir, tmp_path) as core,
    ):
        core.registry.upsert_device(
            cam, type="doorbell", region="home", now=dt.datetime.now(dt.UTC)
        )
        async with CoreEndpoints.for_identity([rogue_addr, core.address], gw) as cores:
            info = await CoreDeviceDirectory(cores, timeout_s=5.0).get_device(cam)
            assert info is not None
            assert info.device_type == "doorbell"
            assert cores.current == core.address
        assert rogue.calls == []


def test_no_caller_can_replace_the_core_pin(issue) -> None:
    """Extra channel arguments add to the one recipe; the core's pinned name is not one of
    them, so no caller can point a gateway-to-core channel at a gateway's name."""
    gw = issue("gateway", "gw-unpin")
    unpin = pki.server_name_option(pki.gateway_server_name("gw-unpin"))
    with pytest.raises(ValueError, match="pinned name"):
        CoreEndpoints.for_identity(["127.0.0.1:1"], gw, options=[unpin])


class FreezingProxy:
    """A TCP relay to ``target`` that can go silent without closing anything, as a dead host
    or a dropped NAT entry does: after :meth:`freeze` no byte passes either way and no
    connection is closed."""

    def __init__(self, target: str) -> None:
        self._target = target
        self._frozen = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.address = ""

    def freeze(self) -> None:
        self._frozen.set()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if self._frozen.is_set():
                await asyncio.Event().wait()  # swallow it, answer nothing, close nothing
            writer.write(data)
            await writer.drain()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, _, port = self._target.rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        self._writers += [writer, up_writer]
        for pump in (self._pump(reader, up_writer), self._pump(up_reader, writer)):
            task = asyncio.create_task(pump)
            self._tasks.add(task)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FreezingProxy]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for writer in self._writers:
                writer.close()


@pytest.mark.parametrize("keepalive", [True, False], ids=["keepalive", "control-without"])
async def test_a_core_gone_silent_is_dropped_by_keepalive(
    issue, pki_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keepalive: bool
) -> None:
    """The revocation stream through a core that stops answering without closing its
    connection fails with ``UNAVAILABLE`` once a keepalive ping goes unanswered, so the feed
    moves on at the transport's pace. The control, the same recipe without keepalive, still
    waits when the keepalive case has long failed: the ping is what notices."""
    from protos.edgeward.v1 import core_pb2, core_pb2_grpc

    # Shorter timers than the product's 20 s + 10 s, same recipe otherwise.
    timers = {
        "grpc.keepalive_time_ms": 1500,
        "grpc.keepalive_timeout_ms": 1000,
        "grpc.http2.ping_timeout_ms": 1000,
    }
    options = tuple(
        (key, timers.get(key, value))
        for key, value in core_endpoints.CHANNEL_OPTIONS
        if keepalive or key not in timers
    )
    monkeypatch.setattr(core_endpoints, "CHANNEL_OPTIONS", options)
    gw = issue("gateway", "gw-silent")
    async with (
        running_core(pki_dir, tmp_path) as core,
        FreezingProxy(core.address).running() as proxy,
        CoreEndpoints.for_identity([proxy.address], gw) as cores,
        cores.channel() as channel,
    ):
        call = core_pb2_grpc.CoreStub(channel).WatchRevocations(
            core_pb2.WatchRevocationsRequest(since_sequence=0)
        )
        stream = aiter(call)
        async with asyncio.timeout(30):
            await anext(stream)  # a heartbeat: the stream is up
        proxy.freeze()

        async def drain() -> None:
            async for _ in stream:  # heartbeats already in flight, then nothing
                pass

        if keepalive:
            with pytest.raises(grpc.aio.AioRpcError) as lost:
                await asyncio.wait_for(drain(), 30)
            assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
        else:
            # Several times what the keepalive case needs: nothing notices the silence.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(drain(), 10)
        call.cancel()


# -- the revocation feed across replicas -------------------------------------------------------


@pytest.mark.slow
async def test_feed_resumes_on_the_next_core_without_missing_or_repeating(
    issue, pki_dir: Path, tmp_path: Path
) -> None:
    """Core A stops; a revocation made while it is down reaches the gateway through core B
    within the staleness bound, and each revocation is applied exactly once."""
    shared = tmp_path / "shared-registry.sqlite3"
    bound_s = 5.0
    seen: list[tuple[str, int]] = []
    a_stack = contextlib.AsyncExitStack()
    a = await a_stack.enter_async_context(
        running_core(pki_dir, tmp_path, registry=shared, feed_heartbeat_s=0.2)
    )
    try:
        async with running_core(pki_dir, tmp_path, registry=shared, feed_heartbeat_s=0.2) as b:
            overrides = {
                "core_address": [a.address, b.address],
                "pki_dir": None,
                "revocation_max_staleness_s": bound_s,
            }
            async with start_gateway(
                issue=issue, tmp_path=tmp_path, gateway_id="gw-replicas", overrides=overrides
            ) as gw:
                state = gw.service.revocation
                cores = gw.service.core_endpoints
                assert cores is not None
                assert cores.current == a.address

                def record(event: RevocationEvent) -> None:
                    seen.append((event.device_id, event.sequence))

                state.add_listener(record)
                await wait_until(state.healthy)
                first, second = unique_id("cam"), unique_id("cam")
                for cam in (first, second):
                    b.registry.upsert_device(
                        cam, type="pet-camera", region="home", now=dt.datetime.now(dt.UTC)
                    )
                r1 = a.server.revoke_device(first, reason="stolen")
                await wait_until(lambda: state.is_revoked(first, "00"))

                await a_stack.aclose()  # core A goes away
                loop = asyncio.get_running_loop()
                started = loop.time()
                r2 = pki.revoke_device(
                    b.registry, second, reason="lost", now=dt.datetime.now(dt.UTC)
                )
                await wait_until(lambda: state.is_revoked(second, "00"), timeout_s=bound_s * 4)
                elapsed = loop.time() - started
                assert elapsed <= bound_s, f"revocation took {elapsed:.2f}s through core B"
                assert cores.current == b.address
                assert state.healthy()
                await asyncio.sleep(0.5)  # a replay, were there one, would land now
                assert seen == [(first, r1.sequence), (second, r2.sequence)]
                assert state.last_sequence == r2.sequence
    finally:
        await a_stack.aclose()


async def test_the_staleness_bound_holds_across_failovers(
    issue, pki_dir: Path, tmp_path: Path
) -> None:
    """With every replica gone the feed goes stale after its bound, however often it fails
    over; when one replica returns, the feed recovers with what was revoked meanwhile."""
    shared = tmp_path / "shared-registry.sqlite3"
    ports = [free_port(), free_port()]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    state = RevocationState(max_staleness_s=0.8)
    gone = unique_id("cam")
    both = contextlib.AsyncExitStack()
    for port in ports:
        await both.enter_async_context(
            running_core(
                pki_dir,
                tmp_path,
                registry=shared,
                listen=f"127.0.0.1:{port}",
                feed_heartbeat_s=0.2,
            )
        )
    async with (
        CoreEndpoints.for_identity(addresses, issue("gateway", "gw-stale")) as cores,
        CoreRevocationFeed(state, endpoints=cores, stream_timeout_s=1.0) as feed,
    ):
        try:
            await wait_until(state.healthy)
        finally:
            await both.aclose()  # every replica goes away
        await wait_until(lambda: not state.healthy(), timeout_s=30)
        await asyncio.sleep(1.0)  # failing over and over does not make it fresh
        assert not state.healthy()
        with pki.SqliteRegistry(shared) as registry:
            registry.upsert_device(
                gone, type="pet-camera", region="home", now=dt.datetime.now(dt.UTC)
            )
            revoked = pki.revoke_device(
                registry, gone, reason="stolen", now=dt.datetime.now(dt.UTC)
            )
        async with running_core(
            pki_dir, tmp_path, registry=shared, listen=addresses[1], feed_heartbeat_s=0.2
        ):
            await wait_until(lambda: state.is_revoked(gone, "00"))
            assert state.healthy()
            assert state.last_sequence == revoked.sequence
            assert cores.current == addresses[1]
            assert feed.address == addresses[1]


@pytest.mark.slow
async def test_a_hung_replica_is_left_for_the_next_by_the_silence_bound(
    issue, pki_dir: Path, tmp_path: Path
) -> None:
    """A replica that stops answering without closing its connections (SIGSTOP) is noticed
    by the stream's silence bound; a revocation made meanwhile arrives through the next
    replica within the staleness bound."""
    from tests.escalation.test_replicas import replica

    bound_s = 6.0
    state = RevocationState(max_staleness_s=bound_s)
    async with (
        replica(pki_dir, tmp_path, "core-hung", feed_heartbeat_s=0.2) as a,
        replica(pki_dir, tmp_path, "core-next", feed_heartbeat_s=0.2) as b,
        CoreEndpoints.for_identity([a.address, b.address], issue("gateway", "gw-hung")) as cores,
        # As the gateway sets it: half the staleness bound.
        CoreRevocationFeed(state, endpoints=cores, stream_timeout_s=bound_s / 2) as feed,
    ):
        await wait_until(state.healthy)
        assert feed.address == a.address
        a.proc.send_signal(signal.SIGSTOP)
        try:
            device = unique_id("cam")
            with pki.SqliteRegistry(tmp_path / "shared-registry.sqlite3") as registry:
                now = dt.datetime.now(dt.UTC)
                registry.upsert_device(device, type="pet-camera", region="home", now=now)
                loop = asyncio.get_running_loop()
                started = loop.time()
                pki.revoke_device(registry, device, reason="stolen", now=now)
            await wait_until(lambda: state.is_revoked(device, "00"), timeout_s=bound_s * 4)
            elapsed = loop.time() - started
            assert elapsed <= bound_s, f"revocation took {elapsed:.2f}s past a hung replica"
            assert feed.address == b.address
            assert cores.current == b.address
        finally:
            a.proc.send_signal(signal.SIGCONT)
