"""Revocation (:class:`RevocationEnforcer`): each event (a device's, a serial's, a gateway's or a
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
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Self

import aiomqtt
import structlog

import pki
from gateway._mqtt._broker import CrlSnapshot, MosquittoBroker
from gateway._mqtt._config import NODELAY
from gateway._mqtt._mosquitto_conf import (
    CONTROL_CLIENT_ID,
    CONTROL_RESPONSE_TOPIC,
    CONTROL_TOPIC,
)
from gateway._mqtt._tasks import TaskSet

__all__ = ["BrokerControl", "RevocationEnforcer"]

_log = structlog.get_logger(__name__)


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
        async with asyncio.timeout(self._timeout_s):
            await self._connected.wait()
            return await self._responses(self._send_now(commands))

    def _send_now(self, commands: Sequence[dict[str, Any]]) -> list[asyncio.Future[dict[str, Any]]]:
        """Hand ``commands`` to the connected control socket now, without yielding to the
        event loop (not a turn later, when the loop would next run the socket's writer);
        the futures of their responses.

        Raises :class:`ConnectionError` when the control connection is not up.
        """
        client = self._client
        if client is None:
            raise ConnectionError("control connection not up")
        loop = asyncio.get_running_loop()
        tagged = []
        futures: list[asyncio.Future[dict[str, Any]]] = []
        for cmd in commands:
            corr = secrets.token_hex(8)
            fut: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._waiters[corr] = fut
            futures.append(fut)
            tagged.append({**cmd, "correlationData": corr})
        paho = client._client
        info = paho.publish(CONTROL_TOPIC, json.dumps({"commands": tagged}).encode(), qos=1)
        if info.rc != 0:
            for cmd in tagged:
                self._waiters.pop(cmd["correlationData"], None)
            raise ConnectionError(f"control command not sent (rc {info.rc})")
        # The socket's writer would send it on the loop's next turn, behind whatever else is
        # ready then (a flood's reads): write it at once. What does not fit stays queued
        # for the writer, as ever. A failed write shows as the connection's loss.
        paho.loop_write()
        sock = paho.socket()
        if sock is not None and not paho.want_write():
            # aiomqtt adds the writer a turn later (thread-safe) but removes it at once:
            # remove it after that add, or a writer stays behind on the socket.
            loop.call_soon(loop.remove_writer, sock.fileno())
        return futures

    async def _responses(
        self, futures: list[asyncio.Future[dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        try:
            async with asyncio.timeout(self._timeout_s):
                return list(await asyncio.gather(*futures))
        finally:
            for fut in futures:
                if not fut.done():
                    fut.cancel()
            stale = [corr for corr, fut in self._waiters.items() if fut in futures]
            for corr in stale:
                self._waiters.pop(corr, None)

    async def kick(self, username: str) -> None:
        """Disconnect every live connection whose username is ``username``, a device id.

        Raises :class:`pki.InvalidName` for anything else, before any command is sent: the
        create-then-delete pair would otherwise delete a user of the gateway's own (``_edgeward.…``
        names are not device ids).
        """
        pki.validate_id(username, kind="device id")
        self._check_kick(username, await self.command(self._kick_commands(username)))

    def kick_now(self, username: str) -> Awaitable[None]:
        """:meth:`kick`, with the command on its way to the broker before this returns
        (when the control connection is up; otherwise as :meth:`kick`): what the returned
        awaitable adds is only the wait for the broker's confirmation.

        Raises :class:`pki.InvalidName` at once for a username that is not a device id.
        """
        pki.validate_id(username, kind="device id")
        if self._client is None:
            return self.kick(username)
        futures = self._send_now(self._kick_commands(username))

        async def confirmed() -> None:
            self._check_kick(username, await self._responses(futures))

        return confirmed()

    @staticmethod
    def _kick_commands(username: str) -> list[dict[str, Any]]:
        return [
            {
                "command": "createClient",
                "username": username,
                "password": secrets.token_urlsafe(24),
            },
            {"command": "deleteClient", "username": username},
        ]

    @staticmethod
    def _check_kick(username: str, responses: list[dict[str, Any]]) -> None:
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
