"""The gateway's MQTT side: a supervised Mosquitto over mutual TLS and the bridge to inference.

* :class:`MqttSettings`: the ``[mqtt]`` table of the gateway's configuration.
* :class:`MosquittoBroker`: writes ``mosquitto.conf`` (mTLS, AEAD ciphers, per-device ACLs,
  CRL) and supervises the broker; :class:`BrokerControl` and :class:`RevocationEnforcer` cut a
  revoked device's live session and refuse its reconnects.
* :class:`MqttBridge`: frames to the inference engine and detections back (rendered with the
  gRPC side's ``result_to_pb``, escalation marks included), telemetry state, device events;
  :class:`BridgeConnection` says how it reaches the broker, :class:`Admission` and
  :data:`HookSource` plug in the gateway's authorisation and its detection hook.

* :func:`plugin`: the ``[mqtt]`` table as a ``GatewayService`` plug-in (broker, enforcer and
  bridge on the gateway's engine, event hub, revocation state and telemetry store).

Topics, payloads and the ACL model: ``docs/mqtt.md``.
"""

from gateway._mqtt._bridge import (
    Admission,
    BridgeConnection,
    BridgeStats,
    Detector,
    HookSource,
    MqttBridge,
)
from gateway._mqtt._broker import (
    BrokerControl,
    BrokerCredentials,
    BrokerFiles,
    CrlSnapshot,
    CrlSource,
    MosquittoBroker,
    RevocationEnforcer,
    device_acl,
    dynsec_config,
    free_port,
    registry_crl_source,
    render_mosquitto_conf,
)
from gateway._mqtt._config import (
    AEAD_CIPHERS_TLS13,
    INTERNAL_PREFIX,
    NODELAY,
    MqttSettings,
    internal_name,
)
from gateway._mqtt._plugin import plugin
from gateway._mqtt._telemetry import (
    PROTOBUF_CONTENT_TYPE,
    InvalidTelemetry,
    TelemetryReading,
    device_from_topic,
    parse_telemetry,
)

__all__ = [
    "AEAD_CIPHERS_TLS13",
    "INTERNAL_PREFIX",
    "NODELAY",
    "PROTOBUF_CONTENT_TYPE",
    "Admission",
    "BridgeConnection",
    "BridgeStats",
    "BrokerControl",
    "BrokerCredentials",
    "BrokerFiles",
    "CrlSnapshot",
    "CrlSource",
    "Detector",
    "HookSource",
    "InvalidTelemetry",
    "MosquittoBroker",
    "MqttBridge",
    "MqttSettings",
    "RevocationEnforcer",
    "TelemetryReading",
    "device_acl",
    "device_from_topic",
    "dynsec_config",
    "free_port",
    "internal_name",
    "parse_telemetry",
    "plugin",
    "registry_crl_source",
    "render_mosquitto_conf",
]
