"""A Mosquitto broker started and supervised by the gateway, with the CRLs it enforces.

The configuration it runs with, and what that guarantees, is
:mod:`gateway._mqtt._mosquitto_conf`; revocations reach live sessions through
:mod:`gateway._mqtt._enforcer`.

Where the CRLs come from (:data:`CrlSource`): the core's ``Enrollment.GetCrl`` (gateways in the
field never hold the CA keys), or, on a standalone gateway next to the PKI directory, built
locally from the registry (:func:`registry_crl_source`). Every CRL must be signed by a CA of the
bundle, and there must be one for the device CA and one for the gateway's own issuing CA:
OpenSSL refuses every connection whose issuer has no CRL when checking is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import random
import re
import shutil
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

import pki
from gateway._mqtt._config import MqttSettings
from gateway._mqtt._ingest_limit import BUILT_PLUGIN, BrokerRefusal, IngestLimit, parse_report
from gateway._mqtt._mosquitto_conf import (
    BrokerCredentials,
    BrokerFiles,
    device_acl,
    dynsec_config,
    render_mosquitto_conf,
)
from gateway._mqtt._tasks import TaskSet
from gateway._ports import free_port
from gateway._wire import check_listen

__all__ = [
    "CrlSnapshot",
    "CrlSource",
    "MosquittoBroker",
    "TrustAnchors",
    "registry_crl_source",
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
    the field fetches the core's CRLs instead (``Enrollment.GetCrl``).
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
        ingest: IngestLimit | None = None,
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
        #: The per-device ingest limit asked for (:mod:`gateway._mqtt._ingest_limit`).
        self.ingest = ingest
        #: The plugin enforcing it, once started (``None``: no limit in the broker).
        self.ingest_plugin: Path | None = None
        self._refusal_listeners: list[Callable[[BrokerRefusal], None]] = []

    def add_refusal_listener(self, listener: Callable[[BrokerRefusal], None]) -> None:
        """Call ``listener`` with each refusal report of the broker's ingest limit."""
        self._refusal_listeners.append(listener)

    def remove_refusal_listener(self, listener: Callable[[BrokerRefusal], None]) -> None:
        with contextlib.suppress(ValueError):
            self._refusal_listeners.remove(listener)

    def _find_ingest_plugin(self) -> Path | None:
        """The ingest limit plugin to load: the configured one (which must exist) or the
        built one; ``None`` (with a warning) when the default one was never built."""
        if self.ingest is None:
            return None
        configured = self.settings.ingest_plugin
        if configured is not None:
            if not configured.is_file():
                raise FileNotFoundError(f"mqtt.ingest_plugin {configured}")
            return configured
        if BUILT_PLUGIN.is_file():
            return BUILT_PLUGIN
        _log.warning(
            "mqtt broker runs without its per-device ingest limit: plugin not built",
            build=f"sh {BUILT_PLUGIN.parent / 'build.sh'}",
            plugin=str(BUILT_PLUGIN),
        )
        return None

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
        self.ingest_plugin = self._find_ingest_plugin()
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
            device_plugin=(
                self.ingest.conf_lines(self.ingest_plugin)
                if self.ingest is not None and self.ingest_plugin is not None
                else ()
            ),
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
            report = parse_report(text)
            if report is not None:
                # Counted and audited by the listeners (the bridge), bounded per device.
                for listener in list(self._refusal_listeners):
                    try:
                        listener(report)
                    except Exception:  # noqa: BLE001 - a listener must not stop the log
                        _log.exception("broker refusal listener failed")
                continue
            # The ingest limit's other lines (devices it could not track) matter too.
            notable = "Error" in text or "error" in text or text.startswith("edgeward-ingest:")
            level = "warning" if notable else "debug"
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
