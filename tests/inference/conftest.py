"""Fixtures for the inference tests: the committed models and the test photos.

Tests that need the real edge model fail under ``CI=true`` when it is missing and skip only
on a developer's machine (``scripts/build_models.py`` rebuilds it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
PHOTOS = REPO / "tests" / "data" / "photos"
EDGE_MODEL = "edge_ssd_mobilenetv2_oid24"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """``models/``, holding the edge SSD and its manifest."""
    missing = [
        p for p in (MODELS / f"{EDGE_MODEL}.onnx", MODELS / "manifest.json") if not p.is_file()
    ]
    if missing:
        names = ", ".join(str(p.relative_to(REPO)) for p in missing)
        if os.environ.get("CI") == "true":
            pytest.fail(f"{names} missing (scripts/build_models.py builds it)")
        pytest.skip(f"{names} missing; run scripts/build_models.py")
    return MODELS


@pytest.fixture(scope="session")
def photo_bytes() -> dict[str, bytes]:
    """Every test photo's JPEG bytes, by stem (``chelsea``, ``dog``, …)."""
    return {p.stem: p.read_bytes() for p in sorted(PHOTOS.glob("*.jpg"))}
