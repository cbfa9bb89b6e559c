"""What leaves the edge: a crop (or a frame), faces blurred, shrunk and re-encoded as JPEG.

Every pixel sent to the core goes through :func:`prepare_upload`. When the region requires
faces blurred, CenterFace runs on exactly the pixels that will be sent (after cropping and
shrinking, so a face cannot reappear by a later resize) and each face box, enlarged a little,
is pixelated and blurred until no identity is recoverable. If the face model cannot be
loaded or run, :class:`RedactionUnavailable` is raised and nothing is sent: the region asked
for privacy, so failing closed is the only safe default.

Re-encoding also strips whatever metadata the device's file carried (EXIF: GPS position,
camera serial): the core gets pixels only.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from PIL import Image, ImageFilter

from gateway._inference._detection import Box, check_rgb
from gateway._inference._faces import Face, postprocess_centerface, preprocess_centerface
from gateway._inference._manifest import load_manifest, read_verified_model
from gateway.errors import RedactionUnavailable

__all__ = [
    "FACE_MODEL",
    "FaceRedactor",
    "Upload",
    "crop_with_margin",
    "encode_jpeg",
    "prepare_upload",
    "shrink",
]

_log = structlog.get_logger(__name__)

#: The face detector's name in ``models/manifest.json``.
FACE_MODEL = "centerface"

Rgb = npt.NDArray[np.uint8]
# Face boxes from CenterFace are tight around the eyes-to-chin area; hair and ears identify
# too, so each box is grown by this fraction of its size on every side before blurring.
_FACE_GROWTH = 0.25
# Shrinks by less than 1.5x (scale above 1/1.5) sample the nearest source pixel; stronger
# ones average (box filter), since sampling would alias fine detail away.
_NEAREST_ABOVE = 1 / 1.5


@dataclass(frozen=True, slots=True)
class Upload:
    """The bytes that will leave the edge and what was done to them."""

    jpeg: bytes
    width: int
    height: int
    faces_blurred: int
    is_full_frame: bool


def crop_with_margin(frame: Rgb, box: Box, margin: float) -> Rgb:
    """The pixels of ``box`` (normalised) plus ``margin`` × its size on each side, clipped."""
    check_rgb(frame)
    height, width = frame.shape[:2]
    bw, bh = box.x_max - box.x_min, box.y_max - box.y_min
    x0 = max(0, int(np.floor((box.x_min - margin * bw) * width)))
    y0 = max(0, int(np.floor((box.y_min - margin * bh) * height)))
    x1 = min(width, int(np.ceil((box.x_max + margin * bw) * width)))
    y1 = min(height, int(np.ceil((box.y_max + margin * bh) * height)))
    # A degenerate box still yields at least one pixel, so the core always gets an image.
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    return np.ascontiguousarray(frame[y0:y1, x0:x1])


def _shrunk(image: Rgb, max_side: int) -> Image.Image:
    """``image`` as a Pillow image, shrunk (never enlarged) to ``max_side`` at most."""
    pil = Image.fromarray(image, mode="RGB")
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return pil  # already small enough: no resampling at all
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if scale > _NEAREST_ABOVE:
        # A mild shrink: a target pixel's box covers under 1.5 source pixels a side, so the
        # box filter mostly copies one of them; taking the nearest is 0.15 ms instead of
        # 1.9 ms for a 741x500 frame (the largest step of an escalation at the edge). On the
        # 42 labelled photos shrunk 1.3x the core's answers differed from the box filter's
        # for 1 photo (bilinear: 4, Hamming: 2), at 1.45x for 8 (bilinear: 7).
        return pil.resize(size, Image.Resampling.NEAREST)
    factor = round(1 / scale)
    if size == (width // factor, height // factor) and not (width % factor or height % factor):
        # A whole-number shrink (1280x720 or 1920x1080 to 640 px): each target pixel is the
        # mean of its factor x factor block, which is what the box filter computes too, at
        # about a third of its cost (1920x1080: 1.5 ms instead of 4.8 ms).
        return pil.reduce(factor)
    # Box: the area average of the source pixels under each target pixel, an anti-aliased
    # shrink with the narrowest support Pillow offers (about 30 % faster than bilinear);
    # bilinear and Lanczos looked no better to the core's models.
    return pil.resize(size, Image.Resampling.BOX)


def shrink(image: Rgb, max_side: int) -> Rgb:
    """``image`` shrunk (never enlarged) so its longer side is at most ``max_side``."""
    height, width = image.shape[:2]
    if max(height, width) <= max_side:
        return image
    return np.asarray(_shrunk(image, max_side), dtype=np.uint8)


def _encode(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    # Baseline JPEG, no metadata, Pillow's default 4:2:0 subsampling (its fastest setting;
    # "optimize" and "progressive" would cost a second pass for a few percent of bytes).
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def encode_jpeg(image: Rgb, quality: int) -> bytes:
    """Encode RGB pixels as a baseline JPEG with no metadata."""
    return _encode(Image.fromarray(image, mode="RGB"), quality)


def _blur_region(image: Rgb, box: Box) -> None:
    """Destroy the detail inside ``box`` (grown by ``_FACE_GROWTH``) in place."""
    height, width = image.shape[:2]
    bw, bh = box.x_max - box.x_min, box.y_max - box.y_min
    x0 = max(0, int((box.x_min - _FACE_GROWTH * bw) * width))
    y0 = max(0, int((box.y_min - _FACE_GROWTH * bh) * height))
    x1 = min(width, int(np.ceil((box.x_max + _FACE_GROWTH * bw) * width)))
    y1 = min(height, int(np.ceil((box.y_max + _FACE_GROWTH * bh) * height)))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return
    region = Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1]), mode="RGB")
    # Pixelate to a 4×4 mosaic first (a Gaussian blur alone can be partly inverted), then
    # blur the mosaic's edges so the patch carries no structure a detector could latch on to.
    mosaic = region.resize((4, 4), Image.Resampling.BOX).resize(
        region.size, Image.Resampling.NEAREST
    )
    radius = max(2.0, max(region.size) / 6.0)
    blurred = mosaic.filter(ImageFilter.GaussianBlur(radius))
    image[y0:y1, x0:x1] = np.asarray(blurred, dtype=np.uint8)


class FaceRedactor:
    """Finds faces with CenterFace and blurs them. Thread-safe; runs in the caller's thread.

    The model is loaded on first use (a gateway whose regions never require blurring never
    loads it). Any failure to load or run it raises :class:`RedactionUnavailable`.
    """

    def __init__(
        self,
        *,
        models_dir: Path,
        session_factory: Callable[[bytes], Any] | None = None,
    ) -> None:
        self._models_dir = Path(models_dir)
        self._session_factory = session_factory or _default_session
        self._session: Any = None
        self._input_name = ""
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._session is None:
                try:
                    manifest = load_manifest(self._models_dir)
                    data = read_verified_model(manifest, FACE_MODEL)
                    session = self._session_factory(data)
                    self._input_name = str(session.get_inputs()[0].name)
                except Exception as exc:
                    _log.error("face model unavailable", error=str(exc))
                    raise RedactionUnavailable(f"face model cannot be loaded: {exc}") from exc
                self._session = session
                _log.info("face model loaded", model=FACE_MODEL)
            return self._session

    def faces(self, image: Rgb, *, score_threshold: float) -> tuple[Face, ...]:
        """Faces in ``image`` (normalised boxes), best first."""
        session = self._load()
        try:
            outputs = session.run(None, {self._input_name: preprocess_centerface(image)})
            return postprocess_centerface(*outputs[:4], score_threshold=score_threshold)
        except Exception as exc:
            _log.error("face model failed", error=str(exc))
            raise RedactionUnavailable(f"face model failed: {exc}") from exc

    def redact(self, image: Rgb, *, score_threshold: float) -> tuple[Rgb, int]:
        """A copy of ``image`` with every face found blurred, and the number of faces."""
        found = self.faces(image, score_threshold=score_threshold)
        out = image.copy()
        for face in found:
            _blur_region(out, face.box)
        return out, len(found)


def _default_session(data: bytes) -> Any:
    from gateway._inference._runtime import create_session

    # One thread: redaction runs beside the edge model, which owns the other cores.
    session, _provider = create_session(data, providers="cpu", intra_op_threads=1)
    return session


def prepare_upload(
    frame: Rgb,
    box: Box | None,
    *,
    margin: float,
    max_side: int,
    jpeg_quality: int,
    redactor: FaceRedactor | None,
    face_score_threshold: float,
) -> Upload:
    """Cut, shrink, redact and encode what will be sent for one escalation (CPU work).

    ``box`` ``None`` sends the whole frame. ``redactor`` ``None`` means the region does not
    require blurring; when it does and the model fails, :class:`RedactionUnavailable` is
    raised and no bytes are produced.
    """
    pixels = frame if box is None else crop_with_margin(frame, box, margin)
    if redactor is None:
        # Pixels go straight from the resampler to the encoder: every array <-> image copy
        # of a frame costs about a millisecond (fresh pages for each buffer).
        image = _shrunk(pixels, max_side)
        width, height = image.size
        return Upload(
            jpeg=_encode(image, jpeg_quality),
            width=width,
            height=height,
            faces_blurred=0,
            is_full_frame=box is None,
        )
    pixels = shrink(pixels, max_side)
    pixels, faces = redactor.redact(pixels, score_threshold=face_score_threshold)
    height, width = pixels.shape[:2]
    return Upload(
        jpeg=encode_jpeg(pixels, jpeg_quality),
        width=width,
        height=height,
        faces_blurred=faces,
        is_full_frame=box is None,
    )
