"""The console's templates and static files ship in the wheel (package data), so an installed
gateway or core serves the same pages as a checkout."""

from __future__ import annotations

import fnmatch
import importlib.resources
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_console_file_is_declared_package_data() -> None:
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["gateway"]
    package = ROOT / "gateway"
    files = [
        p.relative_to(package).as_posix()
        for sub in ("templates", "static")
        for p in (package / "_console" / sub).iterdir()
    ]
    assert files
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


def test_templates_and_static_files_load_as_resources() -> None:
    root = importlib.resources.files("gateway._console")
    templates = {p.name for p in root.joinpath("templates").iterdir()}
    assert {"base.html", "login.html", "fleet.html", "live.html", "escalation.html"} <= templates
    static = {p.name for p in root.joinpath("static").iterdir()}
    assert {"console.css", "login.js", "fleet.js", "live.js"} <= static
