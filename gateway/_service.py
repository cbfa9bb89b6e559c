"""One edge gateway process: engine, revocation, gRPC server, metrics, and plug-ins.

:class:`GatewayService` is an async context manager. Entering starts, in this order (each
part ready before the next one that uses it):

1. the metrics registry, the event hub, the revocation state and its feed (the cores'
   ``WatchRevocations`` stream, failing over between the replicas listed in
   ``core_address``, or the PKI registry when standalone), waiting up to
   ``core_timeout_s`` for it to become fresh (until then new sessions are refused);
2. the edge model catalog (every configured model's file verified against the manifest; the
   default model loaded, its provider logged, unless ``inference.preload`` is off; the
   regions' models load on their first frame and every model is released when idle) and the
   response cache;
3. the plug-ins, in the order given (the MQTT bridge, the escalation outbox);
4. the mutual-TLS gRPC server, then the Prometheus endpoint.

Leaving stops them in reverse: the gRPC server stops accepting and gives in-flight calls
``shutdown_grace_s`` to finish, the plug-ins drain (the outbox flushes), the models answer
the frames they admitted, the feed closes. :meth:`GatewayService.run_until_signalled` waits for
SIGTERM or SIGINT and then leaves.

Plug-ins (optional components: the MQTT bridge, escalation). One mechanism, two levels:

- A **plug-in** (:data:`GatewayPlugin`) is a factory ``plugin(runtime) -> async context
  manager``. It gets the :class:`GatewayRuntime` (settings, identity, event hub, revocation
  state, metrics and the front door, :class:`~gateway._door.FrontDoor`) and may add a
  revocation listener (kick a device's MQTT session), publish device events, carry frames in
  through the front door (the MQTT bridge), or install ``runtime.door.detection_hook``
  (escalation; see :class:`~gateway._door.DetectionHook`). Its ``__aenter__`` returns once it
  is serving; its background tasks live in its own ``TaskGroup``; its ``__aexit__`` drains
  (and removes what it installed). Plug-ins enter in order (MQTT, then escalation) and leave
  in reverse; the front door reads its detection hook per frame, so the order does not
  matter to it.
- A **component** is a module that owns a table of the configuration and offers
  ``plugin(settings: GatewaySettings) -> GatewayPlugin | None`` (:data:`PluginProvider`): it
  validates its table (a bad key raises :class:`~gateway._settings.ConfigError` naming it)
  and returns its plug-in, or ``None`` when the table turns it off.
  :data:`COMPONENTS` maps tables to modules: ``[mqtt]`` → ``gateway._mqtt``,
  ``[escalation]`` → ``gateway._escalation``. :func:`configured_plugins` asks each component
  whose table is present; a component that offers no ``plugin`` yet is logged and skipped.

``GatewayService(settings)`` starts the configured plug-ins (``edgeward gateway run`` does
exactly this); ``GatewayService(settings, plugins=[...])`` starts the given ones instead
(embedding, tests). The service has one task group of its own for its housekeeping (the
feed-health gauge).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime as dt
import gc
import importlib
import os
import random
import resource
import signal
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import grpc
import structlog
from cryptography import x509

import pki
from gateway._config import GatewaySettings
from gateway._core_endpoints import CoreEndpoints
from gateway._door import (
    Authoriser,
    CoreDeviceDirectory,
    DeviceDirectory,
    FrontDoor,
    RegistryDeviceDirectory,
)
from gateway._events import EventHub
from gateway._grpc import DeviceGatewayServicer, GatewayServer, IdentityJudge
from gateway._inference import (
    CacheKind,
    EdgeModelCatalog,
    EngineObserver,
    InferenceEngine,
    ResponseCache,
    UnknownEdgeModel,
)
from gateway._inference._catalog import DEFAULT_REGION
from gateway._metrics import GatewayMetrics, MetricsServer
from gateway._revocation import (
    CoreRevocationFeed,
    RegistryRevocationPoller,
    RevocationState,
    registry_revocation_reader,
)
from gateway._settings import ConfigError
from gateway._wire import check_listen

__all__ = [
    "COMPONENTS",
    "GatewayPlugin",
    "GatewayRuntime",
    "GatewayService",
    "PluginProvider",
    "configured_plugins",
    "freeze_startup_heap",
    "limit_malloc_arenas",
    "raise_open_files_limit",
]

_log = structlog.get_logger(__name__)

RevocationSource = Callable[[RevocationState], AbstractAsyncContextManager[Any]]


@dataclass(slots=True)
class GatewayRuntime:
    """What a plug-in may use of a running gateway."""

    settings: GatewaySettings
    identity: pki.IdentityFiles
    gateway_id: str
    trust_domain: str
    #: The edge models (a device's frames go through its region's), loaded on demand.
    models: EdgeModelCatalog
    events: EventHub
    revocation: RevocationState
    metrics: GatewayMetrics
    #: The one way in for every transport: admission, the frame pipeline, the telemetry
    #: store, refusals; the escalation plug-in installs its ``detection_hook``.
    door: FrontDoor


#: Open files a gateway wants: 10,000 MQTT devices (held by its Mosquitto, which inherits the
#: limit) or 1,000 gRPC devices and their streams, with room to spare. Below it, a warning
#: names the hard limit the operator must raise (``docs/gateway.md``, "Limits").
WANTED_OPEN_FILES = 16_384


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return ``(before, after)``.

    Every device connection is a descriptor in the gateway (gRPC) or in its Mosquitto
    (MQTT, inheriting the gateway's limits), and many systems start services with a soft
    limit of 1,024: a fleet past that is refused by ``accept`` (``EMFILE``). Raising the soft
    limit to the hard one needs no privilege; the hard limit is the operator's
    (``ulimit -Hn``, systemd ``LimitNOFILE``).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel caps descriptors at fs.nr_open
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft == target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


#: glibc's ``mallopt`` parameter number of ``M_ARENA_MAX`` (malloc.h).
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas at ``arenas``, unless ``MALLOC_ARENA_MAX`` is set.

    glibc gives threads arenas of their own, up to eight per core; gRPC's and onnxruntime's
    threads then each keep freed memory in their own heap. Measured with ``bench/scale.py``
    (400 devices holding ``Subscribe`` streams): 131 kB of gateway memory per device with
    the default, 87 kB with two arenas. Called before the gRPC server starts its threads.
    Returns whether the cap was applied (``False`` off glibc).
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return bool(libc.mallopt(_M_ARENA_MAX, max(1, arenas)))
    except (OSError, AttributeError):
        return False


def freeze_startup_heap() -> int:
    """Collect once, then keep what is alive now out of every later collection (``gc.freeze``).

    What start-up built (modules, settings, models, certificates, the servers) lives as long
    as the gateway. A full collection of the cyclic garbage collector traverses all of it: about
    100,000 objects, 35 ms on an idle 2-core host and 60 ms under a flood of refused calls,
    during which the event loop, and every device's answer, waits. Frozen, a full collection
    traverses only what serving allocated since, well under a millisecond. Garbage is
    collected first, so none of it is kept. Called once the gateway has started; returns the
    number of objects frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


GatewayPlugin = Callable[[GatewayRuntime], AbstractAsyncContextManager[Any]]
#: A component's entry point: its plug-in for these settings, or ``None`` when it is off.
PluginProvider = Callable[[GatewaySettings], GatewayPlugin | None]

#: Configuration table → the module offering ``plugin(settings)`` for it, in start order.
COMPONENTS: tuple[tuple[Literal["mqtt", "escalation"], str], ...] = (
    ("mqtt", "gateway._mqtt"),
    ("escalation", "gateway._escalation"),
)


def configured_plugins(settings: GatewaySettings) -> list[GatewayPlugin]:
    """The plug-ins ``settings`` ask for: one per present table whose component is on.

    Imports a component only when its table is present (a gateway without ``[mqtt]`` never
    loads the MQTT code). Raises :class:`~gateway._settings.ConfigError` for a bad table.
    """
    plugins: list[GatewayPlugin] = []
    for table, module_name in COMPONENTS:
        if getattr(settings, table) is None:
            continue
        provider: PluginProvider | None = getattr(
            importlib.import_module(module_name), "plugin", None
        )
        if provider is None:
            _log.warning("component offers no plug-in in this build; skipped", component=table)
            continue
        plugin = provider(settings)
        if plugin is None:
            _log.info("component turned off by its table", component=table)
            continue
        plugins.append(plugin)
    return plugins


class _CatalogObserver(EngineObserver):
    """The metrics hooks of every model's engine; the queue-depth gauge counts the frames
    waiting for any loaded model, not the last engine to report."""

    def __init__(self, metrics: GatewayMetrics, depth: Callable[[], int]) -> None:
        self._metrics = metrics
        self._depth = depth

    def on_batch(self, size: int, seconds: float) -> None:
        self._metrics.on_batch(size, seconds)

    def on_cache(self, kind: CacheKind) -> None:
        self._metrics.on_cache(kind)

    def on_queue_depth(self, n: int) -> None:
        self._metrics.on_queue_depth(self._depth())


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class GatewayService:
    """A whole gateway; see the module docstring for the start and stop order.

    ``plugins`` ``None`` (the default) starts what the settings configure
    (:func:`configured_plugins`); a sequence starts exactly those. ``device_directory`` and
    ``revocation_source`` replace what the settings would build (the core's or the
    registry's), for tests and embedding. ``grpc_port`` and ``metrics_port`` hold the bound
    ports once entered.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        plugins: Sequence[GatewayPlugin] | None = None,
        device_directory: DeviceDirectory | None = None,
        revocation_source: RevocationSource | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.settings = settings
        self.identity = pki.IdentityFiles(settings.identity_dir).require()
        self.trust_domain = self.identity.trust_domain
        own = pki.identity_from_certificate(
            self.identity.certificate(), trust_domain=self.trust_domain, role=pki.Role.GATEWAY
        )
        self.gateway_id = settings.gateway_id or own.id
        # A certificate issued before role-pinned names lacks <id>.gateway.edgeward.internal,
        # which devices demand: every device would refuse this gateway at the handshake.
        san = self.identity.certificate().extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
        if pki.gateway_server_name(own.id) not in san.value.get_values_for_type(x509.DNSName):
            _log.warning(
                "gateway certificate lacks its pinned name; devices will refuse it: "
                "re-issue it with 'edgeward pki issue-server'",
                gateway_id=own.id,
                name=pki.gateway_server_name(own.id),
            )
        # Built here, before anything starts: a bad [escalation] table fails construction.
        self._plugins = list(configured_plugins(settings) if plugins is None else plugins)
        self._device_directory = device_directory
        self._revocation_source = revocation_source
        self._clock = clock
        self.metrics = GatewayMetrics()
        self.events = EventHub()
        self.revocation = RevocationState(max_staleness_s=settings.revocation_max_staleness_s)
        self._stack = contextlib.AsyncExitStack()
        self._core_endpoints: CoreEndpoints | None = None
        self._registry: pki.Registry | None = None
        #: The edge model catalog: built here, so that a region naming a model the manifest
        #: lacks fails construction (a ConfigError naming the key).
        self.models = self._catalog()
        self.door: FrontDoor | None = None
        self.servicer: DeviceGatewayServicer | None = None
        self.server: GatewayServer | None = None
        self.grpc_port = 0
        self.metrics_port: int | None = None
        #: The operator console while it runs (``console_enabled``), else ``None``.
        self.console: Any = None

    # -- assembly ---------------------------------------------------------------------------

    @property
    def core_endpoints(self) -> CoreEndpoints | None:
        """The cores this gateway talks to, and the one it is on (``None``: standalone)."""
        return self._core_endpoints

    def _cores(self) -> CoreEndpoints:
        """The gateway's cores: one pinned channel recipe, failover between the replicas."""
        if self._core_endpoints is None:
            self._core_endpoints = CoreEndpoints.for_identity(
                self.settings.core_addresses, self.identity
            )
        return self._core_endpoints

    def _open_registry(self) -> pki.Registry:
        if self._registry is None:
            assert self.settings.pki_dir is not None  # noqa: S101 - standalone
            self._registry = pki.SqliteRegistry(pki.PkiLayout(self.settings.pki_dir).registry)
            self._stack.callback(self._registry.close)
        return self._registry

    def _revocation_feed(self) -> AbstractAsyncContextManager[Any]:
        if self._revocation_source is not None:
            return self._revocation_source(self.revocation)
        s = self.settings
        if s.core_address is not None:
            return CoreRevocationFeed(
                self.revocation,
                endpoints=self._cores(),
                # The core sends a heartbeat at least every few seconds; twice the bound of
                # silence on one stream means it is dead even if TCP has not noticed.
                stream_timeout_s=max(2.0, s.revocation_max_staleness_s / 2),
            )
        return RegistryRevocationPoller(
            self.revocation,
            reader=registry_revocation_reader(self._open_registry()),
            interval_s=s.revocation_poll_interval_s,
        )

    def _device_cas(self) -> list[x509.Certificate]:
        """The device issuing CAs of the gateway's bundle; never the whole bundle."""
        cas = pki.device_ca_certificates(self.identity.ca_bundle.read_bytes())
        if not cas:
            raise pki.PkiNotFound(
                f"{self.identity.ca_bundle} holds no device issuing CA (a PKI made by an older "
                "edgeward): run 'edgeward pki add-device-ca' and give this gateway the new "
                "ca-bundle.pem"
            )
        return cas

    async def _directory(self) -> DeviceDirectory:
        if self._device_directory is not None:
            return self._device_directory
        if self.settings.core_address is not None:
            return CoreDeviceDirectory(self._cores(), timeout_s=self.settings.core_timeout_s)
        return RegistryDeviceDirectory(self._open_registry())

    def _catalog(self) -> EdgeModelCatalog:
        inf, c = self.settings.inference, self.settings.cache
        # One cache for every model: its entries are keyed by model (name, file hash and
        # threshold), so an answer of one model is never given for another's frame.
        cache = (
            ResponseCache(
                ttl=c.ttl_s,
                max_entries=c.max_entries,
                max_bytes=c.max_bytes,
                max_distance=c.perceptual_distance if c.perceptual_distance > 0 else -1,
            )
            if c.enabled
            else None
        )
        # The catalog is built below, with the engines this observer watches.
        observer = _CatalogObserver(self.metrics, lambda: catalog.queue_depth())  # noqa: PLW0108

        def engine(model: str) -> InferenceEngine:
            return InferenceEngine.from_settings(inf, model=model, cache=cache, observer=observer)

        try:
            catalog = EdgeModelCatalog(
                engine,
                models_dir=inf.models_dir,
                default_model=inf.model,
                region_models=inf.region_models,
                gateway_region=self.settings.region,
                idle_release_s=inf.idle_release_s,
            )
        except UnknownEdgeModel as exc:
            key = (
                "inference.model"
                if exc.region == DEFAULT_REGION
                else f"inference.region_models.{exc.region}"
            )
            raise ConfigError(f"invalid configuration:\n  {key}: {exc}") from None
        return catalog

    async def __aenter__(self) -> Self:
        s = self.settings
        log = _log.bind(gateway_id=self.gateway_id, region=s.region)
        limit_malloc_arenas()
        before, after = raise_open_files_limit()
        if after < WANTED_OPEN_FILES:
            log.warning(
                "open files limit is low: devices beyond it are refused",
                limit=after,
                wanted=WANTED_OPEN_FILES,
            )
        elif after != before:
            log.info("open files limit raised", before=before, after=after)
        try:
            await self._stack.__aenter__()
            if s.console_enabled:
                check_listen(s.console_listen, setting="console_listen")
            if s.core_address is not None:
                await self._stack.enter_async_context(self._cores())
            await self._stack.enter_async_context(self._revocation_feed())
            try:
                async with asyncio.timeout(s.core_timeout_s):
                    await self.revocation.wait_fresh()
            except TimeoutError:
                log.warning("revocation feed not fresh yet; new sessions refused until it is")
            directory = await self._directory()
            await self._stack.enter_async_context(self.models)
            unexport = self.metrics.add_counters(
                "edge_model_",
                self.models.counters,
                documentation={
                    "loads": "Edge models loaded (on first use, or again after a release).",
                    "releases": "Edge models released (idle, or at shutdown).",
                },
                label="model",
            )
            self._stack.callback(unexport)
            if s.inference.preload:
                await self.models.preload()
                log.info("inference provider in use", provider=self.models.provider)
            log.info(
                "edge models",
                default=self.models.default_model,
                regions=dict(s.inference.region_models),
                preloaded=sorted(self.models.loaded()),
                idle_release_s=s.inference.idle_release_s,
            )
            self.door = FrontDoor(
                gateway_id=self.gateway_id,
                engine=self.models,
                limits=s.limits,
                revocation=self.revocation,
                authoriser=Authoriser(directory, s.authorisation),
                events=self.events,
                metrics=self.metrics,
                # One batch in the engine at once keeps the model fed (the next one decodes
                # while it runs); the rest wait their device's turn, at most queue_size.
                slots=s.inference.max_batch,
                max_waiting=s.inference.queue_size,
                clock=self._clock,
            )
            # The last interval's refusal counts are logged when the gateway stops.
            self._stack.callback(self.door.close)
            self.servicer = DeviceGatewayServicer(
                door=self.door,
                judge=IdentityJudge(
                    trust_domain=self.trust_domain,
                    revocation=self.revocation,
                    clock=self._clock,
                    device_cas=self._device_cas(),
                ),
                metrics=self.metrics,
                max_streams_per_device=s.limits.max_streams_per_device,
                stream_idle_timeout_s=s.limits.stream_idle_timeout_s,
            )
            self._stack.callback(self.servicer.close)
            runtime = GatewayRuntime(
                settings=s,
                identity=self.identity,
                gateway_id=self.gateway_id,
                trust_domain=self.trust_domain,
                models=self.models,
                events=self.events,
                revocation=self.revocation,
                metrics=self.metrics,
                door=self.door,
            )
            for plugin in self._plugins:
                await self._stack.enter_async_context(plugin(runtime))
            if s.console_enabled:
                # After the plug-ins: the console's live view wraps the detection hook the
                # escalation plug-in installed, and leaves before it.
                from gateway._console import GatewayConsole

                self.console = await self._stack.enter_async_context(
                    GatewayConsole(runtime, live=self.servicer.live)
                )
            self.server = await self._stack.enter_async_context(
                GatewayServer(
                    self.servicer,
                    identity=self.identity,
                    listen=s.listen,
                    max_message_bytes=s.limits.max_message_bytes,
                    grace_s=s.shutdown_grace_s,
                    metrics=self.metrics,
                )
            )
            self.grpc_port = self.server.port
            if s.metrics_listen is not None:
                host, port = _split(s.metrics_listen)
                metrics_server = await self._stack.enter_async_context(
                    MetricsServer(self.metrics, host=host, port=port)
                )
                self.metrics_port = metrics_server.port
            tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
            health = tasks.create_task(self._watch_feed(), name="edgeward-feed-gauge")
            self._stack.callback(health.cancel)  # runs before the group waits for it
            advertised = self._advertised_address()
            if s.core_address is not None and advertised is not None:
                announce = tasks.create_task(self._announce(advertised), name="edgeward-announce")
                self._stack.callback(announce.cancel)
        except BaseException:
            await self._stack.__aexit__(None, None, None)
            raise
        # No full collection of start-up's objects stalls a device's answer later.
        frozen = freeze_startup_heap()
        log.info(
            "gateway started",
            frozen_objects=frozen,
            grpc_port=self.grpc_port,
            metrics_port=self.metrics_port,
            console=self.console.url if self.console is not None else None,
            standalone=s.core_address is None,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _log.info("gateway stopping", gateway_id=self.gateway_id)
        await self._stack.__aexit__(exc_type, exc, tb)
        _log.info("gateway stopped", gateway_id=self.gateway_id)

    def _advertised_address(self) -> str | None:
        """Where devices reach this gateway: the configured address, else the listen one."""
        s = self.settings
        if s.advertise_address is not None:
            return s.advertise_address
        host, _ = _split(s.listen)
        if host in ("", "0.0.0.0", "::", "[::]"):  # noqa: S104 - a comparison, not a bind
            _log.warning(
                "listening on a wildcard address and no advertise_address set: this gateway "
                "does not announce itself for the signed gateway directory",
                gateway_id=self.gateway_id,
            )
            return None
        return f"{host}:{self.grpc_port}"

    def _advertised_mqtt_address(self) -> str | None:
        """The devices' MQTT listener, when this gateway runs one on a known address."""
        from gateway._mqtt._config import MqttSettings

        mqtt = self.settings.section("mqtt", MqttSettings)
        if mqtt is None or not mqtt.enabled:
            return None
        if not mqtt.managed:
            return mqtt.broker_address
        wildcard = mqtt.host in ("", "0.0.0.0", "::")  # noqa: S104 - a comparison, not a bind
        if mqtt.port == 0 or wildcard:
            return None
        return f"{mqtt.host}:{mqtt.port}"

    async def _announce(self, address: str) -> None:
        """Announce this gateway to a core (identity from its certificate), retrying with
        jittered backoff, over every replica, until one has it: devices find gateways in
        the directory (replicas share it)."""
        from protos.edgeward.v1 import common_pb2

        cores = self._cores()
        entry = common_pb2.GatewayEntry(
            gateway_id=self.gateway_id,
            region=self.settings.region,
            grpc_address=address,
            mqtt_address=self._advertised_mqtt_address() or "",
        )

        async def announce(core: str) -> None:
            # grpc-stubs types the stub's methods as synchronous; on aio they are awaitable.
            method: Any = cores.stub(core).AnnounceGateway
            await method(entry, timeout=self.settings.core_timeout_s)

        delay = 0.5
        while True:
            try:
                await cores.call(announce)
            except grpc.aio.AioRpcError as exc:
                _log.warning(
                    "announcing to the core failed; retrying",
                    code=exc.code().name,
                    details=exc.details(),
                    retry_in_s=round(delay, 1),
                )
                await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311
                delay = min(delay * 2, 30.0)
                continue
            _log.info("announced to the core", grpc_address=address, core=cores.current)
            return

    async def _watch_feed(self) -> None:
        while True:
            self.metrics.feed_healthy.set(1 if self.revocation.healthy() else 0)
            await asyncio.sleep(1.0)

    async def run_until_signalled(self, stop: asyncio.Event | None = None) -> None:
        """Serve until SIGTERM or SIGINT (or ``stop`` is set), then return (leave to stop)."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
        try:
            await stop.wait()
            _log.info("shutdown requested", gateway_id=self.gateway_id)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
