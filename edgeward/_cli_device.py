"""``edgeward device simulate``: a simulated pet camera or robot vacuum sending real photos.

The simulator is an ordinary :class:`device_sdk.DeviceClient` user: it loads the identity made
by ``edgeward enroll``, picks the nearest gateway, submits frames at a steady rate through the
on-disk outbox, prints each detection as it arrives, prints escalation answers, and reports
telemetry every few seconds. The demo runs the same :class:`Simulator` in its own process.

Photos: without ``--images`` it sends the photos bundled in ``device_sdk/photos`` (real photos
with their licences in ``LICENSES.md``); a pet camera sends pets and people, a robot vacuum the
closest real floor-level scenes we can redistribute (a cup, a cat, a dog).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

__all__ = ["KINDS", "Simulator", "SimulatorReport", "bundled_photos", "device"]

PHOTOS_DIR = Path(__file__).resolve().parents[1] / "device_sdk" / "photos"
#: What each kind of device looks at (bundled photos, see device_sdk/photos/LICENSES.md).
KINDS: dict[str, tuple[str, ...]] = {
    "pet_camera": ("chelsea.jpg", "dog.jpg", "person.jpg", "astronaut.jpg"),
    "robot_vacuum": ("coffee.jpg", "chelsea.jpg", "dog.jpg"),
}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}

EventSink = Callable[[str, dict[str, Any]], None]


def bundled_photos(kind: str) -> list[Path]:
    """The bundled photos a device of ``kind`` sends."""
    return [PHOTOS_DIR / name for name in KINDS[kind]]


def _load_images(kind: str, images: Path | None) -> list[tuple[str, bytes]]:
    paths = (
        sorted(p for p in images.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if images is not None
        else bundled_photos(kind)
    )
    if not paths:
        raise click.ClickException(f"no .jpg/.jpeg/.png files in {images}")
    return [(p.name, p.read_bytes()) for p in paths]


@dataclasses.dataclass
class SimulatorReport:
    """What a simulated device saw."""

    device_id: str
    kind: str
    transport: str
    #: Frames sent in this run: those submitted now and those found waiting in the outbox
    #: from an earlier run (``carried_over``), so ``answered + rejected + queued`` is this.
    submitted: int = 0
    carried_over: int = 0
    answered: int = 0
    rejected: int = 0
    cache_hits: int = 0
    escalated: int = 0
    answers: int = 0
    telemetry: int = 0
    failovers: int = 0
    queued: int = 0
    labels: Counter[str] = dataclasses.field(default_factory=Counter)
    gateways: Counter[str] = dataclasses.field(default_factory=Counter)
    #: How many times the application was given each escalation's answer (the SDK's promise:
    #: once, also across gateway restarts and failovers).
    answers_per_escalation: Counter[str] = dataclasses.field(default_factory=Counter)
    gateway: str | None = None
    final_error: str | None = None
    final_error_type: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["labels"] = dict(self.labels.most_common(8))
        out["gateways"] = dict(self.gateways)
        out["answers_per_escalation"] = dict(self.answers_per_escalation)
        out["escalations_answered"] = len(self.answers_per_escalation)
        out["answers_repeated"] = sum(n - 1 for n in self.answers_per_escalation.values())
        return out


class Simulator:
    """A simulated device: frames at ``rate`` per second for ``duration_s`` (None: forever).

    ``on_event(kind, data)`` receives ``started``, ``detection``, ``rejected``, ``answer``,
    ``gateway`` (a change of gateway), ``telemetry`` and ``final`` events; the CLI prints
    them, the demo shows them live.
    """

    def __init__(
        self,
        identity_dir: Path,
        *,
        kind: str,
        images: Path | None = None,
        rate: float = 2.0,
        transport: str = "grpc",
        duration_s: float | None = None,
        core: str | None = None,
        on_event: EventSink | None = None,
        probe_interval_s: float = 2.0,
        telemetry_every_s: float = 5.0,
    ) -> None:
        from device_sdk import ClientOptions, Transport

        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        self.identity_dir = identity_dir
        self.kind = kind
        self.images = _load_images(kind, images)
        self.rate = rate
        self.duration_s = duration_s
        self.on_event = on_event or (lambda _k, _d: None)
        self.telemetry_every_s = telemetry_every_s
        self.options = ClientOptions(
            transport=Transport(transport),
            core_address=core,
            probe_interval_s=probe_interval_s,
            offline_probe_interval_s=0.5,
            call_timeout_s=5.0,
            down_for_s=0.5,
        )
        self.report = SimulatorReport(device_id="", kind=kind, transport=transport)
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Ask the simulator to finish (outcomes already on the way are still collected)."""
        self._stop.set()

    async def run(self) -> SimulatorReport:
        """Run until the duration passes, :meth:`stop`, or a final error."""
        from device_sdk import DeviceClient, DeviceSdkError

        client = DeviceClient(self.identity_dir, self.options)
        self.report.device_id = client.device_id
        try:
            async with client:
                # Frames left from an earlier run go out now: counted as sent before any of
                # their outcomes can be counted as answered.
                self.report.carried_over = client.stats().carried_over
                self.report.submitted = self.report.carried_over
                self.on_event(
                    "started",
                    {
                        "device": client.device_id,
                        "gateway": client.gateway.gateway_id if client.gateway else None,
                        "queued": client.stats().queue.frames,
                    },
                )
                self._note_gateway(client)
                try:
                    async with asyncio.TaskGroup() as tg:
                        producer = tg.create_task(self._produce(client))
                        results = tg.create_task(self._consume_results(client))
                        events = tg.create_task(self._consume_events(client))
                        await producer
                        # Give outcomes of the last frames a moment to arrive.
                        await client.flush(timeout_s=5.0)
                        results.cancel()
                        events.cancel()
                except* DeviceSdkError as group:
                    self._final(group.exceptions[0])
                if client.final_error is not None:
                    self._final(client.final_error)
                # The summary is the SDK's own count (an outcome is counted as it arrives,
                # also one the results reader had not printed yet when it was stopped).
                stats = client.stats()
                self.report.failovers = stats.failovers
                self.report.submitted = stats.carried_over + stats.submitted
                self.report.answered = stats.answered
                self.report.rejected = stats.rejected
                self.report.queued = stats.queue.frames
        except DeviceSdkError as exc:
            self._final(exc)
        return self.report

    def _final(self, exc: BaseException) -> None:
        if self.report.final_error is None:
            self.report.final_error = str(exc)
            self.report.final_error_type = type(exc).__name__
            self.on_event("final", {"error": type(exc).__name__, "message": str(exc)})

    def _note_gateway(self, client: Any) -> None:
        gateway = client.gateway.gateway_id if client.gateway else None
        if gateway != self.report.gateway:
            self.on_event("gateway", {"gateway": gateway, "previous": self.report.gateway})
            self.report.gateway = gateway

    async def _produce(self, client: Any) -> None:
        from device_sdk import Telemetry

        start = time.monotonic()
        next_telemetry = start
        period = 1.0 / self.rate if self.rate > 0 else 1.0
        rng = random.Random(client.device_id)  # noqa: S311 (simulation, not security)
        battery = 100.0
        for n in itertools.count():
            if self._stop.is_set():
                return
            if self.duration_s is not None and time.monotonic() - start >= self.duration_s:
                return
            _name, image = self.images[n % len(self.images)]
            await client.submit(image, frame_id=f"{client.device_id}-{int(start)}-{n}")
            self.report.submitted += 1
            self._note_gateway(client)
            now = time.monotonic()
            if now >= next_telemetry:
                battery = max(battery - rng.uniform(0.1, 0.5), 5.0)
                await client.report_telemetry(
                    Telemetry(
                        battery_percent=battery if self.kind == "robot_vacuum" else -1.0,
                        temperature_c=35.0 + rng.uniform(-1, 1),
                        firmware_version="sim-1.0",
                        readings={"wifi_rssi": -50.0 + rng.uniform(-10, 10)},
                    )
                )
                self.report.telemetry += 1
                next_telemetry = now + self.telemetry_every_s
            # Sleep to the schedule, not a fixed period, so the rate holds under load.
            delay = start + (n + 1) * period - time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(delay, 0.0)):
                    await self._stop.wait()

    async def _consume_results(self, client: Any) -> None:
        from device_sdk import FrameRejected

        async for outcome in client.results():
            self._note_gateway(client)
            if isinstance(outcome, FrameRejected):
                self.report.rejected += 1
                self.on_event(
                    "rejected",
                    {"frame": outcome.frame_id, "code": outcome.code, "reason": outcome.reason},
                )
                continue
            self.report.answered += 1
            self.report.gateways[outcome.gateway_id] += 1
            self.report.cache_hits += int(outcome.from_cache)
            escalated = [d for d in outcome.detections if d.escalated]
            self.report.escalated += len(escalated)
            for d in outcome.detections:
                self.report.labels[d.label] += 1
            self.on_event(
                "detection",
                {
                    "frame": outcome.frame_id,
                    "gateway": outcome.gateway_id,
                    "transport": outcome.transport.value,
                    "cache": outcome.from_cache,
                    "ms": round(outcome.inference_ms, 1),
                    "labels": [f"{d.label} {d.score:.2f}" for d in outcome.detections[:4]],
                    "escalated": [d.label for d in escalated],
                },
            )

    async def _consume_events(self, client: Any) -> None:
        from device_sdk import EscalationAnswer

        async for event in client.events():
            if isinstance(event.kind, EscalationAnswer):
                self.report.answers += 1
                a = event.kind
                self.report.answers_per_escalation[a.escalation_id] += 1
                self.on_event(
                    "answer",
                    {
                        "frame": a.frame_id,
                        "escalation": a.escalation_id,
                        "edge": f"{a.edge_label} {a.edge_score:.2f}",
                        "core": "still unknown" if a.still_unknown else f"{a.label} {a.score:.2f}",
                        "model": a.model_name,
                    },
                )
            else:
                self.on_event("event", {"event": repr(event.kind)})


def _printer(device_id: str, as_json: bool) -> EventSink:
    def emit(kind: str, data: dict[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps({"event": kind, "device": device_id, **data}))
            return
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        if kind == "detection":
            extra = " (cache)" if data["cache"] else ""
            esc = f"  escalated: {', '.join(data['escalated'])}" if data["escalated"] else ""
            labels = ", ".join(data["labels"]) or "nothing"
            click.echo(f"{stamp} {data['gateway']:<10} {labels}{extra}{esc}")
        elif kind == "answer":
            click.echo(f"{stamp} answer     {data['edge']} -> {data['core']} ({data['model']})")
        elif kind == "gateway":
            click.echo(f"{stamp} gateway    now {data['gateway'] or 'none (queueing)'}")
        elif kind == "final":
            click.echo(f"{stamp} STOPPED    {data['error']}: {data['message']}", err=True)
        elif kind == "rejected":
            click.echo(f"{stamp} rejected   {data['code']}: {data['reason']}")
        elif kind == "started":
            click.echo(
                f"{stamp} started    {data['device']} via {data['gateway'] or 'no gateway yet'}"
                f" ({data['queued']} frames waiting from before)"
            )

    return emit


@click.group()
def device() -> None:
    """Simulated devices."""


@device.command("simulate")
@click.option(
    "--identity",
    "identity_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="identity directory written by 'edgeward enroll'",
)
@click.option("--kind", required=True, type=click.Choice(sorted(KINDS)), help="device to play")
@click.option(
    "--images",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="folder of JPEG/PNG photos to send instead of the bundled ones",
)
@click.option("--rate", default=2.0, show_default=True, help="frames per second")
@click.option(
    "--transport",
    type=click.Choice(["grpc", "grpc-stream", "mqtt"]),
    default="grpc",
    show_default=True,
)
@click.option("--duration", type=float, default=None, help="seconds to run (default: forever)")
@click.option("--core", default=None, help="core HOST:PORT for renewal (default: from enrolment)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per event")
def simulate(  # noqa: PLR0917 - click passes options as arguments
    identity_dir: Path,
    kind: str,
    images: Path | None,
    rate: float,
    transport: str,
    duration: float | None,
    core: str | None,
    as_json: bool,
) -> None:
    """Stream real photos as a pet camera or robot vacuum and print what comes back."""
    from device_sdk import DeviceIdentity, DeviceSdkError
    from edgeward._logging import configure_logging

    configure_logging(level="warning")
    if rate <= 0:
        raise click.BadParameter("must be positive", param_hint="--rate")
    try:
        ident = DeviceIdentity.load(identity_dir)
    except DeviceSdkError as exc:
        raise click.ClickException(str(exc)) from None
    sim = Simulator(
        identity_dir,
        kind=kind,
        images=images,
        rate=rate,
        transport=transport,
        duration_s=duration,
        core=core,
        on_event=_printer(ident.device_id, as_json),
    )
    report = asyncio.run(_run_until_signalled(sim))
    summary = report.as_dict()
    if as_json:
        click.echo(json.dumps({"event": "summary", **summary}))
    else:
        click.echo(
            f"{report.device_id}: {report.submitted} frames sent"
            + (f" ({report.carried_over} from before)" if report.carried_over else "")
            + f", {report.answered} answered "
            f"({report.cache_hits} from cache), {report.escalated} escalated, "
            f"{report.answers} answers, {report.rejected} rejected, {report.queued} still queued"
        )
    if report.final_error_type in {"DeviceRevoked", "CertificateExpired", "NotEnrolled"}:
        sys.exit(3)


async def _run_until_signalled(sim: Simulator) -> SimulatorReport:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, sim.stop)
    return await sim.run()


def photo_names(kind: str) -> Sequence[str]:
    """Names of the bundled photos for ``kind`` (for documentation and tests)."""
    return KINDS[kind]
