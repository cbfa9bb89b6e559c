"""The MQTT side as a gateway plug-in (``[mqtt]`` table → ``gateway._mqtt.plugin``).

``plugin(settings)`` validates the table and returns a factory that ``GatewayService`` calls
with its runtime. Entering it starts, in order: the managed broker (when ``managed``), its
control client and the revocation enforcer (registered as a revocation listener), then the
bridge on the gateway's engine, event hub, revocation state, telemetry store, authorisation
(``runtime.authoriser``: the gRPC side's ``[authorisation]`` policy, a frame is a ``Detect``)
and detection hook (``runtime.servicer.detection_hook``, read per frame). Leaving stops them
in reverse order and removes the listener.

The CRL comes from the core (``Enrollment.GetCrl`` over the gateway's mTLS identity) when the
gateway has a ``core_address``, and is built from ``pki_dir``'s registry on a standalone gateway.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pki
from gateway._config import GatewaySettings
from gateway._core_endpoints import CoreEndpoints
from gateway._grpc._servicer import DetectionHook
from gateway._mqtt._bridge import BridgeConnection, MqttBridge
from gateway._mqtt._broker import (
    BrokerControl,
    BrokerFiles,
    CrlSnapshot,
    CrlSource,
    MosquittoBroker,
    RevocationEnforcer,
    registry_crl_source,
)
from gateway._mqtt._config import MqttSettings
from gateway._mqtt._telemetry import TelemetryReading
from gateway.errors import FeedStale

if TYPE_CHECKING:
    from gateway._service import GatewayRuntime

__all__ = ["plugin"]


def _legacy_consumer_ids(gateway_id: str) -> list[str]:
    """Client ids of the bridge's consumers before they moved to ``_edgeward.…`` names.

    Their persistent sessions, in a broker database an earlier release left, still belong to
    the shared subscriptions and would be handed a share of the frames and telemetry until
    they expire; the bridge ends them at start.
    """
    ids = [f"edgeward-{gateway_id}-frames-{i}" for i in range(16)]
    return ids + [f"edgeward-{gateway_id}-telemetry-{i}" for i in range(32)]


def _crl_source(settings: GatewaySettings, identity: pki.IdentityFiles) -> CrlSource:
    if settings.core_address is not None:
        # The CRL must come from a core (pinned name), from whichever replica answers.
        cores = CoreEndpoints.for_identity(settings.core_addresses, identity)
        timeout_s = settings.core_timeout_s

        async def source() -> CrlSnapshot:
            from protos.edgeward.v1 import enrollment_pb2, enrollment_pb2_grpc

            async def fetch(address: str) -> CrlSnapshot:
                async with cores.channel(address) as channel:
                    stub = enrollment_pb2_grpc.EnrollmentStub(channel)
                    reply = await stub.GetCrl(enrollment_pb2.GetCrlRequest(), timeout=timeout_s)
                return CrlSnapshot.parse(
                    bytes(reply.crl_der),
                    bytes(reply.device_crl_der),
                    sequence=int(reply.revocation_sequence),
                )

            return await cores.call(fetch)

        return source
    assert settings.pki_dir is not None  # noqa: S101 - load_gateway_settings requires one
    return registry_crl_source(Path(settings.pki_dir))


def plugin(
    settings: GatewaySettings,
) -> Callable[[Any], contextlib.AbstractAsyncContextManager[Any]] | None:
    """The MQTT plug-in for ``settings``, or ``None`` when ``[mqtt]`` is absent or disabled."""
    mqtt = settings.section("mqtt", MqttSettings)
    if mqtt is None or not mqtt.enabled:
        return None

    @contextlib.asynccontextmanager
    async def run(runtime: GatewayRuntime) -> AsyncIterator[MqttBridge]:
        identity: pki.IdentityFiles = runtime.identity
        async with contextlib.AsyncExitStack() as stack:
            # Sessions of an earlier release's consumers can only be in a broker database
            # that already exists, and are ended once (a broker someone else runs: perhaps,
            # at every start). Once only: those ids are valid device ids, and a device that
            # happens to hold one would lose its connection at each start.
            files = BrokerFiles(mqtt.data_dir)
            ended = mqtt.data_dir / "legacy-sessions-ended"
            legacy = not mqtt.managed or (
                any(files.persistence.glob("*.db")) and not ended.exists()
            )
            if mqtt.managed:
                broker = await stack.enter_async_context(
                    MosquittoBroker(
                        mqtt, identity=identity, crl_source=_crl_source(settings, identity)
                    )
                )
                creds = broker.credentials
                control = await stack.enter_async_context(
                    BrokerControl(
                        host=mqtt.bridge_host,
                        port=broker.bridge_port,
                        tls_context=pki.client_ssl_context(identity),
                        username=creds.control_username,
                        password=creds.control_password,
                        timeout_s=mqtt.connect_timeout_s,
                    )
                )
                enforcer = await stack.enter_async_context(RevocationEnforcer(broker, control))
                runtime.revocation.add_listener(enforcer.on_revocation)
                stack.callback(runtime.revocation.remove_listener, enforcer.on_revocation)
                connection = BridgeConnection(
                    host=mqtt.bridge_host,
                    port=broker.bridge_port,
                    identity=identity,
                    username=creds.bridge_username,
                    password=creds.bridge_password,
                )
            else:
                assert mqtt.broker_address is not None  # noqa: S101 - validated
                host, _, port = mqtt.broker_address.rpartition(":")
                password = mqtt.password_file.read_text().strip() if mqtt.password_file else None
                connection = BridgeConnection(
                    host=host,
                    port=int(port),
                    identity=identity,
                    username=mqtt.username,
                    password=password,
                )
            servicer = runtime.servicer
            revocation = runtime.revocation
            authoriser = runtime.authoriser

            def hook() -> DetectionHook | None:
                # Read per frame: the escalation plug-in installs it after this one starts.
                current: DetectionHook | None = servicer.detection_hook
                return current

            async def admit(device_id: str, method: str) -> str | None:
                # The gRPC servicer's checks, in its order: a gateway that may have missed a
                # revocation takes no new work, then the device type's methods, then the
                # device's rate budget. The region
                # comes from the same registry facts (cached by the authoriser).
                if not revocation.healthy():
                    raise FeedStale(revocation.stale_for())
                info = await authoriser.check(device_id, method)
                # One frame budget per device across gRPC and MQTT ([limits] frames_per_s,
                # burst). Telemetry over MQTT is bounded by the ingest queue instead: only the
                # latest state per device is kept, so a flood costs parsing, not memory.
                if method == "Detect":
                    servicer.take_token(device_id, method)
                return info.region

            def store(reading: TelemetryReading) -> None:
                from gateway._grpc._servicer import TelemetryRecord

                servicer.telemetry.put(
                    TelemetryRecord(
                        device_id=reading.device_id,
                        received_at=reading.received_at,
                        reported_at=reading.reported_at,
                        battery_percent=reading.battery_percent,
                        temperature_c=reading.temperature_c,
                        firmware_version=reading.firmware_version,
                        readings=reading.readings,
                    )
                )

            bridge = await stack.enter_async_context(
                MqttBridge(
                    mqtt,
                    connection=connection,
                    engine=runtime.engine,
                    gateway_id=runtime.gateway_id,
                    is_revoked=lambda device_id: runtime.revocation.is_revoked(device_id, ""),
                    events=runtime.events,
                    telemetry_sink=store,
                    admit=admit,
                    detection_hook=hook,
                    end_sessions=_legacy_consumer_ids(runtime.gateway_id) if legacy else (),
                    refusals=servicer.refusals,
                    on_refused=servicer.count_refusal,
                    escalations=servicer.escalations,
                )
            )
            await bridge.wait_ready(timeout_s=mqtt.connect_timeout_s * 3)
            if mqtt.managed:
                pki.write_atomic(ended, b"")
            yield bridge

    return run
