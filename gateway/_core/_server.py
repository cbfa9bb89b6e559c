"""The core service host: Enrollment, Core and health on one gRPC server with two TLS ports.

* the **service port** (``listen``) uses mutual TLS: devices renew there and gateways call the
  Core API; the TLS layer verifies the client certificate against the trust domain's bundle.
* the **enrolment port** (``enrol_listen``) uses server-authenticated TLS only, because a device
  that enrols has no certificate yet. Python gRPC's server credentials cannot *ask* for a client
  certificate without *requiring* one, so the two needs take two ports of the same server.

The same servicers answer on both ports; each method checks the caller's identity from the
auth context, so ``Renew`` and every Core method refuse a caller on the enrolment port
(``UNAUTHENTICATED``), and Core methods refuse any identity but a gateway.

Each port is this process's alone (no ``SO_REUSEPORT``): a second core started on a port in use
stops with an error naming the setting (``listen``, ``enrol_listen``, ``metrics_listen``).
Requests that are not valid protobuf get ``INVALID_ARGUMENT`` on both ports
(:mod:`gateway._wire`). Prometheus metrics (:class:`gateway._metrics.CoreMetrics`) are served
on ``metrics_listen``.

Quick start: with only ``pki_dir`` and ``listen`` set, the core issues itself a server
certificate ``core/<id>`` naming the listen addresses into ``PKI_DIR/servers/core-<id>/``, and
records it in the registry so that it can be revoked like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import structlog
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

import pki
from gateway._core._config import CoreSettings, is_ip, split_address
from gateway._core._core_service import CoreService, EscalateHandler, RevocationFeed
from gateway._core._enrollment_service import EnrollmentService
from gateway._core._observe import timed_registry
from gateway._core._publish import CrlPublisher, DirectoryPublisher
from gateway._metrics import CoreMetrics, MetricsServer
from gateway._wire import SERVER_OPTIONS, add_service, bind, check_listen
from protos.edgeward.v1 import core_pb2_grpc, enrollment_pb2_grpc

__all__ = ["CoreServer", "ensure_server_identity"]

_log = structlog.get_logger(__name__)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _names_for(addresses: list[str], extra: list[str]) -> tuple[list[str], list[str]]:
    dns: list[str] = ["localhost"]
    ips: list[str] = ["127.0.0.1"]
    for host in [split_address(a)[0] for a in addresses] + list(extra):
        if host in {"0.0.0.0", "::", ""}:  # noqa: S104 - names, not a bind
            continue
        (ips if is_ip(host) else dns).append(host)
    return sorted(set(dns)), sorted(set(ips))


def ensure_server_identity(
    *,
    pki_dir: Path,
    directory: Path,
    core_id: str,
    addresses: list[str],
    extra_names: list[str],
    now: dt.datetime,
    registry: pki.Registry | None = None,
) -> pki.IdentityFiles:
    """The core's own identity; issued (again) when missing, past two thirds of its lifetime,
    from another CA, not naming every address it listens on or the core's pinned name
    (:func:`pki.core_server_name`, which clients demand), or revoked in ``registry``.

    With ``registry``, a new certificate is recorded there (revocable by serial), and one kept
    from an earlier start that the registry does not know yet is recorded too.
    """
    files = pki.IdentityFiles(directory)
    dns, ips = _names_for(addresses, extra_names)
    if files.exists():
        try:
            cert = files.certificate()
            ca = pki.CertificateAuthority.load(pki_dir)
            cert.verify_directly_issued_by(ca.certificate)
            pki.identity_from_certificate(cert, trust_domain=ca.trust_domain, role=pki.Role.CORE)
            life = cert.not_valid_after_utc - cert.not_valid_before_utc
            fresh = now < cert.not_valid_before_utc + life * 2 / 3
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            have = {str(n) for n in san.get_values_for_type(x509.DNSName)} | {
                str(a) for a in san.get_values_for_type(x509.IPAddress)
            }
            # A certificate from before role-pinned names lacks core.edgeward.internal, which
            # every client now demands: issue a new one.
            if (
                fresh
                and set(dns) | set(ips) | {pki.core_server_name()} <= have
                and (registry is None or _kept_in(registry, cert, core_id, now))
            ):
                return files
        except Exception:  # noqa: BLE001 - anything wrong with it means: issue a new one
            _log.info("core.identity.reissue", directory=str(directory))
    _log.info("core.identity.issue", core_id=core_id, dns=dns, ips=ips)
    return pki.issue_identity(
        pki_dir,
        directory,
        role=pki.Role.CORE,
        id=core_id,
        dns_names=dns,
        ip_addresses=ips,
        now=now,
        registry=registry,
    )


def _kept_in(
    registry: pki.Registry, cert: x509.Certificate, core_id: str, now: dt.datetime
) -> bool:
    """False when ``registry`` lists the core's current certificate as revoked; records it
    when the registry does not know it yet."""
    serial = pki.serial_hex(cert.serial_number)
    record = registry.get_server_certificate(serial)
    if record is None:
        with contextlib.suppress(pki.RegistryError):  # another process recorded it just now
            registry.record_server_certificate(
                pki.ServerCertificateRecord(
                    serial,
                    pki.Role.CORE,
                    core_id,
                    cert.not_valid_after_utc,
                    pki.Status.ACTIVE,
                    now,
                )
            )
        return True
    if record.status is pki.Status.REVOKED:
        _log.warning("core.identity.revoked", core_id=core_id, serial=serial)
        return False
    return True


class CoreServer:
    """Async context manager running the core's gRPC server until exit."""

    def __init__(
        self,
        settings: CoreSettings,
        *,
        escalate: EscalateHandler | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
        limiter_clock: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings
        self._escalate = escalate
        self._clock = clock
        self._limiter_clock = limiter_clock
        self._stack = contextlib.AsyncExitStack()
        self._server: grpc.aio.Server | None = None
        self._feed_task: asyncio.Task[None] | None = None
        self.address = ""
        self.enrol_address = ""
        #: The core's metric families (served on ``metrics_listen`` while it runs).
        self.metrics = CoreMetrics()
        #: The metrics endpoint's bound port; 0 when ``metrics_listen`` is unset.
        self.metrics_port = 0
        #: The operator console while it runs (``console_enabled``), else ``None``.
        self.console: Any = None

    # Set in __aenter__.
    ca: pki.CertificateAuthority
    registry: pki.CoreRegistry
    authority: pki.EnrollmentAuthority
    identity: pki.IdentityFiles
    feed: RevocationFeed

    @property
    def ca_bundle_pem(self) -> bytes:
        return self.ca.bundle_pem

    @property
    def trust_domain(self) -> str:
        return self.ca.trust_domain

    async def __aenter__(self) -> CoreServer:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self) -> None:
        s = self.settings
        self.ca = pki.CertificateAuthority.load(s.pki_dir)
        # Before any work: a second core on a busy port must fail fast, naming the setting.
        check_listen(s.listen, setting="listen")
        check_listen(s.enrol_address, setting="enrol_listen")
        if s.metrics_listen is not None:
            check_listen(s.metrics_listen, setting="metrics_listen")
        escalate = self._escalate
        if s.console_enabled:
            check_listen(s.console_listen, setting="console_listen")
            from gateway._console import (
                AuditRing,
                EscalationLog,
                install_audit_ring,
                uninstall_audit_ring,
            )

            self.audit_ring = AuditRing()
            install_audit_ring(self.audit_ring)
            self._stack.callback(uninstall_audit_ring, self.audit_ring)
            self.escalation_log = EscalationLog()
            if escalate is not None:
                escalate = self.escalation_log.wrap(escalate)
        self.registry = await asyncio.to_thread(pki.open_registry, s.registry_target)
        self._stack.callback(self.registry.close)
        # What the services use: the same registry, each operation timed for the metrics.
        registry = timed_registry(self.registry, self.metrics.on_registry)
        self.identity = ensure_server_identity(
            pki_dir=s.pki_dir,
            directory=s.identity_path,
            core_id=s.core_id,
            addresses=[s.listen, s.enrol_address],
            extra_names=list(s.server_names),
            now=self._clock(),
            registry=self.registry,
        )
        limiter_kwargs: dict[str, Any] = {}
        if self._limiter_clock is not None:
            limiter_kwargs["clock"] = self._limiter_clock
        self.authority = pki.EnrollmentAuthority(
            ca=self.ca,
            registry=registry,
            device_lifetime=s.device_certificate_lifetime,
            limiter=pki.FailureLimiter(
                burst=s.token_attempts.burst,
                per_minute=s.token_attempts.per_minute,
                **limiter_kwargs,
            ),
        )
        directory = DirectoryPublisher(
            ca=self.ca, registry=registry, static=s.gateways, clock=self._clock
        )
        crl = CrlPublisher(
            ca=self.ca, registry=registry, validity=s.crl_validity, clock=self._clock
        )
        self.feed = RevocationFeed(registry, poll_s=s.feed_poll_s, metrics=self.metrics)
        if self._escalate is not None and hasattr(self._escalate, "__aenter__"):
            await self._stack.enter_async_context(self._escalate)  # type: ignore[arg-type]

        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", s.grpc_max_message_bytes),
                ("grpc.max_send_message_length", s.grpc_max_message_bytes),
                # Gateways ping open calls every 20 s (gateway._core_endpoints); allow it
                # without letting a client ping-flood the core.
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                *SERVER_OPTIONS,
            ]
        )
        malformed = self.metrics.on_malformed
        add_service(
            server,
            enrollment_pb2_grpc.add_EnrollmentServicer_to_server,
            EnrollmentService(
                authority=self.authority,
                directory=directory,
                crl=crl,
                clock=self._clock,
                metrics=self.metrics,
            ),
            on_malformed=malformed,
        )
        add_service(
            server,
            core_pb2_grpc.add_CoreServicer_to_server,
            CoreService(
                trust_domain=self.ca.trust_domain,
                registry=registry,
                feed=self.feed,
                directory=directory,
                heartbeat_s=s.feed_heartbeat_s,
                clock=self._clock,
                escalate=escalate,
                metrics=self.metrics,
            ),
            on_malformed=malformed,
        )
        health = HealthServicer()
        add_service(
            server, health_pb2_grpc.add_HealthServicer_to_server, health, on_malformed=malformed
        )

        mtls = pki.grpc_server_credentials(self.identity, require_client_auth=True)
        server_auth = pki.grpc_server_credentials(self.identity, require_client_auth=False)
        host, _ = split_address(s.listen)
        ehost, _ = split_address(s.enrol_address)
        port = bind(server, s.listen, mtls, setting="listen")
        eport = bind(server, s.enrol_address, server_auth, setting="enrol_listen")
        self.address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.enrol_address = f"{ehost}:{eport}" if ":" not in ehost else f"[{ehost}]:{eport}"
        await server.start()
        self._server = server
        self._stack.push_async_callback(self._stop_server)
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        for name in ("edgeward.v1.Enrollment", "edgeward.v1.Core"):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._health = health
        if s.metrics_listen is not None:
            mhost, mport = split_address(s.metrics_listen)
            metrics_server = await self._stack.enter_async_context(
                MetricsServer(self.metrics, host=mhost, port=mport)
            )
            self.metrics_port = metrics_server.port

        if s.console_enabled:
            from gateway._console import CoreConsole

            self.console = await self._stack.enter_async_context(
                CoreConsole(self, escalations=self.escalation_log, audit_ring=self.audit_ring)
            )

        task_group = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._feed_task = task_group.create_task(self.feed.run(), name="core-revocation-feed")
        self._stack.callback(self._feed_task.cancel)
        _log.info(
            "core.started",
            core_id=s.core_id,
            trust_domain=self.ca.trust_domain,
            address=self.address,
            enrol_address=self.enrol_address,
            metrics_port=self.metrics_port or None,
            console=self.console.url if self.console is not None else None,
            registry=s.registry_display,
        )

    async def _stop_server(self) -> None:
        if self._server is None:
            return
        with contextlib.suppress(Exception):
            await self._health.enter_graceful_shutdown()
        await self._server.stop(self.settings.shutdown_grace_s)
        self._server = None
        _log.info("core.stopped", core_id=self.settings.core_id)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Unwinds in reverse: cancel the feed, leave the task group, stop the server
        # (grace for open calls), close the escalation handler, close the registry.
        await self._stack.aclose()

    def revoke_device(self, device_id: str, *, reason: str = "revoked") -> pki.RevocationRecord:
        """Revoke in this process and wake the feed at once (the CLI's path polls)."""
        record = self.authority.revoke_device(device_id, reason=reason, now=self._clock())
        self.feed.poke()
        return record

    def revoke_serial(self, serial: str, *, reason: str = "revoked") -> pki.RevocationRecord:
        record = self.authority.revoke_serial(serial, reason=reason, now=self._clock())
        self.feed.poke()
        return record

    def revoke_gateway(
        self, gateway_id: str, *, reason: str = "revoked"
    ) -> list[pki.RevocationRecord]:
        """Revoke every recorded certificate of a gateway and wake the feed at once."""
        records = pki.revoke_server(
            self.registry, pki.Role.GATEWAY, gateway_id, reason=reason, now=self._clock()
        )
        self.feed.poke()
        return records

    def revoke_operator(
        self, name: str, *, reason: str = "revoked", by: str = "", force: bool = False
    ) -> list[pki.RevocationRecord]:
        """Revoke a console operator (see :func:`pki.revoke_operator`), end its sessions at
        this core's console and wake the feed at once, so gateway consoles end theirs."""
        records = pki.revoke_operator(
            self.registry, name, reason=reason, now=self._clock(), by=by, force=force
        )
        if self.console is not None:
            self.console.sessions.drop_operator(name)
        self.feed.poke()
        return records

    def create_token(
        self,
        device_id: str,
        *,
        device_type: str = "pet-camera",
        region: str = "home",
        ttl: dt.timedelta = dt.timedelta(hours=1),
    ) -> str:
        """A one-time enrolment token (for tests, demos and embedding)."""
        return pki.create_token(
            self.registry,
            device_id=device_id,
            device_type=device_type,
            region=region,
            ttl=ttl,
            now=self._clock(),
        )
