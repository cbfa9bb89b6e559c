"""Start a real core (enrolment + Core API + health) on loopback ports chosen by the OS.

::

    async with running_core(pki_dir, tmp_path) as core:
        token = core.token("cam-1")
        await device_sdk._enrollment.enroll(endpoint=core.enrol_address,
                                            ca_bundle_pem=core.ca_bundle_pem, token=token, …)
        async with core.channel(identity=gateway_files) as ch: …   # mutual-TLS port

By default the core gets a registry of its own in ``tmp_path`` (tests stay independent while
sharing the session PKI); ``shared_registry=True`` uses the PKI's registry, which is what
``edgeward pki revoke --dir PKI`` changes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

import pki
from gateway import CoreServer, EscalateHandler, load_core_settings

__all__ = ["RunningCore", "running_core", "unique_id"]

_counter = itertools.count()


def unique_id(prefix: str = "dev") -> str:
    """A device id no other test uses (the session PKI is shared)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class RunningCore:
    server: CoreServer
    address: str  # mutual-TLS port: Renew, Core API
    enrol_address: str  # server-authenticated TLS: Enroll, GetCACertificates, GetCrl
    ca_bundle_pem: bytes
    pki_dir: Path

    @property
    def registry(self) -> pki.SqliteRegistry:
        return self.server.registry

    @property
    def trust_domain(self) -> str:
        return self.server.trust_domain

    def token(
        self,
        device_id: str,
        *,
        device_type: str = "pet-camera",
        region: str = "home",
        ttl: dt.timedelta = dt.timedelta(hours=1),
    ) -> str:
        return self.server.create_token(device_id, device_type=device_type, region=region, ttl=ttl)

    def channel(self, *, identity: pki.IdentityFiles | None = None) -> grpc.aio.Channel:
        """A channel to the mutual-TLS port presenting ``identity`` (or the enrolment port
        without one)."""
        credentials = pki.grpc_channel_credentials(
            ca_bundle_pem=self.ca_bundle_pem, identity=identity
        )
        target = self.address if identity is not None else self.enrol_address
        # As every real client does: demand the core's role-pinned name, which also checks
        # that the core's self-issued certificate carries it.
        return grpc.aio.secure_channel(
            target, credentials, options=[pki.server_name_option(pki.core_server_name())]
        )


@contextlib.asynccontextmanager
async def running_core(
    pki_dir: Path,
    tmp_path: Path,
    *,
    shared_registry: bool = False,
    escalate: EscalateHandler | None = None,
    clock: Callable[[], dt.datetime] | None = None,
    limiter_clock: Callable[[], float] | None = None,
    **settings: Any,
) -> AsyncIterator[RunningCore]:
    """A :class:`CoreServer` on ``127.0.0.1:0`` (both ports); ``settings`` override fields."""
    n = next(_counter)
    values: dict[str, Any] = {
        "pki_dir": pki_dir,
        "listen": "127.0.0.1:0",
        "enrol_listen": "127.0.0.1:0",
        "metrics_listen": "127.0.0.1:0",
        "identity_dir": tmp_path / f"core-identity-{n}",
        "shutdown_grace_s": 0.2,
        "feed_heartbeat_s": 1.0,
    }
    if not shared_registry:
        values["registry"] = tmp_path / f"core-registry-{n}.sqlite3"
    values.update(settings)
    extra: dict[str, Any] = {}
    if clock is not None:
        extra["clock"] = clock
    if limiter_clock is not None:
        extra["limiter_clock"] = limiter_clock
    core_settings = load_core_settings(None, **values)
    async with CoreServer(core_settings, escalate=escalate, **extra) as server:
        yield RunningCore(
            server=server,
            address=server.address,
            enrol_address=server.enrol_address,
            ca_bundle_pem=server.ca_bundle_pem,
            pki_dir=pki_dir,
        )


class ObservedCore:
    """The real ``Core.Escalate`` handler with a look at each request and answer: subclasses
    override :meth:`seen` and :meth:`answered` (counting, capturing, timing)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __aenter__(self) -> Any:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.inner.__aexit__(None, None, None)

    def seen(self, request: Any) -> None:
        """Called with each request before the real handler answers it."""

    def answered(self, result: Any) -> None:
        """Called with each answer the real handler gave."""

    async def __call__(self, request: Any, context: Any, *, gateway: Any) -> Any:
        self.seen(request)
        result = await self.inner(request, context, gateway=gateway)
        self.answered(result)
        return result
