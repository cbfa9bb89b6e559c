"""The command line, the benchmarks and the tests use the packages' public names.

``gateway``, ``pki`` and ``device_sdk`` each list their surface in ``__all__`` (their
exported-members tests hold it); everything under a ``_module`` is private and may change
with no notice. The ``edgeward`` command is a user of those surfaces like any embedder, so
it imports nothing private of them. The benchmarks likewise, except where one measures an
internal stage on its own (a model session without the engine around it, the escalation
crop, the core's calibration): those imports are listed below with the reason, and the list
may only shrink (an entry nothing uses any more fails too).

The tests too: a name the surface offers (``gateway.__all__``, ``gateway.errors``, ``pki``,
``device_sdk``…) is imported from the surface, never through a private module; a test that
exercises one internal unit on its own (the MQTT packet reader, the micro-batcher, the outbox)
names that unit in :data:`TEST_INTERNALS`, with the reason, and that list may only shrink too.

Read from every ``import`` and every ``package._module`` attribute in the source (``ast``, so
an import inside a function or under ``TYPE_CHECKING`` counts).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Iterator, Mapping
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
    "bench/ingest_limit.py": {
        "gateway._mqtt": "the ingest limit plugin's built path and its configuration lines",
    },
    "bench/grpc_stages.py": {
        "gateway._door": "stamps the front door's detect, a stage of the served round trip",
        "gateway._inference": "stamps the engine's hand-off to its thread",
        "gateway._inference._engine": "the model call alone, and stamps around the engine's",
        "gateway._inference._image": "decoding alone, the client's reference stage",
        "gateway._inference._ssd": "pre-processing alone, the client's reference stage",
        "gateway._wire": "stamps the gRPC handler's (de)serialisation",
    },
    "bench/quality.py": {
        "gateway._core._calibrate": "fits and judges the core's calibration",
        "gateway._core._escalate": "the core's models without a server (CoreModels)",
        "gateway._core._identify": "the calibration being measured",
        "gateway._core._taxonomy": "the class taxonomy the answers are scored in",
        "gateway._escalation._crop": "the crop the gateway sends, made without a gateway",
        "gateway._escalation._policy": "the region policy's selection, without a gateway",
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
    found: list[tuple[int, str, str]] = []
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


# -- the tests ---------------------------------------------------------------------------------

#: The modules whose ``__all__`` is the public surface of each package.
SURFACES = {
    "gateway": ("gateway", "gateway.errors"),
    "pki": ("pki", "pki.errors"),
    "device_sdk": ("device_sdk", "device_sdk.errors"),
}


def public_path(module: str, name: str) -> str | None:
    """``surface.name`` where a surface offers the object that ``module.name`` is, else None.

    A class or a function is found under any name (``CallerNotAllowed`` re-exported as
    ``PermissionDenied`` is still the surface's); any other value only under its own name.
    """
    missing = object()
    value = getattr(importlib.import_module(module), name, missing)
    if value is missing:
        return None
    by_identity = inspect.isclass(value) or inspect.isfunction(value)
    for surface_name in SURFACES[module.partition(".")[0]]:
        surface = importlib.import_module(surface_name)
        for exported in surface.__all__:
            if (exported == name or by_identity) and getattr(surface, exported) is value:
                return f"{surface_name}.{exported}"
    return None


def _private_names(path: Path) -> Iterator[tuple[int, str, str]]:
    """``(line, private module, name)`` for each name ``path`` takes from a private module:
    ``from gateway._door import FrontDoor``, ``import gateway._models as m; m.find_models_dir``,
    ``gateway._mqtt.MqttBridge``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and _private(a.name)})
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            for alias in node.names:
                if _private(node.module):
                    yield node.lineno, node.module, alias.name
                elif _private(module := f"{node.module}.{alias.name}"):
                    aliases[alias.asname or alias.name] = module
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain = [node.attr]
        value: ast.expr = node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if not isinstance(value, ast.Name):
            continue
        dotted = ".".join([aliases.get(value.id, value.id), *reversed(chain)])
        if _private(dotted) and not _underscored(node.attr):
            module = _module_of(dotted)
            if module != dotted and module.count(".") + 1 == dotted.count("."):
                yield node.lineno, module, node.attr


def surface_names_taken_privately(path: Path) -> list[str]:
    """``line: module.name → surface.name`` for each name ``path`` should take from the surface."""
    return [
        f"{line}: {module}.{name} → {public}"
        for line, module, name in sorted(set(_private_names(path)))
        if (public := public_path(module, name)) is not None
    ]


#: Test file, or folder (ending in ``/``) → private modules its tests exercise on their own,
#: each with the reason. Everything else a test needs comes from the surface.
TEST_INTERNALS: dict[str, dict[str, str]] = {
    # -- the gateway's middle: admission, fairness, refusals, the channels to the core
    "tests/gateway/test_units.py": {
        "gateway._door": "admission's parts one by one: the authoriser, the budget, telemetry",
        "gateway._grpc": "the servicer's live calls (LiveCalls) without a server",
        "gateway._grpc._identity": "judging a peer certificate at an injected clock",
        "gateway._revocation": "the registry revocation poller against a file registry",
    },
    "tests/gateway/test_live_calls.py": {
        "gateway._grpc": "the servicer's live calls (LiveCalls): a cut during a guarded wait",
    },
    "tests/gateway/test_fairness.py": {
        "gateway._door": "the per-device fair queue, the budget, frames admitted by hand",
        "gateway._inference._batcher": "the micro-batcher's turn per device, with a fake backend",
    },
    "tests/gateway/test_edge_models.py": {
        "gateway._door": "frames admitted by hand, straight into the front door's pipeline",
    },
    "tests/gateway/test_refusal_flood.py": {
        "gateway._refusals": "the refusal log's bounds, fed directly",
    },
    "tests/gateway/test_core_failover.py": {
        "gateway._core_endpoints": "the gateway's channels to several cores, failing over",
        "gateway._door": "the device directory that asks the core",
        "gateway._revocation": "the revocation feed resuming on another core",
    },
    "tests/gateway/test_errors.py": {
        "gateway._core._status": "the core servicers' status helper uses the one mapping",
    },
    "tests/gateway/test_listen_conflicts.py": {
        "gateway._mqtt": "the managed Mosquitto's listeners, started on their own",
    },
    "tests/console/": {
        "gateway._console": "the console's parts (signed links, live feed, audit ring) alone",
    },
    # -- the MQTT transport
    "tests/_support/mqtt.py": {
        "gateway._mqtt": "the broker, its enforcer and the bridge, without a gateway around them",
    },
    "tests/mqtt/": {
        "gateway._mqtt": "the MQTT transport (broker, ACLs, bridge) these tests exercise",
    },
    "tests/mqtt/test_client_ids.py": {
        "gateway._mqtt._tasks": "the task set that closes reconnect loops",
    },
    "tests/mqtt/test_tasks.py": {
        "gateway._mqtt._tasks": "the task set that closes reconnect loops",
    },
    "tests/mqtt/test_config.py": {
        "gateway._mqtt._mosquitto_conf": "the rendered broker configuration's client ids",
    },
    "tests/mqtt/test_device_trust.py": {
        "gateway._grpc._identity": "the gRPC listener's judge of the same certificate",
    },
    "tests/mqtt/test_limits.py": {
        "gateway._mqtt._config": "the files the broker reserves, against the open-files limit",
        "gateway._service": "the process limits the service sets at start-up",
    },
    "tests/mqtt/test_subscriber.py": {
        "gateway._mqtt._ingest": "telemetry ingest batching",
        "gateway._mqtt._subscriber": "the MQTT packet reader and subscriber, byte by byte",
        "gateway._mqtt._telemetry": "telemetry batches collected for ingest",
    },
    "tests/mqtt/test_device_chain.py": {
        "device_sdk._mqtt": "the TLS context the SDK's MQTT transport presents to the broker",
    },
    "tests/mqtt/test_telemetry.py": {
        "gateway._mqtt._telemetry": "the telemetry payload parser",
    },
    "tests/sdk/test_mqtt_transport.py": {
        "gateway._mqtt": "the gateway's bridge, which the SDK's MQTT transport talks to",
    },
    "tests/sdk/test_mqtt_refusal.py": {
        "device_sdk._grpc": "Busy, the transports' refusal error, and its retry-after bound",
        "device_sdk._mqtt": "the MQTT session and its reading of PUBACK reason codes",
        "gateway._mqtt": "the bridge and the broker's ingest limit the session is refused by",
    },
    # -- inference and the models
    "tests/inference/test_batcher.py": {
        "gateway._inference._batcher": "the micro-batcher, with a fake backend",
    },
    "tests/inference/test_cache.py": {
        "gateway._inference._cache": "the cache's digests",
        "gateway._inference._image": "decoding, for the digests' input",
    },
    "tests/inference/test_catalog.py": {
        "gateway._inference._catalog": "the catalog of edge models, loaded and released",
    },
    "tests/inference/test_engine.py": {
        "gateway._inference._engine": "a prepared frame as the model receives it (_CacheHit)",
        "gateway._inference._runtime": "the onnxruntime session options and core count",
    },
    "tests/inference/test_image_decode.py": {
        "gateway._inference._image": "image decoding and its bounds",
    },
    "tests/test_models.py": {
        "gateway._inference._classifier": "the classifier's pre- and post-processing",
        "gateway._inference._faces": "the face model's pre- and post-processing",
        "gateway._inference._image": "decoding the photos",
        "gateway._inference._manifest": "the manifest's integrity checks and sessions",
        "gateway._inference._nanodet": "NanoDet's pre- and post-processing",
        "gateway._inference._ssd": "the SSD's anchors, pre- and post-processing",
    },
    "tests/test_packaging.py": {
        "gateway._inference._manifest": "every packaged model against the manifest",
        "gateway._models": "no checkout beside the packages, as in an installed wheel",
    },
    # -- escalation, edge and core
    "tests/escalation/_gateway_proc.py": {
        "gateway._escalation": "an Escalator in a process of its own",
        "gateway._inference._image": "decoding the photo the Escalator gets",
    },
    "tests/escalation/conftest.py": {
        "gateway._escalation": "Escalators against a real core, without a gateway",
        "gateway._inference._image": "decoding the photos",
        "gateway._inference._manifest": "the edge model's session, outside the engine",
        "gateway._inference._ssd": "the edge model's pre- and post-processing",
    },
    "tests/escalation/test_calibrate.py": {
        "gateway._core._calibrate": "fitting and judging the core's calibration",
        "gateway._core._identify": "the candidates the calibration weighs",
    },
    "tests/escalation/test_core_models.py": {
        "gateway._core._escalate": "the core's models without a server",
        "gateway._escalation": "the crop the gateway would send",
    },
    "tests/escalation/test_crop.py": {
        "gateway._escalation._crop": "the upload's shrink and encoding, pixel by pixel",
    },
    "tests/escalation/test_end_to_end.py": {
        "gateway._escalation": "the plug-in and its face redactor",
        "gateway._inference._image": "decoding the photos",
        "gateway._inference._manifest": "the edge model's labels, from the manifest",
        "gateway._service": "the plug-ins a configuration turns on",
    },
    "tests/escalation/test_escalator.py": {
        "gateway._door": "the marks rendered into the answer",
        "gateway._escalation": "the Escalator, its crop and face redactor",
        "gateway._inference._image": "decoding the photos",
    },
    "tests/escalation/test_first_attempt.py": {
        "gateway._escalation": "the Escalator's first attempt, before the outbox",
        "gateway._escalation._outbox": "the outbox it falls back to",
    },
    "tests/escalation/test_identify.py": {
        "gateway._core._identify": "the core's decision between candidates",
    },
    "tests/escalation/test_outbox.py": {
        "gateway._escalation": "the outbox, restarted and full",
    },
    "tests/escalation/test_policy.py": {
        "gateway._door": "the marks rendered into the answer",
        "gateway._escalation": "which detections escalate, and the budgets",
        "gateway._events": "escalation ids that carry their reason",
    },
    "tests/escalation/test_quality.py": {
        "gateway._core._calibrate": "the labelled photos and their tally",
        "gateway._core._escalate": "the core's models without a server",
        "gateway._core._identify": "the candidates and the calibration judged",
        "gateway._core._taxonomy": "the class taxonomy answers are scored in",
        "gateway._inference._image": "decoding the labelled photos",
    },
    "tests/escalation/test_replicas.py": {
        "gateway._core._escalate": "the answer store shared by core replicas",
    },
    "tests/escalation/test_taxonomy.py": {
        "gateway._core._taxonomy": "the class taxonomy",
        "gateway._inference._manifest": "the labels the manifest lists",
    },
    # -- the core and the PKI
    "tests/pki/test_replicated_answers.py": {
        "gateway._core._escalate": "the answer store",
        "gateway._core._escalate_answers": "the PostgreSQL answer store",
    },
    "tests/pki/test_role_pinning.py": {
        "device_sdk._grpc": "the SDK's channel pool and probe, at a server of the wrong role",
        "gateway._core._server": "the core's own server identity",
        "gateway._escalation._client": "the gateway's client to the core",
    },
    # -- the device SDK's parts
    "tests/sdk/test_enrol_failover.py": {
        "device_sdk._enrollment": "the list of enrolment endpoints tried in turn",
    },
    "tests/sdk/test_event_inbox.py": {
        "device_sdk._events": "the event inbox",
        "device_sdk._queue": "the disk queue under it",
    },
    "tests/sdk/test_identity.py": {
        "device_sdk._identity": "the signed directory stored beside the identity",
    },
    "tests/sdk/test_queue.py": {
        "device_sdk._queue": "the on-disk outbox",
    },
    "tests/sdk/test_reconnect_storm.py": {
        "device_sdk._selection": "the jittered pause between probes while no gateway answers",
    },
    "tests/sdk/test_renewal_plan.py": {
        "device_sdk._renewal": "the renewal loop at an injected clock",
    },
    "tests/sdk/test_retry_after.py": {
        "device_sdk._grpc": "how the SDK classifies a refusal and reads retry-after",
    },
    "tests/sdk/test_selection.py": {
        "device_sdk._selection": "the gateway selector",
    },
    "tests/sdk/test_silent_gateway.py": {
        "device_sdk._grpc": "the SDK's keepalive timers, scaled down",
        "device_sdk._mqtt": "the MQTT session's keepalive",
        "gateway._grpc._server": "the gateway's ping policy, scaled down the same",
    },
}


Internals = Mapping[str, Mapping[str, str]]


def _covers(key: str, rel: str) -> bool:
    return rel == key or (key.endswith("/") and rel.startswith(key))


def internals_allowed(rel: str, internals: Internals) -> set[str]:
    """The private modules that test ``rel`` may import: its own entry and its folders'."""
    return {module for key, modules in internals.items() if _covers(key, rel) for module in modules}


def unlisted_internals(uses: Mapping[str, set[str]], internals: Internals) -> dict[str, list[str]]:
    """Test → the private modules it imports that no entry of ``internals`` lets it."""
    found = {rel: sorted(used - internals_allowed(rel, internals)) for rel, used in uses.items()}
    return {rel: modules for rel, modules in found.items() if modules}


def stale_internals(uses: Mapping[str, set[str]], internals: Internals) -> dict[str, list[str]]:
    """Entry → the modules it lists that no test under it imports (or a path with no test)."""
    stale = {}
    for key, modules in internals.items():
        used = set().union(*(u for rel, u in uses.items() if _covers(key, rel)))
        stale[key] = sorted(set(modules) - used)
    return {key: modules for key, modules in stale.items() if modules}


def _tests() -> dict[str, Path]:
    return {str(p.relative_to(ROOT)): p for p in _sources("tests")}


@pytest.mark.parametrize("folder", ["tests", "bench"])
def test_every_public_name_is_taken_from_the_surface(folder: str) -> None:
    """Tests and benchmarks alike: a name the surface offers never comes by a private path."""
    found = {
        str(p.relative_to(ROOT)): names
        for p in _sources(folder)
        if (names := surface_names_taken_privately(p))
    }
    assert found == {}


def test_the_tests_use_only_public_names_or_a_listed_internal() -> None:
    uses = {rel: private_uses(p) for rel, p in _tests().items()}
    assert unlisted_internals(uses, TEST_INTERNALS) == {}


def test_the_list_of_tested_internals_only_shrinks() -> None:
    """An internal that no test under its entry imports any more leaves the list."""
    uses = {rel: private_uses(p) for rel, p in _tests().items()}
    assert stale_internals(uses, TEST_INTERNALS) == {}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from gateway._door import FrontDoor", ["1: gateway._door.FrontDoor → gateway.FrontDoor"]),
        (
            "from gateway._inference import InvalidImage",
            ["1: gateway._inference.InvalidImage → gateway.errors.InvalidImage"],
        ),
        (
            "from gateway._core._status import PermissionDenied",
            ["1: gateway._core._status.PermissionDenied → gateway.errors.CallerNotAllowed"],
        ),
        (
            "def f():\n    from device_sdk._enrollment import enroll",
            ["2: device_sdk._enrollment.enroll → device_sdk.enroll"],
        ),
        (
            "from device_sdk import _enrollment as sdk\nsdk.renew",
            ["2: device_sdk._enrollment.renew → device_sdk.renew"],
        ),
        (
            "import gateway._models as models\nmodels.find_models_dir()",
            ["2: gateway._models.find_models_dir → gateway.find_models_dir"],
        ),
        (
            "import pki._tls\npki._tls.server_ssl_context",
            ["2: pki._tls.server_ssl_context → pki.server_ssl_context"],
        ),
        ("from gateway._door import FairQueue, result_to_pb", []),
        ("import gateway._grpc._server as s\ns.MIN_PING_INTERVAL_MS, s._private", []),
        ("from gateway import FrontDoor\nfrom gateway.errors import InvalidImage", []),
        ("import device_sdk\ndevice_sdk.DeviceClient, device_sdk._mqtt.SOCKET_OPTIONS", []),
    ],
)
def test_the_reader_finds_public_names_taken_privately(
    tmp_path: Path, source: str, expected: list[str]
) -> None:
    """The first check above can fail: each way of reaching a public name privately is seen."""
    path = tmp_path / "sample.py"
    path.write_text(source + "\n")
    assert surface_names_taken_privately(path) == expected


_SAMPLE_INTERNALS = {
    "tests/mqtt/": {"gateway._mqtt": "the transport under test"},
    "tests/mqtt/test_subscriber.py": {"gateway._mqtt._subscriber": "the packet reader"},
    "tests/inference/test_batcher.py": {"gateway._inference._batcher": "the batcher"},
}


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("tests/mqtt/test_bridge.py", {"gateway._mqtt"}),
        ("tests/mqtt/test_subscriber.py", {"gateway._mqtt", "gateway._mqtt._subscriber"}),
        ("tests/inference/test_batcher.py", {"gateway._inference._batcher"}),
        ("tests/inference/test_engine.py", set()),
        ("tests/mqtt_other/test_x.py", set()),
        ("tests/test_mqtt.py", set()),
    ],
)
def test_an_entry_covers_its_file_or_everything_under_its_folder(
    rel: str, expected: set[str]
) -> None:
    """An entry reaches only the tests it names."""
    assert internals_allowed(rel, _SAMPLE_INTERNALS) == expected


_SAMPLE_USES = {
    "tests/mqtt/test_bridge.py": {"gateway._mqtt"},
    "tests/mqtt/test_subscriber.py": {"gateway._mqtt._subscriber"},
    "tests/inference/test_batcher.py": {"gateway._inference._batcher"},
    "tests/inference/test_engine.py": set(),
}


@pytest.mark.parametrize(
    ("change", "unlisted", "stale"),
    [
        ({}, {}, {}),
        # A test reaches an internal nobody listed for it.
        (
            {"tests/inference/test_engine.py": {"gateway._inference._runtime"}},
            {"tests/inference/test_engine.py": ["gateway._inference._runtime"]},
            {},
        ),
        # The subscriber's test is the only one that may read packets.
        (
            {"tests/mqtt/test_bridge.py": {"gateway._mqtt", "gateway._mqtt._subscriber"}},
            {"tests/mqtt/test_bridge.py": ["gateway._mqtt._subscriber"]},
            {},
        ),
        # A test stops using its internal: the entry is stale.
        (
            {"tests/inference/test_batcher.py": set()},
            {},
            {"tests/inference/test_batcher.py": ["gateway._inference._batcher"]},
        ),
        # No test under the folder uses it any more.
        ({"tests/mqtt/test_bridge.py": set()}, {}, {"tests/mqtt/": ["gateway._mqtt"]}),
    ],
)
def test_the_checks_of_the_list_can_fail(
    change: dict[str, set[str]], unlisted: dict[str, list[str]], stale: dict[str, list[str]]
) -> None:
    """The two checks above can fail: an unlisted internal, and an entry nothing uses."""
    uses = {**_SAMPLE_USES, **change}
    assert unlisted_internals(uses, _SAMPLE_INTERNALS) == unlisted
    assert stale_internals(uses, _SAMPLE_INTERNALS) == stale
