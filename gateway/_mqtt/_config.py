"""The ``[mqtt]`` table of the gateway's configuration: broker, listeners, bridge.

Validated by :class:`MqttSettings` (``GatewaySettings.section("mqtt", MqttSettings)``), so an
unknown or bad key fails at start-up with the key's name and its environment override
(``EDGEWARD_GATEWAY_MQTT__PORT``). Two ways to run:

* ``managed = true`` (default): the gateway writes ``mosquitto.conf`` into ``data_dir`` and
  supervises Mosquitto as a child process. Devices connect to ``host:port`` (mutual TLS, the
  certificate CN is the MQTT username and the client id); the gateway's own bridge connects to
  a second, loopback listener ``bridge_host:bridge_port`` (mutual TLS *and* a per-start random
  password).
* ``managed = false``: ``broker_address`` names a broker someone else runs (docker-compose);
  the bridge connects with the gateway's certificate and, when set, ``username``/``password_file``.
  ``docs/mqtt.md`` gives the broker configuration that keeps the same guarantees.
"""

from __future__ import annotations

import resource
import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import pki

__all__ = [
    "AEAD_CIPHERS_TLS13",
    "BROKER_RESERVED_FILES",
    "INTERNAL_PREFIX",
    "NODELAY",
    "MqttSettings",
    "internal_name",
]

#: Descriptors a managed Mosquitto needs besides device connections: its listeners, the
#: gateway's own clients (bridge, telemetry workers, control), the persistence database
#: written at each autosave, the CRL and ACL files it rereads, its log pipe.
BROKER_RESERVED_FILES = 64

#: Every TLS 1.3 suite is AEAD; listed explicitly so the broker offers exactly these.
AEAD_CIPHERS_TLS13 = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"

#: Socket options of every MQTT client the gateway runs. paho leaves Nagle's algorithm on, so
#: the tail of a PUBLISH waits for the broker's delayed ACK (about 40 ms on Linux): measured,
#: a 35 kB frame took 44 ms to be acknowledged and a detection 20 ms; with this, 3 and 2 ms.
#: (The broker's side is ``set_tcp_nodelay true``.)
NODELAY: tuple[tuple[int, int, int], ...] = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)

#: Prefix of every broker username and client id the gateway itself uses. Mosquitto keeps one
#: client-id namespace across all listeners, and a second connection with a taken client id
#: ends the first (MQTT session takeover). On the devices' listener the client id is forced to
#: the certificate CN, a device id (``pki.ID_PATTERN``: ``a-z``, ``0-9``, ``-``); ``_`` and
#: ``.`` are outside that alphabet, so no device can take over, or be kicked as, one of these.
INTERNAL_PREFIX = "_edgeward."


def internal_name(*parts: str) -> str:
    """A broker username or client id of the gateway itself: ``_edgeward.<part>.<part>``.

    Never a valid device id (see :data:`INTERNAL_PREFIX`), whatever ``parts`` hold.
    """
    return INTERNAL_PREFIX + ".".join(parts)


class MqttSettings(BaseModel):
    """Settings of the MQTT side of a gateway (the ``[mqtt]`` table)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="Run the MQTT side at all.")
    managed: bool = Field(
        default=True,
        description="Start and supervise our own Mosquitto; false: use broker_address.",
    )
    host: str = Field(
        default="127.0.0.1", description="Managed: address of the devices' mTLS listener."
    )
    port: int = Field(
        default=8883, ge=0, le=65535, description="Managed: port of the devices' mTLS listener."
    )
    bridge_host: str = Field(
        default="127.0.0.1",
        description="Managed: address of the gateway's own listener (keep it on loopback).",
    )
    bridge_port: int = Field(
        default=8884,
        ge=0,
        le=65535,
        description="Managed: port of the gateway's own listener (mTLS + per-start password).",
    )
    broker_address: str | None = Field(
        default=None,
        description="Unmanaged: host:port of an external broker's mTLS listener.",
    )
    username: str | None = Field(
        default=None,
        description="Unmanaged: MQTT username of the bridge, when the broker does not take it "
        "from the certificate.",
    )
    password_file: Path | None = Field(
        default=None, description="Unmanaged: file holding the bridge's MQTT password."
    )
    mosquitto_binary: str = Field(
        default="mosquitto", description="Managed: the Mosquitto executable (name or path)."
    )
    dynsec_plugin: Path = Field(
        default=Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"),
        description="Managed: Mosquitto's dynamic security plugin, used only to disconnect "
        "revoked devices at once.",
    )
    data_dir: Path = Field(
        default=Path("var/mqtt"),
        description="Managed: broker configuration, ACLs, CRL and persistence database.",
    )
    crl_path: Path | None = Field(
        default=None, description="CRL file the broker checks (default: data_dir/crl.pem)."
    )
    crl_refresh_s: float = Field(
        default=600.0,
        gt=0.0,
        description="Refresh the CRL at least this often (before its nextUpdate passes, "
        "after which TLS refuses every certificate).",
    )
    ciphers: str = Field(
        default=pki.AEAD_CIPHERS_TLS12,
        description="TLS 1.2 cipher list: ECDHE with AEAD only (no CBC, RFC 7457 §2.8).",
    )
    ciphers_tls13: str = Field(default=AEAD_CIPHERS_TLS13, description="TLS 1.3 cipher suites.")
    max_payload_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        le=256 * 1024 * 1024,
        description="Largest accepted message payload (message_size_limit); larger packets "
        "disconnect the sender (max_packet_size).",
    )
    max_connections: int = Field(
        default=-1,
        ge=-1,
        description="Managed: device connections accepted at once (-1: as many as the "
        "broker's open-files limit allows, less what it needs for itself).",
    )
    qos: Literal[0, 1] = Field(
        default=1, description="QoS of the bridge's subscriptions and publications."
    )
    shared_group: str = Field(
        default="edgeward",
        pattern=r"^[a-z0-9][a-z0-9-]{0,31}$",
        description="Shared-subscription group of the bridge's consumers ($share/<group>/…).",
    )
    frame_workers: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Bridge consumers for frames (asyncio clients in the gateway process, "
        "one shared subscription).",
    )
    telemetry_workers: int = Field(
        default=2,
        ge=0,
        le=32,
        description="Telemetry ingest processes (shared subscription); 0 = in the bridge.",
    )
    max_in_flight: int = Field(
        default=1024,
        ge=1,
        le=65535,
        description="Unacknowledged messages the broker sends each consumer (MQTT 5 receive "
        "maximum; the rest wait at the broker). Refused frames are acknowledged at once but "
        "in order (MQTT 5 §4.6), behind the frames still being answered, so this window must "
        "hold both, or a flood's refusals stall at the broker in front of other devices' "
        "frames. Frames waiting for the model are bounded by [inference] queue_size.",
    )
    disconnect_after_refusals: int = Field(
        default=20,
        ge=0,
        description="Managed: a device refused this many frames within one second is "
        "disconnected and told why on its events, so its flood stops costing the broker and "
        "the bridge and no other device's frames queue behind it; 0: never.",
    )
    ingest_limit_factor: float = Field(
        default=2.0,
        ge=0.0,
        description="Managed: the broker itself refuses a device's messages beyond this many "
        "times its [limits] budget (frames_per_s, burst), by a plugin on the devices' listener, "
        "so a flood never reaches the bridge or queues ahead of other devices' frames; at "
        "least 1, or 0: off.",
    )
    ingest_plugin: Path | None = Field(
        default=None,
        description="Managed: the edgeward_ingest Mosquitto plugin (default: the one "
        "gateway/_mqtt/ingest/build.sh builds beside its source in the gateway package; when "
        "that one is missing the broker runs without the limit and the gateway warns).",
    )
    frame_deadline_s: float = Field(
        default=5.0, gt=0.0, description="Deadline of one frame's inference."
    )
    session_expiry_s: int = Field(
        default=3600,
        ge=0,
        description="The bridge's persistent session survives this long while disconnected.",
    )
    device_session_expiration: str = Field(
        default="1d",
        pattern=r"^[0-9]+[hdwmy]$",
        description="Managed: persistent device sessions left unused this long are dropped "
        "(persistent_client_expiration).",
    )
    keepalive_s: int = Field(default=30, ge=5, description="MQTT keep-alive of the bridge.")
    connect_timeout_s: float = Field(
        default=10.0, gt=0.0, description="Deadline of one connection attempt."
    )
    reconnect_min_s: float = Field(
        default=0.2, gt=0.0, description="First reconnect delay (jittered, doubling)."
    )
    reconnect_max_s: float = Field(default=10.0, gt=0.0, description="Longest reconnect delay.")
    restart_min_s: float = Field(
        default=0.5, gt=0.0, description="Managed: first broker restart delay (doubling)."
    )
    restart_max_s: float = Field(
        default=30.0, gt=0.0, description="Managed: longest broker restart delay."
    )
    autosave_interval_s: int = Field(
        default=1,
        ge=0,
        description="Managed: seconds between saves of the broker's persistence database; "
        "a crash (not a stop) can lose what arrived since the last save.",
    )
    dedupe_size: int = Field(
        default=8192,
        ge=16,
        description="(device, frame id) pairs remembered so a redelivered frame is not run "
        "through the model twice.",
    )
    telemetry_max_keys: int = Field(
        default=32, ge=1, description="Most numeric readings one telemetry message may carry."
    )

    @field_validator("broker_address")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError("must be host:port")
        return value

    @model_validator(mode="after")
    def _check_mode(self) -> MqttSettings:
        if not self.managed and self.broker_address is None:
            raise ValueError("managed = false needs broker_address")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if self.restart_max_s < self.restart_min_s:
            raise ValueError("restart_max_s must be >= restart_min_s")
        if 0 < self.ingest_limit_factor < 1:
            raise ValueError("ingest_limit_factor must be 0 (off) or at least 1")
        return self

    def broker_max_connections(self, open_files_limit: int | None = None) -> int:
        """``max_connections`` for a broker whose soft ``RLIMIT_NOFILE`` is
        ``open_files_limit`` (default: this process's, which the broker it starts inherits).

        Mosquitto counts nothing against its descriptor limit: past it, ``accept`` fails with
        ``EMFILE`` and so does the ``open`` of its persistence file at the next autosave. So the
        devices' listener is capped at the limit less :data:`BROKER_RESERVED_FILES`, and a
        device beyond it is closed at once (it retries with backoff) while the broker keeps
        saving and serving the others. An explicit ``max_connections`` is kept when it fits.
        """
        if open_files_limit is None:
            soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            open_files_limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
        fits = max(1, open_files_limit - BROKER_RESERVED_FILES)
        if self.max_connections == -1:
            return fits
        return min(self.max_connections, fits)

    @property
    def crl_file(self) -> Path:
        """Where the CRL the broker checks lives."""
        return self.crl_path if self.crl_path is not None else self.data_dir / "crl.pem"
