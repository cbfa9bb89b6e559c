"""A lean MQTT 5 subscriber for the telemetry workers: bulk reads, PUBLISH parsed in bulk.

paho handles each incoming packet in Python through several calls and objects (reading the
header byte by byte, a ``MQTTMessage`` and a ``Properties`` object per message, a callback):
with 1 kB telemetry that is most of a worker's time. This client reads whatever the TLS socket
holds (many packets per read), parses every PUBLISH in one loop over the buffer into
``(topic, payload, content type)`` tuples, and acknowledges a read's QoS 1 messages in one write
once the caller has handled them (the next :meth:`Subscriber.read`).

It speaks only what a telemetry worker needs: CONNECT (MQTT 5, user name and password, session
expiry, the maximum packet size it accepts), one SUBSCRIBE, PUBLISH at QoS 0 and 1 from the
broker, PINGREQ, DISCONNECT. It is strict (MQTT 5 §4.13: a malformed packet or a protocol error
closes the connection): a packet type a subscriber never receives, reserved flag bits, a
remaining length that is not a minimal variable byte integer (§1.5.5) or exceeds the maximum
packet size announced in CONNECT (§3.1.2.11.4), a field running past its packet, an unknown or
repeated property, a topic alias (none is allowed, §3.3.2.3.4), QoS 2, packet id 0, or a string
that is not UTF-8 without U+0000 (§1.5.4) raises :class:`ProtocolViolation` with the reason.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from typing import Final

from gateway._mqtt._config import NODELAY
from gateway.errors import GatewayError

__all__ = [
    "PINGREQ",
    "ConnectRefused",
    "PacketReader",
    "ProtocolViolation",
    "Publish",
    "Subscriber",
    "connect_packet",
    "encode_varint",
    "subscribe_packet",
]

#: One PUBLISH handed to the caller: topic (raw UTF-8), payload, content type (or ``None``).
Publish = tuple[bytes, bytes, str | None]

PINGREQ: Final = b"\xc0\x00"
_DISCONNECT_NORMAL: Final = b"\xe0\x00"
_MAX_VARINT: Final = 268_435_455

# Packet types (MQTT 5 §2.1.2).
_CONNACK, _PUBLISH, _SUBACK, _PINGRESP, _DISCONNECT = 2, 3, 9, 13, 14

# Property identifiers (MQTT 5 §2.2.2.2) and how each value is encoded.
_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)
_PROPERTY_KINDS: Final = {
    0x01: _BYTE,  # payload format indicator
    0x02: _U32,  # message expiry interval
    0x03: _STR,  # content type
    0x08: _STR,  # response topic
    0x09: _BIN,  # correlation data
    0x0B: _VARINT,  # subscription identifier
    0x11: _U32,  # session expiry interval
    0x12: _STR,  # assigned client identifier
    0x13: _U16,  # server keep alive
    0x15: _STR,  # authentication method
    0x16: _BIN,  # authentication data
    0x1A: _STR,  # response information
    0x1C: _STR,  # server reference
    0x1F: _STR,  # reason string
    0x21: _U16,  # receive maximum
    0x22: _U16,  # topic alias maximum
    0x23: _U16,  # topic alias
    0x24: _BYTE,  # maximum QoS
    0x25: _BYTE,  # retain available
    0x26: _PAIR,  # user property
    0x27: _U32,  # maximum packet size
    0x28: _BYTE,  # wildcard subscription available
    0x29: _BYTE,  # subscription identifiers available
    0x2A: _BYTE,  # shared subscription available
}
#: Properties that may appear more than once in a packet (§3.3.2.3.8, §3.3.4).
_REPEATABLE: Final = frozenset({0x0B, 0x26})
_CONTENT_TYPE, _TOPIC_ALIAS, _SERVER_KEEP_ALIVE = 0x03, 0x23, 0x13
_PUBLISH_PROPS: Final = frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26})
_CONNACK_PROPS: Final = frozenset(
    {0x11, 0x12, 0x13, 0x15, 0x16, 0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x24, 0x25, 0x26, 0x27}
    | {0x28, 0x29, 0x2A}
)
_SUBACK_PROPS: Final = frozenset({0x1F, 0x26})
_DISCONNECT_PROPS: Final = frozenset({0x11, 0x1C, 0x1F, 0x26})


class ProtocolViolation(GatewayError):
    """The broker sent something this subscriber must not accept; the connection is closed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConnectRefused(GatewayError):
    """CONNACK or SUBACK carried a failure reason code, or the broker sent DISCONNECT."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode_varint(value: int) -> bytes:
    """MQTT's variable byte integer (§1.5.5), minimal, 0 to 268,435,455."""
    if not 0 <= value <= _MAX_VARINT:
        raise ValueError(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """``(value, next position)``; ``(-1, pos)`` if ``buf`` ends before the integer does."""
    value = 0
    for shift in (0, 7, 14, 21):
        if pos >= end:
            return -1, pos
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if shift and not byte:
                raise ProtocolViolation("variable byte integer not in its shortest form")
            return value, pos
    raise ProtocolViolation("variable byte integer longer than 4 bytes")


def _utf8(raw: bytes, what: str) -> str:
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ProtocolViolation(f"{what} is not valid UTF-8") from None
    if "\x00" in text:
        raise ProtocolViolation(f"{what} contains U+0000")
    return text


def _properties(
    buf: bytes, pos: int, end: int, allowed: frozenset[int], packet: str
) -> tuple[dict[int, object], int]:
    """The property block at ``pos`` as ``{id: value}`` (last value of repeatable ones)."""
    length, pos = _varint(buf, pos, end)
    if length < 0:
        raise ProtocolViolation(f"{packet} ends inside its property length")
    stop = pos + length
    if stop > end:
        raise ProtocolViolation(f"{packet} properties run past the packet")
    found: dict[int, object] = {}
    while pos < stop:
        ident, pos = _varint(buf, pos, stop)
        kind = _PROPERTY_KINDS.get(ident)
        if ident < 0 or kind is None or ident not in allowed:
            raise ProtocolViolation(f"{packet} has property {ident:#x}, not allowed there")
        if ident in found and ident not in _REPEATABLE:
            raise ProtocolViolation(f"{packet} repeats property {ident:#x}")
        value: object
        if kind == _BYTE:
            if pos + 1 > stop:
                raise ProtocolViolation(f"{packet} property {ident:#x} truncated")
            value, pos = buf[pos], pos + 1
        elif kind == _U16:
            if pos + 2 > stop:
                raise ProtocolViolation(f"{packet} property {ident:#x} truncated")
            value, pos = (buf[pos] << 8) | buf[pos + 1], pos + 2
        elif kind == _U32:
            if pos + 4 > stop:
                raise ProtocolViolation(f"{packet} property {ident:#x} truncated")
            value, pos = int.from_bytes(buf[pos : pos + 4]), pos + 4
        elif kind == _VARINT:
            value, pos = _varint(buf, pos, stop)
            if value < 0:
                raise ProtocolViolation(f"{packet} property {ident:#x} truncated")
        else:
            strings = 2 if kind == _PAIR else 1
            parts = []
            for _ in range(strings):
                if pos + 2 > stop:
                    raise ProtocolViolation(f"{packet} property {ident:#x} truncated")
                size = (buf[pos] << 8) | buf[pos + 1]
                pos += 2
                if pos + size > stop:
                    raise ProtocolViolation(f"{packet} property {ident:#x} truncated")
                raw = buf[pos : pos + size]
                pos += size
                parts.append(raw if kind == _BIN else _utf8(raw, f"{packet} property"))
            value = parts[0] if strings == 1 else tuple(parts)
        found[ident] = value
    return found, stop


class PacketReader:
    """Splits a byte stream from the broker into packets: PUBLISH in bulk, the rest apart.

    :meth:`feed` takes whatever was read and returns the complete PUBLISH packets in it as
    :data:`Publish` tuples, with the raw packet identifiers of the QoS 1 ones (to acknowledge)
    and the other packets as ``(type, body)``; an incomplete packet at the end waits for the
    next feed. Any malformed packet raises :class:`ProtocolViolation`; after that the reader
    (like the connection) must not be used again.
    """

    def __init__(self, *, max_packet_bytes: int) -> None:
        self.max_packet_bytes = max_packet_bytes
        self._rest = b""

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete packet waiting for the rest."""
        return len(self._rest)

    def feed(self, data: bytes) -> tuple[list[Publish], list[bytes], list[tuple[int, bytes]]]:
        buf = self._rest + data if self._rest else data
        end = len(buf)
        pos = 0
        publishes: list[Publish] = []
        acks: list[bytes] = []
        others: list[tuple[int, bytes]] = []
        limit = self.max_packet_bytes
        while end - pos >= 2:
            first = buf[pos]
            length = buf[pos + 1]
            if length < 0x80:
                start = pos + 2
            else:
                length, start = _varint(buf, pos + 1, end)
                if length < 0:
                    break  # the length itself is still incomplete
            stop = start + length
            if stop - pos > limit:
                raise ProtocolViolation(
                    f"packet of {stop - pos} bytes, over the {limit} announced in CONNECT"
                )
            if stop > end:
                break
            if first >> 4 == _PUBLISH:
                # Topic, packet id (QoS 1), properties, payload (§3.3.2).
                qos = (first >> 1) & 3
                if qos > 1:
                    raise ProtocolViolation(f"PUBLISH at QoS {qos}; subscribed at most QoS 1")
                if not qos and first & 0x08:
                    raise ProtocolViolation("PUBLISH at QoS 0 with the DUP flag")
                if start + 2 > stop:
                    raise ProtocolViolation("PUBLISH ends inside its topic length")
                topic_end = start + 2 + ((buf[start] << 8) | buf[start + 1])
                if topic_end > stop or topic_end == start + 2:
                    raise ProtocolViolation("PUBLISH topic empty or past the packet")
                topic = buf[start + 2 : topic_end]
                at = topic_end
                if qos:
                    if at + 2 > stop:
                        raise ProtocolViolation("PUBLISH ends inside its packet identifier")
                    packet_id = buf[at : at + 2]
                    if packet_id == b"\x00\x00":
                        raise ProtocolViolation("PUBLISH at QoS 1 with packet identifier 0")
                    acks.append(packet_id)
                    at += 2
                if at >= stop:
                    raise ProtocolViolation("PUBLISH ends before its properties")
                content_type = None
                if buf[at] == 0:  # no properties: the common case
                    at += 1
                else:
                    props, at = _properties(buf, at, stop, _PUBLISH_PROPS, "PUBLISH")
                    if _TOPIC_ALIAS in props:
                        raise ProtocolViolation("PUBLISH uses a topic alias; none was allowed")
                    value = props.get(_CONTENT_TYPE)
                    content_type = value if isinstance(value, str) else None
                publishes.append((topic, buf[at:stop], content_type))
            else:
                others.append((first, buf[start:stop]))
            pos = stop
        self._rest = buf[pos:]
        return publishes, acks, others


def connect_packet(
    *,
    client_id: str,
    username: str | None,
    password: str | None,
    keepalive_s: int,
    session_expiry_s: int,
    max_packet_bytes: int,
    clean_start: bool = False,
) -> bytes:
    """CONNECT (§3.1), MQTT 5, with the session expiry and the largest packet accepted."""

    def string(value: bytes) -> bytes:
        return struct.pack("!H", len(value)) + value

    flags = (0x02 if clean_start else 0) | (0x80 if username is not None else 0)
    flags |= 0x40 if password is not None else 0
    props = (
        b"\x11"
        + struct.pack("!I", session_expiry_s)
        + b"\x27"
        + struct.pack("!I", max_packet_bytes)
    )
    body = string(b"MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive_s)
    body += encode_varint(len(props)) + props + string(client_id.encode())
    if username is not None:
        body += string(username.encode())
    if password is not None:
        body += string(password.encode())
    return b"\x10" + encode_varint(len(body)) + body


def subscribe_packet(packet_id: int, topic_filter: str, qos: int) -> bytes:
    """SUBSCRIBE (§3.8) of one filter at ``qos``, no properties."""
    raw = topic_filter.encode()
    body = struct.pack("!H", packet_id) + b"\x00" + struct.pack("!H", len(raw)) + raw
    body += bytes([qos])
    return b"\x82" + encode_varint(len(body)) + body


class Subscriber:
    """One blocking mutual-TLS connection: :meth:`connect`, then :meth:`read` in a loop.

    Not thread-safe; one worker thread owns it. Every error leaves it closed: the caller
    logs the reason and connects again after its backoff.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        client_id: str,
        username: str | None,
        password: str | None,
        topic_filter: str,
        qos: int,
        keepalive_s: int,
        session_expiry_s: int,
        max_packet_bytes: int,
        connect_timeout_s: float = 10.0,
        read_bytes: int = 1 << 20,
    ) -> None:
        self._host, self._port, self._ctx = host, port, ssl_context
        self._client_id, self._username, self._password = client_id, username, password
        self._filter, self._qos = topic_filter, qos
        self._keepalive_config = self._keepalive_s = keepalive_s
        self._session_expiry_s = session_expiry_s
        self._max_packet = max_packet_bytes
        self._connect_timeout_s = connect_timeout_s
        self._read_bytes = read_bytes
        self._sock: ssl.SSLSocket | None = None
        self._reader = PacketReader(max_packet_bytes=max_packet_bytes)
        self._acks: list[bytes] = []
        # What arrived during the handshake behind CONNACK/SUBACK, for the first read.
        self._held: list[Publish] = []
        self._held_acks: list[bytes] = []
        self._held_others: list[tuple[int, bytes]] = []
        self._started = False
        self._last_sent = 0.0
        self._ping_sent: float | None = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> None:
        """TCP, TLS, CONNECT → CONNACK, SUBSCRIBE → SUBACK, each within the deadline."""
        self.close(send_disconnect=False)
        deadline = time.monotonic() + self._connect_timeout_s
        raw = socket.create_connection((self._host, self._port), timeout=self._connect_timeout_s)
        try:
            for option in NODELAY:  # QoS 1 acknowledgements must not wait for Nagle
                raw.setsockopt(*option)
            sock = self._ctx.wrap_socket(raw, server_hostname=self._host)
        except BaseException:
            raw.close()
            raise
        self._sock = sock
        self._reader = PacketReader(max_packet_bytes=self._max_packet)
        self._acks = []
        self._held, self._held_acks, self._held_others = [], [], []
        self._started = False
        self._ping_sent = None
        self._keepalive_s = self._keepalive_config
        try:
            self._handshake(deadline)
        except BaseException:
            self.close(send_disconnect=False)
            raise

    def _handshake(self, deadline: float) -> None:
        self._send(
            connect_packet(
                client_id=self._client_id,
                username=self._username,
                password=self._password,
                keepalive_s=self._keepalive_config,
                session_expiry_s=self._session_expiry_s,
                max_packet_bytes=self._max_packet,
            )
        )
        first, body = self._control(deadline)
        if first != _CONNACK << 4:
            raise ProtocolViolation(f"first packet is {first >> 4}, not CONNACK")
        self._on_connack(body)
        self._send(subscribe_packet(1, self._filter, self._qos))
        first, body = self._control(deadline)
        if first != _SUBACK << 4:
            raise ProtocolViolation(f"packet {first >> 4} before SUBACK")
        self._on_suback(body)

    def _socket(self) -> ssl.SSLSocket:
        if self._sock is None:
            raise ConnectionError("not connected")
        return self._sock

    def _control(self, deadline: float) -> tuple[int, bytes]:
        """The next packet other than PUBLISH during the handshake.

        With a persistent session the broker may send queued messages right after CONNACK,
        before SUBACK: they are held for the first :meth:`read`.
        """
        sock = self._socket()
        while not self._held_others:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no CONNACK/SUBACK within the connect timeout")
            sock.settimeout(left)
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("broker closed the connection")
            if not self._started:
                if data[0] != _CONNACK << 4:
                    raise ProtocolViolation(f"first packet is {data[0] >> 4}, not CONNACK")
                self._started = True
            publishes, acks, others = self._reader.feed(data)
            self._held += publishes
            self._held_acks += acks
            self._held_others += others
        return self._held_others.pop(0)

    def _on_connack(self, body: bytes) -> None:
        if len(body) < 3:
            raise ProtocolViolation("CONNACK truncated")
        if body[0] & 0xFE:
            raise ProtocolViolation("CONNACK acknowledge flags has reserved bits set")
        props, end = _properties(body, 2, len(body), _CONNACK_PROPS, "CONNACK")
        if end != len(body):
            raise ProtocolViolation("CONNACK has bytes after its properties")
        if body[1] >= 0x80:
            reason = props.get(0x1F, "")
            raise ConnectRefused(f"CONNACK reason {body[1]:#04x} {reason}".rstrip())
        keepalive = props.get(_SERVER_KEEP_ALIVE)
        if isinstance(keepalive, int):  # the server's keep alive wins (§3.2.2.3.14)
            self._keepalive_s = keepalive

    def _on_suback(self, body: bytes) -> None:
        if len(body) < 3 or body[:2] != b"\x00\x01":
            raise ProtocolViolation("SUBACK truncated or for another packet identifier")
        _props, at = _properties(body, 2, len(body), _SUBACK_PROPS, "SUBACK")
        codes = body[at:]
        if len(codes) != 1:
            raise ProtocolViolation(f"SUBACK with {len(codes)} reason codes for one filter")
        if codes[0] >= 0x80:
            raise ConnectRefused(f"SUBACK reason {codes[0]:#04x}")
        if codes[0] > self._qos:
            raise ProtocolViolation(f"SUBACK granted QoS {codes[0]}, asked {self._qos}")

    def read(self, timeout_s: float) -> list[Publish]:
        """The PUBLISH packets that arrive within ``timeout_s`` (possibly none).

        Acknowledges the previous read's QoS 1 messages first (they have been handled),
        keeps the connection alive (PINGREQ), and reads everything the socket holds. Any
        error closes the connection before it propagates.
        """
        try:
            return self._read(self._socket(), timeout_s)
        except BaseException:
            self.close(send_disconnect=False)
            raise

    def _read(self, sock: ssl.SSLSocket, timeout_s: float) -> list[Publish]:
        now = time.monotonic()
        if self._acks:
            self._send(b"".join([b"\x40\x02" + pid for pid in self._acks]))
            self._acks = []
        if self._keepalive_s:
            if self._ping_sent is not None and now - self._ping_sent > self._keepalive_s:
                raise TimeoutError("no PINGRESP within the keep-alive")
            if self._ping_sent is None and now - self._last_sent >= self._keepalive_s * 0.75:
                self._send(PINGREQ)
                self._ping_sent = now
            timeout_s = min(timeout_s, self._last_sent + self._keepalive_s - now)
        if self._held or self._held_others:
            publishes, self._acks = self._held, self._held_acks
            others, self._held, self._held_acks, self._held_others = self._held_others, [], [], []
            for first, body in others:
                self._on_control(first, body)
            return publishes
        sock.settimeout(max(0.001, timeout_s))
        try:
            data = sock.recv(self._read_bytes)
        except (TimeoutError, ssl.SSLWantReadError, BlockingIOError):
            return []
        if not data:
            raise ConnectionError("broker closed the connection")
        chunks = [data]
        size = len(data)
        # Everything else already here (decrypted or still in the kernel): one parse.
        sock.setblocking(False)
        with contextlib.suppress(ssl.SSLWantReadError, BlockingIOError):
            while size < self._read_bytes:
                more = sock.recv(self._read_bytes - size)
                if not more:
                    break
                chunks.append(more)
                size += len(more)
        publishes, self._acks, others = self._reader.feed(b"".join(chunks))
        for first, body in others:
            self._on_control(first, body)
        return publishes

    def _on_control(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if first & 0x0F:
            raise ProtocolViolation(f"packet type {kind} with reserved flag bits set")
        if kind == _PINGRESP:
            if body:
                raise ProtocolViolation("PINGRESP with a body")
            self._ping_sent = None
        elif kind == _DISCONNECT:
            code = body[0] if body else 0
            reason = ""
            if len(body) > 1:
                props, _end = _properties(body, 1, len(body), _DISCONNECT_PROPS, "DISCONNECT")
                reason = str(props.get(0x1F, ""))
            raise ConnectRefused(f"broker sent DISCONNECT {code:#04x} {reason}".rstrip())
        else:
            raise ProtocolViolation(f"packet type {kind} is never sent to this subscriber")

    def _send(self, data: bytes) -> None:
        sock = self._socket()
        sock.settimeout(self._connect_timeout_s)
        sock.sendall(data)
        self._last_sent = time.monotonic()

    def close(self, *, send_disconnect: bool = True) -> None:
        """Close the connection (after a normal DISCONNECT when asked; the session stays)."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(OSError):
            if send_disconnect:
                sock.settimeout(1.0)
                if self._acks:
                    sock.sendall(b"".join([b"\x40\x02" + pid for pid in self._acks]))
                sock.sendall(_DISCONNECT_NORMAL)
        self._acks = []
        with contextlib.suppress(OSError):
            sock.close()
