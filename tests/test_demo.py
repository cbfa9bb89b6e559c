"""``edgeward demo`` end to end: real processes, real PKI, real models, real kill and revoke.

It runs the installed ``edgeward`` command exactly as the README's first command does (minus
the set-up script), with a short duration and line-by-line output.

Nothing here depends on how fast the machine is: the demo waits for each event of its timeline
(failover, return to the nearest gateway, revocation cut) up to ``EVENT_BOUND_S`` before the
next step, stretching past ``--duration`` when it must, and the test's own bound covers every
step at its bound.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from edgeward._demo import EVENT_BOUND_S
from edgeward._stack import edgeward_command
from tests.conftest import require_tool

pytestmark = pytest.mark.slow

#: Start-up (PKI, core, gateways with their brokers, enrolment) on a loaded 2-core machine,
#: plus each of the three events at its bound, plus the gateway restart and the shutdown.
DEMO_BOUND_S = 240.0 + 3 * EVENT_BOUND_S


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (the demo's directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.timeout(DEMO_BOUND_S + 60)
def test_demo_runs_and_shows_what_happens(tmp_path: Path) -> None:
    require_tool("mosquitto")
    root = tmp_path / "demo"
    proc = subprocess.run(
        [
            *edgeward_command(),
            "demo",
            "--dir",
            str(root),
            "--duration",
            "20",
            "--no-live",
            "--json-summary",
        ],
        capture_output=True,
        text=True,
        timeout=DEMO_BOUND_S,
        check=False,
    )
    out = proc.stdout
    print(out)  # shown by pytest when an assertion below fails
    assert proc.returncode == 0, out + proc.stderr
    for expected in (
        "core running",
        "gateway kr-seoul (kr-seoul) running",
        "gateway us-nyc (us-nyc) running",
        "pet-camera-1 enrolled with a one-time token",
        "robot-vacuum-1 enrolled with a one-time token",
        "pet-camera-1 chose gateway",
        "robot-vacuum-1 chose gateway",
        "detection:",
        "killed (SIGKILL)",
        "pet-camera-1 answered by",
        "pet-camera-1 back on",
        "edgeward pki revoke --device-id pet-camera-1",
        "pet-camera-1 cut off: DeviceRevoked",
        "frames lost by devices still running: 0",
        "services still running: none",
    ):
        assert expected in out, f"missing {expected!r} in:\n{out}"
    summary = json.loads(next(line for line in out.splitlines() if line.startswith('{"summary"')))[
        "summary"
    ]
    pet, vacuum = summary["devices"]["pet-camera-1"], summary["devices"]["robot-vacuum-1"]
    assert pet["final_error_type"] == "DeviceRevoked"
    assert vacuum["final_error_type"] is None
    assert vacuum["submitted"] == vacuum["answered"] > 0
    assert pet["cache_hits"] + vacuum["cache_hits"] > 0, "repeated photos come from the cache"
    if summary["mqtt"]:
        assert vacuum["transport"] == "mqtt"
    if summary["escalation"] and pet["escalated"] + vacuum["escalated"]:
        assert pet["answers"] + vacuum["answers"] > 0, "escalations get their final answers"
        assert "each delivered once" in out
    for report in (pet, vacuum):
        # Each escalation's answer reaches the device once, although the camera's gateway
        # was killed and restarted (and then handed its stored answers out again).
        assert set(report["answers_per_escalation"].values()) <= {1}, report
        assert report["answers"] == report["escalations_answered"]
    assert summary["left_running"] == []
    assert _processes_mentioning(str(root)) == []
    # Each event was observed, in order, however long the machine took.
    assert summary["failover_s"] is not None
    assert summary["return_s"] is not None
    assert summary["revocation_cut_s"] is not None
    assert "not observed" not in out
    # Devices enrol with the token on standard input, never on a command line.
    commands = (root / "commands.log").read_text()
    assert commands.count("enroll --endpoint") == 2
    assert "--token-file -" in commands
    assert " --token " not in commands


def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    require_tool("mosquitto")
    root = tmp_path / "demo"
    proc = subprocess.Popen(
        [*edgeward_command(), "demo", "--dir", str(root), "--duration", "60", "--no-live"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "started via" in line or time.monotonic() > deadline:
            break
    assert _processes_mentioning(str(root)), "services are running"
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=40)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "every service was stopped" in rest
    assert _processes_mentioning(str(root)) == []
