"""Events for the device: the gateway's event stream, and the inbox the application reads.

Events (escalation answers, commands, errors about rejected messages) come from the gateway
in use: always on its ``Subscribe`` stream (:class:`EventStream`), and with MQTT also on
``devices/<id>/events``. The stream follows the device from gateway to gateway and resumes
after the last event id it saw at each gateway.

:class:`EventInbox` is where they wait for :meth:`DeviceClient.events`. It hands each event
to the application once:

* **by event id** (the last 4096 in memory): the same event arriving both ways, over gRPC and
  over MQTT. A gateway's event ids are unique (a random per-process prefix and a counter).
* **by escalation id**: a gateway hands its stored answers to its event hub again after it
  restarts (new event ids, same answers), and a device that moved between gateways hears
  the answers of each when it comes back. The escalation ids of answers the application was
  given are kept in the outbox's database (:meth:`DiskQueue.remember_answer
  <device_sdk._queue.DiskQueue.remember_answer>`, the last 4096 ids), so a device restart
  does not hand old answers out again either.

An answer is recorded as given just before :meth:`EventInbox.next` returns it. So a device
stopped with answers still waiting in the inbox gets them again from the gateway (they were
never given), and only a crash between that record and the application's own handling can
lose one: exactly once, except at most once across a crash at that instant.
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from device_sdk._aio import wait_either
from device_sdk._grpc import Refused, classify
from device_sdk._queue import DiskQueue
from device_sdk._types import DeviceEvent, EscalationAnswer, GatewayInfo
from device_sdk.errors import DeviceRevoked
from protos.edgeward.v1 import gateway_pb2, gateway_pb2_grpc

__all__ = ["REMEMBER_EVENT_IDS", "EventInbox", "EventStream"]

#: Event ids remembered (in memory) to drop an event that arrives both ways.
REMEMBER_EVENT_IDS = 4096


def _answer_id(event: DeviceEvent) -> str:
    return event.kind.escalation_id if isinstance(event.kind, EscalationAnswer) else ""


def _canceller(call: Any) -> Callable[[object], None]:
    def cancel(_: object) -> None:
        call.cancel()

    return cancel


class EventInbox:
    """A bounded buffer of events, each handed out once (see the module docstring).

    When ``maxsize`` events wait (0: unbounded) the oldest goes first (counted in
    :attr:`dropped`); a dropped answer was never given, so the gateway may hand it again.
    """

    def __init__(self, *, maxsize: int, store: Callable[[], DiskQueue]) -> None:
        self.maxsize = maxsize
        self._store = store
        self._buffer: collections.deque[DeviceEvent] = collections.deque()
        self._ready = asyncio.Event()
        self._event_ids: collections.OrderedDict[str, None] = collections.OrderedDict()
        #: Escalation ids given to the application (persisted; loaded by :meth:`load`).
        self._given: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._remember = 4096
        #: Escalation ids of answers waiting in the buffer.
        self._waiting: set[str] = set()
        self.dropped = 0
        self.duplicates = 0

    async def load(self) -> None:
        """Read which answers were given before (by an earlier run of this device)."""
        store = self._store()
        ids = await asyncio.to_thread(store.answers_seen)
        self._remember = store.remember_answers
        self._given = collections.OrderedDict.fromkeys(ids)

    def __len__(self) -> int:
        return len(self._buffer)

    def offer(self, event: DeviceEvent) -> bool:
        """Take an event from a transport; ``False`` when it was seen already."""
        if event.event_id:
            if event.event_id in self._event_ids:
                return False
            self._event_ids[event.event_id] = None
            if len(self._event_ids) > REMEMBER_EVENT_IDS:
                self._event_ids.popitem(last=False)
        answer = _answer_id(event)
        if answer:
            if answer in self._given or answer in self._waiting:
                self.duplicates += 1
                return False
            self._waiting.add(answer)
        if 0 < self.maxsize <= len(self._buffer):
            self._waiting.discard(_answer_id(self._buffer.popleft()))
            self.dropped += 1
        self._buffer.append(event)
        self._ready.set()
        return True

    async def next(self, stopping: asyncio.Event) -> DeviceEvent | None:
        """The next event; ``None`` once ``stopping`` is set with nothing waiting."""
        while not self._buffer:
            if stopping.is_set():
                return None
            self._ready.clear()
            await wait_either(self._ready, stopping)
        event = self._buffer[0]
        answer = _answer_id(event)
        if answer:
            # Recorded before it is handed over; the event stays first in the buffer until
            # then, so a caller cancelled meanwhile loses nothing (recording is idempotent).
            try:
                await asyncio.to_thread(self._store().remember_answer, answer)
            except RuntimeError:
                if stopping.is_set():
                    return None  # the outbox closed under us: the client is stopping
                raise
            self._given[answer] = None
            if len(self._given) > self._remember:
                self._given.popitem(last=False)
            self._waiting.discard(answer)
        if self._buffer and self._buffer[0] is event:
            self._buffer.popleft()
        return event


class EventStream:
    """The ``Subscribe`` stream to the gateway in use, reopened whenever the route changes.

    Also with MQTT: this stream is where a gateway tells a revoked device so, finally (a
    broker can only refuse its TLS handshake, which MQTT clients report as a time-out).
    """

    def __init__(
        self,
        *,
        device_id: str,
        current: Callable[[], GatewayInfo | None],
        stub: Callable[[GatewayInfo], gateway_pb2_grpc.DeviceGatewayAsyncStub],
        deliver: Callable[[DeviceEvent], object],
        route: asyncio.Event,
        route_changed: asyncio.Event,
        stopping: asyncio.Event,
        log: Any,
        rng: random.Random | None = None,
    ) -> None:
        self._device_id = device_id
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not secrets)
        self._current = current
        self._stub = stub
        self._deliver = deliver
        self._route = route
        self._route_changed = route_changed
        self._stopping = stopping
        self._log = log
        #: The last event id seen at each gateway: a new stream there resumes after it.
        self.last_event_id: dict[str, str] = {}

    async def run(self) -> None:
        """Until the client stops; raises :class:`DeviceRevoked` when the gateway says so."""
        backoff = 0.2
        while not self._stopping.is_set():
            await self._route.wait()
            gateway = self._current()
            if gateway is None or self._stopping.is_set():
                await asyncio.sleep(0.05)  # the route is being re-chosen
                continue
            self._route_changed.clear()
            try:
                call = self._stub(gateway).Subscribe(
                    gateway_pb2.SubscribeRequest(
                        after_event_id=self.last_event_id.get(gateway.gateway_id, "")
                    )
                )
            except grpc.aio.UsageError:
                await asyncio.sleep(0.05)  # the channel was just replaced (renewal)
                continue
            watcher = asyncio.ensure_future(self._route_changed.wait())
            # Bound to this call: the callback also runs (later) when the watcher is
            # cancelled, by which time the next call may exist.
            watcher.add_done_callback(_canceller(call))
            try:
                async for msg in call:
                    backoff = 0.2
                    self.last_event_id[gateway.gateway_id] = msg.event_id
                    self._deliver(DeviceEvent.from_proto(msg))
                if not self._route_changed.is_set():
                    # The gateway ended the stream (shutting down): do not spin.
                    await asyncio.sleep(self._rng.uniform(0.0, backoff))  # full jitter
                    backoff = min(backoff * 2, 5.0)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the client is stopping
                # grpc.aio ends a call cancelled on our side (the route changed) with
                # CancelledError: open the stream again, at the gateway now in use.
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.CANCELLED:
                    err = classify(exc, device_id=self._device_id)
                    if isinstance(err, DeviceRevoked):
                        raise err from exc
                    if isinstance(err, Refused):
                        self._log.warning("event stream refused", reason=str(err))
                    await asyncio.sleep(self._rng.uniform(0.0, backoff))  # full jitter
                    backoff = min(backoff * 2, 5.0)
            finally:
                watcher.cancel()
                call.cancel()
