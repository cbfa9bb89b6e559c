"""The committed models, run by real onnxruntime on real photos, and their guards.

Expected answers come from ``shared/reference/models.md`` (measured the same
way); thresholds leave a margin for JPEG re-encoding and onnxruntime versions.
"""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gateway import Detection
from gateway._inference._classifier import preprocess_efficientnet, top_k
from gateway._inference._faces import postprocess_centerface, preprocess_centerface
from gateway._inference._image import decode_image
from gateway._inference._manifest import Manifest, load_manifest, open_session, read_verified_model
from gateway._inference._nanodet import postprocess_nanodet, preprocess_nanodet
from gateway._inference._ssd import (
    SSD_NUM_ANCHORS,
    postprocess_ssd,
    preprocess_ssd,
    ssd_anchors,
)
from gateway.errors import InvalidImage, ModelIntegrityError

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
PHOTOS = Path(__file__).resolve().parent / "data" / "photos"
MAX_PIXELS = 40_000_000

SSD = "edge_ssd_mobilenetv2_oid24"
NANODET = "core_nanodet_coco80"
EFFNET = "core_efficientnet_lite2"
CENTERFACE = "centerface"


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(MODELS)


@pytest.fixture(scope="module")
def sessions(manifest: Manifest) -> dict[str, Any]:
    return {name: open_session(manifest, name) for name in (SSD, NANODET, EFFNET, CENTERFACE)}


def photo(name: str) -> np.ndarray:
    return decode_image((PHOTOS / name).read_bytes(), max_pixels=MAX_PIXELS)


def run_ssd(sessions: dict[str, Any], manifest: Manifest, image: np.ndarray) -> list[Detection]:
    boxes, classes = sessions[SSD].run(None, {"input": preprocess_ssd([image])})
    return list(postprocess_ssd(boxes, classes, manifest.entry(SSD).labels)[0])


def run_nanodet(sessions: dict[str, Any], manifest: Manifest, image: np.ndarray) -> list[Detection]:
    outputs = sessions[NANODET].run(None, {"input": preprocess_nanodet(image)})
    return list(postprocess_nanodet(outputs, manifest.entry(NANODET).labels))


def best(detections: list[Detection], label: str) -> Detection | None:
    matching = [d for d in detections if d.label == label]
    return max(matching, key=lambda d: d.score) if matching else None


# ---------------------------------------------------------------- manifest
def test_manifest_describes_every_model(manifest: Manifest) -> None:
    assert set(manifest.models) == {SSD, NANODET, EFFNET, CENTERFACE}
    oid = manifest.entry(SSD).labels
    assert len(oid) == 24
    assert oid[0] == "???"  # background column
    assert {"Person", "Cat", "Dog", "Bicycle", "Car", "Coffee cup"} <= set(oid)
    coco = manifest.entry(NANODET).labels
    assert len(coco) == 80
    assert coco[0] == "person"
    assert coco[3] == "motorcycle"
    imagenet = manifest.entry(EFFNET).labels
    assert len(imagenet) == 1000
    assert imagenet[285] == "Egyptian cat"
    for entry in manifest.models.values():
        assert (MODELS / entry.file).is_file()
        assert entry.licence
        assert entry.source["version"]
    assert manifest.entry(SSD).input.layout == "NHWC"
    assert manifest.entry(NANODET).input.colour == "BGR"
    assert (MODELS / "LICENSES").is_dir()


def test_anchor_table() -> None:
    anchors = ssd_anchors()
    assert anchors.shape == (SSD_NUM_ANCHORS, 4)
    # First cell of the 19x19 layer: three anchors centred on (0.5/19, 0.5/19).
    np.testing.assert_allclose(anchors[0, :2], [0.5 / 19, 0.5 / 19], rtol=1e-6)
    np.testing.assert_allclose(anchors[0, 2:], [0.1, 0.1], rtol=1e-6)
    # Last anchor: the 1x1 layer's interpolated scale sqrt(0.95 * 1.0), ratio 1.
    np.testing.assert_allclose(anchors[-1], [0.5, 0.5, 0.95**0.5, 0.95**0.5], rtol=1e-6)
    assert not anchors.flags.writeable


# ---------------------------------------------------------------- integrity
def _copy_models(tmp_path: Path, *names: str) -> Path:
    shutil.copy(MODELS / "manifest.json", tmp_path / "manifest.json")
    for name in names:
        shutil.copy(MODELS / name, tmp_path / name)
    return tmp_path


def test_tampered_model_is_refused(tmp_path: Path) -> None:
    models = _copy_models(tmp_path, "centerface.onnx")
    path = models / "centerface.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit deep inside the weights
    path.write_bytes(bytes(data))
    tampered = load_manifest(models)
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch") as info:
        open_session(tampered, CENTERFACE)
    assert info.value.model == CENTERFACE


def test_unknown_or_missing_model_is_refused(tmp_path: Path, manifest: Manifest) -> None:
    with pytest.raises(ModelIntegrityError, match="not listed"):
        read_verified_model(manifest, "yolo_from_the_internet")
    empty = load_manifest(_copy_models(tmp_path))
    with pytest.raises(ModelIntegrityError, match="missing"):
        read_verified_model(empty, CENTERFACE)


def test_manifest_cannot_point_outside_models_dir(tmp_path: Path) -> None:
    text = (MODELS / "manifest.json").read_text()
    (tmp_path / "manifest.json").write_text(
        text.replace('"file": "centerface.onnx"', '"file": "../centerface.onnx"')
    )
    with pytest.raises(ModelIntegrityError, match="plain file name"):
        load_manifest(tmp_path)


def test_missing_or_corrupt_manifest(tmp_path: Path) -> None:
    with pytest.raises(ModelIntegrityError, match="no manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ModelIntegrityError, match="unreadable"):
        load_manifest(tmp_path)


# ---------------------------------------------------------------- edge SSD
def test_ssd_finds_the_cat(sessions: dict[str, Any], manifest: Manifest) -> None:
    detections = run_ssd(sessions, manifest, photo("chelsea.jpg"))
    cat = best(detections, "Cat")
    assert cat is not None, detections
    assert cat.score >= 0.7
    # Chelsea fills most of the frame: the box must cover its middle and most of the image.
    assert cat.box.x_min < 0.3
    assert cat.box.x_max > 0.7
    assert cat.box.y_min < 0.3
    assert cat.box.y_max > 0.7
    assert cat.box.area > 0.5


def test_ssd_on_dog_jpg(sessions: dict[str, Any], manifest: Manifest) -> None:
    image = photo("dog.jpg")
    height, width = image.shape[:2]
    detections = run_ssd(sessions, manifest, image)
    assert {"Dog", "Bicycle", "Car"} <= {d.label for d in detections}, detections
    dog = best(detections, "Dog")
    assert dog is not None
    # models.md: about [121, 215, 324, 551] in pixels (x_min, y_min, x_max, y_max).
    np.testing.assert_allclose(dog.box.to_pixels(width, height), [121, 215, 324, 551], atol=25)


@pytest.mark.parametrize("name", ["rocket.jpg", "motorcycle.jpg"])
def test_ssd_stays_quiet_outside_its_classes(
    name: str, sessions: dict[str, Any], manifest: Manifest
) -> None:
    assert run_ssd(sessions, manifest, photo(name)) == []


def test_ssd_astronaut_and_coffee(sessions: dict[str, Any], manifest: Manifest) -> None:
    assert best(run_ssd(sessions, manifest, photo("astronaut.jpg")), "Person") is not None
    assert best(run_ssd(sessions, manifest, photo("coffee.jpg")), "Coffee cup") is not None


def test_ssd_batch_of_eight_equals_eight_singles(
    sessions: dict[str, Any], manifest: Manifest
) -> None:
    names = sorted(p.name for p in PHOTOS.glob("*.jpg"))
    images = [photo(n) for n in names]
    images += [images[0][:, ::-1].copy()] * (8 - len(images))  # a mirrored cat fills the batch
    assert len(images) == 8
    labels = manifest.entry(SSD).labels
    batch_boxes, batch_classes = sessions[SSD].run(None, {"input": preprocess_ssd(images)})
    assert batch_boxes.shape == (8, SSD_NUM_ANCHORS, 4)
    batch_detections = postprocess_ssd(batch_boxes, batch_classes, labels)
    for i, image in enumerate(images):
        boxes, classes = sessions[SSD].run(None, {"input": preprocess_ssd([image])})
        np.testing.assert_allclose(batch_boxes[i], boxes[0], atol=1e-4)
        np.testing.assert_allclose(batch_classes[i], classes[0], atol=1e-4)
        single = postprocess_ssd(boxes, classes, labels)[0]
        assert [d.label for d in batch_detections[i]] == [d.label for d in single]


# ---------------------------------------------------------------- core models
def test_nanodet_sees_the_motorcycle(sessions: dict[str, Any], manifest: Manifest) -> None:
    moto = best(run_nanodet(sessions, manifest, photo("motorcycle.jpg")), "motorcycle")
    assert moto is not None
    assert moto.score >= 0.6
    assert moto.box.area > 0.3


def test_nanodet_on_dog_jpg(sessions: dict[str, Any], manifest: Manifest) -> None:
    labels = {d.label for d in run_nanodet(sessions, manifest, photo("dog.jpg"))}
    assert {"bicycle", "dog"} <= labels


def test_efficientnet_classifies_cat_and_espresso(
    sessions: dict[str, Any], manifest: Manifest
) -> None:
    images = [photo("chelsea.jpg"), photo("coffee.jpg")]
    (logits,) = sessions[EFFNET].run(None, {"input": preprocess_efficientnet(images)})
    cat, coffee = top_k(logits, manifest.entry(EFFNET).labels, k=3)
    assert cat[0].label in {"Egyptian cat", "tabby", "tiger cat"}, cat
    assert cat[0].score > 0.3
    assert coffee[0].label == "espresso", coffee


def test_centerface_finds_the_astronauts_face(sessions: dict[str, Any]) -> None:
    image = photo("astronaut.jpg")
    outputs = sessions[CENTERFACE].run(None, {"input.1": preprocess_centerface(image)})
    faces = postprocess_centerface(*outputs)
    assert len(faces) == 1, faces
    face = faces[0]
    assert face.score > 0.8
    # Eileen Collins' face is around x 180..270, y 60..180 of the 512x512 photo.
    x1, y1, x2, y2 = face.box.to_pixels(512, 512)
    assert 150 < x1 < x2 < 300
    assert 30 < y1 < y2 < 210
    assert len(face.landmarks) == 5
    for x, y in face.landmarks:
        assert face.box.x_min <= x <= face.box.x_max
        assert face.box.y_min <= y <= face.box.y_max


def test_centerface_no_face_on_rocket(sessions: dict[str, Any]) -> None:
    outputs = sessions[CENTERFACE].run(
        None, {"input.1": preprocess_centerface(photo("rocket.jpg"))}
    )
    assert postprocess_centerface(*outputs) == ()


# ---------------------------------------------------------------- decoding
def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR claims ``width×height`` (CRC fixed up)."""
    data = bytearray(_png(1, 1))
    # Signature (8) + IHDR length (4) + "IHDR" (4), then width and height.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_decode_accepts_jpeg_and_png() -> None:
    cat = photo("chelsea.jpg")
    assert cat.shape == (300, 451, 3)
    assert cat.dtype == np.uint8
    tiny = decode_image(_png(1, 1), max_pixels=MAX_PIXELS)
    assert tiny.shape == (1, 1, 3)
    assert tuple(tiny[0, 0]) == (10, 200, 30)


def test_one_pixel_png_detects_nothing(sessions: dict[str, Any], manifest: Manifest) -> None:
    tiny = decode_image(_png(1, 1), max_pixels=MAX_PIXELS)
    assert run_ssd(sessions, manifest, tiny) == []
    outputs = sessions[CENTERFACE].run(None, {"input.1": preprocess_centerface(tiny)})
    assert postprocess_centerface(*outputs) == ()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"this is not an image at all", "not a JPEG or PNG"),
        (b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "not a JPEG or PNG"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 64, "corrupt"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "corrupt"),
    ],
)
def test_decode_refuses_non_images(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidImage, match=reason) as info:
        decode_image(data, max_pixels=MAX_PIXELS)
    assert reason in info.value.reason


def test_decode_refuses_truncated_jpeg() -> None:
    data = (PHOTOS / "chelsea.jpg").read_bytes()
    with pytest.raises(InvalidImage, match="truncated"):
        decode_image(data[: len(data) // 2], max_pixels=MAX_PIXELS)


def test_decode_refuses_decompression_bomb_from_the_header() -> None:
    bomb = _png_claiming(20000, 20000)
    assert len(bomb) < 100
    # "too large" (not "truncated") shows the header check fired before decoding:
    # decoding would have needed 1.2 GB and then failed on the missing data.
    with pytest.raises(InvalidImage, match="too large"):
        decode_image(bomb, max_pixels=MAX_PIXELS)
    # Also past Pillow's own process-wide limit, whatever max_pixels says.
    with pytest.raises(InvalidImage, match="too large"):
        decode_image(bomb, max_pixels=10**12)


def test_decode_enforces_the_callers_pixel_limit() -> None:
    data = (PHOTOS / "chelsea.jpg").read_bytes()
    with pytest.raises(InvalidImage, match="too large"):
        decode_image(data, max_pixels=300 * 450)
    assert decode_image(data, max_pixels=300 * 451).shape == (300, 451, 3)


def test_decode_refuses_zero_size_png() -> None:
    with pytest.raises(InvalidImage):
        decode_image(_png_claiming(0, 0), max_pixels=MAX_PIXELS)


def test_decode_rejects_bad_limit() -> None:
    with pytest.raises(ValueError, match="positive"):
        decode_image(_png(1, 1), max_pixels=0)
