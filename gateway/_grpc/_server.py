"""The device-facing gRPC server: mutual TLS, message limits, health, graceful stop.

TLS: :func:`pki.grpc_server_credentials` with ``require_client_auth=True``: a client without
a certificate of the trust domain's CAs fails the handshake (the client sees UNAVAILABLE)
before any handler runs. gRPC's BoringSSL offers TLS 1.2+ with AEAD suites only; the entry
point also pins ``GRPC_SSL_CIPHER_SUITES`` to :data:`pki.AEAD_CIPHERS_TLS12`.

A request that is not valid protobuf is answered ``INVALID_ARGUMENT``, logged and counted
(``malformed_requests_total``); a port already in use stops the start with an error naming
``listen`` (both: :mod:`gateway._wire`).

Messages larger than ``max_message_bytes`` are refused by gRPC itself (RESOURCE_EXHAUSTED)
before they are parsed, so an oversized frame costs the gateway no allocation of its size.

``grpc.health.v1.Health`` reports SERVING for ``""`` and ``edgeward.v1.DeviceGateway`` while
the server runs and NOT_SERVING once shutdown begins, so a load balancer drains the gateway
before it stops. Stopping is graceful: no new calls, in-flight ones get ``grace`` seconds.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

# The aio servicer is re-exported as ``health.aio`` at runtime; mypy sees no such attribute.
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

import pki
from gateway._grpc._servicer import DeviceGatewayServicer
from gateway._metrics import GatewayMetrics
from gateway._wire import SERVER_OPTIONS, add_service, bind
from protos.edgeward.v1 import gateway_pb2, gateway_pb2_grpc

__all__ = ["MAX_PING_STRIKES", "MIN_PING_INTERVAL_MS", "SERVICE_NAME", "GatewayServer"]

_log = structlog.get_logger(__name__)

SERVICE_NAME: str = gateway_pb2.DESCRIPTOR.services_by_name["DeviceGateway"].full_name

#: The shortest interval between a device's keepalive pings the server accepts while it has
#: sent nothing itself (an idle event stream): half the device SDK's keepalive time (20 s),
#: so timer slack never turns a device's regular ping into a strike, while a client pinging
#: faster than this cannot make the server answer a flood of pings.
MIN_PING_INTERVAL_MS = 10_000

#: Pings faster than :data:`MIN_PING_INTERVAL_MS` tolerated before the server ends the
#: connection with ``GOAWAY too_many_pings`` (gRPC's default, stated here).
MAX_PING_STRIKES = 2


class GatewayServer:
    """A ``grpc.aio`` server hosting one :class:`DeviceGatewayServicer` on mutual TLS.

    ``port`` holds the bound port once entered (useful with ``host:0``).
    """

    def __init__(
        self,
        servicer: DeviceGatewayServicer,
        *,
        identity: pki.IdentityFiles,
        listen: str,
        max_message_bytes: int,
        grace_s: float,
        max_concurrent_rpcs: int | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._servicer = servicer
        self._identity = identity
        self._listen = listen
        self._grace_s = grace_s
        self._health = health_aio.HealthServicer()
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                # Devices ping every 20 s to notice a gateway gone silent; accept that, and
                # no flood of pings (see MIN_PING_INTERVAL_MS).
                ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
                ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
                *SERVER_OPTIONS,
            ],
            maximum_concurrent_rpcs=max_concurrent_rpcs,
        )
        on_malformed = None if metrics is None else metrics.on_malformed
        add_service(
            self._server,
            gateway_pb2_grpc.add_DeviceGatewayServicer_to_server,
            servicer,
            on_malformed=on_malformed,
        )
        add_service(
            self._server,
            health_pb2_grpc.add_HealthServicer_to_server,
            self._health,
            on_malformed=on_malformed,
        )
        self.port = 0
        self._stopped = False

    async def __aenter__(self) -> Self:
        creds = pki.grpc_server_credentials(self._identity, require_client_auth=True)
        self.port = bind(self._server, self._listen, creds, setting="listen")
        await self._server.start()
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        _log.info("grpc server listening", listen=self._listen, port=self.port)
        return self

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting calls; let in-flight ones finish within ``grace_s``."""
        if self._stopped:
            return
        self._stopped = True
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self._grace_s if grace_s is None else grace_s)
        _log.info("grpc server stopped")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop(self._grace_s if exc_type is None else 0.0)
