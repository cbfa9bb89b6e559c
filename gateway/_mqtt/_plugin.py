"""The MQTT side as a gateway plug-in (``[mqtt]`` table → ``gateway._mqtt.plugin``).

``plugin(settings)`` validates the table and returns a factory that ``GatewayService`` calls
with its runtime. Entering it starts, in order: the managed broker (when ``managed``), its
control client and the revocation enforcer (registered as a revocation listener), then the
bridge on the gateway's front door (``runtime.door``: admission, pipeline, telemetry store,
refusals and event hub, the same as gRPC's), whose counters (``BridgeStats``) are exported as
``edgeward_gateway_mqtt_*``. Leaving stops them in reverse order and removes the listener.

The CRLs come from a core (``Enrollment.GetCrl`` over the gateway's mTLS identity, from
whichever replica of ``core_address`` answers) when the gateway has one, and are built from
``pki_dir``'s registry on a standalone gateway.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pki
from gateway._config import GatewaySettings
from gateway._core_endpoints import CoreEndpoints
from gateway._mqtt._bridge import BridgeConnection, MqttBridge
from gateway._mqtt._broker import (
    CrlSnapshot,
    CrlSource,
    MosquittoBroker,
    registry_crl_source,
)
from gateway._mqtt._config import MqttSettings
from gateway._mqtt._enforcer import BrokerControl, RevocationEnforcer
from gateway._mqtt._ingest_limit import IngestLimit

if TYPE_CHECKING:
    from gateway._service import GatewayRuntime

__all__ = ["plugin"]


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
            if mqtt.managed:
                broker = await stack.enter_async_context(
                    MosquittoBroker(
                        mqtt,
                        identity=identity,
                        crl_source=_crl_source(settings, identity),
                        ingest=(
                            IngestLimit.above(
                                settings.limits,
                                mqtt.ingest_limit_factor,
                                disconnect_after=mqtt.disconnect_after_refusals,
                            )
                            if mqtt.ingest_limit_factor
                            else None
                        ),
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
                gate_control = control
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
                broker = None
                gate_control = None
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
            bridge = await stack.enter_async_context(
                MqttBridge(
                    mqtt,
                    connection=connection,
                    door=runtime.door,
                    control=gate_control,
                )
            )
            if broker is not None:
                broker.add_refusal_listener(bridge.broker_refused)
                stack.callback(broker.remove_refusal_listener, bridge.broker_refused)
            await bridge.wait_ready(timeout_s=mqtt.connect_timeout_s * 3)
            stack.callback(runtime.metrics.add_counters("mqtt_", bridge.stats.counters))
            yield bridge

    return run
