"""Response cache: the same (or nearly the same) frame is answered without running the model.

A pet camera watching an empty room sends the same picture again and again, often re-encoded
(a new JPEG with a new timestamp in its EXIF, a little sensor noise), so an exact content hash
alone catches little. Two lookups, cheapest first:

- **exact**: sha256 of the encoded bytes, before anything is decoded;
- **perceptual**: a 64-bit difference hash (dHash) of the decoded frame: grayscale, shrunk to
  9×8, one bit per pair of horizontal neighbours (is the left one brighter?). It survives
  re-encoding, rescaling and mild noise, and changes when something moves in the picture.
  Two frames match when their hashes differ in at most ``max_distance`` bits (default 4 of
  64: re-encodes, halving and noise measured 0–2 bits on the test photos; different photos 19–38).

Entries are keyed by model name and version too, so an answer from another model is never
returned. A hit is the stored result itself (``from_cache`` set), with the ``result_id`` of the
model run it repeats: the gateway finds the escalation marks it gave that answer by it
(``gateway._grpc.EscalationMemory``), so a cached answer is the same answer, marks included.
Entries expire ``ttl`` seconds after they were stored, and the cache holds at most
``max_entries`` entries and about ``max_bytes`` bytes, evicting the least recently used first.

Thread-safe: every method takes one lock, so the event loop and worker threads may share a
cache. Lookups scan at most ``max_entries`` hashes of one model (microseconds for a thousand).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from PIL import Image

if TYPE_CHECKING:
    from ._engine import InferenceResult

__all__ = [
    "DEFAULT_MAX_DISTANCE",
    "ResponseCache",
    "content_digest",
    "difference_hash",
]

#: Hamming distance (bits of 64) up to which two frames count as the same picture.
DEFAULT_MAX_DISTANCE = 4

# Rough cost of one entry beyond its detections: key tuple, digest, OrderedDict slot,
# the result object. Only used to keep the byte bound honest, not to the byte.
_ENTRY_OVERHEAD = 400
_DETECTION_OVERHEAD = 200


def content_digest(data: bytes) -> bytes:
    """The exact-match key of an encoded frame: its sha256."""
    return hashlib.sha256(data).digest()


def difference_hash(frame: npt.NDArray[np.uint8]) -> int:
    """The 64-bit dHash of an ``H×W×3`` RGB frame (see the module docstring)."""
    # BOX averages every source pixel into the 9×8 grid, so sensor noise and JPEG blocking
    # average out instead of being sampled.
    small = Image.fromarray(frame, mode="RGB").convert("L").resize((9, 8), Image.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.int16)
    bits = (pixels[:, :-1] > pixels[:, 1:]).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


@dataclass(frozen=True, slots=True)
class _Key:
    model: str
    version: str
    digest: bytes


@dataclass(slots=True)
class _Entry:
    result: InferenceResult
    dhash: int | None
    stored_at: float
    size: int


def _approx_size(result: InferenceResult) -> int:
    return _ENTRY_OVERHEAD + sum(_DETECTION_OVERHEAD + len(d.label) for d in result.detections)


class ResponseCache:
    """Exact and perceptual cache of inference results, with a TTL and a memory bound.

    ``clock`` returns seconds (``time.monotonic`` by default; tests pass a fake one).
    ``max_distance`` is the dHash Hamming distance still counted as a match; 0 makes the
    perceptual lookup accept only identical hashes, and a negative value turns it off.
    """

    def __init__(
        self,
        *,
        ttl: float = 10.0,
        max_entries: int = 4096,
        max_bytes: int = 4 * 1024 * 1024,
        max_distance: int = DEFAULT_MAX_DISTANCE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be positive")
        if max_distance > 64:
            raise ValueError(f"max_distance is at most 64 bits, got {max_distance}")
        self._ttl = ttl
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._max_distance = max_distance
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def approx_bytes(self) -> int:
        """Approximate memory held by the entries."""
        with self._lock:
            return self._bytes

    def get_exact(self, model: str, version: str, digest: bytes) -> InferenceResult | None:
        """The result stored for exactly these encoded bytes (``content_digest``), if fresh."""
        key = _Key(model, version, digest)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if self._expired(entry, self._clock()):
                self._remove(key)
                return None
            self._entries.move_to_end(key)
            return dataclasses.replace(entry.result, from_cache=True)

    def get_similar(self, model: str, version: str, dhash: int) -> InferenceResult | None:
        """The fresh result of the closest frame within ``max_distance`` bits, if any."""
        if self._max_distance < 0:
            return None
        with self._lock:
            now = self._clock()
            best: tuple[int, _Key] | None = None
            stale: list[_Key] = []
            # Newest first, so that among equally close frames the latest answer wins.
            for key, entry in reversed(self._entries.items()):
                if key.model != model or key.version != version or entry.dhash is None:
                    continue
                if self._expired(entry, now):
                    stale.append(key)
                    continue
                distance = (entry.dhash ^ dhash).bit_count()
                if distance <= self._max_distance and (best is None or distance < best[0]):
                    best = (distance, key)
                    if distance == 0:
                        break
            for key in stale:
                self._remove(key)
            if best is None:
                return None
            self._entries.move_to_end(best[1])
            return dataclasses.replace(self._entries[best[1]].result, from_cache=True)

    def put(
        self,
        model: str,
        version: str,
        digest: bytes,
        result: InferenceResult,
        *,
        dhash: int | None = None,
    ) -> None:
        """Store ``result`` for the frame with this content digest (and dHash, if known)."""
        key = _Key(model, version, digest)
        stored = dataclasses.replace(result, from_cache=False)
        entry = _Entry(result=stored, dhash=dhash, stored_at=self._clock(), size=0)
        entry.size = _approx_size(stored) + len(digest) + len(model) + len(version)
        with self._lock:
            if key in self._entries:
                self._remove(key)
            self._entries[key] = entry
            self._bytes += entry.size
            while self._entries and (
                len(self._entries) > self._max_entries or self._bytes > self._max_bytes
            ):
                oldest = next(iter(self._entries))
                self._remove(oldest)

    def clear(self) -> None:
        """Drop every entry (after a model change, for instance)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _expired(self, entry: _Entry, now: float) -> bool:
        # Fresh for exactly ttl seconds: an entry stored at t is served until t + ttl.
        return now >= entry.stored_at + self._ttl

    def _remove(self, key: _Key) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.size
