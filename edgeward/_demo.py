"""``edgeward demo``: the whole system on one machine, with live output.

What it does, with the real commands (each is a subprocess you could type yourself):

1. ``edgeward pki init`` in a temporary (or ``--dir``) directory, then
   ``edgeward pki issue-server`` for two gateways (``kr-seoul``, ``us-nyc``);
2. writes one TOML file per service and starts ``edgeward core run`` and two
   ``edgeward gateway run`` (each with its supervised Mosquitto), all on loopback ports;
3. ``edgeward pki token`` + ``edgeward enroll`` for a pet camera and a robot vacuum;
4. runs both devices (the ``edgeward device simulate`` simulator, in this process so the
   view can follow them): the pet camera over gRPC, the robot vacuum over MQTT;
5. kills the pet camera's nearest gateway (SIGKILL) and restarts it: failover and return;
6. ``edgeward pki revoke`` on the pet camera: it is cut off with a final ``DeviceRevoked``;
7. prints a summary and stops everything it started (process groups; Ctrl-C included).

The timeline is paced by ``--duration`` but driven by events: each step waits for the outcome
of the one before (failover before the restart, the return before the revocation, the cut
before the end), each up to :data:`EVENT_BOUND_S`, so a slow machine makes the demo longer
rather than its outcomes "not observed".

:class:`~edgeward._stack.DemoStack` is the orchestration without the view (the SDK tests and
the benchmark use it to run real gateways as processes they can kill); this module adds the
timeline, the live view and the summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgeward._stack import (
    DEMO_DEVICES,
    DEMO_GATEWAYS,
    DemoStack,
    GatewayPlan,
    ServiceProcess,
    edgeward_command,
    free_port,
    toml_text,
)

__all__ = [
    "DEMO_DEVICES",
    "DEMO_GATEWAYS",
    "DemoStack",
    "GatewayPlan",
    "ServiceProcess",
    "demo",
    "edgeward_command",
    "free_port",
    "run_demo",
    "toml_text",
]


# -- the demo itself -------------------------------------------------------------------------

#: How long the demo waits for each event of its timeline (failover, return, revocation cut)
#: before it notes the event as not observed and goes on.
EVENT_BOUND_S = 90.0


@dataclasses.dataclass
class DeviceView:
    device_id: str
    kind: str
    transport: str
    region: str
    gateway: str | None = None
    sent: int = 0
    answered: int = 0
    cache_hits: int = 0
    escalated: int = 0
    answers: int = 0
    last: str = ""
    state: str = "starting"


class DemoView:
    """What the demo has seen; rendered live with rich, or printed line by line."""

    def __init__(self, *, live: bool, out: Callable[[str], None]) -> None:
        self.live = live
        self.out = out
        self.devices: dict[str, DeviceView] = {}
        self.gateways: dict[str, str] = {}
        self.log: deque[str] = deque(maxlen=12)
        self.phase = "starting"
        #: The console's URL and one-time login link, once the core runs.
        self.console = ""
        self.t0 = time.monotonic()
        self.marks: dict[str, float] = {}
        self.facts: dict[str, Any] = {}
        # Set on every note (each fact is noted as it is recorded); waiters clear it.
        self.noted = asyncio.Event()

    def note(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {text}"
        self.log.append(line)
        self.noted.set()
        if not self.live:
            self.out(line)

    def device_event(self, device_id: str, kind: str, data: dict[str, Any]) -> None:
        view = self.devices[device_id]
        if kind == "started":
            view.state = "running"
            self.note(f"{device_id} started via {data['gateway']} ({view.transport})")
        elif kind == "gateway":
            view.gateway = data["gateway"]
            if data["previous"] is not None or data["gateway"] is None:
                self.note(
                    f"{device_id}: gateway {data['previous']} -> "
                    f"{data['gateway'] or 'none (frames queue on disk)'}"
                )
            else:
                self.note(f"{device_id} chose gateway {data['gateway']}")
        elif kind == "detection":
            view.answered += 1
            view.gateway = data["gateway"]
            view.cache_hits += int(data["cache"])
            view.escalated += len(data["escalated"])
            view.last = ", ".join(data["labels"][:3]) or "nothing"
            if (
                "killed_at" in self.marks
                and "failover_s" not in self.facts
                and device_id == self.facts.get("failover_device")
                and data["gateway"] != self.facts.get("killed")
            ):
                self.facts["failover_s"] = time.monotonic() - self.marks["killed_at"]
                self.note(
                    f"{device_id} answered by {data['gateway']} "
                    f"{self.facts['failover_s']:.2f} s after the kill"
                )
            if (
                "restarted_at" in self.marks
                and "return_s" not in self.facts
                and data["gateway"] == self.facts.get("killed")
                and device_id == self.facts.get("failover_device")
            ):
                self.facts["return_s"] = time.monotonic() - self.marks["restarted_at"]
                self.note(
                    f"{device_id} back on {data['gateway']} "
                    f"{self.facts['return_s']:.2f} s after its restart"
                )
            if view.answered <= 2 or data["escalated"]:
                cache = " (cache hit)" if data["cache"] else ""
                esc = f"; escalated {', '.join(data['escalated'])}" if data["escalated"] else ""
                self.note(
                    f"{device_id} [{data['transport']} via {data['gateway']}] detection: "
                    f"{view.last}{cache}{esc}"
                )
        elif kind == "answer":
            view.answers += 1
            self.note(
                f"{device_id} escalation answer: edge said {data['edge']}, core says "
                f"{data['core']} ({data['model']})"
            )
        elif kind == "rejected":
            self.note(f"{device_id} frame rejected: {data['code']} {data['reason']}")
        elif kind == "final":
            view.state = data["error"]
            if "revoked_at" in self.marks and data["error"] == "DeviceRevoked":
                self.facts["revocation_cut_s"] = time.monotonic() - self.marks["revoked_at"]
                self.note(
                    f"{device_id} cut off: DeviceRevoked "
                    f"{self.facts['revocation_cut_s'] * 1000:.0f} ms after 'edgeward pki revoke' "
                    "started"
                )
            else:
                self.note(f"{device_id} stopped: {data['error']}: {data['message']}")

    def render(self) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        devices = Table(title="devices", expand=True)
        for col in ("device", "via", "gateway", "sent", "answered", "cache", "escal.",
                    "answers", "state"):  # fmt: skip
            devices.add_column(col, no_wrap=True)
        devices.add_column("last detection", no_wrap=True, overflow="ellipsis", ratio=1)
        for v in self.devices.values():
            devices.add_row(
                v.device_id, v.transport, v.gateway or "-", str(v.sent), str(v.answered),
                str(v.cache_hits), str(v.escalated), str(v.answers), v.state, v.last,
            )  # fmt: skip
        gateways = Table(title="gateways", expand=True)
        gateways.add_column("gateway", no_wrap=True)
        gateways.add_column("status")
        for gid, status in self.gateways.items():
            gateways.add_row(gid, status)
        head = f"phase: {self.phase}" + (f"\n{self.console}" if self.console else "")
        return Group(
            Panel(Text(head), title="edgeward demo"),
            gateways,
            devices,
            # Text, not markup: event lines contain brackets.
            Panel(Text("\n".join(self.log)), title="events"),
        )


async def run_demo(
    root: Path,
    *,
    duration_s: float,
    live: bool,
    out: Callable[[str], None],
    rate: float = 4.0,
) -> dict[str, Any]:
    """Run the demo in ``root``; return its summary."""
    from edgeward._cli_device import Simulator

    view = DemoView(live=live, out=out)
    stack = DemoStack(root)
    live_ctx: Any = contextlib.nullcontext()
    if live:
        from rich.live import Live

        live_ctx = Live(view.render(), refresh_per_second=4, transient=False)
    summary: dict[str, Any] = {}
    with live_ctx as live_display:

        async def refresher() -> None:
            while live_display is not None:
                live_display.update(view.render())
                await asyncio.sleep(0.25)

        async with asyncio.TaskGroup() as tg:
            refresh = tg.create_task(refresher()) if live else None
            try:
                summary = await _demo_steps(stack, view, duration_s=duration_s, rate=rate,
                                            simulator=Simulator)  # fmt: skip
            finally:
                view.phase = "stopping services"
                await asyncio.to_thread(stack.stop_all)
                left = stack.leftovers()
                view.note("all services stopped" if not left else f"still running: {left}")
                summary["left_running"] = left
                if refresh is not None:
                    refresh.cancel()
    return summary


async def _demo_steps(
    stack: DemoStack, view: DemoView, *, duration_s: float, rate: float, simulator: Any
) -> dict[str, Any]:
    view.phase = "creating the PKI and service configurations"
    view.note(f"edgeward pki init --trust-domain {stack.trust_domain} (in {stack.root})")
    await stack.setup()
    if not stack.mqtt:
        view.note("the MQTT bridge is not available in this build: the vacuum uses gRPC")
    if not stack.escalation:
        view.note("escalation is not available in this build: edge answers only")
    view.phase = "starting core and gateways"
    await stack.start_core()
    view.note(f"core running: enrolment {stack.enrol_address}, mTLS {stack.core_address}")
    for gid in stack.plans:
        view.gateways[gid] = "starting"
    await asyncio.gather(*(stack.start_gateway(gid) for gid in stack.plans))
    for gid, plan in stack.plans.items():
        view.gateways[gid] = f"up: gRPC {plan.grpc_address}" + (
            f", MQTT {plan.mqtt_address}" if plan.mqtt else ""
        )
        view.note(f"gateway {gid} ({plan.region}) running")
    token = await stack.operator_token()
    view.console = (
        f"console: {stack.console_url} (runs while the demo does)\n"
        f"one-time login link: {stack.login_link(token)}"
    )
    if not view.live:
        for line in view.console.splitlines():
            view.out(line)

    view.phase = "enrolling devices"
    sims: dict[str, Any] = {}
    for device_id, device_type, region, wanted in DEMO_DEVICES:
        transport = "grpc" if wanted == "mqtt" and not stack.mqtt else wanted
        identity = await stack.enrol(device_id, device_type=device_type, region=region)
        view.note(f"{device_id} enrolled with a one-time token ({device_type}, {region})")
        view.devices[device_id] = DeviceView(device_id, device_type, transport, region)

        def sink(kind_: str, data: dict[str, Any], _d: str = device_id) -> None:
            # "sent" is read when an outcome is shown, not only by the counters task: a
            # frame is counted as sent before its answer can arrive, so answered <= sent.
            view.devices[_d].sent = sims[_d].report.submitted
            view.device_event(_d, kind_, data)

        sims[device_id] = simulator(
            identity,
            kind=device_type,
            rate=rate,
            transport=transport,
            duration_s=None,  # stopped after the timeline, however long it took
            on_event=sink,
            probe_interval_s=0.5,
            telemetry_every_s=2.0,
        )

    view.phase = "streaming frames"
    pet = DEMO_DEVICES[0][0]
    nearest = DEMO_DEVICES[0][2]
    async with asyncio.TaskGroup() as tg:
        runs = {d: tg.create_task(s.run()) for d, s in sims.items()}

        async def counters() -> None:
            while not all(r.done() for r in runs.values()):
                for d, s in sims.items():
                    view.devices[d].sent = s.report.submitted
                await asyncio.sleep(0.2)

        tg.create_task(counters())
        t0 = time.monotonic()

        async def at(fraction: float) -> None:
            await asyncio.sleep(max(t0 + duration_s * fraction - time.monotonic(), 0))

        async def until(fact: str, what: str) -> None:
            """Wait for ``fact`` in the view (up to EVENT_BOUND_S), or note its absence."""
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EVENT_BOUND_S):
                    while fact not in view.facts:
                        view.noted.clear()
                        await view.noted.wait()
            if fact not in view.facts:
                view.note(f"{what}: not observed within {EVENT_BOUND_S:.0f} s")

        await at(0.3)
        # Kill the gateway the camera uses now (its nearest, unless it already moved).
        nearest = view.devices[pet].gateway or nearest
        view.phase = f"failover: gateway {nearest} killed"
        view.facts.update(killed=nearest, failover_device=pet)
        view.marks["killed_at"] = time.monotonic()
        await asyncio.to_thread(stack.kill_gateway, nearest)
        view.gateways[nearest] = "DOWN (killed with SIGKILL)"
        view.note(f"gateway {nearest} killed (SIGKILL): its devices must fail over")
        await until("failover_s", f"{pet} failover")
        await at(0.45)
        view.phase = f"restarting {nearest}"
        await stack.start_gateway(nearest)
        view.marks["restarted_at"] = time.monotonic()
        view.gateways[nearest] = "up again"
        view.note(f"gateway {nearest} restarted: devices come back to the nearest")
        await until("return_s", f"{pet} back on {nearest}")
        await at(0.7)
        view.phase = f"revoking {pet}"
        view.note(f"edgeward pki revoke --device-id {pet}")
        # Timed from the start of the command: the figure includes its own start-up.
        view.marks["revoked_at"] = time.monotonic()
        await stack.revoke(pet, "demo: camera reported stolen")
        view.phase = "streaming frames (after the revocation)"
        await until("revocation_cut_s", f"{pet} cut off")
        await at(1.0)
        for sim in sims.values():
            sim.stop()
    view.phase = "done"
    reports = {d: r.result().as_dict() for d, r in runs.items()}
    lost = {
        d: r["submitted"] - r["answered"] - r["rejected"]
        for d, r in reports.items()
        if r["final_error_type"] is None
    }
    return {
        "devices": reports,
        "failover_s": view.facts.get("failover_s"),
        "return_s": view.facts.get("return_s"),
        "revocation_cut_s": view.facts.get("revocation_cut_s"),
        "unanswered_frames": lost,
        "mqtt": stack.mqtt,
        "escalation": stack.escalation,
    }


def _print_summary(summary: dict[str, Any], out: Callable[[str], None]) -> None:
    out("")
    out("summary")
    for d, r in summary.get("devices", {}).items():
        gws = ", ".join(f"{g}: {n}" for g, n in r["gateways"].items()) or "-"
        out(
            f"  {d} ({r['transport']}): {r['submitted']} frames sent, {r['answered']} answered "
            f"[{gws}], {r['cache_hits']} cache hits, {r['escalated']} escalated, "
            f"{r['answers']} escalation answers, {r['telemetry']} telemetry reports"
            + (f"; stopped by {r['final_error_type']}" if r["final_error_type"] else "")
        )
        if r["answers"]:
            counts = r["answers_per_escalation"].values()
            once = sum(n == 1 for n in counts)
            out(
                f"    answers per escalation id: {r['escalations_answered']} ids, "
                + (
                    "each delivered once"
                    if once == len(counts)
                    else f"{once} delivered once, {len(counts) - once} more than once "
                    f"(up to {max(counts)} times)"
                )
            )
        if r["labels"]:
            out("    seen: " + ", ".join(f"{k} ×{v}" for k, v in r["labels"].items()))
    fo, ret, cut = (
        summary.get("failover_s"),
        summary.get("return_s"),
        summary.get("revocation_cut_s"),
    )
    out(f"  failover after the kill: {f'{fo:.2f} s' if fo is not None else 'not observed'}")
    out(f"  back on the nearest gateway: {f'{ret:.2f} s' if ret is not None else 'not observed'}")
    out(
        "  revocation: "
        + (
            f"device cut off {cut * 1000:.0f} ms after 'edgeward pki revoke' started "
            "(the command's own start-up included)"
            if cut is not None
            else "not observed"
        )
    )
    lost = sum(summary.get("unanswered_frames", {}).values())
    out(f"  frames lost by devices still running: {lost}")
    left = summary.get("left_running", [])
    out(f"  services still running: {', '.join(left) if left else 'none'}")


@click.command("demo")
@click.option(
    "--dir",
    "root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="where to put the PKI, configs and logs (default: a temporary directory, removed after)",
)
@click.option("--duration", default=40.0, show_default=True, help="seconds of streaming")
@click.option("--no-live", is_flag=True, help="print events line by line instead of a live view")
@click.option("--json-summary", is_flag=True, help="print the summary as one JSON line too")
def demo(root: Path | None, duration: float, no_live: bool, json_summary: bool) -> None:
    """PKI, core, two regional gateways, two devices, failover and revocation, live."""
    from edgeward._logging import configure_logging

    if duration < 10:
        raise click.BadParameter("at least 10 seconds", param_hint="--duration")
    # The services log to their own files; here only errors would spoil the view.
    configure_logging(level="error", json=False)
    live = not no_live and sys.stdout.isatty()
    temp = root is None
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="edgeward-demo-"))
    elif root.exists() and any(root.iterdir()):
        raise click.ClickException(f"{root} is not empty; give a new or empty --dir")
    click.echo(f"edgeward demo in {root} (Ctrl-C stops it; everything it started stops with it)")
    summary: dict[str, Any] = {}
    interrupted = failed = False

    async def main() -> dict[str, Any]:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await run_demo(root, duration_s=duration, live=live, out=click.echo)

    try:
        summary = asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        interrupted = True
        click.echo("interrupted: every service was stopped", err=True)
    except Exception as exc:  # noqa: BLE001 - one readable line per cause, then exit 1
        failed = True
        for leaf in _leaves(exc):
            click.echo(f"demo failed: {type(leaf).__name__}: {leaf}", err=True)
        click.echo(f"logs are in {root / 'logs'}", err=True)
    finally:
        if temp and not failed:
            shutil.rmtree(root, ignore_errors=True)
    if failed:
        sys.exit(1)
    if summary:
        _print_summary(summary, click.echo)
        if json_summary:
            click.echo(json.dumps({"summary": summary}, default=str))
        if not temp:
            click.echo(f"PKI, configs and logs kept in {root}")
    if interrupted:
        sys.exit(130)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The individual errors inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
