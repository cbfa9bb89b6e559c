"""decode_image applies the EXIF orientation and converts to RGB (its copy-free fast path)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from gateway._inference._image import decode_image


def _jpeg(image: Image.Image, *, orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation  # Orientation
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def test_exif_orientation_is_applied() -> None:
    # 40 wide, 20 high; the left half red. Orientation 6: the viewer rotates 90° clockwise.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    frame = decode_image(_jpeg(Image.fromarray(pixels), orientation=6), max_pixels=10_000)
    assert frame.shape == (40, 20, 3)
    assert frame[5, 10, 0] > 200  # the red half is now on top
    assert frame[35, 10, 0] < 60
    plain = decode_image(_jpeg(Image.fromarray(pixels)), max_pixels=10_000)
    assert plain.shape == (20, 40, 3)
    assert plain.flags.c_contiguous


def test_grey_and_palette_images_come_out_rgb() -> None:
    grey = io.BytesIO()
    Image.new("L", (8, 6), 128).save(grey, format="JPEG")
    assert decode_image(grey.getvalue(), max_pixels=100).shape == (6, 8, 3)
    palette = io.BytesIO()
    Image.new("P", (5, 4), 3).save(palette, format="PNG")
    assert decode_image(palette.getvalue(), max_pixels=100).shape == (4, 5, 3)
