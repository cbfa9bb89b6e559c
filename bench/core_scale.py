"""Core replicas on one registry: enrolment scaling, single-use tokens, revocation fan-out,
gateway failover, and escalations across a kill -9.

Every replica is a real ``edgeward core run`` process; all share one registry (the PKI's
SQLite file in WAL mode by default, or ``--registry URL``) and one escalation answer store.
The gateway side runs here, with the gateway's own client code (``CoreEndpoints``, the
revocation feed, the escalation outbox) over loopback mTLS.

1. ``enrol_per_s_1``: enrolments (token + CSR, one call each) against replica 0 alone;
   ``enrol_per_s_n``: the same number spread over every replica, in the same run (the
   baseline). On one small machine the replicas share its CPUs, so the ratio shows the cost
   of sharing the registry more than the gain of adding machines.
2. ``tokens_reused``: each of a set of fresh tokens is sent to every replica at the same
   instant (different CSRs); a token that enrolled more than once counts. Target 0.
3. ``revoke_fanout_p50_ms``/``_p99_ms``: a revocation written to the registry (what ``pki
   revoke`` and every replica do) until a gateway feed attached to *another* replica has
   applied it (the moment its listeners cut the device). Target p99 ≤ 1000 ms.
4. An enrolment storm through the device SDK (each device lists every replica), with the
   last replica killed (-9) a third of the way through: ``storm_enrolled`` of
   ``storm_devices`` hold a certificate, ``storm_enrolled_twice`` hold more than one (must be
   0), ``storm_unanswered`` got no answer (a replica that committed and died before
   replying spent that token: such a device needs a new one).
5. ``failover_s``: a gateway feed on replica 0 with replica 1 next in its list; replica 0 is
   killed (-9) and a device revoked at once; seconds until the gateway has that revocation
   through replica 1.
6. ``escalations_lost``/``escalations_duplicated``: a stream of escalations from a gateway
   that lists replicas 0 (restarted) and 1; the replica answering is killed (-9) mid-stream;
   every escalation must reach the device exactly once. Targets 0 and 0.

Ends with one JSON line: backend, replicas, enrol_per_s_1, enrol_per_s_n, tokens_reused,
revoke_fanout_p50_ms, revoke_fanout_p99_ms, failover_s, escalations_lost,
escalations_duplicated (then the storm's counts).
Run: ``.venv/bin/python bench/core_scale.py --quick``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import functools
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pki  # noqa: E402
from device_sdk import DeviceSdkError, enroll  # noqa: E402
from gateway import (  # noqa: E402
    EscalationSettings,
    EventPayload,
    RegionPolicy,
    RevocationState,
    free_port,
)
from gateway._core_endpoints import CoreEndpoints  # noqa: E402
from gateway._escalation import Escalator  # noqa: E402
from gateway._inference._image import decode_image  # noqa: E402
from gateway._revocation import CoreRevocationFeed  # noqa: E402
from protos.edgeward.v1 import enrollment_pb2, enrollment_pb2_grpc  # noqa: E402

MODELS = ROOT / "models"
PHOTO = ROOT / "tests" / "data" / "photos" / "motorcycle.jpg"
POLICY = RegionPolicy(
    escalate_empty_frames=True,
    send="frame",
    require_face_blur=False,
    device_budget_per_min=1e6,
    region_budget_per_min=1e6,
    empty_frame_budget_per_min=1e6,
)
CORE_PIN = [pki.server_name_option(pki.core_server_name())]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def csr_for(device_id: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


def open_registry(target: str) -> pki.Registry:
    """The registry at ``target`` (an SQLite path, or a URL when this build has a driver)."""
    opener = getattr(pki, "open_registry", None)
    if "://" in target and not target.startswith("sqlite://"):
        if opener is None:
            raise SystemExit(
                f"--registry {target.split('://', maxsplit=1)[0]}://…: this build has no "
                "registry backend for URLs (pki.open_registry); use an SQLite path"
            )
        registry: pki.Registry = opener(target)
        return registry
    if opener is not None:
        opened: pki.Registry = opener(target)
        return opened
    return pki.SqliteRegistry(Path(target.removeprefix("sqlite://")))


class Replica:
    """One ``edgeward core run`` process on fixed ports (so it can be restarted in place)."""

    def __init__(self, work: Path, index: int, *, pki_dir: Path, registry: str) -> None:
        self.index = index
        self.port = free_port()
        self.enrol_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.enrol_address = f"127.0.0.1:{self.enrol_port}"
        self.log = work / f"core-{index}.log"
        self.config = work / f"core-{index}.toml"
        self.config.write_text(
            f'pki_dir = "{pki_dir}"\n'
            f'registry = "{registry}"\n'
            f'core_id = "core-{index}"\n'
            f'listen = "{self.address}"\n'
            f'enrol_listen = "{self.enrol_address}"\n'
            'metrics_listen = "127.0.0.1:0"\n'  # several cores on one machine
            "console_enabled = false\n"
            f'identity_dir = "{work / f"core-{index}-identity"}"\n'
            "feed_heartbeat_s = 0.5\n"
            "shutdown_grace_s = 0.5\n"
            'log_level = "warning"\n'
            # Every simulated device connects from 127.0.0.1, so the per-address budget of
            # failed token attempts (the races' losers) would soon refuse the whole fleet.
            "[token_attempts]\n"
            "burst = 10000\n"
            "per_minute = 100000\n"
            "[escalation]\n"
            f'models_dir = "{MODELS}"\n'
            'providers = "cpu"\n'
            f'answer_store = "{work / "answers.sqlite3"}"\n'
            "max_queue = 1024\n"
        )
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as log:
            mark = log.tell()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", "from edgeward.cli import main; main()",
                "core", "run", "--config", str(self.config),
                stdout=asyncio.subprocess.DEVNULL, stderr=log, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
        async with asyncio.timeout(90):
            while b"serving trust domain" not in self.log.read_bytes()[mark:]:
                if self.proc.returncode is not None:
                    raise SystemExit(f"core {self.index} did not start; see {self.log}")
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class Fleet:
    def __init__(self, work: Path, replicas: int, registry: str | None) -> None:
        self.work = work
        self.pki_dir = work / "pki"
        pki.init_pki(self.pki_dir, trust_domain="bench.example")
        self.registry_target = registry or str(pki.PkiLayout(self.pki_dir).registry)
        self.backend = "postgresql" if self.registry_target.startswith("postgres") else "sqlite"
        self.registry = open_registry(self.registry_target)
        self.ca_bundle = pki.CertificateAuthority.load(self.pki_dir).bundle_pem
        self.replicas = [
            Replica(work, i, pki_dir=self.pki_dir, registry=self.registry_target)
            for i in range(replicas)
        ]
        self.gateway = pki.issue_identity(
            self.pki_dir,
            work / "gateway",
            role=pki.Role.GATEWAY,
            id="gw-bench",
            dns_names=("localhost",),
            ip_addresses=("127.0.0.1",),
        )
        self._n = 0

    def tokens(self, n: int, prefix: str) -> list[tuple[str, str]]:
        now = dt.datetime.now(dt.UTC)
        out = []
        for _ in range(n):
            self._n += 1
            device_id = f"{prefix}-{self._n:06d}"
            token = pki.create_token(
                self.registry, device_id=device_id, device_type="pet-camera", region="home",
                ttl=dt.timedelta(hours=1), now=now,
            )  # fmt: skip
            out.append((device_id, token))
        return out

    @contextlib.asynccontextmanager
    async def enrol_stubs(self) -> AsyncIterator[list[Any]]:
        """One ``Enrollment`` stub per replica (typed ``Any``: grpc-stubs types them sync)."""
        creds = pki.grpc_channel_credentials(ca_bundle_pem=self.ca_bundle)
        async with contextlib.AsyncExitStack() as stack:
            stubs: list[Any] = []
            for r in self.replicas:
                channel = await stack.enter_async_context(
                    grpc.aio.secure_channel(r.enrol_address, creds, options=CORE_PIN)
                )
                stubs.append(enrollment_pb2_grpc.EnrollmentStub(channel))
            yield stubs


async def pool(jobs: list[Callable[[], Awaitable[None]]], concurrency: int) -> float:
    queue = collections.deque(jobs)

    async def worker() -> None:
        while queue:
            await queue.popleft()()

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    return len(jobs) / (time.perf_counter() - started)


async def enrol_rates(fleet: Fleet, n: int, concurrency: int) -> tuple[float, float]:
    """Enrolments per second against replica 0 alone, then spread over every replica."""
    one = fleet.tokens(n, "one")
    spread = fleet.tokens(n, "all")
    csrs = {device_id: csr_for(device_id) for device_id, _ in one + spread}
    async with fleet.enrol_stubs() as stubs:

        def job(index: int, device_id: str, token: str) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                request = enrollment_pb2.EnrollRequest(token=token, csr=csrs[device_id])
                await stubs[index].Enroll(request, timeout=30)

            return run

        warm = fleet.tokens(4 * len(stubs), "warm")  # channels up, code paths warm
        csrs.update((device_id, csr_for(device_id)) for device_id, _ in warm)
        await pool([job(i % len(stubs), d, t) for i, (d, t) in enumerate(warm)], concurrency)
        rate_1 = await pool([job(0, d, t) for d, t in one], concurrency)
        rate_n = await pool(
            [job(i % len(stubs), d, t) for i, (d, t) in enumerate(spread)], concurrency
        )
    return rate_1, rate_n


async def token_races(fleet: Fleet, n: int) -> int:
    """Each token sent to every replica at once; tokens that enrolled more than once."""
    reused = 0
    async with fleet.enrol_stubs() as stubs:
        for device_id, token in fleet.tokens(n, "race"):
            requests = [
                enrollment_pb2.EnrollRequest(token=token, csr=csr_for(device_id)) for _ in stubs
            ]
            results = await asyncio.gather(
                *(s.Enroll(r, timeout=30) for s, r in zip(stubs, requests, strict=True)),
                return_exceptions=True,
            )
            wins = sum(1 for r in results if not isinstance(r, BaseException))
            certificates = len(fleet.registry.list_certificates(device_id))
            if wins > 1 or certificates > 1:
                reused += 1
    return reused


@contextlib.asynccontextmanager
async def gateway_feed(
    fleet: Fleet, addresses: list[str]
) -> AsyncIterator[tuple[RevocationState, CoreRevocationFeed]]:
    state = RevocationState(max_staleness_s=15.0)
    endpoints = CoreEndpoints.for_identity(addresses, fleet.gateway)
    feed = CoreRevocationFeed(state, endpoints=endpoints, stream_timeout_s=5.0)
    async with endpoints, feed:
        async with asyncio.timeout(30):
            await state.wait_fresh()
        yield state, feed


async def until(predicate: Callable[[], bool], limit_s: float = 30.0) -> None:
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110 - polls state other tasks update
            await asyncio.sleep(0.001)


def revoke(fleet: Fleet, device_id: str) -> None:
    pki.revoke_device(fleet.registry, device_id, reason="bench", now=dt.datetime.now(dt.UTC))


def enrolled_devices(fleet: Fleet, n: int) -> list[str]:
    """Devices in the registry to revoke (registered by their tokens)."""
    now = dt.datetime.now(dt.UTC)
    ids = []
    for _ in range(n):
        fleet._n += 1
        device_id = f"rev-{fleet._n:06d}"
        fleet.registry.upsert_device(device_id, type="pet-camera", region="home", now=now)
        ids.append(device_id)
    return ids


async def revoke_fanout(fleet: Fleet, n: int) -> list[float]:
    """ms from a revocation's commit to a gateway on replica 1 having applied it."""
    times: list[float] = []
    async with gateway_feed(fleet, [fleet.replicas[1].address]) as (state, _feed):
        for device_id in enrolled_devices(fleet, n):
            started = time.perf_counter()
            await asyncio.to_thread(revoke, fleet, device_id)
            await until(functools.partial(state.is_revoked, device_id, "00"))
            times.append((time.perf_counter() - started) * 1000.0)
    return times


async def failover(fleet: Fleet) -> tuple[float, str]:
    """Seconds from kill -9 of the gateway's replica to a revocation arriving via the next."""
    first, second = fleet.replicas[0], fleet.replicas[1]
    (device_id,) = enrolled_devices(fleet, 1)
    async with gateway_feed(fleet, [first.address, second.address]) as (state, feed):
        assert feed.address == first.address
        await first.kill()
        started = time.perf_counter()
        await asyncio.to_thread(revoke, fleet, device_id)
        await until(lambda: state.is_revoked(device_id, "00"), 60.0)
        return time.perf_counter() - started, feed.address


async def storm(fleet: Fleet, n: int, concurrency: int) -> dict[str, int]:
    """Every device enrols through the SDK (its replicas in turn, starting at a different one
    per device); the last replica is killed (-9) a third of the way through."""
    victim = fleet.replicas[-1]
    endpoints = [r.enrol_address for r in fleet.replicas]
    devices = fleet.tokens(n, "storm")
    answered: set[str] = set()
    refused: list[str] = []

    def job(i: int, device_id: str, token: str) -> Callable[[], Awaitable[None]]:
        order = endpoints[i % len(endpoints) :] + endpoints[: i % len(endpoints)]

        async def run() -> None:
            try:
                await enroll(
                    endpoint=order, ca_bundle_pem=fleet.ca_bundle, token=token,
                    out_dir=fleet.work / "devices" / device_id, timeout_s=30,
                )  # fmt: skip
            except DeviceSdkError as exc:
                refused.append(str(exc))
                return
            answered.add(device_id)

        return run

    async def killer() -> None:
        await until(lambda: len(answered) >= n // 3, 120.0)
        await victim.kill()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(killer())
        await pool([job(i, d, t) for i, (d, t) in enumerate(devices)], concurrency)
    if refused:
        print("storm refusals:", collections.Counter(r[:80] for r in refused).most_common(3))
    certificates = collections.Counter(
        c.device_id for c in fleet.registry.list_certificates() if c.device_id.startswith("storm")
    )
    return {
        "storm_devices": n,
        "storm_enrolled": sum(1 for d, _ in devices if certificates[d] >= 1),
        "storm_enrolled_twice": sum(1 for d, _ in devices if certificates[d] > 1),
        # A replica that committed and died before replying spent the token unanswered.
        "storm_unanswered": sum(1 for d, _ in devices if d not in answered),
    }


class Sink:
    def __init__(self) -> None:
        self.answers: collections.Counter[str] = collections.Counter()

    def __call__(self, device_id: str, payload: EventPayload) -> None:
        self.answers[getattr(payload, "escalation_id", "")] += 1


async def escalations(fleet: Fleet, n: int) -> tuple[int, int, int]:
    """(lost, duplicated, pending at the kill) over ``n`` escalations; the answering replica
    is killed midway."""
    first, second = fleet.replicas[0], fleet.replicas[1]
    sink = Sink()
    frame = decode_image(PHOTO.read_bytes(), max_pixels=40_000_000)
    escalator = Escalator(
        EscalationSettings(
            outbox_path=fleet.work / "outbox.sqlite3",
            retry_backoff_base_s=0.05,
            retry_backoff_max_s=0.5,
            call_timeout_s=60.0,
            concurrency=2,
            max_outbox_entries=100_000,
            regions={"home": POLICY},
        ),
        gateway_id="gw-bench",
        gateway_region="home",
        credentials=pki.grpc_channel_credentials(
            ca_bundle_pem=fleet.ca_bundle, identity=fleet.gateway
        ),
        sink=sink,
        models_dir=MODELS,
        default_core_address=f"{first.address},{second.address}",
    )
    ids: list[str] = []
    async with escalator:
        for i in range(n):
            outcome = await escalator.escalate(
                device_id="dev-1", frame_id=f"f{i}", detections=(), frame=frame
            )
            ids.extend(p.escalation_id for p in outcome.pending)
        # Kill the replica answering (replica 0, first in the list) with the stream in flight.
        await until(lambda: len(sink.answers) >= max(1, n // 4), 120.0)
        await first.kill()
        in_flight = await escalator.pending_count()
        with contextlib.suppress(TimeoutError):
            await until(lambda: all(i in sink.answers for i in ids), 120.0)
        await asyncio.sleep(0.5)  # a duplicate, were there one, would land now
    lost = sum(1 for i in ids if i not in sink.answers)
    duplicated = sum(c - 1 for c in sink.answers.values() if c > 1)
    return lost, duplicated, in_flight


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (under two minutes)")
    parser.add_argument("--replicas", type=int, default=2, help="core replicas (at least 2)")
    parser.add_argument(
        "--registry",
        default=None,
        help="registry every replica shares: an SQLite path or a postgresql:// URL "
        "(default: the bench PKI's SQLite file)",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="start a throwaway PostgreSQL (Debian's server, as the tests run it) and use it",
    )
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    if args.replicas < 2:
        parser.error("--replicas must be at least 2")
    if args.postgres:
        if args.registry is not None:
            parser.error("--postgres and --registry exclude each other")
        from tests._support.postgres import running_postgres

        with running_postgres() as server:
            args.registry = server.url(server.create_database().rsplit("/", 1)[1])
            await _run(args)
        return
    await _run(args)


async def _run(args: argparse.Namespace) -> None:
    n_enrol = 150 if args.quick else 1000
    n_race = 20 if args.quick else 100
    n_revoke = 20 if args.quick else 100
    n_escalate = 24 if args.quick else 100
    n_storm = 300 if args.quick else 2000
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))

    with tempfile.TemporaryDirectory() as tmp_s:
        fleet = Fleet(Path(tmp_s), args.replicas, args.registry)
        try:
            await asyncio.gather(*(r.start() for r in fleet.replicas))
            rate_1, rate_n = await enrol_rates(fleet, n_enrol, args.concurrency)
            print(f"enrolments, replica 0 alone : {rate_1:8.1f} /s")
            print(f"enrolments, {args.replicas} replicas     : {rate_n:8.1f} /s "
                  f"({rate_n / rate_1:.2f}x)")  # fmt: skip
            reused = await token_races(fleet, n_race)
            print(f"tokens raced on every replica: {n_race}, enrolled twice: {reused}")
            storm_counts = await storm(fleet, n_storm, args.concurrency)
            print(
                f"enrolment storm, last replica killed: {storm_counts['storm_enrolled']} of "
                f"{n_storm} enrolled, {storm_counts['storm_enrolled_twice']} twice, "
                f"{storm_counts['storm_unanswered']} without an answer"
            )
            await fleet.replicas[-1].start()
            fanout = await revoke_fanout(fleet, n_revoke)
            print(f"revocation fan-out (other replica): p50 {pct(fanout, 0.5):.1f} ms, "
                  f"p99 {pct(fanout, 0.99):.1f} ms (target p99 <= 1000)")  # fmt: skip
            failover_s, now_on = await failover(fleet)
            print(f"feed failover after kill -9  : {failover_s:.2f} s (now on {now_on})")
            await fleet.replicas[0].start()  # back, for the escalation stream
            lost, duplicated, in_flight = await escalations(fleet, n_escalate)
            print(f"escalations {n_escalate}, replica killed with {in_flight} pending: "
                  f"lost {lost}, answered twice {duplicated}")  # fmt: skip
        finally:
            await asyncio.gather(*(r.stop() for r in fleet.replicas))
            fleet.registry.close()
    print(
        json.dumps(
            {
                "backend": fleet.backend,
                "replicas": args.replicas,
                "enrol_per_s_1": round(rate_1, 1),
                "enrol_per_s_n": round(rate_n, 1),
                "tokens_reused": reused,
                "revoke_fanout_p50_ms": round(pct(fanout, 0.5), 1),
                "revoke_fanout_p99_ms": round(pct(fanout, 0.99), 1),
                "failover_s": round(failover_s, 3),
                "escalations_lost": lost,
                "escalations_duplicated": duplicated,
                **storm_counts,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
