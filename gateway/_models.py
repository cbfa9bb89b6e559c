"""Where the ONNX models are, when the configuration does not say.

The models ship as their own distribution, ``edgeward-models`` (the package
``edgeward_models``: the ``models/`` directory of the repository, data only), which the
``gateway`` and ``gateway-gpu`` extras install and a device never does. In a checkout of the
repository the ``models/`` directory beside the packages is used instead, so the code and the
models it was written for come from the same tree.

This module imports nothing heavy: reading a configuration must not import onnxruntime. It
only finds the directory; every file in it is still checked against its manifest's sha256
before it is loaded (``gateway._inference._manifest``).
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

__all__ = [
    "DEFAULT_EDGE_MODEL",
    "EDGE_DETECTORS",
    "MODELS_NOT_FOUND_HINT",
    "MODELS_PACKAGE",
    "EdgeArchitecture",
    "find_models_dir",
    "manifest_labels",
    "models_dir_or_default",
]

EdgeArchitecture = Literal["ssd", "nanodet"]

#: The edge detector a gateway runs where no region names another (a manifest name).
DEFAULT_EDGE_MODEL = "edge_ssd_mobilenetv2_oid24"

#: The manifest's detectors the edge engine can run, with the architecture whose pre- and
#: post-processing it applies (``gateway._inference._ssd``, ``gateway._inference._nanodet``).
#: NanoDet-m (COCO-80: horses, birds, kites, giraffes, zebras the OID-24 SSD cannot name) is a
#: mobile detector of about a million parameters, so a region whose devices see such scenes
#: can run it at the edge; the core runs it too, as one of its models.
EDGE_DETECTORS: Mapping[str, EdgeArchitecture] = {
    DEFAULT_EDGE_MODEL: "ssd",
    "core_nanodet_coco80": "nanodet",
}

#: The import name of the ``edgeward-models`` distribution.
MODELS_PACKAGE = "edgeward_models"
MANIFEST_NAME = "manifest.json"
# A checkout: the repository root holds the packages, pyproject.toml and models/.
_CHECKOUT = Path(__file__).resolve().parents[1]

MODELS_NOT_FOUND_HINT = (
    "no models found: install them with the gateway extra "
    "(pip install 'edgeward[gateway]', which brings edgeward-models), "
    "or set models_dir to a directory holding manifest.json and the ONNX files"
)


def _checkout_models_dir() -> Path | None:
    models = _CHECKOUT / "models"
    if (_CHECKOUT / "pyproject.toml").is_file() and (models / MANIFEST_NAME).is_file():
        return models
    return None


def _installed_models_dir() -> Path | None:
    try:
        root = importlib.resources.files(MODELS_PACKAGE)
    except ModuleNotFoundError:
        return None
    # onnxruntime and the sha256 check read plain files: a package installed as files (as pip
    # does) gives a Path; anything else (a zip import) is not usable and reported as missing.
    if not isinstance(root, Path) or not (root / MANIFEST_NAME).is_file():
        return None
    return root


def find_models_dir() -> Path | None:
    """The default models directory: a checkout's ``models/``, else the installed package.

    ``None`` when neither holds a manifest (:data:`MODELS_NOT_FOUND_HINT` says what to do).
    """
    return _checkout_models_dir() or _installed_models_dir()


def manifest_labels(models_dir: Path) -> dict[str, tuple[str, ...]]:
    """Every model of ``models_dir``'s manifest with its labels, for checking a configuration.

    Reads the JSON only (no sha256, no onnxruntime); ``{}`` when it cannot be read (loading the
    models then reports why, against the files). Every file is still verified when it loads.
    """
    try:
        raw = json.loads((Path(models_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
        return {
            str(m["name"]): tuple(str(label) for label in m.get("labels", ()))
            for m in raw["models"]
        }
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return {}


def models_dir_or_default(value: object) -> object:
    """A settings validator (mode "before") for a ``models_dir`` key: unset means the default.

    Raises ``ValueError`` (reported against the key at start-up) when there is no default.
    """
    if value is not None:
        return value
    found = find_models_dir()
    if found is None:
        raise ValueError(MODELS_NOT_FOUND_HINT)
    return found
