"""The command line lists every command of the contract and the wire contract is current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from edgeward.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("pki", "enroll", "device", "core", "gateway", "demo"):
        assert name in result.output


def test_unknown_command_fails() -> None:
    result = CliRunner().invoke(main, ["no-such-command"])
    assert result.exit_code != 0


def test_generated_protobuf_code_is_current() -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_protos.sh"), "--check"],
        env={"PYTHON": sys.executable, "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
