"""Prometheus metrics of one gateway or one core, served as text on an HTTP port (``/metrics``).

Each :class:`GatewayMetrics` and :class:`CoreMetrics` has its own
:class:`~prometheus_client.CollectorRegistry` (not the process-global one), so several
gateways and cores can run in one process (tests, the demo) without their series colliding.
:class:`GatewayMetrics` doubles as the inference engine's ``EngineObserver``.

Series (all prefixed ``edgeward_gateway_``):

=================================  ===========  ===============================================
name                               type         labels
=================================  ===========  ===============================================
``requests_total``                 counter      method, code (gRPC status name)
``request_seconds``                histogram    method
``frames_total``                   counter      method, code (one per frame, streams included)
``batch_size``                     histogram
``batch_seconds``                  histogram
``queue_depth``                    gauge
``cache_lookups_total``            counter      kind (exact, perceptual, miss)
``denials_total``                  counter      reason (unauthenticated, revoked, not_allowed,
                                                feed_stale, rate_limited, …)
``revocation_events_total``        counter
``revocation_feed_healthy``        gauge        1 when fresh
``live_streams``                   gauge        method
``cut_calls_total``                counter      (live calls ended by a revocation)
``mqtt_<counter>_total``           counter      the MQTT bridge's ``BridgeStats`` (frames
                                                received, inferred, duplicate, rejected;
                                                telemetry received, rejected; events published;
                                                reconnects; rejected topics)
``mqtt_refused_total``             counter      reason (every refused MQTT message)
``escalations_total``              counter      outcome (the escalator's ``counts``: queued,
                                                delivered, retries, refused_<reason>, …)
=================================  ===========  ===============================================

Components keep plain counters of their own and register a reader for them
(:meth:`GatewayMetrics.add_counters`); they are read at each scrape, so no component imports
Prometheus and no counter is kept twice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Protocol, Self

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway._inference import CacheKind, EngineObserver
from gateway._wire import ListenError

__all__ = ["CoreMetrics", "CounterReader", "GatewayMetrics", "MetricsServer"]

#: Reads a component's counters at scrape time: series name → value, or series name →
#: (label value → value) for a labelled family.
CounterReader = Callable[[], Mapping[str, "float | Mapping[str, float]"]]


class _Counters(Collector):
    """A component's own counters as Prometheus counter families, read at each scrape."""

    def __init__(
        self, prefix: str, read: CounterReader, documentation: Mapping[str, str], label: str
    ) -> None:
        self._prefix = prefix
        self._read = read
        self._documentation = documentation
        self._label = label

    def collect(self) -> Iterator[Metric]:
        for name, value in sorted(self._read().items()):
            doc = self._documentation.get(name, name.replace("_", " "))
            full = f"{_NS}_{self._prefix}{name}"
            if isinstance(value, Mapping):
                family = CounterMetricFamily(full, doc, labels=[self._label])
                for label_value, n in sorted(value.items()):
                    family.add_metric([label_value], float(n))
            else:
                family = CounterMetricFamily(full, doc, value=float(value))
            yield family


_NS = "edgeward_gateway"
_CORE_NS = "edgeward_core"
# Frame latencies: a cache hit is well under a millisecond, a model run on a CPU tens of ms.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
# Escalations: a model load takes seconds, a warm run tens to hundreds of milliseconds.
_ESCALATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6)
# Registry operations: SQLite in microseconds to milliseconds, PostgreSQL over a network more.
_REGISTRY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip


class GatewayMetrics(EngineObserver):
    """The gateway's metric families, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "requests", "Completed RPCs.", ["method", "code"], namespace=_NS, registry=r
        )
        self.request_seconds = Histogram(
            "request_seconds",
            "RPC latency (unary) or per-frame latency (StreamDetect).",
            ["method"],
            namespace=_NS,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.frames = Counter(
            "frames", "Frames answered or refused.", ["method", "code"], namespace=_NS, registry=r
        )
        self.batch_size = Histogram(
            "batch_size", "Frames per model run.", namespace=_NS, registry=r, buckets=_BATCH_BUCKETS
        )
        self.batch_seconds = Histogram(
            "batch_seconds",
            "Model run and post-processing time per batch.",
            namespace=_NS,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.queue_depth = Gauge(
            "queue_depth", "Frames waiting for the model.", namespace=_NS, registry=r
        )
        self.cache_lookups = Counter(
            "cache_lookups",
            "Response cache lookups by outcome.",
            ["kind"],
            namespace=_NS,
            registry=r,
        )
        self.denials = Counter(
            "denials", "Calls or frames refused, by reason.", ["reason"], namespace=_NS, registry=r
        )
        self.revocation_events = Counter(
            "revocation_events", "Revocation events applied.", namespace=_NS, registry=r
        )
        self.feed_healthy = Gauge(
            "revocation_feed_healthy",
            "1 while the revocation feed is fresh.",
            namespace=_NS,
            registry=r,
        )
        self.live_streams = Gauge(
            "live_streams", "Open streaming calls.", ["method"], namespace=_NS, registry=r
        )
        self.cut_calls = Counter(
            "cut_calls", "Live calls ended by a revocation.", namespace=_NS, registry=r
        )
        self.malformed_requests = Counter(
            "malformed_requests",
            "Requests that were not a valid protobuf message (answered INVALID_ARGUMENT).",
            ["method"],
            namespace=_NS,
            registry=r,
        )

    def add_counters(
        self,
        prefix: str,
        read: CounterReader,
        *,
        documentation: Mapping[str, str] | None = None,
        label: str = "reason",
    ) -> Callable[[], None]:
        """Export a component's counters as ``edgeward_gateway_<prefix><name>_total``.

        ``read`` is called at each scrape (on the scraping thread: it must only read).
        Returns the function that removes them again (the component stopped).
        """
        collector = _Counters(prefix, read, documentation or {}, label)
        self.registry.register(collector)
        return lambda: self.registry.unregister(collector)

    def on_malformed(self, method: str) -> None:
        """``gateway._wire`` hook: a request to ``method`` did not parse."""
        self.malformed_requests.labels(method=method).inc()

    # -- EngineObserver ---------------------------------------------------------------------

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def on_cache(self, kind: CacheKind) -> None:
        self.cache_lookups.labels(kind=kind).inc()

    def on_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    # -- exposition -------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


class CoreMetrics:
    """The core's metric families, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.enrolments = Counter(
            "enrolments", "Device certificates issued by Enroll.", namespace=_CORE_NS, registry=r
        )
        self.renewals = Counter(
            "renewals", "Device certificates issued by Renew.", namespace=_CORE_NS, registry=r
        )
        self.refusals = Counter(
            "refusals",
            "Requests refused, by method and reason.",
            ["method", "reason"],
            namespace=_CORE_NS,
            registry=r,
        )
        self.revocations = Counter(
            "revocations",
            "Revocations recorded in the registry (sequence numbers the feed saw).",
            namespace=_CORE_NS,
            registry=r,
        )
        self.escalations = Counter(
            "escalations",
            "Core.Escalate calls answered, by gRPC status.",
            ["code"],
            namespace=_CORE_NS,
            registry=r,
        )
        self.escalation_seconds = Histogram(
            "escalation_seconds",
            "Core.Escalate latency.",
            namespace=_CORE_NS,
            registry=r,
            buckets=_ESCALATION_BUCKETS,
        )
        self.registry_seconds = Histogram(
            "registry_seconds",
            "Registry operation latency, by operation.",
            ["operation"],
            namespace=_CORE_NS,
            registry=r,
            buckets=_REGISTRY_BUCKETS,
        )
        self.revocation_streams = Gauge(
            "revocation_streams",
            "Open WatchRevocations streams.",
            namespace=_CORE_NS,
            registry=r,
        )
        self.malformed_requests = Counter(
            "malformed_requests",
            "Requests that were not a valid protobuf message (answered INVALID_ARGUMENT).",
            ["method"],
            namespace=_CORE_NS,
            registry=r,
        )

    def on_malformed(self, method: str) -> None:
        """``gateway._wire`` hook: a request to ``method`` did not parse."""
        self.malformed_requests.labels(method=method).inc()

    def refused(self, method: str, reason: str) -> None:
        self.refusals.labels(method=method, reason=reason).inc()

    def on_registry(self, operation: str, seconds: float) -> None:
        self.registry_seconds.labels(operation=operation).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


class _HasRegistry(Protocol):
    registry: CollectorRegistry


class MetricsServer:
    """Serves ``metrics`` over HTTP on ``host:port`` (port 0: a free one, see ``port``).

    prometheus_client's server runs in its own daemon thread; scraping never touches the
    event loop. An async context manager so it has the same lifecycle as everything else.
    """

    def __init__(self, metrics: _HasRegistry, *, host: str, port: int) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._server: object | None = None
        self._thread: threading.Thread | None = None
        self.port = port

    async def __aenter__(self) -> Self:
        try:
            server, thread = start_http_server(
                self._port, addr=self._host, registry=self._metrics.registry
            )
        except OSError as exc:
            host = f"[{self._host}]" if ":" in self._host else self._host
            raise ListenError.from_os_error(
                exc, setting="metrics_listen", address=f"{host}:{self._port}"
            ) from None
        self._server, self._thread = server, thread
        self.port = int(server.server_port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        server = self._server
        if server is not None:
            import asyncio

            # shutdown() waits for the serving loop to notice (up to its 0.5 s poll): off-loop.
            await asyncio.to_thread(server.shutdown)  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
