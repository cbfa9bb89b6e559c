"""Where a lone frame's served round trip goes, stage by stage (a diagnostic, not a target).

The gateway runs in this process with ``bench/inference.py``'s settings (cache off); one device
in another process sends frames on a ``StreamDetect`` stream as that benchmark's paired client
does (a queue feeding the request stream, the SDK's way) and runs the raw pipeline between
frames, so the machine is in the same state as in ``added_p50_ms``. Both processes stamp
``time.perf_counter()`` (``CLOCK_MONOTONIC`` on Linux, one clock for every process), the
gateway at points it reaches through a few wrapped internals:

=============  ==============================================================================
client_send    the frame handed to the request stream → gRPC serialises it (client)
grpc_in        serialised → the gateway's deserializer runs: TLS, HTTP/2, gRPC's threads in
               both processes, the gateway's event loop woken
servicer_in    → the front door's ``detect`` (request iterator, guards, identity re-check,
               pacing)
handoff_in     → the job starts in the inference thread (fair turn, model catalog, engine,
               the thread woken)
work           decode, pre-process, model, post-process and the answer, in the thread
handoff_out    → the engine's caller resumes on the loop
servicer_out   → the answer reaches gRPC's serializer (escalation marks, protobuf, metrics)
grpc_out       serialised → the client's deserializer runs
client_recv    → the client's ``read()`` returns
=============  ==============================================================================

``added`` is the round trip minus the client's own raw pipeline run of the same frame (what
``bench/inference.py`` reports as ``added_p50_ms``), ``overhead`` the round trip minus
``work``.

Usage: ``python bench/grpc_stages.py [--seconds S]``; the last line is JSON (p50 per stage,
in milliseconds, and ``frames``).
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
from protos.edgeward.v1 import common_pb2  # noqa: E402

PHOTOS = ROOT / "tests" / "data" / "photos"
FRAMES = ["chelsea.jpg", "dog.jpg", "person.jpg", "coffee.jpg", "motorcycle.jpg", "rocket.jpg"]
METHOD = "/edgeward.v1.DeviceGateway/StreamDetect"
STAGES = [
    ("client_send", "c_queued", "c_serialised"),
    ("grpc_in", "c_serialised", "g_deserialised"),
    ("servicer_in", "g_deserialised", "g_door"),
    ("handoff_in", "g_door", "g_job_start"),
    ("work", "g_job_start", "g_job_end"),
    ("handoff_out", "g_job_end", "g_engine_back"),
    ("servicer_out", "g_engine_back", "g_serialised"),
    ("grpc_out", "g_serialised", "c_deserialised"),
    ("client_recv", "c_deserialised", "c_read"),
]

#: Gateway-side stamps by frame id (one device, one frame in flight).
_STAMPS: dict[str, dict[str, float]] = {}
_current = [""]


def _stamp(frame_id: str, point: str) -> None:
    _STAMPS.setdefault(frame_id, {})[point] = time.perf_counter()


# -- client process -------------------------------------------------------------------------------


async def _client(address: str, identity: Path, seconds: float) -> list[dict[str, float]]:
    from gateway import InferenceEngine
    from gateway._inference._engine import _run_model
    from gateway._inference._image import decode_image
    from gateway._inference._ssd import preprocess_ssd

    frames = [(PHOTOS / name).read_bytes() for name in FRAMES]
    files = pki.IdentityFiles(identity)
    creds = pki.grpc_channel_credentials(ca_bundle_pem=files.ca_bundle.read_bytes(), identity=files)
    stamps: dict[str, dict[str, float]] = {}

    def serialise(frame: Any) -> bytes:
        stamps.setdefault(frame.frame_id, {})["c_serialised"] = time.perf_counter()
        return bytes(frame.SerializeToString())

    def deserialise(data: bytes) -> Any:
        now = time.perf_counter()
        result = common_pb2.DetectionResult.FromString(data)
        stamps.setdefault(result.frame_id, {})["c_deserialised"] = now
        return result

    queue: asyncio.Queue[common_pb2.Frame | None] = asyncio.Queue()

    async def requests() -> Any:
        while (item := await queue.get()) is not None:
            yield item

    rows: list[dict[str, float]] = []
    async with (
        InferenceEngine(models_dir=ROOT / "models") as engine,
        grpc.aio.secure_channel(address, creds) as channel,
    ):
        model = engine._model
        assert model is not None
        call = channel.stream_stream(
            METHOD, request_serializer=serialise, response_deserializer=deserialise
        )(requests())
        warm = time.monotonic() + 0.5
        until = warm + seconds
        i = 0
        while time.monotonic() < until:
            image, frame_id = frames[i % len(frames)], str(i)
            started = time.perf_counter()
            await queue.put(common_pb2.Frame(image=image, frame_id=frame_id))
            await call.read()
            read = time.perf_counter()
            t = time.perf_counter()
            _run_model(model, preprocess_ssd([decode_image(image, max_pixels=16_000_000)]), 0.5)
            raw = time.perf_counter() - t
            if time.monotonic() >= warm:
                rows.append(
                    {"id": i, "c_queued": started, "c_read": read, "raw": raw, **stamps[frame_id]}
                )
            stamps.pop(frame_id, None)
            i += 1
        await queue.put(None)
        while await call.read() is not grpc.aio.EOF:
            pass
    return rows


# -- gateway process ------------------------------------------------------------------------------


def _instrument() -> None:
    """Stamp the gateway's path through a few of its internals (this process only)."""
    from gateway import _wire
    from gateway._door import _frontdoor
    from gateway._inference import _engine

    guarded = _wire._guarded

    def stamped(service: str, method: str, handler: Any, hook: Any) -> Any:
        handler = guarded(service, method, handler, hook)
        if method != "StreamDetect":
            return handler
        deserialise, serialise = handler.request_deserializer, handler.response_serializer

        def request(data: bytes) -> Any:
            now = time.perf_counter()
            frame = deserialise(data)
            _STAMPS.setdefault(frame.frame_id, {})["g_deserialised"] = now
            return frame

        def response(result: Any) -> bytes:
            _stamp(result.frame_id, "g_serialised")
            return bytes(serialise(result))

        return handler._replace(request_deserializer=request, response_serializer=response)

    _wire._guarded = stamped

    detect = _frontdoor.FrontDoor.detect

    async def door(self: Any, admitted: Any, *, frame_id: str, **kw: Any) -> Any:
        _stamp(frame_id, "g_door")
        _current[0] = frame_id
        return await detect(self, admitted, frame_id=frame_id, **kw)

    _frontdoor.FrontDoor.detect = door

    alone = _engine.InferenceEngine._alone_sync

    def job(self: Any, *args: Any) -> Any:
        frame_id = _current[0]
        _stamp(frame_id, "g_job_start")
        try:
            return alone(self, *args)
        finally:
            _stamp(frame_id, "g_job_end")

    _engine.InferenceEngine._alone_sync = job

    detect_alone = _engine.InferenceEngine._detect_alone

    async def back(self: Any, *args: Any, **kw: Any) -> Any:
        frame_id = _current[0]
        try:
            return await detect_alone(self, *args, **kw)
        finally:
            _stamp(frame_id, "g_engine_back")

    _engine.InferenceEngine._detect_alone = back


async def _gateway(seconds: float) -> dict[str, Any]:
    from bench.inference import _settings, bench_pki
    from gateway import GatewayService

    _instrument()
    with tempfile.TemporaryDirectory(prefix="edgeward-stages-") as tmp:
        base = Path(tmp)
        pki_dir, gw, registry = bench_pki(base)
        registry.upsert_device(
            "cam-000", type="pet-camera", region="home", now=dt.datetime.now(dt.UTC)
        )
        registry.close()
        device = pki.issue_identity(pki_dir, base / "cam-000", role=pki.Role.DEVICE, id="cam-000")
        async with GatewayService(_settings(gw, pki_dir, cache=False)) as service:
            cmd = [
                sys.executable, __file__, "--client", "--seconds", str(seconds),
                "--address", f"127.0.0.1:{service.grpc_port}", "--identity", str(device.directory),
            ]  # fmt: skip
            out = await asyncio.to_thread(
                subprocess.check_output, cmd, cwd=ROOT, timeout=seconds + 60
            )
    per: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
    per.update(total=[], raw=[], added=[], overhead=[])
    for row in json.loads(out):
        points = {**row, **_STAMPS.get(str(int(row["id"])), {})}
        if not all(p in points for _, a, b in STAGES for p in (a, b)):
            continue
        for name, a, b in STAGES:
            per[name].append(points[b] - points[a])
        total = points["c_read"] - points["c_queued"]
        per["total"].append(total)
        per["raw"].append(points["raw"])
        per["added"].append(total - points["raw"])
        per["overhead"].append(total - (points["g_job_end"] - points["g_job_start"]))
    figures: dict[str, Any] = {
        name: round(statistics.median(values) * 1000, 3) for name, values in per.items() if values
    }
    figures["frames"] = len(per["total"])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--identity", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from edgeward._logging import configure_logging

    configure_logging(level="error")
    if args.client:
        rows = asyncio.run(_client(args.address, Path(args.identity), args.seconds))
        print(json.dumps(rows))
        return
    os.environ.setdefault("GRPC_SSL_CIPHER_SUITES", pki.AEAD_CIPHERS_TLS12)
    figures = asyncio.run(_gateway(args.seconds))
    print(f"one device, {figures['frames']} frames, p50 per stage (ms):")
    for name in [n for n, _, _ in STAGES] + ["total", "raw", "added", "overhead"]:
        print(f"  {name:13s} {figures.get(name, float('nan')):8.3f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
