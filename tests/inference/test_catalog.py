"""The edge model catalog: a model loads on first use, is released when idle, reloads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway import InferenceEngine
from gateway._inference._catalog import EdgeModelCatalog, UnknownEdgeModel

from .conftest import EDGE_MODEL


def factory(models_dir: Path) -> Callable[[str], InferenceEngine]:
    def make(name: str) -> InferenceEngine:
        return InferenceEngine(models_dir=models_dir, model=name, providers="cpu")

    return make


async def test_loaded_on_first_use_released_when_idle_and_reloaded(
    models_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    now = [0.0]
    catalog = EdgeModelCatalog(
        factory(models_dir),
        models_dir=models_dir,
        region_models={"home": EDGE_MODEL},
        idle_release_s=60.0,
        clock=lambda: now[0],
    )
    with capture_logs() as logs:
        async with catalog:
            assert catalog.loaded() == frozenset()  # nothing until a frame needs it
            result = await catalog.detect(photo_bytes["chelsea"], region="home")
            assert [d.label for d in result.detections] == ["Cat"]
            assert catalog.loaded() == {EDGE_MODEL}
            now[0] += 59.0
            assert await catalog.release_idle() == []
            now[0] += 2.0
            assert await catalog.release_idle() == [EDGE_MODEL]
            assert catalog.loaded() == frozenset()
            # The default model (the same one here), reloaded; with the frame for escalation.
            again, frame = await catalog.detect_with_frame(photo_bytes["chelsea"])
            assert [d.label for d in again.detections] == ["Cat"]
            assert frame is not None
            assert frame.shape[2] == 3
            assert catalog.loads(EDGE_MODEL) == 2
        assert catalog.loaded() == frozenset()  # closed with the catalog
    events = [(e["event"], e.get("model")) for e in logs]
    assert events.count(("edge model loaded", EDGE_MODEL)) == 2
    assert events.count(("edge model released", EDGE_MODEL)) == 2  # idle, then shutdown


async def test_concurrent_first_frames_load_once_and_a_busy_model_is_kept(
    models_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    now = [0.0]
    catalog = EdgeModelCatalog(
        factory(models_dir),
        models_dir=models_dir,
        idle_release_s=1.0,
        clock=lambda: now[0],
    )
    async with catalog:
        results = await asyncio.gather(*(catalog.detect(photo_bytes["dog"]) for _ in range(4)))
        assert all(r.detections for r in results)
        assert catalog.loads(EDGE_MODEL) == 1
        # A frame in flight holds the model: an idle sweep during it releases nothing.
        running = asyncio.ensure_future(catalog.detect(photo_bytes["dog"]))
        await asyncio.sleep(0)  # the frame has taken the model
        now[0] += 10.0
        assert await catalog.release_idle() == []
        assert (await running).detections
        now[0] += 10.0
        assert await catalog.release_idle() == [EDGE_MODEL]


def test_a_region_naming_a_model_the_edge_lacks_stops_the_start(models_dir: Path) -> None:
    with pytest.raises(UnknownEdgeModel, match="'lab'") as info:
        EdgeModelCatalog(
            factory(models_dir),
            models_dir=models_dir,
            region_models={"lab": "yolo-huge"},
        )
    assert info.value.model == "yolo-huge"
    # A core model is in the manifest, but it is not an edge detector.
    with pytest.raises(UnknownEdgeModel):
        EdgeModelCatalog(
            factory(models_dir),
            models_dir=models_dir,
            region_models={"lab": "core_nanodet_coco80"},
        )
