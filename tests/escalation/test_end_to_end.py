"""Escalation through the real services: a device, a running gateway, a running core.

The gateway is a :class:`~gateway._service.GatewayService` whose escalation plug-in comes
from its ``[escalation]`` table, found the way ``edgeward gateway run`` finds it; the core is
a :class:`~gateway._core.CoreServer` with the real ``Core.Escalate`` (NanoDet and
EfficientNet-Lite2); devices speak mutual-TLS gRPC with certificates from the test PKI.
The documentation's configuration examples are loaded here too, so docs and code cannot
drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

import pki
from gateway import (
    ConfigError,
    CoreEscalationSettings,
    EscalateService,
    EscalationSettings,
    GatewaySettings,
    RegionPolicy,
    free_port,
    load_core_settings,
    load_gateway_settings,
)
from gateway._escalation import FaceRedactor, plugin
from gateway._inference._image import decode_image
from gateway._inference._manifest import load_manifest
from gateway._service import configured_plugins
from protos.edgeward.v1 import common_pb2, core_pb2, gateway_pb2, gateway_pb2_grpc
from tests._support.core import RunningCore, running_core, unique_id
from tests._support.gateway import RunningGateway, start_gateway
from tests.conftest import PHOTOS, ROOT, IssueFn

from .conftest import EDGE_MODEL, MODELS

EDGE_LABELS = load_manifest(MODELS).entry(EDGE_MODEL).labels

# The gateway's own region has no policy: a device must be in "home" or "private" to
# escalate anything (and one of another region escalates nothing).
GATEWAY_REGION = "gw-region"
HOME = {
    # Empty frames go to the core whole; every edge label but Dog is trusted; no band.
    "escalate_empty_frames": True,
    "send": "frame",
    "edge_labels": [label for label in EDGE_LABELS if label not in {"Dog", "???"}],
    "band_low": 0.0,
    "band_high": 0.0,
    "require_face_blur": False,
    "device_budget_per_min": 1000,
    "region_budget_per_min": 1000,
}
PRIVATE = {
    # Crops only, default uncertainty band (the astronaut's Person is in it), faces blurred.
    "send": "crop",
    "require_face_blur": True,
    "device_budget_per_min": 1000,
    "region_budget_per_min": 1000,
}

FRAMES_ONLY = {
    # Nothing but the defaults and permission for frames to leave (faces still blurred).
    "send": "frame",
    "device_budget_per_min": 1000,
    "region_budget_per_min": 1000,
}
QUALITY = ROOT / "tests" / "data" / "quality"


class Capturing:
    """The real ``Core.Escalate`` handler, keeping a copy of each image that reached it."""

    def __init__(self, inner: EscalateService) -> None:
        self.inner = inner
        self.images: list[bytes] = []

    @property
    def runs(self) -> int:
        """Model runs at the core."""
        return self.inner.models.runs

    async def __aenter__(self) -> Capturing:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.inner.__aexit__(None, None, None)

    async def __call__(
        self, request: core_pb2.EscalationRequest, context: Any, *, gateway: Any
    ) -> core_pb2.EscalationResult:
        self.images.append(bytes(request.image))
        return await self.inner(request, context, gateway=gateway)


def core_handler(tmp_path: Path) -> Capturing:
    return Capturing(
        EscalateService(
            CoreEscalationSettings(
                models_dir=MODELS, providers="cpu", answer_store=tmp_path / "core-answers.sqlite3"
            )
        )
    )


def escalation_table(tmp_path: Path, core_address: str) -> dict[str, Any]:
    """The ``[escalation]`` table of the gateway under test."""
    return {
        "core_address": core_address,
        "outbox_path": str(tmp_path / "outbox.sqlite3"),
        "retry_backoff_base_s": 0.05,
        "retry_backoff_max_s": 0.3,
        "regions": {"home": HOME, "private": PRIVATE, "frames": FRAMES_ONLY},
    }


@contextlib.asynccontextmanager
async def escalating_gateway(
    issue: IssueFn, tmp_path: Path, core: RunningCore
) -> AsyncIterator[RunningGateway]:
    """A gateway whose plug-ins come from its settings, as ``edgeward gateway run`` does."""
    async with start_gateway(
        issue=issue,
        tmp_path=tmp_path,
        gateway_id="gw-e2e",
        plugins=None,
        overrides={
            "region": GATEWAY_REGION,
            "escalation": escalation_table(tmp_path, core.address),
        },
    ) as gw:
        # The plug-in started from the table and hooked itself to the device servicer.
        assert gw.service.door is not None
        assert gw.service.door.detection_hook is not None
        yield gw


def device(gw: RunningGateway, issue: IssueFn, region: str) -> tuple[str, pki.IdentityFiles]:
    """A device id registered in ``region`` (type pet_camera), and its identity."""
    device_id = unique_id("cam")
    gw.register(device_id, "pet_camera", region=region)
    return device_id, issue("device", device_id)


async def detect(gw: RunningGateway, who: pki.IdentityFiles, photo: str, frame_id: str) -> Any:
    async with gw.channel(who) as channel:
        stub = gateway_pb2_grpc.DeviceGatewayStub(channel)
        return await stub.Detect(
            common_pb2.Frame(image=(PHOTOS / photo).read_bytes(), frame_id=frame_id), timeout=30
        )


async def next_events(
    gw: RunningGateway, who: pki.IdentityFiles, count: int, *, after: str = ""
) -> list[common_pb2.DeviceEvent]:
    """Subscribe as ``who`` and read ``count`` events (a deadline on every wait)."""
    async with gw.channel(who) as channel:
        stub = gateway_pb2_grpc.DeviceGatewayStub(channel)
        call = stub.Subscribe(gateway_pb2.SubscribeRequest(after_event_id=after), timeout=60)
        events: list[common_pb2.DeviceEvent] = []
        try:
            for _ in range(count):
                event = await asyncio.wait_for(call.read(), 30)
                assert isinstance(event, common_pb2.DeviceEvent), event  # not EOF
                events.append(event)
        finally:
            call.cancel()
        return events


def pending_of(result: common_pb2.DetectionResult) -> list[common_pb2.Detection]:
    return [d for d in result.detections if d.escalated]


async def wait_until(predicate: Callable[[], bool], within_s: float = 30.0) -> None:
    async with asyncio.timeout(within_s):
        while not predicate():  # noqa: ASYNC110 - polling the gateway's event hub
            await asyncio.sleep(0.02)


# ------------------------------------------------------------------------- through gRPC


async def test_empty_frame_and_unknown_label_escalate_through_a_running_gateway(
    pki_dir: Path, tmp_path: Path, issue: IssueFn
) -> None:
    handler = core_handler(tmp_path)
    async with (
        running_core(pki_dir, tmp_path, escalate=handler) as core,
        escalating_gateway(issue, tmp_path, core) as gw,
    ):
        _, cam = device(gw, issue, "home")

        # A motorcycle: the edge model has no class for it and finds nothing. The device
        # is answered at once, with one pending whole-frame detection and its id …
        result = await detect(gw, cam, "motorcycle.jpg", "f-moto")
        (frame_det,) = result.detections
        assert frame_det.escalated
        assert frame_det.escalation_id.startswith("esc-")
        # … rendered as the contract says: "unknown", score 0, the whole frame as its box,
        # and why it was escalated.
        assert frame_det == common_pb2.Detection(
            label="unknown",
            score=0.0,
            box=common_pb2.Box(x_min=0.0, y_min=0.0, x_max=1.0, y_max=1.0),
            escalated=True,
            escalation_id=frame_det.escalation_id,
            escalation_reason="empty_frame",
        )

        # A dog: outside the region's edge set, so its detection is escalated (the rest of
        # the frame's detections are trusted labels and stand).
        dog = await detect(gw, cam, "dog.jpg", "f-dog")
        (dog_det,) = pending_of(dog)
        assert dog_det.label == "Dog"
        assert all(d.label != "Dog" for d in dog.detections if not d.escalated)

        # The final answers arrive on Subscribe, under the same ids.
        events = await next_events(gw, cam, 2)
        answers = {e.escalation.escalation_id: e.escalation for e in events}
        assert set(answers) == {frame_det.escalation_id, dog_det.escalation_id}
        moto = answers[frame_det.escalation_id]
        assert (moto.frame_id, moto.label, moto.model_name, moto.still_unknown) == (
            "f-moto",
            "motorcycle",
            "nanodet-coco80+efficientnet-lite2",
            False,
        )
        assert [o.label for o in moto.objects] == ["motorcycle"]
        dog_answer = answers[dog_det.escalation_id]
        assert (dog_answer.frame_id, dog_answer.label, dog_answer.edge_label) == (
            "f-dog",
            "Dog",
            "Dog",
        )

        # A device of a region without a policy escalates nothing (and the gateway's own
        # region has none either).
        stranger_id, stranger = device(gw, issue, "elsewhere")
        plain = await detect(gw, stranger, "motorcycle.jpg", "f-plain")
        assert list(plain.detections) == []
        await asyncio.sleep(0.2)
        assert gw.service.events.stored(stranger_id) == []
    assert handler.runs == 2
    assert len(handler.images) == 2


async def test_default_policy_escalates_an_empty_frame_whole_and_names_what_is_in_it(
    pki_dir: Path, tmp_path: Path, issue: IssueFn
) -> None:
    # The issue's photos: horses and a giraffe beside a zebra, where the edge sees nothing.
    handler = core_handler(tmp_path)
    async with (
        running_core(pki_dir, tmp_path, escalate=handler) as core,
        escalating_gateway(issue, tmp_path, core) as gw,
    ):
        _, cam = device(gw, issue, "frames")
        pending: dict[str, str] = {}
        async with gw.channel(cam) as channel:
            stub = gateway_pb2_grpc.DeviceGatewayStub(channel)
            for photo in ("horses", "giraffe_zebra"):
                frame = common_pb2.Frame(
                    image=(QUALITY / f"{photo}.jpg").read_bytes(), frame_id=photo
                )
                result = await stub.Detect(frame, timeout=30)
                (whole,) = pending_of(result)
                assert (whole.label, whole.escalation_reason) == ("unknown", "empty_frame")
                assert (whole.box.x_min, whole.box.x_max) == (0.0, 1.0)
                pending[whole.escalation_id] = photo
        events = await next_events(gw, cam, 2)
    answers = {pending[e.escalation.escalation_id]: e.escalation for e in events}
    # The answer says why it was escalated, as the detection did.
    assert {a.escalation_reason for a in answers.values()} == {"empty_frame"}
    horses = answers["horses"]
    # Never "Cattle": a horse, something a horse is, or honestly unknown.
    assert horses.label != "Cattle"
    assert all(o.label in {"horse", "ungulate", "mammal", "animal"} for o in horses.objects)
    assert horses.still_unknown == (horses.label == "unknown")
    frame = answers["giraffe_zebra"]
    assert not frame.still_unknown
    # Both animals of the one frame, each with its own box: the zebra's in the lower right.
    by_label = {o.label: o for o in frame.objects}
    assert set(by_label) == {"zebra", "giraffe"}
    assert by_label["zebra"].box.x_min > 0.3
    assert by_label["zebra"].box.y_min > 0.3
    assert by_label["giraffe"].box.y_min < by_label["zebra"].box.y_min
    assert handler.runs == 2


async def test_a_repeated_frame_answered_from_the_cache_keeps_its_escalation_marks(
    pki_dir: Path, tmp_path: Path, issue: IssueFn
) -> None:
    """The cache gives the same answer: same detections, same escalated flags, same ids.

    A repeat is not escalated again (the core's answer for the id comes once); another
    device's frame that hits the same cache entry never gets the first device's ids.
    """
    handler = core_handler(tmp_path)
    async with (
        running_core(pki_dir, tmp_path, escalate=handler) as core,
        start_gateway(
            issue=issue,
            tmp_path=tmp_path,
            gateway_id="gw-cache",
            plugins=None,
            overrides={
                "region": GATEWAY_REGION,
                "cache": {"enabled": True, "ttl_s": 600.0},
                "escalation": escalation_table(tmp_path, core.address),
            },
        ) as gw,
    ):
        cam_id, cam = device(gw, issue, "home")
        for photo in ("dog.jpg", "motorcycle.jpg"):
            first = await detect(gw, cam, photo, f"{photo}-1")
            again = await detect(gw, cam, photo, f"{photo}-2")
            assert not first.from_cache
            assert again.from_cache
            assert pending_of(first), first  # a Dog outside the edge set; a whole frame
            assert list(again.detections) == list(first.detections)
        (moto,) = first.detections
        assert (moto.label, moto.escalated) == ("unknown", True)
        # Escalated once per picture: one answer per id, nothing more.
        events = await next_events(gw, cam, 2)
        assert len({e.escalation.escalation_id for e in events}) == 2
        await asyncio.sleep(0.3)
        assert len(gw.service.events.stored(cam_id)) == 2
        assert handler.runs == 2
        # Another device of the region sends the same bytes: an exact-cache hit of its own,
        # never marked with the first device's escalation ids.
        _, other = device(gw, issue, "home")
        theirs = await detect(gw, other, "dog.jpg", "theirs-1")
        assert theirs.from_cache
        ids = {d.escalation_id for d in (*first.detections, *again.detections) if d.escalated}
        ids |= {e.escalation.escalation_id for e in events}
        assert not ids & {d.escalation_id for d in theirs.detections if d.escalated}


async def test_answer_waits_for_an_offline_device_and_survives_a_gateway_restart(
    pki_dir: Path, tmp_path: Path, issue: IssueFn
) -> None:
    handler = core_handler(tmp_path)
    async with running_core(pki_dir, tmp_path, escalate=handler) as core:
        async with escalating_gateway(issue, tmp_path, core) as gw:
            device_id, cam = device(gw, issue, "home")
            (pending,) = pending_of(await detect(gw, cam, "motorcycle.jpg", "f1"))
            # Nobody is subscribed: the answer is produced and kept for the device …
            await wait_until(lambda: bool(gw.service.events.stored(device_id)))
            # … which receives it when it subscribes afterwards.
            (event,) = await next_events(gw, cam, 1)
            assert (event.escalation.escalation_id, event.escalation.label) == (
                pending.escalation_id,
                "motorcycle",
            )
        # The gateway restarts (same outbox): the stored answer is offered again.
        async with escalating_gateway(issue, tmp_path, core) as gw:
            gw.register(device_id, "pet_camera", region="home")
            (again,) = await next_events(gw, cam, 1)
            assert again.escalation.escalation_id == pending.escalation_id
            assert again.escalation.label == "motorcycle"
    assert handler.runs == 1  # the core answered once


async def test_faces_are_blurred_in_what_reaches_the_core(
    pki_dir: Path, tmp_path: Path, issue: IssueFn
) -> None:
    redactor = FaceRedactor(models_dir=MODELS)
    astronaut = decode_image((PHOTOS / "astronaut.jpg").read_bytes(), max_pixels=40_000_000)
    assert redactor.faces(astronaut, score_threshold=0.5)  # there is a face to hide
    handler = core_handler(tmp_path)
    async with (
        running_core(pki_dir, tmp_path, escalate=handler) as core,
        escalating_gateway(issue, tmp_path, core) as gw,
    ):
        _, cam = device(gw, issue, "private")
        result = await detect(gw, cam, "astronaut.jpg", "f-face")
        (person,) = pending_of(result)
        assert person.label == "Person"
        (event,) = await next_events(gw, cam, 1)
        assert event.escalation.escalation_id == person.escalation_id
    (sent,) = handler.images
    # CenterFace, even at a low threshold, finds no face in the pixels that left the edge.
    assert redactor.faces(decode_image(sent, max_pixels=40_000_000), score_threshold=0.2) == ()


# ------------------------------------------------------------------------- configuration


def test_a_disabled_table_starts_no_plug_in(tmp_path: Path) -> None:
    base: dict[str, Any] = {"identity_dir": tmp_path, "core_address": "127.0.0.1:7443"}
    assert configured_plugins(GatewaySettings(**base)) == []
    off = GatewaySettings(**base, escalation={"enabled": False, "regions": {"home": {}}})
    assert configured_plugins(off) == []
    on = GatewaySettings(**base, escalation={"regions": {"home": {}}})
    assert len(configured_plugins(on)) == 1
    with pytest.raises(ConfigError, match=r"escalation\.regions\.home\.colour: unknown key"):
        configured_plugins(GatewaySettings(**base, escalation={"regions": {"home": {"colour": 1}}}))


def _toml_blocks(path: Path) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", path.read_text(), re.S)


def test_the_documented_configuration_is_the_real_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = ROOT / "docs" / "escalation.md"
    gateway_toml, core_toml = _toml_blocks(docs)
    (tmp_path / "gateway.toml").write_text(gateway_toml)
    (tmp_path / "core.toml").write_text(core_toml)
    identity = {"identity_dir": tmp_path}

    settings = load_gateway_settings(tmp_path / "gateway.toml", overrides=identity)
    escalation = settings.section("escalation", EscalationSettings)
    assert escalation is not None
    assert set(escalation.regions) == {"home-eu", "lab"}
    assert plugin(settings) is not None  # the component accepts it as it stands
    # The region's edge labels are labels the edge model has.
    home = escalation.regions["home-eu"]
    assert home.edge_labels is not None
    assert set(home.edge_labels) <= set(EDGE_LABELS)
    # Every documented key (the table's first column) is a key, and every key is documented.
    table = docs.read_text().split("| key (`[escalation.regions.<r>]`)", 1)[1].split("\n\n")[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    keys = {key for column in rows for key in re.findall(r"`([a-z_]+)`", column)}
    assert keys == set(RegionPolicy.model_fields)

    # The documented environment override reaches the documented region.
    monkeypatch.setenv("EDGEWARD_GATEWAY_ESCALATION__REGIONS__HOME_EU__BAND_HIGH", "0.7")
    overridden = load_gateway_settings(tmp_path / "gateway.toml", overrides=identity)
    section = overridden.section("escalation", EscalationSettings)
    assert section is not None
    assert set(section.regions) == {"home-eu", "lab"}
    assert section.regions["home-eu"].band_high == 0.7
    assert section.regions["home-eu"].edge_labels == home.edge_labels  # the rest stays
    monkeypatch.delenv("EDGEWARD_GATEWAY_ESCALATION__REGIONS__HOME_EU__BAND_HIGH")

    # The documented error for a wrong key.
    (tmp_path / "bad.toml").write_text(gateway_toml + "colour = 'red'\n")
    bad = load_gateway_settings(tmp_path / "bad.toml", overrides=identity)
    with pytest.raises(ConfigError, match=r"escalation\.regions\.lab\.colour: unknown key"):
        bad.section("escalation", EscalationSettings)

    core = load_core_settings(tmp_path / "core.toml")
    assert core.escalation is not None

    # The README's snippet and the compose deployment's gateways load as well.
    readme_blocks = [b for b in _toml_blocks(ROOT / "README.md") if "[escalation" in b]
    assert readme_blocks
    for block in readme_blocks:
        (tmp_path / "readme.toml").write_text(block)
        readme = load_gateway_settings(
            tmp_path / "readme.toml", overrides={**identity, "core_address": "core:7443"}
        )
        assert plugin(readme) is not None
    for compose in sorted((ROOT / "deploy" / "compose").glob("gateway-*.toml")):
        deployed = load_gateway_settings(compose)
        assert deployed.section("escalation", EscalationSettings) is not None, compose.name


# ------------------------------------------------------------------------- the commands


def _find_event(log: Path, event: str) -> dict[str, Any] | None:
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                return record
    return None


async def _log_event(log: Path, event: str, proc: asyncio.subprocess.Process) -> dict[str, Any]:
    """Wait for the JSON log line ``event`` in ``log`` (the process's stderr)."""
    async with asyncio.timeout(30):
        while (record := _find_event(log, event)) is None:
            assert proc.returncode is None, f"{log.name}: the process ended before {event!r}"
            await asyncio.sleep(0.05)
    return record


@contextlib.asynccontextmanager
async def _edgeward(log: Path, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "from edgeward.cli import main; main()",
            *args,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _wait(aw: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(aw, 30)


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_core_run_and_gateway_run_escalate_a_motorcycle(
    pki_dir: Path, tmp_path: Path, issue: IssueFn
) -> None:
    core_port = free_port()
    (tmp_path / "core.toml").write_text(
        f'pki_dir = "{pki_dir}"\ncore_id = "core-e2e"\n'
        f'listen = "127.0.0.1:{core_port}"\nenrol_listen = "127.0.0.1:0"\n'
        'metrics_listen = "127.0.0.1:0"\n'
        f'identity_dir = "{tmp_path / "core-identity"}"\n'
        f'registry = "{tmp_path / "core-registry.sqlite3"}"\n'
        "shutdown_grace_s = 0.5\nfeed_heartbeat_s = 1.0\n"
        f'[escalation]\nmodels_dir = "{MODELS}"\nproviders = "cpu"\n'
    )
    gateway_identity = issue("gateway", "gw-e2e-cli")
    (tmp_path / "gateway.toml").write_text(
        f'region = "home"\nlisten = "127.0.0.1:0"\nmetrics_listen = "127.0.0.1:0"\n'
        f'identity_dir = "{gateway_identity.directory}"\n'
        f'core_address = "127.0.0.1:{core_port}"\nshutdown_grace_s = 1.0\n'
        f'[inference]\nmodels_dir = "{MODELS}"\nthreads = 1\n'
        f'[escalation]\noutbox_path = "{tmp_path / "outbox.sqlite3"}"\n'
        "retry_backoff_base_s = 0.05\nretry_backoff_max_s = 0.3\n"
        "[escalation.regions.home]\n"
        'escalate_empty_frames = true\nsend = "frame"\nrequire_face_blur = false\n'
        "empty_frame_budget_per_min = 1000\n"
    )
    core_log, gateway_log = tmp_path / "core.log", tmp_path / "gateway.log"
    async with _edgeward(core_log, "core", "run", "--config", str(tmp_path / "core.toml")) as c:
        await _log_event(core_log, "core.started", c)
        gw_args = ("gateway", "run", "--config", str(tmp_path / "gateway.toml"))
        async with _edgeward(gateway_log, *gw_args) as g:
            # The [escalation] table started the plug-in: its outbox opened.
            await _log_event(gateway_log, "escalation outbox open", g)
            started = await _log_event(gateway_log, "gateway started", g)
            cam = issue("device", unique_id("cam"))
            creds = pki.grpc_channel_credentials(
                ca_bundle_pem=cam.ca_bundle.read_bytes(), identity=cam
            )
            address = f"127.0.0.1:{started['grpc_port']}"
            async with grpc.aio.secure_channel(address, creds) as channel:
                stub = gateway_pb2_grpc.DeviceGatewayStub(channel)
                image = (PHOTOS / "motorcycle.jpg").read_bytes()
                result = await stub.Detect(common_pb2.Frame(image=image, frame_id="m1"), timeout=30)
                (pending,) = pending_of(result)
                call = stub.Subscribe(gateway_pb2.SubscribeRequest(), timeout=60)
                event = await _wait(call.read())
                call.cancel()
            assert event.escalation.escalation_id == pending.escalation_id
            assert (event.escalation.frame_id, event.escalation.label) == ("m1", "motorcycle")
            g.send_signal(signal.SIGTERM)
            assert await _wait(g.wait()) == 0
        c.send_signal(signal.SIGTERM)
        assert await _wait(c.wait()) == 0
    assert "no plug-in" not in gateway_log.read_text()
