"""One id namespace per trust domain: no device may take a gateway's or core's id, no gateway or
core a device's or each other's, whichever comes first, through the API, the CLI and enrolment,
and under concurrent claims."""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import json
import threading
from pathlib import Path

import grpc
import pytest
import structlog
from click.testing import CliRunner

import pki
from edgeward.cli import main
from gateway import status_of
from tests._support.core import running_core, unique_id
from tests.pki.conftest import NOW, execute_raw, make_csr
from tests.pki.test_core_service import raw_enroll

HOUR = dt.timedelta(hours=1)


def token(registry: pki.Registry, device_id: str, *, now: dt.datetime = NOW) -> str:
    return pki.create_token(
        registry, device_id=device_id, device_type="pet-camera", region="home", ttl=HOUR, now=now
    )


def server(
    pki_dir: Path, registry: pki.Registry, out: Path, role: pki.Role, id: str, **kw: object
) -> pki.IdentityFiles:
    return pki.issue_identity(pki_dir, out, role=role, id=id, registry=registry, **kw)  # type: ignore[arg-type]


def tokens_of(registry: pki.Registry, device_id: str) -> int:
    rows = execute_raw(registry, "SELECT COUNT(*) FROM tokens WHERE device_id = ?", (device_id,))
    return int(rows[0][0])


# -- Python API -----------------------------------------------------------------------------


@pytest.mark.parametrize("role", [pki.Role.GATEWAY, pki.Role.CORE])
def test_no_token_for_an_id_a_gateway_or_core_holds(
    pki_dir: Path, registry: pki.SqliteRegistry, tmp_path: Path, role: pki.Role
) -> None:
    server(pki_dir, registry, tmp_path / "srv", role, "gw-seoul")
    with structlog.testing.capture_logs() as logs, pytest.raises(pki.IdentityConflict) as info:
        token(registry, "gw-seoul")
    exc = info.value
    assert (exc.id, exc.holder, exc.wanted, exc.pending) == (
        "gw-seoul",
        role.value,
        "device",
        False,
    )
    assert f"id gw-seoul is already taken by {role.value} gw-seoul" in str(exc)
    assert isinstance(exc, pki.RegistryError)
    assert tokens_of(registry, "gw-seoul") == 0
    (line,) = [e for e in logs if e["event"] == "token.refused"]
    assert line["audit"] is True
    assert line["device_id"] == "gw-seoul"
    assert "gw-seoul" in line["reason"]
    assert not [e for e in logs if e["event"] == "token.created"]


@pytest.mark.parametrize("role", [pki.Role.GATEWAY, pki.Role.CORE])
def test_no_server_certificate_for_an_id_a_device_holds(
    pki_dir: Path, registry: pki.SqliteRegistry, tmp_path: Path, role: pki.Role
) -> None:
    auth = pki.EnrollmentAuthority(ca=pki.CertificateAuthority.load(pki_dir), registry=registry)
    auth.enroll(token(registry, "cam-held"), make_csr("cam-held"), peer="p", now=NOW)
    with structlog.testing.capture_logs() as logs, pytest.raises(pki.IdentityConflict) as info:
        server(pki_dir, registry, tmp_path / "srv1", role, "cam-held", now=NOW)
    assert (info.value.holder, info.value.wanted, info.value.pending) == (
        "device",
        role.value,
        False,
    )
    assert "device cam-held" in str(info.value)
    assert not (tmp_path / "srv1").exists()  # nothing written: no key, no certificate
    (line,) = [e for e in logs if e["event"] == "server_certificate.refused"]
    assert (line["audit"], line["role"], line["id"]) == (True, role.value, "cam-held")

    # A device known only by an unused token holds its id as well, until the token expires.
    token(registry, "cam-pending")
    with pytest.raises(pki.IdentityConflict) as pending:
        server(pki_dir, registry, tmp_path / "srv2", role, "cam-pending", now=NOW)
    assert pending.value.pending
    assert "an unused enrolment token for device cam-pending" in str(pending.value)
    assert registry.list_server_certificates(server_id="cam-pending") == []
    later = NOW + HOUR + dt.timedelta(seconds=1)
    with structlog.testing.capture_logs() as logs:
        files = server(pki_dir, registry, tmp_path / "srv3", role, "cam-pending", now=later)
    (record,) = registry.list_server_certificates(server_id="cam-pending")
    assert (record.role, record.serial) == (role, pki.serial_hex(files.certificate().serial_number))
    (issued,) = [e for e in logs if e["event"] == "server_certificate.issued"]
    assert (issued["audit"], issued["id"], issued["serial"]) == (True, "cam-pending", record.serial)


def test_gateway_and_core_never_share_an_id_but_each_may_be_reissued(
    pki_dir: Path, registry: pki.SqliteRegistry, tmp_path: Path
) -> None:
    server(pki_dir, registry, tmp_path / "g1", pki.Role.GATEWAY, "edge-1")
    server(pki_dir, registry, tmp_path / "g2", pki.Role.GATEWAY, "edge-1")  # same role: fine
    with pytest.raises(pki.IdentityConflict, match="taken by gateway edge-1"):
        server(pki_dir, registry, tmp_path / "c1", pki.Role.CORE, "edge-1")
    server(pki_dir, registry, tmp_path / "c2", pki.Role.CORE, "hub-1")
    with pytest.raises(pki.IdentityConflict, match="taken by core hub-1"):
        server(pki_dir, registry, tmp_path / "g3", pki.Role.GATEWAY, "hub-1")
    # A revoked server keeps its id: its revocation entries must never name another holder.
    pki.revoke_server(registry, pki.Role.GATEWAY, "edge-1", reason="retired", now=NOW)
    with pytest.raises(pki.IdentityConflict, match="taken by gateway edge-1"):
        token(registry, "edge-1")
    assert len(registry.list_server_certificates(pki.Role.GATEWAY, "edge-1")) == 2
    assert registry.list_server_certificates(pki.Role.CORE, "edge-1") == []


def test_enrolment_checks_the_id_again(pki_dir: Path, registry: pki.SqliteRegistry) -> None:
    """A token made before a server took the id (a gateway announced in the directory, or a
    registry written by an earlier version) does not enrol."""
    auth = pki.EnrollmentAuthority(ca=pki.CertificateAuthority.load(pki_dir), registry=registry)
    announced = token(registry, "gw-late")
    registry.upsert_gateway(pki.GatewayRecord("gw-late", "home", "127.0.0.1:1", "", NOW))
    legacy = token(registry, "core-late")
    execute_raw(
        registry,
        "INSERT INTO server_certificates VALUES ('c0ffee', 'core', 'core-late', ?, 'active', ?)",
        (NOW.timestamp() + 86400, NOW.timestamp()),
    )
    for device_id, tok, holder in (
        ("gw-late", announced, "gateway"),
        ("core-late", legacy, "core"),
    ):
        with structlog.testing.capture_logs() as logs, pytest.raises(pki.IdentityConflict) as info:
            auth.enroll(tok, make_csr(device_id), peer="10.0.0.7", now=NOW)
        assert (info.value.id, info.value.holder) == (device_id, holder)
        assert registry.get_device(device_id) is None
        assert registry.list_certificates(device_id) == []
        (line,) = [e for e in logs if e["event"] == "enrolment.refused"]
        assert (line["audit"], line["device_id"], line["peer"]) == (True, device_id, "10.0.0.7")
        assert holder in line["reason"]
        assert tok not in json.dumps(logs, default=str)
    # Over gRPC the refusal is a failed precondition naming the id, not a token refusal.
    status = status_of(info.value)
    assert status.grpc_code is grpc.StatusCode.FAILED_PRECONDITION
    assert "core-late" in status.message


async def test_enrolment_over_grpc_refuses_an_id_a_gateway_took(
    pki_dir: Path, tmp_path: Path
) -> None:
    async with running_core(pki_dir, tmp_path) as core:
        device_id = unique_id("gw")
        tok = core.token(device_id)
        core.registry.upsert_gateway(
            pki.GatewayRecord(device_id, "home", "127.0.0.1:1", "", dt.datetime.now(dt.UTC))
        )
        err = await raw_enroll(core, tok, make_csr(device_id))
        assert err is not None
        assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert f"id {device_id} is already taken by gateway {device_id}" in (err.details() or "")
        assert tok not in (err.details() or "")
        assert core.registry.get_device(device_id) is None


# -- concurrent claims ------------------------------------------------------------------------


def test_concurrent_claims_on_one_id_have_exactly_one_winner(
    registry_url: str, registry: pki.Registry
) -> None:
    """A token, a gateway and a core certificate for the same id at once, each through its
    own connection (as separate processes or core replicas would): one wins, the others are
    refused."""
    claims = ("device", "gateway", "core")

    def claim(kind: str, id: str, barrier: threading.Barrier) -> str:
        with contextlib.closing(pki.open_registry(registry_url)) as reg:
            barrier.wait(timeout=30)
            try:
                if kind == "device":
                    reg.create_token(
                        pki.TokenRecord(f"{id}-hash", id, "pet-camera", "home", NOW + HOUR, None),
                        now=NOW,
                    )
                else:
                    reg.record_server_certificate(
                        pki.ServerCertificateRecord(
                            f"{id}-{kind}", pki.Role(kind), id, NOW + HOUR, pki.Status.ACTIVE, NOW
                        )
                    )
            except pki.IdentityConflict as exc:
                return "refused" if exc.id == id else f"refused for {exc.id}"
            return "won"

    with concurrent.futures.ThreadPoolExecutor(len(claims)) as pool:
        for round_ in range(12):
            id = f"race-{round_}"
            barrier = threading.Barrier(len(claims))
            futures = {kind: pool.submit(claim, kind, id, barrier) for kind in claims}
            results = {kind: f.result(timeout=60) for kind, f in futures.items()}
            assert sorted(results.values()) == ["refused", "refused", "won"], results
            (winner,) = [k for k, r in results.items() if r == "won"]
            held_by_servers = {
                r.role.value for r in registry.list_server_certificates(server_id=id)
            }
            assert held_by_servers == (set() if winner == "device" else {winner})
            assert tokens_of(registry, id) == (1 if winner == "device" else 0)


def test_concurrent_tokens_for_one_device_leave_exactly_one_live(
    pki_dir: Path, registry_url: str, registry: pki.Registry
) -> None:
    barrier = threading.Barrier(6)

    def make(_: int) -> str:
        with contextlib.closing(pki.open_registry(registry_url)) as reg:
            barrier.wait(timeout=30)
            return token(reg, "cam-many")

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        made = list(pool.map(make, range(6)))
    live = [
        t
        for t in made
        if (record := registry.get_token(pki.hash_token(t))) is not None
        and record.voided_at is None
    ]
    assert len(live) == 1
    auth = pki.EnrollmentAuthority(ca=pki.CertificateAuthority.load(pki_dir), registry=registry)
    for t in made:
        if t in live:
            assert auth.enroll(t, make_csr("cam-many"), peer="p", now=NOW).identity.id == "cam-many"
        else:
            with pytest.raises(pki.TokenRejected) as info:
                auth.enroll(t, make_csr("cam-many"), peer="p", now=NOW)
            assert info.value.reason == "token voided by a newer token"


# -- the CLI ----------------------------------------------------------------------------------


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def error_line(err: str) -> str:
    """The one error line (audit lines are JSON lines on the same stream)."""
    (line,) = [ln for ln in err.splitlines() if not ln.startswith("{")]
    return line


def audit_events(err: str) -> list[dict[str, object]]:
    return [json.loads(ln) for ln in err.splitlines() if ln.startswith("{")]


@pytest.fixture
def cli_pki(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    code, _out, err = cli("pki", "init", "--dir", str(d), "--trust-domain", "cli.example")
    assert code == 0, err
    return d


def _token_cmd(d: Path, device_id: str) -> tuple[int, str, str]:
    return cli(
        "pki", "token", "--dir", str(d), "--device-id", device_id,
        "--type", "pet-camera", "--region", "home",
    )  # fmt: skip


def _issue_cmd(d: Path, role: str, id: str) -> tuple[int, str, str]:
    return cli("pki", "issue-server", "--dir", str(d), "--id", id, "--role", role,
               "--ip", "127.0.0.1")  # fmt: skip


def test_cli_token_for_a_gateways_id_is_refused(cli_pki: Path) -> None:
    code, _, err = _issue_cmd(cli_pki, "gateway", "gw-seoul")
    assert code == 0, err
    code, out, err = _token_cmd(cli_pki, "gw-seoul")
    assert code == 1
    assert out == ""  # no token printed
    assert "Traceback" not in err
    assert error_line(err) == (
        "Error: id gw-seoul is already taken by gateway gw-seoul: ids are unique across "
        "devices, gateways and cores; choose another device id"
    )
    assert any(e["event"] == "token.refused" and e["audit"] for e in audit_events(err))
    with pki.SqliteRegistry(pki.PkiLayout(cli_pki).registry) as reg:
        assert tokens_of(reg, "gw-seoul") == 0


@pytest.mark.parametrize("role", ["gateway", "core"])
def test_cli_issue_server_for_a_devices_or_other_servers_id_is_refused(
    cli_pki: Path, role: str
) -> None:
    code, _, err = _token_cmd(cli_pki, "cam-seoul")
    assert code == 0, err
    code, _, err = _issue_cmd(cli_pki, role, "cam-seoul")
    assert code == 1
    assert "Traceback" not in err
    assert error_line(err) == (
        "Error: id cam-seoul is already taken by an unused enrolment token for device "
        f"cam-seoul: ids are unique across devices, gateways and cores; choose another {role} id"
    )
    assert any(e["event"] == "server_certificate.refused" and e["audit"] for e in audit_events(err))
    assert not (pki.PkiLayout(cli_pki).servers / f"{role}-cam-seoul").exists()

    other = "core" if role == "gateway" else "gateway"
    assert _issue_cmd(cli_pki, other, "srv-seoul")[0] == 0
    code, _, err = _issue_cmd(cli_pki, role, "srv-seoul")
    assert code == 1
    assert error_line(err).startswith(f"Error: id srv-seoul is already taken by {other} srv-seoul")
    assert not (pki.PkiLayout(cli_pki).servers / f"{role}-srv-seoul").exists()
