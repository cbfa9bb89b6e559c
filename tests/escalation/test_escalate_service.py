"""``Core.Escalate`` over real mTLS: gateways only, idempotent by id, bounded input."""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import zlib
from typing import Any

import grpc
import pytest
from PIL import Image

import pki
from protos.edgeward.v1 import core_pb2, core_pb2_grpc
from tests.conftest import PHOTOS, IssueFn

from .conftest import Cores

MOTORCYCLE = (PHOTOS / "motorcycle.jpg").read_bytes()


def request(escalation_id: str, image: bytes = MOTORCYCLE) -> core_pb2.EscalationRequest:
    return core_pb2.EscalationRequest(
        escalation_id=escalation_id,
        device_id="dev-1",
        region="home",
        image=image,
        is_full_frame=True,
        frame_id="f1",
    )


async def call(
    address: str, identity: pki.IdentityFiles, req: core_pb2.EscalationRequest
) -> core_pb2.EscalationResult:
    creds = pki.grpc_channel_credentials(
        ca_bundle_pem=identity.ca_bundle.read_bytes(), identity=identity
    )
    async with grpc.aio.secure_channel(address, creds) as channel:
        stub: Any = core_pb2_grpc.CoreStub(channel)
        result: core_pb2.EscalationResult = await stub.Escalate(req, timeout=20)
        return result


async def test_gateway_gets_an_answer_once_per_id(cores: Cores, issue: IssueFn) -> None:
    gw = issue("gateway", "gw-1")
    async with cores.run() as core:
        first = await call(core.address, gw, request("esc-1"))
        assert first.answer.label == "motorcycle"
        assert first.answer.model_name == "nanodet-coco80+efficientnet-lite2"
        assert [o.label for o in first.answer.objects] == ["motorcycle"]
        assert first.answer.escalation_id == "esc-1"
        assert not first.answer.still_unknown
        assert first.model_ms > 0
        # A retry (its reply lost, say) gets the stored answer; the models do not run again.
        again = await call(core.address, gw, request("esc-1"))
        assert again == first
        assert cores.runs == 1
        # Two concurrent calls with a new id: one model run between them.
        both = await asyncio.gather(
            call(core.address, gw, request("esc-2")), call(core.address, gw, request("esc-2"))
        )
        assert both[0] == both[1]
        assert cores.runs == 2
        # Another gateway using the same id gets its own answer, never gw-1's stored one.
        other = issue("gateway", "gw-2")
        await call(core.address, other, request("esc-1"))
        assert cores.runs == 3
        assert cores.services[0].store.count() == 3


async def test_a_retry_is_answered_while_the_models_are_busy(cores: Cores, issue: IssueFn) -> None:
    gw = issue("gateway", "gw-1")
    service = cores.service()
    async with cores.run(service) as core:
        first = await call(core.address, gw, request("esc-1"))
        # The model thread is held, and a new escalation waits for it.
        gate = threading.Event()
        held = service.models.run_in_worker(lambda: gate.wait(60))
        try:
            waiting = asyncio.ensure_future(call(core.address, gw, request("esc-2")))
            async with asyncio.timeout(15):
                while not service._inflight:  # noqa: ASYNC110 - esc-2 reached the core
                    await asyncio.sleep(0.01)
            # The retry of the answered escalation does not queue behind the held thread.
            async with asyncio.timeout(15):
                again = await call(core.address, gw, request("esc-1"))
            assert again == first
            assert not waiting.done()
        finally:
            gate.set()
        await held
        second = await waiting
        assert second.answer.escalation_id == "esc-2"
        assert cores.runs == 2


async def test_answers_survive_a_core_restart(cores: Cores, issue: IssueFn) -> None:
    gw = issue("gateway", "gw-1")
    async with cores.run() as core:
        first = await call(core.address, gw, request("esc-1"))
    async with cores.run() as core:
        assert await call(core.address, gw, request("esc-1")) == first
    assert cores.runs == 1


@pytest.mark.parametrize("role", ["device", "core"])
async def test_only_gateways_may_escalate(cores: Cores, issue: IssueFn, role: str) -> None:
    caller = issue(role, f"{role}-1")
    async with cores.run() as core:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(core.address, caller, request("esc-1"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "only gateway identities" in (info.value.details() or "")
    assert cores.runs == 0


async def test_a_gateway_of_another_ca_is_refused_at_the_handshake(
    cores: Cores, issue_foreign: IssueFn, issue: IssueFn
) -> None:
    foreign = issue_foreign("gateway", "gw-1")
    ours = issue("gateway", "gw-1")
    # Trust our CA (so the server is verified) but present the foreign certificate.
    creds = grpc.ssl_channel_credentials(
        root_certificates=ours.ca_bundle.read_bytes(),
        private_key=foreign.key.read_bytes(),
        certificate_chain=foreign.chain.read_bytes(),
    )
    async with cores.run() as core, grpc.aio.secure_channel(core.address, creds) as channel:
        stub: Any = core_pb2_grpc.CoreStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Escalate(request("esc-1"), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert cores.runs == 0


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _small_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(out, format="JPEG")
    return out.getvalue()


@pytest.mark.parametrize(
    ("escalation_id", "image", "message"),
    [
        ("esc-big", MOTORCYCLE, "bytes, limit"),
        ("esc-text", b"GIF89a not an image", "not a JPEG or PNG"),
        ("esc-bomb", _png_header_only(50_000, 50_000), "too large"),
        ("bad id/../x", None, "escalation_id must be"),
        ("", None, "escalation_id must be"),
    ],
)
async def test_bad_requests_are_invalid_arguments(
    cores: Cores, issue: IssueFn, escalation_id: str, image: bytes | None, message: str
) -> None:
    gw = issue("gateway", "gw-1")
    async with cores.run(max_image_bytes=100_000, max_pixels=1_000_000) as core:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(core.address, gw, request(escalation_id, image or _small_jpeg()))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (info.value.details() or "")
    assert cores.runs == 0
