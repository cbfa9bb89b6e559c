"""The device client: identity, nearest gateway, frames, events, telemetry, renewal, outbox.

Lifecycle (:class:`~device_sdk.ClientState`)::

    NEW --__aenter__--> RUNNING --__aexit__--> CLOSING --> CLOSED
                           |
                           +-- revoked / certificate expired --> FAILED (final)

Background work runs in one task group owned by the client: the prober (health-check round
trips to every gateway, re-ranking), the sender (drains the on-disk outbox to the gateway in
use, a few calls in flight), the event stream (``Subscribe`` or the MQTT events topic), the
MQTT session when MQTT is the transport, and certificate renewal.

Every frame passes through the on-disk outbox (see :mod:`device_sdk._queue`): ``submit``
returns once the frame is committed there, and it leaves only when a gateway answered for it.
So a gateway failing mid-call, no gateway at all, or a restart of the device loses nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import functools
import random
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import structlog

import pki
from device_sdk._enrollment import renew
from device_sdk._grpc import Busy, ChannelPool, GatewayDown, Refused, classify, probe
from device_sdk._identity import DeviceIdentity, load_gateway_directory
from device_sdk._mqtt import MqttSession
from device_sdk._queue import DiskQueue, QueuedItem, QueueStats
from device_sdk._renewal import RenewalPlan, plan_renewal, run_renewal
from device_sdk._selection import GatewaySelector
from device_sdk._types import (
    ClientState,
    DetectionResult,
    DeviceEvent,
    FrameOutcome,
    FrameRejected,
    GatewayInfo,
    Telemetry,
    Transport,
    timestamp,
)
from device_sdk.errors import (
    CertificateExpired,
    ClientClosed,
    DeviceRevoked,
    DeviceSdkError,
    InvalidDirectory,
    NoGateway,
    RequestRefused,
)
from protos.edgeward.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

__all__ = ["ClientOptions", "ClientStats", "DeviceClient"]

_log = structlog.get_logger(__name__)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientOptions:
    """How a :class:`DeviceClient` behaves. Every field has a production default."""

    transport: Transport = Transport.GRPC
    #: Gateways to use instead of the signed directory in the identity directory.
    gateways: Sequence[GatewayInfo] | None = None
    #: ``host:port`` of the core's Enrollment service for renewal; defaults to the address
    #: recorded at enrolment (``identity.json``). Without one, renewal is off.
    core_address: str | None = None
    #: The outbox database; defaults to ``outbox.sqlite3`` in the identity directory.
    queue_path: Path | None = None
    queue_max_items: int = 1000
    queue_max_bytes: int = 256 * 1024 * 1024
    #: fsync every commit (for devices that lose power without warning).
    durable_queue: bool = False
    #: Frames sent concurrently to the gateway (its micro-batcher likes a few at a time).
    max_in_flight: int = 4
    call_timeout_s: float = 10.0
    probe_interval_s: float = 10.0
    #: Probe interval while no gateway is reachable.
    offline_probe_interval_s: float = 1.0
    probe_timeout_s: float = 2.0
    connect_timeout_s: float = 5.0
    tie_margin_s: float = 0.010
    down_for_s: float = 1.0
    renew_fraction: float = 2 / 3
    renew_jitter: float = 0.05
    renewal_check_s: float = 30.0
    #: Receive escalation answers and commands (``Subscribe`` / the events topic).
    subscribe_events: bool = True
    #: Outcomes kept for :meth:`DeviceClient.results`; the oldest go first when full.
    results_buffer: int = 1024
    events_buffer: int = 1024
    #: Wall clock used to judge the certificate (injected by tests).
    clock: Callable[[], dt.datetime] = _utcnow
    rng: random.Random | None = None


@dataclass(frozen=True, slots=True)
class ClientStats:
    """Counters since the client started."""

    state: ClientState
    gateway_id: str | None
    submitted: int
    answered: int
    rejected: int
    telemetry_sent: int
    failovers: int
    renewals: int
    results_dropped: int
    queue: QueueStats
    gateways_up: tuple[str, ...] = field(default_factory=tuple)


class DeviceClient:
    """An enrolled device's connection to the edgeward gateways.

    Use it as an async context manager::

        async with DeviceClient("/var/lib/edgeward/identity") as client:
            frame_id = await client.submit(jpeg_bytes)
            async for outcome in client.results():
                ...

    Construction reads the identity directory written by ``edgeward enroll`` and raises
    :class:`~device_sdk.errors.NotEnrolled` when there is none. Entering verifies the signed
    gateway directory, opens the outbox, probes the gateways and starts the background work.
    """

    def __init__(self, identity_dir: Path | str, options: ClientOptions | None = None) -> None:
        self.options = options or ClientOptions()
        self.identity = DeviceIdentity.load(Path(identity_dir))
        self._log = _log.bind(device_id=self.identity.device_id)
        self._state = ClientState.NEW
        self._final: DeviceSdkError | None = None
        self._rng = self.options.rng or random.Random()  # noqa: S311 (jitter, not secrets)
        self._queue: DiskQueue | None = None
        self._selector = GatewaySelector([])
        self._in_use: GatewayInfo | None = None
        self._channels: ChannelPool | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._work = asyncio.Event()
        self._route = asyncio.Event()  # set while a gateway is selected
        self._route_changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._in_flight: set[int] = set()
        self._removals: list[tuple[int, asyncio.Future[None]]] = []
        self._removing = False
        self._waiters: dict[str, asyncio.Future[FrameOutcome]] = {}
        self._results: asyncio.Queue[FrameOutcome] = asyncio.Queue(self.options.results_buffer)
        self._events: asyncio.Queue[DeviceEvent] = asyncio.Queue(self.options.events_buffer)
        self._last_event_id: dict[str, str] = {}
        self._seen_events: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._mqtt: MqttSession | None = None
        self._mqtt_stop = asyncio.Event()
        self._plan: RenewalPlan | None = None
        self._n = dict.fromkeys(("sub", "ans", "rej", "tel", "fail", "ren", "drop"), 0)

    # -- public state ----------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        return self.identity.device_id

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def final_error(self) -> DeviceSdkError | None:
        """The final error (revoked, expired) that stopped the client, if any."""
        return self._final

    @property
    def gateway(self) -> GatewayInfo | None:
        """The gateway in use now; ``None`` while none is reachable."""
        return self._selector.current

    @property
    def renewal_plan(self) -> RenewalPlan | None:
        return self._plan

    def stats(self) -> ClientStats:
        queue = self._q.stats() if self._queue else QueueStats(0, 0, 0, 0, 0)
        now = time.monotonic()
        return ClientStats(
            state=self._state,
            gateway_id=self.gateway.gateway_id if self.gateway else None,
            submitted=self._n["sub"],
            answered=self._n["ans"],
            rejected=self._n["rej"],
            telemetry_sent=self._n["tel"],
            failovers=self._n["fail"],
            renewals=self._n["ren"],
            results_dropped=self._n["drop"],
            queue=queue,
            gateways_up=tuple(
                g.gateway_id
                for g in self._selector.gateways
                if self._selector.status(g.gateway_id).up(now)
            ),
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> DeviceClient:
        if self._state is not ClientState.NEW:
            raise RuntimeError("a DeviceClient can be entered once")
        opts = self.options
        now = opts.clock()
        if now >= self.identity.not_after:
            raise CertificateExpired(self.device_id, self.identity.not_after.isoformat())
        gateways = (
            list(opts.gateways)
            if opts.gateways is not None
            else list(load_gateway_directory(self.identity, now=now).gateways)
        )
        if not gateways:
            self._log.warning("the gateway directory lists no gateway; frames wait in the outbox")
        self._selector = GatewaySelector(
            gateways,
            region=self.identity.region,
            tie_margin_s=opts.tie_margin_s,
            down_for_s=opts.down_for_s,
        )
        queue_path = opts.queue_path or self.identity.files.directory / "outbox.sqlite3"
        self._queue = await asyncio.to_thread(
            DiskQueue,
            queue_path,
            max_items=opts.queue_max_items,
            max_bytes=opts.queue_max_bytes,
            durable=opts.durable_queue,
        )
        self._channels = ChannelPool(await asyncio.to_thread(self._credentials))
        self._plan = self._replan(self.identity.not_before, self.identity.not_after)
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._state = ClientState.RUNNING
        try:
            await self._probe_all()
            self._spawn(self._probe_loop, "probe")
            self._spawn(self._drain_loop, "sender")
            if opts.transport is Transport.MQTT:
                self._spawn(self._mqtt_loop, "mqtt")
            if opts.subscribe_events:
                # Also with MQTT: the gRPC event stream is where a gateway tells a revoked
                # device so, finally (a broker can only refuse its TLS handshake, which the
                # MQTT client reports as a time-out). Events arriving both ways are
                # delivered once (by event id).
                self._spawn(self._events_loop, "events")
            core = opts.core_address or self.identity.core_address
            if core:
                self._spawn(functools.partial(self._renewal_loop, core), "renewal")
            else:
                self._log.warning("no core address known: certificate renewal is off")
        except BaseException:
            await self._shutdown()
            raise
        self._work.set()
        self._log.info(
            "device client started",
            gateway=self.gateway.gateway_id if self.gateway else None,
            queued=len(self._q),
            transport=opts.transport.value,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._shutdown()

    async def aclose(self) -> None:
        """Stop the background work and close connections; queued items stay on disk."""
        await self._shutdown()

    async def _shutdown(self) -> None:
        if self._state in (ClientState.CLOSED, ClientState.CLOSING):
            return
        if self._state is not ClientState.FAILED:
            self._state = ClientState.CLOSING
        self._stopping.set()
        self._mqtt_stop.set()
        for task in list(self._tasks):
            task.cancel()
        if self._tg is not None:
            tg, self._tg = self._tg, None
            await tg.__aexit__(None, None, None)
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(self._final or ClientClosed("the client was closed"))
        if self._channels is not None:
            await self._channels.close(grace=None)
        if self._queue is not None:
            await asyncio.to_thread(self._q.close)
        if self._state is not ClientState.FAILED:
            self._state = ClientState.CLOSED

    def _spawn(self, job: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        """Start ``job()`` in the client's task group. The coroutine is made inside the task,
        so a task cancelled before it ran leaves no coroutine behind."""
        if self._tg is None:
            return
        task = self._tg.create_task(self._guard(job, name), name=f"edgeward-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, job: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        """Run one background job; a final error stops the client, a bug is logged and also
        stops it (a silently dead sender would look like a working device that sends nothing)."""
        try:
            await job()
        except (DeviceRevoked, CertificateExpired) as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 (logged, and the client stops visibly)
            self._log.exception("device client task failed", task=name)
            self._fail(DeviceSdkError(f"internal error in {name}: {exc}"))

    def _fail(self, exc: DeviceSdkError) -> None:
        if self._final is not None:
            return
        self._final = exc
        self._state = ClientState.FAILED
        self._log.warning("device client stopped for good", error=str(exc))
        self._stopping.set()
        self._mqtt_stop.set()
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(exc)
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        self._work.set()
        self._route.set()

    @property
    def _q(self) -> DiskQueue:
        if self._queue is None:
            raise ClientClosed("the client is not started")
        return self._queue

    def _check_usable(self) -> None:
        if self._final is not None:
            raise self._final
        if self._state is not ClientState.RUNNING:
            raise ClientClosed(f"the client is {self._state.value}")

    # -- frames ----------------------------------------------------------------------------

    async def submit(
        self,
        image: bytes,
        *,
        frame_id: str | None = None,
        captured_at: dt.datetime | None = None,
    ) -> str:
        """Accept a JPEG or PNG frame into the outbox and return its frame id.

        Returns once the frame is committed on disk: from then on it reaches a gateway even
        across gateway failures and device restarts. Its outcome arrives on :meth:`results`.
        Submitting a frame id that is already queued (or was just delivered) does nothing.
        Raises :class:`~device_sdk.errors.QueueFull` when the outbox is full of frames.
        """
        self._check_usable()
        fid = frame_id or uuid.uuid4().hex
        when = (captured_at or self.options.clock()).timestamp()
        if await asyncio.to_thread(self._q.put_frame, fid, image, captured_at=when):
            self._n["sub"] += 1
        self._work.set()
        return fid

    async def detect(
        self,
        image: bytes,
        *,
        frame_id: str | None = None,
        timeout_s: float | None = None,
    ) -> DetectionResult:
        """Submit a frame and wait for its detections.

        The frame goes through the outbox like :meth:`submit`; its outcome goes to the caller
        only, not to :meth:`results`. Raises :class:`~device_sdk.errors.RequestRefused` when
        the gateway refused the frame, :class:`~device_sdk.errors.NoGateway` when ``timeout_s``
        passes first (the frame stays queued and is still delivered later).
        """
        self._check_usable()
        fid = frame_id or uuid.uuid4().hex
        fut: asyncio.Future[FrameOutcome] = asyncio.get_running_loop().create_future()
        self._waiters[fid] = fut
        try:
            await self.submit(image, frame_id=fid)
            try:
                async with asyncio.timeout(timeout_s):
                    outcome = await fut
            except TimeoutError:
                raise NoGateway(
                    f"no answer within {timeout_s} s; frame {fid} stays queued"
                ) from None
        finally:
            self._waiters.pop(fid, None)
        if isinstance(outcome, FrameRejected):
            raise RequestRefused(outcome.code, outcome.reason)
        return outcome

    async def results(self) -> AsyncGenerator[FrameOutcome, None]:
        """Outcomes of submitted frames, as they arrive (ends when the client closes;
        raises the final error if the device was revoked or its certificate expired)."""
        while True:
            if self._results.empty():
                if self._final is not None:
                    raise self._final
                if self._state is not ClientState.RUNNING:
                    return
            getter = asyncio.ensure_future(self._results.get())
            stopper = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                yield getter.result()

    async def events(self) -> AsyncGenerator[DeviceEvent, None]:
        """Escalation answers, commands and error events for this device."""
        while True:
            if self._events.empty():
                if self._final is not None:
                    raise self._final
                if self._state is not ClientState.RUNNING:
                    return
            getter = asyncio.ensure_future(self._events.get())
            stopper = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                yield getter.result()

    async def report_telemetry(self, telemetry: Telemetry) -> bool:
        """Queue a telemetry report; ``False`` when the full outbox dropped it (telemetry
        yields to frames: see the outbox policy)."""
        self._check_usable()
        payload = telemetry.to_proto(now=self.options.clock()).SerializeToString()
        ok = await asyncio.to_thread(self._q.put_telemetry, payload)
        self._work.set()
        return ok

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until the outbox is empty; ``False`` if ``timeout_s`` passed first."""
        try:
            async with asyncio.timeout(timeout_s):
                while len(self._q) or self._in_flight:
                    self._check_usable()
                    await asyncio.sleep(0.02)
        except TimeoutError:
            return False
        return True

    # -- delivery --------------------------------------------------------------------------

    def _deliver(self, outcome: FrameOutcome) -> None:
        if isinstance(outcome, FrameRejected):
            self._n["rej"] += 1
        else:
            self._n["ans"] += 1
        waiter = self._waiters.get(outcome.frame_id)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(outcome)
            return
        if self._results.full():
            self._results.get_nowait()
            self._n["drop"] += 1
        self._results.put_nowait(outcome)

    def _deliver_event(self, event: DeviceEvent) -> None:
        if event.event_id:
            if event.event_id in self._seen_events:
                return
            self._seen_events[event.event_id] = None
            if len(self._seen_events) > 4096:
                self._seen_events.popitem(last=False)
        if self._events.full():
            self._events.get_nowait()
        self._events.put_nowait(event)

    async def _drain_loop(self) -> None:
        window = asyncio.Semaphore(self.options.max_in_flight)
        # Read a few items ahead: one disk read per batch instead of one per frame.
        ahead: collections.deque[QueuedItem] = collections.deque()
        batch = self.options.max_in_flight * 4
        while not self._stopping.is_set():
            await self._route.wait()
            if self._stopping.is_set():
                return
            await window.acquire()
            if not ahead:
                self._work.clear()
                ahead.extend(
                    await asyncio.to_thread(self._q.peek, batch, exclude=frozenset(self._in_flight))
                )
            gateway = self._selector.current
            if not ahead or gateway is None:
                window.release()
                if gateway is not None:
                    await self._work.wait()
                else:
                    await asyncio.sleep(0.05)  # the route is being re-chosen
                continue
            item = ahead.popleft()
            if item.seq in self._in_flight:  # sent again after a failure meanwhile
                window.release()
                continue
            self._in_flight.add(item.seq)
            self._spawn(functools.partial(self._send, item, gateway, window), "send")

    async def _send(
        self, item: QueuedItem, gateway: GatewayInfo, window: asyncio.Semaphore
    ) -> None:
        """Send one queued item. It leaves the queue (and then the in-flight set, in that
        order, so the sender cannot pick it up twice) only once a gateway answered for it."""
        try:
            outcome: FrameOutcome | None = None
            try:
                if item.kind == "frame":
                    outcome = await self._call_detect(gateway, item)
                else:
                    await self._call_telemetry(gateway, item)
            except GatewayDown as exc:
                self._gateway_failed(gateway, str(exc))
                return
            except Busy as exc:
                self._log.info(
                    "gateway busy; backing off", gateway=gateway.gateway_id, reason=str(exc)
                )
                await asyncio.sleep(0.05 + self._rng.random() * 0.2)
                return
            except Refused as exc:
                if item.kind == "telemetry":
                    self._log.warning("telemetry refused", code=exc.code, reason=exc.reason)
                else:
                    outcome = FrameRejected(item.frame_id, exc.code, exc.reason, gateway.gateway_id)
            await self._remove(item.seq)
            if outcome is not None:
                self._deliver(outcome)
            elif item.kind == "telemetry":
                self._n["tel"] += 1
        finally:
            self._in_flight.discard(item.seq)
            window.release()
            self._work.set()

    async def _remove(self, seq: int) -> None:
        """Remove a delivered item; concurrent removals share one commit.

        The first caller becomes the batch's writer; those arriving while it writes join
        the next batch. Each returns once its own item is gone from disk.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._removals.append((seq, done))
        if not self._removing:
            self._removing = True
            try:
                while self._removals:
                    batch, self._removals = self._removals, []
                    try:
                        await asyncio.to_thread(self._q.remove_many, [s for s, _ in batch])
                    except BaseException as exc:
                        for _, fut in batch:
                            if not fut.done():
                                fut.set_exception(exc)
                        raise
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_result(None)
            finally:
                self._removing = False
        await done

    async def _call_detect(self, gateway: GatewayInfo, item: QueuedItem) -> FrameOutcome:
        if self.options.transport is Transport.MQTT:
            session = await self._mqtt_session(gateway)
            return await session.detect(
                item.frame_id, item.payload, item.captured_at, timeout_s=self.options.call_timeout_s
            )
        frame = common_pb2.Frame(image=item.payload, frame_id=item.frame_id)
        frame.captured_at.CopyFrom(timestamp(dt.datetime.fromtimestamp(item.captured_at, dt.UTC)))
        stub = self._stub(gateway)
        try:
            reply = await stub.Detect(frame, timeout=self.options.call_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise classify(exc, device_id=self.device_id) from exc
        except grpc.aio.UsageError as exc:
            # The channel was replaced (renewal) between picking it and calling: try again.
            raise Busy("channel replaced") from exc
        return DetectionResult.from_proto(reply)

    async def _call_telemetry(self, gateway: GatewayInfo, item: QueuedItem) -> None:
        if self.options.transport is Transport.MQTT:
            session = await self._mqtt_session(gateway)
            await session.telemetry(item.payload, timeout_s=self.options.call_timeout_s)
            return
        stub = self._stub(gateway)
        try:
            await stub.ReportTelemetry(
                common_pb2.Telemetry.FromString(item.payload), timeout=self.options.call_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise classify(exc, device_id=self.device_id) from exc
        except grpc.aio.UsageError as exc:
            raise Busy("channel replaced") from exc

    async def _mqtt_session(self, gateway: GatewayInfo) -> MqttSession:
        """The MQTT session to ``gateway`` once it is connected.

        Not being connected *yet* is :class:`Busy` (wait, keep the item), not a gateway
        failure: the MQTT task reports real connection failures itself.
        """
        deadline = time.monotonic() + self.options.connect_timeout_s
        while time.monotonic() < deadline:
            session = self._mqtt
            if session is not None and session.gateway == gateway:
                if session.ready.is_set():
                    return session
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                        await session.ready.wait()
                continue
            if self._selector.current != gateway:
                raise Busy("the gateway changed while connecting")
            await asyncio.sleep(0.05)
        raise Busy("MQTT session not connected yet")

    def _stub(self, gateway: GatewayInfo) -> gateway_pb2_grpc.DeviceGatewayAsyncStub:
        if self._channels is None:
            raise ClientClosed("the client is not started")
        return self._channels.stub(gateway.grpc_address)

    def _channel(self, gateway: GatewayInfo) -> grpc.aio.Channel:
        if self._channels is None:
            raise ClientClosed("the client is not started")
        return self._channels.get(gateway.grpc_address)

    # -- gateway selection -----------------------------------------------------------------

    def _gateway_failed(self, gateway: GatewayInfo, reason: str) -> None:
        if self._in_use == gateway:
            self._log.warning(
                "gateway failed; failing over", gateway=gateway.gateway_id, reason=reason
            )
        self._selector.report_failure(gateway.gateway_id, reason)
        self._reselect()

    def _reselect(self) -> None:
        before = self._in_use
        after = self._selector.choose()
        self._in_use = after
        if after is not None:
            self._route.set()
        else:
            self._route.clear()
        if before == after:
            return
        if before is not None:
            try:
                still_up = self._selector.status(before.gateway_id).up(time.monotonic())
            except KeyError:
                still_up = False
            if not still_up:
                self._n["fail"] += 1
        self._log.info(
            "gateway selected",
            gateway=after.gateway_id if after else None,
            previous=before.gateway_id if before else None,
        )
        self._route_changed.set()
        self._mqtt_stop.set()
        self._work.set()

    async def _probe_one(self, gateway: GatewayInfo) -> None:
        try:
            rtt = await probe(
                self._channel(gateway),
                timeout_s=self.options.probe_timeout_s,
                device_id=self.device_id,
            )
        except GatewayDown as exc:
            self._selector.record_probe(gateway.gateway_id, None, str(exc))
        except grpc.aio.UsageError:
            return  # the channel was replaced (renewal) mid-probe; the next round counts
        else:
            self._selector.record_probe(gateway.gateway_id, rtt)

    async def _probe_all(self) -> None:
        gateways = self._selector.gateways
        if gateways:
            await asyncio.gather(*(self._probe_one(g) for g in gateways))
        self._reselect()

    async def _probe_loop(self) -> None:
        while not self._stopping.is_set():
            interval = (
                self.options.probe_interval_s
                if self._selector.current is not None
                else min(self.options.offline_probe_interval_s, self.options.probe_interval_s)
            )
            # Jitter spreads a fleet's probes over time.
            await asyncio.sleep(interval * (0.9 + 0.2 * self._rng.random()))
            await self._probe_all()

    # -- events ----------------------------------------------------------------------------

    async def _events_loop(self) -> None:
        backoff = 0.2
        while not self._stopping.is_set():
            await self._route.wait()
            gateway = self._selector.current
            if gateway is None or self._stopping.is_set():
                await asyncio.sleep(0.05)  # the route is being re-chosen
                continue
            self._route_changed.clear()
            stub = self._stub(gateway)
            try:
                call = stub.Subscribe(
                    gateway_pb2.SubscribeRequest(
                        after_event_id=self._last_event_id.get(gateway.gateway_id, "")
                    )
                )
            except grpc.aio.UsageError:
                await asyncio.sleep(0.05)  # the channel was just replaced (renewal)
                continue
            watcher = asyncio.ensure_future(self._route_changed.wait())
            watcher.add_done_callback(_canceller(call))
            try:
                async for msg in call:
                    backoff = 0.2
                    self._last_event_id[gateway.gateway_id] = msg.event_id
                    self._deliver_event(DeviceEvent.from_proto(msg))
                if not self._route_changed.is_set():
                    # The gateway ended the stream (shutting down): do not spin.
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the client is stopping
                # grpc.aio ends a call cancelled on our side (the route changed) with
                # CancelledError: open the stream again, at the gateway now in use.
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.CANCELLED:
                    err = classify(exc, device_id=self.device_id)
                    if isinstance(err, DeviceRevoked):
                        raise err from exc
                    if isinstance(err, Refused):
                        self._log.warning("event stream refused", reason=str(err))
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
            finally:
                watcher.cancel()
                call.cancel()

    async def _mqtt_loop(self) -> None:
        while not self._stopping.is_set():
            await self._route.wait()
            gateway = self._selector.current
            if gateway is None or self._stopping.is_set():
                await asyncio.sleep(0.05)  # the route is being re-chosen
                continue
            self._mqtt_stop.clear()
            ctx = await asyncio.to_thread(pki.client_ssl_context, self.identity.files)
            session = MqttSession(
                device_id=self.device_id,
                gateway=gateway,
                ssl_context=ctx,
                connect_timeout_s=self.options.connect_timeout_s,
                on_event=self._deliver_event,
            )
            self._mqtt = session
            self._work.set()
            try:
                await session.run(self._mqtt_stop)
            except GatewayDown as exc:
                if self._selector.current == gateway:
                    self._gateway_failed(gateway, str(exc))
                await asyncio.sleep(0.2)
            finally:
                if self._mqtt is session:
                    self._mqtt = None

    # -- renewal ---------------------------------------------------------------------------

    def _credentials(self) -> grpc.ChannelCredentials:
        return pki.grpc_channel_credentials(
            ca_bundle_pem=self.identity.files.ca_bundle.read_bytes(),
            identity=self.identity.files,
        )

    def _replan(self, not_before: dt.datetime, not_after: dt.datetime) -> RenewalPlan:
        return plan_renewal(
            not_before,
            not_after,
            fraction=self.options.renew_fraction,
            jitter=self.options.renew_jitter,
            rng=self._rng,
        )

    async def _renewal_loop(self, core_address: str) -> None:
        await run_renewal(
            device_id=self.device_id,
            plan=self._plan or self._replan(self.identity.not_before, self.identity.not_after),
            renew=lambda: self._renew_once(core_address),
            clock=self.options.clock,
            replan=self._replan,
            check_interval_s=self.options.renewal_check_s,
            on_renewed=self._renewed,
        )

    async def _renew_once(self, core_address: str) -> tuple[dt.datetime, dt.datetime]:
        result = await renew(
            identity_dir=self.identity.files.directory,
            endpoint=core_address,
            now=self.options.clock(),
            timeout_s=self.options.call_timeout_s,
        )
        return result.not_before, result.not_after

    async def _renewed(self, plan: RenewalPlan) -> None:
        """Switch every later connection to the new certificate; let open calls finish."""
        self.identity = await asyncio.to_thread(DeviceIdentity.load, self.identity.files.directory)
        self._plan = plan
        self._n["ren"] += 1
        if self._channels is None:
            return
        old = self._channels.replace_credentials(await asyncio.to_thread(self._credentials))
        # The event stream and the MQTT session reconnect on the new certificate.
        self._route_changed.set()
        self._mqtt_stop.set()
        self._log.info(
            "switched to the renewed certificate",
            serial=self.identity.serial,
            renew_at=plan.renew_at.isoformat(),
        )
        if old:
            self._spawn(functools.partial(self._close_channels, old), "close-old-channels")
        with contextlib.suppress(InvalidDirectory):
            directory = load_gateway_directory(self.identity, now=self.options.clock())
            if (
                self.options.gateways is None
                and directory.gateways
                and self._update_gateways(directory.gateways)
            ):
                await self._probe_all()

    def _update_gateways(self, gateways: Sequence[GatewayInfo]) -> bool:
        if list(gateways) == self._selector.gateways:
            return False
        current = self._selector.current
        self._selector = GatewaySelector(
            gateways,
            region=self.identity.region,
            tie_margin_s=self.options.tie_margin_s,
            down_for_s=self.options.down_for_s,
        )
        self._selector.current = current if current in gateways else None
        self._in_use = self._selector.current
        self._log.info("gateway directory updated", gateways=[g.gateway_id for g in gateways])
        return True

    async def _close_channels(self, channels: list[grpc.aio.Channel]) -> None:
        # Grace long enough for any call in flight (call_timeout_s bounds each of them).
        for channel in channels:
            await channel.close(grace=self.options.call_timeout_s)


def _canceller(call: Any) -> Callable[[object], None]:
    def cancel(_: object) -> None:
        call.cancel()

    return cancel


def options_with(options: ClientOptions | None, **changes: Any) -> ClientOptions:
    """A copy of ``options`` (or the defaults) with ``changes`` applied."""
    return replace(options or ClientOptions(), **changes)
