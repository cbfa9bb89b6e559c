"""A Mosquitto broker started and supervised by the gateway, with the CRL it enforces.

The configuration it runs with, and what that guarantees, is
:mod:`gateway._mqtt._mosquitto_conf`; revocations reach live sessions through
:mod:`gateway._mqtt._enforcer`.

Where the CRL comes from (:data:`CrlSource`): the core's ``Enrollment.GetCrl`` (gateways in the
field never hold the issuing key), or, on a standalone gateway next to the PKI directory, built
locally from the registry with the issuing CA (:func:`registry_crl_source`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import pki
from gateway._mqtt._config import MqttSettings
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
    "CrlSource",
    "MosquittoBroker",
    "core_crl_source",
    "registry_crl_source",
]

_log = structlog.get_logger(__name__)

#: Returns the current CRL of the issuing CA, PEM or DER.
CrlSource = Callable[[], Awaitable[bytes]]


def _to_pem(crl: bytes) -> bytes:
    if crl.lstrip().startswith(b"-----BEGIN"):
        parsed = x509.load_pem_x509_crl(crl)
    else:
        parsed = x509.load_der_x509_crl(crl)
    return parsed.public_bytes(serialization.Encoding.PEM)


def registry_crl_source(pki_dir: Path) -> CrlSource:
    """A CRL built here from ``pki_dir``'s registry with its issuing CA (standalone only).

    Only where the issuing key sits on this machine (a demo, a gateway beside the PKI); a
    gateway in the field fetches the core's CRL instead (:func:`core_crl_source`).
    """

    def build() -> bytes:
        import datetime as dt

        ca = pki.CertificateAuthority.load(pki_dir)
        with pki.SqliteRegistry(pki.PkiLayout(pki_dir).registry) as registry:
            crl = pki.build_crl(ca, registry, now=dt.datetime.now(dt.UTC))
        return pki.crl_bytes(crl)

    async def source() -> bytes:
        return await asyncio.to_thread(build)

    return source


def core_crl_source(channel_factory: Callable[[], Any], *, timeout_s: float) -> CrlSource:
    """The core's CRL (``Enrollment.GetCrl``) over ``channel_factory()``'s channel."""
    from protos.edgeward.v1 import enrollment_pb2, enrollment_pb2_grpc

    async def source() -> bytes:
        channel = channel_factory()
        try:
            stub = enrollment_pb2_grpc.EnrollmentStub(channel)
            reply = await stub.GetCrl(enrollment_pb2.GetCrlRequest(), timeout=timeout_s)
            return bytes(reply.crl_der)
        finally:
            await channel.close()

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
        await self._write_crl(await self._crl_source())
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

    async def _write_crl(self, crl: bytes) -> None:
        pem = _to_pem(crl)
        await asyncio.to_thread(pki.write_atomic, self.settings.crl_file, pem)

    async def refresh_crl(self) -> None:
        """Fetch the CRL, write it atomically and make the broker reload it (SIGHUP)."""
        async with self._crl_lock:
            crl = await self._crl_source()
            await self._write_crl(crl)
            self.reload()
            self.crl_reloads += 1

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
