"""Run edgeward's services as real processes on loopback ports: PKI, core, gateways.

:class:`DemoStack` is what ``edgeward demo`` orchestrates, and what the SDK tests and the SDK
benchmark use to run gateways they can kill with SIGKILL. Every step is a real ``edgeward``
command run as a subprocess (logged in ``root/commands.log``); every service runs in its own
process group with its log in ``root/logs/<name>.log`` and its configuration, generated as
TOML, in ``root/config``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from gateway import MODELS_NOT_FOUND_HINT, find_models_dir, free_port

__all__ = [
    "DEMO_DEVICES",
    "DEMO_GATEWAYS",
    "DemoStack",
    "GatewayPlan",
    "ServiceProcess",
    "edgeward_command",
    "free_port",
    "toml_text",
    "wait_port",
]

TRUST_DOMAIN = "demo.example"
#: (gateway id, region) of the demo's gateways, nearest first for a device of that region.
DEMO_GATEWAYS: tuple[tuple[str, str], ...] = (("kr-seoul", "kr-seoul"), ("us-nyc", "us-nyc"))
#: (device id, device type, region, transport). The type is the registry's and the
#: simulator's ``--kind`` alike; the gateways' default authorisation table lists both types.
DEMO_DEVICES: tuple[tuple[str, str, str, str], ...] = (
    ("pet-camera-1", "pet_camera", "kr-seoul", "grpc"),
    ("robot-vacuum-1", "robot_vacuum", "us-nyc", "mqtt"),
)


# -- small helpers ---------------------------------------------------------------------------


def edgeward_command() -> list[str]:
    """How to run the ``edgeward`` command of this installation."""
    script = Path(sys.executable).with_name("edgeward")
    if script.exists():
        return [str(script)]
    found = shutil.which("edgeward")
    if found:
        return [found]
    return [sys.executable, "-c", "from edgeward.cli import main; main()"]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def toml_text(data: Mapping[str, Any], _prefix: str = "") -> str:
    """A small TOML writer for the configuration files the demo generates.

    Scalars first, then tables (``[a.b]``) and arrays of tables (``[[a]]``), which is all the
    service configurations need.
    """
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, Sequence[Mapping[str, Any]]]] = []
    for key, value in data.items():
        name = f"{_prefix}.{key}" if _prefix else key
        if isinstance(value, Mapping):
            tables.append((name, value))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            arrays.append((name, value))
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for name, table in tables:
        out += f"\n[{name}]\n" + toml_text(table, name)
    for name, items in arrays:
        for item in items:
            out += f"\n[[{name}]]\n" + toml_text(item, name)
    return out


class ServiceProcess:
    """A service subprocess in its own process group, with its output in a log file.

    Its own group (a new session) lets :meth:`stop` and :meth:`kill` reach the children too
    (the gateway's Mosquitto), and keeps Ctrl-C in the terminal from hitting it twice.
    """

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: TextIO | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("a")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def descendants(self) -> list[int]:
        """Process ids of every live descendant (children that started their own session,
        like a supervised broker, included)."""
        if self.proc is None:
            return []
        return _descendants(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL the whole group now (a crash, as far as clients can tell).

        A child in a session of its own (the gateway's Mosquitto) would survive the group
        kill as an orphan holding its port, so it is killed too: found before the parent
        dies, while it is still the parent's child.
        """
        children = self.descendants()
        self._signal_group(signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self._close_log()

    def stop(self, timeout: float = 8.0) -> None:
        """SIGTERM the group, wait, then SIGKILL whatever is left (descendants included)."""
        if self.proc is None:
            return
        children = self.descendants()
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        # Children may outlive a parent that exited: clear the group and every descendant.
        self._signal_group(signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _descendants(root: int) -> list[int]:
    """Live descendants of ``root`` from /proc (Linux), children first."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after it.
        fields = stat[stat.rfind(")") + 2 :].split()
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


async def wait_port(port: int, *, timeout_s: float, process: ServiceProcess | None = None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.proc is not None and not process.alive:
            raise RuntimeError(
                f"{process.name} exited with {process.proc.returncode}:\n{process.tail()}"
            )
        try:
            _reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), 1.0
            )
        except (OSError, TimeoutError):
            if time.monotonic() > deadline:
                name = process.name if process else f"port {port}"
                tail = process.tail() if process else ""
                raise RuntimeError(
                    f"{name} did not start within {timeout_s:.0f} s\n{tail}"
                ) from None
            await asyncio.sleep(0.1)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


@dataclasses.dataclass
class GatewayPlan:
    """Where one demo gateway listens."""

    gateway_id: str
    region: str
    grpc_port: int
    metrics_port: int
    mqtt_port: int
    bridge_port: int
    mqtt: bool = True
    console_port: int = 0

    @property
    def console_url(self) -> str:
        return f"https://127.0.0.1:{self.console_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def mqtt_address(self) -> str:
        return f"127.0.0.1:{self.mqtt_port}" if self.mqtt else ""


def _component_available(module: str) -> bool:
    """Whether an optional gateway component offers its plug-in entry (``plugin``)."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        return False
    return callable(getattr(mod, "plugin", None))


class DemoStack:
    """PKI, core and gateways as real ``edgeward`` processes on loopback ports.

    Every command it runs is logged in ``root/commands.log``; every service writes to
    ``root/logs/<name>.log``; configurations are in ``root/config``.
    """

    def __init__(
        self,
        root: Path,
        *,
        gateways: Sequence[tuple[str, str]] = DEMO_GATEWAYS,
        trust_domain: str = TRUST_DOMAIN,
        mqtt: bool | None = None,
        escalation: bool | None = None,
        cache: bool = True,
        log_level: str = "info",
        standalone: bool = False,
        gateway_overrides: Mapping[str, Any] | None = None,
        models_dir: Path | None = None,
    ) -> None:
        self.root = Path(root)
        # Written into the configurations only when given: by default each service finds the
        # models itself (the installed edgeward-models package, or models/ in a checkout), as
        # the docker-compose configurations do. Checked against the manifest either way.
        self.models_dir = models_dir
        self.gateway_overrides = dict(gateway_overrides or {})
        self.trust_domain = trust_domain
        self.pki_dir = self.root / "pki"
        self.config_dir = self.root / "config"
        self.log_dir = self.root / "logs"
        self.devices_dir = self.root / "devices"
        self.mqtt = _component_available("gateway._mqtt") if mqtt is None else mqtt
        self.escalation = (
            _component_available("gateway._escalation") if escalation is None else escalation
        )
        self.cache = cache
        self.log_level = log_level
        self.standalone = standalone
        self.core_port = free_port()
        self.enrol_port = free_port()
        self.core_metrics_port = free_port()
        self.core_console_port = free_port()
        self.plans = {
            gid: GatewayPlan(
                gid, region, free_port(), free_port(), free_port(), free_port(), mqtt=self.mqtt,
                console_port=free_port(),
            )
            for gid, region in gateways
        }  # fmt: skip
        self.core: ServiceProcess | None = None
        self.gateways: dict[str, ServiceProcess] = {}
        self._cmd = edgeward_command()

    @property
    def core_address(self) -> str:
        return f"127.0.0.1:{self.core_port}"

    @property
    def enrol_address(self) -> str:
        return f"127.0.0.1:{self.enrol_port}"

    @property
    def ca_bundle(self) -> Path:
        return self.pki_dir / "ca-bundle.pem"

    @property
    def console_url(self) -> str:
        """The core's operator console (every page needs a login)."""
        return f"https://127.0.0.1:{self.core_console_port}"

    async def operator_token(
        self, name: str = "demo-admin", role: str = "admin", ttl: str = "30m"
    ) -> str:
        """A one-time console login token (``edgeward pki operator-token``)."""
        out = await self.cli(
            "pki",
            "operator-token",
            "--dir",
            str(self.pki_dir),
            "--name",
            name,
            "--role",
            role,
            "--ttl",
            ttl,
        )
        return out.strip().splitlines()[-1]

    def login_link(self, token: str) -> str:
        """The console's login page with ``token`` in the fragment, which the browser keeps
        to itself (never sent to the server, never in a log); the page posts it."""
        return f"{self.console_url}/login#token={token}"

    async def cli(self, *args: str, timeout_s: float = 60.0, stdin: bytes | None = None) -> str:
        """Run ``edgeward ARGS`` (``stdin`` on its standard input) and return its standard
        output; raise with its output on failure."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "commands.log").open("a") as log:
            shown = ["<token>" if a.count(".") == 1 and len(a) > 40 else a for a in args]
            log.write("edgeward " + " ".join(shown) + "\n")
        proc = await asyncio.create_subprocess_exec(
            *self._cmd,
            *args,
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout_s)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(
                f"edgeward {' '.join(args[:2])} failed ({proc.returncode}): "
                f"{err.decode(errors='replace').strip() or out.decode(errors='replace')}"
            )
        return out.decode()

    # -- set-up ------------------------------------------------------------------------------

    async def setup(self) -> None:
        """PKI, gateway identities and every configuration file."""
        if self.models_dir is None and find_models_dir() is None:
            raise RuntimeError(MODELS_NOT_FOUND_HINT)
        await self.cli(
            "pki", "init", "--dir", str(self.pki_dir), "--trust-domain", self.trust_domain
        )
        await asyncio.gather(
            *(
                self.cli(
                    "pki", "issue-server", "--dir", str(self.pki_dir), "--id", gid,
                    "--role", "gateway", "--dns", "localhost", "--ip", "127.0.0.1",
                    "--out", str(self.gateway_identity(gid)),
                )
                for gid in self.plans
            )
        )  # fmt: skip
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.core_config_path.write_text(toml_text(self.core_config()))
        for gid in self.plans:
            self.gateway_config_path(gid).write_text(toml_text(self.gateway_config(gid)))

    def gateway_identity(self, gateway_id: str) -> Path:
        return self.root / "identities" / f"gateway-{gateway_id}"

    @property
    def core_config_path(self) -> Path:
        return self.config_dir / "core.toml"

    def gateway_config_path(self, gateway_id: str) -> Path:
        return self.config_dir / f"gateway-{gateway_id}.toml"

    def core_config(self) -> dict[str, Any]:
        """The core's configuration (``edgeward core run --config``)."""
        data: dict[str, Any] = {
            "pki_dir": str(self.pki_dir),
            "core_id": "core-1",
            "listen": self.core_address,
            "enrol_listen": self.enrol_address,
            "metrics_listen": f"127.0.0.1:{self.core_metrics_port}",
            "identity_dir": str(self.root / "identities" / "core-core-1"),
            "feed_heartbeat_s": 1.0,
            "shutdown_grace_s": 1.0,
            "log_level": self.log_level,
            "console_listen": f"127.0.0.1:{self.core_console_port}",
            # Live views: each gateway's own console (frames never reach the core).
            "console_gateways": {p.gateway_id: p.console_url for p in self.plans.values()},
            # Where the core reads their figures: the same addresses on one machine.
            "console_gateways_internal": {p.gateway_id: p.console_url for p in self.plans.values()},
            # Static entries of the signed directory devices receive at enrolment.
            "gateways": [
                {
                    "id": p.gateway_id,
                    "region": p.region,
                    "grpc_address": p.grpc_address,
                    "mqtt_address": p.mqtt_address,
                }
                for p in self.plans.values()
            ],
        }
        if self.escalation:
            # Core.Escalate: the larger models answer what the edge was unsure of.
            data["escalation"] = {"answer_store": str(self.root / "core-answers.sqlite3")}
            if self.models_dir is not None:
                data["escalation"]["models_dir"] = str(self.models_dir)
        return data

    def gateway_config(self, gateway_id: str) -> dict[str, Any]:
        """A gateway's configuration (``edgeward gateway run --config``)."""
        p = self.plans[gateway_id]
        data: dict[str, Any] = {
            "gateway_id": p.gateway_id,
            "region": p.region,
            "listen": p.grpc_address,
            "identity_dir": str(self.gateway_identity(gateway_id)),
            "metrics_listen": f"127.0.0.1:{p.metrics_port}",
            "console_listen": f"127.0.0.1:{p.console_port}",
            "revocation_max_staleness_s": 15.0,
            "shutdown_grace_s": 2.0,
            "log_level": self.log_level,
            "cache": {"enabled": self.cache},
        }
        if self.models_dir is not None:
            data["inference"] = {"models_dir": str(self.models_dir)}
        if self.standalone:
            data["pki_dir"] = str(self.pki_dir)
            data["revocation_poll_interval_s"] = 0.1
        else:
            data["core_address"] = self.core_address
        if self.mqtt:
            data["mqtt"] = {
                "managed": True,
                "host": "127.0.0.1",
                "port": p.mqtt_port,
                "bridge_host": "127.0.0.1",
                "bridge_port": p.bridge_port,
                "data_dir": str(self.root / "mqtt" / gateway_id),
            }
        for key, value in self.gateway_overrides.items():
            data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
        if self.escalation and not self.standalone:
            data["escalation"] = {
                "outbox_path": str(self.root / "outbox" / f"{gateway_id}.sqlite3"),
                "regions": {
                    region: {"band_low": 0.5, "band_high": 0.7}
                    for region in sorted({q.region for q in self.plans.values()})
                },
            }
        return data

    # -- services ----------------------------------------------------------------------------

    async def start_core(self, timeout_s: float = 60.0) -> None:
        self.core = ServiceProcess(
            "core",
            # The console's address as a flag too: it wins over an EDGEWARD_CORE_CONSOLE_LISTEN
            # in the environment, so the printed URL is where it listens.
            [*self._cmd, "core", "run", "--config", str(self.core_config_path),
             "--console-listen", f"127.0.0.1:{self.core_console_port}"],
            self.log_dir / "core.log",
        )  # fmt: skip
        self.core.start()
        await wait_port(self.core_port, timeout_s=timeout_s, process=self.core)
        await wait_port(self.enrol_port, timeout_s=timeout_s, process=self.core)
        await wait_port(self.core_console_port, timeout_s=timeout_s, process=self.core)

    async def start_gateway(self, gateway_id: str, timeout_s: float = 60.0) -> None:
        plan = self.plans[gateway_id]
        proc = ServiceProcess(
            gateway_id,
            [*self._cmd, "gateway", "run", "--config", str(self.gateway_config_path(gateway_id)),
             "--console-listen", f"127.0.0.1:{plan.console_port}"],
            self.log_dir / f"gateway-{gateway_id}.log",
        )  # fmt: skip
        self.gateways[gateway_id] = proc
        proc.start()
        await wait_port(plan.grpc_port, timeout_s=timeout_s, process=proc)
        await wait_port(plan.console_port, timeout_s=timeout_s, process=proc)
        if plan.mqtt:
            await wait_port(plan.mqtt_port, timeout_s=timeout_s, process=proc)

    def kill_gateway(self, gateway_id: str) -> None:
        self.gateways[gateway_id].kill()

    async def enrol(self, device_id: str, *, device_type: str, region: str) -> Path:
        """A one-time token from the PKI, then the device's own enrolment. Returns its
        identity directory."""
        token = (
            await self.cli(
                "pki", "token", "--dir", str(self.pki_dir), "--device-id", device_id,
                "--type", device_type, "--region", region, "--ttl", "1h",
            )
        ).strip().splitlines()[-1]  # fmt: skip
        out = self.devices_dir / device_id
        # On standard input: a command line is readable by every local user.
        await self.cli(
            "enroll", "--endpoint", self.enrol_address, "--ca-bundle", str(self.ca_bundle),
            "--token-file", "-", "--out", str(out), "--core-endpoint", self.core_address,
            stdin=token.encode(),
        )  # fmt: skip
        return out

    async def revoke(self, device_id: str, reason: str) -> None:
        await self.cli(
            "pki", "revoke", "--dir", str(self.pki_dir), "--device-id", device_id,
            "--reason", reason,
        )  # fmt: skip

    def stop_all(self) -> None:
        """Stop every service this stack started (gateways first, then the core)."""
        for proc in self.gateways.values():
            proc.stop()
        if self.core is not None:
            self.core.stop()

    def leftovers(self) -> list[str]:
        """Names of services still running (empty after :meth:`stop_all`)."""
        procs = [*self.gateways.values(), *([self.core] if self.core else [])]
        return [p.name for p in procs if p.alive]
