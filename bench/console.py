"""The core console's fleet API on a 10,000-device registry, against the registry itself.

A registry is filled with ``--devices`` devices (each with a certificate; one in twenty
revoked, one in ten expired), then a core (``edgeward core run``, its own process) serves its
console on it. Timed, each as a median (p50) over ``--requests`` requests, in the same run:

* ``direct``: the same page read straight from the registry (``Registry.fleet_page``: the
  page, its certificates and the counts), in this process: the baseline;
* ``whole``: what the fleet page read before it was paged (every device and every
  certificate: ``list_devices`` + ``list_certificates``), in this process;
* ``api_changed``: ``GET /api/fleet`` over HTTPS after a revocation each time (the registry
  page is read afresh);
* ``api_same``: ``GET /api/fleet`` with nothing changed (the page the console keeps);
* ``api_304``: the same with ``If-None-Match`` (what the browser's poll sends): 304, no body;
* ``api_filtered``: ``GET /api/fleet?q=<prefix>&status=expired`` after a revocation each time.

Prints the ratios to ``direct`` and one JSON line. Run under the shared bench lock:

    flock /tmp/edgeward-bench.lock env PYTHONPATH=$PWD .venv/bin/python bench/console.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import structlog

import pki

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fill(registry: pki.Registry, n: int) -> None:
    now = dt.datetime.now(dt.UTC)
    for i in range(n):
        device_id = f"dev-{i:05d}"
        registry.upsert_device(device_id, type="pet_camera", region="home", now=now)
        lifetime = dt.timedelta(days=-1 if i % 10 == 3 else 7)
        registry.record_certificate(
            pki.CertificateRecord(
                f"{0x100000 + i:x}", device_id, now + lifetime, pki.Status.ACTIVE, now
            )
        )
        if i % 20 == 7:
            registry.revoke_device(device_id, reason="bench", now=now)


def p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def timed(n: int, one: Callable[[int], Awaitable[object]]) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await one(i)
        out.append(time.perf_counter() - t0)
    return out


def timed_sync(n: int, one: Callable[[int], object]) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        one(i)
        out.append(time.perf_counter() - t0)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=0, help="per measure (default 40/200)")
    args = parser.parse_args()
    n = args.requests or (40 if args.quick else 200)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory() as tmp:
        pki_dir = Path(tmp) / "pki"
        layout = pki.init_pki(pki_dir, trust_domain="bench.example")
        registry = pki.SqliteRegistry(layout.registry)
        t0 = time.perf_counter()
        fill(registry, args.devices)
        fill_s = time.perf_counter() - t0
        now = dt.datetime.now(dt.UTC)
        token = pki.create_operator_token(registry, name="ops-bench", role="viewer", now=now)
        port = free_port()
        env = {**os.environ, "EDGEWARD_CORE_LOG_LEVEL": "warning"}
        core = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from edgeward.cli import main; main()",
            "core", "run", "--pki-dir", str(pki_dir), "--listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0", "--enrol-listen", "127.0.0.1:0",
            "--console-listen", f"127.0.0.1:{port}",
            stderr=subprocess.PIPE, env=env, cwd=ROOT,
        )  # fmt: skip
        try:
            assert core.stderr is not None
            async with asyncio.timeout(60):
                while b"serving trust domain" not in await core.stderr.readline():
                    if core.returncode is not None:
                        raise SystemExit("the core did not start")
            drain = asyncio.ensure_future(core.stderr.read())
            ctx = ssl.create_default_context(cafile=str(layout.ca_bundle))
            base = f"https://127.0.0.1:{port}"
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(cookie_jar=jar) as http:
                async with http.post(
                    base + "/login",
                    data={"token": token},
                    ssl=ctx,
                    allow_redirects=False,
                    headers={"Origin": base},
                ) as r:
                    assert r.status == 303, r.status

                async def get(path: str, etag: str = "") -> tuple[int, str]:
                    headers = {"If-None-Match": etag} if etag else {}
                    async with http.get(base + path, ssl=ctx, headers=headers) as r:
                        await r.read()
                        return r.status, r.headers.get("ETag", "")

                victims = iter(range(1, args.devices, 20))

                def revoke_one() -> None:
                    device_id = f"dev-{next(victims):05d}"
                    registry.revoke_device(device_id, reason="bench", now=dt.datetime.now(dt.UTC))

                async def changed(path: str) -> None:
                    revoke_one()  # outside the clock would be fairer; it is ~0.1 ms
                    status, _ = await get(path)
                    assert status == 200, status

                for _ in range(5):  # warm-up (TLS session, templates, caches)
                    await get("/api/fleet")
                    registry.fleet_page(now=dt.datetime.now(dt.UTC))
                results: dict[str, float] = {}
                results["direct"] = p50(
                    timed_sync(n, lambda _: registry.fleet_page(now=dt.datetime.now(dt.UTC)))
                )
                results["direct_filtered"] = p50(
                    timed_sync(
                        n,
                        lambda _: registry.fleet_page(
                            prefix="dev-0", state="expired", now=dt.datetime.now(dt.UTC)
                        ),
                    )
                )
                results["whole"] = p50(
                    timed_sync(
                        max(5, n // 4),
                        lambda _: (registry.list_devices(), registry.list_certificates()),
                    )
                )
                results["api_changed"] = p50(await timed(n, lambda _: changed("/api/fleet")))
                results["api_filtered"] = p50(
                    await timed(n, lambda _: changed("/api/fleet?q=dev-0&status=expired"))
                )
                results["api_same"] = p50(await timed(n, lambda _: get("/api/fleet")))
                _, etag = await get("/api/fleet")

                async def conditional(_: int) -> None:
                    status, _ = await get("/api/fleet", etag)
                    assert status == 304, status

                results["api_304"] = p50(await timed(n, conditional))
            drain.cancel()
        finally:
            core.terminate()
            await core.wait()
            registry.close()
    direct = results["direct"]
    print(f"registry: {args.devices} devices (filled in {fill_s:.1f} s); {n} requests each")
    for name, value in results.items():
        base_name = "direct_filtered" if name == "api_filtered" else "direct"
        ratio = value / results[base_name]
        print(f"  {name:16s} p50 {value:8.2f} ms   ×{ratio:6.2f} of {base_name}")
    print(
        f"  the page read whole before paging took ×{results['whole'] / direct:.1f} "
        "the registry's paged read"
    )
    print(
        json.dumps(
            {
                "devices": args.devices,
                "requests": n,
                "p50_ms": {k: round(v, 3) for k, v in results.items()},
                "ratio_api_changed_vs_direct": round(results["api_changed"] / direct, 2),
                "ratio_api_304_vs_direct": round(results["api_304"] / direct, 2),
                "ratio_whole_vs_direct": round(results["whole"] / direct, 2),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
