"""Edge detector: pre- and post-processing for Objectron's SSD-MobileNetV2 (OID-24).

The ONNX graph ends at the raw SSD heads (``box_encodings [N,1917,4]`` and
``class_predictions [N,1917,24]``); anchor decoding, sigmoid and NMS are done
here, as MediaPipe's ``TensorsToDetectionsCalculator`` does after the tflite.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ._detection import Detection, clip_box, per_class_nms, resize_rgb

__all__ = [
    "SSD_INPUT_SIZE",
    "SSD_NUM_ANCHORS",
    "postprocess_ssd",
    "preprocess_ssd",
    "ssd_anchors",
]

SSD_INPUT_SIZE = 300
SSD_NUM_ANCHORS = 1917

# MediaPipe objectron's SsdAnchorsCalculatorOptions (TF Object Detection API
# multiple-grid anchors): 6 layers, scales 0.2 → 0.95, 5 aspect ratios plus one
# interpolated scale per cell, 3 anchors in the lowest layer, offset 0.5.
_STRIDES = (16, 32, 64, 128, 256, 512)
_MIN_SCALE = 0.2
_MAX_SCALE = 0.95
_ASPECT_RATIOS = (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0)
_INTERPOLATED_RATIO = 1.0
_ANCHOR_OFFSET = 0.5
# Box-coder scales of the TF OD API's FasterRcnnBoxCoder (y, x, h, w).
_Y_SCALE = 10.0
_X_SCALE = 10.0
_H_SCALE = 5.0
_W_SCALE = 5.0


def _scale(index: int, count: int) -> float:
    return _MIN_SCALE + (_MAX_SCALE - _MIN_SCALE) * index / (count - 1)


@functools.cache
def ssd_anchors() -> npt.NDArray[np.float32]:
    """Return the ``[1917, 4]`` anchors as ``cy, cx, h, w``, normalised (read-only)."""
    rows: list[tuple[float, float, float, float]] = []
    layers = len(_STRIDES)
    for layer, stride in enumerate(_STRIDES):
        if layer == 0:
            # reduce_boxes_in_lowest_layer: scale 0.1 at ratio 1, then ratios 2 and 0.5.
            cell = [(0.1, 1.0), (_scale(0, layers), 2.0), (_scale(0, layers), 0.5)]
        else:
            s = _scale(layer, layers)
            cell = [(s, r) for r in _ASPECT_RATIOS]
            s_next = 1.0 if layer == layers - 1 else _scale(layer + 1, layers)
            cell.append((math.sqrt(s * s_next), _INTERPOLATED_RATIO))
        size = math.ceil(SSD_INPUT_SIZE / stride)
        for y in range(size):
            for x in range(size):
                cy = (y + _ANCHOR_OFFSET) / size
                cx = (x + _ANCHOR_OFFSET) / size
                for s, r in cell:
                    root = math.sqrt(r)
                    rows.append((cy, cx, s / root, s * root))
    anchors = np.asarray(rows, dtype=np.float32)
    if anchors.shape != (SSD_NUM_ANCHORS, 4):  # a wrong table would silently misplace boxes
        raise RuntimeError(f"SSD anchor table has shape {anchors.shape}")
    anchors.flags.writeable = False
    return anchors


def preprocess_ssd(images: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]:
    """Turn RGB uint8 images into the SSD's ``[N,300,300,3]`` float input (``x/127.5-1``).

    Images are stretched to 300×300, as MediaPipe feeds this model; the
    normalised boxes then map straight back onto the original image.
    """
    if not images:
        raise ValueError("preprocess_ssd needs at least one image")
    batch = np.empty((len(images), SSD_INPUT_SIZE, SSD_INPUT_SIZE, 3), dtype=np.float32)
    for i, image in enumerate(images):
        resized = resize_rgb(image, SSD_INPUT_SIZE, SSD_INPUT_SIZE)
        np.multiply(resized, np.float32(1 / 127.5), out=batch[i], casting="unsafe")
        batch[i] -= np.float32(1.0)
    return batch


def _sigmoid(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    # exp(-logaddexp(0, -x)) == 1/(1+exp(-x)) without overflow warnings.
    return np.exp(-np.logaddexp(np.float32(0), -x)).astype(np.float32)


def postprocess_ssd(
    box_encodings: npt.NDArray[np.float32],
    class_predictions: npt.NDArray[np.float32],
    labels: Sequence[str],
    *,
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
    max_detections: int = 50,
) -> list[tuple[Detection, ...]]:
    """Decode the SSD's raw outputs into detections, one tuple per image.

    ``labels`` is the manifest's list (index 0 is the background class and is
    never reported). Scores are ``sigmoid(logit)``; NMS is per class.
    """
    if box_encodings.ndim != 3 or box_encodings.shape[1:] != (SSD_NUM_ANCHORS, 4):
        raise ValueError(f"unexpected box_encodings shape {box_encodings.shape}")
    if class_predictions.shape[:2] != box_encodings.shape[:2]:
        raise ValueError(f"unexpected class_predictions shape {class_predictions.shape}")
    if class_predictions.shape[2] != len(labels):
        raise ValueError("label count does not match the model's classes")
    anchors = ssd_anchors()
    a_cy, a_cx, a_h, a_w = anchors[:, 0], anchors[:, 1], anchors[:, 2], anchors[:, 3]
    results: list[tuple[Detection, ...]] = []
    for enc, logits in zip(box_encodings, class_predictions, strict=True):
        scores = _sigmoid(logits[:, 1:])  # drop background
        anchor_idx, cls_idx = np.nonzero(scores >= score_threshold)
        if anchor_idx.size == 0:
            results.append(())
            continue
        e = enc[anchor_idx]
        cy = e[:, 0] / _Y_SCALE * a_h[anchor_idx] + a_cy[anchor_idx]
        cx = e[:, 1] / _X_SCALE * a_w[anchor_idx] + a_cx[anchor_idx]
        h = np.exp(e[:, 2] / _H_SCALE) * a_h[anchor_idx]
        w = np.exp(e[:, 3] / _W_SCALE) * a_w[anchor_idx]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(
            np.float32
        )
        cand_scores = scores[anchor_idx, cls_idx]
        keep = per_class_nms(boxes, cand_scores, cls_idx, iou_threshold, max_detections)
        results.append(
            tuple(
                Detection(
                    label=labels[int(cls_idx[k]) + 1],
                    class_id=int(cls_idx[k]) + 1,
                    score=float(cand_scores[k]),
                    box=clip_box(*(float(v) for v in boxes[k])),
                )
                for k in keep
            )
        )
    return results
