"""The gateway's client of ``Core.Escalate``: one mTLS channel per core address.

The call's outcome is sorted once, here, into "try again later" (:class:`CoreUnavailable`)
and "never" (:class:`EscalationFailed`), so the outbox never has to read gRPC codes.
"""

from __future__ import annotations

from typing import Any

import grpc

import pki
from gateway.errors import CoreUnavailable, EscalationFailed
from protos.edgeward.v1 import core_pb2, core_pb2_grpc

__all__ = ["MAX_MESSAGE_BYTES", "CoreClient"]

#: Largest Escalate request or reply; crops are shrunk well below it.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

# Codes after which the same request can never succeed: the image or request is bad. Every
# other code (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, and also PERMISSION_DENIED
# or UNAUTHENTICATED, which an operator fixes by correcting a certificate) is retried until
# the escalation's TTL.
_FINAL = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


class CoreClient:
    """Calls ``Core.Escalate`` over mTLS with the gateway's own certificate."""

    def __init__(self, *, credentials: grpc.ChannelCredentials, timeout_s: float) -> None:
        self._credentials = credentials
        self._timeout_s = timeout_s
        self._channels: dict[str, tuple[grpc.aio.Channel, core_pb2_grpc.CoreStub]] = {}

    def _stub(self, address: str) -> core_pb2_grpc.CoreStub:
        entry = self._channels.get(address)
        if entry is None:
            channel = grpc.aio.secure_channel(
                address,
                self._credentials,
                options=[
                    # Only a core may answer: demand its role-pinned name (a gateway's
                    # certificate also names localhost, so the address alone is not enough).
                    pki.server_name_option(pki.core_server_name()),
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                    # Reconnect quickly once the core is back: the outbox has its own backoff.
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 2000),
                ],
            )
            entry = (channel, core_pb2_grpc.CoreStub(channel))
            self._channels[address] = entry
        return entry[1]

    async def escalate(
        self, address: str, request: core_pb2.EscalationRequest
    ) -> core_pb2.EscalationResult:
        """Send one escalation; raise :class:`CoreUnavailable` or :class:`EscalationFailed`."""
        stub = self._stub(address)
        try:
            # grpc-stubs types the stub's methods as synchronous; on an aio channel they
            # return awaitables.
            call: Any = stub.Escalate
            result: core_pb2.EscalationResult = await call(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            details = exc.details() or ""
            if code in _FINAL:
                raise EscalationFailed(code.name, details) from exc
            raise CoreUnavailable(code.name, details) from exc
        return result

    async def aclose(self) -> None:
        """Close every channel."""
        channels, self._channels = self._channels, {}
        for channel, _stub in channels.values():
            await channel.close(None)
