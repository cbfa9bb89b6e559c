"""Safe decoding of untrusted camera frames into RGB arrays.

Every frame a device sends is attacker-controlled input that reaches a C image
decoder. This module is the single place where bytes become pixels, and it
refuses, with a reason, anything that is not a plain JPEG or PNG of a sane size
*before* the decoder allocates the pixel buffer.
"""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from gateway.errors import InvalidImage

__all__ = ["ACCEPTED_FORMATS", "InvalidImage", "decode_image"]

#: Container formats a device may send (DESIGN.md: "an encoded image (JPEG or PNG)").
ACCEPTED_FORMATS = ("JPEG", "PNG")

# Magic numbers, checked before Pillow sees the bytes, so that none of Pillow's
# other (rarely used, more exotic) decoders is ever reached by device input.
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    """Judge the header's dimensions, before a single pixel is decoded."""
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidImage("zero-size image")
    if width * height > max_pixels:
        raise InvalidImage(f"image too large: {width}x{height} pixels, limit {max_pixels}")


def decode_image(data: bytes, *, max_pixels: int) -> npt.NDArray[np.uint8]:
    """Decode a JPEG or PNG into an ``H×W×3`` RGB ``uint8`` array.

    Refuses, with :class:`InvalidImage`: empty input, bytes that are not JPEG
    or PNG, images whose header claims zero size or more than ``max_pixels``
    pixels (checked from the header, before any pixel is decoded, so a
    decompression bomb costs nothing), and truncated or corrupt data.

    The EXIF orientation is applied, so the array is the picture as a person
    would see it (phone and camera JPEGs are often stored rotated).
    """
    if max_pixels <= 0:
        raise ValueError("max_pixels must be positive")
    if not data:
        raise InvalidImage("empty image")
    if data.startswith(_JPEG_MAGIC):
        fmt = "JPEG"
    elif data.startswith(_PNG_MAGIC):
        fmt = "PNG"
    else:
        raise InvalidImage("not a JPEG or PNG image")

    try:
        # Image.open reads only the header. Pillow's own bomb check (against the
        # process-wide Image.MAX_IMAGE_PIXELS) may fire here first; we leave that
        # global alone, as other code in the process may rely on it, and apply
        # our own, usually stricter, per-call limit just below.
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            _check_size(img.size, max_pixels)
            # load() decodes; a truncated file raises OSError here because
            # ImageFile.LOAD_TRUNCATED_IMAGES is False (Pillow's default).
            img.load()
            # In place, and convert only what is not RGB already: each copy of a frame
            # costs more than the JPEG decode itself (fresh pages for every buffer).
            ImageOps.exif_transpose(img, in_place=True)
            rgb = img if img.mode == "RGB" else img.convert("RGB")
            # Inside the block: leaving it closes ``img`` (and ``rgb`` may be ``img``).
            array = np.asarray(rgb, dtype=np.uint8)
    except InvalidImage:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidImage("image too large (decompression bomb)") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow signals corrupt input with several exception types (SyntaxError
        # for some malformed headers, OSError for truncation); all mean "bad image".
        raise InvalidImage(f"corrupt or truncated {fmt} image") from exc

    if array.ndim != 3 or array.shape[2] != 3 or array.size == 0:
        raise InvalidImage("image did not decode to RGB pixels")
    return array
