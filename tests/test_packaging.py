"""Packaging: one version, the models as their own distribution, and how services find them.

The end-to-end proof (wheels built, installed into fresh virtual environments, the demo and a
device enrolment run from them) is ``tests/test_wheels.py``; these are the fast checks of the
same contracts.
"""

from __future__ import annotations

import json
import shutil
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
from click.testing import CliRunner
from packaging.requirements import Requirement

import edgeward
import gateway._models as models_mod
from edgeward.cli import main as cli_main
from gateway import (
    ConfigError,
    CoreEscalationSettings,
    InferenceSettings,
    find_models_dir,
    load_core_settings,
    load_gateway_settings,
)
from gateway._inference._manifest import load_manifest, read_verified_model
from gateway.errors import ModelIntegrityError
from tests.conftest import ROOT

MODELS = ROOT / "models"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MODELS_PYPROJECT = tomllib.loads((MODELS / "pyproject.toml").read_text())
GATEWAY_OVERRIDES = {"identity_dir": "/id", "core_address": "127.0.0.1:7443"}


# -- version ----------------------------------------------------------------------------------


def test_the_version_is_written_once_and_shown_by_the_cli() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project
    assert project["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "edgeward.__version__"}
    result = CliRunner().invoke(cli_main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"edgeward, version {edgeward.__version__}"


# -- which distribution carries what ----------------------------------------------------------


def _requirements(items: list[str]) -> dict[str, Requirement]:
    return {Requirement(item).name: Requirement(item) for item in items}


def test_a_device_install_pulls_no_models_and_no_inference_runtime() -> None:
    base = _requirements(PYPROJECT["project"]["dependencies"])
    assert not {"edgeward-models", "onnxruntime", "onnxruntime-gpu", "numpy", "pillow"} & set(base)


@pytest.mark.parametrize("extra", ["gateway", "gateway-gpu"])
def test_gateway_extras_pull_the_models_of_this_tree(extra: str) -> None:
    reqs = _requirements(PYPROJECT["project"]["optional-dependencies"][extra])
    version = MODELS_PYPROJECT["project"]["version"]
    assert MODELS_PYPROJECT["project"]["name"] == "edgeward-models"
    assert reqs["edgeward-models"].specifier.contains(version)


def test_build_is_a_dev_tool() -> None:
    assert "build" in _requirements(PYPROJECT["project"]["optional-dependencies"]["dev"])


def test_the_models_distribution_ships_every_file_the_manifest_names() -> None:
    """A model added to the manifest without a matching package-data pattern would be left
    out of the wheel; so would a licence text."""
    setuptools = MODELS_PYPROJECT["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"edgeward_models": "."}
    patterns = setuptools["package-data"]["edgeward_models"]
    manifest = json.loads((MODELS / "manifest.json").read_text())
    needed = {"manifest.json"}
    for entry in manifest["models"]:
        needed.add(entry["file"])
        needed |= set(entry["licence_file"].split(", "))
    needed |= {str(p.relative_to(MODELS)) for p in (MODELS / "LICENSES").iterdir()}
    for name in sorted(needed):
        assert (MODELS / name).is_file(), name
        assert any(fnmatch(name, pattern) for pattern in patterns), f"{name} not packaged"


# -- finding the models -----------------------------------------------------------------------


@pytest.fixture
def no_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As in an installed wheel: beside the packages there is no checkout, and no
    ``edgeward_models`` package unless a test installs one."""
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.setattr(models_mod, "_CHECKOUT", site)
    monkeypatch.setitem(sys.modules, "edgeward_models", None)  # import raises


def _install_models_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes] | None = None
) -> Path:
    site = tmp_path / "installed"
    package = site / "edgeward_models"
    package.mkdir(parents=True)
    shutil.copy(MODELS / "__init__.py", package / "__init__.py")
    shutil.copy(MODELS / "manifest.json", package / "manifest.json")
    for name, data in (files or {}).items():
        (package / name).write_bytes(data)
    monkeypatch.delitem(sys.modules, "edgeward_models", raising=False)
    monkeypatch.syspath_prepend(str(site))
    return package


def test_a_checkout_uses_its_own_models() -> None:
    assert find_models_dir() == MODELS
    assert InferenceSettings().models_dir == MODELS
    assert CoreEscalationSettings().models_dir == MODELS


@pytest.mark.usefixtures("no_checkout")
def test_an_installed_models_package_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = _install_models_package(tmp_path, monkeypatch)
    assert find_models_dir() == package
    assert InferenceSettings().models_dir == package
    settings = load_gateway_settings(None, overrides=GATEWAY_OVERRIDES)
    assert settings.inference.models_dir == package


@pytest.mark.usefixtures("no_checkout")
def test_without_models_start_up_fails_naming_the_key_and_the_fix(tmp_path: Path) -> None:
    assert find_models_dir() is None
    with pytest.raises(ConfigError, match=r"inference\.models_dir") as gateway_error:
        load_gateway_settings(None, overrides=GATEWAY_OVERRIDES)
    assert "edgeward[gateway]" in str(gateway_error.value)
    config = tmp_path / "core.toml"
    config.write_text(f'pki_dir = "{tmp_path}"\n[escalation]\n')
    with pytest.raises(ConfigError, match=r"escalation\.models_dir"):
        load_core_settings(config)


@pytest.mark.usefixtures("no_checkout")
def test_a_configured_models_dir_needs_no_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEWARD_GATEWAY_INFERENCE__MODELS_DIR", str(MODELS))
    settings = load_gateway_settings(None, overrides=GATEWAY_OVERRIDES)
    assert settings.inference.models_dir == MODELS
    assert CoreEscalationSettings(models_dir=tmp_path).models_dir == tmp_path


@pytest.mark.usefixtures("no_checkout")
def test_a_zipped_or_manifestless_package_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = _install_models_package(tmp_path, monkeypatch)
    (package / "manifest.json").unlink()
    assert find_models_dir() is None


@pytest.mark.usefixtures("no_checkout")
def test_a_tampered_model_in_the_installed_package_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    genuine = (MODELS / "centerface.onnx").read_bytes()
    tampered = bytearray(genuine)
    tampered[len(tampered) // 2] ^= 0xFF
    package = _install_models_package(tmp_path, monkeypatch, {"centerface.onnx": bytes(tampered)})
    manifest = load_manifest(find_models_dir() or tmp_path)
    assert manifest.directory == package
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch"):
        read_verified_model(manifest, "centerface")
    (package / "centerface.onnx").write_bytes(genuine)
    assert read_verified_model(manifest, "centerface") == genuine
