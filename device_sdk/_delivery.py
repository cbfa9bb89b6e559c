"""The sending half of the device client: drain the outbox to the gateway in use.

:class:`Delivery` owns what happens to an item once it is in the on-disk outbox:

* the **sender** reads a few items ahead, keeps ``max_in_flight`` calls open, and removes an
  item from the outbox only once a gateway answered for it (concurrent removals share one
  commit);
* the **transport**: a unary gRPC call (``Detect``, ``ReportTelemetry``) on the client's
  channel to the gateway, a frame on the long-lived ``StreamDetect`` call to it
  (:mod:`device_sdk._stream`; telemetry stays unary), or a publish on the MQTT session to
  that gateway's broker, which :meth:`Delivery.mqtt_loop` keeps connected to whichever
  gateway is in use.

:class:`Outcomes` hands each frame's outcome to the ``detect`` call waiting for it, or else
to the bounded buffer :meth:`DeviceClient.results` reads (the oldest go first when full).

What each failure means is decided in :mod:`device_sdk._grpc`: a gateway that is down is
reported to the client (which fails over at once) and the item stays queued; a busy gateway
(over MQTT also a broker that refused the publication in its PUBACK) is retried after its
retry-after, if any, and a short jittered pause, the item still queued; a refused frame
leaves the outbox as :class:`~device_sdk.FrameRejected` with the server's reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import functools
import random
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from device_sdk._aio import wait_either
from device_sdk._grpc import Busy, GatewayDown, Refused, classify
from device_sdk._mqtt import MqttSession
from device_sdk._options import ClientOptions
from device_sdk._queue import DiskQueue, QueuedItem
from device_sdk._stream import FrameStreams, Resend
from device_sdk._types import (
    DetectionResult,
    DeviceEvent,
    FrameOutcome,
    FrameRejected,
    GatewayInfo,
    Transport,
    timestamp,
)
from protos.edgeward.v1 import common_pb2, gateway_pb2_grpc

__all__ = ["Delivery", "Outcomes", "Wiring"]

Job = Callable[[], Coroutine[Any, Any, None]]


class Outcomes:
    """Outcomes of submitted frames: to their ``detect`` caller, else to a buffer of
    ``maxsize`` (0: unbounded, as with :class:`asyncio.Queue`)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._waiters: dict[str, asyncio.Future[FrameOutcome]] = {}
        self._buffer: collections.deque[FrameOutcome] = collections.deque()
        self._ready = asyncio.Event()
        self.answered = 0
        self.rejected = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._buffer)

    def expect(self, frame_id: str) -> asyncio.Future[FrameOutcome]:
        """A future for ``frame_id``'s outcome, which then skips the buffer."""
        fut: asyncio.Future[FrameOutcome] = asyncio.get_running_loop().create_future()
        self._waiters[frame_id] = fut
        return fut

    def forget(self, frame_id: str) -> None:
        self._waiters.pop(frame_id, None)

    def fail_waiters(self, exc: BaseException) -> None:
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(exc)

    def deliver(self, outcome: FrameOutcome) -> None:
        if isinstance(outcome, FrameRejected):
            self.rejected += 1
        else:
            self.answered += 1
        waiter = self._waiters.get(outcome.frame_id)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(outcome)
            return
        if 0 < self.maxsize <= len(self._buffer):
            self._buffer.popleft()
            self.dropped += 1
        self._buffer.append(outcome)
        self._ready.set()

    async def next(self, stopping: asyncio.Event) -> FrameOutcome | None:
        """The next buffered outcome; ``None`` once ``stopping`` is set with none left."""
        while not self._buffer:
            if stopping.is_set():
                return None
            self._ready.clear()
            await wait_either(self._ready, stopping)
        return self._buffer.popleft()


@dataclass(frozen=True, slots=True, kw_only=True)
class Wiring:
    """What :class:`Delivery` needs from the client that owns it."""

    device_id: str
    options: ClientOptions
    #: The outbox (raises ``ClientClosed`` once the client is closed).
    queue: Callable[[], DiskQueue]
    #: The gateway in use now, ``None`` while none is reachable.
    current: Callable[[], GatewayInfo | None]
    stub: Callable[[GatewayInfo], gateway_pb2_grpc.DeviceGatewayAsyncStub]
    #: A client TLS context on the current certificate that demands this gateway's pinned
    #: name (blocking: reads key files).
    ssl_context: Callable[[GatewayInfo], ssl.SSLContext]
    #: Start a job in the client's task group.
    spawn: Callable[[Job, str], None]
    gateway_failed: Callable[[GatewayInfo, str], None]
    deliver: Callable[[FrameOutcome], None]
    deliver_event: Callable[[DeviceEvent], object]
    #: Set while a gateway is selected.
    route: asyncio.Event
    #: Set when there may be something new to send.
    work: asyncio.Event
    stopping: asyncio.Event
    rng: random.Random
    log: Any


class Delivery:
    """The sender and the transports of one client (see the module docstring)."""

    def __init__(self, wiring: Wiring) -> None:
        self._w = wiring
        self._opts = wiring.options
        self.in_flight: set[int] = set()
        self._resume_at = 0.0  # time.monotonic(): no sending before (a retry-after)
        self.telemetry_sent = 0
        self._removals: list[tuple[int, asyncio.Future[None]]] = []
        self._removing = False
        self._mqtt: MqttSession | None = None
        # Set to end the MQTT session (the gateway changed, the certificate was renewed,
        # the client stops); the loop opens a new one while the client runs.
        self._mqtt_stop = asyncio.Event()
        self.streams: FrameStreams | None = (
            FrameStreams(
                device_id=wiring.device_id,
                stub=wiring.stub,
                call_timeout_s=self._opts.call_timeout_s,
                log=wiring.log,
            )
            if self._opts.transport is Transport.GRPC_STREAM
            else None
        )

    async def close(self) -> None:
        """End the transport's long-lived calls (the frames on them stay in the outbox)."""
        if self.streams is not None:
            await self.streams.close()

    def restart_transport(self) -> None:
        """End the MQTT session so that a new one opens (to the gateway now in use, on the
        certificate now in use). Harmless with gRPC."""
        self._mqtt_stop.set()

    # -- the sender ------------------------------------------------------------------------

    def hold_until(self, at: float) -> None:
        """Send nothing before ``at`` (a :func:`time.monotonic` value): a retry-after."""
        self._resume_at = max(self._resume_at, at)

    async def drain_loop(self) -> None:
        """Send queued items in acceptance order, ``max_in_flight`` at a time."""
        w = self._w
        window = asyncio.Semaphore(self._opts.max_in_flight)
        # Read a few items ahead: one disk read per batch instead of one per frame.
        ahead: collections.deque[QueuedItem] = collections.deque()
        batch = self._opts.max_in_flight * 4
        while not w.stopping.is_set():
            await w.route.wait()
            if w.stopping.is_set():
                return
            await window.acquire()
            if (wait := self._resume_at - time.monotonic()) > 0:
                # A gateway asked for a pause (retry-after): honour it for every item.
                await asyncio.sleep(wait)
            if not ahead:
                w.work.clear()
                ahead.extend(
                    await asyncio.to_thread(
                        w.queue().peek, batch, exclude=frozenset(self.in_flight)
                    )
                )
            gateway = w.current()
            if not ahead or gateway is None:
                window.release()
                if gateway is not None:
                    await w.work.wait()
                else:
                    await asyncio.sleep(0.05)  # the route is being re-chosen
                continue
            item = ahead.popleft()
            if item.seq in self.in_flight:  # sent again after a failure meanwhile
                window.release()
                continue
            self.in_flight.add(item.seq)
            w.spawn(functools.partial(self._send, item, gateway, window), "send")

    async def _send(
        self, item: QueuedItem, gateway: GatewayInfo, window: asyncio.Semaphore
    ) -> None:
        """Send one queued item. It leaves the queue (and then the in-flight set, in that
        order, so the sender cannot pick it up twice) only once a gateway answered for it."""
        w = self._w
        try:
            outcome: FrameOutcome | None = None
            try:
                if item.kind == "frame":
                    outcome = await self._call_detect(gateway, item)
                else:
                    await self._call_telemetry(gateway, item)
            except GatewayDown as exc:
                w.gateway_failed(gateway, str(exc))
                return
            except Resend:
                return  # the stream ended before judging it (idle, or a frame ahead refused)
            except Busy as exc:
                w.log.info("gateway busy; backing off", gateway=gateway.gateway_id, reason=str(exc))
                if exc.retry_after_s is not None:
                    # The gateway said when: nothing more is sent to it before then.
                    self.hold_until(time.monotonic() + exc.retry_after_s)
                    await asyncio.sleep(exc.retry_after_s)
                await asyncio.sleep(0.05 + w.rng.random() * 0.2)
                return
            except Refused as exc:
                if item.kind == "telemetry":
                    w.log.warning("telemetry refused", code=exc.code, reason=exc.reason)
                else:
                    outcome = FrameRejected(item.frame_id, exc.code, exc.reason, gateway.gateway_id)
            await self._remove(item.seq)
            if outcome is not None:
                w.deliver(outcome)
            elif item.kind == "telemetry":
                self.telemetry_sent += 1
        finally:
            self.in_flight.discard(item.seq)
            window.release()
            w.work.set()

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
                        await asyncio.to_thread(self._w.queue().remove_many, [s for s, _ in batch])
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

    # -- the transports --------------------------------------------------------------------

    async def _call_detect(self, gateway: GatewayInfo, item: QueuedItem) -> FrameOutcome:
        timeout = self._opts.call_timeout_s
        if self._opts.transport is Transport.MQTT:
            session = await self._mqtt_session(gateway)
            return await session.detect(
                item.frame_id, item.payload, item.captured_at, timeout_s=timeout
            )
        if self.streams is not None:
            return await self.streams.detect(gateway, item)
        frame = common_pb2.Frame(image=item.payload, frame_id=item.frame_id)
        frame.captured_at.CopyFrom(timestamp(dt.datetime.fromtimestamp(item.captured_at, dt.UTC)))
        try:
            reply = await self._w.stub(gateway).Detect(frame, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise classify(exc, device_id=self._w.device_id) from exc
        except grpc.aio.UsageError as exc:
            # The channel was replaced (renewal) between picking it and calling: try again.
            raise Busy("channel replaced") from exc
        return DetectionResult.from_proto(reply)

    async def _call_telemetry(self, gateway: GatewayInfo, item: QueuedItem) -> None:
        timeout = self._opts.call_timeout_s
        if self._opts.transport is Transport.MQTT:
            session = await self._mqtt_session(gateway)
            await session.telemetry(item.payload, timeout_s=timeout)
            return
        try:
            await self._w.stub(gateway).ReportTelemetry(
                common_pb2.Telemetry.FromString(item.payload), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise classify(exc, device_id=self._w.device_id) from exc
        except grpc.aio.UsageError as exc:
            raise Busy("channel replaced") from exc

    async def _mqtt_session(self, gateway: GatewayInfo) -> MqttSession:
        """The MQTT session to ``gateway`` once it is connected.

        Not being connected *yet* is :class:`Busy` (wait, keep the item), not a gateway
        failure: the MQTT loop reports real connection failures itself.
        """
        deadline = time.monotonic() + self._opts.connect_timeout_s
        while time.monotonic() < deadline:
            session = self._mqtt
            if session is not None and session.gateway == gateway:
                if session.ready.is_set():
                    return session
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                        await session.ready.wait()
                continue
            if self._w.current() != gateway:
                raise Busy("the gateway changed while connecting")
            await asyncio.sleep(0.05)
        raise Busy("MQTT session not connected yet")

    async def mqtt_loop(self) -> None:
        """Keep one MQTT session open to the gateway in use, until the client stops."""
        w = self._w
        while not w.stopping.is_set():
            await w.route.wait()
            gateway = w.current()
            if gateway is None or w.stopping.is_set():
                await asyncio.sleep(0.05)  # the route is being re-chosen
                continue
            self._mqtt_stop.clear()
            ctx = await asyncio.to_thread(w.ssl_context, gateway)
            session = MqttSession(
                device_id=w.device_id,
                gateway=gateway,
                ssl_context=ctx,
                connect_timeout_s=self._opts.connect_timeout_s,
                on_event=w.deliver_event,
            )
            self._mqtt = session
            w.work.set()
            try:
                await session.run(self._mqtt_stop)
            except GatewayDown as exc:
                if w.current() == gateway:
                    w.gateway_failed(gateway, str(exc))
                await asyncio.sleep(0.2)
            finally:
                if self._mqtt is session:
                    self._mqtt = None
