"""Revoking a console operator: in the registry (both backends), with ``edgeward pki revoke
--operator``, from the core console's Operators page; its tokens, certificates and sessions,
at the core and at a gateway's console fed by the core's revocation feed, all end."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import pki
from edgeward.cli import main
from gateway._console import mint_link
from tests._support.core import RunningCore, running_core
from tests._support.gateway import start_gateway
from tests.console._client import ConsoleClient, console_client

pytestmark = pytest.mark.timeout(120)

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[pki.CoreRegistry]:
    """Each registry test runs on both backends: an SQLite file, a fresh PostgreSQL database."""
    url = (
        str(request.getfixturevalue("postgres_url"))
        if request.param == "postgresql"
        else str(tmp_path / "registry.sqlite3")
    )
    r = pki.open_registry(url)
    yield r
    r.close()


# -- the registry -------------------------------------------------------------------------------


def test_revoking_an_operator_spends_its_tokens_and_revokes_its_certificates(
    registry: pki.CoreRegistry,
) -> None:
    pki.create_operator_token(registry, name="ops-keep", role="admin", now=NOW)
    token = pki.create_operator_token(registry, name="ops-gone", role="admin", now=NOW)
    later = NOW + dt.timedelta(days=1)
    registry.record_operator_certificate("0A1B", operator_id="ops-gone", not_after=later, now=NOW)
    registry.record_operator_certificate("c0de", operator_id="ops-gone", not_after=later, now=NOW)
    registry.record_operator_certificate("beef", operator_id="ops-keep", not_after=later, now=NOW)
    before = registry.last_sequence()

    records = pki.revoke_operator(registry, "ops-gone", reason="left\nthe team", now=NOW, by="x")

    assert [(r.role, r.device_id, r.serial) for r in records] == [
        (pki.Role.OPERATOR, "ops-gone", None),
        (pki.Role.OPERATOR, "ops-gone", "a1b"),
        (pki.Role.OPERATOR, "ops-gone", "c0de"),
    ]
    assert [r.sequence for r in records] == [before + 1, before + 2, before + 3]
    assert records[0].reason == "left the team"
    assert registry.revocations_since(before) == records
    gone = registry.get_operator("ops-gone")
    assert gone is not None
    assert gone.status is pki.Status.REVOKED
    kept = registry.get_operator("ops-keep")
    assert kept is not None
    assert kept.status is pki.Status.ACTIVE
    # The CRL lists both of its certificates and not the other operator's.
    assert sorted(s for s, _ in registry.revoked_serials()) == ["a1b", "c0de"]
    with pytest.raises(pki.TokenRejected) as info:
        pki.redeem_operator_token(registry, token, now=NOW + dt.timedelta(seconds=1))
    assert info.value.reason == "token already used"
    with pytest.raises(pki.RegistryError, match="revoked"):
        pki.create_operator_token(registry, name="ops-gone", role="viewer", now=NOW)
    with pytest.raises(pki.RegistryError, match="already revoked"):
        pki.revoke_operator(registry, "ops-gone", reason="again", now=NOW)
    with pytest.raises(pki.RegistryError, match="no operator ops-nobody"):
        pki.revoke_operator(registry, "ops-nobody", reason="?", now=NOW)
    with pytest.raises(pki.RegistryError, match="not registered or revoked"):
        registry.record_operator_certificate(
            "abcd", operator_id="ops-gone", not_after=later, now=NOW
        )
    assert registry.last_sequence() == before + 3


def test_the_last_active_admin_is_not_revoked_unless_forced(registry: pki.CoreRegistry) -> None:
    pki.create_operator_token(registry, name="ops-root", role="admin", now=NOW)
    pki.create_operator_token(registry, name="ops-look", role="viewer", now=NOW)
    with pytest.raises(pki.LastAdmin, match="last active admin") as info:
        pki.revoke_operator(registry, "ops-root", reason="oops", now=NOW)
    assert info.value.operator == "ops-root"
    root = registry.get_operator("ops-root")
    assert root is not None
    assert root.status is pki.Status.ACTIVE
    assert registry.last_sequence() == 0
    # A viewer is no admin: revoking it leaves the admin, and is allowed.
    pki.revoke_operator(registry, "ops-look", reason="done", now=NOW)
    # With a second admin the first may go; then the second is the last.
    pki.create_operator_token(registry, name="ops-two", role="admin", now=NOW)
    pki.revoke_operator(registry, "ops-root", reason="handed over", now=NOW)
    with pytest.raises(pki.LastAdmin):
        pki.revoke_operator(registry, "ops-two", reason="oops", now=NOW)
    records = pki.revoke_operator(registry, "ops-two", reason="closing", now=NOW, force=True)
    assert records[0].device_id == "ops-two"


def test_an_operator_certificate_issued_with_the_registry_is_recorded(
    pki_dir: Path, tmp_path: Path, registry: pki.CoreRegistry
) -> None:
    with pytest.raises(pki.RegistryError, match="not registered"):
        pki.issue_identity(
            pki_dir, tmp_path / "nobody", role=pki.Role.OPERATOR, id="ops-cert", registry=registry
        )
    pki.create_operator_token(registry, name="ops-cert", role="viewer", now=_now())
    files = pki.issue_identity(
        pki_dir, tmp_path / "ops-cert", role=pki.Role.OPERATOR, id="ops-cert", registry=registry
    )
    serial = pki.serial_hex(files.certificate().serial_number)
    pki.revoke_operator(registry, "ops-cert", reason="test", now=_now())
    assert serial in {s for s, _ in registry.revoked_serials()}


# -- the command --------------------------------------------------------------------------------


def test_cli_revoke_operator_refuses_the_last_admin_and_audits_who(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    runner = CliRunner()
    assert runner.invoke(main, ["pki", "init", "--dir", str(d), "--trust-domain", "t.example"])
    for name, role in (("ops-admin", "admin"), ("ops-view", "viewer")):
        made = runner.invoke(
            main, ["pki", "operator-token", "--dir", str(d), "--name", name, "--role", role]
        )
        assert made.exit_code == 0, made.output
    refused = runner.invoke(main, ["pki", "revoke", "--dir", str(d), "--operator", "ops-admin"])
    assert refused.exit_code == 1
    assert "last active admin" in refused.output
    audit = [json.loads(line) for line in refused.stderr.splitlines() if line.startswith("{")]
    assert any(a["event"] == "operator.revoke_refused" and a["last_admin"] for a in audit)
    both = runner.invoke(
        main, ["pki", "revoke", "--dir", str(d), "--operator", "ops-view", "--device-id", "x-1"]
    )
    assert both.exit_code == 2
    force_alone = runner.invoke(
        main, ["pki", "revoke", "--dir", str(d), "--serial", "ab", "--force"]
    )
    assert force_alone.exit_code == 2
    done = runner.invoke(
        main,
        ["pki", "revoke", "--dir", str(d), "--operator", "ops-view", "--reason", "left"],
    )
    assert done.exit_code == 0, done.output
    assert "revoked operator ops-view (sequence 1)" in done.stdout
    audit = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    line = next(a for a in audit if a["event"] == "operator.revoked")
    assert (line["operator"], line["reason"], line["sequence"]) == ("ops-view", "left", 1)
    assert line["by"].startswith("cli")
    forced = runner.invoke(
        main, ["pki", "revoke", "--dir", str(d), "--operator", "ops-admin", "--force"]
    )
    assert forced.exit_code == 0, forced.output
    with pki.SqliteRegistry(pki.PkiLayout(d).registry) as registry:
        assert {o.id: o.status for o in registry.list_operators()} == {
            "ops-admin": pki.Status.REVOKED,
            "ops-view": pki.Status.REVOKED,
        }


# -- the core's console ---------------------------------------------------------------------


async def _login(c: ConsoleClient, core: RunningCore, name: str, role: str) -> None:
    token = pki.create_operator_token(core.registry, name=name, role=role, now=_now())
    status, _ = await c.login(token)
    assert status == 303


def _audit_events(core: RunningCore) -> list[tuple[str, dict[str, str]]]:
    return [(e.event, dict(e.fields)) for e in core.server.audit_ring.entries()]


async def test_an_admin_revokes_an_operator_and_its_core_sessions_token_and_certificate_end(
    pki_dir: Path, tmp_path: Path
) -> None:
    async with running_core(
        pki_dir, tmp_path, console_enabled=True, console_listen="127.0.0.1:0"
    ) as core:
        console = core.server.console
        base, bundle = console.url, pki_dir / "ca-bundle.pem"
        unused = pki.create_operator_token(core.registry, name="ops-mal", role="viewer", now=_now())
        cert = pki.issue_identity(
            pki_dir, tmp_path / "ops-mal", role=pki.Role.OPERATOR, id="ops-mal",
            registry=core.registry,
        )  # fmt: skip
        serial = pki.serial_hex(cert.certificate().serial_number)
        async with (
            console_client(base, bundle) as admin,
            console_client(base, bundle) as mal,
            console_client(base, bundle, cert) as mal_cert,
            console_client(base, bundle) as viewer,
        ):
            await _login(admin, core, "ops-boss", "admin")
            await _login(mal, core, "ops-mal", "viewer")
            await _login(viewer, core, "ops-peek", "viewer")
            assert (await mal.get("/api/fleet"))[0] == 200
            assert (await mal_cert.get("/api/fleet"))[0] == 200  # the certificate logs in

            # A viewer cannot revoke anyone (and nothing changes).
            csrf = await viewer.csrf("/operators")
            status, _, _ = await viewer.post(
                "/operators/ops-mal/revoke", data={"csrf": csrf, "reason": "mine"}
            )
            assert status == 403
            assert (await mal.get("/api/fleet"))[0] == 200
            # Nor can an admin without the CSRF token.
            status, _, _ = await admin.post("/operators/ops-mal/revoke", data={"reason": "x"})
            assert status == 403
            assert (await mal.get("/api/fleet"))[0] == 200

            csrf = await admin.csrf("/operators")
            status, headers, _ = await admin.post(
                "/operators/ops-mal/revoke", data={"csrf": csrf, "reason": "left the team"}
            )
            assert (status, headers["Location"]) == (303, "/operators")
            # Its session ended at once; its certificate and its unused token log in no more.
            assert (await mal.get("/api/fleet"))[0] == 401
            assert (await mal.get("/fleet"))[0] == 303
            assert (await mal_cert.get("/api/fleet"))[0] == 401
            async with console_client(base, bundle) as again:
                assert (await again.login(unused))[0] == 401
            assert serial in {s for s, _ in core.registry.revoked_serials()}
            # The others carry on.
            assert (await viewer.get("/api/fleet"))[0] == 200
            status, _, body = await admin.get("/operators")
            assert status == 200
            assert 'data-operator="ops-mal"' in body

            # The last admin: refused from the console, with the reason shown.
            csrf = await admin.csrf("/operators")
            status, _, body = await admin.post(
                "/operators/ops-boss/revoke", data={"csrf": csrf, "reason": "bye"}
            )
            assert status == 409
            assert "last active admin" in body
            assert (await admin.get("/api/fleet"))[0] == 200

        events = _audit_events(core)
        revoked = next(f for e, f in events if e == "operator.revoked")
        assert (revoked["operator"], revoked["by"]) == ("ops-mal", "ops-boss")
        action = next(f for e, f in events if e == "console.operator_revoked")
        assert (action["operator"], action["target"]) == ("ops-boss", "ops-mal")
        refused = [f for e, f in events if e == "console.refused"]
        assert any(f.get("operator") == "ops-peek" for f in refused)
        assert any(
            e == "console.action_refused" and f.get("target") == "ops-boss" for e, f in events
        )


# -- a gateway's console ----------------------------------------------------------------------


async def _stream_ends(c: ConsoleClient, started: asyncio.Event) -> None:
    async with c.http.get(c.base + "/api/live", ssl=c.ssl) as r:
        assert r.status == 200
        async for _ in r.content:
            started.set()


async def test_revoking_an_operator_at_the_core_ends_its_gateway_console_sessions(
    issue: Any, pki_dir: Path, tmp_path: Path
) -> None:
    """The revocation reaches the gateway by its revocation feed: the operator's session
    there (and its open live stream) ends within a second and a half, and neither its
    certificate nor a fresh link opens a new one."""
    async with running_core(
        pki_dir, tmp_path, console_enabled=True, console_listen="127.0.0.1:0",
        feed_heartbeat_s=0.2,
    ) as core:  # fmt: skip
        overrides = {"core_address": core.address, "pki_dir": None, "console_listen": "127.0.0.1:0"}
        async with start_gateway(
            issue=issue, tmp_path=tmp_path, gateway_id="gw-ops", overrides=overrides
        ) as gw:
            console = gw.service.console
            bundle = pki_dir / "ca-bundle.pem"
            ca = pki.CertificateAuthority.load(pki_dir)
            pki.create_operator_token(core.registry, name="ops-boss", role="admin", now=_now())
            pki.create_operator_token(core.registry, name="ops-eve", role="viewer", now=_now())
            pki.create_operator_token(core.registry, name="ops-bob", role="viewer", now=_now())
            cert = pki.issue_identity(
                pki_dir, tmp_path / "ops-eve", role=pki.Role.OPERATOR, id="ops-eve",
                registry=core.registry,
            )  # fmt: skip

            def link(name: str) -> str:
                role = pki.OperatorRole.VIEWER
                return mint_link(ca, gateway_id="gw-ops", operator=name, role=role)

            async with (
                console_client(console.url, bundle) as eve,
                console_client(console.url, bundle, cert) as eve_cert,
                console_client(console.url, bundle) as bob,
            ):
                assert (await eve.login(link("ops-eve")))[0] == 303
                assert (await bob.login(link("ops-bob")))[0] == 303
                assert (await eve_cert.get("/api/stats"))[0] == 200
                started = asyncio.Event()
                stream = asyncio.create_task(_stream_ends(eve, started))
                async with asyncio.timeout(30):
                    await started.wait()

                loop = asyncio.get_running_loop()
                t0 = loop.time()
                await asyncio.to_thread(
                    core.server.revoke_operator, "ops-eve", reason="compromised", by="ops-boss"
                )
                async with asyncio.timeout(10):
                    await stream  # the live stream ends with the session
                # Within a second on a quiet machine (the live view checks its session every
                # 0.5 s); the bound here is one a loaded 2-core machine keeps.
                assert loop.time() - t0 < 5.0
                assert (await eve.get("/api/stats"))[0] == 401
                assert (await eve_cert.get("/api/stats"))[0] == 401
                async with console_client(console.url, bundle) as fresh:
                    assert (await fresh.login(link("ops-eve")))[0] == 401
                assert (await bob.get("/api/stats"))[0] == 200
                assert gw.service.revocation.operator_revoked("ops-eve")
                assert not gw.service.revocation.operator_revoked("ops-bob")
                # Device listeners never heard of it: nobody was cut as a device.
                assert gw.service.revocation.revoked_count == 0
