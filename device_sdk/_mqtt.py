"""MQTT transport: one MQTT 5 session over mutual TLS to the broker of the gateway in use.

Frames go to ``devices/<id>/frames`` as a ``Frame`` protobuf (content type
``application/x-protobuf``) with the frame id as correlation data; the gateway answers on
``devices/<id>/detections`` with the same correlation data. Telemetry goes to
``devices/<id>/telemetry``; events (escalation answers, errors about rejected messages,
commands) arrive on ``devices/<id>/events``. The broker lets the device use only its own
prefix, derived from its certificate, so nothing here names another device.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import TypeVar

import aiomqtt
import structlog
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import pki
from device_sdk._grpc import GatewayDown, classify_code
from device_sdk._types import DetectionResult, DeviceEvent, ErrorEvent, GatewayInfo, Transport
from device_sdk.errors import DeviceRevoked
from protos.edgeward.v1 import common_pb2

__all__ = [
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

    async def detect(
        self, frame_id: str, image: bytes, captured_at: float, *, timeout_s: float
    ) -> DetectionResult:
        """Publish a frame and wait for its detections."""
        client = await self._connected(timeout_s)
        frame = common_pb2.Frame(image=image, frame_id=frame_id)
        frame.captured_at.FromNanoseconds(int(captured_at * 1e9))
        fut: asyncio.Future[DetectionResult] = asyncio.get_running_loop().create_future()
        self._pending[frame_id] = fut
        try:
            await client.publish(
                f"{self._prefix}/frames",
                frame.SerializeToString(),
                qos=1,
                properties=self._properties(frame_id),
                timeout=timeout_s,
            )
            async with asyncio.timeout(timeout_s):
                return await fut
        except TimeoutError:
            raise GatewayDown("no answer over MQTT in time") from None
        except aiomqtt.MqttError as exc:
            raise GatewayDown(f"MQTT publish failed: {exc}") from exc
        finally:
            self._pending.pop(frame_id, None)

    async def telemetry(self, payload: bytes, *, timeout_s: float) -> None:
        """Publish a ``Telemetry`` protobuf (QoS 1: done when the broker has it)."""
        client = await self._connected(timeout_s)
        try:
            await client.publish(
                f"{self._prefix}/telemetry",
                payload,
                qos=1,
                properties=self._properties(None),
                timeout=timeout_s,
            )
        except aiomqtt.MqttError as exc:
            raise GatewayDown(f"MQTT publish failed: {exc}") from exc

    async def _connected(self, timeout_s: float) -> aiomqtt.Client:
        try:
            async with asyncio.timeout(timeout_s):
                await self.ready.wait()
        except TimeoutError:
            raise GatewayDown("MQTT session not connected") from None
        if self._client is None:
            raise GatewayDown("MQTT session not connected")
        return self._client

    @staticmethod
    def _properties(frame_id: str | None) -> Properties:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ContentType = PROTOBUF_CONTENT_TYPE
        if frame_id is not None:
            props.CorrelationData = frame_id.encode()
        return props
