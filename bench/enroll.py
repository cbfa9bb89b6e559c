"""Enrolments per second, each on a fresh TLS connection, against two baselines from the same run.

* ``sign_per_s``: in-process CSR-in, certificate-out with ``cryptography`` (parse, verify the
  CSR signature, build and sign the certificate), no network and no registry;
* ``handshake_per_s``: a bare gRPC health check, each on a fresh TLS channel to the same core
  (its enrolment port), i.e. what the handshake alone costs;
* ``enrol_per_s``: ``Enrollment.Enroll`` with a fresh token and CSR, each on a fresh TLS
  channel: handshake + our checks + SQLite + signing.

The core runs in its own process (``edgeward core run``) so client and server do not share an
event loop; keys and CSRs are made before the clock starts (that is device-side work). Prints the
ratios, then one JSON line. Health checks and enrolments run in alternated blocks and the
ratio is the median of the per-block ratios (with their range), so a load change on the shared
machine does not land on one side only. Target: ``ratio_vs_handshake`` ≥ 0.7.

    .venv/bin/python bench/enroll.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

import pki
from protos.edgeward.v1 import enrollment_pb2, enrollment_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
# A channel of its own subchannel pool: every call really opens a new TLS connection.
FRESH = [("grpc.use_local_subchannel_pool", 1)]


def csr_for(device_id: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


def bench_sign(ca: pki.CertificateAuthority, csrs: list[tuple[str, bytes]]) -> float:
    now = dt.datetime.now(dt.UTC)
    started = time.perf_counter()
    for device_id, csr in csrs:
        key = pki.validate_csr(
            csr, identity=pki.Identity(ca.trust_domain, pki.Role.DEVICE, device_id)
        )
        ca.issue(key, identity=pki.Identity(ca.trust_domain, pki.Role.DEVICE, device_id), now=now)
    return len(csrs) / (time.perf_counter() - started)


async def run_pool(n: int, concurrency: int, one: object, *, offset: int = 0) -> float:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(offset, offset + n):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            await one(queue.get_nowait())  # type: ignore[operator]

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    return n / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (within a minute)")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    n = 300 if args.quick else 1500
    # The audit lines of token creation are not what is measured here.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        pki_dir = tmp / "pki"
        pki.init_pki(pki_dir, trust_domain="bench.example")
        ca = pki.CertificateAuthority.load(pki_dir)
        bundle = ca.bundle_pem
        now = dt.datetime.now(dt.UTC)
        with pki.SqliteRegistry(pki.PkiLayout(pki_dir).registry) as registry:
            jobs = []
            for i in range(n):
                device_id = f"bench-{i:05d}"
                token = pki.create_token(
                    registry, device_id=device_id, device_type="pet-camera", region="home",
                    ttl=dt.timedelta(hours=1), now=now,
                )  # fmt: skip
                jobs.append((token, csr_for(device_id)))
        sign_csrs = [(f"sign-{i:05d}", csr_for(f"sign-{i:05d}")) for i in range(n)]
        sign_per_s = bench_sign(ca, sign_csrs)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {
            **os.environ,
            "EDGEWARD_CORE_LOG_LEVEL": "warning",
            "EDGEWARD_CORE_CONSOLE_ENABLED": "false",
        }
        core = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from edgeward.cli import main; main()",
            "core", "run", "--pki-dir", str(pki_dir), "--listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0",
            "--enrol-listen", f"127.0.0.1:{port}",
            stderr=subprocess.PIPE, env=env, cwd=ROOT,
        )  # fmt: skip
        try:
            assert core.stderr is not None
            async with asyncio.timeout(30):
                while b"serving trust domain" not in await core.stderr.readline():
                    if core.returncode is not None:
                        raise SystemExit("the core did not start")
            target = f"127.0.0.1:{port}"
            creds = pki.grpc_channel_credentials(ca_bundle_pem=bundle)

            async def health(_: int) -> None:
                async with grpc.aio.secure_channel(target, creds, options=FRESH) as ch:
                    await health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(), timeout=10
                    )

            async def enrol(i: int) -> None:
                token, csr = jobs[i]
                async with grpc.aio.secure_channel(target, creds, options=FRESH) as ch:
                    await enrollment_pb2_grpc.EnrollmentStub(ch).Enroll(
                        enrollment_pb2.EnrollRequest(token=token, csr=csr), timeout=10
                    )

            await run_pool(20, args.concurrency, health)  # warm-up
            # Alternated blocks (health, enrolment, health, ...) rather than one long phase
            # each: the machine is shared, and a load change during one phase would land on
            # one side of the ratio only. The ratio is taken per pair of neighbouring blocks.
            rounds = 5 if args.quick else 10
            per = n // rounds
            health_rates: list[float] = []
            enrol_rates: list[float] = []
            for r in range(rounds):
                first, second = (health, enrol) if r % 2 == 0 else (enrol, health)
                a = await run_pool(per, args.concurrency, first, offset=r * per)
                b = await run_pool(per, args.concurrency, second, offset=r * per)
                h, e = (a, b) if first is health else (b, a)
                health_rates.append(h)
                enrol_rates.append(e)
            handshake_per_s = statistics.median(health_rates)
            enrol_per_s = statistics.median(enrol_rates)
            ratios = sorted(e / h for e, h in zip(enrol_rates, health_rates, strict=True))
        finally:
            core.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                await core.wait()

    ratio = statistics.median(ratios)
    print(f"in-process CSR -> certificate : {sign_per_s:8.0f} /s")
    print(f"health check, fresh TLS       : {handshake_per_s:8.0f} /s (median of {rounds} blocks)")
    print(f"enrolment, fresh TLS          : {enrol_per_s:8.0f} /s (median of {rounds} blocks)")
    print(
        f"enrolment / handshake         : {ratio:8.2f}  (median of {rounds} neighbouring-block "
        f"ratios, range {ratios[0]:.2f}..{ratios[-1]:.2f}; target >= 0.70)"
    )
    print(f"enrolment / in-process signing: {enrol_per_s / sign_per_s:8.2f}")
    print(
        json.dumps(
            {
                "enrol_per_s": round(enrol_per_s, 1),
                "handshake_per_s": round(handshake_per_s, 1),
                "sign_per_s": round(sign_per_s, 1),
                "ratio_vs_handshake": round(ratio, 3),
                "ratio_min": round(ratios[0], 3),
                "ratio_max": round(ratios[-1], 3),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
