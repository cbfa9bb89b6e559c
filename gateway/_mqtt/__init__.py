"""The gateway's MQTT side: a supervised Mosquitto over mutual TLS and the bridge to inference.

* :class:`MqttSettings`: the ``[mqtt]`` table of the gateway's configuration.
* :class:`MosquittoBroker` (``_broker``) supervises the broker and keeps its CRL current, with
  the ``mosquitto.conf`` that ``_mosquitto_conf`` renders (mTLS, AEAD ciphers, per-device
  ACLs, dynamic security); :class:`BrokerControl` and :class:`RevocationEnforcer`
  (``_enforcer``) cut a revoked device's live session and refuse its reconnects.
* :class:`IngestLimit` (``_ingest_limit``): the per-device ingest limit the managed broker
  enforces itself (the ``edgeward_ingest`` plugin), and :class:`BrokerRefusal`, its reports.
* :class:`MqttBridge`: topics, acknowledgements and de-duplication around the gateway's front
  door (:class:`~gateway._door.FrontDoor`: admission, the frame pipeline, the telemetry
  store, refusals, the same as gRPC's); :class:`BridgeConnection` says how it reaches the
  broker.

* :func:`plugin`: the ``[mqtt]`` table as a ``GatewayService`` plug-in (broker, enforcer and
  bridge on the gateway's front door).

Topics, payloads and the ACL model: ``docs/mqtt.md``.
"""

from gateway._mqtt._bridge import BridgeConnection, BridgeStats, MqttBridge
from gateway._mqtt._broker import (
    CrlSnapshot,
    CrlSource,
    MosquittoBroker,
    registry_crl_source,
)
from gateway._mqtt._config import (
    AEAD_CIPHERS_TLS13,
    INTERNAL_PREFIX,
    NODELAY,
    MqttSettings,
    internal_name,
)
from gateway._mqtt._enforcer import BrokerControl, RevocationEnforcer
from gateway._mqtt._floodgate import FloodGate
from gateway._mqtt._ingest_limit import (
    BUILT_PLUGIN,
    PLUGIN_SOURCE,
    BrokerRefusal,
    IngestLimit,
    parse_report,
)
from gateway._mqtt._mosquitto_conf import (
    BrokerCredentials,
    BrokerFiles,
    device_acl,
    dynsec_config,
    render_mosquitto_conf,
)
from gateway._mqtt._plugin import plugin
from gateway._mqtt._telemetry import (
    PROTOBUF_CONTENT_TYPE,
    InvalidTelemetry,
    TelemetryReading,
    device_from_topic,
    parse_telemetry,
)
from gateway._ports import free_port

__all__ = [
    "AEAD_CIPHERS_TLS13",
    "BUILT_PLUGIN",
    "INTERNAL_PREFIX",
    "NODELAY",
    "PLUGIN_SOURCE",
    "PROTOBUF_CONTENT_TYPE",
    "BridgeConnection",
    "BridgeStats",
    "BrokerControl",
    "BrokerCredentials",
    "BrokerFiles",
    "BrokerRefusal",
    "CrlSnapshot",
    "CrlSource",
    "FloodGate",
    "IngestLimit",
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
    "parse_report",
    "parse_telemetry",
    "plugin",
    "registry_crl_source",
    "render_mosquitto_conf",
]
