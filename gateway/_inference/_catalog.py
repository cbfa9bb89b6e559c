"""The edge's model catalog: each model loaded on first use, released when idle.

A gateway may serve regions that run different edge models (a region names its model; the
rest run the default). Holding every model in memory all the time wastes what a small edge
box has least of, so, as the core does with its models, :class:`EdgeModelCatalog` starts an
:class:`~gateway._inference.InferenceEngine` for a model on the first frame that needs it
and closes it after ``idle_release_s`` without frames (both logged). Closing drains: frames
already admitted are answered first, and an engine with frames in flight is never released.
A released model is loaded again, sha256-verified as always, by the next frame that needs it.

Every model name is checked against the manifest when the catalog is built, so a region
naming a model the gateway does not have stops the start-up, not a device's frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog

from ._engine import DEFAULT_MODEL, Frame, InferenceEngine, InferenceResult
from ._manifest import load_manifest

__all__ = ["EdgeModelCatalog", "UnknownEdgeModel"]

_log = structlog.get_logger(__name__)

EngineFactory = Callable[[str], InferenceEngine]


class UnknownEdgeModel(ValueError):
    """A region names an edge model the manifest does not list."""

    def __init__(self, region: str, model: str) -> None:
        super().__init__(
            f"region {region!r} names edge model {model!r}: not an edge model of the manifest"
        )
        self.region = region
        self.model = model


@dataclass(slots=True)
class _Slot:
    engine: InferenceEngine | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    busy: int = 0
    last_used: float = 0.0
    loads: int = 0


class EdgeModelCatalog:
    """Edge models by name, loaded on demand and released when idle (event-loop only).

    ``factory(name)`` builds an unopened engine for model ``name`` (the gateway passes one
    with its inference settings); ``region_models`` maps a region to the model it runs.
    """

    def __init__(
        self,
        factory: EngineFactory,
        *,
        models_dir: Path,
        default_model: str = DEFAULT_MODEL,
        region_models: Mapping[str, str] | None = None,
        idle_release_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if idle_release_s <= 0:
            raise ValueError("idle_release_s must be positive")
        manifest = load_manifest(models_dir)
        wanted = {"(default)": default_model, **dict(region_models or {})}
        for region, model in wanted.items():
            entry = manifest.models.get(model)
            # The edge runs SSD detectors (OID labels, background class first) only.
            if entry is None or not entry.name.startswith("edge_"):
                raise UnknownEdgeModel(region, model)
        self._factory = factory
        self._default = default_model
        self._regions = dict(region_models or {})
        self._idle_s = idle_release_s
        self._clock = clock
        self._slots: dict[str, _Slot] = {name: _Slot() for name in set(wanted.values())}
        self._reaper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Self:
        interval = min(30.0, max(0.05, self._idle_s / 4))
        self._reaper = asyncio.create_task(self._reap(interval), name="edgeward-edge-reaper")
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
        for name, slot in self._slots.items():
            async with slot.lock:
                if slot.engine is not None:
                    await slot.engine.__aexit__(None, None, None)
                    slot.engine = None
                    _log.info("edge model released", model=name, reason="shutdown")

    async def _reap(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.release_idle()

    # ------------------------------------------------------------------ use
    def model_for(self, region: str | None) -> str:
        """The model a device of ``region`` runs (the default where the region names none)."""
        return self._regions.get(region or "", self._default)

    def loaded(self) -> frozenset[str]:
        """Names of the models in memory now."""
        return frozenset(name for name, slot in self._slots.items() if slot.engine is not None)

    def loads(self, name: str) -> int:
        """How many times model ``name`` has been loaded."""
        return self._slots[name].loads

    async def _engine(self, name: str) -> InferenceEngine:
        slot = self._slots[name]
        async with slot.lock:  # concurrent first frames load the model once
            if slot.engine is None:
                started = time.perf_counter()
                engine = self._factory(name)
                await engine.__aenter__()
                slot.engine = engine
                slot.loads += 1
                _log.info(
                    "edge model loaded",
                    model=name,
                    provider=engine.provider,
                    load_ms=round((time.perf_counter() - started) * 1000, 1),
                    loads=slot.loads,
                )
            slot.busy += 1
            slot.last_used = self._clock()
            return slot.engine

    async def detect(
        self, image: bytes, *, region: str | None = None, deadline: float | None = None
    ) -> InferenceResult:
        """Run the model of ``region`` on one encoded frame (loading it if needed)."""
        result, _frame = await self.detect_with_frame(image, region=region, deadline=deadline)
        return result

    async def detect_with_frame(
        self,
        image: bytes,
        *,
        region: str | None = None,
        deadline: float | None = None,
        key: str | None = None,
    ) -> tuple[InferenceResult, Frame | None]:
        """Like :meth:`detect`, with the decoded frame (as the engine's method of that name);
        ``key`` (the device id) gives the frame its device's turn in the micro-batcher."""
        name = self.model_for(region)
        slot = self._slots[name]
        engine = await self._engine(name)
        try:
            return await engine.detect_with_frame(image, deadline=deadline, key=key)
        finally:
            slot.busy -= 1
            slot.last_used = self._clock()

    async def release_idle(self) -> list[str]:
        """Close every model unused for ``idle_release_s`` and not busy; return their names."""
        released = []
        now = self._clock()
        for name, slot in self._slots.items():
            if slot.engine is None or slot.busy or now - slot.last_used < self._idle_s:
                continue
            async with slot.lock:
                engine, slot.engine = slot.engine, None
                if engine is None or slot.busy:  # taken meanwhile
                    slot.engine = engine
                    continue
                await engine.__aexit__(None, None, None)
            released.append(name)
            _log.info("edge model released", model=name, idle_s=round(now - slot.last_used))
        return released
