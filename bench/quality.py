"""Escalation quality on the labelled photos: does the product name what a person would?

Runs every photo of ``tests/data/quality/`` (hand-labelled, see its PROVENANCE.md)

1. through the **edge alone**: the gateway's edge model (SSD, OID-24); its detections at
   or above the engine's score threshold are its answers;
2. through **edge + core**: a real gateway (gRPC over mutual TLS, the ``[escalation]`` plug-in
   with the default region policy, frames allowed to leave) and a real core
   (``Core.Escalate``, NanoDet + EfficientNet-Lite2 combined and calibrated), as a device
   sees it: the detection result, then the answers on the event stream. An escalated
   detection's answer replaces the edge's; the core's ``unknown`` is counted as such.

Answers are judged by :mod:`gateway._core._calibrate`: ``recall`` is the share of the
(photo, named concept) pairs that some answer names (the concept or a kind of it, on an
overlapping box); ``confident_wrong_rate`` the share of answers with score ≥ 0.5 that name
something else; ``unknown_rate`` the share of answers that are the core's ``unknown``.

``--fit`` (no gateway) instead runs the core's models on what the default policy would
escalate from each photo, fits the calibration (:mod:`gateway._core._identify`) on all
photos and writes ``gateway/_core/calibration.json`` with the leave-one-out figures: each
photo judged by a fit made without it -- the honest figure, since the live run's photos are
the ones the committed calibration was fit on.

Ends with one JSON line: photos, objects, edge_recall, recall, confident_wrong_rate,
unknown_rate, escalated_per_frame, core_ms_p50 (and the leave-one-out figures of the
committed calibration). Run: ``.venv/bin/python bench/quality.py --quick``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pki  # noqa: E402
from edgeward._logging import configure_logging  # noqa: E402
from gateway import (  # noqa: E402
    Box,
    CoreEscalationSettings,
    Detection,
    EscalateService,
    RegionPolicy,
)
from gateway._core._calibrate import (  # noqa: E402
    Escalated,
    Labelled,
    Tally,
    calibration_json,
    ceiling,
    examples_of,
    fit_calibration,
    leave_one_out,
    load_labelled,
    tally_photos,
    to_frame,
)
from gateway._core._escalate import CoreModels  # noqa: E402
from gateway._core._identify import (  # noqa: E402
    CALIBRATION_FILE,
    Calibration,
    Observation,
    candidates,
)
from gateway._core._taxonomy import OID24, taxonomy  # noqa: E402
from gateway._escalation._crop import FaceRedactor, prepare_upload  # noqa: E402
from gateway._escalation._policy import select  # noqa: E402
from gateway._inference._image import decode_image  # noqa: E402
from gateway._inference._manifest import load_manifest, open_session  # noqa: E402
from gateway._inference._ssd import postprocess_ssd, preprocess_ssd  # noqa: E402
from protos.edgeward.v1 import common_pb2, core_pb2, gateway_pb2, gateway_pb2_grpc  # noqa: E402
from tests._support.core import ObservedCore  # noqa: E402

MODELS = ROOT / "models"
PHOTOS = ROOT / "tests" / "data" / "quality"
EDGE_MODEL = "edge_ssd_mobilenetv2_oid24"
#: The default region policy where frames may leave the edge (faces still blurred).
POLICY = RegionPolicy(send="frame")
TARGETS = {"photos": 40, "recall": 0.7, "confident_wrong_rate": 0.05}


def crop_region(box: Box, margin: float) -> Box:
    """The part of the frame ``crop_with_margin`` sends for ``box`` (normalised)."""
    bw, bh = box.x_max - box.x_min, box.y_max - box.y_min
    return Box(
        max(0.0, box.x_min - margin * bw),
        max(0.0, box.y_min - margin * bh),
        min(1.0, box.x_max + margin * bw),
        min(1.0, box.y_max + margin * bh),
    )


def edge_answers(detections: Any) -> list[tuple[str, Box, float]]:
    """The edge's detections as (concept, box, score) answers."""
    tax = taxonomy()
    out = []
    for d in detections:
        concept = tax.vocabulary(OID24, [d.label])[0] or tax.canonical(d.label)
        b = d.box
        out.append((concept, Box(b.x_min, b.y_min, b.x_max, b.y_max), float(d.score)))
    return out


# ------------------------------------------------------------------------------- fitting
@dataclass(frozen=True, slots=True)
class Seen:
    """What the core's models said about one image the policy would send (or a fit crop)."""

    photo: str
    region: Box
    observation: Observation
    sent: bool
    is_full_frame: bool


def observe_photos(
    photos: list[Labelled],
) -> tuple[list[Seen], dict[str, list[tuple[str, Box, float]]]]:
    """Run the core's models on what :data:`POLICY` would send from each photo.

    Each image goes through the gateway's own upload path first (crop, shrink, faces
    blurred, JPEG), so the models see the pixels a live escalation delivers. Also returns
    the edge's answers the policy leaves standing (not escalated), per photo.
    """
    manifest = load_manifest(MODELS)
    session = open_session(manifest, EDGE_MODEL)
    labels = manifest.entry(EDGE_MODEL).labels
    models = CoreModels(CoreEscalationSettings(models_dir=MODELS, providers="cpu"))
    redactor = FaceRedactor(models_dir=MODELS)

    def uploaded(frame: Any, box: Box | None) -> Any:
        upload = prepare_upload(
            frame,
            box,
            margin=POLICY.crop_margin,
            max_side=POLICY.max_side_px,
            jpeg_quality=POLICY.jpeg_quality,
            redactor=redactor,
            face_score_threshold=POLICY.face_score_threshold,
        )
        return decode_image(upload.jpeg, max_pixels=40_000_000)

    out: list[Seen] = []
    standing: dict[str, list[tuple[str, Box, float]]] = {}
    whole = Box(0.0, 0.0, 1.0, 1.0)
    for photo in photos:
        frame = decode_image(photo.path.read_bytes(), max_pixels=40_000_000)
        boxes, classes = session.run(
            ["box_encodings", "class_predictions"], {"input": preprocess_ssd([frame])}
        )
        dets: tuple[Detection, ...] = postprocess_ssd(boxes, classes, labels)[0]
        # The whole frame always (so the fit also sees frames with detections), and the
        # crops the policy picks.
        chosen = select(POLICY, dets)
        sent = any(c.index is None for c in chosen)
        obs = models.observe_sync(uploaded(frame, None))
        out.append(Seen(photo.name, whole, obs, sent, True))
        picked = {c.index for c in chosen}
        standing[photo.name] = edge_answers(d for i, d in enumerate(dets) if i not in picked)
        for cand in chosen:
            if cand.index is None:
                continue
            det = dets[cand.index]
            obs = models.observe_sync(uploaded(frame, det.box), edge=(det.label, det.score))
            out.append(Seen(photo.name, crop_region(det.box, POLICY.crop_margin), obs, True, False))
        # For the fit only: a crop around each labelled object, as a doubtful detection of
        # it would send (the edge detects little in this set, so crops are otherwise rare).
        for _concept, box in photo.objects:
            if box.area < 0.02 or box.area > 0.8:
                continue
            obs = models.observe_sync(uploaded(frame, box))
            out.append(Seen(photo.name, crop_region(box, POLICY.crop_margin), obs, False, False))
    return out, standing


def escalations(seen: list[Seen]) -> list[Escalated]:
    """The candidates of each image, as the core filters them (crops: the object's own)."""
    out = []
    for s in seen:
        found = candidates(s.observation)
        if not s.is_full_frame:
            found = [c for c in found if c.box.area >= 0.05]
        out.append(Escalated(s.photo, s.region, tuple(found), sent=s.sent))
    return out


def observe_all(
    photos: list[Labelled],
) -> tuple[list[Escalated], dict[str, list[tuple[str, Box, float]]]]:
    """What the core would see from each photo under :data:`POLICY`, as candidates."""
    seen, standing = observe_photos(photos)
    return escalations(seen), standing


#: The share of confidently wrong answers the threshold is chosen for on the training photos.
#: Under the 5 % target: one wrong answer is about 2 % of this set's answers, and the
#: leave-one-out figures (photos the fit never saw) come out above the training ones.
MAX_WRONG = 0.03


def run_fit(photos: list[Labelled]) -> dict[str, Any]:
    started = time.perf_counter()
    escalated, standing = observe_all(photos)
    by_name = {p.name: p for p in photos}
    loo = leave_one_out(escalated, by_name, standing, max_wrong=MAX_WRONG)
    final = fit_calibration(escalated, by_name, standing, max_wrong=MAX_WRONG)
    in_sample = tally_photos(escalated, by_name, standing, final).report()
    info = {
        "how": "bench/quality.py --fit: each image goes through the gateway's upload path "
        "(crop, shrink, faces blurred, JPEG) and the core's models; weights: logistic "
        "regression (Newton, L2 2.0 on all but the bias) on every candidate of the whole "
        "frame, of the crops the default policy escalates and of a crop around each "
        "labelled object (area 2-80 %), labelled correct/wrong against "
        "tests/data/quality/labels.json ('general' answers left out); threshold: the "
        f"lowest probability >= 0.5 at which at most {MAX_WRONG:.0%} of the answers a "
        "device would get on the training photos (the edge's that stand, the core's, its "
        "unknowns) are confidently wrong.",
        "photos": len(photos),
        "examples": len(examples_of(escalated, by_name)),
        "in_sample": in_sample,
        "leave_one_out": loo,
        # Recall if every correct candidate were answered: of what the policy sends, and of
        # every image looked at (the whole frame of every photo too).
        "recall_ceiling_sent": ceiling(escalated, by_name, sent_only=True),
        "recall_ceiling_whole_frames": ceiling(escalated, by_name, sent_only=False),
    }
    CALIBRATION_FILE.write_text(calibration_json(final, info), encoding="utf-8")
    print(f"fit in {time.perf_counter() - started:.1f}s; leave-one-out: {loo}", file=sys.stderr)
    print(f"wrote {CALIBRATION_FILE.relative_to(ROOT)}", file=sys.stderr)
    return loo


# ------------------------------------------------------------------------------- live run
class TimedCore(ObservedCore):
    """The real ``Core.Escalate`` handler, timing each call."""

    def __init__(self, inner: EscalateService) -> None:
        super().__init__(inner)
        self.model_ms: list[float] = []

    def answered(self, result: core_pb2.EscalationResult) -> None:
        self.model_ms.append(float(result.model_ms))


@contextlib.asynccontextmanager
async def stack(work: Path) -> AsyncIterator[tuple[Any, TimedCore, Any]]:
    """A running core and a gateway escalating to it, and a device identity on it."""
    from tests._support.core import running_core
    from tests._support.gateway import start_gateway
    from tests.conftest import _issuer

    pki_dir = work / "pki"
    pki.init_pki(pki_dir, trust_domain="test.example")
    (work / "identities").mkdir()
    issue = _issuer(work / "identities", pki_dir)
    handler = TimedCore(
        EscalateService(
            CoreEscalationSettings(
                models_dir=MODELS, providers="cpu", answer_store=work / "answers.sqlite3"
            )
        )
    )
    region = {
        **POLICY.model_dump(include={"send"}),
        "require_face_blur": True,
        "device_budget_per_min": 10_000,
        "region_budget_per_min": 10_000,
        "empty_frame_budget_per_min": 10_000,
    }
    async with (
        running_core(pki_dir, work, escalate=handler) as core,
        start_gateway(
            issue=issue,
            tmp_path=work,
            gateway_id="gw-quality",
            plugins=None,
            overrides={
                "region": "home",
                "escalation": {
                    "core_address": core.address,
                    "outbox_path": str(work / "outbox.sqlite3"),
                    "retry_backoff_base_s": 0.05,
                    "retry_backoff_max_s": 0.3,
                    "regions": {"home": region},
                },
            },
        ) as gw,
    ):
        device_id = "cam-quality"
        gw.register(device_id, "pet_camera", region="home")
        yield gw, handler, issue("device", device_id)


async def live(photos: list[Labelled], work: Path) -> dict[str, Any]:
    edge, both = Tally(), Tally()
    escalated = 0
    async with stack(work) as (gw, handler, who), gw.channel(who) as channel:
        stub = gateway_pb2_grpc.DeviceGatewayStub(channel)
        events = stub.Subscribe(gateway_pb2.SubscribeRequest(), timeout=600)
        for n, photo in enumerate(photos):
            result = await stub.Detect(
                common_pb2.Frame(image=photo.path.read_bytes(), frame_id=f"f{n}"), timeout=60
            )
            dets = [d for d in result.detections if not d.escalated]
            pending = {d.escalation_id: d for d in result.detections if d.escalated}
            edge.add_photo(photo, edge_answers(d for d in result.detections if d.score > 0), 0)
            answers = edge_answers(dets)
            unknowns = 0
            escalated += len(pending)
            while pending:
                event = await asyncio.wait_for(events.read(), 120)
                assert isinstance(event, common_pb2.DeviceEvent), event
                if event.WhichOneof("kind") != "escalation":
                    raise RuntimeError(f"escalation failed: {event}")
                a = event.escalation
                det = pending.pop(a.escalation_id)
                region = crop_region(
                    Box(det.box.x_min, det.box.y_min, det.box.x_max, det.box.y_max),
                    POLICY.crop_margin,
                )
                if det.escalation_reason == "empty_frame":
                    region = Box(0.0, 0.0, 1.0, 1.0)
                if a.still_unknown:
                    unknowns += 1
                for concept, box, score in edge_answers(a.objects):
                    answers.append((concept, to_frame(box, region), score))
            both.add_photo(photo, answers, unknowns)
        events.cancel()
    e, b = edge.report(), both.report()
    return {
        "objects": b["objects"],
        "edge_recall": e["recall"],
        "edge_confident_wrong_rate": e["confident_wrong_rate"],
        "recall": b["recall"],
        "confident_wrong_rate": b["confident_wrong_rate"],
        "unknown_rate": b["unknown_rate"],
        "escalated_per_frame": round(escalated / len(photos), 2),
        "core_ms_p50": round(statistics.median(handler.model_ms), 1) if handler.model_ms else 0,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="one pass (under two minutes)")
    parser.add_argument("--fit", action="store_true", help="refit gateway/_core/calibration.json")
    args = parser.parse_args()
    configure_logging(level="warning", json=False)
    photos = load_labelled(PHOTOS)
    if args.fit:
        run_fit(photos)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgeward-quality-") as tmp:
        figures = await live(photos, Path(tmp))
    calibration = Calibration.load()
    out = {"photos": len(photos), **figures}
    for key in ("leave_one_out", "recall_ceiling_sent", "recall_ceiling_whole_frames"):
        out[key] = calibration.fit.get(key)
    print(f"ran {len(photos)} photos in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    for key, target in TARGETS.items():
        value = out[key]
        ok = value >= target if key != "confident_wrong_rate" else value <= target
        gap = value - target
        print(
            f"{key}: {value} (target {'<=' if key == 'confident_wrong_rate' else '>='} "
            f"{target}: {'met' if ok else f'off by {abs(gap):.3f}'})",
            file=sys.stderr,
        )
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
