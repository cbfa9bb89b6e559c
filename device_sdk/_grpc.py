"""gRPC plumbing of the device client: channels, probes, calls, and what each failure means.

Every gRPC failure is classified once, here, into what the client should do about it:

* :class:`GatewayDown`: the gateway (or the path to it) failed; fail over, keep the item.
* :class:`Busy`: the gateway is overloaded or the device over its budget
  (``RESOURCE_EXHAUSTED``); back off, keep the item. When the gateway says when to come back
  (trailing ``edgeward-retry-after-s``), ``retry_after_s`` carries it and the sender waits
  that long before sending anything more. Over MQTT a publication the broker refused
  (PUBACK reason code 0x80 or above, such as the ingest limit's 0x87) is ``Busy`` too
  (:mod:`device_sdk._mqtt`).
* :class:`Refused`: the gateway refused this request for a reason retrying cannot fix
  (``INVALID_ARGUMENT``, a non-final ``PERMISSION_DENIED``…); drop the item, tell the caller
  the server's reason.
* :class:`~device_sdk.errors.DeviceRevoked`: ``PERMISSION_DENIED`` with the trailing metadata
  ``edgeward-final: revoked``; final, the client stops.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

import pki
from device_sdk.errors import DeviceRevoked
from protos.edgeward.v1 import gateway_pb2_grpc
from protos.edgeward.v1.wire import FINAL_METADATA_KEY, FINAL_REVOKED, RETRY_AFTER_METADATA_KEY

__all__ = [
    "CHANNEL_OPTIONS",
    "FINAL_METADATA_KEY",
    "KEEPALIVE_TIMEOUT_MS",
    "KEEPALIVE_TIME_MS",
    "MAX_RETRY_AFTER_S",
    "Busy",
    "ChannelPool",
    "GatewayDown",
    "Refused",
    "classify",
    "classify_code",
    "probe",
    "retry_after",
    "retry_after_seconds",
]

#: The longest retry-after honoured: a wrong or hostile value cannot park the device.
MAX_RETRY_AFTER_S = 60.0

_RETRY_ELSEWHERE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.ABORTED,
    # A gateway that does not accept our identity (another trust domain, a feed it lost)
    # may be the only one: try the others.
    grpc.StatusCode.UNAUTHENTICATED,
}

#: A keepalive ping after this long without a frame from the gateway while a call is open
#: (the event stream, ``Subscribe``, is open all the time). The gateway accepts pings this
#: often: its ``grpc.http2.min_ping_interval_without_data_ms``
#: (``gateway._grpc._server.MIN_PING_INTERVAL_MS``) is half of it, so it never answers them
#: with ``GOAWAY too_many_pings``.
KEEPALIVE_TIME_MS = 20_000

#: A ping unanswered this long closes the connection: every call on it fails with
#: ``UNAVAILABLE`` (frames on it fail over to the next gateway). A gateway gone silent
#: without closing its connection (power lost, a dropped NAT entry, a hung host) is therefore
#: noticed within ``KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS`` (25 s), even by a call that
#: has no deadline.
KEEPALIVE_TIMEOUT_MS = 5_000

# Channel arguments: reconnect quickly (gRPC's default backoff grows to 120 s, which would
# keep a recovered gateway unused for minutes), and notice a dead peer without traffic.
CHANNEL_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # What closes a connection whose ping goes unanswered is gRPC's ping deadline (60 s by
    # default); the installed gRPC does not enforce the keepalive timeout by itself.
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # The event stream only receives: without this, gRPC stops pinging after two pings with
    # no frame sent, and a quiet device's stream would have no keepalive at all.
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
)


class GatewayDown(Exception):
    """The gateway failed at the transport level; try another."""


class Busy(Exception):
    """The gateway is overloaded; back off and retry (not before ``retry_after_s``, if set)."""

    def __init__(self, message: str = "", *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Refused(Exception):
    """The gateway refused this request; ``code`` and ``reason`` are the server's."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


def _trailer(exc: grpc.aio.AioRpcError, name: str) -> str | None:
    trailing: Any = exc.trailing_metadata() or ()
    for key, value in trailing:
        if key == name:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def _is_final_revoked(exc: grpc.aio.AioRpcError) -> bool:
    return _trailer(exc, FINAL_METADATA_KEY) == FINAL_REVOKED


def retry_after(exc: grpc.aio.AioRpcError) -> float | None:
    """The server's ``edgeward-retry-after-s`` in seconds (bounded), or ``None``."""
    return retry_after_seconds(_trailer(exc, RETRY_AFTER_METADATA_KEY))


def retry_after_seconds(text: str | None) -> float | None:
    """A retry-after value as sent (seconds, text) bounded by :data:`MAX_RETRY_AFTER_S`;
    ``None`` when absent, negative or not a number."""
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER_S)


def classify(exc: grpc.aio.AioRpcError, *, device_id: str) -> Exception:
    """The exception the client acts on for a failed call (see the module docstring)."""
    code = exc.code()
    details = exc.details() or ""
    if code is grpc.StatusCode.PERMISSION_DENIED and _is_final_revoked(exc):
        # The gateway's text repeats what DeviceRevoked says; keep only what it adds.
        extra = details.removeprefix(f"device {device_id} is revoked").lstrip(":; ")
        return DeviceRevoked(device_id, extra)
    if code in _RETRY_ELSEWHERE:
        return GatewayDown(f"{code.name}: {details}")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Busy(details, retry_after_s=retry_after(exc))
    return Refused(code.name, details)


def classify_code(code_name: str, details: str) -> Exception:
    """Like :func:`classify` for a status that arrived by name (an MQTT error event)."""
    try:
        code = grpc.StatusCode[code_name.upper()]
    except KeyError:
        return Refused(code_name, details)
    if code in _RETRY_ELSEWHERE:
        return GatewayDown(f"{code.name}: {details}")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Busy(details)
    return Refused(code.name, details)


class ChannelPool:
    """One mTLS channel per gateway (address and id), all built from the current credentials.

    Each channel demands the gateway's role-pinned name
    (``<gateway-id>.gateway.edgeward.internal``, :func:`pki.gateway_server_name`) rather than
    the address's host: every gateway and core certificate names ``localhost``, so without it
    any gateway (or a stolen gateway key) at that address would be accepted as this one.

    :meth:`replace_credentials` (after a renewal) makes new channels for every later call and
    returns the old ones; the client closes those with a grace period so that calls already
    running on them finish on the old certificate, which is still valid.
    """

    def __init__(self, credentials: grpc.ChannelCredentials) -> None:
        self._credentials = credentials
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._stubs: dict[
            tuple[str, str], tuple[grpc.aio.Channel, gateway_pb2_grpc.DeviceGatewayAsyncStub]
        ] = {}
        self.generation = 0

    def get(self, address: str, gateway_id: str) -> grpc.aio.Channel:
        """The channel to gateway ``gateway_id`` at ``address`` (made once per generation).

        Raises :class:`GatewayDown` when ``gateway_id`` is not a valid id (no name to pin).
        """
        key = (address, gateway_id)
        channel = self._channels.get(key)
        if channel is None:
            try:
                name = pki.gateway_server_name(gateway_id)
            except pki.InvalidName:
                raise GatewayDown(f"gateway id {gateway_id!r} is not a valid id") from None
            channel = grpc.aio.secure_channel(
                address,
                self._credentials,
                options=[*CHANNEL_OPTIONS, pki.server_name_option(name)],
            )
            self._channels[key] = channel
        return channel

    def stub(self, address: str, gateway_id: str) -> gateway_pb2_grpc.DeviceGatewayAsyncStub:
        """The ``DeviceGateway`` stub on the current channel to ``gateway_id`` (made once)."""
        channel = self.get(address, gateway_id)
        key = (address, gateway_id)
        stub = self._stubs.get(key)
        if stub is None or stub[0] is not channel:
            stub = (channel, gateway_pb2_grpc.DeviceGatewayStub(channel))
            self._stubs[key] = stub
        return stub[1]

    def replace_credentials(self, credentials: grpc.ChannelCredentials) -> list[grpc.aio.Channel]:
        old = list(self._channels.values())
        self._credentials = credentials
        self._channels = {}
        self._stubs = {}
        self.generation += 1
        return old

    async def close(self, grace: float | None = None) -> None:
        channels, self._channels = list(self._channels.values()), {}
        self._stubs = {}
        for channel in channels:
            await channel.close(grace)


async def probe(
    channel: grpc.aio.Channel, *, timeout_s: float, device_id: str, samples: int = 3
) -> float:
    """The shortest of ``samples`` mTLS health-check round trips, in seconds.

    Raises :class:`GatewayDown` when the gateway does not answer ``SERVING`` in time, or
    :class:`~device_sdk.errors.DeviceRevoked` when it says the device is revoked.
    """
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    try:
        # Connect first (TCP + TLS handshake), so that the timed round trip below measures
        # the network and the gateway, not a one-off handshake.
        async with asyncio.timeout(timeout_s):
            await channel.channel_ready()
    except TimeoutError:
        raise GatewayDown("could not connect in time") from None
    best = float("inf")
    # The least of a few round trips: queueing on a busy host only ever adds time, so the
    # minimum is the best estimate of how near the gateway is.
    for _ in range(samples):
        start = time.perf_counter()
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=""),
                timeout=max(deadline - time.monotonic(), 0.05),
            )
        except grpc.aio.AioRpcError as exc:
            err = classify(exc, device_id=device_id)
            if isinstance(err, DeviceRevoked):
                raise err from exc
            raise GatewayDown(str(err)) from exc
        best = min(best, time.perf_counter() - start)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise GatewayDown(f"health status {reply.status}")
    return best
