"""Start a real edge gateway on port 0 for a test, and talk to it as a device.

``start_gateway(issue=…, tmp_path=…)`` runs a :class:`gateway.GatewayService` with the real
engine and model, mutual TLS from the test PKI, a standalone PKI registry of its own (so
tests can register device types and revoke through the real registry), metrics on port 0::

    async with start_gateway(issue=issue, tmp_path=tmp_path) as gw:
        gw.register("cam-1", "pet_camera")
        device = issue("device", "cam-1")
        async with gw.channel(device) as channel:
            stub = gateway_pb2_grpc.DeviceGatewayStub(channel)
            await stub.Detect(common_pb2.Frame(image=jpeg))
"""

from __future__ import annotations

import datetime as dt
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

import pki
from gateway import (
    GatewayPlugin,
    GatewayService,
    GatewaySettings,
    StaticDeviceDirectory,
    load_gateway_settings,
)
from protos.edgeward.v1 import gateway_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"


@dataclass
class RunningGateway:
    service: GatewayService
    registry: pki.SqliteRegistry | None
    address: str
    types: dict[str, str]

    @property
    def settings(self) -> GatewaySettings:
        return self.service.settings

    def register(self, device_id: str, device_type: str, region: str = "home") -> None:
        """Put a device of ``device_type`` into the gateway's registry."""
        if self.registry is None:
            self.types[device_id] = device_type
            return
        # The registry validates types like ids ([a-z0-9-]); the gateway treats - and _ alike.
        self.registry.upsert_device(
            device_id,
            type=device_type.replace("_", "-"),
            region=region,
            now=dt.datetime.now(dt.UTC),
        )

    def record_certificate(self, identity: pki.IdentityFiles) -> str:
        """Record a device certificate in the registry (so it can be revoked by serial)."""
        cert = identity.certificate()
        serial = pki.serial_hex(cert.serial_number)
        device_id = pki.identity_from_certificate(cert, trust_domain=identity.trust_domain).id
        assert self.registry is not None
        self.registry.record_certificate(
            pki.CertificateRecord(
                serial,
                device_id,
                cert.not_valid_after_utc,
                pki.Status.ACTIVE,
                cert.not_valid_before_utc,
            )
        )
        return serial

    def revoke(self, device_id: str, *, reason: str = "test") -> pki.RevocationRecord:
        """Revoke through the registry, as ``edgeward pki revoke`` does."""
        assert self.registry is not None
        return pki.revoke_device(
            self.registry, device_id, reason=reason, now=dt.datetime.now(dt.UTC)
        )

    def channel(
        self, identity: pki.IdentityFiles | None, *, ca_bundle: bytes | None = None
    ) -> grpc.aio.Channel:
        """An mTLS channel presenting ``identity`` (none: TLS without a client certificate)."""
        ca = ca_bundle if ca_bundle is not None else self.service.identity.ca_bundle.read_bytes()
        creds = pki.grpc_channel_credentials(ca_bundle_pem=ca, identity=identity)
        return grpc.aio.secure_channel(
            self.address,
            creds,
            options=[("grpc.max_send_message_length", 64 * 1024 * 1024)],
        )

    def stub(self, channel: grpc.aio.Channel) -> Any:
        return gateway_pb2_grpc.DeviceGatewayStub(channel)

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.service.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())


@asynccontextmanager
async def start_gateway(
    *,
    issue: Any,
    tmp_path: Path,
    gateway_id: str = "gw-test",
    overrides: dict[str, Any] | None = None,
    plugins: Sequence[GatewayPlugin] | None = (),
    revocation_source: Any = None,
    clock: Any = None,
    use_registry: bool = True,
    wrap_directory: Any = None,
) -> AsyncIterator[RunningGateway]:
    """A standalone gateway on 127.0.0.1:0 with the real model; yields a RunningGateway.

    ``overrides`` are settings keys (nested tables as dicts) applied over test defaults:
    cache off, a fast registry poll, generous limits. ``use_registry=False`` replaces the
    registry with an in-memory directory (``register``) and, unless ``revocation_source`` is
    given, a :class:`ManualFeed` (revoke with ``await gw.service.revocation.apply(...)``).
    ``plugins=None`` starts the plug-ins the settings configure (an ``[escalation]`` table in
    ``overrides``), as ``edgeward gateway run`` does; the default starts none.
    ``wrap_directory`` (with ``use_registry=False``) wraps the in-memory directory, e.g. to
    make look-ups slow.
    """
    identity = issue("gateway", gateway_id)
    registry_dir = tmp_path / f"registry-{gateway_id}"
    registry = pki.SqliteRegistry(pki.PkiLayout(registry_dir).registry) if use_registry else None
    types: dict[str, str] = {}
    base: dict[str, Any] = {
        "identity_dir": identity.directory,
        "pki_dir": registry_dir,
        "listen": "127.0.0.1:0",
        "metrics_listen": "127.0.0.1:0",
        "revocation_poll_interval_s": 0.05,
        "core_timeout_s": 2.0,
        "shutdown_grace_s": 2.0,
        "inference": {"models_dir": MODELS, "threads": 1},
        "cache": {"enabled": False},
        "limits": {"frames_per_s": 1000.0, "burst": 1000},
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    settings = load_gateway_settings(None, overrides=base)
    kwargs: dict[str, Any] = {"plugins": plugins, "revocation_source": revocation_source}
    if not use_registry:
        directory = StaticDeviceDirectory(types)
        kwargs["device_directory"] = wrap_directory(directory) if wrap_directory else directory
        kwargs["revocation_source"] = revocation_source or ManualFeed
    if clock is not None:
        kwargs["clock"] = clock
    try:
        async with GatewayService(settings, **kwargs) as service:
            yield RunningGateway(service, registry, f"127.0.0.1:{service.grpc_port}", types)
    finally:
        if registry is not None:
            registry.close()


class ManualFeed(AbstractAsyncContextManager["ManualFeed"]):
    """A revocation source a test drives by hand (``fresh=False``: never heard from)."""

    def __init__(self, state: Any, *, fresh: bool = True) -> None:
        self.state = state
        if fresh:
            state.mark_fresh()

    async def __aexit__(self, *exc: object) -> None:
        return None
