"""The core's escalation models: NanoDet (COCO-80) and EfficientNet-Lite2 (ImageNet-1k).

:class:`CoreModels` runs both on an escalated crop or frame; :mod:`gateway._core._identify`
combines what they say (detector on the whole image, classifier on the whole image and on crops
of the detections, the edge's hint) over one taxonomy (:mod:`gateway._core._taxonomy`) into
calibrated answers, and says ``unknown`` below the calibrated threshold. Each model is loaded
on first use and released after ``idle_release_s`` without use (both logged), so a core that
hosts many models holds only the busy ones. Inference runs in a worker thread, never on the
event loop, behind a bounded queue. The handler that serves ``Core.Escalate`` with them is
:mod:`gateway._core._escalate`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import numpy.typing as npt
import structlog

from gateway._core._identify import (
    Calibration,
    ObjectAnswer,
    Observation,
    candidates,
    crop_boxes,
    decide,
)
from gateway._core._taxonomy import taxonomy
from gateway._inference._classifier import preprocess_efficientnet
from gateway._inference._detection import Box
from gateway._inference._manifest import (
    Manifest,
    load_manifest,
    read_verified_model,
)
from gateway._inference._nanodet import (
    pad_square,
    postprocess_nanodet,
    preprocess_nanodet,
    unpad_square,
)

if TYPE_CHECKING:
    from gateway._core._escalate import CoreEscalationSettings

__all__ = ["CLASSIFIER", "DETECTOR", "CoreAnswer", "CoreModels", "Rgb"]

_log = structlog.get_logger(__name__)

#: Manifest names of the core's models, and the names answers carry.
DETECTOR = "core_nanodet_coco80"
CLASSIFIER = "core_efficientnet_lite2"
_PUBLIC_NAMES = {DETECTOR: "nanodet-coco80", CLASSIFIER: "efficientnet-lite2"}
_BOTH = "nanodet-coco80+efficientnet-lite2"

Rgb = npt.NDArray[np.uint8]


# ------------------------------------------------------------------------------ models
@dataclass(frozen=True, slots=True)
class CoreAnswer:
    """What the core's models decided about one image.

    ``objects`` are the confident answers, most probable first; ``label``/``score`` are the
    first of them, or ``unknown`` with the best candidate's probability when none reached
    the calibrated threshold (``still_unknown``).
    """

    label: str
    score: float
    #: ``nanodet-coco80+efficientnet-lite2``, or the one model that proposed the answer.
    model_name: str
    still_unknown: bool
    objects: tuple[ObjectAnswer, ...]
    model_ms: float


class _Slot:
    """One lazily loaded, idle-released onnxruntime session."""

    def __init__(self, name: str, loader: Callable[[], tuple[Any, str]]) -> None:
        self.name = name
        self._loader = loader
        self.lock = threading.Lock()
        self.session: Any = None
        self.input_name = ""
        self.last_used = 0.0
        self.loads = 0

    def get(self, now: float) -> Any:
        """The session (loading it if needed); call with :attr:`lock` held."""
        if self.session is None:
            started = time.perf_counter()
            session, provider = self._loader()
            self.session = session
            self.input_name = str(session.get_inputs()[0].name)
            self.loads += 1
            _log.info(
                "core model loaded",
                model=self.name,
                provider=provider,
                load_ms=round((time.perf_counter() - started) * 1000, 1),
                loads=self.loads,
            )
        self.last_used = now
        return self.session

    def release_if_idle(self, now: float, idle_s: float) -> bool:
        """Drop the session when unused for ``idle_s``; never blocks on a running model."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if self.session is None or now - self.last_used < idle_s:
                return False
            self.session = None
            _log.info("core model released", model=self.name, idle_s=round(now - self.last_used))
            return True
        finally:
            self.lock.release()


class CoreModels:
    """NanoDet + EfficientNet-Lite2 with lazy loading, idle release and a vocabulary map.

    An async context manager: entering reads the manifest (models load on first use);
    inside, :meth:`identify` runs both models on a decoded RGB image in the worker thread.
    :meth:`identify_sync` is the same work for a caller already off the event loop.
    """

    def __init__(
        self,
        settings: CoreEscalationSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        session_factory: Callable[[bytes], tuple[Any, str]] | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._session_factory = session_factory or self._create_session
        self._manifest: Manifest | None = None
        self._slots: dict[str, _Slot] = {}
        self._detector_labels: tuple[str, ...] = ()
        self._classifier_labels: tuple[str, ...] = ()
        self._calibration: Calibration | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._reaper: asyncio.Task[None] | None = None
        #: How many images the models have been run on (idempotency is tested with it).
        self.runs = 0

    def _create_session(self, data: bytes) -> tuple[Any, str]:
        from gateway._inference._runtime import create_session

        return create_session(
            data,
            providers=self.settings.providers,
            intra_op_threads=self.settings.intra_op_threads,
        )

    def _loader(self, name: str) -> Callable[[], tuple[Any, str]]:
        def load() -> tuple[Any, str]:
            assert self._manifest is not None  # noqa: S101 - opened in __aenter__
            return self._session_factory(read_verified_model(self._manifest, name))

        return load

    def open(self) -> None:
        """Read the manifest and prepare the (unloaded) model slots. Idempotent."""
        if self._manifest is not None:
            return
        manifest = load_manifest(self.settings.models_dir)
        self._detector_labels = manifest.entry(DETECTOR).labels
        self._classifier_labels = manifest.entry(CLASSIFIER).labels
        self._slots = {name: _Slot(name, self._loader(name)) for name in (DETECTOR, CLASSIFIER)}
        self._manifest = manifest

    def calibration(self) -> Calibration:
        """The calibrated combination (read from ``settings.calibration`` on first use)."""
        if self._calibration is None:
            self._calibration = Calibration.load(self.settings.calibration)
        return self._calibration

    async def __aenter__(self) -> Self:
        self.open()
        self.calibration()  # a broken calibration file stops the start, not an escalation
        # One worker: NanoDet runs batch 1 and each run already uses every physical core.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "edgeward-core-models")
        self._reaper = asyncio.create_task(self._reap(), name="edgeward-core-model-reaper")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def loaded(self) -> frozenset[str]:
        """Names of the models currently in memory."""
        return frozenset(name for name, slot in self._slots.items() if slot.session is not None)

    def loads(self, name: str) -> int:
        """How many times model ``name`` has been loaded."""
        return self._slots[name].loads

    def release_idle(self) -> list[str]:
        """Release every model idle for ``idle_release_s``; return their names."""
        now = self._clock()
        idle = self.settings.idle_release_s
        return [name for name, slot in self._slots.items() if slot.release_if_idle(now, idle)]

    async def _reap(self) -> None:
        interval = min(30.0, max(0.05, self.settings.idle_release_s / 4))
        while True:
            await asyncio.sleep(interval)
            self.release_idle()

    def run_in_worker(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Schedule ``fn`` on the model thread (the service runs decode + models there)."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._pool, fn)

    async def identify(
        self, image: Rgb, *, is_full_frame: bool = False, edge: tuple[str, float] = ("", 0.0)
    ) -> CoreAnswer:
        """Run both models on ``image`` in the worker thread; see :meth:`identify_sync`."""
        result: CoreAnswer = await self.run_in_worker(
            lambda: self.identify_sync(image, is_full_frame=is_full_frame, edge=edge)
        )
        return result

    def _run(self, name: str, feed: Any) -> list[Any]:
        slot = self._slots[name]
        with slot.lock:
            session = slot.get(self._clock())
            outputs: list[Any] = session.run(None, {slot.input_name: feed})
            slot.last_used = self._clock()
        return outputs

    def observe_sync(self, image: Rgb, *, edge: tuple[str, float] = ("", 0.0)) -> Observation:
        """Run the models on ``image``: what :func:`gateway._core._identify.candidates` needs.

        The image is padded to a square first: crops are often tall or wide, and stretching
        them (NanoDet's input is square) or centre-cropping them (the classifier's) loses the
        object. The classifier sees the whole image and, in the same batch, a square crop
        around each of the strongest detections (:func:`crop_boxes`).
        """
        self.open()
        square = pad_square(image)
        raw = postprocess_nanodet(
            self._run(DETECTOR, preprocess_nanodet(square)),
            self._detector_labels,
            score_threshold=0.2,
        )
        detections = tuple(unpad_square(det, image.shape[1], image.shape[0]) for det in raw)
        boxes = crop_boxes(detections)
        batch = [square, *(pad_square(_crop(image, box)) for box in boxes)]
        logits = np.asarray(self._run(CLASSIFIER, preprocess_efficientnet(batch))[0])
        probs = _softmax(logits.astype(np.float32))
        return Observation(
            detections=detections,
            frame_probs=probs[0],
            crop_probs=tuple(probs[1:]),
            detector_labels=self._detector_labels,
            classifier_labels=self._classifier_labels,
            edge_label=edge[0],
            edge_score=edge[1],
        )

    def identify_sync(
        self, image: Rgb, *, is_full_frame: bool = False, edge: tuple[str, float] = ("", 0.0)
    ) -> CoreAnswer:
        """The calibrated answer for one image (blocking; see :mod:`gateway._core._identify`).

        ``edge`` is the edge's hint (its label and score; empty for a whole frame). Every
        confident object is in :attr:`CoreAnswer.objects`; on a crop, the object must cover
        a fair part of it (the thing the edge was unsure about, not background at the margin).
        """
        started = time.perf_counter()
        self.runs += 1
        obs = self.observe_sync(image, edge=edge)
        found = candidates(obs)
        if not is_full_frame:
            found = [c for c in found if c.box.area >= 0.05]
        objects, best = decide(found, self.calibration())
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        tax = taxonomy()
        if not objects:
            return CoreAnswer("unknown", best, _BOTH, True, (), elapsed_ms)
        top = objects[0]
        model = (
            _PUBLIC_NAMES[DETECTOR]
            if top.sources == ("detector",)
            else _PUBLIC_NAMES[CLASSIFIER]
            if "detector" not in top.sources
            else _BOTH
        )
        return CoreAnswer(
            tax.edge_name(top.concept), top.probability, model, False, tuple(objects), elapsed_ms
        )


def _softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    out: npt.NDArray[np.float32] = shifted / shifted.sum(axis=1, keepdims=True)
    return out


def _crop(image: Rgb, box: Box, margin: float = 0.1) -> Rgb:
    """``box`` of ``image`` with ``margin`` of its size added on each side (clipped)."""
    height, width = image.shape[:2]
    bw, bh = box.x_max - box.x_min, box.y_max - box.y_min
    x0 = int(max(0.0, box.x_min - margin * bw) * width)
    y0 = int(max(0.0, box.y_min - margin * bh) * height)
    x1 = max(x0 + 1, int(min(1.0, box.x_max + margin * bw) * width))
    y1 = max(y0 + 1, int(min(1.0, box.y_max + margin * bh) * height))
    return image[y0:y1, x0:x1]
