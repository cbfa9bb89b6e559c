"""Serving overhead of the edge gateway against the raw model pipeline, in one run.

Phases (all on loopback, certificates from a throw-away PKI):

* model: the edge model alone on preprocessed input (context: the ceiling);
* raw: decode → preprocess → model → post-process of the same JPEG frames in a tight loop,
  one thread, no serving, same onnxruntime session settings as the gateway (the issue's
  baseline: ``raw_fps``);
* raw pipelined: the gateway's own :class:`InferenceEngine` (same settings, cache off) called
  in-process by N concurrent tasks, one frame in flight each: decode pool + micro-batcher, no
  gRPC. ``served / raw pipelined`` isolates what gRPC + mTLS + per-call checks cost;
  ``served / raw`` (the issue's ``ratio``) also credits the engine's pipelining of decode and
  model on two cores, so it can exceed 1;
* served: the gateway (cache disabled) end to end, N concurrent devices in *another process*
  over mutual-TLS gRPC, each a ``StreamDetect`` with one frame in flight;
* one device, paired: a client process alternates, frame by frame, the raw pipeline (its own
  session, same settings) and the same frame served by the gateway, so both see the same
  machine state; ``added_p50_ms`` is the median of the paired differences (served − raw), with
  its interquartile range. ``served_overhead_p50_ms`` is the served round trip minus the work
  the engine reports for the frame (decode, model, post-processing): gRPC, TLS, checks, queue
  and thread hand-offs;
* cache hit: a gateway with the cache on, one device sending the same frame;
* revocation: a device's open stream, revoked in the registry; time until the client sees
  PERMISSION_DENIED (≥ 20 revocations; standalone gateway polling its registry).

Usage: ``python bench/inference.py [--quick] [--devices N] [--seconds S] [--max-wait-ms MS]``.
The last line is JSON: model_fps, raw_fps, served_fps, ratio, p50_ms, p99_ms, added_p50_ms,
cache_hit_p50_ms, revoke_p50_ms, revoke_p99_ms, and raw_pipelined_fps, ratio_vs_pipelined,
pipelined_p50_ms, added_p25_ms, added_p75_ms, served_overhead_p50_ms, pairs. Targets (not
gates): ratio ≥ 0.9, added p50 ≤ 2 ms at one device, revocation p99 ≤ 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

import pki  # noqa: E402
from protos.edgeward.v1 import common_pb2, gateway_pb2_grpc  # noqa: E402

PHOTOS = ROOT / "tests" / "data" / "photos"
FRAMES = ["chelsea.jpg", "dog.jpg", "person.jpg", "coffee.jpg", "motorcycle.jpg", "rocket.jpg"]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# -- client process -------------------------------------------------------------------------------


async def _device(
    address: str, identity: Path, frames: list[bytes], until: float, warmup: float
) -> list[float]:
    files = pki.IdentityFiles(identity)
    creds = pki.grpc_channel_credentials(ca_bundle_pem=files.ca_bundle.read_bytes(), identity=files)
    latencies: list[float] = []
    queue: asyncio.Queue[common_pb2.Frame | None] = asyncio.Queue()

    async def requests() -> Any:
        while (item := await queue.get()) is not None:
            yield item

    async with grpc.aio.secure_channel(address, creds) as channel:
        call = gateway_pb2_grpc.DeviceGatewayStub(channel).StreamDetect(requests())
        i = 0
        while time.monotonic() < until:
            started = time.perf_counter()
            await queue.put(common_pb2.Frame(image=frames[i % len(frames)], frame_id=str(i)))
            await call.read()
            if time.monotonic() >= warmup:
                latencies.append(time.perf_counter() - started)
            i += 1
        await queue.put(None)
        while await call.read() is not grpc.aio.EOF:
            pass
    return latencies


async def _paired(args: argparse.Namespace) -> None:
    """One device: raw pipeline and served round trip of the same frame, alternated.

    The raw pipeline runs here, in the client process, with a session of the gateway's own
    settings; while it runs the gateway is idle, and while the served frame is in flight this
    process only waits, so each pair sees the same machine. The order within a pair
    alternates too (raw first, then served first), so a slow-down that follows whichever runs
    second cancels out.
    """
    from gateway import InferenceEngine
    from gateway._inference._engine import _run_model
    from gateway._inference._image import decode_image
    from gateway._inference._ssd import preprocess_ssd

    frames = [(PHOTOS / name).read_bytes() for name in FRAMES]
    files = pki.IdentityFiles(Path(args.identities[0]))
    creds = pki.grpc_channel_credentials(ca_bundle_pem=files.ca_bundle.read_bytes(), identity=files)
    queue: asyncio.Queue[common_pb2.Frame | None] = asyncio.Queue()

    async def requests() -> Any:
        while (item := await queue.get()) is not None:
            yield item

    raw: list[float] = []
    served: list[float] = []
    engine_ms: list[float] = []
    async with (
        InferenceEngine(models_dir=ROOT / "models") as engine,
        grpc.aio.secure_channel(args.address, creds) as channel,
    ):
        model = engine._model
        assert model is not None

        def raw_once(image: bytes) -> float:
            t = time.perf_counter()
            _run_model(model, preprocess_ssd([decode_image(image, max_pixels=16_000_000)]), 0.5)
            return time.perf_counter() - t

        call = gateway_pb2_grpc.DeviceGatewayStub(channel).StreamDetect(requests())

        async def served_once(image: bytes, i: int) -> tuple[float, float]:
            t = time.perf_counter()
            await queue.put(common_pb2.Frame(image=image, frame_id=str(i)))
            result: Any = await call.read()
            return time.perf_counter() - t, float(result.inference_ms) / 1000.0

        start = time.monotonic()
        warmup = start + args.warmup
        until = warmup + args.seconds
        i = 0
        while time.monotonic() < until:
            image = frames[i % len(frames)]
            if i % 2:
                s, e = await served_once(image, i)
                r = raw_once(image)
            else:
                r = raw_once(image)
                s, e = await served_once(image, i)
            if time.monotonic() >= warmup:
                raw.append(r)
                served.append(s)
                engine_ms.append(e)
            i += 1
        await queue.put(None)
        while await call.read() is not grpc.aio.EOF:
            pass
    print(json.dumps({"raw": raw, "served": served, "engine": engine_ms}))


async def _client(args: argparse.Namespace) -> None:
    if args.paired:
        await _paired(args)
        return
    frames = [(PHOTOS / name).read_bytes() for name in FRAMES]
    if args.same_frame:
        frames = frames[:1]
    start = time.monotonic()
    warmup = start + args.warmup
    until = warmup + args.seconds
    results = await asyncio.gather(
        *(_device(args.address, Path(p), frames, until, warmup) for p in args.identities)
    )
    latencies = [x for r in results for x in r]
    print(json.dumps({"frames": len(latencies), "seconds": args.seconds, "lat": latencies}))


# -- gateway side --------------------------------------------------------------------------------


def _run_client(
    address: str, identities: list[Path], seconds: float, *, same: bool, paired: bool = False
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--client",
        "--address",
        address,
        "--seconds",
        str(seconds),
        "--warmup",
        "0.5",
        *(["--same-frame"] if same else []),
        *(["--paired"] if paired else []),
        "--identities",
        *map(str, identities),
    ]
    return dict(json.loads(subprocess.check_output(cmd, cwd=ROOT, timeout=seconds + 60)))


def _settings(
    identity: pki.IdentityFiles, pki_dir: Path, *, cache: bool, max_wait_ms: float | None = None
) -> Any:
    from gateway import load_gateway_settings

    inference: dict[str, Any] = {"models_dir": ROOT / "models", "queue_size": 256}
    if max_wait_ms is not None:
        inference["max_wait_ms"] = max_wait_ms
    return load_gateway_settings(
        None,
        overrides={
            "identity_dir": identity.directory,
            "pki_dir": pki_dir,
            "listen": "127.0.0.1:0",
            "metrics_listen": None,
            "console_enabled": False,  # not measured here
            "revocation_poll_interval_s": 0.05,
            "inference": inference,
            "cache": {"enabled": cache},
            "limits": {"frames_per_s": 100_000.0, "burst": 100_000},
        },
    )


async def _pipelined(settings: Any, devices: int, seconds: float) -> tuple[float, list[float]]:
    """The gateway's engine, built as the gateway builds it, called in-process (no gRPC)."""
    from gateway import InferenceEngine

    inf = settings.inference
    frames = [(PHOTOS / name).read_bytes() for name in FRAMES]
    latencies: list[float] = []
    async with InferenceEngine.from_settings(inf) as engine:
        warmup = time.monotonic() + 0.5
        until = warmup + seconds

        async def device(k: int) -> None:
            i = k
            while time.monotonic() < until:
                t = time.perf_counter()
                await engine.detect(frames[i % len(frames)])
                if time.monotonic() >= warmup:
                    latencies.append(time.perf_counter() - t)
                i += 1

        async with asyncio.TaskGroup() as tg:
            for k in range(devices):
                tg.create_task(device(k))
    return len(latencies) / seconds, latencies


async def _raw(seconds: float) -> tuple[float, float, list[float]]:
    """Model alone and the raw pipeline, with the gateway's own session settings."""
    from gateway import InferenceEngine
    from gateway._inference._engine import _run_model
    from gateway._inference._image import decode_image
    from gateway._inference._ssd import preprocess_ssd

    frames = [(PHOTOS / name).read_bytes() for name in FRAMES]
    async with InferenceEngine(models_dir=ROOT / "models") as engine:
        model = engine._model
        assert model is not None
        tensors = [preprocess_ssd([decode_image(f, max_pixels=16_000_000)]) for f in frames]
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            _run_model(model, tensors[n % len(tensors)], 0.5)
            n += 1
        model_fps = n / (time.perf_counter() - started)
        per_frame: list[float] = []
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            t = time.perf_counter()
            img = decode_image(frames[n % len(frames)], max_pixels=16_000_000)
            _run_model(model, preprocess_ssd([img]), 0.5)
            per_frame.append(time.perf_counter() - t)
            n += 1
        raw_fps = n / (time.perf_counter() - started)
    return model_fps, raw_fps, per_frame


async def _revocations(
    identity: pki.IdentityFiles,
    pki_dir: Path,
    registry: pki.SqliteRegistry,
    devices: list[Any],
    n: int,
) -> list[float]:
    from gateway import GatewayService

    frame = common_pb2.Frame(image=(PHOTOS / "chelsea.jpg").read_bytes())
    cuts: list[float] = []
    async with GatewayService(_settings(identity, pki_dir, cache=True)) as gw:
        address = f"127.0.0.1:{gw.grpc_port}"
        for device_id, files in devices[:n]:
            creds = pki.grpc_channel_credentials(
                ca_bundle_pem=files.ca_bundle.read_bytes(), identity=files
            )
            async with grpc.aio.secure_channel(address, creds) as channel:
                queue: asyncio.Queue[common_pb2.Frame | None] = asyncio.Queue()

                async def requests(q: asyncio.Queue[common_pb2.Frame | None] = queue) -> Any:
                    while (item := await q.get()) is not None:
                        yield item

                call = gateway_pb2_grpc.DeviceGatewayStub(channel).StreamDetect(requests())
                await queue.put(frame)
                await call.read()
                started = time.perf_counter()
                await asyncio.to_thread(
                    pki.revoke_device,
                    registry,
                    device_id,
                    reason="bench",
                    now=dt.datetime.now(dt.UTC),
                )
                try:
                    await asyncio.wait_for(call.read(), timeout=5)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is not grpc.StatusCode.PERMISSION_DENIED:
                        raise
                else:
                    raise RuntimeError("the revoked stream was not cut")
                cuts.append(time.perf_counter() - started)
                await queue.put(None)
    return cuts


def bench_pki(base: Path) -> tuple[Path, pki.IdentityFiles, pki.SqliteRegistry]:
    """A fresh PKI under ``base``, the gateway's identity and the open registry."""
    pki_dir = base / "pki"
    pki.init_pki(pki_dir, trust_domain="bench.example")
    gw_identity = pki.issue_identity(
        pki_dir, base / "gw", role=pki.Role.GATEWAY, id="gw-bench",
        dns_names=("localhost",), ip_addresses=("127.0.0.1",),
    )  # fmt: skip
    return pki_dir, gw_identity, pki.SqliteRegistry(pki.PkiLayout(pki_dir).registry)


async def _bench(args: argparse.Namespace) -> dict[str, float | int]:
    from gateway import GatewayService

    with tempfile.TemporaryDirectory(prefix="edgeward-bench-") as tmp:
        base = Path(tmp)
        pki_dir, gw_identity, registry = bench_pki(base)
        now = dt.datetime.now(dt.UTC)
        devices = []
        for i in range(max(args.devices, args.revocations)):
            device_id = f"cam-{i:03d}"
            registry.upsert_device(device_id, type="pet-camera", region="home", now=now)
            devices.append(
                (
                    device_id,
                    pki.issue_identity(
                        pki_dir, base / device_id, role=pki.Role.DEVICE, id=device_id
                    ),
                )
            )
        load = [files.directory for _, files in devices[: args.devices]]

        settings = _settings(gw_identity, pki_dir, cache=False, max_wait_ms=args.max_wait_ms)
        print(
            f"== raw pipeline ({args.seconds:.0f} s each; batcher max wait "
            f"{settings.inference.max_wait_ms} ms) ==",
            flush=True,
        )
        model_fps, raw_fps, raw_lat = await _raw(args.seconds)
        raw_p50 = statistics.median(raw_lat) * 1000
        print(f"model alone      {model_fps:8.1f} frames/s")
        print(f"raw pipeline     {raw_fps:8.1f} frames/s   p50 {raw_p50:.2f} ms (one thread)")
        piped_fps, piped = await _pipelined(settings, args.devices, args.seconds)
        piped_ms = [x * 1000 for x in piped]
        print(
            f"raw pipelined    {piped_fps:8.1f} frames/s   p50 {pct(piped_ms, 50):.2f} ms  "
            f"p99 {pct(piped_ms, 99):.2f} ms ({args.devices} tasks, engine in-process)"
        )

        async with GatewayService(settings) as gw:
            address = f"127.0.0.1:{gw.grpc_port}"
            print(f"provider: {gw.models.provider or '?'}", flush=True)
            served = await asyncio.to_thread(_run_client, address, load, args.seconds, same=False)
            pairs = await asyncio.to_thread(
                _run_client, address, load[:1], args.seconds, same=False, paired=True
            )
        served_fps = served["frames"] / served["seconds"]
        lat = [x * 1000 for x in served["lat"]]
        diffs = [(s - r) * 1000 for s, r in zip(pairs["served"], pairs["raw"], strict=True)]
        overhead = [(s - e) * 1000 for s, e in zip(pairs["served"], pairs["engine"], strict=True)]
        one_raw = statistics.median(pairs["raw"]) * 1000
        one_served = statistics.median(pairs["served"]) * 1000
        print(
            f"served ({args.devices} devices) {served_fps:8.1f} frames/s   "
            f"p50 {pct(lat, 50):.2f} ms  p99 {pct(lat, 99):.2f} ms"
        )
        print(f"ratio served/raw {served_fps / raw_fps:8.2f}   (target >= 0.9; raw is one thread)")
        print(
            f"ratio served/raw pipelined {served_fps / piped_fps:8.2f}   (what gRPC + mTLS + "
            "checks cost at the same concurrency)"
        )
        print(
            f"one device, {len(diffs)} alternated pairs: raw p50 {one_raw:.2f} ms, served p50 "
            f"{one_served:.2f} ms; added (median of paired differences) "
            f"{pct(diffs, 50):+.2f} ms, IQR {pct(diffs, 25):+.2f}..{pct(diffs, 75):+.2f} ms "
            "(target <= 2 ms)"
        )
        print(
            f"                 served minus the engine's own work: p50 "
            f"{pct(overhead, 50):.2f} ms (gRPC, TLS, checks, queue and thread hand-offs)"
        )

        async with GatewayService(_settings(gw_identity, pki_dir, cache=True)) as gw:
            address = f"127.0.0.1:{gw.grpc_port}"
            hit = await asyncio.to_thread(
                _run_client, address, load[:1], args.seconds / 2, same=True
            )
        hit_p50 = statistics.median(hit["lat"]) * 1000
        print(f"cache hit        p50 {hit_p50:.2f} ms (end to end, one device)")

        revoked = devices[len(devices) - args.revocations :]
        cuts = [
            c * 1000
            for c in await _revocations(gw_identity, pki_dir, registry, revoked, args.revocations)
        ]
        print(
            f"revocation->cut  p50 {pct(cuts, 50):.1f} ms  p99 {pct(cuts, 99):.1f} ms over "
            f"{len(cuts)} revocations (registry poll 50 ms; target p99 <= 1000 ms)"
        )
        registry.close()
    return {
        "model_fps": round(model_fps, 1),
        "raw_fps": round(raw_fps, 1),
        "served_fps": round(served_fps, 1),
        "ratio": round(served_fps / raw_fps, 3),
        "p50_ms": round(pct(lat, 50), 2),
        "p99_ms": round(pct(lat, 99), 2),
        "added_p50_ms": round(pct(diffs, 50), 2),
        "cache_hit_p50_ms": round(hit_p50, 2),
        "revoke_p50_ms": round(pct(cuts, 50), 1),
        "revoke_p99_ms": round(pct(cuts, 99), 1),
        "raw_pipelined_fps": round(piped_fps, 1),
        "ratio_vs_pipelined": round(served_fps / piped_fps, 3),
        "pipelined_p50_ms": round(pct(piped_ms, 50), 2),
        "added_p25_ms": round(pct(diffs, 25), 2),
        "added_p75_ms": round(pct(diffs, 75), 2),
        "served_overhead_p50_ms": round(pct(overhead, 50), 2),
        "pairs": len(diffs),
        "max_wait_ms": settings.inference.max_wait_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short phases (under a minute)")
    parser.add_argument("--devices", type=int, default=None, help="concurrent devices")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per phase")
    parser.add_argument("--revocations", type=int, default=None)
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=None,
        help="override the gateway's inference.max_wait_ms (default: its configured default)",
    )
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--identities", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=float, default=0.5, help=argparse.SUPPRESS)
    parser.add_argument("--same-frame", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--paired", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from edgeward._logging import configure_logging

    if args.client:
        # stdout carries the JSON answer; the paired client's engine would log there.
        configure_logging(level="error")
        asyncio.run(_client(args))
        return
    args.seconds = args.seconds or (4.0 if args.quick else 15.0)
    args.devices = args.devices or (4 if args.quick else 8)
    args.revocations = args.revocations or (20 if args.quick else 50)
    os.environ.setdefault("GRPC_SSL_CIPHER_SUITES", pki.AEAD_CIPHERS_TLS12)
    # Per-request and audit lines would swamp the figures (and cost time); warnings only
    # would still print one line per revocation, so errors only.
    configure_logging(level="error")
    figures = asyncio.run(_bench(args))
    from bench._targets import report_targets

    report_targets(
        figures,
        [
            ("ratio", ">=", 0.9),
            ("ratio_vs_pipelined", ">=", 0.9),
            ("added_p50_ms", "<=", 2.0),
            ("revoke_p99_ms", "<=", 1000.0),
        ],
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
