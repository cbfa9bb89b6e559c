"""The MQTT side as a gateway plug-in (``[mqtt]`` table → ``gateway._mqtt.plugin``).

``plugin(settings)`` validates the table and returns a factory that ``GatewayService`` calls
with its runtime. Entering it starts, in order: the managed broker (when ``managed``), its
control client and the revocation enforcer (registered as a revocation listener), then the
bridge on the gateway's front door (``runtime.door``: admission, pipeline, telemetry store,
refusals and event hub, the same as gRPC's), whose counters (``BridgeStats``) are exported as
``edgeward_gateway_mqtt_*``. Leaving stops them in reverse order and removes the listener.

The CRL comes from the core (``Enrollment.GetCrl`` over the gateway's mTLS identity) when the
gateway has a ``core_address``, and is built from ``pki_dir``'s registry on a standalone gateway.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

import pki
from gateway._config import GatewaySettings
from gateway._mqtt._bridge import BridgeConnection, MqttBridge
from gateway._mqtt._broker import (
    CrlSource,
    MosquittoBroker,
    core_crl_source,
    registry_crl_source,
)
from gateway._mqtt._config import MqttSettings
from gateway._mqtt._enforcer import BrokerControl, RevocationEnforcer

if TYPE_CHECKING:
    from gateway._service import GatewayRuntime

__all__ = ["plugin"]


def _crl_source(settings: GatewaySettings, identity: pki.IdentityFiles) -> CrlSource:
    if settings.core_address is not None:
        address = settings.core_address

        def channel() -> grpc.aio.Channel:
            creds = pki.grpc_channel_credentials(
                ca_bundle_pem=identity.ca_bundle.read_bytes(), identity=identity
            )
            # The CRL must come from the core, not from any server of the trust domain.
            return grpc.aio.secure_channel(
                address, creds, options=[pki.server_name_option(pki.core_server_name())]
            )

        return core_crl_source(channel, timeout_s=settings.core_timeout_s)
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
            bridge = await stack.enter_async_context(
                MqttBridge(
                    mqtt,
                    connection=connection,
                    door=runtime.door,
                )
            )
            await bridge.wait_ready(timeout_s=mqtt.connect_timeout_s * 3)
            stack.callback(runtime.metrics.add_counters("mqtt_", bridge.stats.counters))
            yield bridge

    return run
