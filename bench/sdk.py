"""Device SDK benchmark: failover time, outbox drain rate, frames lost, cost per device.

Everything runs on this machine over loopback mTLS against two real gateways, each its own
``edgeward gateway run`` process (standalone: they read the PKI registry), so a gateway can be
killed with SIGKILL like a crashed host.

1. Failover: one device streams frames at ``--rate`` through its nearest gateway; the gateway
   is SIGKILLed; the failover time is from the kill to the first answer from the other gateway.
   The gateway is restarted and the device returns to it before the next trial. Frames lost =
   submitted − answered over all trials (target 0), p50/p99 of the failover time (target
   ≤ 2 s). Baseline, same run: the p50 of an ordinary ``Detect`` round trip.
2. Drain: N frames are accepted while no gateway is reachable (they wait in the on-disk
   outbox); a new client on the same identity starts with a gateway up; the time until the
   outbox is empty gives ``drain_per_s``. Baseline, same run: the same N frames sent with
   plain unary ``Detect`` calls, same concurrency, no outbox.
3. Cost per device: ``--devices`` clients (default 100) in this one process, each with its
   channels, outbox and background tasks, sending one frame per second for a while. Resident
   memory growth and CPU time per device; baseline: the same number of bare mTLS channels.
4. MQTT round trip (when Mosquitto is installed): ``detect`` over MQTT, one frame at a time,
   p50 with the SDK's socket options (``TCP_NODELAY``) against the same client with Nagle's
   algorithm left on (the baseline, same run): without ``TCP_NODELAY`` the tail of every
   frame waits for the broker's delayed ACK.

The gateways answer repeated photos from their cache, so the figures measure the SDK and the
transport, not the model. Run: ``.venv/bin/python bench/sdk.py --quick``. Ends with one JSON
line: failover_p50_s, failover_p99_s, drain_per_s, lost, kb_per_device (and more).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import structlog

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import device_sdk._mqtt  # noqa: E402
import pki  # noqa: E402
from device_sdk import (  # noqa: E402
    ClientOptions,
    DetectionResult,
    DeviceClient,
    GatewayInfo,
    Transport,
)
from edgeward._stack import DemoStack, free_port  # noqa: E402
from protos.edgeward.v1 import common_pb2, gateway_pb2_grpc  # noqa: E402

PHOTOS = [(ROOT / "device_sdk" / "photos" / n).read_bytes() for n in ("chelsea.jpg", "coffee.jpg")]


def rss_kb() -> int:
    """Resident set size of this process now, in KiB (Linux)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(round(q / 100 * (len(ordered) - 1)), len(ordered) - 1)
    return ordered[k]


def signed_directory(pki_dir: Path, gateways: list[GatewayInfo]) -> bytes:
    ca = pki.CertificateAuthority.load(pki_dir)
    payload = common_pb2.GatewayDirectoryPayload(
        trust_domain=ca.trust_domain, version=1, gateways=[g.to_proto() for g in gateways]
    )
    payload.issued_at.FromDatetime(dt.datetime.now(dt.UTC))
    signed = pki.sign_payload(ca, payload.SerializeToString())
    return common_pb2.SignedGatewayDirectory(
        payload=signed.payload,
        signature=signed.signature,
        signer_certificate_pem=signed.signer_certificate_pem.decode(),
    ).SerializeToString()


def make_device(stack: DemoStack, device_id: str, directory: bytes) -> Path:
    """A device identity from the PKI (bypassing enrolment: the registry need not know it)."""
    out = stack.root / "devices" / device_id
    files = pki.issue_identity(
        stack.pki_dir, out, role=pki.Role.DEVICE, id=device_id, metadata={"region": "kr-seoul"}
    )
    pki.write_atomic(files.gateway_directory, directory)
    return out


def options(**kw: object) -> ClientOptions:
    base: dict[str, object] = {
        "probe_interval_s": 0.5,
        "offline_probe_interval_s": 0.2,
        "probe_timeout_s": 1.0,
        "down_for_s": 0.3,
        "call_timeout_s": 5.0,
    }
    base.update(kw)
    return ClientOptions(**base)  # type: ignore[arg-type]


async def bench_failover(stack: DemoStack, device: Path, trials: int, rate: float) -> dict:
    times: list[float] = []
    submitted = answered = 0
    detect_ms: list[float] = []
    async with DeviceClient(device, options()) as client:
        # Baseline: ordinary round trips through the nearest gateway.
        for n in range(30):
            t = time.perf_counter()
            await client.detect(PHOTOS[n % 2], timeout_s=10)
            detect_ms.append((time.perf_counter() - t) * 1000)
        outcomes: list[DetectionResult] = []
        arrived: list[float] = []

        async def collect() -> None:
            async for o in client.results():
                if isinstance(o, DetectionResult):
                    outcomes.append(o)
                    arrived.append(time.monotonic())

        collector = asyncio.create_task(collect())
        for trial in range(trials):
            assert client.gateway is not None
            nearest = client.gateway.gateway_id
            other = next(g for g in stack.plans if g != nearest)
            seen = len(outcomes)
            period = 1.0 / rate
            killed_at = 0.0
            for n in range(int(rate * 3)):
                await client.submit(PHOTOS[n % 2], frame_id=f"t{trial}-{n}")
                submitted += 1
                if n == int(rate):
                    stack.kill_gateway(nearest)
                    killed_at = time.monotonic()
                await asyncio.sleep(period)
            await client.flush(timeout_s=30)
            await asyncio.sleep(0.05)
            # From the kill to the arrival of the first answer from the other gateway.
            recovered = next(
                (
                    at - killed_at
                    for o, at in zip(outcomes[seen:], arrived[seen:], strict=True)
                    if o.gateway_id == other and at >= killed_at
                ),
                float("inf"),
            )
            times.append(recovered)
            await stack.start_gateway(nearest)
            deadline = time.monotonic() + 20
            while client.gateway is None or client.gateway.gateway_id != nearest:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
        await client.flush(timeout_s=30)
        await asyncio.sleep(0.2)
        collector.cancel()
        answered = len({o.frame_id for o in outcomes})
    return {
        "failover_s": times,
        "failover_p50_s": percentile(times, 50),
        "failover_p99_s": percentile(times, 99),
        "detect_p50_ms": statistics.median(detect_ms),
        "submitted": submitted,
        "lost": submitted - answered,
    }


async def bench_drain(stack: DemoStack, device: Path, n: int, concurrency: int) -> dict:
    live = [GatewayInfo(p.gateway_id, p.region, p.grpc_address) for p in stack.plans.values()]
    dead = [GatewayInfo("gw-dead", "kr-seoul", f"127.0.0.1:{free_port()}")]
    async with DeviceClient(device, options(gateways=dead, max_in_flight=concurrency)) as c:
        for i in range(n):
            await c.submit(PHOTOS[i % 2], frame_id=f"drain-{i}")
        queued = c.stats().queue.frames
    outcomes = 0
    ids: set[str] = set()
    async with DeviceClient(device, options(gateways=live[:1], max_in_flight=concurrency)) as c:

        async def collect() -> None:
            nonlocal outcomes
            async for o in c.results():
                outcomes += 1
                ids.add(o.frame_id)

        task = asyncio.create_task(collect())
        t = time.perf_counter()
        await c.flush(timeout_s=120)
        drain_s = time.perf_counter() - t
        await asyncio.sleep(0.1)
        task.cancel()
    # Baseline: the same frames as plain unary calls, same concurrency, no outbox.
    files = pki.IdentityFiles(device)
    creds = pki.grpc_channel_credentials(ca_bundle_pem=files.ca_bundle.read_bytes(), identity=files)
    sem = asyncio.Semaphore(concurrency)
    async with grpc.aio.secure_channel(live[0].grpc_address, creds) as channel:
        stub = gateway_pb2_grpc.DeviceGatewayStub(channel)
        await stub.Detect(common_pb2.Frame(image=PHOTOS[0], frame_id="warm"), timeout=10)

        async def one(i: int) -> None:
            async with sem:
                await stub.Detect(
                    common_pb2.Frame(image=PHOTOS[i % 2], frame_id=f"raw-{i}"), timeout=10
                )

        t = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        raw_s = time.perf_counter() - t
    return {
        "queued": queued,
        "drained": outcomes,
        "drain_per_s": n / drain_s,
        "raw_per_s": n / raw_s,
        "drain_lost": queued - len(ids),
        "drain_duplicates": outcomes - len(ids),
    }


async def bench_devices(stack: DemoStack, devices: list[Path], seconds: float) -> dict:
    # Baseline: bare connected mTLS channels, one per device.
    files0 = pki.IdentityFiles(devices[0])
    plan = next(iter(stack.plans.values()))
    before = rss_kb()
    bare = []
    for d in devices:
        f = pki.IdentityFiles(d)
        creds = pki.grpc_channel_credentials(
            ca_bundle_pem=files0.ca_bundle.read_bytes(), identity=f
        )
        ch = grpc.aio.secure_channel(plan.grpc_address, creds)
        await ch.channel_ready()
        bare.append(ch)
    bare_kb = (rss_kb() - before) / len(devices)
    for ch in bare:
        await ch.close()
    await asyncio.sleep(0.5)

    before = rss_kb()
    cpu0 = time.process_time()
    answered = 0
    async with contextlib.AsyncExitStack() as stack_:
        clients = [
            await stack_.enter_async_context(
                DeviceClient(d, options(probe_interval_s=5.0, subscribe_events=True))
            )
            for d in devices
        ]
        started_kb = rss_kb()
        cpu_start = time.process_time()
        wall = time.monotonic()

        async def drive(c: DeviceClient, k: int) -> None:
            nonlocal answered
            end = time.monotonic() + seconds
            n = 0
            while time.monotonic() < end:
                t = time.monotonic()
                await c.detect(PHOTOS[(k + n) % 2], timeout_s=10)
                answered += 1
                n += 1
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t)))

        await asyncio.gather(*(drive(c, k) for k, c in enumerate(clients)))
        wall = time.monotonic() - wall
        cpu = time.process_time() - cpu_start
        peak_kb = rss_kb()
    n = len(devices)
    return {
        "devices": n,
        "kb_per_device": (max(started_kb, peak_kb) - before) / n,
        "kb_per_device_idle": (started_kb - before) / n,
        "bare_channel_kb": bare_kb,
        "cpu_ms_per_device_s": cpu / n / wall * 1000,
        "start_cpu_ms_per_device": (cpu_start - cpu0) / n * 1000,
        "frames_per_s": answered / wall,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


async def bench_mqtt(stack: DemoStack, device: Path, frames: int) -> dict:
    """``detect`` round trips over MQTT with and without the SDK's TCP_NODELAY."""
    plan = next(iter(stack.plans.values()))
    entry = GatewayInfo(plan.gateway_id, plan.region, plan.grpc_address, plan.mqtt_address)
    nodelay = device_sdk._mqtt.SOCKET_OPTIONS
    out: dict[str, float] = {}
    # Baseline first (Nagle on), then the SDK as shipped; both warm the cache the same way.
    for name, socket_options in (("nagle", ()), ("nodelay", nodelay)):
        device_sdk._mqtt.SOCKET_OPTIONS = socket_options
        try:
            opts = options(gateways=[entry], transport=Transport.MQTT)
            async with DeviceClient(device, opts) as client:
                for n in range(5):  # connect, warm the cache
                    await client.detect(PHOTOS[n % 2], timeout_s=10)
                ms = []
                for n in range(frames):
                    t = time.perf_counter()
                    await client.detect(PHOTOS[n % 2], timeout_s=10)
                    ms.append((time.perf_counter() - t) * 1000)
        finally:
            device_sdk._mqtt.SOCKET_OPTIONS = nodelay
        out[f"{name}_p50_ms"] = statistics.median(ms)
        out[f"{name}_p90_ms"] = percentile(ms, 90)
    return out


async def main(args: argparse.Namespace) -> dict:
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(40), cache_logger_on_first_use=True
    )
    with tempfile.TemporaryDirectory(prefix="edgeward-bench-sdk-") as tmp:
        stack = DemoStack(
            Path(tmp),
            mqtt=shutil.which("mosquitto", path="/usr/sbin:/usr/bin:/usr/local/sbin") is not None,
            escalation=False,
            standalone=True,
            log_level="warning",
            # Measure the SDK, not the gateway's per-device rate limit.
            gateway_overrides={"limits": {"frames_per_s": 5000.0, "burst": 5000}},
        )
        try:
            await stack.setup()
            await asyncio.gather(*(stack.start_gateway(g) for g in stack.plans))
            gateways = [
                GatewayInfo(p.gateway_id, p.region, p.grpc_address) for p in stack.plans.values()
            ]
            directory = signed_directory(stack.pki_dir, gateways)
            print(f"[1/4] failover: {args.trials} trials at {args.rate:.0f} frames/s", flush=True)
            fo = await bench_failover(
                stack, make_device(stack, "bench-failover", directory), args.trials, args.rate
            )
            print(
                f"  failover p50 {fo['failover_p50_s']:.3f} s, p99 {fo['failover_p99_s']:.3f} s "
                f"(target <= 2 s; ratio to an ordinary Detect round trip "
                f"{fo['failover_p50_s'] * 1000 / fo['detect_p50_ms']:.0f}x, "
                f"Detect p50 {fo['detect_p50_ms']:.1f} ms); "
                f"frames lost {fo['lost']} of {fo['submitted']}",
                flush=True,
            )
            print(f"[2/4] drain: {args.drain} frames queued offline", flush=True)
            dr = await bench_drain(
                stack, make_device(stack, "bench-drain", directory), args.drain, args.concurrency
            )
            print(
                f"  drain {dr['drain_per_s']:.0f} frames/s vs plain Detect {dr['raw_per_s']:.0f}/s "
                f"(ratio {dr['drain_per_s'] / dr['raw_per_s']:.2f}); lost {dr['drain_lost']}, "
                f"duplicates {dr['drain_duplicates']}",
                flush=True,
            )
            print(
                f"[3/4] {args.devices} devices in one process for {args.seconds:.0f} s", flush=True
            )
            devs = [
                make_device(stack, f"bench-dev-{i:03d}", directory) for i in range(args.devices)
            ]
            dv = await bench_devices(stack, devs, args.seconds)
            print(
                f"  {dv['kb_per_device']:.0f} KiB per device (bare mTLS channel "
                f"{dv['bare_channel_kb']:.0f} KiB, ratio "
                f"{dv['kb_per_device'] / max(dv['bare_channel_kb'], 1):.1f}x); CPU "
                f"{dv['cpu_ms_per_device_s']:.2f} ms per device-second at 1 frame/s; "
                f"{dv['frames_per_s']:.0f} frames/s in total",
                flush=True,
            )
            mq: dict[str, float] = {}
            if stack.mqtt:
                print(f"[4/4] MQTT round trip: {args.mqtt_frames} frames in turn", flush=True)
                mq = await bench_mqtt(
                    stack, make_device(stack, "bench-mqtt", directory), args.mqtt_frames
                )
                print(
                    f"  detect over MQTT p50 {mq['nodelay_p50_ms']:.1f} ms with TCP_NODELAY vs "
                    f"{mq['nagle_p50_ms']:.1f} ms with Nagle on (ratio "
                    f"{mq['nodelay_p50_ms'] / mq['nagle_p50_ms']:.2f}); p90 "
                    f"{mq['nodelay_p90_ms']:.1f} vs {mq['nagle_p90_ms']:.1f} ms",
                    flush=True,
                )
            else:
                print("[4/4] MQTT round trip: skipped (no mosquitto)", flush=True)
        finally:
            stack.stop_all()
    return {
        "failover_p50_s": round(fo["failover_p50_s"], 4),
        "failover_p99_s": round(fo["failover_p99_s"], 4),
        "drain_per_s": round(dr["drain_per_s"], 1),
        "lost": fo["lost"] + dr["drain_lost"],
        "duplicates": dr["drain_duplicates"],
        "kb_per_device": round(dv["kb_per_device"], 1),
        "detect_p50_ms": round(fo["detect_p50_ms"], 2),
        "raw_detect_per_s": round(dr["raw_per_s"], 1),
        "drain_ratio_vs_raw": round(dr["drain_per_s"] / dr["raw_per_s"], 3),
        "bare_channel_kb": round(dv["bare_channel_kb"], 1),
        "cpu_ms_per_device_s": round(dv["cpu_ms_per_device_s"], 3),
        "devices": dv["devices"],
        "trials": args.trials,
        "mqtt_rtt_p50_ms": round(mq["nodelay_p50_ms"], 2) if mq else None,
        "mqtt_rtt_nagle_p50_ms": round(mq["nagle_p50_ms"], 2) if mq else None,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run, done within a minute")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--rate", type=float, default=20.0, help="frames/s during failover")
    parser.add_argument("--drain", type=int, default=None, help="frames queued offline")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--mqtt-frames", type=int, default=None, help="MQTT round trips")
    a = parser.parse_args()
    a.trials = a.trials or (4 if a.quick else 20)
    a.drain = a.drain or (200 if a.quick else 2000)
    a.seconds = a.seconds or (5.0 if a.quick else 20.0)
    a.mqtt_frames = a.mqtt_frames or (40 if a.quick else 200)
    result = asyncio.run(main(a))
    print(json.dumps(result))
