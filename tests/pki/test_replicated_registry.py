"""Cores replicated on one PostgreSQL database: migrations, the revocation sequence across
replicas, revocations pushed to every replica's feed, ``pki migrate``, ``--registry`` URLs
(and their passwords, which are never printed)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import structlog
from click.testing import CliRunner
from cryptography import x509

import pki
from edgeward.cli import main
from gateway import ConfigError, load_core_settings, status_of
from protos.edgeward.v1 import (
    common_pb2,
    core_pb2,
    core_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
)
from tests._support.core import RunningCore, running_core, unique_id
from tests._support.postgres import PostgresServer, running_postgres
from tests.pki.conftest import NOW, execute_raw, make_csr
from tests.pki.test_core_service import raw_enroll

pytestmark = pytest.mark.timeout(120)

EDGEWARD = [sys.executable, "-c", "from edgeward.cli import main; main()"]


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def device(registry: pki.Registry, device_id: str) -> None:
    registry.upsert_device(device_id, type="pet-camera", region="home", now=NOW)


# -- open_registry and migrations -------------------------------------------------------------


def test_open_registry_picks_the_backend_from_the_url(tmp_path: Path, postgres_url: str) -> None:
    for target in (tmp_path / "a.sqlite3", str(tmp_path / "b.sqlite3"), f"sqlite://{tmp_path}/c"):
        with contextlib.closing(pki.open_registry(target)) as reg:
            assert isinstance(reg, pki.SqliteRegistry)
    assert (tmp_path / "c").is_file()
    with contextlib.closing(pki.open_registry(postgres_url)) as reg:
        assert isinstance(reg, pki.PostgresRegistry)
        assert reg.schema_version() == 3
    with pytest.raises(pki.RegistryError, match="unsupported registry URL scheme 'mysql'"):
        pki.open_registry("mysql://root:hunter2@db/x")


def test_migrations_run_once_when_replicas_start_together(postgres_url: str) -> None:
    barrier = threading.Barrier(4)

    def start(_: int) -> int:
        barrier.wait(timeout=30)
        with contextlib.closing(pki.PostgresRegistry(postgres_url)) as reg:
            return reg.schema_version()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(start, range(4))) == [3, 3, 3, 3]
    with contextlib.closing(pki.PostgresRegistry(postgres_url)) as reg:  # again: nothing to do
        assert execute_raw(reg, "SELECT version FROM schema_migrations ORDER BY version") == [
            (1,),
            (2,),
            (3,),
        ]


def test_a_registry_made_before_operators_gains_them_and_keeps_its_data(
    postgres_url: str,
) -> None:
    """A database at schema version 1 (no operator tables) opened by this edgeward: steps 2
    and 3 add them, the devices stay, and the id namespace covers operators from then on."""
    with contextlib.closing(pki.PostgresRegistry(postgres_url)) as reg:
        device(reg, "cam-old")
        execute_raw(reg, "DROP TABLE operator_certificates, operator_tokens, operators")
        execute_raw(reg, "DROP INDEX certificates_valid")
        execute_raw(reg, "DELETE FROM schema_migrations WHERE version >= 2")
        assert reg.schema_version() == 1
    with contextlib.closing(pki.PostgresRegistry(postgres_url)) as reg:
        assert reg.schema_version() == 3
        assert [d.id for d in reg.list_devices()] == ["cam-old"]
        pki.create_operator_token(reg, name="ops-new", role="viewer", now=NOW)
        with pytest.raises(pki.IdentityConflict):
            pki.create_operator_token(reg, name="cam-old", role="viewer", now=NOW)


def test_a_newer_schema_is_refused(postgres_url: str) -> None:
    with contextlib.closing(pki.PostgresRegistry(postgres_url)) as reg:
        execute_raw(reg, "INSERT INTO schema_migrations VALUES (99, 0)")
    with pytest.raises(pki.RegistryError, match="newer than this edgeward"):
        pki.PostgresRegistry(postgres_url)


# -- one sequence across replicas -------------------------------------------------------------


def test_revocation_sequence_is_gap_free_across_replicas(postgres_url: str) -> None:
    """Two replicas revoking at once: every number 1..n exactly once, in commit order, and a
    reader that resumes after any number it saw misses none."""
    replicas = [pki.PostgresRegistry(postgres_url) for _ in range(2)]
    try:
        ids = [unique_id("cam") for _ in range(40)]
        for d in ids:
            device(replicas[0], d)
        seen: list[int] = []
        stop = threading.Event()

        def follow() -> None:
            after = 0
            while not stop.is_set() or after < len(ids):
                for r in replicas[1].revocations_since(after):
                    assert r.sequence == after + 1  # never a gap, never a repeat
                    after = r.sequence
                    seen.append(r.sequence)

        reader = threading.Thread(target=follow)
        reader.start()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            records = list(
                pool.map(
                    lambda i: replicas[i % 2].revoke_device(ids[i], reason="lost", now=NOW),
                    range(len(ids)),
                )
            )
        stop.set()
        reader.join(timeout=30)
        assert sorted(r.sequence for r in records) == list(range(1, len(ids) + 1))
        assert seen == list(range(1, len(ids) + 1))
        assert replicas[0].last_sequence() == replicas[1].last_sequence() == len(ids)
        crl_numbers = [replicas[i % 2].next_crl_number() for i in range(6)]
        assert crl_numbers == list(range(1, 7))
    finally:
        for r in replicas:
            r.close()


# -- pushed to every replica's feed -----------------------------------------------------------


def recorded_gateway(core: RunningCore, tmp_path: Path, gateway_id: str) -> pki.IdentityFiles:
    return pki.issue_identity(
        core.pki_dir,
        tmp_path / f"{gateway_id}-{unique_id('id')}",
        role=pki.Role.GATEWAY,
        id=gateway_id,
        dns_names=("localhost",),
        ip_addresses=("127.0.0.1",),
        registry=core.registry,
    )


@pytest.mark.parametrize("through", ["the other replica", "pki revoke --registry"])
async def test_a_revocation_through_any_writer_is_pushed_to_every_replica(
    pki_dir: Path, tmp_path: Path, postgres_url: str, through: str
) -> None:
    # Polling every 30 s and heartbeats every 30 s: an event long before them came by the push.
    quiet = {"registry": postgres_url, "feed_poll_s": 30.0, "feed_heartbeat_s": 30.0}
    async with (
        running_core(pki_dir, tmp_path, core_id="core-a", **quiet) as core_a,
        running_core(pki_dir, tmp_path, core_id="core-b", **quiet) as core_b,
    ):
        cam = unique_id("cam")
        device(core_a.registry, cam)
        gateway = recorded_gateway(core_a, tmp_path, unique_id("gw"))
        async with core_b.channel(identity=gateway) as ch:
            stream = core_pb2_grpc.CoreStub(ch).WatchRevocations(core_pb2.WatchRevocationsRequest())
            async with asyncio.timeout(10):
                first = await stream.read()  # the heartbeat that ends the (empty) replay
            assert first.heartbeat
            pushes_before = core_b.server.feed.pushes
            loop = asyncio.get_running_loop()
            if through == "the other replica":
                started = loop.time()
                core_a.server.revoke_device(cam, reason="stolen")
            else:
                proc = await asyncio.create_subprocess_exec(
                    *EDGEWARD, "pki", "revoke", "--dir", str(pki_dir), "--registry",
                    postgres_url, "--device-id", cam, "--reason", "stolen",
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                )  # fmt: skip
                _out, err = await proc.communicate()
                assert proc.returncode == 0, err
                started = loop.time()  # the revocation is committed by now
            # Polling and heartbeats are 30 s apart: only the push can deliver it sooner.
            async with asyncio.timeout(20):
                event = await stream.read()
            elapsed = loop.time() - started
            stream.cancel()
        assert (event.device_id, event.reason, event.heartbeat) == (cam, "stolen", False)
        assert event.sequence == core_b.registry.last_sequence()
        assert core_b.server.feed.pushed
        assert core_b.server.feed.pushes > pushes_before
        assert elapsed < 20  # bench/core_scale.py measures the figure (ms)


async def test_each_token_enrols_once_across_replicas(
    pki_dir: Path, tmp_path: Path, postgres_url: str
) -> None:
    """Every device sends its one token to both replicas at once: every device enrols, none
    twice, and the database holds one certificate per device."""
    # Losing attempts count as failed token attempts; keep the rate limit out of the way.
    limits = {"registry": postgres_url, "token_attempts": {"burst": 1000, "per_minute": 1000}}
    async with (
        running_core(pki_dir, tmp_path, core_id="core-e", **limits) as core_a,
        running_core(pki_dir, tmp_path, core_id="core-f", **limits) as core_b,
    ):
        devices = [unique_id("cam") for _ in range(8)]
        tokens = [core_a.token(d) for d in devices]
        attempts = [
            raw_enroll(core, token, make_csr(d))
            for d, token in zip(devices, tokens, strict=True)
            for core in (core_a, core_b, core_b)
        ]
        results = await asyncio.gather(*attempts)
        for i in range(len(devices)):
            mine = results[3 * i : 3 * i + 3]
            assert sum(r is None for r in mine) == 1, mine
            assert [r.code() for r in mine if r] == [grpc.StatusCode.PERMISSION_DENIED] * 2
        for d in devices:
            assert len(core_b.registry.list_certificates(d)) == 1


async def test_replicas_serve_the_same_crl_and_directory(
    pki_dir: Path, tmp_path: Path, postgres_url: str
) -> None:
    """A gateway announced on one replica and a device revoked on the other: both replicas
    sign the same directory (version, entries) and serve CRLs listing the same serials at the
    same revocation sequence, with CRL numbers that never repeat."""
    async with (
        running_core(pki_dir, tmp_path, core_id="core-c", registry=postgres_url) as core_a,
        running_core(pki_dir, tmp_path, core_id="core-d", registry=postgres_url) as core_b,
    ):
        gateway_id = unique_id("gw")
        gateway = recorded_gateway(core_a, tmp_path, gateway_id)
        async with core_a.channel(identity=gateway) as ch:
            await core_pb2_grpc.CoreStub(ch).AnnounceGateway(
                common_pb2.GatewayEntry(region="home", grpc_address="127.0.0.1:7000")
            )
        cam = unique_id("cam")
        device(core_b.registry, cam)
        core_b.registry.record_certificate(
            pki.CertificateRecord("abc123", cam, NOW + dt.timedelta(days=1), pki.Status.ACTIVE, NOW)
        )
        core_b.server.revoke_device(cam)

        directories = []
        crls = []
        for core in (core_a, core_b):
            async with core.channel(identity=gateway) as ch:
                signed = await core_pb2_grpc.CoreStub(ch).GetGatewayDirectory(
                    core_pb2.GetGatewayDirectoryRequest()
                )
            payload = common_pb2.GatewayDirectoryPayload.FromString(signed.payload)
            pki.verify_signed_payload(
                signed.payload,
                signed.signature,
                signed.signer_certificate_pem.encode(),
                ca_bundle_pem=core.ca_bundle_pem,
                now=dt.datetime.now(dt.UTC),
            )
            directories.append((payload.version, list(payload.gateways)))
            async with core.channel() as ch:
                crls.append(
                    await enrollment_pb2_grpc.EnrollmentStub(ch).GetCrl(
                        enrollment_pb2.GetCrlRequest()
                    )
                )
        assert directories[0] == directories[1]
        assert [g.gateway_id for g in directories[0][1]] == [gateway_id]
        # The device was revoked: the device CA's CRL lists it.
        parsed = [x509.load_der_x509_crl(c.device_crl_der) for c in crls]
        assert crls[0].revocation_sequence == crls[1].revocation_sequence == 1
        assert {r.serial_number for r in parsed[0]} == {r.serial_number for r in parsed[1]}
        assert {r.serial_number for r in parsed[0]} == {0xABC123}
        numbers = [c.extensions.get_extension_for_class(x509.CRLNumber).value for c in parsed]
        assert numbers[0].crl_number != numbers[1].crl_number


# -- core settings and CLI -----------------------------------------------------------------


def test_redacted_url_hides_every_password() -> None:
    cases = {
        "postgresql://u:s3cret@h:5432/db": "postgresql://u:***@h:5432/db",
        "postgresql://u:s3cret@[::1]/db?sslmode=verify-full": (
            "postgresql://u:***@[::1]/db?sslmode=verify-full"
        ),
        "postgresql://u@h/db?password=s3cret&sslmode=require": (
            "postgresql://u@h/db?password=***&sslmode=require"
        ),
        "postgresql://u@h/db": "postgresql://u@h/db",
        "/var/lib/edgeward/registry.sqlite3": "/var/lib/edgeward/registry.sqlite3",
    }
    for url, shown in cases.items():
        assert pki.redacted_url(url) == shown
    assert "s3cret" not in pki.redacted_url("postgresql://u:s3cret@h:99999999/db")


def test_core_settings_take_a_registry_url_and_never_echo_it(tmp_path: Path) -> None:
    url = "postgresql://edgeward:hunter2@db.example:5432/edgeward"
    settings = load_core_settings(None, pki_dir=tmp_path, registry=url)
    assert settings.registry_target == url
    assert "hunter2" not in settings.registry_display
    assert settings.registry_display == "postgresql://edgeward:***@db.example:5432/edgeward"
    default = load_core_settings(None, pki_dir=tmp_path)
    assert default.registry_target == pki.PkiLayout(tmp_path).registry
    toml = tmp_path / "core.toml"
    toml.write_text(f'pki_dir = "{tmp_path}"\nregistry = "{url}"\n')
    assert load_core_settings(toml).registry_target == url
    with pytest.raises(ConfigError) as info:
        load_core_settings(None, pki_dir=tmp_path, registry="mysql://root:hunter2@db/x")
    assert "registry" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_pki_commands_work_on_a_postgres_registry_and_never_print_its_password(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    pki_dir = tmp_path / "pki"
    assert cli("pki", "init", "--dir", str(pki_dir), "--trust-domain", "pg.example")[0] == 0
    database = postgres_server.create_database().rsplit("/", 1)[1]
    # Trust authentication ignores the password; it is there to be kept out of every output.
    url = postgres_server.url(database, password="hunter2-secret")
    code, out = cli(
        "pki", "token", "--dir", str(pki_dir), "--registry", url,
        "--device-id", "cam-pg", "--type", "pet-camera", "--region", "home",
    )  # fmt: skip
    assert code == 0, out
    code, out = cli(
        "pki", "issue-server", "--dir", str(pki_dir), "--registry", url,
        "--id", "gw-pg", "--role", "gateway", "--dns", "localhost",
    )  # fmt: skip
    assert code == 0, out
    code, out = cli(
        "pki", "revoke", "--dir", str(pki_dir), "--registry", url, "--gateway-id", "gw-pg"
    )
    assert code == 0, out
    assert "sequence 1" in out
    code, out = cli("pki", "list", "--dir", str(pki_dir), "--registry", url)
    assert code == 0, out
    assert "gateway/gw-pg" in out
    code, crl_out = cli(
        "pki", "crl", "--dir", str(pki_dir), "--registry", url, "--out", str(tmp_path / "c.pem")
    )
    assert code == 0, crl_out
    assert "CRLs with 0 device and 1 gateway/core certificate(s)" in crl_out
    # The SQLite registry of the directory was not touched.
    with contextlib.closing(pki.open_registry(pki.PkiLayout(pki_dir).registry)) as local:
        assert local.list_server_certificates() == []
    # An unreachable server: a one-line error without the password.
    dead = f"postgresql://postgres:hunter2-secret@127.0.0.1:1/{database}"
    code, out = cli("pki", "list", "--dir", str(pki_dir), "--registry", dead)
    assert code == 1
    assert "hunter2" not in out
    assert "cannot open registry postgresql://postgres:***@127.0.0.1:1/" in out
    assert "Connection refused" in out


# -- pki migrate ----------------------------------------------------------------------------


def populated_pki(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    """A PKI directory whose SQLite registry holds some of everything."""
    pki_dir = tmp_path / "pki"
    pki.init_pki(pki_dir, trust_domain="migrate.example")
    ca = pki.CertificateAuthority.load(pki_dir)
    now = dt.datetime.now(dt.UTC)
    with pki.SqliteRegistry(pki.PkiLayout(pki_dir).registry) as reg:
        auth = pki.EnrollmentAuthority(ca=ca, registry=reg)
        for i in range(3):
            token = pki.create_token(
                reg, device_id=f"cam-{i}", device_type="pet-camera", region="home",
                ttl=dt.timedelta(hours=1), now=now,
            )  # fmt: skip
            auth.enroll(token, make_csr(f"cam-{i}"), peer="p", now=now)
        later = pki.create_token(
            reg, device_id="cam-later", device_type="pet-camera", region="home",
            ttl=dt.timedelta(hours=1), now=now,
        )  # fmt: skip
        pki.issue_identity(pki_dir, tmp_path / "gw", role=pki.Role.GATEWAY, id="gw-m", registry=reg)
        pki.revoke_device(reg, "cam-0", reason="lost", now=now)
        pki.revoke_server(reg, pki.Role.GATEWAY, "gw-m", reason="retired", now=now)
        reg.upsert_gateway(pki.GatewayRecord("gw-m", "home", "127.0.0.1:7000", "", now))
        reg.next_crl_number()
        reg.next_crl_number()
        expected: dict[str, object] = {
            "devices": reg.list_devices(),
            "certificates": reg.list_certificates(),
            "servers": reg.list_server_certificates(),
            "revocations": reg.revocations_since(0),
            "revoked": reg.revoked_serials(),
            "gateways": reg.list_gateways(),
            "directory": reg.directory_version(),
            "later_token": later,
        }
    return pki_dir, expected


def test_migrate_moves_everything_and_verifies_counts(tmp_path: Path, postgres_url: str) -> None:
    pki_dir, expected = populated_pki(tmp_path)
    code, out = cli("pki", "migrate", "--dir", str(pki_dir), "--to", postgres_url)
    assert code == 0, out
    assert "devices 3, certificates 3, server_certificates 1, tokens 4, revocations 2" in out
    assert "counts verified" in out
    with contextlib.closing(pki.open_registry(postgres_url)) as reg:
        assert reg.list_devices() == expected["devices"]
        assert reg.list_certificates() == expected["certificates"]
        assert reg.list_server_certificates() == expected["servers"]
        assert reg.revocations_since(0) == expected["revocations"]
        assert reg.revoked_serials() == expected["revoked"]
        assert reg.list_gateways() == expected["gateways"]
        assert reg.directory_version() == expected["directory"]
        assert reg.next_crl_number() == 3  # continues after the two SQLite handed out
        # The sequence continues without reuse; the unused token enrols, once.
        assert reg.revoke_device("cam-1", reason="x", now=NOW).sequence == 3
        auth = pki.EnrollmentAuthority(ca=pki.CertificateAuthority.load(pki_dir), registry=reg)
        token = str(expected["later_token"])
        now = dt.datetime.now(dt.UTC)
        assert auth.enroll(token, make_csr("cam-later"), peer="p", now=now).identity.id == (
            "cam-later"
        )
        with pytest.raises(pki.TokenRejected) as info:
            auth.enroll(token, make_csr("cam-later"), peer="p", now=now)
        assert info.value.reason == "token already used"


def test_migrate_moves_operators_and_their_login_tokens(tmp_path: Path, postgres_url: str) -> None:
    """Operators keep their role and status; a login token used in SQLite stays used, an
    unused one logs in once on PostgreSQL, and the moved names still hold their ids."""
    pki_dir, _ = populated_pki(tmp_path)
    now = dt.datetime.now(dt.UTC)
    with pki.SqliteRegistry(pki.PkiLayout(pki_dir).registry) as reg:
        used = pki.create_operator_token(reg, name="ops-ann", role="admin", now=now)
        pki.redeem_operator_token(reg, used, now=now)
        fresh = pki.create_operator_token(reg, name="ops-ann", role="admin", now=now)
        pki.create_operator_token(reg, name="ops-ben", role="viewer", now=now)
        operators = reg.list_operators()
    code, out = cli("pki", "migrate", "--dir", str(pki_dir), "--to", postgres_url)
    assert code == 0, out
    assert "operators 2, operator_tokens 3" in out
    with contextlib.closing(pki.open_registry(postgres_url)) as reg:
        assert reg.list_operators() == operators
        with pytest.raises(pki.TokenRejected) as info:
            pki.redeem_operator_token(reg, used, now=now)
        assert info.value.reason == "token already used"
        assert pki.redeem_operator_token(reg, fresh, now=now).id == "ops-ann"
        with pytest.raises(pki.TokenRejected):
            pki.redeem_operator_token(reg, fresh, now=now)
        with pytest.raises(pki.IdentityConflict):
            pki.create_token(
                reg, device_id="ops-ben", device_type="pet-camera", region="home",
                ttl=dt.timedelta(hours=1), now=now,
            )  # fmt: skip
        with pytest.raises(pki.IdentityConflict):
            pki.create_operator_token(reg, name="cam-1", role="viewer", now=now)


def test_migrate_counts_operator_tokens_and_refuses_a_target_holding_operators(
    tmp_path: Path, postgres_url: str
) -> None:
    pki_dir, _ = populated_pki(tmp_path)
    with contextlib.closing(pki.open_registry(postgres_url)) as reg:
        pki.create_operator_token(reg, name="ops-here", role="viewer", now=NOW)
    code, out = cli("pki", "migrate", "--dir", str(pki_dir), "--to", postgres_url)
    assert code == 1
    assert "not empty (operators 1, operator_tokens 1)" in out
    code, out = cli("pki", "migrate", "--dir", str(pki_dir), "--to", postgres_url, "--force")
    assert code == 0, out
    assert "operators 0, operator_tokens 0" in out
    with contextlib.closing(pki.open_registry(postgres_url)) as reg:
        assert reg.list_operators() == []


def test_migrate_refuses_a_target_with_data_unless_forced(
    tmp_path: Path, postgres_url: str
) -> None:
    pki_dir, _ = populated_pki(tmp_path)
    with contextlib.closing(pki.open_registry(postgres_url)) as reg:
        device(reg, "cam-already-there")
    code, out = cli("pki", "migrate", "--dir", str(pki_dir), "--to", postgres_url)
    assert code == 1
    assert "not empty (devices 1" in out
    with contextlib.closing(pki.open_registry(postgres_url)) as reg:
        assert [d.id for d in reg.list_devices()] == ["cam-already-there"]
    code, out = cli("pki", "migrate", "--dir", str(pki_dir), "--to", postgres_url, "--force")
    assert code == 0, out
    with contextlib.closing(pki.open_registry(postgres_url)) as reg:
        assert [d.id for d in reg.list_devices()] == ["cam-0", "cam-1", "cam-2"]
    code, out = cli("pki", "migrate", "--dir", str(pki_dir), "--to", str(tmp_path / "x.db"))
    assert code == 2
    assert "postgresql://" in out


# -- the core on PostgreSQL, as a process ----------------------------------------------------


@pytest.mark.slow
async def test_core_run_on_a_postgres_registry(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    pki_dir = tmp_path / "pki"
    pki.init_pki(pki_dir, trust_domain="run.example")
    database = postgres_server.create_database().rsplit("/", 1)[1]
    url = postgres_server.url(database, password="hunter2-secret")
    core = await asyncio.create_subprocess_exec(
        *EDGEWARD, "core", "run", "--pki-dir", str(pki_dir), "--listen", "127.0.0.1:0",
        "--enrol-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
        "--core-id", "core-pg", "--registry", url,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    lines: list[bytes] = []
    try:
        assert core.stderr is not None
        async with asyncio.timeout(30):
            while b"serving trust domain" not in (line := await core.stderr.readline()):
                assert line, b"".join(lines)
                lines.append(line)
        assert f"registry postgresql://postgres:***@127.0.0.1:{postgres_server.port}/" in (
            line.decode()
        )
        # The core recorded its own certificate in the database, not in PKI_DIR's file.
        with contextlib.closing(pki.open_registry(postgres_server.url(database))) as reg:
            assert [(c.role, c.server_id) for c in reg.list_server_certificates()] == [
                (pki.Role.CORE, "core-pg")
            ]
    finally:
        core.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            out, err = await core.communicate()
    assert core.returncode == 0, err
    assert b"hunter2" not in b"".join(lines) + out + err


# -- a restarted database server ----------------------------------------------------------------


@pytest.mark.slow
def test_a_restarted_server_is_reconnected_and_pushes_resume(tmp_path: Path) -> None:
    """Replicas keep working after PostgreSQL restarts: the pool replaces broken connections
    and the listener comes back (and reports a change, since it may have missed some)."""
    with running_postgres() as server:
        url = server.create_database()
        with (
            contextlib.closing(pki.PostgresRegistry(url, connect_timeout_s=2)) as reg,
            contextlib.closing(pki.PostgresRegistry(url)) as other,
        ):
            pushed = threading.Event()
            stop = reg.watch_revocations(pushed.set)
            assert stop is not None
            assert pushed.wait(10)  # listening: the first (re)connection reports once
            device(other, "cam-restart")
            server.stop()
            # While it is away: a retryable error (UNAVAILABLE on the wire), not a refusal.
            with pytest.raises(pki.RegistryUnavailable) as info:
                reg.revoke_device("cam-restart", reason="lost", now=NOW)
            assert status_of(info.value).grpc_code is grpc.StatusCode.UNAVAILABLE
            server.start()
            pushed.clear()
            assert pushed.wait(10)  # the listener is back
            pushed.clear()
            other.revoke_device("cam-restart", reason="lost", now=NOW)
            assert pushed.wait(10)  # and pushes resume
            assert reg.last_sequence() == 1
            stop()


def test_migrate_upgrades_a_registry_from_an_earlier_version(
    tmp_path: Path, postgres_url: str
) -> None:
    """A registry file from before server revocations and voided tokens: upgraded, then moved;
    its gaps in the sequence (a revocation row deleted by hand) never lead to a reused number."""
    pki_dir = tmp_path / "pki"
    pki.init_pki(pki_dir, trust_domain="legacy.example")
    path = pki.PkiLayout(pki_dir).registry
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE devices (id TEXT PRIMARY KEY, type TEXT NOT NULL, region TEXT NOT NULL,"
            " status TEXT NOT NULL, created_at REAL NOT NULL);"
            "CREATE TABLE tokens (token_hash TEXT PRIMARY KEY, device_id TEXT NOT NULL,"
            " type TEXT NOT NULL, region TEXT NOT NULL, expires_at REAL NOT NULL, used_at REAL,"
            " created_at REAL NOT NULL);"
            "CREATE TABLE revocations (sequence INTEGER PRIMARY KEY AUTOINCREMENT,"
            " device_id TEXT NOT NULL, serial TEXT, reason TEXT NOT NULL,"
            " revoked_at REAL NOT NULL);"
        )
        for i in range(3):
            db.execute(
                "INSERT INTO devices VALUES (?, 'pet-camera', 'home', 'revoked', 0)", (f"cam-{i}",)
            )
            db.execute(
                "INSERT INTO revocations (device_id, reason, revoked_at) VALUES (?, 'old', 0)",
                (f"cam-{i}",),
            )
        db.execute("INSERT INTO tokens VALUES ('h1', 'cam-9', 'pet-camera', 'home', 9e9, NULL, 0)")
        db.execute("DELETE FROM revocations WHERE sequence = 3")
    code, out = cli("pki", "migrate", "--dir", str(pki_dir), "--to", postgres_url)
    assert code == 0, out
    assert "tokens 1, revocations 2" in out
    assert "revocation sequence 3" in out
    with contextlib.closing(pki.open_registry(postgres_url)) as reg:
        assert [(r.sequence, r.role) for r in reg.revocations_since(0)] == [
            (1, pki.Role.DEVICE),
            (2, pki.Role.DEVICE),
        ]
        token = reg.get_token("h1")
        assert token is not None
        assert token.voided_at is None
        device(reg, "cam-new")
        assert reg.revoke_device("cam-new", reason="x", now=NOW).sequence == 4


def test_migration_is_audited_without_the_password(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    pki_dir, _ = populated_pki(tmp_path)
    database = postgres_server.create_database().rsplit("/", 1)[1]
    url = postgres_server.url(database, password="hunter2-secret")
    with (
        contextlib.closing(pki.PostgresRegistry(url)) as target,
        structlog.testing.capture_logs() as logs,
    ):
        report = pki.migrate_registry(pki.PkiLayout(pki_dir).registry, target)
    (line,) = [e for e in logs if e["event"] == "registry.migrated"]
    assert line["audit"] is True
    assert (line["devices"], line["revocations"], line["last_sequence"]) == (3, 2, 2)
    assert report.counts["devices"] == 3
    assert "hunter2" not in repr(logs)


def test_pki_never_imports_the_database_driver_unless_asked(tmp_path: Path) -> None:
    """A device install has no psycopg: importing pki and opening an SQLite registry must not
    need it."""
    script = (
        "import sys, pathlib, pki\n"
        f"pki.open_registry(pathlib.Path({str(tmp_path / 'r.sqlite3')!r})).close()\n"
        "assert not any(m.startswith('psycopg') for m in sys.modules), 'psycopg imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()


@pytest.mark.slow
async def test_a_core_without_its_database_answers_unavailable_then_recovers(
    pki_dir: Path, tmp_path: Path
) -> None:
    """Enrolment while PostgreSQL is down is UNAVAILABLE (retryable, on another replica too),
    never a refusal that spends or voids anything; once it is back the same token enrols, and
    the core's revocation feed, which kept failing meanwhile, follows the registry again."""
    with running_postgres() as server:
        url = server.create_database()
        async with running_core(pki_dir, tmp_path, core_id="core-lonely", registry=url) as core:
            cam = unique_id("cam")
            token = core.token(cam)
            await asyncio.to_thread(server.stop)
            try:
                err = await raw_enroll(core, token, make_csr(cam))
            finally:
                await asyncio.to_thread(server.start)
            assert err is not None
            assert err.code() is grpc.StatusCode.UNAVAILABLE
            assert await raw_enroll(core, token, make_csr(cam)) is None
            # The feed lived through the outage and follows the registry again.
            await asyncio.to_thread(core.server.revoke_device, cam)
            async with asyncio.timeout(10):
                while core.server.feed.last_sequence != 1:  # noqa: ASYNC110 - test polling
                    await asyncio.sleep(0.05)


# -- the two backends agree ------------------------------------------------------------------


def _script(reg: pki.Registry) -> list[object]:
    """One scripted history of the registry; every answer and every listing along the way."""
    out: list[object] = []
    hour = dt.timedelta(hours=1)

    def attempt(fn: object, *args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)  # type: ignore[operator]
        except pki.PkiError as exc:  # the driver's own words differ; the decision may not
            return type(exc).__name__

    def cert(serial: str, device_id: str, at: dt.datetime) -> pki.CertificateRecord:
        return pki.CertificateRecord(serial, device_id, at + hour * 24, pki.Status.ACTIVE, at)

    for i in range(3):
        out.append(
            reg.create_token(
                pki.TokenRecord(f"h{i}", "cam-a", "pet-camera", "home", NOW + hour, None), now=NOW
            )
        )
    out.append(attempt(reg.consume_token, "h0", now=NOW))
    out.append(attempt(reg.complete_enrolment, "h2", certificate=cert("a1", "cam-a", NOW), now=NOW))
    later = NOW + dt.timedelta(minutes=1)
    reg.create_token(
        pki.TokenRecord("h3", "cam-a", "pet-camera", "west", NOW + hour, None), now=later
    )
    out.append(
        attempt(reg.complete_enrolment, "h3", certificate=cert("a2", "cam-a", later), now=later)
    )
    out.append(
        attempt(reg.complete_enrolment, "h3", certificate=cert("a3", "cam-a", later), now=later)
    )
    out.append(
        attempt(reg.complete_enrolment, "nope", certificate=cert("a4", "cam-a", NOW), now=NOW)
    )
    out.append(attempt(reg.record_renewal, "a2", cert("a5", "cam-a", later)))
    out.append(attempt(reg.upsert_device, "cam-b", type="pet-camera", region="home", now=NOW))
    out.append(attempt(reg.record_certificate, cert("b1", "cam-b", NOW)))
    out.append(attempt(reg.record_certificate, cert("b1", "cam-b", NOW)))
    server = pki.ServerCertificateRecord(
        "5e1", pki.Role.GATEWAY, "gw-a", NOW + hour, pki.Status.ACTIVE, NOW
    )
    out.append(attempt(reg.record_server_certificate, server))
    out.append(attempt(reg.record_server_certificate, pki.ServerCertificateRecord(
        "5e2", pki.Role.CORE, "cam-b", NOW + hour, pki.Status.ACTIVE, NOW)))  # fmt: skip
    out.append(attempt(reg.upsert_device, "gw-a", type="pet-camera", region="home", now=NOW))
    out.append(reg.upsert_gateway(pki.GatewayRecord("gw-a", "home", "127.0.0.1:1", "", NOW)))
    out.append(reg.upsert_gateway(pki.GatewayRecord("gw-a", "home", "127.0.0.1:1", "", NOW)))
    out.append(reg.upsert_gateway(pki.GatewayRecord("gw-a", "home", "127.0.0.1:2", "", NOW)))
    out.append(attempt(reg.revoke_serial, "0xB1", reason="key\nexposed", now=later))
    out.append(attempt(reg.revoke_server, pki.Role.GATEWAY, "gw-a", reason="gone", now=later))
    out.append(attempt(reg.revoke_server, pki.Role.GATEWAY, "gw-a", reason="again", now=later))
    out.append(attempt(reg.revoke_device, "cam-a", reason="stolen", now=later))
    out.append(attempt(reg.revoke_device, "cam-zz", reason="x", now=later))
    out.append(attempt(reg.create_token, pki.TokenRecord(
        "h9", "cam-a", "pet-camera", "home", NOW + hour, None), now=later))  # fmt: skip
    out += [reg.next_crl_number(), reg.next_crl_number()]
    out += [
        reg.list_devices(),
        reg.list_certificates(),
        reg.list_certificates("cam-a"),
        reg.list_server_certificates(),
        reg.list_server_certificates(pki.Role.GATEWAY, "gw-a"),
        [reg.get_token(f"h{i}") for i in range(5)],
        reg.revocations_since(0),
        reg.revocations_since(2, limit=2),
        reg.last_sequence(),
        reg.revoked_serials(),
        [reg.is_revoked("cam-a"), reg.is_revoked("cam-b", "b1"), reg.is_revoked("cam-b", "zz")],
        reg.list_gateways(),
        reg.directory_version(),
        reg.get_server_certificate("05E1"),
    ]
    return out


def test_sqlite_and_postgresql_give_the_same_answers(tmp_path: Path, postgres_url: str) -> None:
    with (
        contextlib.closing(pki.open_registry(tmp_path / "r.sqlite3")) as lite,
        contextlib.closing(pki.open_registry(postgres_url)) as pg,
    ):
        expected, got = _script(lite), _script(pg)
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert a == b, f"step {i}"
