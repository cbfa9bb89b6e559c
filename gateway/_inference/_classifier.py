"""Core classifier: pre- and post-processing for EfficientNet-Lite2 (ImageNet-1k)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

from ._detection import check_rgb

__all__ = ["EFFICIENTNET_INPUT_SIZE", "Classification", "preprocess_efficientnet", "top_k"]

EFFICIENTNET_INPUT_SIZE = 260
# The usual ImageNet evaluation crop: resize so the crop is 87.5 % of the shorter side.
_CROP_FRACTION = 0.875


@dataclass(frozen=True, slots=True)
class Classification:
    """One class of a classifier's answer."""

    label: str
    class_id: int
    score: float


def _center_crop(image: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.float32]:
    check_rgb(image)
    height, width = image.shape[:2]
    short = round(size / _CROP_FRACTION)
    scale = short / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    pil = Image.fromarray(image, mode="RGB").resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    crop = np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.float32)
    # EfficientNet-Lite was trained on (x - 127) / 128 (roughly -1..1), not ImageNet mean/std.
    return (crop - np.float32(127.0)) / np.float32(128.0)


def preprocess_efficientnet(
    images: Sequence[npt.NDArray[np.uint8]], *, size: int = EFFICIENTNET_INPUT_SIZE
) -> npt.NDArray[np.float32]:
    """Turn RGB uint8 images into the ``[N,3,size,size]`` float input.

    Shorter side to ``size/0.875`` (bicubic), centre crop ``size``, ``(x-127)/128``.
    """
    if not images:
        raise ValueError("preprocess_efficientnet needs at least one image")
    batch = np.stack([_center_crop(image, size) for image in images])
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)


def top_k(
    logits: npt.NDArray[np.float32], labels: Sequence[str], *, k: int = 5
) -> list[tuple[Classification, ...]]:
    """Softmax over ``[N, classes]`` logits; return the ``k`` best classes per row."""
    if logits.ndim != 2 or logits.shape[1] != len(labels):
        raise ValueError(f"unexpected logits shape {logits.shape} for {len(labels)} labels")
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(k, logits.shape[1])
    results: list[tuple[Classification, ...]] = []
    for row in probs:
        best = np.argsort(-row, kind="stable")[:k]
        results.append(tuple(Classification(labels[int(i)], int(i), float(row[i])) for i in best))
    return results
