"""The edge's model catalog: each model loaded on first use, released when idle.

A gateway may serve regions that run different edge models (``inference.region_models``
names a region's model; the rest run ``inference.model``). Holding every model in memory all
the time wastes what a small edge box has least of, so, as the core does with its models,
:class:`EdgeModelCatalog` starts an :class:`~gateway._inference.InferenceEngine` for a model
on the first frame that needs it and closes it after ``idle_release_s`` without frames (both
logged and counted). Closing drains: frames already admitted are answered first, and an
engine with frames in flight is never released. A released model is loaded again,
sha256-verified as always, by the next frame that needs it; frames that arrive while it loads
(or while it is being released) wait for it, within their deadline, instead of failing.

Every model name is checked against the manifest when the catalog is built, and every model
file against its sha256 when the catalog is entered, so a region naming a model the gateway
does not have, or a file that was changed, stops the start-up, not a device's frame. A load
that fails later (the file changed while the gateway ran) fails the frames that wait for it
with :class:`~gateway.errors.InferenceError` (``UNAVAILABLE``) and is not retried for
``retry_after_s``, so a broken file is not read and hashed again for every frame.
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

from gateway._models import EDGE_DETECTORS
from gateway.errors import ConfigError, DeadlineExceeded, InferenceError, ShuttingDown

from ._engine import DEFAULT_MODEL, Frame, InferenceEngine, InferenceResult
from ._manifest import load_manifest, read_verified_model

__all__ = ["DEFAULT_REGION", "EdgeModelCatalog", "UnknownEdgeModel"]

_log = structlog.get_logger(__name__)

EngineFactory = Callable[[str], InferenceEngine]

#: The pseudo-region of the default model in :class:`UnknownEdgeModel`.
DEFAULT_REGION = "(default)"


class UnknownEdgeModel(ConfigError, ValueError):
    """A region (or the default) names a model that is not an edge detector of the manifest.

    ``available`` lists the manifest's models the edge can run.
    """

    def __init__(self, region: str, model: str, available: tuple[str, ...]) -> None:
        which = "the default model" if region == DEFAULT_REGION else f"region {region!r}"
        super().__init__(
            f"{which} names edge model {model!r}, which is not an edge detector of the "
            f"manifest; its edge detectors are: {', '.join(available) or '(none)'}"
        )
        self.region = region
        self.model = model
        self.available = available


def _region_key(name: str) -> str:
    # Registry spelling (``home-eu``); an environment variable can only say ``home_eu``.
    return name.replace("_", "-")


@dataclass(slots=True)
class _Slot:
    engine: InferenceEngine | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    loading: asyncio.Task[InferenceEngine] | None = None
    busy: int = 0
    last_used: float = 0.0
    loads: int = 0
    releases: int = 0
    failed_until: float = 0.0
    failure: str = ""


class EdgeModelCatalog:
    """Edge models by name, loaded on demand and released when idle (event-loop only).

    ``factory(name)`` builds an unopened engine for model ``name`` (the gateway passes one
    with its inference settings and shared cache); ``region_models`` maps a region to the
    model it runs. A device's model is its region's, else ``gateway_region``'s, else
    ``default_model``: the same fallback as the escalation policy, so a device judged by the
    gateway region's policy is served by that region's model. Satisfies the front door's
    ``Detector`` (:meth:`detect_with_frame`).
    """

    def __init__(
        self,
        factory: EngineFactory,
        *,
        models_dir: Path,
        default_model: str = DEFAULT_MODEL,
        region_models: Mapping[str, str] | None = None,
        gateway_region: str | None = None,
        idle_release_s: float = 300.0,
        retry_after_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if idle_release_s <= 0:
            raise ValueError("idle_release_s must be positive")
        self._manifest = manifest = load_manifest(models_dir)
        available = tuple(sorted(n for n in manifest.models if n in EDGE_DETECTORS))
        regions = {_region_key(r): m for r, m in (region_models or {}).items()}
        for region, model in {DEFAULT_REGION: default_model, **regions}.items():
            if model not in available:
                raise UnknownEdgeModel(region, model, available)
        self._factory = factory
        self._default = default_model
        self._regions = regions
        self._gateway_region = None if gateway_region is None else _region_key(gateway_region)
        self._idle_s = idle_release_s
        self._retry_s = retry_after_s
        self._clock = clock
        names = {default_model, *regions.values()}
        self._slots: dict[str, _Slot] = {name: _Slot() for name in sorted(names)}
        self._reaper: asyncio.Task[None] | None = None
        self._open = False
        self._provider = ""

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Self:
        # Hashing the files (tens of MB) is not work for the event loop.
        await asyncio.to_thread(self._verify)
        interval = min(30.0, max(0.05, self._idle_s / 4))
        self._reaper = asyncio.create_task(self._reap(interval), name="edgeward-edge-reaper")
        self._open = True
        return self

    def _verify(self) -> None:
        for name in self._slots:
            read_verified_model(self._manifest, name)  # raises ModelIntegrityError

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for name, slot in self._slots.items():
            async with slot.lock:
                if slot.loading is not None:
                    with contextlib.suppress(Exception):
                        await slot.loading
                if slot.engine is not None:
                    await slot.engine.__aexit__(None, None, None)
                    slot.engine = None
                    slot.releases += 1
                    _log.info("edge model released", model=name, reason="shutdown")

    async def _reap(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.release_idle()

    # ------------------------------------------------------------------ what runs where
    @property
    def default_model(self) -> str:
        """The model of devices whose region (and the gateway's) names none."""
        return self._default

    def model_for(self, region: str | None) -> str:
        """The model a device of ``region`` runs: its region's, the gateway region's, or
        the default."""
        if region is not None and _region_key(region) in self._regions:
            return self._regions[_region_key(region)]
        if self._gateway_region is not None and self._gateway_region in self._regions:
            return self._regions[self._gateway_region]
        return self._default

    def labels(self, name: str) -> tuple[str, ...]:
        """Every label model ``name`` can give (from the manifest; loads nothing)."""
        return self._manifest.entry(name).labels

    def loaded(self) -> frozenset[str]:
        """Names of the models in memory now."""
        return frozenset(name for name, slot in self._slots.items() if slot.engine is not None)

    def loads(self, name: str) -> int:
        """How many times model ``name`` has been loaded."""
        return self._slots[name].loads

    def counters(self) -> dict[str, float | dict[str, float]]:
        """Loads and releases per model (exported as ``edgeward_gateway_edge_model_*``)."""
        return {
            "loads": {n: float(s.loads) for n, s in self._slots.items()},
            "releases": {n: float(s.releases) for n, s in self._slots.items()},
        }

    @property
    def provider(self) -> str:
        """The execution provider of the model loaded last (``""`` before any load)."""
        return self._provider

    def queue_depth(self) -> int:
        """Frames admitted to the loaded models and not yet in a model run."""
        return sum(s.engine.queue_depth() for s in self._slots.values() if s.engine is not None)

    # ------------------------------------------------------------------ use
    async def preload(self, name: str | None = None) -> None:
        """Load model ``name`` (the default model) now instead of on its first frame; it is
        released when idle like any other."""
        slot = self._slots[name or self._default]
        await self._acquire(name or self._default, slot)
        self._done(slot)

    async def _acquire(self, name: str, slot: _Slot) -> InferenceEngine:
        """The engine of ``name``, loading it if needed; counts the caller as busy."""
        if not self._open:
            raise ShuttingDown("the gateway is not accepting frames")
        async with slot.lock:  # concurrent first frames load the model once
            if slot.engine is None:
                if self._clock() < slot.failed_until:
                    raise InferenceError(f"edge model {name} unavailable: {slot.failure}")
                if slot.loading is None:
                    slot.loading = asyncio.create_task(
                        self._load(name, slot), name=f"edgeward-load-{name}"
                    )
                    # Retrieved even when every waiter has given up (no "never retrieved").
                    slot.loading.add_done_callback(
                        lambda t: None if t.cancelled() else t.exception()
                    )
                # Shielded: a caller that gives up (its deadline, a cut call) leaves the load
                # running for the frames behind it; the load stores the engine in the slot.
                engine = await asyncio.shield(slot.loading)
            else:
                engine = slot.engine
            slot.busy += 1
            slot.last_used = self._clock()
            return engine

    async def _load(self, name: str, slot: _Slot) -> InferenceEngine:
        started = time.perf_counter()
        try:
            engine = self._factory(name)
            await engine.__aenter__()
        except Exception as exc:
            slot.failed_until = self._clock() + self._retry_s
            slot.failure = type(exc).__name__
            _log.error("edge model failed to load", model=name, error=str(exc))
            raise InferenceError(f"edge model {name} unavailable: {slot.failure}") from exc
        finally:
            slot.loading = None
        slot.engine = engine
        slot.loads += 1
        self._provider = engine.provider
        _log.info(
            "edge model loaded",
            model=name,
            provider=engine.provider,
            load_ms=round((time.perf_counter() - started) * 1000, 1),
            loads=slot.loads,
        )
        return engine

    def _done(self, slot: _Slot) -> None:
        slot.busy -= 1
        slot.last_used = self._clock()

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
        deadline: float | None = None,
        key: str | None = None,
        region: str | None = None,
    ) -> tuple[InferenceResult, Frame | None]:
        """Like :meth:`detect`, with the decoded frame (as the engine's method of that name);
        ``key`` (the device id) gives the frame its device's turn in the micro-batcher.

        Waiting for the model to load counts against ``deadline``.
        """
        name = self.model_for(region)
        slot = self._slots[name]
        timeout = None if deadline is None else deadline - time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                engine = await self._acquire(name, slot)
        except TimeoutError:
            raise DeadlineExceeded("deadline passed while the model was loading") from None
        try:
            return await engine.detect_with_frame(image, deadline=deadline, key=key)
        finally:
            self._done(slot)

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
                # Frames arriving now wait on the lock, then load the model again.
                await engine.__aexit__(None, None, None)
                slot.releases += 1
            released.append(name)
            _log.info("edge model released", model=name, idle_s=round(now - slot.last_used))
        return released
