"""The ``Enrollment`` gRPC service: a thin adapter from protobuf to ``pki.EnrollmentAuthority``.

``Enroll`` works without a client certificate (it is served on the enrolment port, which uses
server-authenticated TLS); ``Renew`` requires the device's current certificate, which only the
mutual-TLS port can see. Decisions run in a worker thread: they sign and touch SQLite, and the
event loop must keep serving other calls meanwhile. Errors become statuses in
:mod:`gateway._core._status`. Issued certificates and refusals (by reason) are counted in
:class:`gateway._metrics.CoreMetrics`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable

import structlog

import pki
from gateway._core._observe import refusal_reason
from gateway._core._publish import CrlPublisher, DirectoryPublisher
from gateway._core._status import (
    Context,
    RequestError,
    Unauthenticated,
    peer_certificate,
    peer_host,
    unary,
)
from gateway._metrics import CoreMetrics
from protos.edgeward.v1 import enrollment_pb2, enrollment_pb2_grpc

__all__ = ["EnrollmentService"]


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServicer):
    def __init__(
        self,
        *,
        authority: pki.EnrollmentAuthority,
        directory: DirectoryPublisher,
        crl: CrlPublisher,
        clock: Callable[[], dt.datetime],
        metrics: CoreMetrics | None = None,
    ) -> None:
        self._authority = authority
        self._directory = directory
        self._crl = crl
        self._clock = clock
        self._metrics = metrics if metrics is not None else CoreMetrics()

    def _response(self, issued: pki.IssuedCertificate) -> enrollment_pb2.EnrollResponse:
        return enrollment_pb2.EnrollResponse(
            device_id=issued.identity.id,
            spiffe_id=issued.identity.spiffe_id,
            certificate_chain_pem=issued.chain_pem.decode(),
            ca_bundle_pem=issued.ca_bundle_pem.decode(),
            gateway_directory=self._directory.current(),
            region=issued.device.region,
            device_type=issued.device.type,
        )

    @unary
    async def Enroll(
        self, request: enrollment_pb2.EnrollRequest, context: Context
    ) -> enrollment_pb2.EnrollResponse:
        try:
            response = await self._enroll(request, context)
        except (pki.PkiError, RequestError) as exc:
            self._metrics.refused("Enroll", refusal_reason(exc))
            raise
        self._metrics.enrolments.inc()
        return response

    async def _enroll(
        self, request: enrollment_pb2.EnrollRequest, context: Context
    ) -> enrollment_pb2.EnrollResponse:
        # Cheap size check before any work; the CSR parser checks again.
        if len(request.csr) > pki.MAX_CSR_BYTES:
            raise pki.InvalidCsr(
                f"certificate signing request is larger than {pki.MAX_CSR_BYTES} bytes"
            )
        peer = peer_host(context.peer())

        def decide() -> enrollment_pb2.EnrollResponse:
            issued = self._authority.enroll(
                request.token, request.csr, peer=peer, now=self._clock()
            )
            return self._response(issued)

        response = await asyncio.to_thread(decide)
        structlog.contextvars.bind_contextvars(device_id=response.device_id)
        return response

    @unary
    async def Renew(
        self, request: enrollment_pb2.RenewRequest, context: Context
    ) -> enrollment_pb2.EnrollResponse:
        try:
            response = await self._renew(request, context)
        except (pki.PkiError, RequestError) as exc:
            self._metrics.refused("Renew", refusal_reason(exc))
            raise
        self._metrics.renewals.inc()
        return response

    async def _renew(
        self, request: enrollment_pb2.RenewRequest, context: Context
    ) -> enrollment_pb2.EnrollResponse:
        if len(request.csr) > pki.MAX_CSR_BYTES:
            raise pki.InvalidCsr(
                f"certificate signing request is larger than {pki.MAX_CSR_BYTES} bytes"
            )
        current = peer_certificate(context)
        if current is None:
            raise Unauthenticated(
                "renewal needs the device's current certificate: call the core's mutual-TLS "
                "port with the device identity"
            )
        peer = peer_host(context.peer())

        def decide() -> enrollment_pb2.EnrollResponse:
            issued = self._authority.renew(current, request.csr, now=self._clock(), peer=peer)
            return self._response(issued)

        response = await asyncio.to_thread(decide)
        structlog.contextvars.bind_contextvars(device_id=response.device_id)
        return response

    @unary
    async def GetCACertificates(
        self, request: enrollment_pb2.GetCACertificatesRequest, context: Context
    ) -> enrollment_pb2.CACertificates:
        ca = self._authority.ca
        return enrollment_pb2.CACertificates(
            ca_bundle_pem=ca.bundle_pem.decode(),
            issuing_ca_pem=ca.certificate_pem.decode(),
            trust_domain=ca.trust_domain,
        )

    @unary
    async def GetCrl(
        self, request: enrollment_pb2.GetCrlRequest, context: Context
    ) -> enrollment_pb2.Crl:
        issuing, device, sequence = await asyncio.to_thread(self._crl.current)
        return enrollment_pb2.Crl(
            crl_der=issuing, device_crl_der=device, revocation_sequence=sequence
        )
