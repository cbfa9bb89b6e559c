"""MQTT transport: one MQTT 5 session over mutual TLS to the broker of the gateway in use.

Frames go to ``devices/<id>/frames`` as a ``Frame`` protobuf (content type
``application/x-protobuf``) with the frame id as correlation data; the gateway answers on
``devices/<id>/detections`` with the same correlation data. Telemetry goes to
``devices/<id>/telemetry``; events (escalation answers, errors about rejected messages,
commands) arrive on ``devices/<id>/events``. The broker lets the device use only its own
prefix, derived from its certificate, so nothing here names another device.

Both are published with QoS 1, and the broker's PUBACK says whether it took the message: a
reason code of 0x80 or above is a refusal (the managed broker's per-device ingest limit
answers 0x87 to a device over its budget, and the message never reaches the gateway). Such a
publication raises :class:`~device_sdk._grpc.Busy` at once, as ``RESOURCE_EXHAUSTED`` does
over gRPC: the sender backs off and keeps the item, rather than wait for an answer that never
comes and take the gateway for dead. aiomqtt drops the reason code, so :class:`_PubAcks`
reads it from paho underneath (see there).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import aiomqtt
import structlog
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

import pki
from device_sdk._grpc import Busy, GatewayDown, classify_code, retry_after_seconds
from device_sdk._types import DetectionResult, DeviceEvent, ErrorEvent, GatewayInfo, Transport
from device_sdk.errors import DeviceRevoked
from protos.edgeward.v1 import common_pb2
from protos.edgeward.v1.wire import RETRY_AFTER_METADATA_KEY

__all__ = [
    "BROKER_REFUSAL_RETRY_AFTER_S",
    "MQTT_KEEPALIVE_S",
    "PROTOBUF_CONTENT_TYPE",
    "SOCKET_OPTIONS",
    "MqttSession",
    "mqtt_ssl_context",
    "split_address",
]

PROTOBUF_CONTENT_TYPE = "application/x-protobuf"

#: Socket options of the device's MQTT connection. paho leaves Nagle's algorithm on, so the
#: tail of each PUBLISH (a frame is several TCP segments) waits for the broker's delayed ACK,
#: about 40 ms on Linux, before it leaves the device: every frame round trip paid it.
#: Applied by aiomqtt right after connecting, on the TLS socket.
SOCKET_OPTIONS: tuple[tuple[int, int, int], ...] = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)

#: The MQTT keepalive interval (seconds). paho sends PINGREQ after this long without a packet
#: either way and drops the session when no PINGRESP came within another interval, so a
#: broker gone silent without closing the connection (power lost, a dropped NAT entry) ends
#: the session within ``2 * MQTT_KEEPALIVE_S`` (+1 s, paho's timer tick) and the client fails
#: over; the broker in turn drops a silent device after 1.5 intervals (MQTT 5 §3.1.2.10).
MQTT_KEEPALIVE_S = 10

#: How long the device waits before sending again after the broker refused a publication
#: (seconds), when the PUBACK does not say. MQTT 5 has no retry-after of its own and
#: Mosquitto 2.0 sends a refusing PUBACK without properties, so the refusal says nothing about
#: when the device's bucket holds a token again (that depends on its budget, which the device
#: is not told). One second: the window in which the broker counts refusals towards
#: disconnecting a flood (``disconnect_after_refusals``, default 20), so a device that waits it
#: out is refused at most ``max_in_flight`` times per window and is never disconnected (which
#: it would take for a dead gateway and fail over), and a device a little over its budget
#: loses about a second. A PUBACK user property ``edgeward-retry-after-s`` (the gRPC
#: trailer's name and bound) is honoured instead.
BROKER_REFUSAL_RETRY_AFTER_S = 1.0

_log = structlog.get_logger(__name__)
_M = TypeVar("_M", bound=Message)


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) to its parts."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def mqtt_ssl_context(identity: pki.IdentityFiles, gateway_id: str) -> ssl.SSLContext:
    """The TLS context for ``gateway_id``'s broker: the gateway's pinned name is demanded,
    and the device presents its certificate alone, without the device issuing CA.

    The broker's device listener holds the device CA as its only anchor and needs nothing
    more from the device; every certificate sent is parsed and kept by the broker for the
    whole connection (see :func:`pki.client_ssl_context`, ``leaf_only``).
    """
    return pki.client_ssl_context(
        identity, server_name=pki.gateway_server_name(gateway_id), leaf_only=True
    )


def _parse(payload: bytes, message: type[_M], content_type: str) -> _M:
    if content_type == PROTOBUF_CONTENT_TYPE or not payload.lstrip().startswith(b"{"):
        return message.FromString(payload)
    out = message()
    json_format.Parse(payload.decode(), out, ignore_unknown_fields=True)
    return out


@dataclass(slots=True)
class _PubAck:
    """The broker's acknowledgement of one publication, once it came."""

    mid: int | None = None
    reason: ReasonCode | None = None
    properties: Properties | None = None

    def refusal(self, what: str) -> Busy | None:
        """:class:`Busy` when the broker refused the publication, else ``None``."""
        if self.reason is None or not self.reason.is_failure:
            return None
        retry_after_s = BROKER_REFUSAL_RETRY_AFTER_S
        for key, value in getattr(self.properties, "UserProperty", None) or ():
            if key == RETRY_AFTER_METADATA_KEY and (told := retry_after_seconds(value)) is not None:
                retry_after_s = told
        return Busy(
            f"the broker refused the {what} (PUBACK 0x{self.reason.value:02x} {self.reason})",
            retry_after_s=retry_after_s,
        )


class _PubAcks:
    """The PUBACK reason codes of one session's own publications.

    aiomqtt 2.5 drops them: ``Client._on_publish`` only wakes the publisher, so a publication
    the broker refused (0x87 from the ingest limit) looks published, and a refused frame waited
    for its answer until the timeout. This wraps two attributes of the session's paho client
    (aiomqtt's ``client._client``), on that instance only and for its lifetime:

    * ``publish``, to learn the packet id (mid) paho gives each publication; the publication is
      recognised by its ``Properties`` object, which the session makes afresh for each one and
      aiomqtt passes through unchanged (correlation data would not do: telemetry has none);
    * ``on_publish`` (aiomqtt's callback), to read the reason code of that mid before aiomqtt
      wakes the publisher.

    An entry lives only while its publication is being awaited (:meth:`expect` removes it
    however the wait ends), so both maps hold at most the publications in flight, and a mid
    that paho gives again later can only reach the publication now holding it.
    """

    def __init__(self, paho: Any) -> None:
        self._announced: dict[int, _PubAck] = {}  # id(properties): before paho names the mid
        self._by_mid: dict[int, _PubAck] = {}
        self._publish = paho.publish
        self._on_publish = paho.on_publish
        paho.publish = self._publish_and_learn
        paho.on_publish = self._read_reason

    def __len__(self) -> int:
        return len(self._announced) + len(self._by_mid)

    @contextlib.contextmanager
    def expect(self, properties: Properties) -> Iterator[_PubAck]:
        """The acknowledgement of the publication made (within) with ``properties``."""
        ack = _PubAck()
        key = id(properties)  # unique while ``properties`` is alive: the caller holds it
        self._announced[key] = ack
        try:
            yield ack
        finally:
            self._announced.pop(key, None)
            if ack.mid is not None and self._by_mid.get(ack.mid) is ack:
                del self._by_mid[ack.mid]

    def _publish_and_learn(self, *args: Any, **kwargs: Any) -> Any:
        info = self._publish(*args, **kwargs)
        properties = kwargs.get("properties", args[4] if len(args) > 4 else None)
        ack = self._announced.pop(id(properties), None) if properties is not None else None
        if ack is not None:
            ack.mid = info.mid
            self._by_mid[info.mid] = ack
        return info

    def _read_reason(
        self, client: Any, userdata: Any, mid: int, reason: ReasonCode, properties: Properties
    ) -> None:
        ack = self._by_mid.pop(mid, None)
        if ack is not None:
            ack.reason, ack.properties = reason, properties
        self._on_publish(client, userdata, mid, reason, properties)


class MqttSession:
    """A connection to one gateway's broker, alive while that gateway is the one in use."""

    def __init__(
        self,
        *,
        device_id: str,
        gateway: GatewayInfo,
        ssl_context: ssl.SSLContext,
        connect_timeout_s: float,
        on_event: Callable[[DeviceEvent], object],
    ) -> None:
        self.device_id = device_id
        self.gateway = gateway
        self._ssl = ssl_context
        self._timeout = connect_timeout_s
        self._on_event = on_event
        self._client: aiomqtt.Client | None = None
        self._acks: _PubAcks | None = None
        self._pending: dict[str, asyncio.Future[DetectionResult]] = {}
        self.ready = asyncio.Event()
        self.closed = asyncio.Event()
        self._prefix = f"devices/{device_id}"

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, subscribe, dispatch answers until ``stop`` is set.

        Raises :class:`GatewayDown` when the broker is unreachable or drops the session,
        :class:`DeviceRevoked` when the broker refuses the certificate as revoked.
        """
        if not self.gateway.mqtt_address:
            raise GatewayDown(f"gateway {self.gateway.gateway_id} has no MQTT listener")
        host, port = split_address(self.gateway.mqtt_address)
        try:
            async with aiomqtt.Client(
                host,
                port,
                identifier=self.device_id,
                protocol=aiomqtt.ProtocolVersion.V5,
                tls_context=self._ssl,
                timeout=self._timeout,
                keepalive=MQTT_KEEPALIVE_S,
                socket_options=SOCKET_OPTIONS,
            ) as client:
                await client.subscribe(f"{self._prefix}/detections", qos=1)
                await client.subscribe(f"{self._prefix}/events", qos=1)
                self._acks = _PubAcks(client._client)  # aiomqtt hides the reason codes
                self._client = client
                self.ready.set()
                try:
                    async with asyncio.TaskGroup() as tg:
                        reader = tg.create_task(self._read(client))
                        await stop.wait()
                        reader.cancel()
                except* aiomqtt.MqttError as group:
                    raise GatewayDown(f"MQTT session lost: {group.exceptions[0]}") from None
        except aiomqtt.MqttError as exc:
            text = str(exc)
            if "revoked" in text.lower():
                raise DeviceRevoked(self.device_id, "the broker refused the certificate") from exc
            raise GatewayDown(f"MQTT: {text}") from exc
        except (OSError, ssl.SSLError) as exc:
            if "revoked" in str(exc).lower():
                raise DeviceRevoked(self.device_id, "the broker refused the certificate") from exc
            raise GatewayDown(f"MQTT: {exc}") from exc
        finally:
            self._client = None
            self._acks = None
            self.ready.clear()
            self.closed.set()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(GatewayDown("MQTT session ended"))
            self._pending.clear()

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            try:
                self._dispatch(message)
            except (DecodeError, json_format.ParseError, UnicodeDecodeError) as exc:
                _log.warning("unreadable MQTT message", topic=str(message.topic), error=str(exc))

    def _dispatch(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        props = message.properties
        correlation = getattr(props, "CorrelationData", b"") if props is not None else b""
        content_type = getattr(props, "ContentType", "") if props is not None else ""
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            payload = str(payload).encode()
        if topic == f"{self._prefix}/detections":
            result = _parse(bytes(payload), common_pb2.DetectionResult, content_type)
            frame_id = correlation.decode() if correlation else result.frame_id
            fut = self._pending.pop(frame_id, None)
            if fut is not None and not fut.done():
                fut.set_result(DetectionResult.from_proto(result, transport=Transport.MQTT))
        elif topic == f"{self._prefix}/events":
            event = DeviceEvent.from_proto(
                _parse(bytes(payload), common_pb2.DeviceEvent, content_type)
            )
            if isinstance(event.kind, ErrorEvent):
                if event.kind.code.lower() == "revoked":
                    # Nothing to resolve: the broker will drop the session; the client
                    # learns the final state from the gateway's refusal.
                    _log.warning("gateway says this device is revoked")
                fut = self._pending.pop(event.kind.frame_id, None)
                if fut is not None and not fut.done():
                    # Same meaning as over gRPC: overloaded is retried, a bad frame is not.
                    fut.set_exception(classify_code(event.kind.code, event.kind.message))
                    return
            self._on_event(event)

    @property
    def publications_in_flight(self) -> int:
        """Publications whose PUBACK is awaited (bounded by the calls in flight)."""
        return len(self._acks) if self._acks is not None else 0

    async def detect(
        self, frame_id: str, image: bytes, captured_at: float, *, timeout_s: float
    ) -> DetectionResult:
        """Publish a frame and wait for its detections.

        Raises :class:`Busy` at once when the broker refuses the frame (PUBACK 0x80 or
        above), :class:`GatewayDown` when no answer comes within ``timeout_s``.
        """
        client, acks = await self._connected(timeout_s)
        frame = common_pb2.Frame(image=image, frame_id=frame_id)
        frame.captured_at.FromNanoseconds(int(captured_at * 1e9))
        fut: asyncio.Future[DetectionResult] = asyncio.get_running_loop().create_future()
        self._pending[frame_id] = fut
        properties = self._properties(frame_id)
        try:
            with acks.expect(properties) as ack:
                await client.publish(
                    f"{self._prefix}/frames",
                    frame.SerializeToString(),
                    qos=1,
                    properties=properties,
                    timeout=timeout_s,
                )
            if (refused := ack.refusal("frame")) is not None:
                raise refused
            async with asyncio.timeout(timeout_s):
                return await fut
        except TimeoutError:
            raise GatewayDown("no answer over MQTT in time") from None
        except aiomqtt.MqttError as exc:
            raise GatewayDown(f"MQTT publish failed: {exc}") from exc
        finally:
            self._pending.pop(frame_id, None)

    async def telemetry(self, payload: bytes, *, timeout_s: float) -> None:
        """Publish a ``Telemetry`` protobuf (QoS 1: done when the broker has it).

        Raises :class:`Busy` when the broker refused it (PUBACK 0x80 or above).
        """
        client, acks = await self._connected(timeout_s)
        properties = self._properties(None)
        try:
            with acks.expect(properties) as ack:
                await client.publish(
                    f"{self._prefix}/telemetry",
                    payload,
                    qos=1,
                    properties=properties,
                    timeout=timeout_s,
                )
        except aiomqtt.MqttError as exc:
            raise GatewayDown(f"MQTT publish failed: {exc}") from exc
        if (refused := ack.refusal("telemetry")) is not None:
            raise refused

    async def _connected(self, timeout_s: float) -> tuple[aiomqtt.Client, _PubAcks]:
        try:
            async with asyncio.timeout(timeout_s):
                await self.ready.wait()
        except TimeoutError:
            raise GatewayDown("MQTT session not connected") from None
        if self._client is None or self._acks is None:
            raise GatewayDown("MQTT session not connected")
        return self._client, self._acks

    @staticmethod
    def _properties(frame_id: str | None) -> Properties:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ContentType = PROTOBUF_CONTENT_TYPE
        if frame_id is not None:
            props.CorrelationData = frame_id.encode()
        return props
