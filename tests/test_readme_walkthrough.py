"""README.md's "Try it by hand" runs as written and does what it says.

The commands are read from the README's fenced block (so the README cannot drift from what is
tested) and run one by one in one shell, as a person types them: the same shell keeps the
variables and the directory the walk-through sets. Only the ports are moved to free ones
(7443/7444 the core's pair, 7500/7501 the gateway's gRPC/MQTT pair), the virtual environment
is the one running the tests, and ``mktemp -d`` creates its scratch directory in ``tmp_path``.
Where a person would wait for a background service to come up, the test waits for the line
that says so, with a bound generous for a loaded two-core machine.

It checks what the walk-through promises: enrolment, detections over gRPC, an escalation
answered by the core, a detection over MQTT with the standard clients and the device's
identity, and the device cut off by ``edgeward pki revoke``; and that none of the directories
it creates shadows one of our packages for ``python -c`` in the scratch directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT, require_tool

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
#: What the walk-through's background services print once a person can go on.
READY = {
    "core run": "serving trust domain",
    "gateway run": "announced to the core",
}
#: Bound on each wait: a command, a service coming up, an event appearing in a log.
STEP_BOUND_S = 120.0
PACKAGES = {"pki", "gateway", "device_sdk", "protos", "edgeward", "models", "tests"}


def walkthrough_lines(readme: str) -> list[str]:
    """The commands of the first ``sh`` block under "## Try it by hand"."""
    section = readme.split("## Try it by hand", 1)[1]
    block = re.search(r"```sh\n(.*?)\n```", section, re.DOTALL)
    assert block is not None, "no sh block in 'Try it by hand'"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _strip_comment(line: str) -> str:
    # Comments follow two or more spaces (or one before '#'), never inside the quoted values.
    return re.sub(r"\s+#\s.*$", "", line).rstrip()


def _free_pair() -> int:
    """A port p with p + 1 free too."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of ports")


def _move_ports(line: str, ports: dict[int, int]) -> str:
    return re.sub(r"\b(7443|7444|7500|7501)\b", lambda m: str(ports[int(m.group(1))]), line)


def _wait_for(path: Path, pattern: str, *, bound_s: float = STEP_BOUND_S) -> str:
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if re.search(pattern, text, re.MULTILINE):
            return text
        time.sleep(0.1)
    text = path.read_text(errors="replace") if path.exists() else "(no output)"
    raise AssertionError(f"{pattern!r} not seen in {path.name} within {bound_s:.0f} s:\n{text}")


@dataclass
class Shell:
    """One bash reading the walk-through's commands, as a terminal would."""

    logs: Path
    env: dict[str, str]
    proc: subprocess.Popen[str] = field(init=False)
    background: list[tuple[int, str]] = field(default_factory=list)
    n: int = 0

    def __post_init__(self) -> None:
        self.logs.mkdir()
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            stdin=subprocess.PIPE,
            cwd=ROOT,
            env=self.env,
            text=True,
            start_new_session=True,
        )

    def _send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def run(self, command: str) -> tuple[int, str]:
        """Run ``command`` in the foreground; its exit status and output."""
        self.n += 1
        log, rc = self.logs / f"{self.n}.log", self.logs / f"{self.n}.rc"
        self._send(
            f"{{ {command}\n}} > {log} 2>&1 < /dev/null; echo $? > {rc}.tmp; mv {rc}.tmp {rc}"
        )
        _wait_for(rc, r"^\d+$", bound_s=STEP_BOUND_S)
        return int(rc.read_text()), log.read_text(errors="replace")

    def start(self, command: str) -> Path:
        """Start ``command`` (a simple command, no pipe) in the background; its log."""
        assert "|" not in command, command
        assert "&&" not in command, command
        self.n += 1
        log, pid = self.logs / f"{self.n}.log", self.logs / f"{self.n}.pid"
        self._send(f"{command} > {log} 2>&1 < /dev/null & echo $! > {pid}.tmp; mv {pid}.tmp {pid}")
        _wait_for(pid, r"^\d+$")
        self.background.append((int(pid.read_text()), command))
        return log

    def exited(self, log: Path) -> int | None:
        """Exit status of the background command writing ``log`` (None: still running)."""
        number = int(log.stem)
        self._send(
            f"wait $(cat {self.logs}/{number}.pid); echo $? > {self.logs}/{number}.exit.tmp; "
            f"mv {self.logs}/{number}.exit.tmp {self.logs}/{number}.exit"
        )
        path = self.logs / f"{number}.exit"
        _wait_for(path, r"^\d+$")
        return int(path.read_text())

    def close(self) -> None:
        # Services first, newest first (the gateway before its core), each by its own pid.
        for pid, _ in reversed(self.background):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 30
        stuck = [c for p, c in self.background if not _gone(p, deadline)]
        for pid, _ in self.background:
            if not _gone(pid, 0):
                os.kill(pid, signal.SIGKILL)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        assert stuck == [], f"did not stop on SIGTERM: {stuck}"


def _gone(pid: int, deadline: float) -> bool:
    """Whether ``pid`` has exited (a zombie counts) by ``deadline``."""
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def test_the_walkthrough_names_no_directory_after_a_package() -> None:
    """``python -c`` puts the current directory first on sys.path: a ``./pki`` there would be
    imported instead of the ``pki`` package."""
    made = set()
    for line in walkthrough_lines(README.read_text()):
        made |= set(re.findall(r"--(?:dir|out|identity|pki-dir)\s+\./([\w.-]+)", line))
    assert made >= {"trust", "id-gw-seoul", "id-cam-1"}
    assert not made & PACKAGES


def test_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    for tool in ("mosquitto", "mosquitto_pub", "mosquitto_sub", "openssl"):
        require_tool(tool)
    lines = walkthrough_lines(README.read_text())
    assert lines[0].startswith(". .venv/bin/activate"), lines[0]
    core, gw = _free_pair(), _free_pair()
    ports = {7443: core, 7444: core + 1, 7500: gw, 7501: gw + 1}
    scratch_root = tmp_path / "scratch"
    scratch_root.mkdir()
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}:/usr/sbin",
        "PYTHONPATH": str(ROOT),
        "TMPDIR": str(scratch_root),
        # Not part of the walk-through: the default metrics port may be taken on a shared
        # test machine.
        "EDGEWARD_GATEWAY_METRICS_LISTEN": "127.0.0.1:0",
    }
    env.pop("EDGEWARD_ENROLL_TOKEN", None)
    shell = Shell(tmp_path / "logs", env)
    outputs: dict[str, str] = {}
    services: dict[str, Path] = {}
    try:
        for raw in lines[1:]:
            command = _move_ports(_strip_comment(raw), ports)
            if command.endswith("&"):
                command = command[:-1].rstrip()
                log = shell.start(command)
                kind = next((k for k in READY if f"edgeward {k}" in command), None)
                if kind is not None:
                    _wait_for(log, READY[kind])
                    services[kind] = log
                else:
                    # A background device: as a person would, watch it get answers first.
                    _wait_for(log, r"^\d\d:\d\d:\d\d (?!started|gateway)\S+ +\S")
                    services["device"] = log
                continue
            code, out = shell.run(command)
            assert code == 0, f"{raw}\n-> exit {code}:\n{out}"
            outputs[raw] = out
        device_log = services["device"]
        # Revoked: the background device stops for good, exit status 3.
        _wait_for(device_log, r"DeviceRevoked")
        assert shell.exited(device_log) == 3
        # An escalation reached the core, which answered it, and the answer came back to the
        # gateway (which hands it to the device, on Subscribe or devices/<id>/events).
        _wait_for(services["core run"], r'"event": "escalation answered"')
        _wait_for(services["gateway run"], r'"attempts": \d+, .*"event": "escalation answered"')
    finally:
        shell.close()

    text = "\n".join(outputs.values())
    assert "enrolled cam-1 (pet_camera, region kr-seoul)" in text
    assert "id-cam-1/cert.pem: OK" in text
    simulate = next(out for raw, out in outputs.items() if "device simulate" in raw)
    detections = re.findall(r"^\d\d:\d\d:\d\d gw-seoul +(.+)$", simulate, re.MULTILINE)
    assert detections, simulate
    assert any("escalated:" in d for d in detections), simulate
    # Over MQTT, with mosquitto_sub and the device's own identity: the detection as JSON.
    mqtt = next(out for raw, out in outputs.items() if "mosquitto_sub" in raw and "-C 1" in raw)
    result = json.loads(mqtt.strip().splitlines()[-1])
    assert result["gatewayId"] == "gw-seoul"
    assert any(d["label"] == "Cat" for d in result["detections"]), result
    assert "CRLs with 1 device and 0 gateway/core certificate(s)" in text
    # The token went through a file: it never reached a command line or any output.
    (scratch,) = (d for d in scratch_root.iterdir() if (d / "trust").is_dir())
    token = (scratch / "cam-1.token").read_text().strip()
    assert token.startswith("cam-1.")
    for log in (tmp_path / "logs").glob("*.log"):
        assert token not in log.read_text(errors="replace"), log.name
    # Nothing the walk-through made shadows our packages in its directory.
    check = subprocess.run(
        [sys.executable, "-c", "import device_sdk, gateway, pki, edgeward"],
        cwd=scratch,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert check.returncode == 0, check.stderr
