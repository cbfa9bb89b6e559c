"""The gateway's layers: transports depend on the front door, never on each other; library
code leaves the process environment alone.

Checked two ways: by reading every ``import`` statement of the MQTT and escalation packages
(``ast``, so an import under ``TYPE_CHECKING`` or inside a function counts too), and by
importing them in a fresh interpreter and looking at what got loaded.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import``/``from … import`` in ``path`` names (relative ones resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _is_grpc_side(name: str) -> bool:
    return name == "gateway._grpc" or name.startswith("gateway._grpc.")


@pytest.mark.parametrize("package", ["gateway/_mqtt", "gateway/_escalation", "gateway/_door"])
def test_no_module_of_these_packages_imports_the_grpc_servicer_side(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(n for n in _imported_modules(path) if _is_grpc_side(n))
        for path in sorted((ROOT / package).glob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_import_reader_sees_grpc_imports() -> None:
    """The check above can fail: the servicer's own module names the gRPC side's modules."""
    assert any(_is_grpc_side(n) for n in _imported_modules(ROOT / "gateway/_service.py"))


def test_importing_the_mqtt_side_loads_nothing_of_the_grpc_side() -> None:
    code = (
        "import json, sys\n"
        "import gateway._mqtt, gateway._escalation\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('gateway.'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = json.loads(out.stdout)
    assert "gateway._door" in loaded  # the transports' one way in
    assert [m for m in loaded if _is_grpc_side(m)] == []


def _sets_environment(path: Path) -> list[int]:
    """Lines of ``path`` that write the process environment (``os.environ[...] =``,
    ``os.environ.setdefault/update/pop``, ``os.putenv``, ``del os.environ[...]``)."""
    lines: list[int] = []

    def is_environ(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
            isinstance(node, ast.Name) and node.id == "environ"
        )

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets: list[ast.AST] = []
        if isinstance(node, ast.Assign | ast.AugAssign):
            targets = list(node.targets) if isinstance(node, ast.Assign) else [node.target]
        elif isinstance(node, ast.Delete):
            targets = list(node.targets)
        if any(isinstance(t, ast.Subscript) and is_environ(t.value) for t in targets):
            lines.append(node.lineno)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            writes = {"setdefault", "update", "pop", "popitem", "clear"}
            if node.func.attr in writes and is_environ(node.func.value):
                lines.append(node.lineno)
            if node.func.attr in {"putenv", "unsetenv"}:
                lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("package", ["gateway", "pki", "device_sdk"])
def test_library_code_never_sets_the_process_environment(package: str) -> None:
    found = {
        str(path.relative_to(ROOT)): lines
        for path in sorted((ROOT / package).rglob("*.py"))
        if (lines := _sets_environment(path))
    }
    assert found == {}


def test_the_environment_check_sees_a_write() -> None:
    """The check above can fail: the command-line entry points do set it."""
    assert _sets_environment(ROOT / "edgeward" / "_cli_core.py")


#: What builds a gRPC channel, its credentials or its target-name override.
_CHANNEL_BUILDERS = frozenset(
    {
        "secure_channel",
        "insecure_channel",
        "ssl_channel_credentials",
        "composite_channel_credentials",
        "grpc_channel_credentials",
        "server_name_option",
    }
)
_CHANNEL_OWNER = "gateway/_core_endpoints.py"


def _builds_channels(path: Path) -> list[str]:
    """``line:name`` for every use of a channel builder in ``path``: an attribute
    (``grpc.aio.secure_channel``), a name brought in by ``from … import``, or the override
    option spelled out (``"grpc.ssl_target_name_override"``)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        name: str | None = None
        if isinstance(node, ast.Attribute) and node.attr in _CHANNEL_BUILDERS:
            name = node.attr
        elif isinstance(node, ast.Name) and node.id in _CHANNEL_BUILDERS:
            name = node.id
        elif isinstance(node, ast.ImportFrom):
            name = next((a.name for a in node.names if a.name in _CHANNEL_BUILDERS), None)
        elif isinstance(node, ast.Constant) and node.value == "grpc.ssl_target_name_override":
            name = node.value
        if name is not None:
            found.append(f"{node.lineno}:{name}")
    return found


def test_only_the_core_endpoints_module_builds_gateway_channels() -> None:
    """Every gateway-to-core channel comes from one recipe (credentials from the gateway's
    identity, the core's pinned name, keepalive, message sizes), so no module can open a
    channel that skips the pin or the limits."""
    found = {
        rel: uses
        for path in sorted((ROOT / "gateway").rglob("*.py"))
        if (rel := str(path.relative_to(ROOT))) != _CHANNEL_OWNER
        and (uses := _builds_channels(path))
    }
    assert found == {}


def test_the_channel_check_sees_a_channel_being_built() -> None:
    """The check above can fail: the owner itself builds credentials and channels."""
    uses = {u.split(":", 1)[1] for u in _builds_channels(ROOT / _CHANNEL_OWNER)}
    assert {"secure_channel", "grpc_channel_credentials", "server_name_option"} <= uses
