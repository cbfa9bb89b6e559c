"""The edge model catalog: a model loads on first use, is released when idle, reloads."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway import InferenceEngine, ResponseCache
from gateway._inference._catalog import EdgeModelCatalog, UnknownEdgeModel
from gateway.errors import InferenceError, ModelIntegrityError

from .conftest import EDGE_MODEL

NANODET = "core_nanodet_coco80"


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
    # The message lists what the manifest offers the edge.
    assert "core_nanodet_coco80, edge_ssd_mobilenetv2_oid24" in str(info.value)
    # The core's classifier is in the manifest, but it is not a detector the edge can run.
    with pytest.raises(UnknownEdgeModel) as info:
        EdgeModelCatalog(
            factory(models_dir),
            models_dir=models_dir,
            region_models={"lab": "core_efficientnet_lite2"},
        )
    assert info.value.available == (NANODET, EDGE_MODEL)


class CountingFactory:
    """Builds real engines and counts them; ``started`` is set when one is asked for."""

    def __init__(self, models_dir: Path, cache: ResponseCache | None = None) -> None:
        self.models_dir = models_dir
        self.cache = cache
        self.built: list[str] = []
        self.started = asyncio.Event()

    def __call__(self, name: str) -> InferenceEngine:
        self.built.append(name)
        self.started.set()
        return InferenceEngine(
            models_dir=self.models_dir, model=name, providers="cpu", cache=self.cache
        )


async def test_frames_arriving_during_a_release_or_a_reload_wait_for_the_model(
    models_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    now = [0.0]
    make = CountingFactory(models_dir)
    catalog = EdgeModelCatalog(
        make, models_dir=models_dir, idle_release_s=60.0, clock=lambda: now[0]
    )
    async with catalog:
        assert [d.label for d in (await catalog.detect(photo_bytes["chelsea"])).detections] == [
            "Cat"
        ]
        now[0] += 61.0
        releasing = asyncio.ensure_future(catalog.release_idle())
        await asyncio.sleep(0)  # the release holds the model's lock, draining the engine
        # Frames arriving now wait for the release, then for the reload: none fails.
        frames = [asyncio.ensure_future(catalog.detect(photo_bytes["chelsea"])) for _ in range(3)]
        assert await releasing == [EDGE_MODEL]
        results = await asyncio.gather(*frames)
        assert [[d.label for d in r.detections] for r in results] == [["Cat"]] * 3
        assert catalog.loads(EDGE_MODEL) == 2  # one reload for the three frames
        assert make.built == [EDGE_MODEL, EDGE_MODEL]


async def test_a_frame_that_gives_up_during_a_load_leaves_it_to_the_frames_behind(
    models_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    make = CountingFactory(models_dir)
    async with EdgeModelCatalog(make, models_dir=models_dir) as catalog:
        first = asyncio.ensure_future(catalog.detect(photo_bytes["dog"]))
        await make.started.wait()  # the first frame's load is under way
        behind = asyncio.ensure_future(catalog.detect(photo_bytes["dog"]))
        first.cancel()  # its caller is gone (a cut call, a deadline)
        with pytest.raises(asyncio.CancelledError):
            await first
        assert "Dog" in {d.label for d in (await behind).detections}
        # The load the first frame started served the second: built once, loaded once.
        assert make.built == [EDGE_MODEL]
        assert catalog.loads(EDGE_MODEL) == 1


async def test_a_changed_model_file_stops_the_start_and_fails_frames_without_rereading(
    models_dir: Path, photo_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    copy = tmp_path / "models"
    copy.mkdir()
    for name in ("manifest.json", f"{EDGE_MODEL}.onnx"):
        shutil.copy(models_dir / name, copy / name)
    onnx = copy / f"{EDGE_MODEL}.onnx"
    good = onnx.read_bytes()
    onnx.write_bytes(good + b"\0")
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch"):
        async with EdgeModelCatalog(CountingFactory(copy), models_dir=copy):
            pass  # pragma: no cover - refused at entry
    onnx.write_bytes(good)
    now = [0.0]
    make = CountingFactory(copy)
    catalog = EdgeModelCatalog(
        make, models_dir=copy, idle_release_s=10.0, retry_after_s=5.0, clock=lambda: now[0]
    )
    async with catalog:
        await catalog.detect(photo_bytes["dog"])
        now[0] += 11.0
        assert await catalog.release_idle() == [EDGE_MODEL]
        onnx.write_bytes(good + b"\0")  # changed while the gateway runs
        with capture_logs() as logs, pytest.raises(InferenceError, match="unavailable"):
            await catalog.detect(photo_bytes["dog"])
        assert [e["event"] for e in logs if e["log_level"] == "error"] == [
            "edge model failed to load"
        ]
        # Within retry_after_s the next frame fails at once: the file is not read again.
        with pytest.raises(InferenceError):
            await catalog.detect(photo_bytes["dog"])
        assert make.built == [EDGE_MODEL, EDGE_MODEL]
        onnx.write_bytes(good)
        now[0] += 5.0
        assert (await catalog.detect(photo_bytes["dog"])).detections
        assert make.built == [EDGE_MODEL, EDGE_MODEL, EDGE_MODEL]
        assert catalog.loads(EDGE_MODEL) == 2


async def test_each_region_runs_its_model_with_answers_never_mixed_in_the_cache(
    models_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    now = [0.0]
    make = CountingFactory(models_dir, cache=ResponseCache(max_distance=4))
    catalog = EdgeModelCatalog(
        make,
        models_dir=models_dir,
        region_models={"lab_eu": NANODET},  # environment spelling of lab-eu
        idle_release_s=60.0,
        clock=lambda: now[0],
    )
    async with catalog:
        assert catalog.model_for("lab-eu") == NANODET
        assert catalog.model_for("home") == EDGE_MODEL
        home = await catalog.detect(photo_bytes["dog"], region="home")
        assert catalog.loaded() == {EDGE_MODEL}  # the region's model waits for its frames
        lab = await catalog.detect(photo_bytes["dog"], region="lab-eu")
        # The same bytes, a different model: run, not answered from the other's cache entry.
        assert (home.model_name, home.from_cache) == (EDGE_MODEL, False)
        assert (lab.model_name, lab.from_cache) == (NANODET, False)
        assert "Dog" in {d.label for d in home.detections}
        assert "dog" in {d.label for d in lab.detections}  # COCO's vocabulary
        assert home.labels == catalog.labels(EDGE_MODEL)
        assert lab.labels == catalog.labels(NANODET)
        assert len(lab.labels) == 80
        # Repeats are cached per model.
        again = await catalog.detect(photo_bytes["dog"], region="lab-eu")
        assert (again.model_name, again.from_cache) == (NANODET, True)
        # Each model is released on its own idle time.
        now[0] += 40.0
        await catalog.detect(photo_bytes["chelsea"], region="home")
        now[0] += 30.0
        assert await catalog.release_idle() == [NANODET]
        assert catalog.loaded() == {EDGE_MODEL}
        assert catalog.counters() == {
            "loads": {NANODET: 1.0, EDGE_MODEL: 1.0},
            "releases": {NANODET: 1.0, EDGE_MODEL: 0.0},
        }
