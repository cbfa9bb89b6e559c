"""The gateway's escalator against a real core over mTLS, with exact counts."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from gateway import (
    Box,
    Detection,
    ErrorEvent,
    EscalateService,
    EscalationAnswer,
    EventHub,
    InferenceEngine,
    free_port,
)
from gateway._door import WHOLE_FRAME_LABEL, result_to_pb
from gateway._escalation import FaceRedactor, crop_with_margin
from gateway._inference._image import decode_image
from protos.edgeward.v1 import core_pb2
from tests._support.core import ObservedCore
from tests.conftest import PHOTOS

from .conftest import (
    MODELS,
    Cores,
    EscalatorFactory,
    Recorder,
    edge_detections,
    frame_of,
    region,
)

FRAMES = region(escalate_empty_frames=True, send="frame")


async def wait_for(predicate: Any, limit_s: float = 30.0) -> None:
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110 - the sink is a plain callable
            await asyncio.sleep(0.02)


async def test_motorcycle_escalated_and_answered_on_subscribe(
    cores: Cores, make_escalator: EscalatorFactory
) -> None:
    hub = EventHub()
    async with (
        cores.run() as core,
        InferenceEngine(models_dir=MODELS, providers="cpu") as engine,
        make_escalator(core.address, hub.publish, policy=FRAMES) as escalator,
    ):
        result, frame = await engine.detect_with_frame((PHOTOS / "motorcycle.jpg").read_bytes())
        assert result.detections == ()  # nothing the edge model knows
        outcome = await escalator.escalate(
            device_id="dev-1", frame_id="f1", detections=result.detections, frame=frame
        )
        (pending,) = outcome.pending
        assert (pending.index, pending.reason) == (None, "empty_frame")
        # What the device gets at once: a pending whole-frame detection with the id.
        marks = {p.index: p.escalation_id for p in outcome.pending}
        marked = result_to_pb(result, frame_id="f1", gateway_id="gw-1", escalated=marks)
        (det,) = marked.detections
        assert (det.label, det.score, det.escalated) == (WHOLE_FRAME_LABEL, 0.0, True)
        assert det.escalation_id == pending.escalation_id
        # What it gets later, on Subscribe.
        events = hub.subscribe("dev-1")
        event = await asyncio.wait_for(anext(events), 30)
        await events.aclose()
    answer = event.payload
    assert isinstance(answer, EscalationAnswer)
    assert (answer.escalation_id, answer.frame_id) == (pending.escalation_id, "f1")
    assert (answer.label, answer.model_name, answer.still_unknown) == (
        "motorcycle",
        "nanodet-coco80+efficientnet-lite2",  # the detector, confirmed on its crop
        False,
    )
    assert [o.label for o in answer.objects] == ["motorcycle"]
    assert cores.runs == 1


async def test_labels_outside_the_region_set_come_back_in_the_edge_vocabulary(
    cores: Cores, make_escalator: EscalatorFactory
) -> None:
    sink = Recorder()
    policy = region(edge_labels=("Person", "Cat"))
    async with cores.run() as core, make_escalator(core.address, sink, policy=policy) as esc:
        dets = edge_detections("dog.jpg")
        outcome = await esc.escalate(
            device_id="dev-1", frame_id="f1", detections=dets, frame=frame_of("dog.jpg")
        )
        assert sorted(p.index for p in outcome.pending if p.index is not None) == [0, 1, 2]
        await wait_for(lambda: len(sink.events) == 3)
    by_edge = {p.edge_label: p.label for _, p in sink.events if isinstance(p, EscalationAnswer)}
    assert by_edge["Dog"] == "Dog"
    # The bicycle's crop is mostly dog to the classifier: below the calibrated threshold
    # the core says so rather than guess; it never renames the bicycle.
    assert by_edge["Bicycle"] in {"Bicycle", "unknown"}
    assert by_edge["Car"] in {"Car", "unknown"}


class Capturing(ObservedCore):
    """A Core.Escalate handler that keeps what arrived, then lets the real one answer."""

    def __init__(self, inner: EscalateService) -> None:
        super().__init__(inner)
        self.images: list[bytes] = []

    def seen(self, request: core_pb2.EscalationRequest) -> None:
        self.images.append(bytes(request.image))


def _face_variance(image: np.ndarray, box: Any) -> float:
    x0, y0, x1, y1 = box.to_pixels(image.shape[1], image.shape[0])
    return float(image[y0:y1, x0:x1].astype(np.float32).std(axis=(0, 1)).mean())


async def test_faces_are_blurred_before_the_crop_leaves(
    cores: Cores, make_escalator: EscalatorFactory
) -> None:
    (person,) = edge_detections("astronaut.jpg")
    assert 0.5 <= person.score < 0.65  # in the default uncertainty band
    policy = region(require_face_blur=True)
    redactor = FaceRedactor(models_dir=MODELS)
    # The crop as it would look unredacted has a clear face.
    raw_crop = crop_with_margin(frame_of("astronaut.jpg"), person.box, policy.crop_margin)
    (face,) = redactor.faces(raw_crop, score_threshold=0.5)
    sink = Recorder()
    handler = Capturing(cores.service())
    async with cores.run(handler) as core, make_escalator(core.address, sink, policy=policy) as esc:
        outcome = await esc.escalate(
            device_id="dev-1",
            frame_id="f1",
            detections=(person,),
            frame=frame_of("astronaut.jpg"),
        )
        assert len(outcome.pending) == 1
        await wait_for(lambda: len(sink.events) == 1)
    (sent_bytes,) = handler.images
    sent = decode_image(sent_bytes, max_pixels=10_000_000)
    assert sent.shape == raw_crop.shape  # same pixels, only the face destroyed
    # CenterFace, even at a low threshold, finds no face in what left the edge …
    assert redactor.faces(sent, score_threshold=0.2) == ()
    # … and the face region lost its detail (the rest of the crop kept it).
    assert _face_variance(sent, face.box) < 0.35 * _face_variance(raw_crop, face.box)
    answer = sink.events[0][1]
    assert isinstance(answer, EscalationAnswer)
    # A person in a spacesuit with the face blurred: a person, or honestly unknown.
    assert answer.label in {"Person", "unknown"}
    assert answer.still_unknown == (answer.label == "unknown")


async def test_no_face_model_means_nothing_leaves(
    cores: Cores, make_escalator: EscalatorFactory, tmp_path: Path
) -> None:
    broken = tmp_path / "models-without-centerface"
    broken.mkdir()
    shutil.copy(MODELS / "manifest.json", broken)
    (person,) = edge_detections("astronaut.jpg")
    sink = Recorder()
    handler = Capturing(cores.service())
    async with cores.run(handler) as core:
        escalator = make_escalator(core.address, sink, policy=region(require_face_blur=True))
        escalator._redactor = FaceRedactor(models_dir=broken)
        async with escalator:
            with capture_logs() as logs:
                outcome = await escalator.escalate(
                    device_id="dev-1",
                    frame_id="f1",
                    detections=(person,),
                    frame=frame_of("astronaut.jpg"),
                )
            assert outcome.pending == ()
            assert [(r.index, r.reason) for r in outcome.refused] == [(0, "face_blur_unavailable")]
            assert await escalator.pending_count() == 0
            await asyncio.sleep(0.2)
    assert handler.images == []
    assert sink.events == []
    assert any(e["event"] == "face model unavailable" for e in logs)


N = 5


async def test_core_outage_then_all_answered_exactly_once(
    cores: Cores, make_escalator: EscalatorFactory
) -> None:
    port = free_port()
    sink = Recorder()
    async with make_escalator(f"127.0.0.1:{port}", sink, policy=FRAMES) as esc:
        ids = []
        for i in range(N):
            outcome = await esc.escalate(
                device_id="dev-1", frame_id=f"f{i}", detections=(), frame=frame_of("motorcycle.jpg")
            )
            ids.append(outcome.pending[0].escalation_id)
        await asyncio.sleep(0.5)  # the core is down: several attempts fail
        assert esc.counts["retries"] >= 1
        assert sink.events == []
        assert await esc.pending_count() == N
        async with cores.run(port=port):
            await wait_for(lambda: len(sink.events) >= N)
            await asyncio.sleep(0.3)  # room for a duplicate to show up, if there were one
            assert cores.services[0].store.count() == N
        assert await esc.pending_count() == 0
    assert sorted(sink.ids()) == sorted(ids)
    assert len(sink.events) == N
    assert all(isinstance(p, EscalationAnswer) and p.label == "motorcycle" for _, p in sink.events)
    assert cores.runs == N


async def test_budgets_limit_what_reaches_the_core(make_escalator: EscalatorFactory) -> None:
    sink = Recorder()
    policy = region(
        escalate_empty_frames=True,
        send="frame",
        device_budget_per_min=3,
        region_budget_per_min=4,
    )
    async with make_escalator(f"127.0.0.1:{free_port()}", sink, policy=policy) as esc:
        outcomes = [
            await esc.escalate(
                device_id=device, frame_id="f", detections=(), frame=frame_of("motorcycle.jpg")
            )
            for device in ["dev-a"] * 5 + ["dev-b"] * 2
        ]
        assert [len(o.pending) for o in outcomes] == [1, 1, 1, 0, 0, 1, 0]
        assert [o.refused[0].reason for o in outcomes if o.refused] == [
            "device_budget",
            "device_budget",
            "region_budget",
        ]
        assert await esc.pending_count() == 4


async def test_empty_frames_escalate_whole_within_their_own_budget_per_device(
    make_escalator: EscalatorFactory,
) -> None:
    sink = Recorder()
    policy = region(send="frame", empty_frame_budget_per_min=2, device_budget_per_min=10)
    async with make_escalator(f"127.0.0.1:{free_port()}", sink, policy=policy) as esc:
        frame = frame_of("motorcycle.jpg")
        outcomes = [
            await esc.escalate(device_id=device, frame_id="f", detections=(), frame=frame)
            for device in ("dev-a", "dev-a", "dev-a", "dev-b")
        ]
        # The whole frame (index None), with its reason; the third of dev-a's is held back
        # by its own empty-frame budget, dev-b has a budget of its own.
        assert [[(p.index, p.reason) for p in o.pending] for o in outcomes] == [
            [(None, "empty_frame")],
            [(None, "empty_frame")],
            [],
            [(None, "empty_frame")],
        ]
        assert [(r.index, r.reason) for r in outcomes[2].refused] == [(None, "empty_frame_budget")]
        # dev-a's doubtful detections still escalate: only whole frames were held back.
        doubtful = (Detection("Person", 4, 0.6, Box(0.2, 0.1, 0.8, 0.9)),)
        with capture_logs() as logs:
            more = await esc.escalate(
                device_id="dev-a",
                frame_id="g",
                detections=doubtful,
                frame=frame,
                edge_model="edge_ssd_mobilenetv2_oid24",
                edge_labels=("Person", "Cat"),
            )
        assert [(p.index, p.reason) for p in more.pending] == [(0, "uncertain")]
        # The model that produced the detection is recorded with its escalation.
        queued = [e for e in logs if e["event"] == "escalation queued"]
        assert [e["edge_model"] for e in queued] == ["edge_ssd_mobilenetv2_oid24"]
        assert esc.counts["refused_empty_frame_budget"] == 1


async def test_full_outbox_refuses_new_and_delivers_stored(
    cores: Cores, make_escalator: EscalatorFactory
) -> None:
    port = free_port()
    sink = Recorder()
    async with make_escalator(
        f"127.0.0.1:{port}", sink, policy=FRAMES, max_outbox_entries=2
    ) as esc:
        with capture_logs() as logs:
            outcomes = [
                await esc.escalate(
                    device_id="dev-1", frame_id=f"f{i}", detections=(), frame=frame_of("rocket.jpg")
                )
                for i in range(3)
            ]
        assert [len(o.pending) for o in outcomes] == [1, 1, 0]
        assert outcomes[2].refused[0].reason == "outbox_full"
        assert any(
            e["event"] == "escalation refused" and e["reason"] == "outbox_full" for e in logs
        )
        assert esc.counts["refused_outbox_full"] == 1
        async with cores.run(port=port):
            await wait_for(lambda: len(sink.events) == 2)
        assert await esc.pending_count() == 0
    stored = sorted(o.pending[0].escalation_id for o in outcomes[:2])
    assert sorted(sink.ids()) == stored
    # The rocket is nothing the core knows either: the answer says so.
    assert all(isinstance(p, EscalationAnswer) and p.still_unknown for _, p in sink.events)


async def test_a_final_refusal_becomes_an_error_event(
    cores: Cores, make_escalator: EscalatorFactory
) -> None:
    sink = Recorder()
    # A core that accepts only tiny images refuses the frame for good (INVALID_ARGUMENT).
    async with (
        cores.run(max_image_bytes=1024) as core,
        make_escalator(core.address, sink, policy=FRAMES) as esc,
    ):
        await esc.escalate(
            device_id="dev-1", frame_id="f1", detections=(), frame=frame_of("motorcycle.jpg")
        )
        await wait_for(lambda: len(sink.events) == 1)
        assert await esc.pending_count() == 0
    (device, error) = sink.events[0]
    assert device == "dev-1"
    assert isinstance(error, ErrorEvent)
    assert (error.code, error.frame_id) == ("INVALID_ARGUMENT", "f1")
    assert cores.runs == 0


@pytest.mark.parametrize("cached", [True])
async def test_no_frame_no_escalation(make_escalator: EscalatorFactory, cached: bool) -> None:
    async with make_escalator("127.0.0.1:1", Recorder(), policy=FRAMES) as esc:
        outcome = await esc.escalate(device_id="dev-1", frame_id="f", detections=(), frame=None)
    assert [(r.index, r.reason) for r in outcome.refused] == [(None, "no_frame")]
