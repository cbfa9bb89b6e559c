"""The core's models on real photos: calibrated answers in the edge vocabulary; idle release."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway import CoreEscalationSettings
from gateway._core._escalate import CLASSIFIER, DETECTOR, CoreModels
from gateway._escalation import crop_with_margin

from .conftest import MODELS, edge_detections, frame_of


@pytest.fixture(scope="module")
def models() -> CoreModels:
    m = CoreModels(CoreEscalationSettings(models_dir=MODELS, providers="cpu"))
    m.open()
    return m


def test_motorcycle_frame_is_named_by_nanodet(models: CoreModels) -> None:
    assert edge_detections("motorcycle.jpg") == ()  # the edge model has no class for it
    answer = models.identify_sync(frame_of("motorcycle.jpg"), is_full_frame=True)
    assert (answer.label, answer.still_unknown) == ("motorcycle", False)
    assert "nanodet-coco80" in answer.model_name
    assert answer.score >= models.calibration().threshold
    assert answer.objects[0].concept == "motorcycle"


@pytest.mark.parametrize(
    ("photo", "edge_label", "expected"), [("chelsea.jpg", "Cat", "Cat"), ("dog.jpg", "Dog", "Dog")]
)
def test_breeds_map_to_the_edge_vocabulary(
    models: CoreModels, photo: str, edge_label: str, expected: str
) -> None:
    (box,) = [d.box for d in edge_detections(photo) if d.label == edge_label]
    answer = models.identify_sync(
        crop_with_margin(frame_of(photo), box, 0.15), edge=(edge_label, 0.6)
    )
    assert answer.label == expected
    assert not answer.still_unknown
    assert answer.objects[0].concept == expected.lower()


def test_nothing_confident_is_unknown_never_a_guess(models: CoreModels) -> None:
    answer = models.identify_sync(frame_of("rocket.jpg"), is_full_frame=True)
    assert (answer.label, answer.still_unknown, answer.objects) == ("unknown", True, ())
    assert answer.score < models.calibration().threshold


async def test_idle_models_are_released_and_reloaded_with_logs() -> None:
    now = [0.0]
    settings = CoreEscalationSettings(models_dir=MODELS, providers="cpu", idle_release_s=60)
    async with CoreModels(settings, clock=lambda: now[0]) as models:
        assert models.loaded() == frozenset()  # lazy: nothing until the first escalation
        with capture_logs() as logs:
            await models.identify(frame_of("motorcycle.jpg"), is_full_frame=True)
            assert models.loaded() == {DETECTOR, CLASSIFIER}
            now[0] += 59.0
            assert models.release_idle() == []
            now[0] += 2.0
            assert sorted(models.release_idle()) == sorted([DETECTOR, CLASSIFIER])
            assert models.loaded() == frozenset()
            answer = await models.identify(frame_of("motorcycle.jpg"), is_full_frame=True)
        assert answer.label == "motorcycle"
        assert models.loads(DETECTOR) == 2
        assert models.loads(CLASSIFIER) == 2
    events = [(e["event"], e.get("model")) for e in logs]
    assert events.count(("core model loaded", DETECTOR)) == 2
    assert events.count(("core model released", DETECTOR)) == 1
    assert events.count(("core model released", CLASSIFIER)) == 1


async def test_a_calibration_for_other_features_stops_the_start(tmp_path: Path) -> None:
    stale = tmp_path / "calibration.json"
    stale.write_text(json.dumps({"features": ["bias"], "weights": [0.0], "threshold": 0.5}))
    settings = CoreEscalationSettings(models_dir=MODELS, providers="cpu", calibration=stale)
    with pytest.raises(ValueError, match="features"):
        async with CoreModels(settings):
            pass
