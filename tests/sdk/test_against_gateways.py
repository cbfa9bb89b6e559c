"""The SDK against real gateways: real processes, real mutual TLS, real models, real kills.

One stack per module (PKI, core, ``kr-seoul`` and ``us-nyc`` gateways, each an
``edgeward … run`` process); devices enrol through the core with real tokens. A test that
kills a gateway restarts it before it ends.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_sdk import (
    ClientOptions,
    ClientState,
    DetectionResult,
    DeviceClient,
    DeviceIdentity,
    DeviceRevoked,
    FrameOutcome,
    GatewayInfo,
    Transport,
)
from edgeward._stack import DemoStack, edgeward_command, free_port
from tests._support.core import unique_id
from tests.conftest import PHOTOS, require_tool

pytestmark = pytest.mark.slow

IMAGES = [(PHOTOS / n).read_bytes() for n in ("chelsea.jpg", "dog.jpg", "coffee.jpg")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStack]:
    require_tool("mosquitto")
    s = DemoStack(tmp_path_factory.mktemp("stack"), mqtt=True, escalation=False, cache=False)

    async def up() -> None:
        await s.setup()
        await s.start_core()
        await asyncio.gather(*(s.start_gateway(g) for g in s.plans))

    try:
        asyncio.run(up())
        yield s
    finally:
        s.stop_all()
        assert s.leftovers() == []


def _options(**kw: object) -> ClientOptions:
    base: dict[str, object] = {
        "probe_interval_s": 0.3,
        "offline_probe_interval_s": 0.2,
        "probe_timeout_s": 1.0,
        "down_for_s": 0.3,
        "call_timeout_s": 5.0,
    }
    base.update(kw)
    return ClientOptions(**base)  # type: ignore[arg-type]


async def _collect(client: DeviceClient, into: list[FrameOutcome]) -> None:
    async for outcome in client.results():
        into.append(outcome)


async def _ensure_up(stack: DemoStack, gateway_id: str) -> None:
    if not stack.gateways[gateway_id].alive:
        await stack.start_gateway(gateway_id)


async def test_failover_when_the_nearest_is_killed_then_return(stack: DemoStack) -> None:
    device = await stack.enrol(unique_id("cam"), device_type="pet_camera", region="kr-seoul")
    submitted: list[str] = []
    outcomes: list[FrameOutcome] = []
    async with DeviceClient(device, _options()) as client:
        assert client.gateway is not None
        assert client.gateway.gateway_id == "kr-seoul", "same region wins among equals"
        collector = asyncio.create_task(_collect(client, outcomes))
        killed_at = 0.0
        for n in range(60):
            submitted.append(await client.submit(IMAGES[n % 3], frame_id=f"f-{n:03d}"))
            if n == 20:
                stack.kill_gateway("kr-seoul")
                killed_at = time.monotonic()
            await asyncio.sleep(0.04)
        assert await client.flush(timeout_s=30)
        assert any(isinstance(o, DetectionResult) and o.gateway_id == "us-nyc" for o in outcomes)
        stats = client.stats()
        assert stats.failovers >= 1
        # Zero lost, zero duplicated: every submitted frame answered exactly once.
        ids = [o.frame_id for o in outcomes]
        assert sorted(ids) == sorted(submitted)
        assert len(ids) == len(set(ids)) == 60
        assert all(isinstance(o, DetectionResult) for o in outcomes)
        assert stats.queue.frames == 0
        print(f"failover: 60 frames, 0 lost; drained {time.monotonic() - killed_at:.2f} s after")

        # Return to the nearest once it is back.
        await stack.start_gateway("kr-seoul")
        deadline = time.monotonic() + 15
        while client.gateway is None or client.gateway.gateway_id != "kr-seoul":
            assert time.monotonic() < deadline, "did not return to the nearest gateway"
            await asyncio.sleep(0.1)
        result = await client.detect(IMAGES[0], timeout_s=10)
        assert result.gateway_id == "kr-seoul"
        # The event stream followed the device through both changes of gateway.
        assert [t.get_name() for t in client._tasks if not t.done()].count("edgeward-events") == 1
        collector.cancel()


async def test_frames_wait_on_disk_while_offline_and_drain_after_a_device_restart(
    stack: DemoStack, tmp_path: Path
) -> None:
    """A device process with no reachable gateway accepts frames, is SIGKILLed, and a new
    process delivers every one of them (the sync facade in the first process)."""
    device = await stack.enrol(unique_id("vac"), device_type="robot_vacuum", region="us-nyc")
    dead = [GatewayInfo("gw-dead", "us-nyc", f"127.0.0.1:{free_port()}")]
    script = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        from device_sdk import ClientOptions, GatewayInfo, SyncDeviceClient
        images = [Path(p).read_bytes() for p in {[str(PHOTOS / "dog.jpg")]!r}]
        opts = ClientOptions(
            gateways=[GatewayInfo("gw-dead", "us-nyc", {dead[0].grpc_address!r})],
            probe_timeout_s=0.3,
            offline_probe_interval_s=0.2,
        )
        client = SyncDeviceClient({str(device)!r}, opts).start()
        assert client.gateway is None
        for n in range(25):
            client.submit(images[0], frame_id=f"offline-{{n:02d}}")
        print(client.stats().queue.frames, flush=True)
        os.kill(os.getpid(), 9)
        """
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    assert out.decode().strip().splitlines()[-1] == "25"

    outcomes: list[FrameOutcome] = []
    await _ensure_up(stack, "us-nyc")
    async with DeviceClient(device, _options()) as client:
        assert client.stats().queue.frames == 25, "the restart found the queue on disk"
        collector = asyncio.create_task(_collect(client, outcomes))
        assert await client.flush(timeout_s=30)
        await asyncio.sleep(0.1)
        collector.cancel()
    assert sorted(o.frame_id for o in outcomes) == [f"offline-{n:02d}" for n in range(25)]
    assert all(isinstance(o, DetectionResult) for o in outcomes)


async def test_revoked_device_gets_a_final_error_and_stops_retrying(stack: DemoStack) -> None:
    device_id = unique_id("cam")
    device = await stack.enrol(device_id, device_type="pet_camera", region="us-nyc")
    await _ensure_up(stack, "us-nyc")
    await _ensure_up(stack, "kr-seoul")
    async with DeviceClient(device, _options()) as client:
        first = await client.detect(IMAGES[0], timeout_s=10)
        gateway = first.gateway_id
        await stack.revoke(device_id, "test: stolen")
        revoked_at = time.monotonic()

        async def keep_sending() -> None:
            for n in range(200):
                await client.submit(IMAGES[n % 3])
                await asyncio.sleep(0.02)

        with pytest.raises(DeviceRevoked) as info:
            await keep_sending()
        cut_s = time.monotonic() - revoked_at
        assert info.value.final
        assert device_id in str(info.value)
        assert client.state is ClientState.FAILED
        assert isinstance(client.final_error, DeviceRevoked)
        with pytest.raises(DeviceRevoked):
            await client.detect(IMAGES[0], timeout_s=1)
        # No retrying: nothing more reaches any gateway from this device.
        url = f"http://127.0.0.1:{stack.plans[gateway].metrics_port}/metrics"

        def mentions() -> float:
            """Calls the gateway has ended, answered or refused (no other device is active).

            Counted in Prometheus rather than in the log: refusals of one device are logged
            once per reason and then as a count per interval, so retries would not show.
            """
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("edgeward_gateway_requests_total{")
            )

        before = mentions()
        assert before >= 1
        await asyncio.sleep(1.5)
        assert mentions() == before
        assert [t for t in client._tasks if not t.done()] == []
        print(f"revocation cut the device {cut_s * 1000:.0f} ms after the command returned")


async def test_renewal_under_load_drops_no_call(stack: DemoStack) -> None:
    device = await stack.enrol(unique_id("cam"), device_type="pet_camera", region="us-nyc")
    await _ensure_up(stack, "us-nyc")
    offset = dt.timedelta()
    old_serial = ""

    def clock() -> dt.datetime:
        # Jump ahead once: the renewed certificate is judged by the real time again.
        renewed = client.identity.serial != old_serial
        return dt.datetime.now(dt.UTC) + (dt.timedelta() if renewed else offset)

    answered = 0
    stop = asyncio.Event()

    client = DeviceClient(device, _options(clock=clock, renewal_check_s=0.05, renew_jitter=0.0))
    old_serial = client.identity.serial
    async with client:
        plan = client.renewal_plan
        assert plan is not None
        assert client.identity.core_address == stack.core_address

        async def load() -> None:
            nonlocal answered
            n = 0
            while not stop.is_set():
                await client.detect(IMAGES[n % 3], timeout_s=10)
                answered += 1
                n += 1

        async with asyncio.TaskGroup() as tg:
            for _ in range(4):
                tg.create_task(load())
            await asyncio.sleep(0.5)
            # Jump past the renewal point (the certificate is still valid in real time).
            offset = plan.renew_at - dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
            deadline = time.monotonic() + 15
            while client.stats().renewals < 1:
                assert time.monotonic() < deadline, "no renewal"
                await asyncio.sleep(0.05)
            before = answered
            await asyncio.sleep(1.0)
            stop.set()
        assert answered > before, "calls continue on the renewed certificate"
        assert client.identity.serial != old_serial
        assert client.state is ClientState.RUNNING
        assert client.stats().renewals == 1
        new_plan = client.renewal_plan
        assert new_plan is not None
        assert new_plan.not_after >= plan.not_after
    # The renewed identity is what is on disk now.
    assert DeviceIdentity.load(device).serial != old_serial


def test_identity_files_keep_their_permissions(stack: DemoStack) -> None:
    for d in stack.devices_dir.iterdir():
        assert (d / "key.pem").stat().st_mode & 0o777 == 0o600
        if (d / "outbox.sqlite3").exists():
            assert (d / "outbox.sqlite3").stat().st_mode & 0o777 == 0o600
    assert os.environ.get("EDGEWARD_NEVER_SET") is None


async def test_device_simulate_command(stack: DemoStack) -> None:
    device = await stack.enrol(unique_id("vac"), device_type="robot_vacuum", region="us-nyc")
    await _ensure_up(stack, "us-nyc")
    await _ensure_up(stack, "kr-seoul")
    proc = await asyncio.create_subprocess_exec(
        *edgeward_command(),
        *("device", "simulate", "--identity", str(device), "--kind", "robot_vacuum"),
        *("--rate", "10", "--duration", "2", "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    events = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started"
    detections = [e for e in events if e["event"] == "detection"]
    summary = events[-1]
    assert summary["event"] == "summary"
    assert summary["submitted"] == summary["answered"] == len(detections) >= 15
    assert any("Coffee cup" in label for e in detections for label in e["labels"])


async def test_revoked_mqtt_device_gets_the_final_error_too(stack: DemoStack) -> None:
    """Over MQTT the broker can only refuse the TLS handshake; the client still learns that
    it is revoked (from the gateway's event stream) and stops, instead of retrying."""
    device_id = unique_id("vac")
    device = await stack.enrol(device_id, device_type="robot_vacuum", region="us-nyc")
    await _ensure_up(stack, "us-nyc")
    await _ensure_up(stack, "kr-seoul")
    async with DeviceClient(device, _options(transport=Transport.MQTT)) as client:
        result = await client.detect(IMAGES[2], timeout_s=15)
        assert result.transport is Transport.MQTT
        await stack.revoke(device_id, "test: stolen")
        deadline = time.monotonic() + 5
        while client.final_error is None:
            assert time.monotonic() < deadline, "an MQTT device must learn it is revoked"
            await asyncio.sleep(0.05)
        assert isinstance(client.final_error, DeviceRevoked)
        assert client.state is ClientState.FAILED
        with pytest.raises(DeviceRevoked):
            await client.submit(IMAGES[0])


async def _leave_frames_waiting(device: Path, n: int, *, run: str = "earlier") -> None:
    """An earlier run that could reach no gateway: ``n`` frames stay in the device's outbox."""
    async with DeviceClient(device, _options(gateways=[], subscribe_events=False)) as client:
        for i in range(n):
            await client.submit(IMAGES[i % 3], frame_id=f"{run}-{i}")
        assert client.stats().queue.frames == n


async def test_frames_from_an_earlier_run_count_as_sent_so_answered_never_passes_sent(
    stack: DemoStack,
) -> None:
    """The SDK's counters add up: answered + rejected + queued == carried_over + submitted."""
    device = await stack.enrol(unique_id("cam"), device_type="pet_camera", region="kr-seoul")
    await _ensure_up(stack, "us-nyc")
    await _ensure_up(stack, "kr-seoul")
    await _leave_frames_waiting(device, 3)
    async with DeviceClient(device, _options()) as client:
        for i in range(2):
            await client.submit(IMAGES[i], frame_id=f"now-{i}")
        assert await client.flush(timeout_s=30)
        stats = client.stats()
    assert (stats.carried_over, stats.submitted, stats.answered, stats.rejected) == (3, 2, 5, 0)
    assert stats.queue.frames == 0
    assert stats.answered + stats.rejected + stats.queue.frames == (
        stats.carried_over + stats.submitted
    )


async def test_device_simulate_numbers_add_up_with_frames_from_an_earlier_run(
    stack: DemoStack,
) -> None:
    device = await stack.enrol(unique_id("vac"), device_type="robot_vacuum", region="us-nyc")
    await _ensure_up(stack, "us-nyc")
    await _ensure_up(stack, "kr-seoul")
    for as_json in (True, False):
        await _leave_frames_waiting(device, 2, run=f"earlier-{as_json}")
        proc = await asyncio.create_subprocess_exec(
            *edgeward_command(),
            *("device", "simulate", "--identity", str(device), "--kind", "robot_vacuum"),
            *("--rate", "10", "--duration", "2", *(["--json"] if as_json else [])),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        if as_json:
            events = [json.loads(line) for line in out.decode().splitlines() if line[:1] == "{"]
            summary = events[-1]
            assert summary["event"] == "summary"
            sent, answered = summary["submitted"], summary["answered"]
            rejected, queued = summary["rejected"], summary["queued"]
            assert summary["carried_over"] == 2
            # Every outcome the command printed is in the summary, and none twice.
            printed = {e["frame"] for e in events if e["event"] in ("detection", "rejected")}
            assert len(printed) <= answered + rejected
        else:
            # The line a user reads: "<id>: N frames sent (2 from before), M answered (…)
            # …, R rejected, Q still queued".
            line = out.decode().strip().splitlines()[-1]
            match = re.search(
                r": (\d+) frames sent \(2 from before\), (\d+) answered .* (\d+) rejected, "
                r"(\d+) still queued$",
                line,
            )
            assert match is not None, line
            sent, answered, rejected, queued = (int(g) for g in match.groups())
        assert sent >= 2 + 15
        assert 0 <= answered <= sent
        assert queued == sent - answered - rejected >= 0
