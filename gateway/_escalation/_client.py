"""The gateway's client of ``Core.Escalate``: pinned mTLS channels, failover between replicas.

The call's outcome is sorted once, here, into "try again later" (:class:`CoreUnavailable`)
and "never" (:class:`EscalationFailed`), so the outbox never has to read gRPC codes.
"""

from __future__ import annotations

from typing import Any

import grpc

from gateway._core_endpoints import MAX_MESSAGE_BYTES, CoreEndpoints
from gateway.errors import CoreUnavailable, EscalationFailed
from protos.edgeward.v1 import core_pb2

__all__ = ["MAX_MESSAGE_BYTES", "CoreClient"]

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
    """Calls ``Core.Escalate`` over mTLS with the gateway's own certificate.

    An outbox entry names its core as a target: one ``host:port`` or a comma list of
    replicas. Within one attempt the client tries the target's replicas in failover order
    (:class:`~gateway._core_endpoints.CoreEndpoints`): the one that answered last first, and
    on any retryable failure (the replica died mid-request, is unreachable, overloaded or
    slow) the next, with the same escalation id. Replicas share one answer store keyed by
    (gateway, escalation id), so a replica that already answered the id, or is still
    running it, is never run twice and the device gets one answer. Only when every replica
    failed does the outbox back off (:class:`CoreUnavailable`).
    """

    def __init__(self, *, credentials: grpc.ChannelCredentials, timeout_s: float) -> None:
        self._credentials = credentials
        self._timeout_s = timeout_s
        self._targets: dict[str, CoreEndpoints] = {}

    def _endpoints(self, target: str) -> CoreEndpoints:
        endpoints = self._targets.get(target)
        if endpoints is None:
            endpoints = CoreEndpoints(target, credentials=self._credentials)
            self._targets[target] = endpoints
        return endpoints

    async def escalate(
        self, target: str, request: core_pb2.EscalationRequest
    ) -> core_pb2.EscalationResult:
        """Send one escalation to ``target``'s replicas in turn.

        Raises :class:`EscalationFailed` on a final refusal, :class:`CoreUnavailable` when no
        replica answered.
        """
        endpoints = self._endpoints(target)
        last: CoreUnavailable | None = None
        for address in endpoints.order():
            stub = endpoints.stub(address)
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
                last = CoreUnavailable(code.name, details)
                endpoints.failed(address, code.name)
                continue
            endpoints.succeeded(address)
            return result
        assert last is not None  # noqa: S101 - a target has at least one address
        raise last

    async def aclose(self) -> None:
        """Close every channel."""
        targets, self._targets = self._targets, {}
        for endpoints in targets.values():
            await endpoints.aclose()
