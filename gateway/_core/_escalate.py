"""``Core.Escalate``: the core's larger models answer what an edge gateway could not name.

Three parts:

- :class:`CoreModels` runs NanoDet (COCO-80) and EfficientNet-Lite2 (ImageNet-1k) on an
  escalated crop or frame; :mod:`gateway._core._identify` combines what they say (detector on
  the whole image, classifier on the whole image and on crops of the detections, the edge's
  hint) over one taxonomy (:mod:`gateway._core._taxonomy`) into calibrated answers, and says
  ``unknown`` below the calibrated threshold. Each model is loaded on first use and released
  after ``idle_release_s`` without use (both logged), so a core that hosts many models holds
  only the busy ones. Inference runs in a worker thread, never on the event loop, behind a
  bounded queue.
- :class:`AnswerStore` keeps every answer, keyed by (gateway, escalation id), in SQLite: a
  retry of an escalation whose reply was lost gets the stored answer and the models do not
  run again. A retry that arrives while the first is still running waits for it. Replicated
  cores keep the answers in their PostgreSQL registry instead
  (:class:`gateway._core._answers.PostgresAnswerStore`, ``answers_url=``); the first answer
  stored is the one every replica replies with.
- :class:`EscalateService` is the handler :class:`gateway._core.CoreServer` plugs in as
  ``escalate=``. The core service has already required a *gateway* identity from the TLS peer
  certificate (a device or another core is refused with ``PERMISSION_DENIED``); the handler
  bounds the request, decodes the image safely and answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import numpy as np
import numpy.typing as npt
import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

import pki
from gateway._core._answers import Answers, PostgresAnswerStore
from gateway._core._identify import (
    CALIBRATION_FILE,
    Calibration,
    ObjectAnswer,
    Observation,
    candidates,
    crop_boxes,
    decide,
)
from gateway._core._status import Context, InvalidArgument, ResourceExhausted
from gateway._core._taxonomy import taxonomy
from gateway._inference._classifier import preprocess_efficientnet
from gateway._inference._detection import Box, Detection
from gateway._inference._image import InvalidImage, decode_image
from gateway._inference._manifest import (
    Manifest,
    load_manifest,
    read_verified_model,
)
from gateway._inference._nanodet import postprocess_nanodet, preprocess_nanodet
from gateway._models import models_dir_or_default
from protos.edgeward.v1 import common_pb2, core_pb2

__all__ = [
    "CLASSIFIER",
    "DETECTOR",
    "AnswerStore",
    "CoreAnswer",
    "CoreEscalationSettings",
    "CoreModels",
    "EscalateService",
    "Rgb",
]

_log = structlog.get_logger(__name__)

#: Manifest names of the core's models, and the names answers carry.
DETECTOR = "core_nanodet_coco80"
CLASSIFIER = "core_efficientnet_lite2"
_PUBLIC_NAMES = {DETECTOR: "nanodet-coco80", CLASSIFIER: "efficientnet-lite2"}
_BOTH = "nanodet-coco80+efficientnet-lite2"

Rgb = npt.NDArray[np.uint8]


# ------------------------------------------------------------------------------ settings
class CoreEscalationSettings(BaseModel):
    """The core's ``[escalation]`` table: models, thresholds, bounds and the answer store."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models_dir: Path = Field(
        default=None,
        validate_default=True,
        description="Directory with the ONNX models and manifest.json (every file "
        "sha256-verified against it); unset: the installed edgeward-models package "
        "(the models/ directory in a checkout).",
    )
    providers: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="onnxruntime execution providers: auto, cpu or cuda."
    )
    intra_op_threads: int | None = Field(
        default=None, ge=1, description="Threads per model run; unset = the physical cores."
    )
    idle_release_s: float = Field(
        default=300.0,
        gt=0.0,
        description="A model unused this long is released from memory; the next escalation "
        "loads it again.",
    )
    calibration: Path = Field(
        default=CALIBRATION_FILE,
        description="JSON file of the calibrated combination (logistic weights over the "
        "models' evidence and the probability from which an object is answered; below it "
        "the answer is 'unknown'). Default: the one fit on the labelled photo set and "
        "shipped with the code (bench/quality.py --fit).",
    )
    max_image_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Largest escalated image accepted."
    )
    max_pixels: int = Field(
        default=16_000_000,
        ge=1,
        description="Largest escalated image in pixels, judged from its header before decoding.",
    )
    max_queue: int = Field(
        default=64,
        ge=1,
        description="Escalations waiting for the models at most; beyond it RESOURCE_EXHAUSTED "
        "(the gateway's outbox retries later).",
    )
    answer_store: Path | None = Field(
        default=None,
        description="SQLite file of answers by escalation id (idempotency across retries and "
        "core restarts); unset = in memory, lost on restart.",
    )
    max_stored_answers: int = Field(
        default=200_000, ge=1, description="Answers kept for idempotency at most (oldest go)."
    )
    answer_ttl_s: float = Field(
        default=7 * 86_400.0,
        gt=0.0,
        description="Seconds an answer is kept for retries; longer than any gateway's "
        "delivery_ttl_s.",
    )

    _default_models_dir = field_validator("models_dir", mode="before")(models_dir_or_default)


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
        square = _pad_square(image)
        raw = postprocess_nanodet(
            self._run(DETECTOR, preprocess_nanodet(square)),
            self._detector_labels,
            score_threshold=0.2,
        )
        detections = tuple(_unpad(det, image.shape[1], image.shape[0]) for det in raw)
        boxes = crop_boxes(detections)
        batch = [square, *(_pad_square(_crop(image, box)) for box in boxes)]
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


def _unpad(det: Detection, width: int, height: int) -> Detection:
    """A detection on the padded square mapped back to the ``width`` x ``height`` image."""
    side = max(width, height)
    left, top = (side - width) // 2, (side - height) // 2

    def fx(v: float) -> float:
        return min(1.0, max(0.0, (v * side - left) / width))

    def fy(v: float) -> float:
        return min(1.0, max(0.0, (v * side - top) / height))

    b = det.box
    box = Box(fx(b.x_min), fy(b.y_min), fx(b.x_max), fy(b.y_max))
    return Detection(det.label, det.class_id, det.score, box)


def _pad_square(image: Rgb) -> Rgb:
    """``image`` centred on a square grey canvas (114, as detectors are usually padded)."""
    height, width = image.shape[:2]
    side = max(height, width)
    if height == width:
        return image
    out = np.full((side, side, 3), 114, dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = image
    return out


# ------------------------------------------------------------------------------ store
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class AnswerStore:
    """Answers by (gateway id, escalation id) in SQLite (WAL); bounded in number and age.

    The key includes the gateway: an id is only meaningful to the gateway that made it, and
    one gateway must not read another's answer by guessing its id. Thread-safe.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        max_entries: int,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._lock = threading.Lock()
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._clock = clock
        self._writes = 0
        target = ":memory:" if path is None else str(path)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
        if path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS answers (gateway_id TEXT NOT NULL, escalation_id TEXT"
            " NOT NULL, result BLOB NOT NULL, created_at REAL NOT NULL,"
            " PRIMARY KEY (gateway_id, escalation_id))"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS answers_age ON answers (created_at)")

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def get(self, gateway_id: str, escalation_id: str) -> core_pb2.EscalationResult | None:
        """The stored result, or ``None``."""
        with self._lock:
            row = self._db.execute(
                "SELECT result FROM answers WHERE gateway_id = ? AND escalation_id = ?"
                " AND created_at > ?",
                (gateway_id, escalation_id, self._clock() - self._ttl_s),
            ).fetchone()
        return None if row is None else core_pb2.EscalationResult.FromString(bytes(row[0]))

    def put(
        self, gateway_id: str, escalation_id: str, result: core_pb2.EscalationResult
    ) -> core_pb2.EscalationResult:
        """Store ``result`` unless an answer is stored (first write wins); return the stored
        answer. Prune now and then."""
        now = self._clock()
        with self._lock:
            # First write wins; an expired answer counts as absent and is replaced.
            self._db.execute(
                "INSERT INTO answers (gateway_id, escalation_id, result, created_at)"
                " VALUES (?,?,?,?) ON CONFLICT (gateway_id, escalation_id) DO UPDATE"
                " SET result = excluded.result, created_at = excluded.created_at"
                " WHERE answers.created_at <= ?",
                (gateway_id, escalation_id, result.SerializeToString(), now, now - self._ttl_s),
            )
            row = self._db.execute(
                "SELECT result FROM answers WHERE gateway_id = ? AND escalation_id = ?",
                (gateway_id, escalation_id),
            ).fetchone()
            self._writes += 1
            if self._writes % 256 == 0:
                self._prune(now)
        return result if row is None else core_pb2.EscalationResult.FromString(bytes(row[0]))

    def _prune(self, now: float) -> None:
        self._db.execute("DELETE FROM answers WHERE created_at <= ?", (now - self._ttl_s,))
        self._db.execute(
            "DELETE FROM answers WHERE rowid IN (SELECT rowid FROM answers"
            " ORDER BY created_at DESC LIMIT -1 OFFSET ?)",
            (self._max_entries,),
        )

    def count(self) -> int:
        """Answers stored."""
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM answers").fetchone()
        return int(n)


# ------------------------------------------------------------------------------ service
class EscalateService:
    """The ``Core.Escalate`` handler (:class:`gateway._core.EscalateHandler`).

    ``async with`` it (``CoreServer`` does) to load the manifest, start the model thread and
    open the answer store. The caller is already known to be a gateway (``gateway``, from the
    TLS peer certificate); this handler checks the request's bounds, then answers from the
    store or from the models, at most one model run per (gateway, escalation id).
    """

    def __init__(
        self,
        settings: CoreEscalationSettings,
        *,
        models: CoreModels | None = None,
        store: Answers | None = None,
        answers_url: str | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.models = models or CoreModels(settings)
        self._store = store
        # A PostgreSQL URL (the replicated core's registry): answers shared by every replica.
        self._answers_url = answers_url
        self._wall = wall_clock
        self._inflight: dict[tuple[str, str], asyncio.Future[core_pb2.EscalationResult]] = {}
        self._stack = contextlib.AsyncExitStack()

    @property
    def store(self) -> Answers:
        """The answer store (open inside the context manager)."""
        assert self._store is not None  # noqa: S101 - opened in __aenter__
        return self._store

    async def __aenter__(self) -> Self:
        s = self.settings
        if self._store is None:
            if self._answers_url is not None:
                self._store = await asyncio.to_thread(
                    PostgresAnswerStore,
                    self._answers_url,
                    max_entries=s.max_stored_answers,
                    ttl_s=s.answer_ttl_s,
                    clock=self._wall,
                )
            else:
                self._store = AnswerStore(
                    s.answer_store,
                    max_entries=s.max_stored_answers,
                    ttl_s=s.answer_ttl_s,
                    clock=self._wall,
                )
            self._stack.callback(self._store.close)
        await self._stack.enter_async_context(self.models)
        _log.info(
            "escalation enabled",
            models=[DETECTOR, CLASSIFIER],
            idle_release_s=s.idle_release_s,
            answer_store=(
                pki.redacted_url(self._answers_url)
                if self._answers_url is not None
                else str(s.answer_store or "memory")
            ),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def __call__(
        self,
        request: core_pb2.EscalationRequest,
        context: Context,
        *,
        gateway: pki.Identity,
    ) -> core_pb2.EscalationResult:
        """Answer one escalation from gateway ``gateway`` (identity from its certificate)."""
        escalation_id = request.escalation_id
        if not _ID_PATTERN.fullmatch(escalation_id):
            raise InvalidArgument("escalation_id must be 1-128 characters of [A-Za-z0-9._-]")
        if len(request.image) > self.settings.max_image_bytes:
            raise InvalidArgument(
                f"image is {len(request.image)} bytes, limit {self.settings.max_image_bytes}"
            )
        structlog.contextvars.bind_contextvars(
            escalation_id=escalation_id, device_id=request.device_id
        )
        key = (gateway.id, escalation_id)
        stored = await asyncio.to_thread(self.store.get, *key)
        if stored is not None:
            _log.info("escalation replayed", gateway_id=gateway.id)
            return stored
        running = self._inflight.get(key)
        if running is None:
            if len(self._inflight) >= self.settings.max_queue:
                raise ResourceExhausted("core models are busy; retry later")
            image, full = bytes(request.image), request.is_full_frame
            edge_label, edge_score = request.edge_label, request.edge_score
            frame_id = request.frame_id
            running = self.models.run_in_worker(
                lambda: self._answer_sync(
                    key, image, full, frame_id=frame_id, edge=(edge_label, edge_score)
                )
            )
            self._inflight[key] = running
            running.add_done_callback(lambda _f: self._inflight.pop(key, None))
        # Shielded: a caller that goes away does not cancel the run; its result is stored
        # and the gateway's retry will get it without a second run.
        try:
            result = await asyncio.shield(running)
        except InvalidImage as exc:
            raise InvalidArgument(f"invalid image: {exc.reason}") from None
        a = result.answer
        _log.info(
            "escalation answered",
            gateway_id=gateway.id,
            label=a.label,
            score=round(a.score, 3),
            model=a.model_name,
            still_unknown=a.still_unknown,
            model_ms=round(result.model_ms, 2),
        )
        return result

    def _answer_sync(
        self,
        key: tuple[str, str],
        image: bytes,
        is_full_frame: bool,
        *,
        frame_id: str,
        edge: tuple[str, float],
    ) -> core_pb2.EscalationResult:
        """Decode, run the models and store the answer, all in the model thread."""
        # A retry that raced the previous call's store write finds the answer here.
        stored = self.store.get(*key)
        if stored is not None:
            return stored
        pixels = decode_image(image, max_pixels=self.settings.max_pixels)
        answer = self.models.identify_sync(pixels, is_full_frame=is_full_frame, edge=edge)
        tax = taxonomy()
        objects = [
            common_pb2.Detection(
                label=tax.edge_name(o.concept),
                score=o.probability,
                box=common_pb2.Box(
                    x_min=o.box.x_min, y_min=o.box.y_min, x_max=o.box.x_max, y_max=o.box.y_max
                ),
            )
            for o in answer.objects
        ]
        result = core_pb2.EscalationResult(
            answer=common_pb2.EscalationAnswer(
                escalation_id=key[1],
                frame_id=frame_id,
                label=answer.label,
                score=answer.score,
                model_name=answer.model_name,
                still_unknown=answer.still_unknown,
                edge_label=edge[0],
                edge_score=edge[1],
                objects=objects,
            ),
            model_ms=answer.model_ms,
        )
        # Another replica may have stored its answer first: reply with the stored one.
        return self.store.put(*key, result)
