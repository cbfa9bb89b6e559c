"""Operators in the PKI: their certificate profile, their one id namespace with devices,
gateways and cores, one-time login tokens, and ``edgeward pki operator-token``."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

import pki
from edgeward.cli import main
from tests._support.core import running_core
from tests.console._client import console_client

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each operator test runs on both backends: an SQLite file, a fresh PostgreSQL database."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return str(tmp_path / "registry.sqlite3")


@pytest.fixture
def registry(registry_url: str) -> Iterator[pki.CoreRegistry]:
    r = pki.open_registry(registry_url)
    yield r
    r.close()


def test_an_operator_certificate_is_a_client_certificate_only(pki_dir: Path) -> None:
    ca = pki.CertificateAuthority.load(pki_dir)
    key = pki.generate_private_key()
    identity = pki.Identity(ca.trust_domain, pki.Role.OPERATOR, "ops-alice")
    cert = ca.issue(key.public_key(), identity=identity, now=NOW)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://test.example/operator/ops-alice"
    ]
    assert cert.not_valid_after_utc - NOW == pki.DEFAULT_DEVICE_LIFETIME
    parsed = pki.identity_from_certificate(cert, trust_domain="test.example")
    assert parsed.role is pki.Role.OPERATOR
    with pytest.raises(ValueError, match="operator certificates carry no DNS"):
        ca.issue(key.public_key(), identity=identity, now=NOW, dns_names=["console.example"])


def test_a_login_token_works_once_and_names_its_role(registry: pki.CoreRegistry) -> None:
    token = pki.create_operator_token(registry, name="ops-alice", role="admin", now=NOW)
    assert token.startswith("ops-alice.")
    assert len(token) > 40
    record = pki.redeem_operator_token(registry, token, now=NOW)
    assert (record.id, record.role, record.status) == (
        "ops-alice",
        pki.OperatorRole.ADMIN,
        pki.Status.ACTIVE,
    )
    with pytest.raises(pki.TokenRejected) as info:
        pki.redeem_operator_token(registry, token, now=NOW)
    assert info.value.reason == "token already used"
    assert "ops-alice." not in str(info.value)


def test_a_login_token_expires_to_the_second(registry: pki.CoreRegistry) -> None:
    ttl = dt.timedelta(minutes=10)
    early = pki.create_operator_token(registry, name="ops-bob", role="viewer", ttl=ttl, now=NOW)
    late = pki.create_operator_token(registry, name="ops-bob", role="viewer", ttl=ttl, now=NOW)
    pki.redeem_operator_token(registry, early, now=NOW + ttl - dt.timedelta(seconds=1))
    with pytest.raises(pki.TokenRejected) as info:
        pki.redeem_operator_token(registry, late, now=NOW + ttl)
    assert info.value.reason == "token expired"


def test_a_new_token_leaves_the_earlier_ones_valid_until_used_or_expired(
    registry: pki.CoreRegistry,
) -> None:
    first = pki.create_operator_token(registry, name="ops-ida", role="viewer", now=NOW)
    second = pki.create_operator_token(registry, name="ops-ida", role="admin", now=NOW)
    # The role is the operator's, set by the newest token, whichever token logs in.
    assert pki.redeem_operator_token(registry, first, now=NOW).role is pki.OperatorRole.ADMIN
    assert pki.redeem_operator_token(registry, second, now=NOW).id == "ops-ida"
    with pytest.raises(pki.TokenRejected) as info:
        pki.redeem_operator_token(registry, first, now=NOW)
    assert info.value.reason == "token already used"
    with pytest.raises(pki.TokenRejected) as info:
        pki.redeem_operator_token(registry, "ops-ida." + "A" * 43, now=NOW)
    assert info.value.reason == "unknown token"
    assert [(o.id, o.role) for o in registry.list_operators()] == [
        ("ops-ida", pki.OperatorRole.ADMIN)
    ]


def _race(registries: tuple[pki.CoreRegistry, ...], token: str) -> list[str]:
    """Every registry redeems ``token`` at once (one thread each); what each got."""
    barrier = threading.Barrier(len(registries))
    outcomes: list[str] = []
    lock = threading.Lock()

    def redeem(reg: pki.CoreRegistry) -> None:
        barrier.wait(timeout=30)
        try:
            outcome = pki.redeem_operator_token(reg, token, now=NOW).id
        except pki.TokenRejected as exc:
            outcome = exc.reason
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=redeem, args=(r,)) for r in registries]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return sorted(outcomes)


def test_two_registries_racing_for_one_login_token_let_exactly_one_win(
    registry_url: str,
) -> None:
    """Two replicas (two registry objects, each with its own connections) redeem the same
    token at the same moment, round after round: exactly one login per token."""
    with (
        contextlib.closing(pki.open_registry(registry_url)) as one,
        contextlib.closing(pki.open_registry(registry_url)) as two,
    ):
        for n in range(15):
            token = pki.create_operator_token(one, name="ops-race", role="admin", now=NOW)
            assert _race((one, two), token) == ["ops-race", "token already used"], n


def _at_once(*calls: Callable[[], object]) -> list[str]:
    """Run ``calls`` at the same moment, one thread each; per call "won" or the name of the
    registry error it raised."""
    barrier = threading.Barrier(len(calls))
    results = [""] * len(calls)

    def run(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            calls[i]()
            results[i] = "won"
        except pki.RegistryError as exc:
            results[i] = type(exc).__name__

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_an_operator_and_a_device_racing_for_one_id_on_two_registries_get_one_winner(
    registry_url: str,
) -> None:
    """The id claim is checked inside each write, under the writer lock: of an operator token
    and an enrolment token for the same name, made at once through two replicas, exactly one
    is stored and the other is an IdentityConflict."""
    with (
        contextlib.closing(pki.open_registry(registry_url)) as one,
        contextlib.closing(pki.open_registry(registry_url)) as two,
    ):
        for n in range(10):
            name = f"who-{n}"
            operator, device = _at_once(
                functools.partial(
                    pki.create_operator_token, one, name=name, role="admin", now=NOW
                ),
                functools.partial(
                    pki.create_token, two, device_id=name, device_type="pet_camera",
                    region="home", ttl=dt.timedelta(hours=1), now=NOW,
                ),
            )  # fmt: skip
            assert sorted([operator, device]) == ["IdentityConflict", "won"], n
            assert (one.get_operator(name) is not None) == (operator == "won"), n


def test_a_revoked_operator_cannot_log_in_or_get_a_token(registry: pki.CoreRegistry) -> None:
    from tests.pki.conftest import execute_raw

    token = pki.create_operator_token(registry, name="ops-jo", role="admin", now=NOW)
    execute_raw(registry, "UPDATE operators SET status = 'revoked' WHERE id = ?", ("ops-jo",))
    with pytest.raises(pki.TokenRejected) as info:
        pki.redeem_operator_token(registry, token, now=NOW)
    assert info.value.reason == "operator is revoked"
    with pytest.raises(pki.RegistryError, match="revoked"):
        pki.create_operator_token(registry, name="ops-jo", role="admin", now=NOW)


def test_role_changes_with_a_new_token_and_bad_values_are_refused(
    registry: pki.CoreRegistry,
) -> None:
    pki.create_operator_token(registry, name="ops-carol", role="admin", now=NOW)
    pki.create_operator_token(registry, name="ops-carol", role="viewer", now=NOW)
    assert registry.get_operator("ops-carol").role is pki.OperatorRole.VIEWER  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="root"):
        pki.create_operator_token(registry, name="ops-carol", role="root", now=NOW)
    with pytest.raises(ValueError, match="at most 1 day"):
        pki.create_operator_token(
            registry, name="ops-carol", role="viewer", ttl=dt.timedelta(days=2), now=NOW
        )
    for bad in ("Ops", "a/b", "ops+", "o#", "x"):
        with pytest.raises(pki.InvalidName):
            pki.create_operator_token(registry, name=bad, role="viewer", now=NOW)
    with pytest.raises(pki.TokenRejected):
        pki.redeem_operator_token(registry, "no-dot-here", now=NOW)


def test_operators_share_the_id_namespace_with_every_role(registry: pki.CoreRegistry) -> None:
    pki.create_operator_token(registry, name="ops-dave", role="viewer", now=NOW)
    with pytest.raises(pki.IdentityConflict):
        pki.create_token(
            registry,
            device_id="ops-dave",
            device_type="pet_camera",
            region="home",
            ttl=dt.timedelta(hours=1),
            now=NOW,
        )
    with pytest.raises(pki.IdentityConflict):
        registry.record_server_certificate(
            pki.ServerCertificateRecord(
                "abc1",
                pki.Role.GATEWAY,
                "ops-dave",
                NOW + dt.timedelta(days=1),
                pki.Status.ACTIVE,
                NOW,
            )
        )
    pki.create_token(
        registry,
        device_id="cam-erin",
        device_type="pet_camera",
        region="home",
        ttl=dt.timedelta(hours=1),
        now=NOW,
    )
    with pytest.raises(pki.IdentityConflict):
        pki.create_operator_token(registry, name="cam-erin", role="admin", now=NOW)
    registry.record_server_certificate(
        pki.ServerCertificateRecord(
            "abc2", pki.Role.CORE, "core-9", NOW + dt.timedelta(days=1), pki.Status.ACTIVE, NOW
        )
    )
    with pytest.raises(pki.IdentityConflict):
        pki.create_operator_token(registry, name="core-9", role="admin", now=NOW)


def test_cli_operator_token_prints_the_token_once_and_audits(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    runner = CliRunner()
    assert (
        runner.invoke(
            main, ["pki", "init", "--dir", str(d), "--trust-domain", "t.example"]
        ).exit_code
        == 0
    )
    result = runner.invoke(
        main,
        [
            "pki",
            "operator-token",
            "--dir",
            str(d),
            "--name",
            "ops-frank",
            "--role",
            "admin",
            "--ttl",
            "5m",
        ],
    )
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[-1]
    assert token.startswith("ops-frank.")
    audit = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    created = next(a for a in audit if a["event"] == "operator_token.created")
    assert (created["operator"], created["operator_role"]) == ("ops-frank", "admin")
    assert token not in result.stderr
    with pki.SqliteRegistry(pki.PkiLayout(d).registry) as registry:
        assert pki.redeem_operator_token(registry, token, now=dt.datetime.now(dt.UTC)).id == (
            "ops-frank"
        )
    bad = runner.invoke(
        main, ["pki", "operator-token", "--dir", str(d), "--name", "ops-g", "--role", "root"]
    )
    assert bad.exit_code != 0
    clash = runner.invoke(
        main,
        [
            "pki",
            "token",
            "--dir",
            str(d),
            "--device-id",
            "ops-frank",
            "--type",
            "pet_camera",
            "--region",
            "home",
        ],
    )
    assert clash.exit_code == 1
    assert "ops-frank" in clash.output


async def test_a_core_on_postgresql_serves_its_console_to_a_cli_token(
    pki_dir: Path, tmp_path: Path, postgres_url: str
) -> None:
    """The console runs on a core whose registry is PostgreSQL; a token made by
    ``edgeward pki operator-token --registry postgresql://…`` (another process's view of the
    same database) logs in over HTTPS, once."""
    async with running_core(
        pki_dir,
        tmp_path,
        core_id="core-pg-console",
        registry=postgres_url,
        console_enabled=True,
        console_listen="127.0.0.1:0",
    ) as core:
        assert isinstance(core.server.registry, pki.PostgresRegistry)
        assert core.server.console is not None
        result = CliRunner().invoke(
            main,
            [
                "pki", "operator-token", "--dir", str(pki_dir), "--registry", postgres_url,
                "--name", "ops-pg", "--role", "viewer",
            ],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        token = result.stdout.strip().splitlines()[-1]
        assert token.startswith("ops-pg.")
        # Stored in the database, not in the PKI directory's SQLite file.
        with contextlib.closing(pki.open_registry(postgres_url)) as reg:
            assert reg.get_operator("ops-pg") is not None
        base, bundle = core.server.console.url, pki_dir / "ca-bundle.pem"
        async with console_client(base, bundle) as c:
            status, headers = await c.login(token)
            assert (status, headers["Location"]) == (303, "/fleet")
            status, _, body = await c.get("/fleet")
            assert status == 200
            assert "ops-pg (viewer)" in body
        async with console_client(base, bundle) as c:
            status, _ = await c.login(token)  # spent
            assert status == 401
