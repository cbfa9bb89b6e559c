"""A gateway's console: login links signed by the issuing CA, live frames with their boxes over
server-sent events, revocations shown as they cut a device; a real gateway, model and photos."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import pki
from gateway import RevocationEvent
from gateway._console import LinkVerifier, LiveFeed, mint_link
from protos.edgeward.v1 import common_pb2
from tests._support.gateway import start_gateway
from tests.console._client import ConsoleClient, console_client

pytestmark = pytest.mark.timeout(90)


def _link(pki_dir: Path, gateway_id: str = "gw-test", **kwargs: Any) -> str:
    return mint_link(
        pki.CertificateAuthority.load(pki_dir),
        gateway_id=gateway_id,
        operator=kwargs.pop("operator", "ops-live"),
        role=pki.OperatorRole.VIEWER,
        **kwargs,
    )


async def _events(c: ConsoleClient) -> AsyncIterator[dict[str, Any]]:
    async with c.http.get(c.base + "/api/live", ssl=c.ssl) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for line in r.content:
            if line.startswith(b"data: "):
                yield json.loads(line[6:])


async def _first(
    events: AsyncIterator[dict[str, Any]], pred: Any, within_s: float
) -> dict[str, Any]:
    async with asyncio.timeout(within_s):
        async for message in events:
            if pred(message):
                return message
    raise AssertionError("stream ended")


async def test_live_view_shows_a_frame_with_its_boxes_and_a_revocation(
    issue: Any, tmp_path: Path, photos: Path, pki_dir: Path
) -> None:
    async with start_gateway(issue=issue, tmp_path=tmp_path, use_registry=False) as gw:
        gw.register("cam-live", "pet_camera")
        console = gw.service.console
        async with console_client(console.url, pki_dir / "ca-bundle.pem") as c:
            assert (await c.get("/live"))[0] == 303
            assert (await c.get("/api/live"))[0] == 401
            status, headers = await c.login(_link(pki_dir))
            assert (status, headers["Location"]) == (303, "/live")
            status, _, body = await c.get("/live")
            assert status == 200
            assert "ops-live (viewer)" in body
            events = _events(c)
            stats = await _first(events, lambda m: m["type"] == "stats", 10)
            assert stats["gateway"] == "gw-test"
            assert stats["healthy"] is True
            assert stats["provider"]

            async def send() -> None:
                async with gw.channel(issue("device", "cam-live")) as channel:
                    image = (photos / "chelsea.jpg").read_bytes()
                    await gw.stub(channel).Detect(
                        common_pb2.Frame(image=image, frame_id="live-1"), timeout=20
                    )

            sender = asyncio.create_task(send())
            frame = await _first(events, lambda m: m["type"] == "frame", 30)
            await sender
            assert (frame["device"], frame["frame_id"]) == ("cam-live", "live-1")
            top = max(frame["detections"], key=lambda d: d["score"])
            assert top["label"] == "Cat"
            x0, y0, x1, y1 = top["box"]
            assert 0 <= x0 < x1 <= 1
            assert 0 <= y0 < y1 <= 1
            jpeg = base64.b64decode(frame["image"].removeprefix("data:image/jpeg;base64,"))
            with Image.open(io.BytesIO(jpeg)) as im:
                assert im.format == "JPEG"
                assert im.size == (frame["width"], frame["height"])
                assert max(im.size) <= 640

            await gw.service.revocation.apply(RevocationEvent(7, "cam-live", None, "stolen"))
            cut = await _first(events, lambda m: m["type"] == "revoked", 10)
            assert (cut["device"], cut["reason"]) == ("cam-live", "stolen")
            await events.aclose()


async def test_a_login_link_works_once_and_only_for_its_gateway(
    issue: Any, tmp_path: Path, pki_dir: Path, other_pki_dir: Path
) -> None:
    async with start_gateway(issue=issue, tmp_path=tmp_path, use_registry=False) as gw:
        url, ca = gw.service.console.url, pki_dir / "ca-bundle.pem"
        link = _link(pki_dir)
        async with console_client(url, ca) as c:
            assert (await c.login(link))[0] == 303
        async with console_client(url, ca) as c:
            assert (await c.login(link))[0] == 401  # replayed
            assert (await c.login(_link(pki_dir, gateway_id="gw-other")))[0] == 401
            assert (await c.login(_link(other_pki_dir)))[0] == 401  # another CA signed it
            assert (await c.login(_link(pki_dir, now=time.time() - 3600)))[0] == 401
            payload, sig = _link(pki_dir).split(".")
            forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
            forged["role"] = "admin"
            tampered = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")
            assert (await c.login(f"{tampered}.{sig}"))[0] == 401
            assert (await c.login("link=" + "A" * 3000))[0] == 401
            assert (await c.get("/live"))[0] == 303


def test_link_verifier_reasons(pki_dir: Path, other_pki_dir: Path) -> None:
    ca = pki.CertificateAuthority.load(pki_dir)
    clock = [time.time()]
    verifier = LinkVerifier(
        gateway_id="gw-a",
        trust_domain=ca.trust_domain,
        ca_bundle_pem=ca.bundle_pem,
        clock=lambda: clock[0],
    )
    link = mint_link(
        ca, gateway_id="gw-a", operator="ops-a", role=pki.OperatorRole.ADMIN, now=clock[0]
    )
    assert verifier.verify(link).operator == "ops-a"
    cases = {
        link: "already used",
        mint_link(
            ca, gateway_id="gw-b", operator="ops-a", role=pki.OperatorRole.ADMIN, now=clock[0]
        ): "another gateway",
        mint_link(
            pki.CertificateAuthority.load(other_pki_dir),
            gateway_id="gw-a",
            operator="ops-a",
            role=pki.OperatorRole.ADMIN,
            now=clock[0],
        ): "not signed",
        "x.y.z": "malformed",
        "!!!.???": "malformed",
    }
    for candidate, reason in cases.items():
        with pytest.raises(pki.SignatureInvalid, match=reason):
            verifier.verify(candidate)
    late = mint_link(
        ca, gateway_id="gw-a", operator="ops-a", role=pki.OperatorRole.ADMIN, now=clock[0]
    )
    clock[0] += 61
    with pytest.raises(pki.SignatureInvalid, match="expired"):
        verifier.verify(late)


async def test_the_live_feed_chains_the_escalation_hook_and_costs_nothing_unwatched() -> None:
    calls: list[str] = []

    async def escalation(**kwargs: Any) -> dict[int | None, str]:
        calls.append(kwargs["frame_id"])
        return {0: "esc-1"}

    feed = LiveFeed(max_fps=1000)
    hook = feed.wrap(escalation)

    class Result:
        detections = ()
        model_name = "m"
        model_version = "1"

    marks = await hook(device_id="d-1", region=None, frame_id="f-1", result=Result(), frame=None)
    assert marks == {0: "esc-1"}
    assert calls == ["f-1"]
    frame = __import__("numpy").zeros((8, 8, 3), dtype="uint8")
    feed.offer("d-1", "f-2", Result(), frame, {})
    assert feed._work.qsize() == 0  # nobody watching: nothing queued, nothing encoded
    async with feed.watch():
        feed.offer("d-1", "f-3", Result(), frame, {})
        assert feed._work.qsize() == 1


async def test_only_a_core_certificate_reads_the_gateways_figures(
    issue: Any, tmp_path: Path, pki_dir: Path
) -> None:
    async with start_gateway(issue=issue, tmp_path=tmp_path, use_registry=False) as gw:
        url, ca = gw.service.console.url, pki_dir / "ca-bundle.pem"
        core = issue("core", "core-1")
        async with console_client(url, ca, core) as c:
            status, _, body = await c.get("/internal/devices")
            assert status == 200
            assert json.loads(body)["stats"]["gateway"] == "gw-test"
            assert (await c.post("/internal/devices", data={}))[0] in (401, 403)
            assert (await c.get("/live"))[0] == 303  # a core is no operator
        for other in (issue("device", "cam-x"), issue("gateway", "gw-other"), None):
            async with console_client(url, ca, other) as c:
                assert (await c.get("/internal/devices"))[0] == 401
        async with console_client(url, ca) as c:
            await c.login(_link(pki_dir))  # an operator's session is not a core's certificate
            assert (await c.get("/internal/devices"))[0] == 401
