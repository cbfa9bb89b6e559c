"""The inference engine: the one object the gateway's gRPC and MQTT layers call.

One request goes through::

    size check → exact cache → decode + preprocess (thread pool) → perceptual cache
      → micro-batcher (bounded queue) → batched model run (one inference thread) → post-processing
      → cache store

One engine runs one detector: the OID-24 SSD, or NanoDet (COCO-80), the manifest's detectors
the edge can run (:data:`gateway._models.EDGE_DETECTORS`). Which model a device's frames go
through is the model catalog's decision (:mod:`gateway._inference._catalog`).

Nothing CPU-heavy runs on the event loop: hashing, decoding and pre-processing run in a small
bounded thread pool, the model and its post-processing in the batcher's single thread. A lone
frame (the batcher idle, no other frame being decoded, and the last run a batch of one: one
device, or a quiet gateway) has no batch to join, so all of it runs as one job in the batcher's
thread: one hand-off from the event loop to a thread and one back, rather than two of each.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import enum
import functools
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self

import numpy as np
import numpy.typing as npt
import structlog

from gateway._models import DEFAULT_EDGE_MODEL, EDGE_DETECTORS, EdgeArchitecture

if TYPE_CHECKING:
    from gateway._config import InferenceSettings

from ._batcher import DeadlineExceeded, MicroBatcher, Overloaded, ShuttingDown, run_in_thread
from ._cache import ResponseCache, content_digest, difference_hash
from ._detection import Detection
from ._image import InvalidImage, decode_image
from ._manifest import load_manifest, read_verified_model
from ._nanodet import (
    NANODET_INPUT_SIZE,
    pad_square,
    postprocess_nanodet,
    preprocess_nanodet,
    unpad_square,
)
from ._runtime import CPU, ProviderChoice, create_session, physical_cores
from ._ssd import SSD_INPUT_SIZE, postprocess_ssd, preprocess_ssd

__all__ = [
    "DEFAULT_MODEL",
    "CacheKind",
    "EngineObserver",
    "InferenceEngine",
    "InferenceResult",
]

_log = structlog.get_logger(__name__)

#: The default edge detector (``models/manifest.json`` name).
DEFAULT_MODEL = DEFAULT_EDGE_MODEL

CacheKind = Literal["exact", "perceptual", "miss"]

Frame = npt.NDArray[np.uint8]
Tensor = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class InferenceResult:
    """What the edge model said about one frame.

    ``inference_ms`` is the work done for this frame: decoding and pre-processing plus the
    model run and post-processing of the batch it was part of; time spent queueing is not in
    it. On a cache hit it is the time the lookup took. ``width`` and ``height`` are the
    decoded frame's, in pixels (boxes in ``detections`` are normalised to them).
    """

    detections: tuple[Detection, ...]
    model_name: str
    model_version: str
    inference_ms: float
    from_cache: bool
    width: int
    height: int
    #: Names this model run; an answer from the cache keeps the id of the run it repeats, so
    #: what was decided about that answer (its escalation marks) can be found again.
    result_id: str = ""
    #: Every label the model that answered can give (its manifest labels): the edge's list,
    #: against which escalation judges a label "outside the edge set".
    labels: tuple[str, ...] = ()


class EngineObserver(Protocol):
    """Hooks for metrics; every method is called on the event loop and must not block.

    Subclass it and override what you need: the defaults do nothing.
    """

    def on_batch(self, size: int, seconds: float) -> None:
        """A batch of ``size`` frames ran in ``seconds`` (model and post-processing)."""
        return

    def on_cache(self, kind: CacheKind) -> None:
        """A frame was looked up in the cache (only when the engine has one)."""
        return

    def on_queue_depth(self, n: int) -> None:
        """The number of frames waiting for the model changed to ``n``."""
        return


class _NullObserver(EngineObserver):
    pass


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class _CacheHit:
    result: InferenceResult
    kind: CacheKind
    frame: Frame | None


@dataclass(frozen=True, slots=True)
class _Prepared:
    digest: bytes | None
    dhash: int | None
    frame: Frame
    tensor: Tensor  # one frame's model input ([300, 300, 3] SSD, [3, 416, 416] NanoDet)
    seconds: float


@dataclass(frozen=True, slots=True)
class _Model:
    """The verified model, its session and what the batch function needs of it."""

    name: str
    architecture: EdgeArchitecture
    version: str
    cache_version: str  # the cache's "version" key
    session: Any
    provider: str
    input_name: str
    output_names: tuple[str, ...]  # SSD: box encodings, class logits; NanoDet: all six
    labels: tuple[str, ...]
    fixed_batch: int | None  # a model exported with a fixed batch (1) runs frame by frame


def _prep_threads() -> int:
    # Decoding a camera JPEG costs about as much as one SSD run, so one decoder per core
    # keeps the model fed; more would only compete with onnxruntime's threads.
    return min(4, physical_cores())


class InferenceEngine:
    """Detect objects in encoded frames with one edge model, batched, cached and bounded.

    ``model`` names a detector of :data:`~gateway._models.EDGE_DETECTORS`. An async context
    manager: entering verifies the model against ``models_dir``'s manifest,
    creates the onnxruntime session (``provider`` then says what really runs), warms it up and
    starts the batcher; leaving stops accepting new frames (:class:`ShuttingDown`), answers
    those already admitted, then returns.

    Errors per request: :class:`InvalidImage` (too many bytes or pixels, not a JPEG/PNG,
    corrupt), :class:`Overloaded` (queue full, at once), :class:`DeadlineExceeded`,
    :class:`ShuttingDown`. A model that fails a batch fails only that batch's frames.
    A batch holds at most ``max_batch_per_device`` frames of one device (the ``key`` of
    :meth:`detect_with_frame`; ``None``: no cap); frames without a key are not capped.
    """

    def __init__(
        self,
        *,
        models_dir: Path,
        model: str = DEFAULT_MODEL,
        providers: ProviderChoice = "auto",
        intra_op_threads: int | None = None,
        max_batch: int = 8,
        max_batch_per_device: int | None = 1,
        max_wait_ms: float = 2.0,
        queue_size: int = 64,
        max_pixels: int = 16_000_000,
        max_image_bytes: int = 8 * 1024 * 1024,
        score_threshold: float = 0.5,
        cache: ResponseCache | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        if max_pixels < 1 or max_image_bytes < 1:
            raise ValueError("max_pixels and max_image_bytes must be positive")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be within 0..1, got {score_threshold}")
        if model not in EDGE_DETECTORS:
            raise ValueError(
                f"model {model!r} is not a detector the edge can run "
                f"({', '.join(sorted(EDGE_DETECTORS))})"
            )
        self._models_dir = Path(models_dir)
        self._model_name = model
        self._providers: ProviderChoice = providers
        self._intra_op_threads = intra_op_threads
        self._max_pixels = max_pixels
        self._max_image_bytes = max_image_bytes
        self._score_threshold = score_threshold
        self._queue_size = queue_size
        self._cache = cache
        self._observer: EngineObserver = observer if observer is not None else _NullObserver()
        self._batcher: MicroBatcher[Tensor, tuple[tuple[Detection, ...], float]] = MicroBatcher(
            self._run_batch,
            max_batch=max_batch,
            # Frames of one device (``key``) per batch: a device's backlog never fills a
            # batch that another device's frame must then wait behind.
            max_per_key=max_batch_per_device,
            max_wait_ms=max_wait_ms,
            queue_size=queue_size,
            name="edgeward-infer",
            on_batch=self._on_batch,
            on_queue_depth=self._on_batcher_depth,
            # A frame reaches the batcher only after decoding (milliseconds, usually more
            # than max_wait): waiting for company is worth it only while another frame is
            # being decoded, and only where a shared run is cheaper than two (not on the
            # CPU, see _company_pays). One device's frame then pays no batching wait.
            more_coming=lambda: self._preparing > 0 and self._company_pays(),
        )
        threads = _prep_threads()
        self._prep_slots = asyncio.Semaphore(threads)
        self._prep_threads = threads
        self._prep_waiting = 0
        self._preparing = 0  # frames between admission and submission to the batcher
        # Whether the last model run had one frame: only then may a frame go alone (devices
        # whose frames shared a run would otherwise lose that to whichever answers first).
        self._lone = True
        self._prep_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._model: _Model | None = None
        self._state = _State.NEW
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stack = contextlib.AsyncExitStack()

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def from_settings(
        cls,
        settings: InferenceSettings,
        *,
        model: str | None = None,
        cache: ResponseCache | None = None,
        observer: EngineObserver | None = None,
    ) -> Self:
        """The engine the gateway runs for ``settings`` (the ``inference`` section), for
        ``model`` (default: the section's own)."""
        return cls(
            models_dir=settings.models_dir,
            model=settings.model if model is None else model,
            providers=settings.providers,
            intra_op_threads=settings.threads,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            queue_size=settings.queue_size,
            max_pixels=settings.max_pixels,
            max_image_bytes=settings.max_image_bytes,
            score_threshold=settings.score_threshold,
            cache=cache,
            observer=observer,
        )

    async def __aenter__(self) -> Self:
        if self._state is not _State.NEW:
            raise RuntimeError(f"the inference engine can be entered once ({self._state.value})")
        # Reading and hashing ~20 MB and building the session take a while: not on the loop.
        self._model = await asyncio.to_thread(self._load_model)
        self._prep_pool = pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._prep_threads, thread_name_prefix="edgeward-decode"
        )
        # Jobs already submitted finish (at most one per thread, see _prepare): cancelling them
        # would hand their callers a CancelledError they did not ask for.
        self._stack.callback(pool.shutdown, wait=False)
        try:
            await self._stack.enter_async_context(self._batcher)
        except BaseException:
            await self._stack.aclose()
            raise
        self._state = _State.OPEN
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._state = _State.CLOSING
        try:
            if exc_type is None:
                # Ordered shutdown: admitted frames are answered before the batcher stops.
                try:
                    await self._idle.wait()
                except BaseException as drain_exc:
                    # Cancelled while draining: stop the batcher at once, then propagate.
                    await self._stack.__aexit__(type(drain_exc), drain_exc, drain_exc.__traceback__)
                    raise
            return await self._stack.__aexit__(exc_type, exc, tb)
        finally:
            self._state = _State.CLOSED

    def _load_model(self) -> _Model:
        manifest = load_manifest(self._models_dir)
        entry = manifest.entry(self._model_name)
        data = read_verified_model(manifest, self._model_name)
        session, provider = create_session(
            data, providers=self._providers, intra_op_threads=self._intra_op_threads
        )
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"model {entry.name!r} has {len(inputs)} inputs, expected 1")
        first_dim = inputs[0].shape[0]
        architecture = EDGE_DETECTORS[entry.name]
        outputs = (
            _ssd_outputs(session, len(entry.labels))
            if architecture == "ssd"
            else tuple(o.name for o in session.get_outputs())
        )
        model = _Model(
            name=entry.name,
            architecture=architecture,
            version=str(entry.source.get("version", "")) or entry.sha256[:12],
            # The file's hash, not the manifest's version string, says which weights answered;
            # the threshold changes the answer too (two engines may share one cache).
            cache_version=f"{entry.sha256}/{self._score_threshold}",
            session=session,
            provider=provider,
            input_name=inputs[0].name,
            output_names=outputs,
            labels=entry.labels,
            fixed_batch=first_dim if isinstance(first_dim, int) else None,
        )
        # The first run allocates buffers and picks kernels (much longer on CUDA); pay it
        # here rather than on the first device's frame.
        warm = (
            (1, SSD_INPUT_SIZE, SSD_INPUT_SIZE, 3)
            if architecture == "ssd"
            else (1, 3, NANODET_INPUT_SIZE, NANODET_INPUT_SIZE)
        )
        _run_model(model, np.zeros(warm, dtype=np.float32), self._score_threshold)
        return model

    # -- requests ----------------------------------------------------------------------------

    @property
    def provider(self) -> str:
        """The execution provider really in use (``"CPUExecutionProvider"``, …), once entered."""
        return self._loaded().provider

    def queue_depth(self) -> int:
        """Frames admitted and not yet in a model run (waiting to decode or for a batch)."""
        return self._prep_waiting + self._batcher.queue_depth()

    async def detect(self, image: bytes, *, deadline: float | None = None) -> InferenceResult:
        """Detect objects in one encoded JPEG or PNG frame.

        ``deadline`` is a :func:`time.monotonic` value; past it the call raises
        :class:`DeadlineExceeded`.
        """
        result, _frame = await self.detect_with_frame(image, deadline=deadline)
        return result

    async def detect_with_frame(
        self,
        image: bytes,
        *,
        deadline: float | None = None,
        key: str | None = None,
        region: str | None = None,
    ) -> tuple[InferenceResult, Frame | None]:
        """Like :meth:`detect`, and also return the decoded ``H×W×3`` RGB frame.

        The frame is what escalation crops are cut from; it is ``None`` when the answer came
        from the exact cache (the bytes were not decoded). ``key`` (the device id) makes
        batches fair across devices (see :class:`~gateway._inference._batcher.MicroBatcher`).
        ``region`` is accepted for the front door's sake and ignored: an engine runs one
        model (:class:`~gateway._inference.EdgeModelCatalog` picks it by region).
        """
        if self._state is not _State.OPEN:
            raise ShuttingDown(f"the inference engine is not accepting work ({self._state.value})")
        # Checked before anything else touches the bytes: hashing or decoding a huge payload
        # is itself the cost an attacker would want us to pay.
        if len(image) > self._max_image_bytes:
            raise InvalidImage(f"image is {len(image)} bytes, limit {self._max_image_bytes}")
        self._inflight += 1
        self._idle.clear()
        try:
            return await self._detect(image, deadline, key)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _detect(
        self, image: bytes, deadline: float | None, key: str | None
    ) -> tuple[InferenceResult, Frame | None]:
        model = self._loaded()
        if self._lone and self._preparing == 0 and self._batcher.idle():
            # Alone: no frame to share a batch with, none being decoded that could join, and
            # the last run had no company either.
            return await self._detect_alone(image, deadline, model)
        timeout = None if deadline is None else deadline - time.monotonic()
        self._preparing += 1
        try:
            async with asyncio.timeout(timeout):
                prepared = await self._prepare(image)
        except TimeoutError:
            raise DeadlineExceeded("deadline passed while decoding the frame") from None
        finally:
            # Nothing awaits between here and the batcher's submit (which queues the frame
            # before it first suspends), so the batcher never sees this frame as neither
            # coming nor queued.
            self._preparing -= 1
        if isinstance(prepared, _CacheHit):
            self._observe(self._observer.on_cache, prepared.kind)
            return prepared.result, prepared.frame
        if self._cache is not None:
            self._observe(self._observer.on_cache, "miss")
        detections, batch_seconds = await self._batcher.submit(
            prepared.tensor, deadline=deadline, key=key
        )
        return self._answer(model, prepared, detections, batch_seconds), prepared.frame

    async def _detect_alone(
        self, image: bytes, deadline: float | None, model: _Model
    ) -> tuple[InferenceResult, Frame | None]:
        """Decode, pre-process and run the model in one job in the inference thread.

        The lone frame's path (the batcher idle, nothing being decoded, the last run a batch
        of one): one hand-off to a thread and one back, instead of the decode pool, the
        batcher's queue and its thread.
        A frame that arrives meanwhile takes the pooled path and its batch runs after this.
        """
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("deadline passed before the frame was decoded")
        try:
            async with asyncio.timeout(timeout):
                answered = await self._batcher.run_alone(
                    functools.partial(self._alone_sync, image, model)
                )
        except TimeoutError:
            raise DeadlineExceeded("deadline passed while waiting for inference") from None
        if isinstance(answered, _CacheHit):
            self._observe(self._observer.on_cache, answered.kind)
            return answered.result, answered.frame
        result, frame, batch_seconds = answered
        if self._cache is not None:
            self._observe(self._observer.on_cache, "miss")
        self._observe(self._observer.on_batch, 1, batch_seconds)
        return result, frame

    def _alone_sync(
        self, image: bytes, model: _Model
    ) -> _CacheHit | tuple[InferenceResult, Frame, float]:
        """:meth:`_prepare_sync`, a batch of one and the answer, in the inference thread.

        The answer is built (and stored in the thread-safe cache) here too, so that once the
        loop is woken it only has to send it.
        """
        prepared = self._prepare_sync(image)
        if isinstance(prepared, _CacheHit):
            return prepared
        ((detections, batch_seconds),) = self._run_batch([prepared.tensor])
        result = self._answer(model, prepared, detections, batch_seconds)
        return result, prepared.frame, batch_seconds

    def _answer(
        self,
        model: _Model,
        prepared: _Prepared,
        detections: tuple[Detection, ...],
        batch_seconds: float,
    ) -> InferenceResult:
        """The result of a model run over ``prepared``, stored in the cache when there is one
        (on the loop, or in the inference thread for a lone frame: the cache is thread-safe)."""
        height, width = prepared.frame.shape[:2]
        if model.architecture == "nanodet":  # boxes on the padded square, back to the frame
            detections = tuple(unpad_square(d, width, height) for d in detections)
        result = InferenceResult(
            detections=detections,
            model_name=model.name,
            model_version=model.version,
            inference_ms=(prepared.seconds + batch_seconds) * 1000.0,
            from_cache=False,
            width=width,
            height=height,
            result_id=uuid.uuid4().hex,
            labels=model.labels,
        )
        if self._cache is not None and prepared.digest is not None:
            self._cache.put(
                model.name, model.cache_version, prepared.digest, result, dhash=prepared.dhash
            )
        return result

    async def _prepare(self, image: bytes) -> _Prepared | _CacheHit:
        """Run :meth:`_prepare_sync` in the decode pool, at most one job per thread.

        Waiting for a decode thread is bounded like the batcher's queue. A slot is given back
        when the thread finishes, not when a cancelled caller stops waiting, so the pool's own
        (unbounded) queue never grows.
        """
        pool = self._prep_pool
        if pool is None:
            raise RuntimeError("the inference engine has not been entered")
        if self._prep_waiting >= self._queue_size:
            raise Overloaded(self._queue_size)
        self._prep_waiting += 1
        self._report_depth()
        try:
            await self._prep_slots.acquire()
        finally:
            self._prep_waiting -= 1
            self._report_depth()
        try:
            job = run_in_thread(
                pool, functools.partial(self._prepare_sync, image), on_end=self._prep_slots.release
            )
        except BaseException:
            self._prep_slots.release()
            raise
        return await job

    def _prepare_sync(self, image: bytes) -> _Prepared | _CacheHit:
        """Hash, look up, decode and pre-process one frame (in a decode thread)."""
        started = time.perf_counter()
        model = self._loaded()
        cache = self._cache
        digest = dhash = None
        if cache is not None:
            digest = content_digest(image)
            hit = cache.get_exact(model.name, model.cache_version, digest)
            if hit is not None:
                elapsed = (time.perf_counter() - started) * 1000.0
                return _CacheHit(dataclasses.replace(hit, inference_ms=elapsed), "exact", None)
        frame = decode_image(image, max_pixels=self._max_pixels)
        if cache is not None:
            dhash = difference_hash(frame)
            hit = cache.get_similar(model.name, model.cache_version, dhash)
            if hit is not None:
                height, width = frame.shape[:2]
                elapsed = (time.perf_counter() - started) * 1000.0
                # The boxes are normalised, so they hold for this frame's size too.
                hit = dataclasses.replace(hit, inference_ms=elapsed, width=width, height=height)
                return _CacheHit(hit, "perceptual", frame)
        tensor = (
            preprocess_ssd([frame])[0]
            if model.architecture == "ssd"
            else preprocess_nanodet(pad_square(frame))[0]
        )
        return _Prepared(
            digest=digest,
            dhash=dhash,
            frame=frame,
            tensor=tensor,
            seconds=time.perf_counter() - started,
        )

    def _run_batch(self, tensors: Sequence[Tensor]) -> list[tuple[tuple[Detection, ...], float]]:
        """The batch function (in the batcher's inference thread)."""
        model = self._loaded()
        started = time.perf_counter()
        # One frame (a lone frame, a quiet gateway): a view with a batch axis, not a copy of
        # its megabyte of input (the copy cost ~50 µs, more with cold caches).
        batch = tensors[0][np.newaxis] if len(tensors) == 1 else np.stack(tensors)
        if model.fixed_batch is None or model.fixed_batch == len(tensors):
            per_frame = _run_model(model, batch, self._score_threshold)
        else:
            # Exported with a fixed batch of 1 (NanoDet): still one thread hop per batch.
            per_frame = []
            for i in range(len(tensors)):
                per_frame += _run_model(model, batch[i : i + 1], self._score_threshold)
        seconds = time.perf_counter() - started
        return [(detections, seconds) for detections in per_frame]

    def _company_pays(self) -> bool:
        """Whether a frame should wait (``max_wait_ms``) for another to share its run.

        Not on the CPU: there a batch of N frames costs N runs (the edge SSD, one intra-op
        thread: 13.2 ms a frame alone, 14.0 in a batch of two, 14.8 in a batch of eight), so
        a frame that waited for company, often another device's (a flood's), would pay for
        its companion's run too, twice its own latency. Frames that are waiting anyway (a
        backlog) still share runs.
        """
        return self._model is not None and self._model.provider != CPU

    def _loaded(self) -> _Model:
        if self._model is None:
            raise RuntimeError("the inference engine has not been entered")
        return self._model

    def _on_batch(self, size: int, seconds: float) -> None:
        self._lone = size == 1
        self._observer.on_batch(size, seconds)

    def _on_batcher_depth(self, _n: int) -> None:
        self._report_depth()

    def _report_depth(self) -> None:
        self._observe(self._observer.on_queue_depth, self.queue_depth())

    @staticmethod
    def _observe(hook: Callable[..., None], *values: object) -> None:
        try:
            hook(*values)
        except Exception:  # noqa: BLE001 - a metrics bug must not fail a device's frame
            _log.exception("engine observer failed", hook=getattr(hook, "__name__", "?"))


def _ssd_outputs(session: Any, classes: int) -> tuple[str, str]:
    """Names of the box-encoding and class-logit outputs, found by shape."""
    boxes = logits = None
    for out in session.get_outputs():
        last = out.shape[-1] if out.shape else None
        if last == 4 and boxes is None:
            boxes = out.name
        elif last == classes and logits is None:
            logits = out.name
    if boxes is None or logits is None:
        raise ValueError(
            f"the detector's outputs {[o.shape for o in session.get_outputs()]} are not "
            f"[N,anchors,4] and [N,anchors,{classes}]"
        )
    return boxes, logits


def _run_model(model: _Model, batch: Tensor, score_threshold: float) -> list[tuple[Detection, ...]]:
    outputs = model.session.run(list(model.output_names), {model.input_name: batch})
    if model.architecture == "ssd":
        boxes, logits = outputs
        return postprocess_ssd(boxes, logits, model.labels, score_threshold=score_threshold)
    # NanoDet's graph has a batch of one: one frame per run.
    return [postprocess_nanodet(outputs, model.labels, score_threshold=score_threshold)]
