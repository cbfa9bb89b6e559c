"""The model manifest, and opening model files only after checking their sha256.

``models/manifest.json`` is written by ``scripts/build_models.py``. It records,
for each ONNX file, where it came from, its licence, its input contract, its
labels, and its sha256. The gateway treats a model file as code: a file whose
hash differs from the manifest, or one the manifest does not list, is refused.

The file is read into memory once, hashed, and that same buffer is what
onnxruntime parses, so there is no window between the check and the use in
which the file could be swapped (a time-of-check/time-of-use race).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import ModelIntegrityError

__all__ = [
    "Manifest",
    "ModelEntry",
    "ModelInput",
    "ModelIntegrityError",
    "load_manifest",
    "open_session",
    "read_verified_model",
]

MANIFEST_NAME = "manifest.json"
# Which directory is read (the installed ``edgeward-models`` package by default, or the
# ``models_dir`` key) is decided by the configuration: ``gateway._models``.


@dataclass(frozen=True, slots=True)
class ModelInput:
    """What a model expects as input (as documented in the manifest)."""

    name: str
    shape: tuple[int | str, ...]
    layout: str
    colour: str
    normalisation: str


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One model listed in the manifest."""

    name: str
    file: str
    sha256: str
    licence: str
    source: Mapping[str, Any]
    input: ModelInput
    labels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Manifest:
    """The parsed manifest; ``directory`` is where the model files live."""

    directory: Path
    models: Mapping[str, ModelEntry]

    def entry(self, name: str) -> ModelEntry:
        """Return the entry for ``name`` or raise :class:`ModelIntegrityError`."""
        try:
            return self.models[name]
        except KeyError:
            raise ModelIntegrityError(name, "not listed in the manifest") from None


def _require(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind):
        raise ModelIntegrityError(where, f"manifest field {key!r} missing or not {kind.__name__}")
    return value


def _parse_entry(raw: Any) -> ModelEntry:
    if not isinstance(raw, dict):
        raise ModelIntegrityError("?", "manifest entry is not an object")
    name = str(_require(raw, "name", str, "?"))
    file = str(_require(raw, "file", str, name))
    sha = str(_require(raw, "sha256", str, name)).lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ModelIntegrityError(name, "manifest sha256 is not 64 hex digits")
    # A manifest entry must name a plain file inside the models directory:
    # "../" or an absolute path would let an edited manifest load anything.
    if Path(file).name != file or file in {".", ".."}:
        raise ModelIntegrityError(name, f"file name {file!r} is not a plain file name")
    inp = _require(raw, "input", dict, name)
    labels = _require(raw, "labels", list, name)
    return ModelEntry(
        name=name,
        file=file,
        sha256=sha,
        licence=str(_require(raw, "licence", str, name)),
        source=dict(_require(raw, "source", dict, name)),
        input=ModelInput(
            name=str(_require(inp, "name", str, name)),
            shape=tuple(_require(inp, "shape", list, name)),
            layout=str(_require(inp, "layout", str, name)),
            colour=str(_require(inp, "colour", str, name)),
            normalisation=str(_require(inp, "normalisation", str, name)),
        ),
        labels=tuple(str(label) for label in labels),
    )


def load_manifest(models_dir: str | Path) -> Manifest:
    """Read and validate ``<models_dir>/manifest.json``.

    Raises :class:`ModelIntegrityError` when it is missing, not JSON, or lacks
    a field the gateway needs.
    """
    directory = Path(models_dir)
    path = directory / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelIntegrityError(MANIFEST_NAME, f"no manifest at {path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelIntegrityError(MANIFEST_NAME, f"unreadable manifest: {exc}") from exc
    models_raw = raw.get("models") if isinstance(raw, dict) else None
    if not isinstance(models_raw, list):
        raise ModelIntegrityError(MANIFEST_NAME, "manifest has no 'models' list")
    models: dict[str, ModelEntry] = {}
    for item in models_raw:
        entry = _parse_entry(item)
        if entry.name in models:
            raise ModelIntegrityError(entry.name, "listed twice in the manifest")
        models[entry.name] = entry
    return Manifest(directory=directory, models=models)


def read_verified_model(manifest: Manifest, name: str) -> bytes:
    """Return the bytes of model ``name`` after checking them against the manifest.

    The returned buffer is the one that was hashed: pass it to onnxruntime
    rather than re-reading the file.
    """
    entry = manifest.entry(name)
    path = manifest.directory / entry.file
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelIntegrityError(name, f"model file {entry.file} is missing") from exc
    except OSError as exc:
        raise ModelIntegrityError(name, f"model file {entry.file} unreadable: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise ModelIntegrityError(
            name,
            f"sha256 mismatch for {entry.file}: manifest {entry.sha256}, file {digest}",
        )
    return data


def open_session(manifest: Manifest, name: str, *, intra_op_threads: int = 2) -> Any:
    """A CPU ``onnxruntime.InferenceSession`` for a verified model (tools and tests).

    The bytes checked against the manifest are the bytes loaded; the session options are the
    serving ones of :func:`gateway._inference._runtime.create_session`.
    """
    # Imported here so that reading the manifest needs no onnxruntime (a device install has
    # none, and tooling may inspect the manifest on its own).
    from gateway._inference._runtime import create_session

    session, _provider = create_session(
        read_verified_model(manifest, name), providers="cpu", intra_op_threads=intra_op_threads
    )
    return session
