"""The Mosquitto configuration the gateway writes: listeners, TLS, ACLs, dynamic security.

What the written configuration guarantees (Mosquitto 2.0, ``per_listener_settings true``):

* **Devices' listener** (``host:port``): mutual TLS only (``require_certificate``), trusting
  the device issuing CA *alone*, written as an OpenSSL ``TRUSTED CERTIFICATE`` with explicit
  ``clientAuth`` trust (:func:`pki.trusted_client_anchor_pem`): OpenSSL takes it as the anchor
  and builds no path past it to the root, so only certificates the device CA issued get through
  the handshake. A gateway's or core's certificate, or anything else the other issuing CA
  signed (no EKU, two SPIFFE URIs, another role), is refused at TLS time, exactly as the gRPC
  device listener refuses it per call (``gateway/_grpc/_identity.py``). The device CA issues
  the device profile only (one device URI, ``clientAuth``) from token-bound CSRs. A CRL file
  (``crlfile``: the CRL of each issuing CA, one after the other) kept current, TLS 1.2 floor
  with AEAD-only
  ciphers (Mosquitto's default list still offers CBC suites; RFC 7457 §2.8), ``set_tcp_nodelay``
  (without it each connect pays tens of milliseconds of Nagle delay). The certificate CN is the
  MQTT username (``use_identity_as_username``) *and* the client id (``use_username_as_clientid``,
  a listener option in Mosquitto 2.0: it leaves the gateway's listener alone). Mosquitto keeps
  one client-id namespace across all listeners and a second connection with a taken client id
  ends the first, so a client id a device could choose would let it disconnect another device,
  or the gateway's own clients on the other listener (and, with a clean start, wipe their
  persistent sessions). Forced to the CN, a device's client id is its own id: it can replace
  only its own connection (one connection per device), and every client id and username of
  the gateway itself (:func:`~gateway._mqtt._config.internal_name`, ``_edgeward.…``) lies
  outside the device id alphabet.
* **Devices' ACL**: exact topics only, no trailing ``#``::

      pattern write devices/%u/frames      pattern read devices/%u/detections
      pattern write devices/%u/telemetry   pattern read devices/%u/events

  A CN holding ``+`` or ``#`` gets nothing: Mosquitto refuses pattern ACLs for such usernames
  (CVE-2017-7650). A CN holding ``/`` (``dev-1/frames``) cannot reach ``dev-1``'s topics because
  no pattern ends in a wildcard (``devices/%u/#`` *would* let it: ``a/#`` also matches ``a``).
  ``$SYS`` is neither published (``sys_interval 0``) nor readable. No ``user`` lines: a device
  whose id equals the gateway's gets no more than any device.
* **The gateway's listener** (``bridge_host:bridge_port``, loopback): mutual TLS trusting only
  the CA that issued the gateway's own certificate (the same ``clientAuth`` anchor form, so no
  device certificate gets through) *and* a username/password that is random per broker start,
  checked by the dynamic security plugin, whose roles give the bridge exactly
  ``devices/+/frames``, ``devices/+/telemetry`` (read) and ``devices/+/detections``,
  ``devices/+/events`` (write), and give a separate control user
  ``$CONTROL/dynamic-security/v1`` (to disconnect revoked devices). No certificate CN can reach
  these rights: they live on another listener and need a secret that never leaves the gateway's
  data directory.

The broker is started and supervised by :mod:`gateway._mqtt._broker`; revocations are
enforced on it by :mod:`gateway._mqtt._enforcer`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pki
from gateway._mqtt._config import MqttSettings, internal_name

__all__ = [
    "BRIDGE_USERNAME",
    "CONTROL_CLIENT_ID",
    "CONTROL_RESPONSE_TOPIC",
    "CONTROL_TOPIC",
    "CONTROL_USERNAME",
    "DEVICE_ACL",
    "BrokerCredentials",
    "BrokerFiles",
    "device_acl",
    "dynsec_config",
    "render_mosquitto_conf",
]


CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
CONTROL_RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"
#: The gateway's users on its own listener and the control client's id (never device ids).
BRIDGE_USERNAME = internal_name("bridge")
CONTROL_USERNAME = internal_name("control")
CONTROL_CLIENT_ID = internal_name("control")

DEVICE_ACL = """\
# Written by edgeward at each broker start; do not edit.
# The username is the certificate CN (use_identity_as_username). Exact topics only: a CN
# holding "/" must not reach another device's subtree, which a trailing "#" would allow.
# Mosquitto denies pattern ACLs to usernames holding "+" or "#" (CVE-2017-7650).
pattern write devices/%u/frames
pattern write devices/%u/telemetry
pattern read devices/%u/detections
pattern read devices/%u/events
"""


def device_acl() -> str:
    """The ACL file of the devices' listener."""
    return DEVICE_ACL


@dataclass(frozen=True, slots=True)
class BrokerCredentials:
    """Per-start secrets of the gateway's listener: the bridge's and the control user's."""

    bridge_username: str
    bridge_password: str
    control_username: str
    control_password: str

    def __repr__(self) -> str:  # never show the passwords
        return f"BrokerCredentials(bridge={self.bridge_username!r})"

    @classmethod
    def generate(cls) -> BrokerCredentials:
        # Internal names are never device ids: a revoked device's kick (a plugin client of the
        # device's name created and deleted) cannot delete one of these users.
        return cls(
            bridge_username=BRIDGE_USERNAME,
            bridge_password=secrets.token_urlsafe(32),
            control_username=CONTROL_USERNAME,
            control_password=secrets.token_urlsafe(32),
        )


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    """Where the managed broker's files live under ``data_dir``."""

    data_dir: Path

    @property
    def conf(self) -> Path:
        return self.data_dir / "mosquitto.conf"

    @property
    def device_cafile(self) -> Path:
        """The devices' listener's only trust anchor: the device CA, trusted for clientAuth."""
        return self.data_dir / "device-ca.pem"

    @property
    def gateway_cafile(self) -> Path:
        """The gateway's listener's only trust anchor: its own issuing CA, for clientAuth."""
        return self.data_dir / "gateway-ca.pem"

    @property
    def acl(self) -> Path:
        return self.data_dir / "devices.acl"

    @property
    def dynsec(self) -> Path:
        return self.data_dir / "dynamic-security.json"

    @property
    def persistence(self) -> Path:
        return self.data_dir / "db"

    @property
    def bridge_secret(self) -> Path:
        """The bridge's credentials for processes the gateway starts (0600)."""
        return self.data_dir / "bridge-credentials.json"

    @property
    def pid(self) -> Path:
        """The running broker's process id (Mosquitto's ``pid_file``)."""
        return self.data_dir / "mosquitto.pid"


def _dynsec_client(username: str, password: str, role: str) -> dict[str, Any]:
    # The plugin's own format: PBKDF2-HMAC-SHA512 over the password, 12-byte salt.
    salt = secrets.token_bytes(12)
    iterations = 101
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return {
        "username": username,
        "textname": username,
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
        "roles": [{"rolename": role}],
    }


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "priority": 0, "allow": True}


def dynsec_config(creds: BrokerCredentials, *, shared_group: str) -> dict[str, Any]:
    """The dynamic security plugin's configuration for the gateway's listener."""
    device_in = ("devices/+/frames", "devices/+/telemetry")
    device_out = ("devices/+/detections", "devices/+/events")
    bridge_acls = [_acl("publishClientSend", t) for t in device_out]
    bridge_acls += [_acl("publishClientReceive", t) for t in device_in]
    for t in device_in:
        for sub in (t, f"$share/{shared_group}/{t}"):
            bridge_acls += [_acl("subscribePattern", sub), _acl("unsubscribePattern", sub)]
    control_acls = [
        _acl("publishClientSend", CONTROL_TOPIC),
        _acl("publishClientReceive", CONTROL_RESPONSE_TOPIC),
        _acl("subscribeLiteral", CONTROL_RESPONSE_TOPIC),
        _acl("unsubscribeLiteral", CONTROL_RESPONSE_TOPIC),
    ]
    return {
        # Anything not granted by a role is refused on this listener.
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": False,
        },
        "clients": [
            _dynsec_client(creds.bridge_username, creds.bridge_password, BRIDGE_USERNAME),
            _dynsec_client(creds.control_username, creds.control_password, CONTROL_USERNAME),
        ],
        "groups": [],
        "roles": [
            {"rolename": BRIDGE_USERNAME, "acls": bridge_acls},
            {"rolename": CONTROL_USERNAME, "acls": control_acls},
        ],
    }


def _tls_lines(
    settings: MqttSettings, identity: pki.IdentityFiles, cafile: Path, crl: Path
) -> list[str]:
    return [
        f"cafile {cafile}",
        f"certfile {identity.chain}",
        f"keyfile {identity.key}",
        f"crlfile {crl}",
        "require_certificate true",
        "tls_version tlsv1.2",
        f"ciphers {settings.ciphers}",
        f"ciphers_tls1.3 {settings.ciphers_tls13}",
        "allow_anonymous false",
    ]


def render_mosquitto_conf(
    settings: MqttSettings,
    *,
    identity: pki.IdentityFiles,
    files: BrokerFiles,
    port: int,
    bridge_port: int,
    device_plugin: Sequence[str] = (),
) -> str:
    """The ``mosquitto.conf`` of a managed broker (see the module docstring for why).

    ``device_plugin``: the devices' listener's ingest limit plugin lines
    (:meth:`gateway._mqtt._ingest_limit.IngestLimit.conf_lines`), if any.
    """
    for value in (settings.ciphers, settings.ciphers_tls13, settings.host, settings.bridge_host):
        if any(c.isspace() for c in value):
            raise ValueError("listener addresses and cipher lists hold no whitespace")
    lines = [
        "# Written by edgeward at each broker start; do not edit.",
        # Started as root, Mosquitto would switch to user "mosquitto", which cannot read the
        # 0600 files below; it runs as whoever runs the gateway.
        f"user {pwd.getpwuid(os.geteuid()).pw_name}",
        "per_listener_settings true",
        "persistence true",
        f"persistence_location {files.persistence}/",
        f"autosave_interval {settings.autosave_interval_s}",
        f"persistent_client_expiration {settings.device_session_expiration}",
        "set_tcp_nodelay true",
        "sys_interval 0",
        f"pid_file {files.pid}",
        # Larger publishes are dropped (MQTT 5 senders get PUBACK 0x83)...
        f"message_size_limit {settings.max_payload_bytes}",
        # ... and packets far beyond it disconnect the sender before it is all read.
        f"max_packet_size {settings.max_payload_bytes + 65536}",
        # The bridge's session may hold many frames while it reconnects.
        "max_queued_messages 10000",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp false",
        "",
        "# Devices: mutual TLS, identity = certificate CN = username = client id. Client ids",
        "# are one namespace across listeners: a device must not pick one (session takeover).",
        f"listener {port} {settings.host}",
        f"max_connections {settings.broker_max_connections()}",
        *_tls_lines(settings, identity, files.device_cafile, settings.crl_file),
        "use_identity_as_username true",
        "use_username_as_clientid true",
        f"acl_file {files.acl}",
        *device_plugin,
        "",
        "# The gateway's own bridge: loopback, mutual TLS and a per-start password; its",
        "# client ids (_edgeward.*) are free here and never a device's CN.",
        f"listener {bridge_port} {settings.bridge_host}",
        *_tls_lines(settings, identity, files.gateway_cafile, settings.crl_file),
        "use_identity_as_username false",
        f"plugin {settings.dynsec_plugin}",
        f"plugin_opt_config_file {files.dynsec}",
        "",
    ]
    return "\n".join(lines)
