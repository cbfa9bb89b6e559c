"""Edge inference: what the gateway's gRPC and MQTT layers may use.

:class:`InferenceEngine` is the one entry point: ``async with InferenceEngine(models_dir=…)``,
then ``await engine.detect(jpeg_bytes, deadline=…)``. :class:`EdgeModelCatalog` holds one
engine per edge model, started on the first frame that needs it and closed when idle, with
the model each region runs. The ``_modules`` behind it (pre- and
post-processing, the manifest, sessions, the batcher) are private.

Errors raised per request::

    InvalidImage          too many bytes or pixels, not a JPEG/PNG, corrupt (INVALID_ARGUMENT)
    InferenceError
    ├── Overloaded        the bounded queue is full, answered at once (RESOURCE_EXHAUSTED)
    ├── DeadlineExceeded  the caller's deadline passed (DEADLINE_EXCEEDED)
    ├── ShuttingDown      the engine is closing (UNAVAILABLE)
    └── ProviderUnavailable   start-up only: providers="cuda" without a usable CUDA

Start-up also raises ``ModelIntegrityError`` when a model file does not match its manifest.
"""

from ._batcher import DeadlineExceeded, InferenceError, Overloaded, ShuttingDown
from ._cache import DEFAULT_MAX_DISTANCE, ResponseCache
from ._catalog import EdgeModelCatalog, UnknownEdgeModel
from ._detection import Box, Detection
from ._engine import (
    DEFAULT_MODEL,
    CacheKind,
    EngineObserver,
    InferenceEngine,
    InferenceResult,
)
from ._image import InvalidImage
from ._manifest import ModelIntegrityError
from ._runtime import ProviderChoice, ProviderUnavailable

__all__ = [
    "DEFAULT_MAX_DISTANCE",
    "DEFAULT_MODEL",
    "Box",
    "CacheKind",
    "DeadlineExceeded",
    "Detection",
    "EdgeModelCatalog",
    "EngineObserver",
    "InferenceEngine",
    "InferenceError",
    "InferenceResult",
    "InvalidImage",
    "ModelIntegrityError",
    "Overloaded",
    "ProviderChoice",
    "ProviderUnavailable",
    "ResponseCache",
    "ShuttingDown",
    "UnknownEdgeModel",
]
