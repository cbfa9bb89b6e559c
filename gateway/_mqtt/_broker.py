"""A Mosquitto broker configured and supervised by the gateway.

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

Revocation (:class:`RevocationEnforcer`): each event (a device's, a serial's, a gateway's or a
core's) refreshes the CRLs and reloads the broker (``SIGHUP``: new connections of the
certificate are refused, ``anchors.md``) and, at the same
time, removes the live connection through the dynamic security plugin (``createClient`` +
``deleteClient`` of the device's username kicks every connection with that username, MQTT 5
reason 0x98); it refuses any username that is not a device id, so no revocation can delete
the gateway's own users. With certificate identities the plugin cannot keep a client out (its
password check is skipped), so the CRL is what refuses the reconnect; a second kick after the
reload closes the gap between the two. A refresh that fails, or returns CRLs that do not yet
reflect the event (its revocation sequence, its serial), is retried at once with jittered
doubling backoff (0.1 s up to 5 s) until they do: the periodic refresh is no safety net for a
revocation.

Where the CRLs come from (:data:`CrlSource`): the core's ``Enrollment.GetCrl`` (gateways in the
field never hold the CA keys), or, on a standalone gateway next to the PKI directory, built
locally from the registry (:func:`registry_crl_source`). Every CRL must be signed by a CA of the
bundle, and there must be one for the device CA and one for the gateway's own issuing CA:
OpenSSL refuses every connection whose issuer has no CRL when checking is on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import pwd
import random
import re
import secrets
import shutil
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiomqtt
import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

import pki
from gateway._mqtt._config import NODELAY, MqttSettings, internal_name
from gateway._mqtt._tasks import TaskSet
from gateway._ports import free_port
from gateway._wire import check_listen

__all__ = [
    "BrokerControl",
    "BrokerCredentials",
    "BrokerFiles",
    "CrlSnapshot",
    "CrlSource",
    "MosquittoBroker",
    "RevocationEnforcer",
    "device_acl",
    "dynsec_config",
    "free_port",
    "registry_crl_source",
    "render_mosquitto_conf",
]

_log = structlog.get_logger(__name__)

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


@dataclass(frozen=True, slots=True)
class CrlSnapshot:
    """The CRLs a broker enforces (one per issuing CA) and what they are known to reflect.

    ``sequence``: the registry's revocation sequence the CRLs include (``None`` when the source
    does not say). ``fetched_at``: the monotonic time the fetch began (set by the broker).
    """

    crls: tuple[x509.CertificateRevocationList, ...]
    sequence: int | None = None
    fetched_at: float = 0.0

    @classmethod
    def parse(cls, *blobs: bytes, sequence: int | None = None) -> CrlSnapshot:
        """CRLs from ``blobs``, each DER (one CRL) or PEM (one or more); empty blobs skipped."""
        crls: list[x509.CertificateRevocationList] = []
        for blob in blobs:
            if not blob:
                continue
            if blob.lstrip().startswith(b"-----BEGIN"):
                pems = _PEM_CRL.findall(blob)
                if not pems:
                    raise ValueError("no PEM CRL in the CRL source's answer")
                crls += [x509.load_pem_x509_crl(p) for p in pems]
            else:
                crls.append(x509.load_der_x509_crl(blob))
        if not crls:
            raise ValueError("the CRL source gave no CRL")
        return cls(tuple(crls), sequence)

    def pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.crls)

    def lists(self, serial: str) -> bool:
        """True when a CRL lists ``serial`` (hex)."""
        number = int(serial, 16)
        return any(c.get_revoked_certificate_by_serial_number(number) for c in self.crls)

    def reflects(self, sequence: int, serial: str | None) -> bool:
        """False when these CRLs provably predate revocation ``sequence`` or miss ``serial``."""
        if sequence and self.sequence is not None and self.sequence < sequence:
            return False
        return serial is None or self.lists(serial)


#: Returns the current CRLs of the issuing CAs.
CrlSource = Callable[[], Awaitable[CrlSnapshot]]

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
) -> str:
    """The ``mosquitto.conf`` of a managed broker (see the module docstring for why)."""
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


def _issuer_in(
    bundle: Sequence[x509.Certificate], issuer: x509.Name, signed: Callable[[Any], object]
) -> x509.Certificate | None:
    """The CA of ``bundle`` named ``issuer`` for which ``signed(ca)`` neither raises nor is
    False."""
    for ca in bundle:
        if ca.subject != issuer:
            continue
        try:
            if signed(ca) is not False:
                return ca
        except (ValueError, TypeError, InvalidSignature):
            continue
    return None


def _signed_crl(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class TrustAnchors:
    """What each listener trusts, taken from the gateway's CA bundle and own certificate."""

    device_cas: tuple[x509.Certificate, ...]
    gateway_ca: x509.Certificate
    bundle: tuple[x509.Certificate, ...]

    @classmethod
    def of(cls, identity: pki.IdentityFiles) -> TrustAnchors:
        bundle_pem = identity.ca_bundle.read_bytes()
        device_cas = pki.device_ca_certificates(bundle_pem)
        if not device_cas:
            # Never fall back to the whole bundle: gateways and cores would be devices again.
            raise pki.PkiNotFound(
                f"{identity.ca_bundle} holds no device issuing CA (a PKI made by an older "
                "edgeward): run 'edgeward pki add-device-ca' and give this gateway the new "
                "ca-bundle.pem"
            )
        bundle = tuple(x509.load_pem_x509_certificates(bundle_pem))
        own = identity.certificate()
        gateway_ca = _issuer_in(bundle, own.issuer, own.verify_directly_issued_by)
        if gateway_ca is None:
            raise pki.PkiNotFound(f"{identity.ca_bundle} holds no CA that issued {identity.cert}")
        return cls(tuple(device_cas), gateway_ca, bundle)

    def check(self, snapshot: CrlSnapshot) -> None:
        """Raise :class:`pki.SignatureInvalid` unless a CA of the bundle signed every CRL, and
        :class:`pki.PkiNotFound` unless both listeners' CAs have one (OpenSSL refuses every
        client whose issuer has no CRL)."""
        issuers: list[x509.Certificate] = []
        for crl in snapshot.crls:
            ca = _issuer_in(self.bundle, crl.issuer, functools.partial(_signed_crl, crl))
            if ca is None:
                raise pki.SignatureInvalid(
                    f"a CRL from {crl.issuer.rfc4514_string()} is not signed by a CA of the bundle"
                )
            issuers.append(ca)
        for needed in (*self.device_cas, self.gateway_ca):
            if needed not in issuers:
                raise pki.PkiNotFound(
                    f"the CRL source gave no CRL of {needed.subject.rfc4514_string()} "
                    "(a core older than this gateway?)"
                )


def registry_crl_source(pki_dir: Path) -> CrlSource:
    """CRLs built here from ``pki_dir``'s registry with its CAs (standalone only).

    Only where the CA keys sit on this machine (a demo, a gateway beside the PKI); a gateway in
    the field fetches the core's CRLs instead (:func:`core_crl_source`).
    """

    def build() -> CrlSnapshot:
        import datetime as dt

        ca = pki.CertificateAuthority.load(pki_dir)
        with pki.SqliteRegistry(pki.PkiLayout(pki_dir).registry) as registry:
            # Read before building: the CRLs hold at least this much.
            sequence = registry.last_sequence()
            crls = pki.build_crl(ca, registry, now=dt.datetime.now(dt.UTC))
        return CrlSnapshot(tuple(crls), sequence)

    async def source() -> CrlSnapshot:
        return await asyncio.to_thread(build)

    return source


def _stale_broker_pid(files: BrokerFiles) -> int | None:
    """The pid in ``files.pid`` when that process is a Mosquitto running ``files.conf``."""
    try:
        pid = int(files.pid.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if str(files.conf).encode() in cmdline else None


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MosquittoBroker:
    """Writes ``mosquitto.conf`` from settings and supervises Mosquitto as a child process.

    An async context manager. Entering fetches the CRL, writes the configuration, starts the
    broker and waits until both listeners accept; a background task restarts the broker with
    doubling backoff if it dies, another refreshes the CRL every ``crl_refresh_s``. Leaving
    stops the broker with SIGTERM (it saves its persistence database) and SIGKILL after
    ``stop_timeout_s``.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        identity: pki.IdentityFiles,
        crl_source: CrlSource,
        stop_timeout_s: float = 10.0,
    ) -> None:
        if not settings.managed:
            raise ValueError("MosquittoBroker runs a managed broker (mqtt.managed = true)")
        self.settings = settings
        self.identity = identity.require()
        self.files = BrokerFiles(settings.data_dir)
        self.credentials = BrokerCredentials.generate()
        self._crl_source = crl_source
        self._stop_timeout_s = stop_timeout_s
        self.port = settings.port or free_port(settings.host)
        self.bridge_port = settings.bridge_port or free_port(settings.bridge_host)
        self._proc: asyncio.subprocess.Process | None = None
        self._tasks = TaskSet("mosquitto")
        self._stopping = False
        self._running = asyncio.Event()
        self._crl_lock = asyncio.Lock()
        self.trust = TrustAnchors.of(self.identity)
        #: The CRLs the broker enforces now (``None`` before the first fetch).
        self.crl_snapshot: CrlSnapshot | None = None
        self.restarts = 0
        self.crl_reloads = 0
        #: The broker's latest log lines (connections, takeovers, errors), for diagnostics.
        self.recent_log: deque[str] = deque(maxlen=1000)

    def _find_binary(self) -> str | None:
        name = self.settings.mosquitto_binary
        # Debian installs the broker in /usr/sbin, often not on an unprivileged user's PATH.
        return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")

    # -- addresses -------------------------------------------------------------------------

    @property
    def device_address(self) -> tuple[str, int]:
        return self.settings.host, self.port

    @property
    def bridge_address(self) -> tuple[str, int]:
        return self.settings.bridge_host, self.bridge_port

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        if self._proc is None or self._proc.returncode is not None:
            return None
        return self._proc.pid

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        binary = self._find_binary()
        if binary is None:
            raise FileNotFoundError(f"mosquitto executable {self.settings.mosquitto_binary!r}")
        if not self.settings.dynsec_plugin.exists():
            raise FileNotFoundError(f"dynamic security plugin {self.settings.dynsec_plugin}")
        self._binary = binary
        self.files.data_dir.mkdir(parents=True, exist_ok=True)
        self.files.data_dir.chmod(0o700)
        self.files.persistence.mkdir(exist_ok=True)
        await self._stop_stale_broker()
        self._check_ports()
        await self.refresh_crl()
        self._write_config()
        await self._start()
        self._tasks.spawn(self._supervise(), name="mosquitto-supervisor")
        self._tasks.spawn(self._refresh_loop(), name="mosquitto-crl-refresh")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping = True
        try:
            await self._terminate()
        finally:
            await self._tasks.close()

    def _check_ports(self) -> None:
        """A configured port already in use stops the start with an error naming its key
        (Mosquitto itself would only exit with status 1)."""
        for (host, port), key in (
            (self.device_address, "mqtt.port"),
            (self.bridge_address, "mqtt.bridge_port"),
        ):
            check_listen(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", setting=key)

    def _write_config(self) -> None:
        creds = self.credentials
        pki.write_atomic(self.files.acl, device_acl().encode())
        dynsec = dynsec_config(creds, shared_group=self.settings.shared_group)
        pki.write_atomic(self.files.dynsec, json.dumps(dynsec, indent=1).encode(), mode=0o600)
        secret = {
            "username": creds.bridge_username,
            "password": creds.bridge_password,
            "host": self.settings.bridge_host,
            "port": self.bridge_port,
        }
        pki.write_atomic(self.files.bridge_secret, json.dumps(secret).encode(), mode=0o600)
        pki.write_atomic(
            self.files.device_cafile,
            b"".join(pki.trusted_client_anchor_pem(c) for c in self.trust.device_cas),
        )
        pki.write_atomic(
            self.files.gateway_cafile, pki.trusted_client_anchor_pem(self.trust.gateway_ca)
        )
        conf = render_mosquitto_conf(
            self.settings,
            identity=self.identity,
            files=self.files,
            port=self.port,
            bridge_port=self.bridge_port,
        )
        pki.write_atomic(self.files.conf, conf.encode())

    async def _stop_stale_broker(self) -> None:
        """Stop a broker an earlier gateway on this ``data_dir`` left running.

        A gateway killed outright (SIGKILL, OOM) cannot stop its broker, which would keep our
        ports and the persistence database. It is recognised by the pid file *and* by its
        command line naming this configuration (a reused pid is left alone), and stopped with
        SIGTERM so that it saves its database: the messages it holds for the bridge's
        persistent sessions, frames received but not yet acknowledged included, are then
        delivered to this gateway.
        """
        pid = _stale_broker_pid(self.files)
        if pid is None:
            return
        _log.warning("stopping a broker left running by an earlier gateway", pid=pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout_s
        while _exists(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline += self._stop_timeout_s
            await asyncio.sleep(0.05)

    def _command(self) -> list[str]:
        command = [self._binary, "-c", str(self.files.conf)]
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            # The broker gets SIGTERM when the gateway dies, however it dies: it saves its
            # database and exits instead of serving devices with nobody enforcing
            # revocations. (util-linux; without it :meth:`_stop_stale_broker` cleans up at
            # the next start.)
            command = [setpriv, "--pdeathsig", "TERM", "--", *command]
        return command

    async def _start(self) -> None:
        self._running.clear()
        self._proc = await asyncio.create_subprocess_exec(
            *self._command(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C on the gateway's terminal is the gateway's
        )
        self._tasks.spawn(self._forward_log(self._proc), name="mosquitto-log")
        try:
            await self._wait_listening(self.settings.connect_timeout_s)
        except TimeoutError:
            await self._terminate()
            raise
        self._running.set()
        _log.info(
            "mqtt broker started",
            pid=self._proc.pid,
            port=self.port,
            bridge_port=self.bridge_port,
        )

    async def _wait_listening(self, timeout_s: float) -> None:
        proc = self._proc
        assert proc is not None  # noqa: S101
        deadline = time.monotonic() + timeout_s
        for host, port in (self.device_address, self.bridge_address):
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"mosquitto exited at start with status {proc.returncode}")
                try:
                    _r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
                except (OSError, TimeoutError):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"mosquitto did not listen on {host}:{port}") from None
                    await asyncio.sleep(0.02)
                    continue
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()
                break

    async def _forward_log(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None  # noqa: S101
        while line := await proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self.recent_log.append(text)
            level = "warning" if ("Error" in text or "error" in text) else "debug"
            getattr(_log, level)("mosquitto", line=text)

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self._stop_timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        _log.info("mqtt broker stopped", status=proc.returncode)

    async def _supervise(self) -> None:
        delay = self.settings.restart_min_s
        while not self._stopping:
            proc = self._proc
            assert proc is not None  # noqa: S101
            started = time.monotonic()
            status = await proc.wait()
            self._running.clear()
            if self._stopping:
                return
            _log.error("mqtt broker died; restarting", status=status, delay_s=round(delay, 2))
            # A broker that ran a while gets a quick restart; one that keeps dying backs off.
            if time.monotonic() - started > 30:
                delay = self.settings.restart_min_s
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
            delay = min(delay * 2, self.settings.restart_max_s)
            try:
                self._write_config()  # fresh secrets file for anything reconnecting
                await self._start()
                self.restarts += 1
            except (OSError, RuntimeError, TimeoutError) as exc:
                _log.error("mqtt broker restart failed", error=str(exc))
                await asyncio.sleep(delay)

    async def wait_running(self, timeout_s: float = 10.0) -> None:
        """Return once the broker runs (after a restart, say)."""
        async with asyncio.timeout(timeout_s):
            await self._running.wait()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.crl_refresh_s)
            try:
                await self.refresh_crl()
            except Exception as exc:  # noqa: BLE001 - keep the last CRL; try again later
                _log.warning("crl refresh failed; keeping the current CRL", error=str(exc))

    # -- CRL -------------------------------------------------------------------------------

    async def refresh_crl(
        self, *, unless: Callable[[CrlSnapshot], bool] | None = None
    ) -> CrlSnapshot:
        """Fetch the CRLs, check them, write them atomically and make the broker reload them
        (SIGHUP); the CRLs now enforced.

        ``unless``: skip the fetch when the CRLs enforced by the time the lock is ours already
        satisfy it (a burst of revocations then costs one fetch, not one each).
        """
        async with self._crl_lock:
            current = self.crl_snapshot
            if unless is not None and current is not None and unless(current):
                return current
            started = time.monotonic()
            snapshot = dataclasses.replace(await self._crl_source(), fetched_at=started)
            self.trust.check(snapshot)
            await asyncio.to_thread(pki.write_atomic, self.settings.crl_file, snapshot.pem())
            self.crl_snapshot = snapshot
            self.reload()
            self.crl_reloads += 1
            return snapshot

    def reload(self) -> None:
        """SIGHUP: the broker re-reads its CRL, certificates and ACLs (new connections only)."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGHUP)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the broker (tests and operators: SIGKILL to see it come back)."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            os.kill(proc.pid, sig)


class BrokerControl:
    """The dynamic security plugin's control topic, as the gateway's control user.

    ``kick(username)`` disconnects every connection whose username (certificate CN) is
    ``username``: it creates and at once deletes a plugin client of that name, and the plugin
    disconnects connections of a deleted client (MQTT 5 reason 0x98, administrative action).
    The plugin keeps no state about the device afterwards. Only device ids are kicked: deleting
    an existing plugin client (the bridge's or the control user) would lock the gateway out.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        tls_context: Any,
        username: str,
        password: str,
        timeout_s: float = 5.0,
    ) -> None:
        self._host = host
        self._port = port
        self._tls = tls_context
        self._username = username
        self._password = password
        self._timeout_s = timeout_s
        self._client: aiomqtt.Client | None = None
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._tasks = TaskSet("mqtt-control")
        self._lock = asyncio.Lock()
        self._connected = asyncio.Event()
        #: Connections made so far (more than one: the control connection was lost and
        #: made again; for metrics and tests).
        self.connects = 0

    async def __aenter__(self) -> Self:
        self._tasks.spawn(self._run(), name="mqtt-control")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._tasks.close()

    async def wait_connected(self, timeout_s: float = 10.0) -> None:
        """Return once the control connection is up (commands wait for it anyway)."""
        async with asyncio.timeout(timeout_s):
            await self._connected.wait()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            client = aiomqtt.Client(
                self._host,
                self._port,
                username=self._username,
                password=self._password,
                identifier=CONTROL_CLIENT_ID,
                protocol=aiomqtt.ProtocolVersion.V5,
                tls_context=self._tls,
                timeout=self._timeout_s,
                keepalive=15,
                socket_options=NODELAY,
            )
            try:
                async with client:
                    await client.subscribe(CONTROL_RESPONSE_TOPIC, qos=1)
                    self._client = client
                    self.connects += 1
                    self._connected.set()
                    delay = 0.1
                    async for message in client.messages:
                        self._on_response(message)
            except aiomqtt.MqttError as exc:
                _log.debug("mqtt control connection lost", error=str(exc))
            finally:
                self._connected.clear()
                self._client = None
                for fut in self._waiters.values():
                    if not fut.done():
                        fut.set_exception(ConnectionError("control connection lost"))
                self._waiters.clear()
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 - jitter
            delay = min(delay * 2, 5.0)

    def _on_response(self, message: aiomqtt.Message) -> None:
        # The plugin answers on the response topic without MQTT correlation data; each
        # command's own "correlationData" field comes back in its response instead.
        try:
            body = json.loads(bytes(message.payload))
        except (TypeError, ValueError):
            _log.warning("unreadable dynamic security response")
            return
        responses = body.get("responses", []) if isinstance(body, dict) else []
        for response in responses:
            if not isinstance(response, dict):
                continue
            corr = response.get("correlationData")
            fut = self._waiters.pop(corr, None) if isinstance(corr, str) else None
            if fut is not None and not fut.done():
                fut.set_result(response)

    async def command(self, commands: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send dynamic security commands; return their responses (each may hold ``error``)."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._timeout_s):
            await self._connected.wait()
            client = self._client
            assert client is not None  # noqa: S101
            tagged = []
            futures = []
            for cmd in commands:
                corr = secrets.token_hex(8)
                fut: asyncio.Future[dict[str, Any]] = loop.create_future()
                self._waiters[corr] = fut
                futures.append(fut)
                tagged.append({**cmd, "correlationData": corr})
            try:
                await client.publish(
                    CONTROL_TOPIC, json.dumps({"commands": tagged}).encode(), qos=1
                )
                return list(await asyncio.gather(*futures))
            finally:
                for cmd in tagged:
                    self._waiters.pop(cmd["correlationData"], None)

    async def kick(self, username: str) -> None:
        """Disconnect every live connection whose username is ``username``, a device id.

        Raises :class:`pki.InvalidName` for anything else, before any command is sent: the
        create-then-delete pair would otherwise delete a user of the gateway's own (``_edgeward.…``
        names are not device ids).
        """
        pki.validate_id(username, kind="device id")
        responses = await self.command(
            [
                {
                    "command": "createClient",
                    "username": username,
                    "password": secrets.token_urlsafe(24),
                },
                {"command": "deleteClient", "username": username},
            ]
        )
        errors = [
            r["error"] for r in responses if r.get("command") == "deleteClient" and "error" in r
        ]
        if errors:
            raise RuntimeError(f"broker refused to drop {username}: {errors[0]}")


@dataclass(frozen=True, slots=True)
class _Pending:
    device_id: str  # "" when the event names no device (a gateway's, a core's)
    sequence: int
    serial: str | None
    at: float


class RevocationEnforcer:
    """Applies revocation events to a managed broker: refreshed CRLs + reload, and a kick.

    Register :meth:`on_revocation` with ``RevocationState.add_listener``; it only queues the
    event (revocation listeners run one after another, so none may hold the others up). A
    worker then kicks the device's live connection at once and, concurrently, refreshes the
    CRLs and reloads the broker; once the reload is done it kicks again, so a reconnect that
    slipped in before the reload is cut too. Every event refreshes the CRLs, whoever it names:
    a gateway's or core's certificate is refused by the broker's own listener as soon as a
    device's is. A refresh that fails or brings CRLs that do not reflect the event (an older
    revocation sequence, the serial missing) is retried with jittered doubling backoff from
    ``retry_min_s`` to ``retry_max_s`` until they do. ``last_latency_s`` holds, per device id,
    the time from the event reaching the enforcer to the first kick's confirmation.
    """

    def __init__(
        self,
        broker: MosquittoBroker,
        control: BrokerControl,
        *,
        retry_min_s: float = 0.1,
        retry_max_s: float = 5.0,
    ) -> None:
        self._broker = broker
        self._control = control
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=10_000)
        self._tasks = TaskSet("mqtt-revocation")
        self.last_latency_s: dict[str, float] = {}
        #: Failed or not-yet-current CRL fetches retried so far (for metrics and tests).
        self.crl_retries = 0

    async def __aenter__(self) -> Self:
        self._tasks.spawn(self._worker(), name="mqtt-revocation")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._tasks.close()

    def on_revocation(self, event: Any) -> None:
        """``RevocationState`` listener: queue ``event`` for enforcement."""
        device_id = getattr(event, "device_id", "") or ""
        if device_id:
            try:
                pki.validate_id(device_id, kind="device id")
            except pki.InvalidName:
                _log.warning("revocation event without a valid device id; CRL refresh only")
                device_id = ""
        serial = getattr(event, "serial", None) or None
        if serial is not None:
            try:
                int(serial, 16)
            except ValueError:
                _log.warning("revocation event with an unreadable serial", device_id=device_id)
                serial = None
        pending = _Pending(
            device_id, int(getattr(event, "sequence", 0) or 0), serial, time.monotonic()
        )
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            _log.error("revocation queue full", device_id=device_id)

    async def revoke(
        self, device_id: str, *, sequence: int = 0, serial: str | None = None
    ) -> float:
        """Enforce a revocation of ``device_id`` now; seconds until the live session was cut.

        Raises :class:`pki.InvalidName` when ``device_id`` is not a device id.
        """
        pki.validate_id(device_id, kind="device id")
        return await self._enforce(_Pending(device_id, sequence, serial, time.monotonic()))

    async def _worker(self) -> None:
        while True:
            pending = await self._queue.get()
            name = f"mqtt-revoke-{pending.device_id or pending.sequence}"
            self._tasks.spawn(self._enforce(pending), name=name)

    async def _enforce(self, pending: _Pending) -> float:
        device_id = pending.device_id
        latency = 0.0
        async with asyncio.TaskGroup() as tg:
            refresh = tg.create_task(self._refresh(pending))
            if device_id:
                latency = await self._kick(device_id, pending.at)
                self.last_latency_s[device_id] = latency
                _log.info(
                    "mqtt session removed",
                    audit=True,
                    device_id=device_id,
                    latency_ms=round(latency * 1000, 1),
                )
            await refresh
            if device_id:
                await self._kick(device_id, pending.at)
        return latency

    async def _refresh(self, pending: _Pending) -> None:
        """Refresh until the enforced CRLs were fetched after the event and reflect it."""

        def current(snapshot: CrlSnapshot) -> bool:
            return snapshot.fetched_at >= pending.at and snapshot.reflects(
                pending.sequence, pending.serial
            )

        delay = self._retry_min_s
        while True:
            try:
                snapshot = await self._broker.refresh_crl(unless=current)
            except Exception as exc:  # noqa: BLE001 - keep trying: a revocation must land
                _log.error(
                    "crl refresh after revocation failed; retrying",
                    device_id=pending.device_id,
                    sequence=pending.sequence,
                    error=str(exc),
                )
            else:
                if current(snapshot):
                    return
                _log.warning(
                    "crl does not reflect the revocation yet; retrying",
                    device_id=pending.device_id,
                    sequence=pending.sequence,
                    crl_sequence=snapshot.sequence,
                )
            self.crl_retries += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
            delay = min(delay * 2, self._retry_max_s)

    async def _kick(self, device_id: str, at: float) -> float:
        try:
            await self._control.kick(device_id)
        except (TimeoutError, ConnectionError, RuntimeError, aiomqtt.MqttError) as exc:
            _log.error("could not remove mqtt session", device_id=device_id, error=str(exc))
        return time.monotonic() - at
