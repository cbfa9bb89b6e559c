"""What leaves the edge is shrunk to ``max_side_px``: sampled when mild, averaged when strong."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from gateway._escalation._crop import prepare_upload, shrink


def _noise(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_a_mild_shrink_takes_the_nearest_source_pixels() -> None:
    frame = _noise(500, 741)  # the longer side 1.16x max_side
    out = shrink(frame, 640)
    assert out.shape == (432, 640, 3)
    # Each target pixel is the source pixel under its centre, untouched.
    rows = ((np.arange(432) + 0.5) * 500 / 432).astype(int)
    cols = ((np.arange(640) + 0.5) * 741 / 640).astype(int)
    assert np.array_equal(out, frame[rows][:, cols])


def test_a_strong_shrink_averages_so_fine_detail_does_not_alias() -> None:
    # A one-pixel checkerboard shrunk 2x: sampling would give all black or all white.
    y, x = np.mgrid[0:400, 0:600]
    board = np.repeat((((x + y) % 2) * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    out = shrink(board, 300)
    assert out.shape == (200, 300, 3)
    assert np.abs(out.astype(int) - 127).max() <= 1
    # Just below the 1.5x boundary it still averages.
    out = shrink(board, 399)
    assert out.shape == (266, 399, 3)
    assert not np.isin(out, (0, 255)).all()


def test_a_whole_number_shrink_is_the_mean_of_each_block() -> None:
    frame = _noise(720, 1280)  # a 720p camera frame to 640 px: 2x
    out = shrink(frame, 640)
    assert out.shape == (360, 640, 3)
    blocks = frame.reshape(360, 2, 640, 2, 3).astype(int).sum(axis=(1, 3))
    assert np.array_equal(out, (blocks + 2) // 4)  # rounded half up
    frame = _noise(1080, 1920)  # 1080p: 3x, within one of the exact mean
    out = shrink(frame, 640)
    blocks = frame.reshape(360, 3, 640, 3, 3).astype(int).sum(axis=(1, 3))
    assert np.abs(out.astype(int) - blocks / 9).max() <= 1


def test_what_is_sent_is_the_shrunk_frame_as_a_jpeg() -> None:
    frame = _noise(500, 741)
    upload = prepare_upload(
        frame,
        None,
        margin=0.0,
        max_side=640,
        jpeg_quality=85,
        redactor=None,
        face_score_threshold=0.5,
    )
    assert (upload.width, upload.height, upload.is_full_frame) == (640, 432, True)
    with Image.open(io.BytesIO(upload.jpeg)) as sent:
        assert (sent.format, sent.size) == ("JPEG", (640, 432))
        assert not sent.getexif()
