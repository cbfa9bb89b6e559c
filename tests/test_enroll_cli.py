"""``edgeward enroll`` as a device runs it against a real core: where the token comes from,
what it prints, and what a refused enrolment leaves behind.

The token is a secret until it is spent: ``--token-file`` (a path or ``-`` for stdin) and
``EDGEWARD_ENROLL_TOKEN`` keep it out of the process list; ``--token`` works but warns; no
output or error ever quotes it. A refused or failed enrolment leaves the file system as it was.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pki
from tests._support.core import RunningCore, running_core, unique_id

EDGEWARD = [sys.executable, "-c", "from edgeward.cli import main; main()"]
WARNING = "other local users"


async def _enroll(
    *args: str, env_token: str | None = None, stdin: bytes | None = None
) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGEWARD_ENROLL_TOKEN"}
    if env_token is not None:
        env["EDGEWARD_ENROLL_TOKEN"] = env_token
    proc = await asyncio.create_subprocess_exec(
        *EDGEWARD, "enroll", *args,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate(stdin or b"")
    return proc.returncode or 0, out.decode(), err.decode()


def _source_args(source: str, token: str, tmp_path: Path) -> dict[str, object]:
    """How ``source`` passes ``token``: extra argv, environment, stdin."""
    if source == "file":
        path = tmp_path / "cam.token"
        path.write_text(token + "\n")
        path.chmod(0o600)
        return {"argv": ["--token-file", str(path)]}
    if source == "stdin":
        return {"argv": ["--token-file", "-"], "stdin": (token + "\n").encode()}
    if source == "env":
        return {"argv": [], "env_token": token}
    assert source == "argv"
    return {"argv": ["--token", token]}


async def _enroll_with(
    source: str, token: str, *, core_endpoint: str, bundle: Path, out: Path, tmp_path: Path
) -> tuple[int, str, str]:
    how = _source_args(source, token, tmp_path)
    argv = ["--endpoint", core_endpoint, "--ca-bundle", str(bundle), "--out", str(out)]
    return await _enroll(
        *argv,
        *how["argv"],  # type: ignore[misc]
        env_token=how.get("env_token"),  # type: ignore[arg-type]
        stdin=how.get("stdin"),  # type: ignore[arg-type]
    )


def _bundle(core: RunningCore, tmp_path: Path) -> Path:
    path = tmp_path / "ca-bundle.pem"
    path.write_bytes(core.ca_bundle_pem)
    return path


@pytest.mark.parametrize("source", ["file", "stdin", "env", "argv"])
async def test_each_token_source_enrols_and_only_argv_warns(
    source: str, pki_dir: Path, tmp_path: Path
) -> None:
    async with running_core(pki_dir, tmp_path) as core:
        device_id = unique_id("cam")
        token = core.token(device_id)
        out = tmp_path / "identity"
        code, stdout, stderr = await _enroll_with(
            source,
            token,
            core_endpoint=core.enrol_address,
            bundle=_bundle(core, tmp_path),
            out=out,
            tmp_path=tmp_path,
        )
        assert code == 0, stderr
        assert f"enrolled {device_id}" in stdout
        assert pki.IdentityFiles(out).exists()
        assert (WARNING in stderr) is (source == "argv"), stderr
        assert token not in stdout + stderr
        assert token.split(".", 1)[1] not in stdout + stderr


@pytest.mark.parametrize("source", ["file", "stdin", "env", "argv"])
async def test_a_refused_token_is_never_quoted_and_leaves_no_directory(
    source: str, pki_dir: Path, tmp_path: Path
) -> None:
    async with running_core(pki_dir, tmp_path) as core:
        device_id = unique_id("cam")
        core.token(device_id)
        wrong = f"{device_id}.{'A' * 43}"
        out = tmp_path / "new" / "identity"
        code, stdout, stderr = await _enroll_with(
            source,
            wrong,
            core_endpoint=core.enrol_address,
            bundle=_bundle(core, tmp_path),
            out=out,
            tmp_path=tmp_path,
        )
        assert code == 1
        assert "PERMISSION_DENIED" in stderr or "refused" in stderr, stderr
        assert "Traceback" not in stderr
        assert "A" * 43 not in stdout + stderr
        assert not (tmp_path / "new").exists()
        assert (WARNING in stderr) is (source == "argv"), stderr


async def test_the_token_is_read_from_one_source_only(pki_dir: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "t"
    token_file.write_text("cam-x.secret-one\n")
    code, stdout, stderr = await _enroll(
        "--endpoint", "127.0.0.1:9", "--ca-bundle", str(token_file), "--out", str(tmp_path / "o"),
        "--token-file", str(token_file), "--token", "cam-x.secret-two",
    )  # fmt: skip
    assert code == 2
    assert "not both" in stderr
    assert "secret-one" not in stdout + stderr
    assert "secret-two" not in stdout + stderr
    code, _, stderr = await _enroll(
        "--endpoint", "127.0.0.1:9", "--ca-bundle", str(token_file), "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert code == 2
    assert "--token-file" in stderr
    assert "EDGEWARD_ENROLL_TOKEN" in stderr
    assert not (tmp_path / "o").exists()


async def test_a_missing_token_file_is_one_line_without_the_directory(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("x")
    code, _, stderr = await _enroll(
        "--endpoint", "127.0.0.1:9", "--ca-bundle", str(bundle), "--out", str(tmp_path / "o"),
        "--token-file", str(tmp_path / "absent.token"),
    )  # fmt: skip
    assert code == 2
    assert "cannot read --token-file" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "o").exists()


async def test_an_unreachable_core_leaves_the_file_system_as_it_was(
    pki_dir: Path, tmp_path: Path
) -> None:
    """No new directory (nor its missing parents); an existing directory keeps exactly what it
    held."""
    bundle = tmp_path / "ca-bundle.pem"
    bundle.write_bytes(pki.PkiLayout(pki_dir).ca_bundle.read_bytes())
    token = f"{unique_id('cam')}.{'B' * 43}"
    with_parents = tmp_path / "a" / "b" / "identity"
    code, stdout, stderr = await _enroll(
        "--endpoint", "127.0.0.1:1", "--ca-bundle", str(bundle), "--out", str(with_parents),
        "--timeout", "2", env_token=token,
    )  # fmt: skip
    assert code == 1, stderr
    assert "B" * 43 not in stdout + stderr
    assert not (tmp_path / "a").exists()

    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    (existing / "notes.txt").write_text("kept")
    before = sorted((p.name, p.stat().st_mode, p.read_bytes()) for p in existing.iterdir())
    mode = existing.stat().st_mode
    code, _, stderr = await _enroll(
        "--endpoint", "127.0.0.1:1", "--ca-bundle", str(bundle), "--out", str(existing),
        "--timeout", "2", env_token=token,
    )  # fmt: skip
    assert code == 1, stderr
    assert sorted((p.name, p.stat().st_mode, p.read_bytes()) for p in existing.iterdir()) == before
    assert existing.stat().st_mode == mode


async def test_a_refused_enrolment_through_the_library_leaves_no_directory(
    pki_dir: Path, tmp_path: Path
) -> None:
    from device_sdk import enroll
    from device_sdk.errors import DeviceSdkError

    async with running_core(pki_dir, tmp_path) as core:
        device_id = unique_id("cam")
        out = tmp_path / "lib" / "identity"
        with pytest.raises(DeviceSdkError):
            await enroll(
                endpoint=core.enrol_address,
                ca_bundle_pem=core.ca_bundle_pem,
                token=f"{device_id}.{'C' * 43}",
                out_dir=out,
            )
        assert not (tmp_path / "lib").exists()
        # The same directory is then usable for the real token.
        result = await enroll(
            endpoint=core.enrol_address,
            ca_bundle_pem=core.ca_bundle_pem,
            token=core.token(device_id),
            out_dir=out,
        )
        assert result.device_id == device_id
        assert pki.IdentityFiles(out).exists()
