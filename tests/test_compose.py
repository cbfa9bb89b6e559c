"""docker-compose.yml validates, and it runs only commands and configuration keys that exist.

Docker itself does not run here; ``docker-compose config`` checks the file, and the rest is
checked against the real CLI and the real settings models: every ``edgeward …`` command line
in the file parses, every mounted configuration file validates, and the gateways' keys are the
ones ``edgeward demo`` uses.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import click
import pytest

from edgeward._stack import DemoStack
from edgeward.cli import main as cli_main
from gateway import load_core_settings, load_gateway_settings
from tests.conftest import ROOT, require_tool

COMPOSE = ROOT / "docker-compose.yml"
_YAML_TO_JSON = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"


def _compose_config() -> dict[str, Any]:
    tool = require_tool("docker-compose")
    out = subprocess.run(
        [tool, "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    ).stdout
    # docker-compose is a Python program with PyYAML: its interpreter reads YAML for us.
    interpreter = Path(tool).read_text().splitlines()[0].removeprefix("#!").strip().split()[0]
    data = subprocess.run(
        [
            interpreter,
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ],
        input=out,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    result: dict[str, Any] = json.loads(data)
    return result


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _compose_config()


CORES = ("core-a", "core-b")


def test_compose_config_validates(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"pki-init", "db-init", "postgres", *CORES, "enrol-devices"} <= set(services)
    assert {"gw-kr-seoul", "gw-us-nyc", "pet-camera", "robot-vacuum"} <= set(services)
    for core in CORES:
        depends = services[core]["depends_on"]
        assert depends["pki-init"]["condition"] == "service_completed_successfully"
        assert depends["postgres"]["condition"] == "service_healthy"


def _core_settings(compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The settings a core service runs with: its mounted file, then its environment."""
    service = compose["services"][name]
    for key, value in (service.get("environment") or {}).items():
        monkeypatch.setenv(key, str(value))
    try:
        return load_core_settings(_mounted_configs(compose)[name])
    finally:
        for key in service.get("environment") or {}:
            monkeypatch.delenv(key)


def test_core_replicas_share_one_postgres_registry(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two cores, one database, each its own identity; gateways and devices know both."""
    services = compose["services"]
    replicas = [_core_settings(compose, name, monkeypatch) for name in CORES]
    registries = {str(r.registry) for r in replicas}
    assert len(registries) == 1
    (url,) = registries
    assert url.startswith("postgresql://edgeward@postgres:")  # no password in the URL
    assert len({r.core_id for r in replicas}) == len({r.identity_dir for r in replicas}) == 2
    for name in CORES:
        env = services[name]["environment"]
        assert env["PGPASSFILE"].startswith("/db-secret/")
        assert env["EDGEWARD_PKI_REGISTRY"] == url
        assert "db" in services[name]["networks"]
    # The database is on an internal network of the cores alone, and publishes nothing.
    assert compose["networks"]["db"].get("internal") is True
    assert services["postgres"]["networks"] == {"db": None} or list(
        services["postgres"]["networks"]
    ) == ["db"]
    assert not services["postgres"].get("ports")
    on_db = {n for n, s in services.items() if "db" in (s.get("networks") or {})}
    assert on_db == {"postgres", *CORES}
    # The password is made at the first start, never written in the repository.
    assert "POSTGRES_PASSWORD" not in services["postgres"]["environment"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/db-secret/")
    configs = _mounted_configs(compose)
    for name in ("gw-kr-seoul", "gw-us-nyc"):
        assert load_gateway_settings(configs[name]).core_addresses == (
            "core-a:7443",
            "core-b:7443",
        )
    enrol = _command_lines(services["enrol-devices"])
    assert enrol
    for argv in enrol:
        endpoints = {argv[i + 1] for i, a in enumerate(argv) if a == "--endpoint"}
        assert endpoints == {"core-a:7444", "core-b:7444"}


def _command_lines(service: dict[str, Any]) -> list[list[str]]:
    """Every ``edgeward …`` invocation of a service, as argv lists without ``edgeward``."""
    if service.get("image") != "edgeward:latest":
        return []  # another image (PostgreSQL)
    entry = service.get("entrypoint") or ["edgeward"]
    command = service.get("command") or []
    if isinstance(command, str):
        command = shlex.split(command)
    if entry[:1] == ["edgeward"]:
        return [list(command)]
    # A shell script: one edgeward command per line (ignoring shell around it).
    lines: list[list[str]] = []
    for script in command:
        for raw in str(script).splitlines():
            line = raw.strip()
            m = re.search(r"\bedgeward (.*?)(?:\s*\||$)", line)
            if m and not line.startswith("#"):
                argv = shlex.split(m.group(1).replace("$$(", "$("), posix=True)
                lines.append([a if not a.startswith("$(") else "TOKEN" for a in argv])
    return lines


def _parse(argv: list[str]) -> str:
    """Resolve ``argv`` with the real CLI and parse its options (nothing runs); return the
    command path. Unknown commands and options fail; a file that exists only inside the
    container is fine."""
    command: click.Command = cli_main
    args = list(argv)
    path: list[str] = []
    while isinstance(command, click.Group):
        name = args.pop(0)
        sub = command.get_command(click.Context(command), name)
        assert sub is not None, f"unknown command: edgeward {' '.join([*path, name])}"
        path.append(name)
        command = sub
    try:
        command.make_context(" ".join(path), args)
    except click.BadParameter as exc:
        if "does not exist" not in str(exc):
            raise
    return " ".join(path)


def test_device_types_are_spelled_as_in_the_contract(compose: dict[str, Any]) -> None:
    """Tokens name the device types as DESIGN.md does, and each simulated device plays the
    kind its token registered."""
    argvs = [argv for service in compose["services"].values() for argv in _command_lines(service)]
    types = {
        a[a.index("--device-id") + 1]: a[a.index("--type") + 1] for a in argvs if "--type" in a
    }
    assert types == {"pet-camera-1": "pet_camera", "robot-vacuum-1": "robot_vacuum"}
    kinds = {a[a.index("--kind") + 1] for a in argvs if "--kind" in a}
    assert kinds == set(types.values())
    for path in (ROOT / "deploy" / "compose").glob("gateway-*.toml"):
        # The gateways' default authorisation covers both types: no table to keep in step.
        assert "authorisation" not in tomllib.loads(path.read_text()), path.name


def test_every_edgeward_command_in_compose_exists(compose: dict[str, Any]) -> None:
    seen = {
        _parse(argv) for service in compose["services"].values() for argv in _command_lines(service)
    }
    assert {"pki init", "pki issue-server", "pki token", "core run", "gateway run", "enroll",
            "device simulate"} <= seen  # fmt: skip


def _mounted_configs(compose: dict[str, Any]) -> dict[str, Path]:
    configs: dict[str, Path] = {}
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if str(source).endswith(".toml"):
                configs[name] = Path(source)
    return configs


def _keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in data.items():
        path = f"{prefix}{key}"
        out.add(path)
        if isinstance(value, dict) and key not in {"regions", "device_types"}:
            out |= _keys(value, path + ".")
    return out


def test_configuration_files_validate_and_match_the_demo(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    configs = _mounted_configs(compose)
    assert set(configs) == {*CORES, "gw-kr-seoul", "gw-us-nyc"}
    assert configs["core-a"] == configs["core-b"]
    core = load_core_settings(configs["core-a"])
    assert {g.id for g in core.gateways} == {"kr-seoul", "us-nyc"}
    demo = DemoStack(tmp_path, mqtt=True, escalation=True)
    demo_keys = _keys(demo.gateway_config("kr-seoul"))
    for name in ("gw-kr-seoul", "gw-us-nyc"):
        path = configs[name]
        settings = load_gateway_settings(path)
        assert settings.gateway_id == name.removeprefix("gw-")
        assert settings.mqtt is not None
        assert settings.escalation is not None
        # The components validate their own tables.
        from gateway import EscalationSettings, MqttSettings

        settings.section("mqtt", MqttSettings)
        settings.section("escalation", EscalationSettings)
        assert _keys(tomllib.loads(path.read_text())) == demo_keys, name
    core_keys = _keys(tomllib.loads(configs["core-a"].read_text()))
    # The compose cores also name themselves by their service names and share a PostgreSQL
    # registry; the rest is the demo's.
    assert core_keys - {"server_names", "registry"} == _keys(demo.core_config())


def test_the_checker_refuses_unknown_commands_and_options() -> None:
    with pytest.raises(click.NoSuchOption):
        _parse(["gateway", "run", "--no-such-option", "x"])
    with pytest.raises(AssertionError, match="unknown command"):
        _parse(["pki", "no-such-command"])


def _published_targets(service: dict[str, Any]) -> set[int]:
    """Container ports a service publishes on the host (docker-compose's normalised form)."""
    targets: set[int] = set()
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            targets.add(int(entry["target"]))
        else:  # "HOST:CONTAINER[/proto]" or "CONTAINER"
            targets.add(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    return targets


def test_no_metrics_port_is_published_or_on_the_devices_network(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Prometheus endpoint is plain HTTP without authentication: the core and each gateway
    bind it to their own address on an internal network that no device joins, and no service
    publishes it on the host."""
    services = compose["services"]
    networks = compose.get("networks", {})
    configs = _mounted_configs(compose)
    gateways = [name for name in configs if name.startswith("gw-")]
    assert gateways == ["gw-kr-seoul", "gw-us-nyc"]
    listens = {name: load_gateway_settings(configs[name]).metrics_listen for name in gateways}
    for core in CORES:
        listens[core] = _core_settings(compose, core, monkeypatch).metrics_listen
    for name, metrics_listen in listens.items():
        assert metrics_listen is not None
        host, _, port = metrics_listen.rpartition(":")
        assert host not in {"", "0.0.0.0", "::", "[::]"}, name
        for other in services.values():
            assert int(port) not in _published_targets(other), name
        joined = services[name]["networks"]
        on = [net for net, conf in joined.items() if (conf or {}).get("ipv4_address") == host]
        assert len(on) == 1, f"{name}: metrics_listen {host} is no address of the service"
        assert networks[on[0]].get("internal") is True, on[0]
        for device in ("pet-camera", "robot-vacuum"):
            assert on[0] not in (services[device].get("networks") or {"default": None}), device


def test_the_metrics_check_sees_a_published_port(compose: dict[str, Any]) -> None:
    assert _published_targets({"ports": ["9464:9464", "127.0.0.1:9465:9465/tcp"]}) == {
        9464,
        9465,
    }
    assert _published_targets({"ports": [{"published": 1, "target": 9464}]}) == {9464}
    assert 8443 in _published_targets(compose["services"]["gw-kr-seoul"])


# -- the image ----------------------------------------------------------------------------------

DOCKERFILE = ROOT / "Dockerfile"


def _dockerfile_stages() -> list[tuple[str, list[str]]]:
    """(stage name, instructions) per ``FROM``; continuation lines joined, comments dropped."""
    instructions: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line.removesuffix(chr(92)).strip()}".strip()
        if not line.endswith("\\"):
            instructions.append(pending)
            pending = ""
    stages: list[tuple[str, list[str]]] = []
    for instruction in instructions:
        if instruction.upper().startswith("FROM "):
            words = instruction.split()
            name = words[3] if len(words) >= 4 and words[2].upper() == "AS" else ""
            stages.append((name, []))
        else:
            stages[-1][1].append(instruction)
    return stages


def test_the_image_installs_the_built_wheels_not_the_source_tree() -> None:
    stages = _dockerfile_stages()
    assert [name for name, _ in stages] == ["wheels", "plugin", "install", ""]
    (_, build), (_, plugin), (_, install), (_, final) = stages
    assert any(i.startswith("RUN") and "scripts/build_dist.sh /wheels" in i for i in build)
    # The broker's ingest limit plugin is built from its C source alone, against Debian's
    # Mosquitto headers (the same Debian as the final image's Mosquitto).
    assert [i for i in plugin if i.startswith("COPY")] == [
        "COPY gateway/_mqtt/ingest/edgeward_ingest.c gateway/_mqtt/ingest/build.sh "
        "./gateway/_mqtt/ingest/",
    ]
    assert "mosquitto-dev" in " ".join(plugin)
    assert any(i.startswith("RUN sh gateway/_mqtt/ingest/build.sh") for i in plugin)
    install_runs = " ".join(i for i in install if i.startswith("RUN"))
    # By file name: no index can offer another edgeward or edgeward-models.
    assert "/wheels/edgeward_models-*.whl" in install_runs
    assert '"$(echo /wheels/edgeward-*.whl)[gateway]"' in install_runs
    # The final image gets the installed environment and nothing of the source tree.
    copies = [i for i in final if i.split()[0] in {"COPY", "ADD"}]
    assert copies == [
        "COPY --from=install /opt/edgeward /opt/edgeward",
        # Where the gateway finds the plugin by default (beside its package).
        "COPY --from=plugin /src/gateway/_mqtt/ingest/edgeward_ingest.so "
        "/opt/edgeward/lib/python3.11/site-packages/gateway/_mqtt/ingest/",
    ]
    for _, instructions in stages:
        for instruction in instructions:
            assert not re.search(r"pip install.*\s\.(\[|\s|$)", instruction), instruction
    assert any(i.startswith("RUN edgeward --version") for i in final)
    # Installed as root, run as an unprivileged user: the services cannot rewrite their models
    # or the manifest that vouches for them.
    users = [i for i in final if i.startswith("USER ")]
    assert users == ["USER edgeward"]
    assert final.index(copies[0]) < final.index(users[0])


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        if pattern.startswith("**/") and any(fnmatch(part, bare) for part in parts):
            return True
        if any(fnmatch("/".join(parts[: n + 1]), pattern) for n in range(len(parts))):
            return True
    return False


def test_the_build_context_holds_what_the_wheels_stage_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    (_, build) = _dockerfile_stages()[0]
    sources = [
        src for i in build if i.startswith("COPY ") and "--from" not in i for src in i.split()[1:-1]
    ]
    assert {"pyproject.toml", "models", "scripts/build_dist.sh", "edgeward"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not _ignored(src, patterns), src
    # Local build leftovers stay out of the image.
    for leftover in ("dist", "build", "models/build", "models/edgeward_models.egg-info"):
        assert _ignored(leftover, patterns), leftover


def test_compose_configurations_use_the_models_installed_in_the_image(
    compose: dict[str, Any],
) -> None:
    """The image has no checkout: a models_dir in a mounted configuration would point at
    nothing. Unset, the services use the installed edgeward-models package."""
    for name, path in _mounted_configs(compose).items():
        assert "models_dir" not in _keys(tomllib.loads(path.read_text())), name
        assert not any(k.endswith(".models_dir") for k in _keys(tomllib.loads(path.read_text())))
