"""The command line and the benchmarks use the packages' public names.

``gateway``, ``pki`` and ``device_sdk`` each list their surface in ``__all__`` (their
exported-members tests hold it); everything under a ``_module`` is private and may change
with no notice. The ``edgeward`` command is a user of those surfaces like any embedder, so
it imports nothing private of them. The benchmarks likewise, except where one measures an
internal stage on its own (a model session without the engine around it, the escalation
crop, the core's calibration): those imports are listed below with the reason, and the list
may only shrink (an entry nothing uses any more fails too).

Read from every ``import`` and every ``package._module`` attribute in the source (``ast``, so
an import inside a function or under ``TYPE_CHECKING`` counts).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "pki", "device_sdk")

#: Benchmark → private modules it may import, each because it measures that stage itself.
BENCH_INTERNALS: dict[str, dict[str, str]] = {
    "bench/inference.py": {
        "gateway._inference._engine": "the raw model call, to compare with the engine's",
        "gateway._inference._image": "decoding alone, as the raw pipeline's first stage",
        "gateway._inference._ssd": "pre-processing alone, as the raw pipeline's second stage",
    },
    "bench/quality.py": {
        "gateway._core._calibrate": "fits and judges the core's calibration",
        "gateway._core._escalate": "the core's models without a server (CoreModels)",
        "gateway._core._identify": "the calibration being measured",
        "gateway._core._taxonomy": "the class taxonomy the answers are scored in",
        "gateway._escalation._crop": "the crop the gateway sends, made without a gateway",
        "gateway._escalation._policy": "the region policy's selection, without a gateway",
        "gateway._inference._detection": "detections built from the edge model's output",
        "gateway._inference._image": "decoding the labelled photos",
        "gateway._inference._manifest": "the edge model's session, outside the engine",
        "gateway._inference._ssd": "the edge model's pre- and post-processing",
    },
    "bench/escalation.py": {
        "gateway._core._escalate": "the core's models without a server (CoreModels)",
        "gateway._escalation": "the gateway's Escalator and outbox without a gateway",
        "gateway._escalation._crop": "the upload the Escalator would make, timed alone",
        "gateway._inference._image": "decoding a photo into the frame the Escalator gets",
    },
    "bench/core_scale.py": {
        "gateway._core_endpoints": "many gateways' core channels in one process",
        "gateway._escalation": "many gateways' Escalators in one process",
        "gateway._inference._image": "decoding a photo into the frame the Escalator gets",
        "gateway._revocation": "many gateways' revocation feeds in one process",
    },
    "bench/mqtt.py": {
        "gateway._mqtt": "the MQTT bridge's ingest without a gateway around it",
    },
    "bench/scale.py": {
        "device_sdk._grpc": "the SDK's channel arguments (keepalive) on the raw gRPC fleet",
        "device_sdk._mqtt": "the SDK's MQTT keepalive, on the raw MQTT fleet",
    },
    "bench/sdk.py": {
        "device_sdk._mqtt": "the MQTT transport's socket options, switched for a comparison",
    },
}


def _private(name: str) -> bool:
    """``gateway._door`` or ``pki._tls.x`` (a private module of one of the packages)."""
    parts = name.split(".")
    return parts[0] in PACKAGES and any(_underscored(p) for p in parts[1:])


def _underscored(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _module_of(name: str) -> str:
    """The private module a dotted name reaches: ``gateway._a._b.name`` → ``gateway._a._b``."""
    parts = name.split(".")
    last = max(i for i, p in enumerate(parts) if _underscored(p))
    return ".".join(parts[: last + 1])


def private_uses(path: Path) -> set[str]:
    """Every private module of the packages that ``path`` imports or reaches by attribute."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
            if not _private(node.module):
                # ``from gateway import _door`` reaches a private module too.
                names += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Attribute):
            chain: list[str] = [node.attr]
            value: ast.expr = node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name):
                names = [".".join([value.id, *reversed(chain)])]
        found.update(_module_of(n) for n in names if _private(n))
    return found


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_the_command_line_uses_only_public_names() -> None:
    found = {
        str(p.relative_to(ROOT)): sorted(uses)
        for p in _sources("edgeward")
        if (uses := private_uses(p))
    }
    assert found == {}


def test_the_benchmarks_use_only_public_names_or_a_listed_internal() -> None:
    found = {
        rel: sorted(uses - set(BENCH_INTERNALS.get(rel, {})))
        for p in _sources("bench")
        if (uses := private_uses(p)) is not None and (rel := str(p.relative_to(ROOT)))
    }
    assert {k: v for k, v in found.items() if v} == {}


def test_the_list_of_measured_internals_only_shrinks() -> None:
    """An internal a benchmark no longer imports leaves the list."""
    stale = {
        rel: sorted(set(allowed) - private_uses(ROOT / rel))
        for rel, allowed in BENCH_INTERNALS.items()
    }
    assert {k: v for k, v in stale.items() if v} == {}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from gateway._config import load_gateway_settings", {"gateway._config"}),
        ("import gateway._inference._image as image", {"gateway._inference._image"}),
        ("def f():\n    from pki._tls import server_name_option", {"pki._tls"}),
        ("import device_sdk\ndevice_sdk._mqtt.SOCKET_OPTIONS = ()", {"device_sdk._mqtt"}),
        ("from gateway import _door", {"gateway._door"}),
        ("from gateway._inference._engine import _run_ssd", {"gateway._inference._engine"}),
        ("from gateway import GatewayService\nimport pki.errors", set()),
        ("from gateway.errors import ConfigError\nimport device_sdk", set()),
        ("from edgeward._logging import configure_logging", set()),
        ("import gateway\nnames = gateway.__all__, gateway.FrontDoor.__module__", set()),
    ],
)
def test_the_reader_finds_private_uses(tmp_path: Path, source: str, expected: set[str]) -> None:
    """The checks above can fail: each form of reaching a private module is seen."""
    path = tmp_path / "sample.py"
    path.write_text(source + "\n")
    assert private_uses(path) == expected


def _imported_names(path: Path) -> list[tuple[int, str, str]]:
    """``(line, module, name)`` of every ``from <our package…> import name`` in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module is not None
            and node.module.split(".")[0] in PACKAGES
        ):
            found.extend((node.lineno, node.module, alias.name) for alias in node.names)
    return found


def test_every_name_the_benchmarks_and_the_command_line_import_exists() -> None:
    """Benchmarks import most of what they measure inside functions, where nothing else would
    notice a name that moved: every such import is resolved here."""
    import importlib

    missing = []
    for path in [*_sources("bench"), *_sources("edgeward")]:
        for line, module, name in _imported_names(path):
            if not hasattr(importlib.import_module(module), name):
                missing.append(f"{path.relative_to(ROOT)}:{line}: {module}.{name}")
    assert not missing, missing
