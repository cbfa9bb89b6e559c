"""The gateway's MQTT bridge: topics, acknowledgements and de-duplication around the front door.

:class:`MqttBridge` connects to the broker with the gateway's own mTLS identity (and, on a
managed broker, the per-start bridge password) and:

* consumes ``devices/+/frames`` through the MQTT 5 shared subscription
  ``$share/<group>/devices/+/frames`` (``frame_workers`` clients share the load) and hands each
  frame to the gateway's :class:`~gateway._door.FrontDoor` — the same admission, fair turn,
  engine and escalation hook as gRPC — then publishes the ``DetectionResult`` to
  ``devices/<id>/detections`` with the frame's correlation data: JSON (protobuf's JSON
  mapping) for a bare JPEG/PNG, protobuf for a ``Frame`` protobuf (content type
  ``application/x-protobuf``);
* hands ``devices/+/telemetry`` to its :class:`~gateway._mqtt._ingest.TelemetryIngest`
  (``telemetry_workers`` processes, or the bridge's own consumers when that is 0), which keeps
  the latest validated state per device in the front door's one telemetry store;
* forwards every event of the gateway's :class:`~gateway._events.EventHub` (escalation
  answers, commands, and the front door's error events about refused messages) to
  ``devices/<id>/events``.

**Admission on receipt.** A frame is admitted (:meth:`~gateway._door.FrontDoor.admit_now`)
the moment it is read, before any task, parsing or queueing: a device over its budget, not
allowed, or revoked is refused and acknowledged at once, at the cost of a look-up and a
token-bucket check, so a flood drains from the broker as fast as it arrives and never queues
in front of another device's frames. Admitted frames then wait their device's turn at the
front door (round robin across devices). Refusals are counted exactly (Prometheus, ``stats``)
and audited in bounded lines; error events about them are bounded per device per interval.
A device refused ``disconnect_after_refusals`` frames within a second is disconnected from
the managed broker
(:class:`~gateway._mqtt._floodgate.FloodGate`), so its flood stops costing the broker and the
bridge its reading and stops queueing ahead of other devices' frames. Answers and events
go out on a connection of their own, never behind the frames coming in.

**Where the device id comes from.** Identity is read from the TLS layer only; the bridge never
sees the publisher's certificate, but the broker does: its ACL lets a certificate with CN
``X`` write only ``devices/X/frames`` and ``devices/X/telemetry`` (``_mosquitto_conf``), so
the topic's id *is* the certificate's CN. The front door still re-validates the id against the
id pattern (a certificate from the CA with an odd CN must not become a device here) and checks
revocation for it (a message published before the kick may still be queued):
:class:`~gateway._door.TopicIdentity`.

**Delivery.** QoS 1 both ways; the bridge's sessions are persistent (``clean_start`` false,
``session_expiry_s``) so what the broker accepted while the bridge was away, or across a
broker restart (persistence on), is delivered when it reconnects (jittered, doubling backoff).
Redelivery can repeat a frame: answers are remembered by (device, frame id) in a bounded LRU,
so a repeated frame gets the same answer again without a second model run. A frame is
acknowledged to the broker only once its answer (or refusal) is out
(:class:`~gateway._mqtt._acks.Acks`): what a crashed gateway had received is delivered again
(at least once to the model).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

import aiomqtt
import structlog
from google.protobuf.message import DecodeError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

import pki
from gateway._door import (
    Admitted,
    FrontDoor,
    TelemetryRecord,
    TopicIdentity,
    encode,
    event_to_pb,
)
from gateway._events import DeviceEvent, ErrorEvent
from gateway._mqtt._acks import Ack, Acks
from gateway._mqtt._config import NODELAY, MqttSettings, internal_name
from gateway._mqtt._floodgate import FloodGate, Kicker
from gateway._mqtt._ingest import TelemetryIngest
from gateway._mqtt._ingest_limit import BrokerRefusal
from gateway._mqtt._tasks import TaskSet
from gateway._mqtt._telemetry import (
    PROTOBUF_CONTENT_TYPE,
    WorkerOptions,
    device_from_topic,
)
from gateway.errors import GatewayError, InvalidRequest, RateLimited
from protos.edgeward.v1 import common_pb2

__all__ = ["BridgeConnection", "BridgeStats", "MqttBridge"]

_log = structlog.get_logger(__name__)

#: Longest frame id (correlation data or ``Frame.frame_id``) accepted.
MAX_FRAME_ID = 128


@dataclass(frozen=True, slots=True)
class BridgeConnection:
    """How the bridge reaches the broker: address, the gateway's identity, optional login."""

    host: str
    port: int
    identity: pki.IdentityFiles
    username: str | None = None
    password: str | None = None
    check_hostname: bool = True

    def __repr__(self) -> str:  # never show the password
        return f"BridgeConnection({self.host}:{self.port}, username={self.username!r})"

    def ssl_context(self) -> ssl.SSLContext:
        return pki.client_ssl_context(self.identity, check_hostname=self.check_hostname)


@dataclass(slots=True)
class BridgeStats:
    """The bridge's counters (exported to Prometheus as ``edgeward_mqtt_*``)."""

    frames_received: int = 0
    frames_inferred: int = 0
    frames_duplicate: int = 0
    frames_rejected: int = 0
    telemetry_received: int = 0
    telemetry_rejected: int = 0
    events_published: int = 0
    reconnects: int = 0
    rejected_topics: int = 0
    #: Messages the broker's ingest limit refused before they reached the bridge.
    broker_refused: int = 0
    #: Connections the broker's ingest limit ended for flooding.
    broker_disconnects: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)

    def counters(self) -> dict[str, float | dict[str, float]]:
        """The counters by series name (``refused`` by reason), for Prometheus."""
        out: dict[str, float | dict[str, float]] = {
            name: float(getattr(self, name))
            for name in self.__dataclass_fields__
            if name != "by_reason"
        }
        out["refused"] = {reason: float(n) for reason, n in dict(self.by_reason).items()}
        return out


@dataclass(slots=True)
class _Answer:
    payload: bytes
    content_type: str
    correlation: bytes | None


class MqttBridge:
    """Frames and telemetry in through the front door, detections and events out.

    An async context manager; its clients and workers run in one task group. ``door`` is the
    gateway's front door (admission, pipeline, telemetry store, refusals, event hub).
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        connection: BridgeConnection,
        door: FrontDoor,
        control: Kicker | None = None,
    ) -> None:
        self.settings = settings
        self._conn = connection
        self._door = door
        self._gateway_id = door.gateway_id
        self.stats = BridgeStats()
        #: Disconnects a flooding device (managed broker: ``control``).
        self.gate = (
            FloodGate(control, tell=self._tell_flooding)
            if control is not None and settings.disconnect_after_refusals > 0
            else None
        )
        self._answers: OrderedDict[tuple[str, bytes], asyncio.Future[_Answer | None]] = (
            OrderedDict()
        )
        self._protobuf_devices: OrderedDict[str, bool] = OrderedDict()
        self._clients: dict[int, aiomqtt.Client] = {}
        # Answers and events go out on a connection of their own (see _publisher).
        self._out: aiomqtt.Client | None = None
        self._out_connected = asyncio.Event()
        self._outbox: asyncio.Queue[tuple[str, DeviceEvent]] = asyncio.Queue(maxsize=10_000)
        self._tasks = TaskSet("mqtt-bridge")
        self._frames = TaskSet("mqtt-frames")
        self._ingest = TelemetryIngest(
            settings,
            door=door,
            stats=self.stats,
            worker_options=self._worker_options,
            prefer=self._prefer,
            refused=self._refused,
            reject_topic=self._reject_topic,
            on_connected=self._check_ready,
        )
        self._subscribed = 0
        self._ready = asyncio.Event()
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._reap_stale_sessions()
        for i in range(self.settings.frame_workers):
            self._tasks.spawn(self._consume(i), name=f"mqtt-consumer-{i}")
        self._tasks.spawn(self._publisher(), name="mqtt-publisher")
        self._tasks.spawn(self._forward_events(), name="mqtt-events")
        self._tasks.spawn(self._ingest.admit_loop(), name="mqtt-telemetry-admission")
        self._ingest.start()
        self._door.events.add_listener(self._on_hub_event)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        hub: Any = self._door.events
        if hasattr(hub, "remove_listener"):
            hub.remove_listener(self._on_hub_event)
        if self.gate is not None:
            await self.gate.aclose()
        await self._tasks.close()
        await self._frames.close()
        await self._ingest.stop()

    async def _reap_stale_sessions(self) -> None:
        """End persistent sessions of consumers this configuration no longer runs.

        A shared subscription keeps handing an offline member its share of the messages
        until its session expires; after ``frame_workers`` or ``telemetry_workers`` is lowered
        those shares would wait ``session_expiry_s``. Connecting with a clean start and no
        session expiry under each unused consumer id ends its session at once.
        """
        stale = [self._client_id("frames", i) for i in range(self.settings.frame_workers, 16)]
        stale += [
            self._client_id("telemetry", i) for i in range(self.settings.telemetry_workers, 32)
        ]

        async def end(client_id: str) -> None:
            client = self._new_client(client_id, persistent=False)
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with client:
                    pass

        async with asyncio.TaskGroup() as tg:
            for client_id in stale:
                tg.create_task(end(client_id))

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Return once every frame consumer has subscribed (and telemetry workers connected)."""
        async with asyncio.timeout(timeout_s):
            await self._ready.wait()

    def _check_ready(self) -> None:
        if (
            self._subscribed >= self.settings.frame_workers
            and self._out_connected.is_set()
            and self._ingest.workers_connected()
        ):
            self._ready.set()

    # -- telemetry -------------------------------------------------------------------------

    def latest_telemetry(self, device_id: str) -> TelemetryRecord | None:
        """The latest valid telemetry of ``device_id`` (``None`` if none yet)."""
        return self._door.telemetry.latest(device_id)

    def _identity(self, device_id: str) -> Callable[[], TopicIdentity]:
        return lambda: TopicIdentity.judge(device_id, self._door.revocation)

    def speaks_protobuf(self, device_id: str) -> bool:
        """Whether the device's last message was protobuf (its events go out the same way)."""
        return self._protobuf_devices.get(device_id, False)

    def _prefer(self, device_id: str, protobuf: bool) -> None:
        self._protobuf_devices[device_id] = protobuf
        self._protobuf_devices.move_to_end(device_id)
        while len(self._protobuf_devices) > 100_000:
            self._protobuf_devices.popitem(last=False)

    # -- MQTT clients ----------------------------------------------------------------------

    def _client_id(self, kind: str, index: int) -> str:
        """A consumer's client id: ``_edgeward.<gateway>.<kind>-<n>``, never a device's.

        Client ids are one namespace across the broker's listeners; a device's is forced to
        its CN (a device id), which can never have this form, so no device can take over a
        consumer's connection or clean its persistent session away.
        """
        return internal_name(self._gateway_id, f"{kind}-{index}")

    def _worker_options(self, index: int) -> WorkerOptions:
        return WorkerOptions(
            worker=index,
            host=self._conn.host,
            port=self._conn.port,
            identity_dir=str(self._conn.identity.directory),
            username=self._conn.username,
            password=self._conn.password,
            client_id=self._client_id("telemetry", index),
            topic=f"$share/{self.settings.shared_group}/devices/+/telemetry",
            qos=self.settings.qos,
            max_readings=self.settings.telemetry_max_keys,
            session_expiry_s=self.settings.session_expiry_s,
            keepalive_s=self.settings.keepalive_s,
            reconnect_min_s=self.settings.reconnect_min_s,
            reconnect_max_s=self.settings.reconnect_max_s,
            check_hostname=self._conn.check_hostname,
            max_packet_bytes=self.settings.max_payload_bytes + 65536,
            connect_timeout_s=self.settings.connect_timeout_s,
        )

    def _new_client(
        self,
        client_id: str,
        *,
        persistent: bool = True,
        receive_maximum: int | None = None,
        queue_type: type[asyncio.Queue[aiomqtt.Message]] | None = None,
    ) -> aiomqtt.Client:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.session_expiry_s if persistent else 0
        if receive_maximum is not None:
            # MQTT 5 flow control: the broker sends at most this many unacknowledged QoS 1
            # messages and keeps the rest queued (durably) until acknowledgements free room.
            props.ReceiveMaximum = receive_maximum
        return aiomqtt.Client(
            self._conn.host,
            self._conn.port,
            username=self._conn.username,
            password=self._conn.password,
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=not persistent,
            properties=props,
            tls_context=self._conn.ssl_context(),
            keepalive=self.settings.keepalive_s,
            timeout=self.settings.connect_timeout_s,
            socket_options=NODELAY,
            queue_type=queue_type,
        )

    async def _consume(self, index: int) -> None:
        bridge = self
        acks: Acks | None = None

        class Inbox(asyncio.Queue[aiomqtt.Message]):
            """aiomqtt's queue of received messages, which hands each one on at once.

            A message is judged the moment it is read (a refusal is acknowledged then and
            there): no queue in between, and none of the per-message task and wait that
            iterating ``client.messages`` costs, so the bridge drains a flood as fast as it
            can read it. The iteration below only waits for the connection to end.
            """

            def put_nowait(self, item: aiomqtt.Message) -> None:
                if acks is None:  # pragma: no cover - set before every connection
                    return
                try:
                    bridge._dispatch(item, acks.track(item))
                except Exception:  # noqa: BLE001 - one bad message must not end the read loop
                    _log.exception("mqtt message handling failed", topic=item.topic.value)

        # One client object for the consumer's life (its persistent session).
        client = self._new_client(
            self._client_id("frames", index),
            receive_maximum=self.settings.max_in_flight,
            queue_type=Inbox,
        )
        # At least once to the model: a QoS 1 frame is acknowledged once its detection is
        # published (or it was refused), not on receipt, so frames a crashed gateway had
        # received stay in its persistent session and are delivered again. aiomqtt does not
        # expose paho's manual acknowledgement yet (empicano/aiomqtt#345); paho's client is
        # its documented workaround.
        paho = client._client
        paho.manual_ack_set(True)
        group = self.settings.shared_group
        topics = [f"$share/{group}/devices/+/frames"]
        telemetry = f"$share/{group}/devices/+/telemetry"
        if not self.settings.telemetry_workers:
            topics.append(telemetry)
        delay = self.settings.reconnect_min_s
        first = True
        while True:
            acks = Acks(paho)
            try:
                async with client:
                    await client.subscribe(
                        [(t, SubscribeOptions(qos=self.settings.qos)) for t in topics]
                    )
                    if self.settings.telemetry_workers:
                        # The persistent session may hold it from an earlier configuration.
                        await client.unsubscribe(telemetry)
                    self._clients[index] = client
                    if first:
                        self._subscribed += 1
                        self._check_ready()
                        first = False
                    _log.info("mqtt bridge connected", consumer=index)
                    delay = self.settings.reconnect_min_s
                    async for message in client.messages:  # ends when the connection does
                        self._dispatch(message, acks.track(message))  # pragma: no cover
            except aiomqtt.MqttError as exc:
                _log.warning("mqtt bridge disconnected", consumer=index, error=str(exc))
            finally:
                # What this connection received and has not acknowledged yet comes again on
                # the next one (same session); those answers go out then (de-duplicated).
                acks.close()
                self._clients.pop(index, None)
            self.stats.reconnects += 1
            # Full jitter: many gateways (or consumers) must not reconnect in lockstep.
            await asyncio.sleep(random.uniform(delay / 2, delay))  # noqa: S311 - not a secret
            delay = min(delay * 2, self.settings.reconnect_max_s)

    async def _publisher(self) -> None:
        """The connection that answers and events go out on, apart from the consumers'.

        A consumer's connection brings in whatever devices send, in order: during one
        device's flood, the broker's acknowledgements of our answers would arrive behind
        thousands of its frames, and the client sends only a few publications ahead of their
        acknowledgements. A connection that brings nothing in gets them in milliseconds, so
        another device's answer never waits for a flood to be read.
        """
        client = self._new_client(self._client_id("publisher", 0), persistent=False)
        delay = self.settings.reconnect_min_s
        while True:
            try:
                async with client:
                    self._out = client
                    self._out_connected.set()
                    self._check_ready()
                    delay = self.settings.reconnect_min_s
                    async for _message in client.messages:  # pragma: no cover - subscribes none
                        pass
            except aiomqtt.MqttError as exc:
                _log.warning("mqtt publisher disconnected", error=str(exc))
            finally:
                self._out = None
                self._out_connected.clear()
            self.stats.reconnects += 1
            await asyncio.sleep(random.uniform(delay / 2, delay))  # noqa: S311 - not a secret
            delay = min(delay * 2, self.settings.reconnect_max_s)

    def _dispatch(self, message: aiomqtt.Message, ack: Ack) -> None:
        topic = message.topic.value
        if topic.endswith("/telemetry"):
            try:
                self._ingest.handle(message)
            finally:
                ack.done()
            return
        device_id = device_from_topic(topic, "frames")
        if device_id is None:
            self._reject_topic()
            ack.done()
            return
        self.stats.frames_received += 1
        props = message.properties
        content_type = getattr(props, "ContentType", None) if props is not None else None
        self._prefer(device_id, content_type == PROTOBUF_CONTENT_TYPE)
        # Admitted here, on receipt: a refused frame is acknowledged at once and never
        # queues (no task, no parsing), so a device over its budget cannot hold up others.
        try:
            admitted = self._door.admit_now("Detect", self._identity(device_id))
        except GatewayError as exc:
            self._frame_refused(device_id, exc, _correlation_id(message))
            ack.done()
            return
        # Admitted frames run concurrently, each waiting for its device's turn at the front
        # door. This loop never waits for a frame: it must keep reading so that it sees a
        # lost connection (answers wait for the reconnect).
        self._frames.spawn(self._frame_task(device_id, admitted, message, ack), name="mqtt-frame")

    async def _frame_task(
        self, device_id: str, admitted: Admitted | None, message: aiomqtt.Message, ack: Ack
    ) -> None:
        try:
            if admitted is None:
                # The device's registry facts were not cached: the same steps, with a look-up.
                try:
                    admitted = await self._door.admit("Detect", self._identity(device_id))
                except GatewayError as exc:
                    self._frame_refused(device_id, exc, _correlation_id(message))
                    ack.done()
                    return
            await self._handle_frame(admitted, message)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            # The answer could not be published: left unacknowledged, the frame comes
            # again after the reconnect and its remembered answer goes out then.
            _log.warning("mqtt answer not published", error=str(exc))
            return
        except Exception:  # noqa: BLE001 - one bad frame must not stop the bridge
            _log.exception("mqtt frame handling failed", topic=message.topic.value)
        ack.done()

    async def _publish(
        self, topic: str, payload: bytes, *, content_type: str, correlation: bytes | None
    ) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ContentType = content_type
        if correlation:
            props.CorrelationData = correlation
        deadline = time.monotonic() + self.settings.frame_deadline_s + 30.0
        while True:
            try:
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    await self._out_connected.wait()
                    client = self._out
                    if client is not None:
                        # A PUBACK takes milliseconds; one that does not come means the
                        # connection died under us: publish again once reconnected (the
                        # device may see the answer twice, with the same correlation data).
                        await client.publish(
                            topic, payload, qos=self.settings.qos, properties=props, timeout=2.0
                        )
                        return
            except aiomqtt.MqttError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    # -- frames ----------------------------------------------------------------------------

    def _reject_topic(self) -> None:
        self.stats.rejected_topics += 1
        # Not a device's refusal: the CN is not a device id (or the ACL is wrong).
        self._refused(
            None, InvalidRequest("not a device topic", reason="bad_topic"), method="publish"
        )

    def _refused(
        self,
        device_id: str | None,
        exc: BaseException,
        *,
        method: str,
        frame_id: str = "",
        times: int = 1,
        **fields: Any,
    ) -> None:
        """Count ``times`` refused messages; the front door audits them and tells the
        device (once)."""
        status = self._door.refused(
            exc,
            device_id=device_id,
            transport="mqtt",
            method=method,
            frame_id=frame_id,
            notify=device_id is not None,
            times=times,
            **fields,
        )
        self.stats.by_reason[status.reason] = self.stats.by_reason.get(status.reason, 0) + times

    def _frame_refused(self, device_id: str, exc: BaseException, frame_id: str) -> None:
        self.stats.frames_rejected += 1
        self._refused(device_id, exc, method="Detect", frame_id=frame_id)
        if (
            self.gate is not None
            and isinstance(exc, RateLimited)
            and self._door.refused_recently("Detect", device_id)
            >= self.settings.disconnect_after_refusals
            and self.gate.flooding(device_id)
        ):
            # Its admitted frames still waiting for a turn are refused (answered, never
            # dropped) rather than run: each run would make another device's next frame
            # wait for it, long after the flood was cut.
            retry_after_s = exc.retry_after_s
            self._door.fair.refuse_waiting(device_id, lambda: RateLimited(device_id, retry_after_s))

    def broker_refused(self, report: BrokerRefusal) -> None:
        """Count and audit messages the broker's ingest limit refused (one report: a device's
        refusals since its last report), and tell the device once; never per message."""
        if report.frames or report.disconnected:
            # Over twice its frame budget: its frames that still get through are refused
            # for a while too, rather than run beside other devices' (FrontDoor.penalise).
            self._door.penalise(report.device_id)
        retry_after_s = max(
            1.0 / self._door.limits.frames_per_s, self._door.penalised_for(report.device_id)
        )
        self.stats.broker_refused += report.frames + report.other
        self.stats.frames_rejected += report.frames
        self.stats.telemetry_rejected += report.other
        for method, times in (("Detect", report.frames), ("ReportTelemetry", report.other)):
            if times > 0:
                exc = RateLimited(report.device_id, retry_after_s)
                self._refused(report.device_id, exc, method=method, times=times, where="broker")
        if report.disconnected:
            # The broker ended the connection itself. A device that reconnects and floods
            # again is disconnected again, many times a second: audited and told within the
            # refusal log's bounds (one line and a few events per device per interval).
            self.stats.broker_disconnects += 1
            self._door.refusals.refused(
                report.device_id,
                "flooding_disconnected",
                transport="mqtt",
                method="Detect",
                where="broker",
            )
            if self._door.refusals.allow_event(report.device_id, "RESOURCE_EXHAUSTED") is not None:
                self._tell_flooding(report.device_id)

    def _tell_flooding(self, device_id: str) -> None:
        self._door.events.publish(
            device_id,
            ErrorEvent(
                code="RESOURCE_EXHAUSTED",
                message="far over the frame budget: disconnected; honour retry-after",
            ),
        )

    async def _handle_frame(self, admitted: Admitted, message: aiomqtt.Message) -> None:
        device_id = admitted.device_id
        props = message.properties
        content_type = getattr(props, "ContentType", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        correlation = bytes(correlation) if correlation else None
        protobuf = content_type == PROTOBUF_CONTENT_TYPE
        payload = message.payload
        data = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
        frame_id = ""
        try:
            if correlation is not None:
                if len(correlation) > MAX_FRAME_ID:
                    raise InvalidRequest(
                        "correlation data (frame id) too long", reason="invalid_frame_id"
                    )
                frame_id = correlation.decode("utf-8", errors="replace")
            if protobuf:
                frame = common_pb2.Frame()
                try:
                    frame.ParseFromString(data)
                except (DecodeError, ValueError):
                    raise InvalidRequest(
                        "not a valid Frame protobuf", reason="invalid_frame"
                    ) from None
                if len(frame.frame_id) > MAX_FRAME_ID:
                    raise InvalidRequest("frame_id too long", reason="invalid_frame_id")
                frame_id = frame.frame_id or frame_id
                image = frame.image
                if correlation is None and frame_id:
                    correlation = frame_id.encode()
            else:
                image = data
            answer = await self._answer(
                admitted, frame_id=frame_id, correlation=correlation, image=image, protobuf=protobuf
            )
        except GatewayError as exc:  # a refusal (anything else is a bug: _frame_task logs it)
            self._frame_refused(device_id, exc, frame_id)
            return
        if answer is None:
            return
        await self._publish(
            f"devices/{device_id}/detections",
            answer.payload,
            content_type=answer.content_type,
            correlation=answer.correlation,
        )

    async def _answer(
        self,
        admitted: Admitted,
        *,
        frame_id: str,
        correlation: bytes | None,
        image: bytes,
        protobuf: bool,
    ) -> _Answer | None:
        key = (admitted.device_id, frame_id.encode()) if frame_id else None
        if key is not None:
            known = self._answers.get(key)
            if known is not None:
                # A redelivery (broker restart, device retry): same answer, no second run.
                self.stats.frames_duplicate += 1
                self._answers.move_to_end(key)
                return await asyncio.shield(known)
        fut: asyncio.Future[_Answer | None] = asyncio.get_running_loop().create_future()
        if key is not None:
            self._answers[key] = fut
            while len(self._answers) > self.settings.dedupe_size:
                self._answers.popitem(last=False)
        try:
            started = time.monotonic()
            msg, result = await self._door.detect(
                admitted,
                frame_id=frame_id,
                image=image,
                deadline=started + self.settings.frame_deadline_s,
            )
            self.stats.frames_inferred += 1
            payload, content_type = encode(msg, protobuf)
            answer = _Answer(payload, content_type, correlation)
            _log.info(
                "mqtt frame",
                device_id=admitted.device_id,
                transport="mqtt",
                frame_id=frame_id,
                detections=len(result.detections),
                from_cache=result.from_cache,
                ms=round((time.monotonic() - started) * 1000, 1),
            )
        except BaseException:
            # A failed frame may be sent again and deserves a real try then; a duplicate
            # waiting on this one gets no answer (the error event went out once).
            if key is not None and self._answers.get(key) is fut:
                del self._answers[key]
            if not fut.done():
                fut.set_result(None)
            raise
        fut.set_result(answer)
        return answer

    # -- events ----------------------------------------------------------------------------

    def _on_hub_event(self, device_id: str, event: DeviceEvent) -> None:
        try:
            self._outbox.put_nowait((device_id, event))
        except asyncio.QueueFull:
            _log.warning("mqtt event outbox full; event not forwarded", device_id=device_id)

    async def _forward_events(self) -> None:
        while True:
            device_id, event = await self._outbox.get()
            if pki.ID_PATTERN.fullmatch(device_id) is None:
                continue
            payload, content_type = encode(
                event_to_pb(event), self._protobuf_devices.get(device_id, False)
            )
            try:
                await self._publish(
                    f"devices/{device_id}/events",
                    payload,
                    content_type=content_type,
                    correlation=None,
                )
                self.stats.events_published += 1
            except (aiomqtt.MqttError, TimeoutError) as exc:
                _log.warning("mqtt event not delivered", device_id=device_id, error=str(exc))


def _correlation_id(message: aiomqtt.Message) -> str:
    """The frame id in a message's correlation data, for an error event (cheap: no parsing)."""
    props = message.properties
    correlation = getattr(props, "CorrelationData", None) if props is not None else None
    if not correlation or len(correlation) > MAX_FRAME_ID:
        return ""
    return bytes(correlation).decode("utf-8", errors="replace")
