"""Bytes that are not the method's protobuf message: INVALID_ARGUMENT, counted, logged, served on.

Raw bytes go over the real mTLS (or server-TLS) channel through ``unary_unary(method)`` with no
serializer, as a broken or hostile client would send them, to every method kind of every
server: the gateway's ``DeviceGateway`` (unary, server stream, request stream) and health, the
core's ``Core`` and ``Enrollment`` on the mutual-TLS port and ``Enrollment`` on the enrolment
port. Each time the server answers ``INVALID_ARGUMENT`` with a plain message, counts it in
``malformed_requests_total``, logs one line without the payload, and serves the next valid
call.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.edgeward.v1 import common_pb2, enrollment_pb2, enrollment_pb2_grpc
from tests._support.core import running_core
from tests._support.gateway import start_gateway
from tests.conftest import IssueFn

pytestmark = pytest.mark.timeout(120)

# Field 1, length-delimited, with a length far beyond the data: no message type parses it.
# The tail is a marker that must never reach a log line.
GARBAGE = b"\x0a\xff\xff\xff\xff\x0f" + b"PAYLOAD-SECRET"


def _metric(text: str, name: str, method: str) -> float:
    match = re.search(rf'^{name}\{{method="{method}"\}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def _unary_garbage(channel: grpc.aio.Channel, method: str) -> grpc.aio.AioRpcError:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(GARBAGE, timeout=10)
    return caught.value


async def _server_stream_garbage(channel: grpc.aio.Channel, method: str) -> grpc.aio.AioRpcError:
    call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call(GARBAGE, timeout=10):
            pass
    return caught.value


def _refused(error: grpc.aio.AioRpcError, message: str) -> None:
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.details() == f"malformed request: not a valid {message}"


def _logged(logs: list[dict[str, object]], method: str, message: str) -> None:
    lines = [e for e in logs if e["event"] == "malformed request" and e["method"] == method]
    assert len(lines) == 1, logs
    assert lines[0]["message"] == message
    assert lines[0]["peer"] == "127.0.0.1"
    assert "PAYLOAD-SECRET" not in repr(logs)


@pytest.mark.slow
async def test_the_gateway_refuses_malformed_requests_and_serves_on(
    issue: IssueFn, tmp_path: Path, photos: Path
) -> None:
    image = (photos / "chelsea.jpg").read_bytes()
    async with start_gateway(issue=issue, tmp_path=tmp_path) as gw:
        gw.register("cam-garbage", "pet_camera")
        device = issue("device", "cam-garbage")
        async with gw.channel(device) as channel:
            stub = gw.stub(channel)
            service = "/edgeward.v1.DeviceGateway/"
            with structlog.testing.capture_logs() as logs:
                _refused(await _unary_garbage(channel, service + "Detect"), "edgeward.v1.Frame")
                _refused(
                    await _unary_garbage(channel, service + "ReportTelemetry"),
                    "edgeward.v1.Telemetry",
                )
                _refused(
                    await _server_stream_garbage(channel, service + "Subscribe"),
                    "edgeward.v1.SubscribeRequest",
                )
                _refused(
                    await _unary_garbage(channel, "/grpc.health.v1.Health/Check"),
                    "grpc.health.v1.HealthCheckRequest",
                )

                # A request stream: the valid frame before the garbage is answered, then the
                # stream ends INVALID_ARGUMENT.
                async def frames() -> AsyncIterator[bytes]:
                    yield common_pb2.Frame(image=image, frame_id="good").SerializeToString()
                    yield GARBAGE

                stream = channel.stream_stream(
                    service + "StreamDetect",
                    request_serializer=None,
                    response_deserializer=common_pb2.DetectionResult.FromString,
                )
                answers: list[common_pb2.DetectionResult] = []

                async def read_all() -> None:
                    async for answer in stream(frames(), timeout=30):
                        answers.append(answer)

                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await read_all()
                _refused(caught.value, "edgeward.v1.Frame")
                assert [a.frame_id for a in answers] == ["good"]

            for method, message in (
                ("Detect", "edgeward.v1.Frame"),
                ("ReportTelemetry", "edgeward.v1.Telemetry"),
                ("Subscribe", "edgeward.v1.SubscribeRequest"),
                ("Check", "grpc.health.v1.HealthCheckRequest"),
                ("StreamDetect", "edgeward.v1.Frame"),
            ):
                _logged(logs, method, message)

            # The server keeps serving valid calls.
            result = await stub.Detect(common_pb2.Frame(image=image), timeout=30)
            assert "Cat" in {d.label for d in result.detections}

        text = gw.metrics_text()
        for method in ("Detect", "ReportTelemetry", "Subscribe", "Check", "StreamDetect"):
            assert _metric(text, "edgeward_gateway_malformed_requests_total", method) == 1.0
        # The request stream went through the servicer's own accounting as well.
        assert 'edgeward_gateway_requests_total{code="INVALID_ARGUMENT",method="StreamDetect"}' in (
            text
        )


async def test_the_core_refuses_malformed_requests_on_both_ports_and_serves_on(
    pki_dir: Path, tmp_path: Path, issue: IssueFn
) -> None:
    async with running_core(pki_dir, tmp_path) as core:
        gateway = issue("gateway", "gw-garbage")
        with structlog.testing.capture_logs() as logs:
            # Enrolment port (server-authenticated TLS).
            async with core.channel() as channel:
                _refused(
                    await _unary_garbage(channel, "/edgeward.v1.Enrollment/Enroll"),
                    "edgeward.v1.EnrollRequest",
                )
                _refused(
                    await _unary_garbage(channel, "/edgeward.v1.Enrollment/GetCACertificates"),
                    "edgeward.v1.GetCACertificatesRequest",
                )
                reply = await enrollment_pb2_grpc.EnrollmentStub(channel).GetCACertificates(
                    enrollment_pb2.GetCACertificatesRequest(), timeout=10
                )
                assert reply.trust_domain == core.trust_domain
            # Mutual-TLS port: Core (unary and server stream), Renew, health.
            async with core.channel(identity=gateway) as channel:
                _refused(
                    await _unary_garbage(channel, "/edgeward.v1.Core/Escalate"),
                    "edgeward.v1.EscalationRequest",
                )
                _refused(
                    await _server_stream_garbage(channel, "/edgeward.v1.Core/WatchRevocations"),
                    "edgeward.v1.WatchRevocationsRequest",
                )
                _refused(
                    await _unary_garbage(channel, "/edgeward.v1.Enrollment/Renew"),
                    "edgeward.v1.RenewRequest",
                )
                _refused(
                    await _unary_garbage(channel, "/grpc.health.v1.Health/Check"),
                    "grpc.health.v1.HealthCheckRequest",
                )
                health = health_pb2_grpc.HealthStub(channel)
                status = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert status.status == health_pb2.HealthCheckResponse.SERVING
        for method, message in (
            ("Enroll", "edgeward.v1.EnrollRequest"),
            ("GetCACertificates", "edgeward.v1.GetCACertificatesRequest"),
            ("Escalate", "edgeward.v1.EscalationRequest"),
            ("WatchRevocations", "edgeward.v1.WatchRevocationsRequest"),
            ("Renew", "edgeward.v1.RenewRequest"),
            ("Check", "grpc.health.v1.HealthCheckRequest"),
        ):
            _logged(logs, method, message)
        text = core.server.metrics.render().decode()
        for method in ("Enroll", "GetCACertificates", "Escalate", "WatchRevocations", "Renew"):
            assert _metric(text, "edgeward_core_malformed_requests_total", method) == 1.0
        # A malformed Escalate never reached the handler: no escalation counted.
        assert "edgeward_core_escalations_total{" not in text
