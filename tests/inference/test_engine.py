"""InferenceEngine with the real edge model on real photos.

Expected answers: ``shared/reference/models.md`` (chelsea → Cat 0.85, dog.jpg → Dog, Bicycle,
Car; rocket and motorcycle → nothing), with a margin for onnxruntime versions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from gateway import CacheKind, EngineObserver, InferenceEngine, InferenceResult, ResponseCache
from gateway._inference._engine import _CacheHit
from gateway._inference._runtime import create_session, physical_cores
from gateway.errors import (
    DeadlineExceeded,
    InvalidImage,
    Overloaded,
    ProviderUnavailable,
    ShuttingDown,
)

pytestmark = pytest.mark.slow


class Recorder(EngineObserver):
    def __init__(self) -> None:
        self.batches: list[int] = []
        self.cache: list[CacheKind] = []
        self.depths: list[int] = []
        self.threads: set[int] = set()

    def on_batch(self, size: int, seconds: float) -> None:
        self.threads.add(threading.get_ident())
        self.batches.append(size)

    def on_cache(self, kind: CacheKind) -> None:
        self.cache.append(kind)

    def on_queue_depth(self, n: int) -> None:
        self.depths.append(n)


def _labels(result: InferenceResult) -> dict[str, float]:
    return {d.label: d.score for d in result.detections}


def _engine(models_dir: Path, **kwargs: object) -> InferenceEngine:
    return InferenceEngine(models_dir=models_dir, providers="cpu", **kwargs)  # type: ignore[arg-type]


async def test_chelsea_is_a_cat(models_dir: Path, photo_bytes: dict[str, bytes]) -> None:
    async with _engine(models_dir) as engine:
        assert engine.provider == "CPUExecutionProvider"
        result, frame = await engine.detect_with_frame(photo_bytes["chelsea"])
    assert _labels(result).get("Cat", 0) >= 0.7
    assert result.model_name == "edge_ssd_mobilenetv2_oid24"
    assert result.model_version
    assert not result.from_cache
    assert (result.width, result.height) == (451, 300)
    assert frame is not None
    assert frame.shape == (300, 451, 3)
    assert 0 < result.inference_ms < 5_000
    for d in result.detections:
        assert 0 <= d.box.x_min < d.box.x_max <= 1
        assert 0 <= d.box.y_min < d.box.y_max <= 1


async def test_concurrent_frames_get_their_own_answers(
    models_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    names = sorted(photo_bytes)
    # Reference answers, one frame at a time.
    async with _engine(models_dir, max_batch=1) as engine:
        alone = {n: await engine.detect(photo_bytes[n]) for n in names}
    assert "Cat" in _labels(alone["chelsea"])
    assert {"Dog", "Bicycle", "Car"} <= set(_labels(alone["dog"]))
    assert _labels(alone["rocket"]) == {}

    observer = Recorder()
    order = [names[i % len(names)] for i in range(16)]
    async with _engine(models_dir, max_batch=8, max_wait_ms=20, observer=observer) as engine:
        results = await asyncio.gather(*(engine.detect(photo_bytes[n]) for n in order))
    assert max(observer.batches) > 1, observer.batches
    assert observer.threads == {threading.get_ident()}  # observers are called on the loop
    assert sum(observer.batches) == 16
    for name, result in zip(order, results, strict=True):
        expected = alone[name]
        assert [d.label for d in result.detections] == [d.label for d in expected.detections]
        assert (result.width, result.height) == (expected.width, expected.height)
        for got, want in zip(result.detections, expected.detections, strict=True):
            assert got.score == pytest.approx(want.score, abs=1e-3)
            assert got.box.x_min == pytest.approx(want.box.x_min, abs=1e-3)
            assert got.box.y_max == pytest.approx(want.box.y_max, abs=1e-3)


async def test_model_and_decoding_never_run_on_the_event_loop(
    models_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    threads: dict[str, set[str]] = {"model": set(), "decode": set()}
    engine = _engine(models_dir)
    # Wrap the engine's own seams (not onnxruntime) to see which thread each stage runs on.
    batch_fn = engine._batcher._batch_fn
    prepare = engine._prepare_sync

    def spy_batch(items: Sequence[object]) -> Sequence[object]:
        threads["model"].add(threading.current_thread().name)
        return batch_fn(items)  # type: ignore[arg-type]

    def spy_prepare(image: bytes) -> object:
        threads["decode"].add(threading.current_thread().name)
        return prepare(image)

    engine._batcher._batch_fn = spy_batch  # type: ignore[assignment]
    engine._prepare_sync = spy_prepare  # type: ignore[method-assign,assignment]
    loop_thread = threading.current_thread().name
    async with engine:
        await asyncio.gather(*(engine.detect(b) for b in photo_bytes.values()))
    assert threads["model"]
    assert threads["decode"]
    assert loop_thread not in threads["model"] | threads["decode"]
    assert all(t.startswith("edgeward-infer") for t in threads["model"])
    # A lone frame is decoded in the inference thread with its model run (one hand-off).
    assert all(t.startswith(("edgeward-decode", "edgeward-infer")) for t in threads["decode"])


async def test_a_lone_frame_is_decoded_and_run_in_one_thread_hand_off(
    models_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    threads: dict[str, list[str]] = {"model": [], "decode": []}
    observer = Recorder()
    engine = _engine(models_dir, observer=observer, cache=ResponseCache())
    run_batch = engine._run_batch
    prepare = engine._prepare_sync

    def spy_batch(items: Sequence[object]) -> Sequence[object]:
        threads["model"].append(threading.current_thread().name)
        return run_batch(items)  # type: ignore[arg-type]

    def spy_prepare(image: bytes) -> object:
        threads["decode"].append(threading.current_thread().name)
        return prepare(image)

    # The engine's own seams, whichever path calls them (the batcher or a lone frame's job).
    engine._batcher._batch_fn = spy_batch  # type: ignore[assignment]
    engine._run_batch = spy_batch  # type: ignore[method-assign,assignment]
    engine._prepare_sync = spy_prepare  # type: ignore[method-assign,assignment]
    async with engine:
        result, frame = await engine.detect_with_frame(photo_bytes["chelsea"])
        again = await engine.detect(photo_bytes["chelsea"])
    # One device, one frame in flight: decoding and the model in the same inference thread.
    assert len(threads["decode"]) == 2
    assert threads["model"]
    assert all(t.startswith("edgeward-infer") for t in threads["model"])
    assert all(t.startswith("edgeward-infer") for t in threads["decode"])
    assert _labels(result).get("Cat", 0) >= 0.7
    assert frame is not None
    assert frame.shape == (300, 451, 3)
    assert result.inference_ms > 0
    assert observer.batches == [1]  # counted as a batch of one
    assert observer.cache == ["miss", "exact"]
    assert again.from_cache


async def test_devices_whose_frames_shared_a_run_keep_sharing(
    models_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    # Four devices, one frame in flight each: when one run answers several of them, they send
    # their next frames at once. The first of those must not go alone (a run of one, and the
    # others' run after it) just because it found the batcher idle for a moment: a frame goes
    # alone only when the run before it had one frame too.
    observer = Recorder()
    images = list(photo_bytes.values())
    alone_after: list[int | None] = []  # the size of the run before each lone frame
    engine = _engine(models_dir, max_batch=8, max_wait_ms=2_000, observer=observer)
    # As where a shared run costs less than two (a GPU): on the CPU frames do not wait for
    # company at all (the next test), and the property is about those that do.
    engine._company_pays = lambda: True  # type: ignore[method-assign]
    run_alone = engine._batcher.run_alone

    async def spy_alone(job: object) -> object:
        alone_after.append(observer.batches[-1] if observer.batches else None)
        return await run_alone(job)  # type: ignore[arg-type]

    engine._batcher.run_alone = spy_alone  # type: ignore[method-assign,assignment]

    async def device(k: int) -> None:
        for i in range(4):
            await engine.detect(images[(k + i) % len(images)])

    async with engine:
        await asyncio.gather(*(device(k) for k in range(4)))
    assert sum(observer.batches) == 16
    assert max(observer.batches) > 1
    assert alone_after  # the first frame: nothing ran before it
    assert all(size in (None, 1) for size in alone_after), (alone_after, observer.batches)


async def test_on_the_cpu_a_frame_does_not_wait_for_company(
    models_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    # On the CPU a run of N frames costs N runs: a frame that waited for another (another
    # device's, being decoded) to share its run would pay for that frame's run too.
    async with _engine(models_dir, max_batch=8, max_wait_ms=600_000) as engine:
        engine._preparing += 1  # another frame is being decoded ...
        try:
            # ... and this one runs at once, not after max_wait_ms
            result = await asyncio.wait_for(engine.detect(photo_bytes["chelsea"]), timeout=60)
        finally:
            engine._preparing -= 1
    assert "Cat" in _labels(result)


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


async def test_bad_input_is_refused_and_the_engine_keeps_serving(
    models_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    async with _engine(models_dir, max_image_bytes=1_000_000, max_pixels=200_000) as engine:
        bad = [
            b"",
            b"not an image at all" * 10,
            b"\xff\xd8\xff" + bytes(200),  # JPEG magic, garbage after it
            _truncated(photo_bytes["dog"]),
            b"\xff\xd8\xff" + bytes(1_000_000),  # over max_image_bytes
            photo_bytes["dog"],  # 768×576 is over max_pixels
        ]
        for data in bad:
            with pytest.raises(InvalidImage):
                await engine.detect(data)
        results = await asyncio.gather(
            *(engine.detect(b) for b in bad),
            engine.detect(photo_bytes["chelsea"]),
            return_exceptions=True,
        )
        assert all(isinstance(r, InvalidImage) for r in results[:-1])
        chelsea = results[-1]
        assert isinstance(chelsea, InferenceResult)
        assert "Cat" in _labels(chelsea)


async def test_full_queue_is_overloaded_and_the_rest_are_served(
    models_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    async with _engine(models_dir, queue_size=1, max_batch=1) as engine:
        outcomes = await asyncio.gather(
            *(engine.detect(photo_bytes["chelsea"]) for _ in range(30)), return_exceptions=True
        )
        overloaded = [o for o in outcomes if isinstance(o, Overloaded)]
        served = [o for o in outcomes if isinstance(o, InferenceResult)]
        assert overloaded
        assert served
        assert len(overloaded) + len(served) == 30
        assert all("Cat" in _labels(r) for r in served)
        assert engine.queue_depth() == 0
        assert "Cat" in _labels(await engine.detect(photo_bytes["chelsea"]))


async def test_cache_hits_are_marked_and_faster(
    models_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    observer = Recorder()
    cache = ResponseCache()
    async with _engine(models_dir, cache=cache, observer=observer) as engine:
        started = time.perf_counter()
        first, frame = await engine.detect_with_frame(photo_bytes["chelsea"])
        cold = time.perf_counter() - started
        started = time.perf_counter()
        again, again_frame = await engine.detect_with_frame(photo_bytes["chelsea"])
        warm = time.perf_counter() - started
        assert frame is not None
        assert not first.from_cache
        assert again.from_cache
        assert again_frame is None  # exact hit: never decoded
        assert again.detections == first.detections
        assert again.inference_ms < first.inference_ms
        assert warm < cold

        out = io.BytesIO()
        Image.fromarray(frame).save(out, "JPEG", quality=70)
        similar, similar_frame = await engine.detect_with_frame(out.getvalue())
        assert similar.from_cache
        assert similar_frame is not None
        assert similar.detections == first.detections

        other = await engine.detect(photo_bytes["dog"])
        assert not other.from_cache
    assert observer.cache == ["miss", "exact", "perceptual", "miss"]
    assert observer.batches == [1, 1]


async def test_deadline(models_dir: Path, photo_bytes: dict[str, bytes]) -> None:
    async with _engine(models_dir) as engine:
        with pytest.raises(DeadlineExceeded):
            await engine.detect(photo_bytes["chelsea"], deadline=time.monotonic() - 0.001)
        result = await engine.detect(photo_bytes["chelsea"], deadline=time.monotonic() + 30)
        assert "Cat" in _labels(result)


async def test_exit_answers_admitted_frames_then_refuses(
    models_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    engine = _engine(models_dir)
    async with engine:
        tasks = [asyncio.create_task(engine.detect(b)) for b in photo_bytes.values()]
        await asyncio.sleep(0)
    assert all(t.done() and isinstance(t.result(), InferenceResult) for t in tasks)
    with pytest.raises(ShuttingDown):
        await engine.detect(photo_bytes["chelsea"])


async def test_cancelled_detect_does_not_disturb_others(
    models_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    async with _engine(models_dir, max_batch=4, max_wait_ms=10) as engine:
        tasks = [asyncio.create_task(engine.detect(b)) for b in photo_bytes.values()]
        tasks[0].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[0], asyncio.CancelledError)
        assert all(isinstance(r, InferenceResult) for r in done[1:])
        assert "Cat" in _labels(await engine.detect(photo_bytes["chelsea"]))
        assert engine.queue_depth() == 0


async def test_cancelled_frames_give_their_decode_slots_back(
    models_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    """A decode slot comes back when its thread finishes (or the job is skipped unrun),
    whoever stopped waiting: later frames never find the pool short of a thread."""
    async with _engine(models_dir, max_batch=4, max_wait_ms=10) as engine:
        threads = engine._prep_threads
        for _ in range(3):
            tasks = [asyncio.create_task(engine.detect(b)) for b in photo_bytes.values()]
            await asyncio.sleep(0)
            for t in tasks[::2]:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(500):  # a cancelled frame's decode may still be running
            if engine._prep_slots._value == threads:
                break
            await asyncio.sleep(0.01)
        assert engine._prep_slots._value == threads
        results = await asyncio.gather(*(engine.detect(b) for b in photo_bytes.values()))
        assert all(isinstance(r, InferenceResult) for r in results)
        assert engine.queue_depth() == 0


class _RecordingSession:
    """The real session, with each run's input kept (a seam we own: the engine's model)."""

    def __init__(self, session: object) -> None:
        self._session = session
        self.inputs: list[np.ndarray] = []

    def run(self, outputs: list[str], feed: dict[str, np.ndarray]) -> object:
        self.inputs.extend(feed.values())
        return self._session.run(outputs, feed)  # type: ignore[attr-defined]


async def test_a_batch_of_one_is_not_copied_before_the_model(
    models_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    async with _engine(models_dir) as engine:
        model = engine._model
        assert model is not None
        recorder = _RecordingSession(model.session)
        engine._model = dataclasses.replace(model, session=recorder)
        prepared = engine._prepare_sync(photo_bytes["chelsea"])
        assert not isinstance(prepared, _CacheHit)
        ((detections, _seconds),) = engine._run_batch([prepared.tensor])
        assert np.shares_memory(recorder.inputs[-1], prepared.tensor)
        assert "Cat" in {d.label for d in detections}
        two = engine._run_batch([prepared.tensor, prepared.tensor])
        assert len(two) == 2
        assert two[0][0] == two[1][0] == detections


def test_session_is_set_up_for_serving(models_dir: Path) -> None:
    model = models_dir / "edge_ssd_mobilenetv2_oid24.onnx"
    session, provider = create_session(model, providers="cpu")
    assert provider == "CPUExecutionProvider"
    options = session.get_session_options()
    assert options.intra_op_num_threads == physical_cores()
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    session, _ = create_session(model.read_bytes(), providers="auto", intra_op_threads=1)
    assert session.get_session_options().intra_op_num_threads == 1
    out = session.run(None, {session.get_inputs()[0].name: np.zeros((2, 300, 300, 3), np.float32)})
    assert out[0].shape[0] == 2  # dynamic batch


def test_cuda_demand_without_cuda_is_a_clear_error(models_dir: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the refusal is for CPU builds")
    with pytest.raises(ProviderUnavailable, match="gateway-gpu"):
        create_session(models_dir / "edge_ssd_mobilenetv2_oid24.onnx", providers="cuda")


def test_physical_cores_is_sane() -> None:
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


async def test_cancelled_while_draining_still_stops(
    models_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    engine = _engine(models_dir)
    callers: list[asyncio.Task[InferenceResult]] = []

    async def owner() -> None:
        async with engine:
            callers.extend(asyncio.create_task(engine.detect(b)) for b in photo_bytes.values())
            await asyncio.sleep(0)

    task = asyncio.create_task(owner())
    await asyncio.sleep(0.005)  # the owner is draining the admitted frames
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    outcomes = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 10)
    # Each caller got an answer or a refusal; none was left waiting.
    assert all(isinstance(o, InferenceResult | ShuttingDown) for o in outcomes)
    with pytest.raises(ShuttingDown):
        await engine.detect(photo_bytes["chelsea"])


async def test_broken_observer_does_not_fail_frames(
    models_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    class Broken(EngineObserver):
        def on_batch(self, size: int, seconds: float) -> None:
            raise RuntimeError("metrics bug")

        def on_cache(self, kind: CacheKind) -> None:
            raise RuntimeError("metrics bug")

        def on_queue_depth(self, n: int) -> None:
            raise RuntimeError("metrics bug")

    async with _engine(models_dir, cache=ResponseCache(), observer=Broken()) as engine:
        for _ in range(2):
            assert "Cat" in _labels(await engine.detect(photo_bytes["chelsea"]))
