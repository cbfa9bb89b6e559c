"""ResponseCache: exact and perceptual matches, model keying, TTL and the memory bound."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from gateway import Box, Detection, InferenceResult, ResponseCache
from gateway._inference._cache import content_digest, difference_hash
from gateway._inference._image import decode_image

PHOTOS = Path(__file__).resolve().parents[1] / "data" / "photos"
MODEL, VERSION = "edge_ssd_mobilenetv2_oid24", "0.4.1675468480"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _result(label: str = "Cat") -> InferenceResult:
    return InferenceResult(
        detections=(Detection(label, 17, 0.85, Box(0.1, 0.2, 0.8, 0.9)),),
        model_name=MODEL,
        model_version=VERSION,
        inference_ms=20.0,
        from_cache=False,
        width=451,
        height=300,
    )


def _frame(name: str) -> npt.NDArray[np.uint8]:
    return decode_image((PHOTOS / name).read_bytes(), max_pixels=10_000_000)


def _reencode(frame: npt.NDArray[np.uint8], quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, "JPEG", quality=quality)
    return out.getvalue()


def _store(cache: ResponseCache, photo: str, result: InferenceResult | None = None) -> None:
    data = (PHOTOS / photo).read_bytes()
    cache.put(
        MODEL,
        VERSION,
        content_digest(data),
        result or _result(),
        dhash=difference_hash(_frame(photo)),
    )


def test_exact_hit_is_a_copy_marked_from_cache() -> None:
    cache = ResponseCache()
    original = _result()
    data = (PHOTOS / "chelsea.jpg").read_bytes()
    cache.put(MODEL, VERSION, content_digest(data), original)
    hit = cache.get_exact(MODEL, VERSION, content_digest(data))
    assert hit is not None
    assert hit.from_cache
    assert hit.detections == original.detections
    assert not original.from_cache
    assert cache.get_exact(MODEL, VERSION, content_digest(data + b"\0")) is None


def test_perceptual_hit_on_reencoded_and_noisy_frame() -> None:
    cache = ResponseCache()
    _store(cache, "chelsea.jpg")
    frame = _frame("chelsea.jpg")
    reencoded = decode_image(_reencode(frame, 60), max_pixels=10_000_000)
    noise = np.random.default_rng(7).normal(0, 6, frame.shape)
    noisy = np.clip(frame.astype(np.float64) + noise, 0, 255).astype(np.uint8)
    for variant in (reencoded, noisy):
        hit = cache.get_similar(MODEL, VERSION, difference_hash(variant))
        assert hit is not None
        assert hit.from_cache
        assert hit.detections[0].label == "Cat"


@pytest.mark.parametrize("other", ["dog.jpg", "coffee.jpg", "person.jpg", "motorcycle.jpg"])
def test_different_photo_misses(other: str) -> None:
    cache = ResponseCache()
    _store(cache, "chelsea.jpg")
    assert cache.get_similar(MODEL, VERSION, difference_hash(_frame(other))) is None


def test_closest_frame_wins() -> None:
    cache = ResponseCache(max_distance=64)  # everything matches: only the ranking decides
    _store(cache, "chelsea.jpg", _result("Cat"))
    _store(cache, "dog.jpg", _result("Dog"))
    hit = cache.get_similar(MODEL, VERSION, difference_hash(_frame("chelsea.jpg")))
    assert hit is not None
    assert hit.detections[0].label == "Cat"


def test_perceptual_lookup_can_be_turned_off() -> None:
    cache = ResponseCache(max_distance=-1)
    _store(cache, "chelsea.jpg")
    assert cache.get_similar(MODEL, VERSION, difference_hash(_frame("chelsea.jpg"))) is None


def test_another_model_or_version_never_matches() -> None:
    cache = ResponseCache()
    _store(cache, "chelsea.jpg")
    digest = content_digest((PHOTOS / "chelsea.jpg").read_bytes())
    dhash = difference_hash(_frame("chelsea.jpg"))
    assert cache.get_exact(MODEL, VERSION, digest) is not None
    for model, version in ((MODEL, "other-version"), ("core_nanodet_coco80", VERSION)):
        assert cache.get_exact(model, version, digest) is None
        assert cache.get_similar(model, version, dhash) is None


@pytest.mark.parametrize(("offset", "fresh"), [(-1.0, True), (0.0, False), (1.0, False)])
def test_ttl_boundary(offset: float, fresh: bool) -> None:
    clock = FakeClock()
    cache = ResponseCache(ttl=30.0, clock=clock)
    _store(cache, "chelsea.jpg")
    digest = content_digest((PHOTOS / "chelsea.jpg").read_bytes())
    dhash = difference_hash(_frame("chelsea.jpg"))
    clock.now += 30.0 + offset
    assert (cache.get_similar(MODEL, VERSION, dhash) is not None) is fresh
    assert (cache.get_exact(MODEL, VERSION, digest) is not None) is fresh
    if not fresh:
        assert len(cache) == 0  # expired entries are dropped when met


def test_eviction_by_count_is_least_recently_used() -> None:
    cache = ResponseCache(max_entries=3)
    digests = [bytes([i]) * 32 for i in range(4)]
    for d in digests[:3]:
        cache.put(MODEL, VERSION, d, _result())
    assert cache.get_exact(MODEL, VERSION, digests[0]) is not None  # 0 is now the newest
    cache.put(MODEL, VERSION, digests[3], _result())
    assert len(cache) == 3
    assert cache.get_exact(MODEL, VERSION, digests[1]) is None
    for d in (digests[0], digests[2], digests[3]):
        assert cache.get_exact(MODEL, VERSION, d) is not None


def test_eviction_by_bytes() -> None:
    cache = ResponseCache(max_bytes=5_000)
    many = InferenceResult(
        detections=tuple(Detection("Cat", 17, 0.9, Box(0, 0, 1, 1)) for _ in range(5)),
        model_name=MODEL,
        model_version=VERSION,
        inference_ms=1.0,
        from_cache=False,
        width=1,
        height=1,
    )
    for i in range(50):
        cache.put(MODEL, VERSION, i.to_bytes(32, "big"), many)
        assert cache.approx_bytes <= 5_000
    assert 0 < len(cache) < 50
    assert cache.get_exact(MODEL, VERSION, (49).to_bytes(32, "big")) is not None
    assert cache.get_exact(MODEL, VERSION, (0).to_bytes(32, "big")) is None


def test_replacing_an_entry_keeps_the_byte_count() -> None:
    cache = ResponseCache()
    cache.put(MODEL, VERSION, b"x" * 32, _result())
    size = cache.approx_bytes
    cache.put(MODEL, VERSION, b"x" * 32, _result())
    assert cache.approx_bytes == size
    assert len(cache) == 1
    cache.clear()
    assert (len(cache), cache.approx_bytes) == (0, 0)


def test_dhash_is_64_bits_and_stable() -> None:
    frame = _frame("dog.jpg")
    h = difference_hash(frame)
    assert 0 <= h < 2**64
    assert difference_hash(frame.copy()) == h
    flat = np.full((50, 80, 3), 128, dtype=np.uint8)
    assert difference_hash(flat) == 0  # no neighbour is brighter than the next


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="ttl"):
        ResponseCache(ttl=0)
    with pytest.raises(ValueError, match="max_entries"):
        ResponseCache(max_entries=0)
    with pytest.raises(ValueError, match="max_distance"):
        ResponseCache(max_distance=65)
