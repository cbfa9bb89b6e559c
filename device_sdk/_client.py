"""The device client: identity, nearest gateway, frames, events, telemetry, renewal, outbox.

Lifecycle (:class:`~device_sdk.ClientState`)::

    NEW --__aenter__--> RUNNING --__aexit__--> CLOSING --> CLOSED
                           |
                           +-- revoked / certificate expired --> FAILED (final)

Background work runs in one task group owned by the client: the prober (health-check round
trips to every gateway, re-ranking; here), the sender and the MQTT session when MQTT is the
transport (:mod:`device_sdk._delivery`), the event stream (``Subscribe``;
:mod:`device_sdk._events`, which also hands each event to the application once), and
certificate renewal (:mod:`device_sdk._renewal`).

Every frame passes through the on-disk outbox (see :mod:`device_sdk._queue`): ``submit``
returns once the frame is committed there, and it leaves only when a gateway answered for it.
So a gateway failing mid-call, no gateway at all, or a restart of the device loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import random
import ssl
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import structlog

import pki
from device_sdk._delivery import Delivery, Outcomes, Wiring
from device_sdk._enrollment import renew
from device_sdk._events import EventInbox, EventStream
from device_sdk._grpc import ChannelPool, GatewayDown, probe
from device_sdk._identity import DeviceIdentity, load_gateway_directory
from device_sdk._mqtt import mqtt_ssl_context
from device_sdk._options import ClientOptions, ClientStats, options_with
from device_sdk._queue import DiskQueue, QueueStats
from device_sdk._renewal import RenewalPlan, plan_renewal, run_renewal
from device_sdk._selection import GatewaySelector, offline_pause
from device_sdk._types import (
    ClientState,
    DetectionResult,
    DeviceEvent,
    FrameOutcome,
    FrameRejected,
    GatewayInfo,
    Telemetry,
    Transport,
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
from protos.edgeward.v1 import gateway_pb2_grpc

__all__ = ["ClientOptions", "ClientStats", "DeviceClient", "options_with"]

_log = structlog.get_logger(__name__)


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
        self._outcomes = Outcomes(self.options.results_buffer)
        self._inbox = EventInbox(maxsize=self.options.events_buffer, store=lambda: self._q)
        self._delivery = Delivery(
            Wiring(
                device_id=self.device_id,
                options=self.options,
                queue=lambda: self._q,
                current=lambda: self._selector.current,
                stub=self._stub,
                # Read at each connection: the identity changes when the client renews.
                ssl_context=self._mqtt_ssl_context,
                spawn=self._spawn,
                gateway_failed=self._gateway_failed,
                deliver=self._outcomes.deliver,
                deliver_event=self._inbox.offer,
                route=self._route,
                work=self._work,
                stopping=self._stopping,
                rng=self._rng,
                log=self._log,
            )
        )
        self._stream = EventStream(
            device_id=self.device_id,
            current=lambda: self._selector.current,
            stub=self._stub,
            deliver=self._inbox.offer,
            route=self._route,
            route_changed=self._route_changed,
            stopping=self._stopping,
            log=self._log,
            rng=self._rng,
        )
        self._plan: RenewalPlan | None = None
        self._n = dict.fromkeys(("sub", "fail", "ren"), 0)
        self._carried_over = 0

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
            answered=self._outcomes.answered,
            rejected=self._outcomes.rejected,
            telemetry_sent=self._delivery.telemetry_sent,
            failovers=self._n["fail"],
            renewals=self._n["ren"],
            results_dropped=self._outcomes.dropped,
            queue=queue,
            gateways_up=tuple(
                g.gateway_id
                for g in self._selector.gateways
                if self._selector.status(g.gateway_id).up(now)
            ),
            answers_repeated=self._inbox.duplicates,
            carried_over=self._carried_over,
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
        # Counted before the sender starts: their outcomes arrive in this run.
        self._carried_over = self._queue.stats().frames
        await self._inbox.load()
        self._channels = ChannelPool(await asyncio.to_thread(self._credentials))
        self._plan = self._replan(self.identity.not_before, self.identity.not_after)
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._state = ClientState.RUNNING
        try:
            await self._probe_all()
            self._spawn(self._probe_loop, "probe")
            self._spawn(self._delivery.drain_loop, "sender")
            if opts.transport is Transport.MQTT:
                self._spawn(self._delivery.mqtt_loop, "mqtt")
            if opts.subscribe_events:
                # Also with MQTT: the gRPC event stream is where a gateway tells a revoked
                # device so, finally. Events arriving both ways are delivered once.
                self._spawn(self._stream.run, "events")
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
        self._delivery.restart_transport()
        for task in list(self._tasks):
            task.cancel()
        if self._tg is not None:
            tg, self._tg = self._tg, None
            await tg.__aexit__(None, None, None)
        await self._delivery.close()
        self._outcomes.fail_waiters(self._final or ClientClosed("the client was closed"))
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
        self._delivery.restart_transport()
        self._outcomes.fail_waiters(exc)
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
        fut = self._outcomes.expect(fid)
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
            self._outcomes.forget(fid)
        if isinstance(outcome, FrameRejected):
            raise RequestRefused(outcome.code, outcome.reason)
        return outcome

    async def results(self) -> AsyncGenerator[FrameOutcome, None]:
        """Outcomes of submitted frames, as they arrive (ends when the client closes;
        raises the final error if the device was revoked or its certificate expired)."""
        while True:
            if not len(self._outcomes):
                if self._final is not None:
                    raise self._final
                if self._state is not ClientState.RUNNING:
                    return
            outcome = await self._outcomes.next(self._stopping)
            if outcome is not None:
                yield outcome

    async def events(self) -> AsyncGenerator[DeviceEvent, None]:
        """Escalation answers, commands and error events for this device.

        Each escalation answer is yielded once per device, also when gateways hand it out
        again (after a restart, or another gateway's copy) and across restarts of the device
        (the last 4096 answer ids are kept in the outbox database; see
        :mod:`device_sdk._events`). Ends when the client closes; raises the final error if
        the device was revoked or its certificate expired.
        """
        while True:
            if not len(self._inbox):
                if self._final is not None:
                    raise self._final
                if self._state is not ClientState.RUNNING:
                    return
            event = await self._inbox.next(self._stopping)
            if event is not None:
                yield event

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
                while len(self._q) or self._delivery.in_flight:
                    self._check_usable()
                    await asyncio.sleep(0.02)
        except TimeoutError:
            return False
        return True

    # -- connections -----------------------------------------------------------------------

    def _stub(self, gateway: GatewayInfo) -> gateway_pb2_grpc.DeviceGatewayAsyncStub:
        if self._channels is None:
            raise ClientClosed("the client is not started")
        return self._channels.stub(gateway.grpc_address, gateway.gateway_id)

    def _channel(self, gateway: GatewayInfo) -> grpc.aio.Channel:
        if self._channels is None:
            raise ClientClosed("the client is not started")
        return self._channels.get(gateway.grpc_address, gateway.gateway_id)

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
        self._delivery.restart_transport()
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
        offline_rounds = 0
        while not self._stopping.is_set():
            if self._selector.current is not None:
                offline_rounds = 0
                # Jitter spreads a fleet's probes over time.
                pause = self.options.probe_interval_s * (0.9 + 0.2 * self._rng.random())
            else:
                pause = offline_pause(
                    offline_rounds,
                    base_s=min(
                        self.options.offline_probe_interval_s, self.options.probe_interval_s
                    ),
                    max_s=max(
                        self.options.offline_probe_max_s, self.options.offline_probe_interval_s
                    ),
                    rng=self._rng,
                )
                offline_rounds += 1
            await asyncio.sleep(pause)
            await self._probe_all()

    # -- renewal ---------------------------------------------------------------------------

    def _mqtt_ssl_context(self, gateway: GatewayInfo) -> ssl.SSLContext:
        """A TLS context for ``gateway``'s broker that demands the gateway's pinned name.

        Only a gateway whose gRPC probe succeeded is in use, and the probe's channel already
        needed a valid id (``ChannelPool``), so the name can always be made here.
        """
        return mqtt_ssl_context(self.identity.files, gateway.gateway_id)

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
        self._delivery.restart_transport()
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
