"""Telemetry in from ``devices/+/telemetry``: parsed, admitted by the front door, kept.

:class:`TelemetryIngest` takes the bridge's telemetry: messages its frame consumers read
(``telemetry_workers = 0``) or batches from ``telemetry_workers`` separate processes
(``_telemetry``), which parse and validate off the event loop and send the latest reading per
device. Each reading is admitted by the front door as a ``ReportTelemetry`` (revocation feed,
identity, device type; not charged to the frame budget: only the latest state per device is
kept, so a flood costs parsing, not memory) and kept in the front door's one telemetry store;
a refused or invalid reading is counted and audited, and the device told on its events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import aiomqtt
import structlog

from gateway._door import FrontDoor, TelemetryRecord, TopicIdentity
from gateway._mqtt._config import MqttSettings
from gateway._mqtt._telemetry import (
    PROTOBUF_CONTENT_TYPE,
    IngestBatch,
    InvalidTelemetry,
    TelemetryReading,
    WorkerOptions,
    device_from_topic,
    parse_telemetry,
    run_worker,
    spawn_context,
)
from gateway.errors import GatewayError, InvalidRequest

__all__ = ["TelemetryIngest"]

_log = structlog.get_logger(__name__)


class TelemetryIngest:
    """The bridge's telemetry side (see the module docstring); its worker processes, if any,
    start with :meth:`start` and stop with :meth:`stop`; :meth:`admit_loop` runs in the
    bridge's task group."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        door: FrontDoor,
        stats: Any,
        worker_options: Callable[[int], WorkerOptions],
        prefer: Callable[[str, bool], None],
        refused: Callable[..., None],
        reject_topic: Callable[[], None],
        on_connected: Callable[[], None],
    ) -> None:
        self.settings = settings
        self._door = door
        self.stats = stats
        self._worker_options = worker_options
        self._prefer = prefer
        self._refused = refused
        self._reject_topic = reject_topic
        self._on_connected = on_connected
        # Readings whose device's registry facts must be fetched first, in order.
        self._unchecked: asyncio.Queue[TelemetryReading] = asyncio.Queue(maxsize=10_000)
        self._workers: list[tuple[Any, Any]] = []
        self._closing = False

    def workers_connected(self) -> bool:
        """Whether every worker process has connected to the broker."""
        return all(getattr(p, "_edgeward_connected", False) for _c, p in self._workers)

    async def stop(self) -> None:
        """Stop the worker processes (their pipes closed, each joined or terminated)."""
        self._closing = True
        for conn, proc in self._workers:
            with contextlib.suppress(OSError, ValueError):
                asyncio.get_running_loop().remove_reader(conn.fileno())
            with contextlib.suppress(OSError, ValueError, BrokenPipeError):
                conn.send("stop")
            await asyncio.to_thread(proc.join, 5.0)
            if proc.is_alive():
                proc.terminate()
            conn.close()

    def handle(self, message: aiomqtt.Message) -> None:
        """One telemetry message read by a frame consumer (``telemetry_workers = 0``)."""
        device_id = device_from_topic(message.topic.value, "telemetry")
        if device_id is None:
            self._reject_topic()
            return
        self.stats.telemetry_received += 1
        props = message.properties
        content_type = getattr(props, "ContentType", None) if props is not None else None
        payload = message.payload
        data = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
        try:
            reading = parse_telemetry(
                device_id,
                data,
                content_type=content_type,
                max_readings=self.settings.telemetry_max_keys,
                now=self._door.clock(),
            )
        except InvalidTelemetry as exc:
            self._prefer(device_id, content_type == PROTOBUF_CONTENT_TYPE)
            self._telemetry_refused(device_id, InvalidRequest(str(exc), reason="invalid_telemetry"))
            return
        self._store_reading(reading)

    def _store_reading(self, reading: TelemetryReading) -> None:
        """Keep the reading if the front door admits its device (as ``ReportTelemetry``)."""
        try:
            # Not charged to the budget: only the latest state per device is kept, so a
            # flood costs parsing, not memory.
            admitted = self._door.admit_now(
                "ReportTelemetry", _identity(self._door, reading.device_id), charge=False
            )
        except GatewayError as exc:
            self._prefer(reading.device_id, reading.protobuf)
            self._telemetry_refused(reading.device_id, exc)
            return
        if admitted is not None:
            self._keep_reading(reading)
            return
        try:
            self._unchecked.put_nowait(reading)
        except asyncio.QueueFull:
            _log.warning("telemetry admission queue full; reading dropped")

    async def admit_loop(self) -> None:
        """Admit readings whose device's registry facts had to be fetched, in order."""
        while True:
            reading = await self._unchecked.get()
            try:
                await self._door.admit(
                    "ReportTelemetry", _identity(self._door, reading.device_id), charge=False
                )
            except GatewayError as exc:
                self._prefer(reading.device_id, reading.protobuf)
                self._telemetry_refused(reading.device_id, exc)
                continue
            self._keep_reading(reading)

    def _keep_reading(self, reading: TelemetryReading) -> None:
        self._prefer(reading.device_id, reading.protobuf)
        self._door.keep(
            TelemetryRecord(
                device_id=reading.device_id,
                received_at=reading.received_at,
                reported_at=reading.reported_at,
                battery_percent=reading.battery_percent,
                temperature_c=reading.temperature_c,
                firmware_version=reading.firmware_version,
                readings=reading.readings,
            )
        )

    def _telemetry_refused(self, device_id: str, exc: BaseException) -> None:
        self.stats.telemetry_rejected += 1
        self._refused(device_id, exc, method="ReportTelemetry")

    def start(self) -> None:
        """Start the ``telemetry_workers`` processes (none when it is 0)."""
        ctx = spawn_context()
        loop = asyncio.get_running_loop()
        for i in range(self.settings.telemetry_workers):
            opts = self._worker_options(i)
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=run_worker, args=(opts, child), name=f"edgeward-telemetry-{i}", daemon=True
            )
            proc.start()
            child.close()
            self._workers.append((parent, proc))
            loop.add_reader(parent.fileno(), self._on_worker_data, parent, proc)

    def _on_worker_data(self, conn: Any, proc: Any) -> None:
        try:
            while conn.poll():
                batch: IngestBatch = conn.recv()
                self._apply_batch(batch, proc)
        except (EOFError, OSError):
            with contextlib.suppress(OSError, ValueError):
                asyncio.get_running_loop().remove_reader(conn.fileno())
            if not self._closing:
                _log.error("telemetry worker ended", pid=proc.pid, status=proc.exitcode)

    def _apply_batch(self, batch: IngestBatch, proc: Any) -> None:
        if batch.connected and not getattr(proc, "_edgeward_connected", False):
            proc._edgeward_connected = True
            self._on_connected()
        self.stats.telemetry_received += batch.received
        for _ in range(batch.rejected_topics):
            self._reject_topic()
        for note in batch.notes:
            _log.warning("telemetry worker connection", worker=batch.worker, detail=note)
        for reading in batch.latest:
            self._store_reading(reading)
        for device_id, message, protobuf in batch.errors:
            self._prefer(device_id, protobuf)
            self._telemetry_refused(device_id, InvalidRequest(message, reason="invalid_telemetry"))


def _identity(door: FrontDoor, device_id: str) -> Callable[[], TopicIdentity]:
    return lambda: TopicIdentity.judge(device_id, door.revocation)
