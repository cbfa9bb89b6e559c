"""The core's Prometheus endpoint, scraped over HTTP from a real core after real calls.

Each counter must move by exactly what the core did: one enrolment, one refused enrolment,
one renewal, one revocation, one renewal refused as revoked, one escalation, one Core call
refused to a device; and the latency histograms must hold one observation per operation.
"""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

import device_sdk as sdk
import pki
from device_sdk.errors import DeviceRevoked
from gateway import load_core_settings
from protos.edgeward.v1 import core_pb2, core_pb2_grpc, enrollment_pb2, enrollment_pb2_grpc
from tests._support.core import running_core, unique_id
from tests.conftest import IssueFn
from tests.pki.conftest import make_csr

pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_core_metrics_count_what_the_core_did(
    pki_dir: Path, tmp_path: Path, issue: IssueFn
) -> None:
    async with running_core(pki_dir, tmp_path) as core:
        port = core.server.metrics_port
        assert port > 0
        before = await asyncio.to_thread(_scrape, port)

        device_id = unique_id("cam-metrics")
        result = await sdk.enroll(
            endpoint=core.enrol_address,
            ca_bundle_pem=core.ca_bundle_pem,
            token=core.token(device_id),
            out_dir=tmp_path / device_id,
            core_address=core.address,
        )
        # A refused enrolment: a token that was never issued.
        other = unique_id("cam-refused")
        async with core.channel() as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(
                    enrollment_pb2.EnrollRequest(token=f"{other}.nope", csr=make_csr(other)),
                    timeout=10,
                )
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        renewed = await sdk.renew(identity_dir=result.files.directory)
        core.server.revoke_device(device_id)
        with pytest.raises(DeviceRevoked):
            await sdk.renew(identity_dir=renewed.files.directory)
        # The Core API: a gateway's escalation (no handler on this core: UNIMPLEMENTED) and
        # a device refused.
        gateway = issue("gateway", "gw-metrics")
        async with core.channel(identity=gateway) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as unimplemented:
                await core_pb2_grpc.CoreStub(channel).Escalate(
                    core_pb2.EscalationRequest(escalation_id="e-1"), timeout=10
                )
        assert unimplemented.value.code() is grpc.StatusCode.UNIMPLEMENTED
        device = issue("device", "cam-metrics-intruder")
        async with core.channel(identity=device) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await core_pb2_grpc.CoreStub(channel).GetDevice(
                    core_pb2.GetDeviceRequest(device_id=device_id), timeout=10
                )
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED

        # The feed counts the revocation when it sees the new sequence number (poked at once).
        after = before
        for _ in range(200):
            after = await asyncio.to_thread(_scrape, port)
            if _delta(before, after, "edgeward_core_revocations_total") >= 1:
                break
            await asyncio.sleep(0.05)

    def d(name: str, **labels: str) -> float:
        return _delta(before, after, name, **labels)

    assert d("edgeward_core_enrolments_total") == 1
    assert d("edgeward_core_renewals_total") == 1
    assert d("edgeward_core_refusals_total", method="Enroll", reason="token_rejected") == 1
    assert d("edgeward_core_refusals_total", method="Renew", reason="revoked") == 1
    assert d("edgeward_core_refusals_total", method="GetDevice", reason="permission_denied") == 1
    assert d("edgeward_core_revocations_total") == 1
    assert d("edgeward_core_escalations_total", code="UNIMPLEMENTED") == 1  # no handler here
    assert d("edgeward_core_escalation_seconds_count") == 1
    refusals = sum(
        value - before.get(key, 0.0)
        for key, value in after.items()
        if key[0] == "edgeward_core_refusals_total"
    )
    assert refusals == 3
    registry_ops = {
        "complete_enrolment": 1,
        "record_renewal": 1,
        "revoke_device": 1,
    }
    for operation, count in registry_ops.items():
        assert d("edgeward_core_registry_seconds_count", operation=operation) == count, operation


async def test_escalations_are_counted_with_their_latency(
    pki_dir: Path, tmp_path: Path, issue: IssueFn
) -> None:
    """An escalation handler's answers and refusals, by status, in the latency histogram."""
    from gateway.errors import InvalidArgument

    async def handler(
        request: core_pb2.EscalationRequest, context: object, *, gateway: pki.Identity
    ) -> core_pb2.EscalationResult:
        if not request.escalation_id:
            raise InvalidArgument("escalation_id is required")
        return core_pb2.EscalationResult(model_ms=1.0)

    async with running_core(pki_dir, tmp_path, escalate=handler) as core:
        port = core.server.metrics_port
        before = await asyncio.to_thread(_scrape, port)
        gateway = issue("gateway", "gw-escalating")
        async with core.channel(identity=gateway) as channel:
            stub = core_pb2_grpc.CoreStub(channel)
            for n in range(2):
                await stub.Escalate(core_pb2.EscalationRequest(escalation_id=f"e-{n}"), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Escalate(core_pb2.EscalationRequest(), timeout=10)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        after = await asyncio.to_thread(_scrape, port)
    assert _delta(before, after, "edgeward_core_escalations_total", code="OK") == 2
    assert _delta(before, after, "edgeward_core_escalations_total", code="INVALID_ARGUMENT") == 1
    assert _delta(before, after, "edgeward_core_escalation_seconds_count") == 3


def test_metrics_listen_is_configurable_and_loopback_by_default(
    pki_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_core_settings(None, pki_dir=pki_dir).metrics_listen == "127.0.0.1:9465"
    toml = tmp_path / "core.toml"
    toml.write_text(f'pki_dir = "{pki_dir}"\nmetrics_listen = "127.0.0.1:19465"\n')
    assert load_core_settings(toml).metrics_listen == "127.0.0.1:19465"
    monkeypatch.setenv("EDGEWARD_CORE_METRICS_LISTEN", "127.0.0.1:29465")
    assert load_core_settings(toml).metrics_listen == "127.0.0.1:29465"
    monkeypatch.setenv("EDGEWARD_CORE_METRICS_LISTEN", "no-port")
    with pytest.raises(Exception, match="metrics_listen"):
        load_core_settings(toml)
