"""The gateway's MQTT side: a supervised Mosquitto over mutual TLS and the bridge to inference.

* :class:`MqttSettings`: the ``[mqtt]`` table of the gateway's configuration.
* :class:`MosquittoBroker`: writes ``mosquitto.conf`` (mTLS, AEAD ciphers, per-device ACLs,
  CRL) and supervises the broker; :class:`BrokerControl` and :class:`RevocationEnforcer` cut a
  revoked device's live session and refuse its reconnects.
* :class:`MqttBridge`: frames to the inference engine and detections back, telemetry state,
  device events; :class:`BridgeConnection` says how it reaches the broker.

* :func:`plugin`: the ``[mqtt]`` table as a ``GatewayService`` plug-in (broker, enforcer and
  bridge on the gateway's engine, event hub, revocation state and telemetry store).

Topics, payloads and the ACL model: ``docs/mqtt.md``.
"""

from gateway._mqtt._bridge import (
    BridgeConnection,
    BridgeStats,
    Detector,
    FrameHook,
    MqttBridge,
    event_to_pb,
    result_to_pb,
)
from gateway._mqtt._broker import (
    BrokerControl,
    BrokerCredentials,
    BrokerFiles,
    CrlSource,
    MosquittoBroker,
    RevocationEnforcer,
    core_crl_source,
    device_acl,
    dynsec_config,
    free_port,
    registry_crl_source,
    render_mosquitto_conf,
)
from gateway._mqtt._config import AEAD_CIPHERS_TLS13, MqttSettings
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
    "PROTOBUF_CONTENT_TYPE",
    "BridgeConnection",
    "BridgeStats",
    "BrokerControl",
    "BrokerCredentials",
    "BrokerFiles",
    "CrlSource",
    "Detector",
    "FrameHook",
    "InvalidTelemetry",
    "MosquittoBroker",
    "MqttBridge",
    "MqttSettings",
    "RevocationEnforcer",
    "TelemetryReading",
    "core_crl_source",
    "device_acl",
    "device_from_topic",
    "dynsec_config",
    "event_to_pb",
    "free_port",
    "parse_telemetry",
    "plugin",
    "registry_crl_source",
    "render_mosquitto_conf",
    "result_to_pb",
]
