"""Result types shared by the detectors, non-maximum suppression and resizing.

Boxes are always ``x_min, y_min, x_max, y_max`` normalised to 0..1 of the
*original* image: the same numbers whatever size the model ran at, and what
the wire contract's "normalised boxes" carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

__all__ = ["Box", "Detection", "check_rgb", "clip_box", "nms", "per_class_nms", "resize_rgb"]

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Box:
    """An axis-aligned box, normalised to 0..1 of the image's width and height."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float

    def to_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Return ``(x_min, y_min, x_max, y_max)`` in pixels of a ``width×height`` image."""
        return (
            round(self.x_min * width),
            round(self.y_min * height),
            round(self.x_max * width),
            round(self.y_max * height),
        )

    @property
    def area(self) -> float:
        """Area as a fraction of the image."""
        return max(0.0, self.x_max - self.x_min) * max(0.0, self.y_max - self.y_min)


@dataclass(frozen=True, slots=True)
class Detection:
    """One detected object: its label, the model's class index, score and box."""

    label: str
    class_id: int
    score: float
    box: Box


def check_rgb(image: npt.NDArray[np.uint8]) -> None:
    """Raise ``ValueError`` unless ``image`` is a non-empty ``H×W×3`` uint8 array."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")


def resize_rgb(
    image: npt.NDArray[np.uint8],
    width: int,
    height: int,
    *,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> npt.NDArray[np.uint8]:
    """Resize an RGB uint8 image with Pillow (no OpenCV dependency on the gateway)."""
    check_rgb(image)
    if image.shape[1] == width and image.shape[0] == height:
        return image
    resized = Image.fromarray(image, mode="RGB").resize((width, height), resample=resample)
    return np.asarray(resized, dtype=np.uint8)


def nms(boxes: FloatArray, scores: FloatArray, iou_threshold: float) -> npt.NDArray[np.intp]:
    """Greedy non-maximum suppression; return kept indices, best score first.

    ``boxes`` is ``[n, 4]`` as ``x_min, y_min, x_max, y_max``. Per-class NMS is
    done by the callers by offsetting each class's boxes so that boxes of
    different classes never overlap (one pass instead of one per class).
    """
    if boxes.shape[0] == 0:
        return np.zeros((0,), dtype=np.intp)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0)
        h = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0)
        inter = w * h
        union = areas[i] + areas[rest] - inter
        # A zero union only happens for two degenerate boxes; treat as no overlap.
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.intp)


def per_class_nms(
    boxes: FloatArray,
    scores: FloatArray,
    class_ids: npt.NDArray[np.intp],
    iou_threshold: float,
    max_detections: int,
) -> npt.NDArray[np.intp]:
    """NMS within each class; ``boxes`` normalised (coordinates below ~1)."""
    # Shift every class into its own region of the plane: boxes of two classes
    # can then never overlap, so one NMS pass suppresses within classes only.
    offsets = class_ids.astype(np.float32)[:, None] * np.float32(4.0)
    keep = nms(boxes + offsets, scores, iou_threshold)
    return keep[:max_detections]


def clip_box(x_min: float, y_min: float, x_max: float, y_max: float) -> Box:
    """Build a :class:`Box` clipped to the image (models predict past the edges)."""

    def c(v: float) -> float:
        return min(max(v, 0.0), 1.0)

    return Box(c(x_min), c(y_min), c(x_max), c(y_max))
