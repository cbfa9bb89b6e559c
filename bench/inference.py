"""Serving overhead of the edge gateway against the raw model pipeline, in one run.

Phases (all on loopback, certificates from a throw-away PKI):

* model: the edge model alone on preprocessed input (context: the ceiling);
* raw: decode → preprocess → model → post-process of the same JPEG frames in a tight loop,
  one process, no serving, same onnxruntime session settings as the gateway;
* served: the gateway (cache disabled) end to end, N concurrent devices in *another process*
  over mutual-TLS gRPC, each a ``StreamDetect`` with one frame in flight;
* one device: the same with N=1, giving the added latency over the raw per-frame p50;
* cache hit: a gateway with the cache on, one device sending the same frame;
* revocation: a device's open stream, revoked in the registry; time until the client sees
  PERMISSION_DENIED (≥ 20 revocations; standalone gateway polling its registry).

Usage: ``python bench/inference.py [--quick] [--devices N] [--seconds S]``. The last line is
JSON: model_fps, raw_fps, served_fps, ratio, p50_ms, p99_ms, added_p50_ms, cache_hit_p50_ms,
revoke_p50_ms, revoke_p99_ms. Targets (not gates): ratio ≥ 0.9, added p50 ≤ 2 ms at one
device, revocation p99 ≤ 1 s.
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


async def _client(args: argparse.Namespace) -> None:
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
    address: str, identities: list[Path], seconds: float, *, same: bool
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
        "--identities",
        *map(str, identities),
    ]
    return dict(json.loads(subprocess.check_output(cmd, cwd=ROOT, timeout=seconds + 60)))


def _settings(identity: pki.IdentityFiles, pki_dir: Path, *, cache: bool) -> Any:
    from gateway._config import load_gateway_settings

    return load_gateway_settings(
        None,
        overrides={
            "identity_dir": identity.directory,
            "pki_dir": pki_dir,
            "listen": "127.0.0.1:0",
            "metrics_listen": None,
            "revocation_poll_interval_s": 0.05,
            "inference": {"models_dir": ROOT / "models", "queue_size": 256},
            "cache": {"enabled": cache},
            "limits": {"frames_per_s": 100_000.0, "burst": 100_000},
        },
    )


async def _raw(seconds: float) -> tuple[float, float, list[float]]:
    """Model alone and the raw pipeline, with the gateway's own session settings."""
    from gateway._inference import InferenceEngine
    from gateway._inference._engine import _run_ssd
    from gateway._inference._image import decode_image
    from gateway._inference._ssd import preprocess_ssd

    frames = [(PHOTOS / name).read_bytes() for name in FRAMES]
    async with InferenceEngine(models_dir=ROOT / "models") as engine:
        model = engine._model
        assert model is not None
        tensors = [preprocess_ssd([decode_image(f, max_pixels=16_000_000)]) for f in frames]
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            _run_ssd(model, tensors[n % len(tensors)], 0.5)
            n += 1
        model_fps = n / (time.perf_counter() - started)
        per_frame: list[float] = []
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            t = time.perf_counter()
            img = decode_image(frames[n % len(frames)], max_pixels=16_000_000)
            _run_ssd(model, preprocess_ssd([img]), 0.5)
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
    from gateway._service import GatewayService

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


async def _bench(args: argparse.Namespace) -> dict[str, float]:
    from gateway._service import GatewayService

    with tempfile.TemporaryDirectory(prefix="edgeward-bench-") as tmp:
        base = Path(tmp)
        pki_dir = base / "pki"
        pki.init_pki(pki_dir, trust_domain="bench.example")
        gw_identity = pki.issue_identity(
            pki_dir, base / "gw", role=pki.Role.GATEWAY, id="gw-bench",
            dns_names=("localhost",), ip_addresses=("127.0.0.1",),
        )  # fmt: skip
        registry = pki.SqliteRegistry(pki.PkiLayout(pki_dir).registry)
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

        print(f"== raw pipeline ({args.seconds:.0f} s each) ==", flush=True)
        model_fps, raw_fps, raw_lat = await _raw(args.seconds)
        raw_p50 = statistics.median(raw_lat) * 1000
        print(f"model alone      {model_fps:8.1f} frames/s")
        print(f"raw pipeline     {raw_fps:8.1f} frames/s   p50 {raw_p50:.2f} ms")

        async with GatewayService(_settings(gw_identity, pki_dir, cache=False)) as gw:
            address = f"127.0.0.1:{gw.grpc_port}"
            print(f"provider: {gw.engine.provider if gw.engine else '?'}", flush=True)
            served = await asyncio.to_thread(_run_client, address, load, args.seconds, same=False)
            one = await asyncio.to_thread(_run_client, address, load[:1], args.seconds, same=False)
        served_fps = served["frames"] / served["seconds"]
        lat = [x * 1000 for x in served["lat"]]
        one_p50 = statistics.median(one["lat"]) * 1000
        print(f"served ({args.devices} devices) {served_fps:8.1f} frames/s   "
              f"p50 {pct(lat, 50):.2f} ms  p99 {pct(lat, 99):.2f} ms")  # fmt: skip
        print(f"ratio served/raw {served_fps / raw_fps:8.2f}   (target >= 0.9)")
        print(f"one device       p50 {one_p50:.2f} ms, added over raw {one_p50 - raw_p50:+.2f} ms"
              "   (target <= 2 ms)")  # fmt: skip

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
        "added_p50_ms": round(one_p50 - raw_p50, 2),
        "cache_hit_p50_ms": round(hit_p50, 2),
        "revoke_p50_ms": round(pct(cuts, 50), 1),
        "revoke_p99_ms": round(pct(cuts, 99), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short phases (under a minute)")
    parser.add_argument("--devices", type=int, default=None, help="concurrent devices")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per phase")
    parser.add_argument("--revocations", type=int, default=None)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--identities", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=float, default=0.5, help=argparse.SUPPRESS)
    parser.add_argument("--same-frame", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(_client(args))
        return
    args.seconds = args.seconds or (4.0 if args.quick else 15.0)
    args.devices = args.devices or (4 if args.quick else 8)
    args.revocations = args.revocations or (20 if args.quick else 50)
    os.environ.setdefault("GRPC_SSL_CIPHER_SUITES", pki.AEAD_CIPHERS_TLS12)
    from edgeward._logging import configure_logging

    # Per-request and audit lines would swamp the figures (and cost time); warnings only
    # would still print one line per revocation, so errors only.
    configure_logging(level="error")
    figures = asyncio.run(_bench(args))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
