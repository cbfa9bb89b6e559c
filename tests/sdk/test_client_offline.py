"""The client with no reachable gateway: the outbox takes frames, applies its policy, and the
certificate is judged by the injected clock. No gateway runs here."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from device_sdk import (
    CertificateExpired,
    ClientClosed,
    ClientOptions,
    ClientState,
    DeviceClient,
    GatewayInfo,
    NoGateway,
    QueueFull,
    SyncDeviceClient,
    Telemetry,
)
from edgeward._stack import free_port
from tests.conftest import IssueFn
from tests.sdk.conftest import give_directory


def _offline(**kw: object) -> ClientOptions:
    dead = [GatewayInfo("gw-dead", "home", f"127.0.0.1:{free_port()}")]
    return ClientOptions(gateways=dead, probe_timeout_s=0.2, **kw)  # type: ignore[arg-type]


async def test_offline_frames_queue_with_the_stated_policy(issue: IssueFn) -> None:
    dev = issue("device", "cam-1")
    async with DeviceClient(dev.directory, _offline(queue_max_items=3)) as client:
        assert client.gateway is None
        assert await client.report_telemetry(Telemetry(battery_percent=50))
        with pytest.raises(NoGateway, match="stays queued"):
            await client.detect(b"jpeg-0", frame_id="e", timeout_s=0.2)
        assert await client.submit(b"jpeg-1", frame_id="a") == "a"
        assert await client.submit(b"jpeg-1 again", frame_id="a") == "a"  # deduplicated
        await client.submit(b"jpeg-2", frame_id="b")  # evicts the telemetry report
        with pytest.raises(QueueFull):
            await client.submit(b"jpeg-3", frame_id="c")  # frames are never evicted
        assert not await client.report_telemetry(Telemetry(battery_percent=49))
        stats = client.stats()
        assert (stats.queue.frames, stats.queue.telemetry) == (3, 0)
        assert stats.queue.telemetry_dropped == 2
        assert stats.queue.duplicates == 1
    assert client.state is ClientState.CLOSED
    with pytest.raises(ClientClosed):
        await client.submit(b"late")
    # The outbox is on disk: a new client finds the same three frames.
    async with DeviceClient(dev.directory, _offline(queue_max_items=3)) as again:
        assert again.stats().queue.frames == 3


@pytest.mark.parametrize(("offset_s", "expired"), [(-1, False), (0, True), (1, True)])
async def test_an_expired_certificate_refuses_to_start(
    issue: IssueFn, offset_s: int, expired: bool
) -> None:
    dev = issue("device", "cam-1", lifetime=dt.timedelta(hours=1))
    not_after = dev.certificate().not_valid_after_utc

    def clock() -> dt.datetime:
        return not_after + dt.timedelta(seconds=offset_s)

    client = DeviceClient(dev.directory, _offline(clock=clock))
    if expired:
        with pytest.raises(CertificateExpired, match="enrol again") as info:
            await client.__aenter__()
        assert info.value.final
    else:
        async with client:
            assert client.state is ClientState.RUNNING


async def test_directory_gateways_are_used_when_none_are_given(
    issue: IssueFn, pki_dir: Path
) -> None:
    gateways = [GatewayInfo("gw-a", "home", f"127.0.0.1:{free_port()}")]
    dev = give_directory(issue("device", "cam-1"), pki_dir, gateways)
    async with DeviceClient(dev.directory, ClientOptions(probe_timeout_s=0.2)) as client:
        assert client.stats().gateways_up == ()
        assert client.gateway is None


def test_sync_facade_starts_queues_and_closes(issue: IssueFn) -> None:
    dev = issue("device", "cam-sync")
    with SyncDeviceClient(dev.directory, _offline()) as client:
        assert client.gateway is None
        assert client.submit(b"jpeg", frame_id="s-1") == "s-1"
        assert client.next_result(timeout_s=0.1) is None
        assert not client.flush(timeout_s=0.1)
        assert client.stats().queue.frames == 1
    assert client.client.state is ClientState.CLOSED
