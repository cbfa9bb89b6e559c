"""The edge gateway's configuration: one TOML file, every key overridable from the environment.

Loaded once by the entry point with :func:`load_gateway_settings` (environment prefix
``EDGEWARD_GATEWAY_``, nested keys joined by ``__``: ``EDGEWARD_GATEWAY_LIMITS__BURST=20``) and
passed down; nothing below the entry point reads the environment. Unknown keys are errors.
Every field carries a description; ``docs/gateway.md`` is the reference generated from them
(``describe_settings()`` prints it).

The ``[mqtt]`` and ``[escalation]`` tables belong to the MQTT bridge and the escalation
outbox. They are kept here as raw tables and validated by their owners' models when those
components are built (:meth:`GatewaySettings.section`), so this file does not depend on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway._core_endpoints import join_core_addresses, parse_core_addresses
from gateway._models import (
    DEFAULT_EDGE_MODEL,
    EDGE_DETECTORS,
    manifest_labels,
    models_dir_or_default,
)
from gateway._settings import ConfigError, ServiceSettings, load_settings

__all__ = [
    "DEVICE_METHODS",
    "AuthorisationSettings",
    "CacheSettings",
    "DeviceMethod",
    "GatewaySettings",
    "InferenceSettings",
    "LimitsSettings",
    "describe_settings",
    "load_gateway_settings",
]

ENV_PREFIX = "EDGEWARD_GATEWAY_"

DeviceMethod = Literal["Detect", "StreamDetect", "ReportTelemetry", "Subscribe"]
#: Every method of ``DeviceGateway``.
DEVICE_METHODS: tuple[DeviceMethod, ...] = (
    "Detect",
    "StreamDetect",
    "ReportTelemetry",
    "Subscribe",
)

M = TypeVar("M", bound=BaseModel)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be host:port (port 0 picks a free port)")
    return value


class InferenceSettings(_Section):
    """The edge models, which region runs which, and how they are served."""

    models_dir: Path = Field(
        default=None,
        validate_default=True,
        description="Directory holding the ONNX models and manifest.json (every file "
        "sha256-verified against it); unset: the installed edgeward-models package "
        "(the models/ directory in a checkout).",
    )
    model: str = Field(
        default=DEFAULT_EDGE_MODEL,
        description="The edge detector (a models/manifest.json name) of devices whose region "
        f"names none: {', '.join(sorted(EDGE_DETECTORS))}.",
    )
    region_models: dict[str, str] = Field(
        default_factory=dict,
        description="Region → the edge detector its devices' frames go through "
        "([inference.region_models], e.g. lab = 'core_nanodet_coco80'). A device uses its "
        "registry region's model, else the gateway region's, else inference.model (as "
        "escalation policies fall back). An unknown name stops the start-up.",
    )
    idle_release_s: float = Field(
        default=300.0,
        gt=0.0,
        description="A model with no frame for this long is released from memory (logged, "
        "counted in edgeward_gateway_edge_model_releases_total); the next frame that needs it "
        "loads it again, sha256-verified.",
    )
    preload: bool = Field(
        default=True,
        description="Load inference.model at start-up (its provider and file checked before "
        "devices are served); false: it loads on its first frame like the regions' models.",
    )
    providers: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Execution provider: auto (CUDA where usable, else CPU), cpu, or cuda "
        "(refuse to start without a usable GPU). What really runs is logged once at start.",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="onnxruntime intra-op threads; unset = physical cores available.",
    )
    max_batch: int = Field(
        default=8, ge=1, le=256, description="Most frames run through the model at once."
    )
    max_wait_ms: float = Field(
        default=2.0,
        ge=0.0,
        le=1000.0,
        description="How long the first frame of a batch waits for others to join it.",
    )
    queue_size: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description="Frames that may wait for the model; beyond it callers get "
        "RESOURCE_EXHAUSTED at once (memory stays bounded).",
    )
    max_image_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="Largest encoded frame accepted (bytes); larger → INVALID_ARGUMENT.",
    )
    max_pixels: int = Field(
        default=16_000_000,
        ge=1,
        description="Largest decoded frame (width × height) accepted, judged from the header "
        "before decoding (decompression bombs cost nothing).",
    )
    score_threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Detections scoring below this are dropped."
    )

    _default_models_dir = field_validator("models_dir", mode="before")(models_dir_or_default)

    @field_validator("region_models", mode="before")
    @classmethod
    def _region_names(cls, value: Any) -> Any:
        """Region names as the registry spells them (``home-eu``; the environment says
        ``HOME_EU``)."""
        if not isinstance(value, dict):
            return value
        return {str(name).replace("_", "-"): model for name, model in value.items()}


class CacheSettings(_Section):
    """The response cache: exact (content hash) and perceptual (difference hash)."""

    enabled: bool = Field(default=True, description="Answer repeated frames from the cache.")
    ttl_s: float = Field(
        default=10.0, gt=0.0, description="Seconds an answer stays valid in the cache."
    )
    max_entries: int = Field(default=4096, ge=1, description="Most answers kept.")
    max_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Approximate memory bound of the cache."
    )
    perceptual_distance: int = Field(
        default=4,
        ge=0,
        le=64,
        description="Hamming distance (bits of 64) up to which two frames count as the same "
        "picture; 0 disables perceptual matching.",
    )


class LimitsSettings(_Section):
    """Per-device limits that keep one device from starving the others."""

    frames_per_s: float = Field(
        default=30.0,
        gt=0.0,
        description="Sustained frames per second per device (token bucket refill rate).",
    )
    burst: int = Field(
        default=30, ge=1, description="Frames a device may send at once (token bucket size)."
    )
    flood_penalty_s: float = Field(
        default=2.0,
        ge=0.0,
        le=3600.0,
        description="A device caught flooding (refused more than its burst within a second, "
        "or refused by the managed broker's ingest limit) gets no frame admitted for this "
        "long: its frames are refused (RESOURCE_EXHAUSTED, retry-after the time left) instead "
        "of running the model beside other devices' at its budget. A device that honours "
        "retry-after never gets there; 0: off.",
    )
    frames_waiting_per_device: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Admitted frames of one device waiting for the model at most (it has at "
        "most two in the model, one while other devices are present); more are refused at "
        "once (RESOURCE_EXHAUSTED, retry later), so one device's backlog cannot fill the queue "
        "of all; unset: its burst.",
    )
    max_message_bytes: int = Field(
        default=4 * 1024 * 1024 + 64 * 1024,
        ge=4096,
        description="Largest gRPC message received; larger → RESOURCE_EXHAUSTED before the "
        "message is parsed.",
    )
    max_streams_per_device: int = Field(
        default=4,
        ge=1,
        description="Open StreamDetect/Subscribe calls one device may hold at once.",
    )
    stream_idle_timeout_s: float = Field(
        default=60.0,
        gt=0.0,
        description="A StreamDetect call that sends nothing for this long is ended "
        "(DEADLINE_EXCEEDED), freeing its slot.",
    )
    telemetry_max_readings: int = Field(
        default=32, ge=0, le=1024, description="Most keys in Telemetry.readings."
    )
    refusal_log_interval_s: float = Field(
        default=10.0,
        gt=0.0,
        description="Refused messages of one device are logged at most once per this many "
        "seconds (with their count), after the first of each reason.",
    )
    refusal_events_per_interval: int = Field(
        default=5,
        ge=0,
        description="Error events about refused messages sent to one device per "
        "refusal_log_interval_s at most (MQTT); then one event with the count of the rest.",
    )


class AuthorisationSettings(_Section):
    """Which ``DeviceGateway`` methods each device type may call.

    The device type comes from the registry (via the core's ``GetDevice`` or, standalone, the
    PKI registry), never from the certificate or the request. A type not listed in
    ``device_types`` — or a device the registry does not know — gets ``default_methods``:
    single frames, telemetry and its own events, but no long-lived frame stream, so a device
    of an unexpected kind cannot hold model capacity until an operator says what it is.
    """

    device_types: dict[str, tuple[DeviceMethod, ...]] = Field(
        default_factory=lambda: {
            "pet_camera": DEVICE_METHODS,
            "robot_vacuum": DEVICE_METHODS,
        },
        description="Device type → allowed methods.",
    )
    default_methods: tuple[DeviceMethod, ...] = Field(
        default=("Detect", "ReportTelemetry", "Subscribe"),
        description="Methods for device types not listed (and devices unknown to the registry).",
    )
    device_info_ttl_s: float = Field(
        default=30.0,
        ge=0.0,
        description="Seconds a device's registry facts (type, status) are cached.",
    )

    def allowed(self, device_type: str | None) -> frozenset[str]:
        """Methods a device of ``device_type`` may call.

        ``-`` and ``_`` are the same in type names: the registry holds ids of ``[a-z0-9-]``
        (``pet-camera``) while the contract spells types ``pet_camera``.
        """
        if device_type is not None:
            wanted = device_type.replace("-", "_")
            for name, methods in self.device_types.items():
                if name.replace("-", "_") == wanted:
                    return frozenset(methods)
        return frozenset(self.default_methods)


class GatewaySettings(ServiceSettings):
    """Settings of one edge gateway process (``edgeward gateway run --config FILE``)."""

    gateway_id: str | None = Field(
        default=None,
        description="This gateway's id; unset = the id in its identity certificate.",
    )
    region: str = Field(default="default", description="Region this gateway serves.")
    listen: str = Field(
        default="127.0.0.1:8443",
        description="host:port of the device-facing mTLS gRPC server (port 0: a free port).",
    )
    advertise_address: str | None = Field(
        default=None,
        description="host:port devices use to reach this gateway, announced to the core for "
        "the signed gateway directory. Unset: the listen address (with the bound port) when "
        "its host is not a wildcard; with a wildcard listen host nothing is announced.",
    )
    identity_dir: Path = Field(
        description="Identity directory of this gateway (key.pem, chain.pem, ca-bundle.pem); "
        "its CA bundle defines the trust domain's CAs, its certificate the trust domain.",
    )
    core_address: str | None = Field(
        default=None,
        description="host:port of the core (revocation feed, device registry), or several "
        "replicas of it: a comma list or a TOML list, tried in order with failover (the "
        "gateway stays on the one that answers). Unset: standalone, reading pki_dir's "
        "registry.",
    )
    pki_dir: Path | None = Field(
        default=None,
        description="Standalone only: the PKI directory whose registry.sqlite3 holds devices "
        "and revocations.",
    )
    revocation_max_staleness_s: float = Field(
        default=15.0,
        gt=0.0,
        description="Seconds without a revocation event or heartbeat after which new "
        "sessions are refused (UNAVAILABLE); open ones continue.",
    )
    revocation_poll_interval_s: float = Field(
        default=0.2,
        gt=0.0,
        le=60.0,
        description="Standalone only: how often the registry is polled for revocations.",
    )
    core_timeout_s: float = Field(
        default=5.0, gt=0.0, description="Deadline of each unary call to the core."
    )
    metrics_listen: str | None = Field(
        default="127.0.0.1:9464",
        description="host:port of the Prometheus endpoint (/metrics); unset disables it.",
    )
    console_enabled: bool = Field(
        default=True,
        description="Serve the operator console (live detections; HTTPS, operator login).",
    )
    console_listen: str = Field(
        default="127.0.0.1:9444",
        description="host:port of the operator console (TLS with the gateway's certificate); "
        "port 0: a free port.",
    )
    console_session_ttl_s: float = Field(
        default=900.0, ge=30, le=86_400, description="Console sessions end after this long idle."
    )
    console_session_max_age_s: float = Field(
        default=8 * 3600.0,
        ge=60,
        le=7 * 86_400,
        description="Console sessions end this long after login.",
    )
    console_max_body_bytes: int = Field(
        default=64 * 1024, ge=1024, le=16 * 1024 * 1024, description="Largest console request."
    )
    console_live_fps: float = Field(
        default=2.0, gt=0, le=30, description="Live view: at most this many frames/s per device."
    )
    shutdown_grace_s: float = Field(
        default=10.0,
        ge=0.0,
        description="On SIGTERM, seconds in-flight calls get to finish before they are cut.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log level."
    )
    inference: InferenceSettings = Field(
        # Validated from an empty table (not built by a factory) so that an error in a default,
        # such as no models found, is reported as inference.models_dir.
        default_factory=dict,
        validate_default=True,
        description="[inference] table.",
    )
    cache: CacheSettings = Field(default_factory=CacheSettings, description="[cache] table.")
    limits: LimitsSettings = Field(default_factory=LimitsSettings, description="[limits] table.")
    authorisation: AuthorisationSettings = Field(
        default_factory=AuthorisationSettings, description="[authorisation] table."
    )
    mqtt: dict[str, Any] | None = Field(
        default=None,
        description="[mqtt] table: the MQTT bridge's settings (validated by the bridge); "
        "absent = no MQTT listener.",
    )
    escalation: dict[str, Any] | None = Field(
        default=None,
        description="[escalation] table: escalation policy and outbox (validated by the "
        "escalation component); absent = no escalation.",
    )

    @field_validator("listen", "console_listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        return _host_port(value)

    @field_validator("metrics_listen", "advertise_address")
    @classmethod
    def _check_optional_address(cls, value: str | None) -> str | None:
        return None if value is None else _host_port(value)

    @field_validator("core_address", mode="before")
    @classmethod
    def _check_core_addresses(cls, value: Any) -> str | None:
        """One address, a comma list or a TOML list; held as ``a:1,b:2``."""
        if value is None:
            return None
        return join_core_addresses(parse_core_addresses(value))

    @property
    def core_addresses(self) -> tuple[str, ...]:
        """The core replicas in order (empty when standalone)."""
        return () if self.core_address is None else parse_core_addresses(self.core_address)

    def section(self, name: Literal["mqtt", "escalation"], model: type[M]) -> M | None:
        """Validate the raw ``[name]`` table with its owner's ``model``; ``None`` when absent.

        Errors name the key the way the loader does (``mqtt.port``), with its override.
        """
        raw = getattr(self, name)
        if raw is None:
            return None
        from pydantic import ValidationError

        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            lines = []
            for err in exc.errors():
                loc = [name, *(str(p) for p in err["loc"])]
                msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
                env = ENV_PREFIX + "__".join(loc).upper()
                lines.append(f"  {'.'.join(loc)}: {msg} (environment override: {env})")
            raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


def load_gateway_settings(
    path: Path | None, *, overrides: dict[str, Any] | None = None
) -> GatewaySettings:
    """Read ``path`` (TOML) with ``EDGEWARD_GATEWAY_*`` and explicit overrides; validate.

    Raises :class:`ConfigError` naming each bad key.
    """
    settings = load_settings(GatewaySettings, path, env_prefix=ENV_PREFIX, overrides=overrides)
    if settings.core_address is None and settings.pki_dir is None:
        raise ConfigError(
            "invalid configuration:\n  core_address: set core_address (the core's revocation "
            "feed) or pki_dir (standalone) (environment override: "
            f"{ENV_PREFIX}CORE_ADDRESS / {ENV_PREFIX}PKI_DIR)"
        )
    _check_bands(settings)
    _check_models(settings)
    return settings


def _check_models(settings: GatewaySettings) -> None:
    """Refuse edge models the manifest lacks, and escalation label sets they cannot give.

    A region whose devices would be served by a model that does not exist is a start-up
    error naming the key and listing the manifest's edge detectors, not a failure on each
    of the region's frames. A region's ``escalation.regions.<r>.edge_labels`` must be labels
    of the model the region runs: a label of another model's vocabulary (``person`` for the
    SSD's ``Person``) can never match, and would silently escalate every detection.
    """
    inf = settings.inference
    manifest = manifest_labels(inf.models_dir)
    available = sorted(n for n in manifest if n in EDGE_DETECTORS)
    listing = ", ".join(available) or "(none)"
    lines = []
    wanted = {"inference.model": inf.model} | {
        f"inference.region_models.{region}": model for region, model in inf.region_models.items()
    }
    for key, model in wanted.items():
        if model not in available:
            env = ENV_PREFIX + key.replace(".", "__").replace("-", "_").upper()
            lines.append(
                f"  {key}: {model!r} is not an edge detector of the manifest in "
                f"{inf.models_dir}; it has: {listing} (environment override: {env})"
            )
    raw = settings.escalation
    tables = raw.get("regions") if isinstance(raw, dict) else None
    policies = {
        str(name).replace("_", "-"): (str(name), table)
        for name, table in (tables or {}).items()
        if isinstance(table, dict) and table.get("enabled", True) is not False
    }
    home = settings.region.replace("_", "-")
    # Every region a device may come from is served by a (policy, model) pair, each falling
    # back to the gateway region's: check each pair, once.
    checked: set[tuple[str, str]] = set()
    for region in sorted({*policies, *inf.region_models, home}):
        named = policies.get(region) or policies.get(home)
        model = inf.region_models.get(region) or inf.region_models.get(home, inf.model)
        if named is None or (named[0], model) in checked:
            continue
        checked.add((named[0], model))
        labels = named[1].get("edge_labels")
        known = manifest.get(model)
        if not isinstance(labels, list | tuple) or known is None:
            continue  # unset, or reported by the escalation component's own validation
        unknown = [str(x) for x in labels if str(x) not in known]
        if unknown:
            key = f"escalation.regions.{named[0]}.edge_labels"
            lines.append(
                f"  {key}: {', '.join(map(repr, unknown))} not labels of {model}, the edge "
                f"model region {region!r} runs (its labels: {', '.join(known)})"
            )
    if lines:
        raise ConfigError("invalid configuration:\n" + "\n".join(lines))


#: ``band_low``'s default in ``[escalation.regions.<r>]`` (``gateway._escalation._config``).
_DEFAULT_BAND = (0.5, 0.65)


def _check_bands(settings: GatewaySettings) -> None:
    """Refuse an uncertainty band that starts below the engine's score threshold.

    The engine drops every detection scoring under ``inference.score_threshold`` before any
    policy sees it, so the part of a band below it can never escalate anything: a
    ``band_low = 0.3`` under the default threshold of 0.5 would silently behave as 0.5.
    Refused rather than honoured by lowering the engine's threshold, because that would
    change what every device is told (and what the cache holds) as a side effect of an
    escalation key. An empty band (``band_low == band_high``) escalates nothing and is
    accepted whatever its value. Only the two numbers are read here; the rest of the table
    is validated by the escalation component.
    """
    raw = settings.escalation
    if not isinstance(raw, dict) or raw.get("enabled", True) is False:
        return
    regions = raw.get("regions")
    if not isinstance(regions, dict):
        return
    threshold = settings.inference.score_threshold
    lines = []
    for name, table in regions.items():
        if not isinstance(table, dict) or table.get("enabled", True) is False:
            continue
        try:
            low = float(table.get("band_low", _DEFAULT_BAND[0]))
            high = float(table.get("band_high", _DEFAULT_BAND[1]))
        except (TypeError, ValueError):
            continue  # reported by the escalation component's own validation
        if low < high and low < threshold:
            key = f"escalation.regions.{name}.band_low"
            env = ENV_PREFIX + f"ESCALATION__REGIONS__{name}__BAND_LOW".replace("-", "_").upper()
            lines.append(
                f"  {key}: {low:g} is below inference.score_threshold ({threshold:g}); the "
                "engine reports no detection under its threshold, so that part of the band "
                f"would never escalate: set {key} to at least {threshold:g} or lower "
                f"inference.score_threshold (environment overrides: {env}, "
                f"{ENV_PREFIX}INFERENCE__SCORE_THRESHOLD)"
            )
    if lines:
        raise ConfigError("invalid configuration:\n" + "\n".join(lines))


def describe_settings(model: type[BaseModel] = GatewaySettings, prefix: str = "") -> list[str]:
    """Markdown table rows ``| key | default | description |`` for every field, recursively."""
    rows: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(describe_settings(annotation, f"{key}."))
            continue
        if field.is_required():
            default = "(required)"
        else:
            value = (
                field.default_factory()  # type: ignore[call-arg]
                if field.default_factory is not None
                else field.default
            )
            default = repr(str(value) if isinstance(value, Path) else value)
        env = ENV_PREFIX + key.replace(".", "__").upper()
        rows.append(f"| `{key}` | `{default}` | {field.description} (`{env}`) |")
    return rows
