"""``Core.Escalate``: the core's larger models answer what an edge gateway could not name.

Three modules, one job each:

- :mod:`gateway._core._escalate_models`: :class:`CoreModels` runs NanoDet (COCO-80) and
  EfficientNet-Lite2 (ImageNet-1k) on an escalated crop or frame and combines what they say
  into calibrated answers (:mod:`gateway._core._identify`), loading each model on first use
  and releasing it when idle;
- :mod:`gateway._core._escalate_answers`: :class:`AnswerStore` keeps every answer, keyed by
  (gateway, escalation id): a retry of an escalation whose reply was lost gets the stored
  answer and the models do not run again. Replicated cores keep the answers in their
  PostgreSQL registry instead (:class:`~gateway._core._escalate_answers.PostgresAnswerStore`,
  ``answers_url=``); the first answer stored is the one every replica replies with;
- here, the ``[escalation]`` table (:class:`CoreEscalationSettings`) and the handler,
  :class:`EscalateService`, which :class:`gateway._core.CoreServer` plugs in as
  ``escalate=``. The core service has already required a *gateway* identity from the TLS peer
  certificate (a device or another core is refused with ``PERMISSION_DENIED``); the handler
  bounds the request, decodes the image safely and answers. A retry that arrives while the
  first is still running waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

import pki
from gateway._core._escalate_answers import Answers, AnswerStore, PostgresAnswerStore
from gateway._core._escalate_models import (
    CLASSIFIER,
    DETECTOR,
    CoreAnswer,
    CoreModels,
)
from gateway._core._identify import CALIBRATION_FILE
from gateway._core._status import Context, InvalidArgument, ResourceExhausted
from gateway._core._taxonomy import taxonomy
from gateway._inference._image import InvalidImage, decode_image
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
]

_log = structlog.get_logger(__name__)

_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
        #: Runs in the model thread by key: the answer, and whether it was a stored one.
        self._inflight: dict[
            tuple[str, str], asyncio.Future[tuple[core_pb2.EscalationResult, bool]]
        ] = {}
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
        if self._inflight:
            # The model thread is busy: look the answer up beside it, so that a retry whose
            # reply was lost is answered at once instead of waiting behind other images.
            # When it is idle the lookup is left to that thread (``_answer_sync`` looks
            # first), which saves a hand-off to a thread and back on every first attempt.
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
            result, replayed = await asyncio.shield(running)
        except InvalidImage as exc:
            raise InvalidArgument(f"invalid image: {exc.reason}") from None
        if replayed:
            _log.info("escalation replayed", gateway_id=gateway.id)
            return result
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
    ) -> tuple[core_pb2.EscalationResult, bool]:
        """Look up, or decode, run the models and store, the answer in the model thread.

        Returns the answer and whether it was already stored (a retry, or one that raced
        the previous call's store write): then nothing is decoded and no model runs.
        """
        stored = self.store.get(*key)
        if stored is not None:
            return stored, True
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
        return self.store.put(*key, result), False
