"""The release wheels work without a checkout: as a gateway host and as a device install them.

``scripts/build_dist.sh`` (the script the Docker image is built with) makes the sdists and
wheels of ``edgeward`` and ``edgeward-models``. Each is installed into a fresh virtual
environment in a temporary directory, and every command runs from another temporary directory
with no ``PYTHONPATH``: nothing of the repository is importable there.

- The gateway install (``edgeward[gateway]``) runs ``edgeward demo``: PKI, core, two gateways
  and two devices, with the models found in the installed ``edgeward-models`` package; the
  devices get detections and escalation answers.
- The device install (``edgeward`` without extras) has no onnxruntime, numpy, Pillow or
  models, and enrols against a core run from the gateway install.

pip reuses its local cache (and the index for what it lacks). The wheels are installed by file
name, as the README tells operators to, so no index can substitute another distribution.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import edgeward
from gateway import free_port
from tests.conftest import ROOT, require_tool

pytestmark = pytest.mark.slow

VERSION = edgeward.__version__


def _clean_env(venv: Path) -> dict[str, str]:
    """The environment of a user who activated ``venv``: no PYTHONPATH, no other venv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return env


def _run(
    argv: list[str | Path], *, venv: Path, cwd: Path, timeout: float, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=_clean_env(venv),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _make_venv(path: Path, cwd: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], cwd=cwd, check=True, timeout=120)
    return path


def _python_of_venv_with_build(base: Path, cwd: Path) -> str:
    """This interpreter when it has ``build`` (the dev extra), else a venv with it."""
    probe = subprocess.run([sys.executable, "-c", "import build"], capture_output=True, check=False)
    if probe.returncode == 0:
        return sys.executable
    tools = _make_venv(base / "build-tools", cwd)
    _run([tools / "bin" / "python", "-m", "pip", "install", "-q", "build>=1.2"], venv=tools,
         cwd=cwd, timeout=300)  # fmt: skip
    return str(tools / "bin" / "python")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wheels")


@pytest.fixture(scope="module")
def elsewhere(work: Path) -> Path:
    """The working directory of every command: not the repository, not above it."""
    cwd = work / "cwd"
    cwd.mkdir()
    assert ROOT not in cwd.parents
    return cwd


@pytest.fixture(scope="module")
def wheels(work: Path, elsewhere: Path) -> dict[str, Path]:
    dist = work / "dist"
    python = _python_of_venv_with_build(work, elsewhere)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_dist.sh"), str(dist)],
        env={**os.environ, "PYTHON": python},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = sorted(p.name for p in dist.iterdir())
    assert names == sorted(
        [
            f"edgeward-{VERSION}-py3-none-any.whl",
            f"edgeward-{VERSION}.tar.gz",
            "edgeward_models-1.0.0-py3-none-any.whl",
            "edgeward_models-1.0.0.tar.gz",
        ]
    ), names
    return {
        "edgeward": dist / f"edgeward-{VERSION}-py3-none-any.whl",
        "models": dist / "edgeward_models-1.0.0-py3-none-any.whl",
    }


@pytest.fixture(scope="module")
def gateway_venv(work: Path, elsewhere: Path, wheels: dict[str, Path]) -> Path:
    venv = _make_venv(work / "gateway-venv", elsewhere)
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", wheels["models"],
          f"{wheels['edgeward']}[gateway]"], venv=venv, cwd=elsewhere, timeout=600)  # fmt: skip
    return venv


@pytest.fixture(scope="module")
def device_venv(work: Path, elsewhere: Path, wheels: dict[str, Path]) -> Path:
    venv = _make_venv(work / "device-venv", elsewhere)
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", wheels["edgeward"]],
         venv=venv, cwd=elsewhere, timeout=600)  # fmt: skip
    return venv


def _site_packages(venv: Path) -> Path:
    (found,) = (venv / "lib").glob("python3.*/site-packages")
    return found


def _origins(venv: Path, cwd: Path, modules: list[str]) -> dict[str, str | None]:
    """Where each module would be imported from inside ``venv`` (None: not importable)."""
    code = (
        "import importlib.util, json, sys\n"
        "out = {}\n"
        "for m in sys.argv[1:]:\n"
        "    spec = importlib.util.find_spec(m)\n"
        "    out[m] = None if spec is None else spec.origin\n"
        "print(json.dumps(out))\n"
    )
    proc = _run([venv / "bin" / "python", "-c", code, *modules], venv=venv, cwd=cwd, timeout=60)
    result: dict[str, str | None] = json.loads(proc.stdout)
    return result


@pytest.fixture(scope="module")
def demo_root(gateway_venv: Path, elsewhere: Path) -> Path:
    require_tool("mosquitto")
    root = elsewhere / "demo"
    started = time.monotonic()
    proc = _run(
        ["edgeward", "demo", "--dir", root, "--duration", "12", "--no-live", "--json-summary"],
        venv=gateway_venv,
        cwd=elsewhere,
        timeout=300,
        check=False,
    )
    print(f"demo from the wheels: {time.monotonic() - started:.1f} s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith('{"summary"'))
    (root / "summary.json").write_text(json.dumps(json.loads(line)["summary"]))
    return root


def test_the_gateway_install_runs_the_demo_from_its_wheels(
    gateway_venv: Path, elsewhere: Path, demo_root: Path
) -> None:
    site = _site_packages(gateway_venv)
    origins = _origins(gateway_venv, elsewhere, ["edgeward", "gateway", "edgeward_models"])
    for module, origin in origins.items():
        assert origin is not None, module
        assert Path(origin).is_relative_to(site), (module, origin)
    version = _run(["edgeward", "--version"], venv=gateway_venv, cwd=elsewhere, timeout=60)
    assert version.stdout.strip() == f"edgeward, version {VERSION}"
    # The services were told nothing about the models: they found the installed package.
    found = _run(
        ["python", "-c", "from gateway._models import find_models_dir; print(find_models_dir())"],
        venv=gateway_venv,
        cwd=elsewhere,
        timeout=60,
    )
    assert Path(found.stdout.strip()) == site / "edgeward_models"
    for config in (demo_root / "config").glob("*.toml"):
        assert "models_dir" not in config.read_text(), config.name
    summary = json.loads((demo_root / "summary.json").read_text())
    assert summary["escalation"] is True
    devices = summary["devices"]
    assert set(devices) == {"pet-camera-1", "robot-vacuum-1"}
    for device_id, report in devices.items():
        assert report["answered"] > 0, device_id
        assert report["labels"], device_id  # real detections from the edge model
    # Escalations reached the core's models (also from the installed package) and came back.
    assert sum(r["escalated"] for r in devices.values()) > 0
    assert sum(r["answers"] for r in devices.values()) > 0
    assert summary["unanswered_frames"] == {"robot-vacuum-1": 0}


def test_an_installed_gateway_builds_its_brokers_ingest_limit_plugin(
    gateway_venv: Path, elsewhere: Path
) -> None:
    """The wheel ships the plugin's source and build script; built as the README says, the
    plugin lies where the installed gateway looks for it (``BUILT_PLUGIN``)."""
    require_tool("cc")
    site = _site_packages(gateway_venv)
    where = _run(
        [
            "python",
            "-c",
            "from gateway._mqtt import BUILT_PLUGIN, PLUGIN_SOURCE; "
            "print(PLUGIN_SOURCE); print(BUILT_PLUGIN)",
        ],
        venv=gateway_venv,
        cwd=elsewhere,
        timeout=60,
    )
    source, built = (Path(line) for line in where.stdout.split())
    assert source.is_file()
    assert source.is_relative_to(site)
    assert not built.exists()  # a wheel carries no binary
    _run(["sh", str(source.parent / "build.sh")], venv=gateway_venv, cwd=elsewhere, timeout=120)
    assert built.is_file()


def test_the_device_install_has_no_inference_stack(device_venv: Path, elsewhere: Path) -> None:
    site = _site_packages(device_venv)
    origins = _origins(
        device_venv,
        elsewhere,
        ["device_sdk", "pki", "onnxruntime", "numpy", "PIL", "edgeward_models"],
    )
    assert origins["onnxruntime"] is None
    assert origins["numpy"] is None
    assert origins["PIL"] is None
    assert origins["edgeward_models"] is None
    for module in ("device_sdk", "pki"):
        origin = origins[module]
        assert origin is not None
        assert Path(origin).is_relative_to(site), (module, origin)
    _run(["python", "-c", "import device_sdk"], venv=device_venv, cwd=elsewhere, timeout=60)
    helped = _run(["edgeward", "enroll", "--help"], venv=device_venv, cwd=elsewhere, timeout=60)
    assert "--token" in helped.stdout


def test_the_device_install_enrols_against_a_core(
    gateway_venv: Path, device_venv: Path, elsewhere: Path, demo_root: Path
) -> None:
    """A core from the gateway install (the demo's PKI and configuration, fresh ports); a
    one-time token; ``edgeward enroll`` from the device install."""
    enrol_port, core_port = free_port(), free_port()
    env = _clean_env(gateway_venv) | {
        "EDGEWARD_CORE_ENROL_LISTEN": f"127.0.0.1:{enrol_port}",
        "EDGEWARD_CORE_LISTEN": f"127.0.0.1:{core_port}",
    }
    log = (elsewhere / "core.log").open("w")
    core = subprocess.Popen(
        ["edgeward", "core", "run", "--config", str(demo_root / "config" / "core.toml")],
        cwd=elsewhere,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        from edgeward._stack import wait_port

        asyncio.run(wait_port(enrol_port, timeout_s=90))
        token = _run(
            ["edgeward", "pki", "token", "--dir", demo_root / "pki", "--device-id",
             "wheel-device-1", "--type", "pet_camera", "--region", "kr-seoul", "--ttl", "15m"],
            venv=gateway_venv, cwd=elsewhere, timeout=120,
        ).stdout.strip().splitlines()[-1]  # fmt: skip
        identity = elsewhere / "wheel-device-1"
        enrolled = _run(
            ["edgeward", "enroll", "--endpoint", f"127.0.0.1:{enrol_port}", "--ca-bundle",
             demo_root / "pki" / "ca-bundle.pem", "--token", token, "--out", identity,
             "--core-endpoint", f"127.0.0.1:{core_port}", "--timeout", "60"],
            venv=device_venv, cwd=elsewhere, timeout=120, check=False,
        )  # fmt: skip
        assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
        assert token not in enrolled.stdout + enrolled.stderr
        assert (identity / "cert.pem").is_file()
        assert stat.S_IMODE((identity / "key.pem").stat().st_mode) == 0o600
        # The token was spent: a second enrolment with it is refused.
        again = _run(
            ["edgeward", "enroll", "--endpoint", f"127.0.0.1:{enrol_port}", "--ca-bundle",
             demo_root / "pki" / "ca-bundle.pem", "--token", token, "--out",
             elsewhere / "wheel-device-1-again", "--timeout", "60"],
            venv=device_venv, cwd=elsewhere, timeout=120, check=False,
        )  # fmt: skip
        assert again.returncode != 0
    finally:
        if core.poll() is None:
            os.killpg(core.pid, signal.SIGTERM)
        try:
            core.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(core.pid, signal.SIGKILL)
            core.wait(timeout=30)
        log.close()


def _impostor_models_wheel(directory: Path, version: str) -> Path:
    """A wheel named edgeward-models with a higher version, as a squatter on an index would
    publish (empty: only its name and version matter to the resolver)."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"edgeward_models-{version}-py3-none-any.whl"
    info = f"edgeward_models-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("edgeward_models/__init__.py", "")
        zf.writestr(
            f"{info}/METADATA",
            f"Metadata-Version: 2.1\nName: edgeward-models\nVersion: {version}\n",
        )
        zf.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{info}/RECORD", "")
    return wheel


def test_installing_by_file_name_ignores_a_higher_version_elsewhere(
    work: Path, elsewhere: Path, wheels: dict[str, Path], device_venv: Path
) -> None:
    """Dependency confusion: an index offering edgeward-models 1.0.99 does not replace the
    built wheel when the wheels are installed by file name (README, Dockerfile); installing
    by project name would take the impostor."""
    impostor = _impostor_models_wheel(work / "impostor", "1.0.99")

    def resolved(*requirements: str | Path) -> str:
        report = work / "report.json"
        _run(["python", "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
              "--find-links", impostor.parent, "--report", report, *requirements],
             venv=device_venv, cwd=elsewhere, timeout=300)  # fmt: skip
        chosen = {
            item["metadata"]["name"]: item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]
        }
        return chosen["edgeward-models"]

    assert resolved(wheels["models"], f"{wheels['edgeward']}[gateway]") == "1.0.0"
    # The check can fail: by name, the resolver prefers the impostor.
    assert resolved("--find-links", wheels["models"].parent, "edgeward-models~=1.0") == "1.0.99"
