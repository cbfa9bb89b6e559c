"""Core detector: pre- and post-processing for NanoDet (COCO-80, 416 px).

The converted tfjs graph has six outputs whose names say nothing (``Identity_3:0``
…), so they are told apart by shape: for each stride 8/16/32 a class tensor
``[1, n, 80]`` (already sigmoid) and a regression tensor ``[1, n, 44]`` (four
sides × 11-bin distributions, the Generalized Focal Loss head).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ._detection import Box, Detection, check_rgb, clip_box, per_class_nms, resize_rgb

__all__ = [
    "NANODET_INPUT_SIZE",
    "pad_square",
    "postprocess_nanodet",
    "preprocess_nanodet",
    "unpad_square",
]

NANODET_INPUT_SIZE = 416
_REG_BINS = 11  # reg_max 10 → 11 bins per side
# The model was trained on OpenCV-loaded (BGR) images with these per-channel
# statistics, in B, G, R order. RGB/255 input (as some JS wrappers do) gives garbage.
_MEAN_BGR = np.array([103.53, 116.28, 123.675], dtype=np.float32)
_STD_BGR = np.array([57.375, 57.12, 58.395], dtype=np.float32)


def preprocess_nanodet(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """Turn one RGB uint8 image into NanoDet's ``[1,3,416,416]`` BGR normalised input.

    The image is stretched to 416×416 so normalised boxes map back directly.
    The graph has a fixed batch of 1 (its reshapes fold the batch).
    """
    check_rgb(image)
    resized = resize_rgb(image, NANODET_INPUT_SIZE, NANODET_INPUT_SIZE)
    bgr = resized[:, :, ::-1].astype(np.float32)
    normalised: npt.NDArray[np.float32] = (bgr - _MEAN_BGR) / _STD_BGR
    return np.ascontiguousarray(normalised.transpose(2, 0, 1)[None], dtype=np.float32)


def pad_square(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """``image`` centred on a square grey canvas (114, as detectors are usually padded).

    NanoDet was trained on frames resized with their aspect ratio kept: stretched to its
    square input, a 3:2 photo of a cat reads as a person (``tests/data/photos/chelsea.jpg``).
    """
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    out = np.full((side, side, 3), 114, dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = image
    return out


def unpad_square(det: Detection, width: int, height: int) -> Detection:
    """A detection on :func:`pad_square`'s canvas mapped back to the ``width×height`` image."""
    side = max(width, height)
    left, top = (side - width) // 2, (side - height) // 2

    def fx(v: float) -> float:
        return min(1.0, max(0.0, (v * side - left) / width))

    def fy(v: float) -> float:
        return min(1.0, max(0.0, (v * side - top) / height))

    b = det.box
    box = Box(fx(b.x_min), fy(b.y_min), fx(b.x_max), fy(b.y_max))
    return Detection(det.label, det.class_id, det.score, box)


def _softmax(x: npt.NDArray[np.float32], axis: int) -> npt.NDArray[np.float32]:
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    out: npt.NDArray[np.float32] = (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)
    return out


def _pair_outputs(
    outputs: Sequence[npt.NDArray[np.float32]], num_classes: int
) -> list[tuple[int, npt.NDArray[np.float32], npt.NDArray[np.float32]]]:
    """Group the six outputs into (stride, scores [n,C], regression [n,44]) by shape."""
    scores: dict[int, npt.NDArray[np.float32]] = {}
    regs: dict[int, npt.NDArray[np.float32]] = {}
    for out in outputs:
        if out.ndim != 3 or out.shape[0] != 1:
            raise ValueError(f"unexpected NanoDet output shape {out.shape}")
        n, width = out.shape[1], out.shape[2]
        if width == num_classes:
            scores[n] = out[0]
        elif width == 4 * _REG_BINS:
            regs[n] = out[0]
        else:
            raise ValueError(f"unexpected NanoDet output shape {out.shape}")
    if scores.keys() != regs.keys() or not scores:
        raise ValueError("NanoDet outputs do not pair up by size")
    levels = []
    for n in sorted(scores, reverse=True):  # largest map = finest stride first
        side = math.isqrt(n)
        if side * side != n or NANODET_INPUT_SIZE % side:
            raise ValueError(f"NanoDet feature map of {n} cells is not square")
        levels.append((NANODET_INPUT_SIZE // side, scores[n], regs[n]))
    return levels


def postprocess_nanodet(
    outputs: Sequence[npt.NDArray[np.float32]],
    labels: Sequence[str],
    *,
    score_threshold: float = 0.35,
    iou_threshold: float = 0.5,
    max_detections: int = 50,
) -> tuple[Detection, ...]:
    """Decode NanoDet's six outputs (any order) into detections for one image."""
    all_boxes: list[npt.NDArray[np.float32]] = []
    all_scores: list[npt.NDArray[np.float32]] = []
    all_cls: list[npt.NDArray[np.intp]] = []
    for stride, scores, reg in _pair_outputs(outputs, len(labels)):
        cell, cls = np.nonzero(scores >= score_threshold)
        if cell.size == 0:
            continue
        side = NANODET_INPUT_SIZE // stride
        # Cells are row-major: index = y * side + x; centre of the cell in pixels.
        px = ((cell % side + 0.5) * stride).astype(np.float32)
        py = ((cell // side + 0.5) * stride).astype(np.float32)
        dist = _softmax(reg[cell].reshape(-1, 4, _REG_BINS), axis=2)
        # Expected bin index × stride = distance to the left, top, right, bottom side.
        ltrb = (dist @ np.arange(_REG_BINS, dtype=np.float32)) * stride
        level_boxes = np.stack(
            [px - ltrb[:, 0], py - ltrb[:, 1], px + ltrb[:, 2], py + ltrb[:, 3]], axis=1
        ) / np.float32(NANODET_INPUT_SIZE)
        all_boxes.append(level_boxes.astype(np.float32))
        all_scores.append(scores[cell, cls])
        all_cls.append(cls)
    if not all_boxes:
        return ()
    boxes = np.concatenate(all_boxes).astype(np.float32, copy=False)
    cand_scores = np.concatenate(all_scores).astype(np.float32, copy=False)
    cls_ids = np.concatenate(all_cls)
    keep = per_class_nms(boxes, cand_scores, cls_ids, iou_threshold, max_detections)
    return tuple(
        Detection(
            label=labels[int(cls_ids[k])],
            class_id=int(cls_ids[k]),
            score=float(cand_scores[k]),
            box=clip_box(*(float(v) for v in boxes[k])),
        )
        for k in keep
    )
