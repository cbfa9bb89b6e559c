"""``edgeward pki``, ``edgeward core run`` and ``edgeward enroll`` as a user runs them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

import pki
from edgeward.cli import main
from tests.conftest import require_tool

EDGEWARD = [sys.executable, "-c", "from edgeward.cli import main; main()"]
BAD_IDS = ["cam+1", "cam#1", "cam/1", "cam\x001", "Cam-1"]


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def cli_pki(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    code, _out, err = cli("pki", "init", "--dir", str(d), "--trust-domain", "cli.example")
    assert code == 0, err
    return d


def test_init_refuses_to_overwrite(cli_pki: Path) -> None:
    before = pki.PkiLayout(cli_pki).root_key.read_bytes()
    code, _, err = cli("pki", "init", "--dir", str(cli_pki), "--trust-domain", "cli.example")
    assert code == 1
    assert "refusing to overwrite" in err
    assert "Traceback" not in err
    assert pki.PkiLayout(cli_pki).root_key.read_bytes() == before


def test_token_is_printed_once_and_only_its_hash_is_kept(cli_pki: Path) -> None:
    code, out, err = cli(
        "pki", "token", "--dir", str(cli_pki), "--device-id", "cam-cli1",
        "--type", "pet-camera", "--region", "home", "--ttl", "15m",
    )  # fmt: skip
    assert code == 0, err
    token = out.strip()
    assert token.startswith("cam-cli1.")
    assert len(out.splitlines()) == 1
    assert token not in err
    assert token.split(".")[1] not in err
    with pki.SqliteRegistry(pki.PkiLayout(cli_pki).registry) as reg:
        record = reg.get_token(pki.hash_token(token))
    assert record is not None
    assert record.device_id == "cam-cli1"


@pytest.mark.parametrize("bad", BAD_IDS)
def test_every_id_option_refuses_wildcards(cli_pki: Path, bad: str) -> None:
    d = str(cli_pki)
    for args in (
        [
            "pki",
            "token",
            "--dir",
            d,
            "--device-id",
            bad,
            "--type",
            "pet-camera",
            "--region",
            "home",
        ],
        ["pki", "token", "--dir", d, "--device-id", "cam-ok1", "--type", bad, "--region", "home"],
        [
            "pki",
            "token",
            "--dir",
            d,
            "--device-id",
            "cam-ok1",
            "--type",
            "pet-camera",
            "--region",
            bad,
        ],
        ["pki", "revoke", "--dir", d, "--device-id", bad],
        ["pki", "issue-server", "--dir", d, "--id", bad, "--role", "gateway"],
    ):
        code, _, err = cli(*args)
        assert code == 2, args
        assert "Invalid value" in err
        assert "Traceback" not in err


def test_issue_server_revoke_crl_and_list(cli_pki: Path, tmp_path: Path) -> None:
    d = str(cli_pki)
    code, out, err = cli(
        "pki", "issue-server", "--dir", d, "--id", "gw-cli1", "--role", "gateway",
        "--dns", "gw.local", "--ip", "127.0.0.1",
    )  # fmt: skip
    assert code == 0, err
    files = pki.IdentityFiles(pki.PkiLayout(cli_pki).servers / "gateway-gw-cli1")
    assert files.identity("cli.example").role is pki.Role.GATEWAY
    assert cli("pki", "issue-server", "--dir", d, "--id", "gw-x", "--role", "device")[0] == 2
    assert cli("pki", "issue-server", "--dir", d, "--id", "gw-cli2", "--role", "core",
               "--ip", "not-an-ip")[0] == 1  # fmt: skip

    code, _, err = cli("pki", "revoke", "--dir", d, "--device-id", "cam-nobody")
    assert code == 1
    assert "no device cam-nobody" in err
    assert cli("pki", "revoke", "--dir", d)[0] == 2

    ca = pki.CertificateAuthority.load(cli_pki)
    with pki.SqliteRegistry(pki.PkiLayout(cli_pki).registry) as reg:
        auth = pki.EnrollmentAuthority(ca=ca, registry=reg)
        import datetime as dt

        from tests.pki.conftest import make_csr

        now = dt.datetime.now(dt.UTC)
        token = pki.create_token(
            reg, device_id="cam-list", device_type="robot-vacuum", region="home",
            ttl=dt.timedelta(hours=1), now=now,
        )  # fmt: skip
        issued = auth.enroll(token, make_csr("cam-list"), peer="p", now=now)
    code, out, err = cli("pki", "revoke", "--dir", d, "--serial", issued.serial, "--reason", "lost")
    assert code == 0, err
    assert "sequence 1" in out
    code, out, _ = cli("pki", "list", "--dir", d)
    assert code == 0
    assert "cam-list" in out
    assert "robot-vacuum" in out
    assert issued.serial in out
    assert "revoked" in out
    serial = int(issued.serial, 16)
    for fmt in ([], ["--der"]):
        out_file = tmp_path / f"crl{len(fmt)}.{'der' if fmt else 'pem'}"
        code, out, err = cli("pki", "crl", "--dir", d, "--out", str(out_file), *fmt)
        assert code == 0, err
        assert "1 device and 0 gateway/core" in out
        if fmt:  # one DER file per issuing CA
            issuing = x509.load_der_x509_crl(out_file.read_bytes())
            device = x509.load_der_x509_crl((tmp_path / "crl1-device.der").read_bytes())
        else:  # both in one PEM file, as Mosquitto's crlfile reads them
            end = b"-----END X509 CRL-----\n"
            first, second, rest = out_file.read_bytes().split(end)
            assert rest == b""
            issuing, device = (x509.load_pem_x509_crl(p + end) for p in (first, second))
        layout = pki.PkiLayout(cli_pki)
        device_ca = x509.load_pem_x509_certificate(layout.device_cert.read_bytes())
        issuing_ca = x509.load_pem_x509_certificate(layout.issuing_cert.read_bytes())
        assert device.is_signature_valid(device_ca.public_key())  # type: ignore[arg-type]
        assert issuing.is_signature_valid(issuing_ca.public_key())  # type: ignore[arg-type]
        assert device.get_revoked_certificate_by_serial_number(serial) is not None
        assert issuing.get_revoked_certificate_by_serial_number(serial) is None


def test_commands_on_a_missing_pki_fail_in_one_line(tmp_path: Path) -> None:
    code, _, err = cli(
        "pki", "token", "--dir", str(tmp_path / "none"), "--device-id", "cam-one",
        "--type", "pet-camera", "--region", "home",
    )  # fmt: skip
    assert code == 1
    assert "not an edgeward PKI" in err
    assert len(err.strip().splitlines()) == 1


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


async def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *EDGEWARD, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.mark.slow
async def test_quick_start_core_run_enroll_renew_revoke(cli_pki: Path, tmp_path: Path) -> None:
    """The README's path: core run with --pki-dir and --listen only, enrol, renew, revoke."""
    openssl = require_tool("openssl")
    port = _free_port_pair()
    core = await asyncio.create_subprocess_exec(
        *EDGEWARD, "core", "run", "--pki-dir", str(cli_pki), "--listen", f"127.0.0.1:{port}",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # A free metrics port: the default one may be taken by another core on this machine.
        env={**os.environ, "EDGEWARD_CORE_METRICS_LISTEN": "127.0.0.1:0"},
    )  # fmt: skip
    try:
        assert core.stderr is not None
        async with asyncio.timeout(20):
            while b"serving trust domain" not in await core.stderr.readline():
                pass
        d = str(cli_pki)
        code, token, err = await _run(
            "pki", "token", "--dir", d, "--device-id", "cam-quick", "--type", "pet-camera",
            "--region", "home",
        )  # fmt: skip
        assert code == 0, err
        token = token.strip()
        out_dir = tmp_path / "device"
        bundle = str(pki.PkiLayout(cli_pki).ca_bundle)
        enrol = ["enroll", "--endpoint", f"127.0.0.1:{port + 1}", "--ca-bundle", bundle,
                 "--out", str(out_dir)]  # fmt: skip
        env = {**os.environ, "EDGEWARD_ENROLL_TOKEN": token}
        code, out, err = await _run(*enrol, env=env)
        assert code == 0, err
        assert "enrolled cam-quick" in out
        assert token not in out + err
        code, out, err = await _run(*enrol, env=env)
        assert code == 0
        assert "already enrolled" in out
        code, out, err = await _run(*enrol, "--force", env=env)
        assert code == 1
        assert "PERMISSION_DENIED" in err
        assert "Traceback" not in err
        files = pki.IdentityFiles(out_dir)
        verify = await asyncio.create_subprocess_exec(
            openssl, "verify", "-CAfile", str(pki.PkiLayout(cli_pki).root_cert),
            "-untrusted", str(pki.PkiLayout(cli_pki).device_cert), str(files.cert),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        v_out, v_err = await verify.communicate()
        assert verify.returncode == 0, v_out + v_err
        renew = ["enroll", "--renew", "--endpoint", f"127.0.0.1:{port}", "--out", str(out_dir)]
        code, out, err = await _run(*renew)
        assert code == 0, err
        assert "renewed cam-quick" in out
        code, out, err = await _run("pki", "revoke", "--dir", d, "--device-id", "cam-quick")
        assert code == 0, err
        code, out, err = await _run(*renew)
        assert code == 3
        assert "revoked" in err
        assert "Traceback" not in err
    finally:
        core.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await core.wait() == 0


def test_gateway_certificates_are_recorded_and_revoked_from_the_cli(
    cli_pki: Path, tmp_path: Path
) -> None:
    d = str(cli_pki)
    serials: list[str] = []
    for n in (1, 2):
        out_dir = tmp_path / f"gw-rev-{n}"
        code, out, err = cli(
            "pki", "issue-server", "--dir", d, "--id", "gw-rev", "--role", "gateway",
            "--ip", "127.0.0.1", "--out", str(out_dir),
        )  # fmt: skip
        assert code == 0, err
        serials.append(pki.serial_hex(pki.IdentityFiles(out_dir).certificate().serial_number))
    code, _, err = cli("pki", "issue-server", "--dir", d, "--id", "core-rev", "--role", "core")
    assert code == 0, err
    core_files = pki.IdentityFiles(pki.PkiLayout(cli_pki).servers / "core-core-rev")
    core_serial = pki.serial_hex(core_files.certificate().serial_number)

    code, out, _ = cli("pki", "list", "--dir", d)
    assert code == 0
    assert all(s in out for s in [*serials, core_serial])
    assert "gateway/gw-rev" in out
    assert "core/core-rev" in out

    code, out, err = cli("pki", "revoke", "--dir", d, "--serial", core_serial)
    assert code == 0, err
    assert f"certificate {core_serial} of core core-rev" in out
    code, out, err = cli("pki", "revoke", "--dir", d, "--gateway-id", "gw-rev", "--reason", "lost")
    assert code == 0, err
    assert all(f"certificate {s} of gateway gw-rev" in out for s in serials)
    code, out, _ = cli("pki", "revoke", "--dir", d, "--gateway-id", "gw-rev")
    assert code == 0
    assert "already revoked" in out
    code, _, err = cli("pki", "revoke", "--dir", d, "--gateway-id", "gw-nobody")
    assert code == 1
    assert "no certificate of gateway gw-nobody" in err
    code, _, err = cli("pki", "revoke", "--dir", d, "--gateway-id", "gw-rev", "--serial", "ab")
    assert code == 2
    assert cli("pki", "revoke", "--dir", d, "--gateway-id", "gw+rev")[0] == 2

    out_file = tmp_path / "crl.pem"
    code, _, err = cli("pki", "crl", "--dir", d, "--out", str(out_file))
    assert code == 0, err
    crl = x509.load_pem_x509_crl(out_file.read_bytes())
    for serial in [*serials, core_serial]:
        assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
