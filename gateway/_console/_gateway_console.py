"""A gateway's console: live detections drawn on the frames of its own devices, and its health.

Frames stay at the edge: this console, on the gateway that received them, is the only place
that shows them. Operators arrive with a one-time link from the core's console (signed by the
issuing CA, :mod:`gateway._console._links`) or with an operator client certificate (which
gives the viewer role: the gateway has no registry to look a role up in, and nothing here
needs more). The page subscribes to ``/api/live`` (server-sent events): frames with their
boxes, the core's answers to escalations, revocations as they cut devices, and the gateway's
figures every two seconds.

An operator revoked at the core (``edgeward pki revoke --operator``, the core console's
Operators page) reaches this console through the gateway's revocation feed, like a device's
revocation: its sessions here end at once (an open live stream within half a second), and its
certificate and any link minted for it are refused from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from cryptography import x509

import pki
from gateway._console._links import LinkVerifier
from gateway._console._live import LiveFeed
from gateway._console._web import Operator, WebConsole, audit

if TYPE_CHECKING:
    from gateway._grpc import LiveCalls
    from gateway._revocation import RevocationEvent
    from gateway._service import GatewayRuntime

__all__ = ["GatewayConsole"]

_log = structlog.get_logger(__name__)
_STATS_EVERY_S = 2.0
_SESSION_CHECK_S = 0.5


def _total(counter: Any, **match: str) -> float:
    total = 0.0
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and all(
                sample.labels.get(k) == v for k, v in match.items()
            ):
                total += sample.value
    return total


class GatewayConsole(WebConsole):
    """A gateway's console (``console_listen``); see the module docstring."""

    title = "edgeward gateway console"
    home = "/live"

    def __init__(self, runtime: GatewayRuntime, *, live: LiveCalls) -> None:
        """``live``: the gRPC side's live calls (which devices' frames came over gRPC)."""
        s = runtime.settings
        super().__init__(
            listen=s.console_listen,
            identity=runtime.identity,
            trust_domain=runtime.trust_domain,
            cookie_name=f"__Host-edgeward-gw-{runtime.gateway_id}",
            session_ttl_s=s.console_session_ttl_s,
            session_max_age_s=s.console_session_max_age_s,
            max_body_bytes=s.console_max_body_bytes,
        )
        self.runtime = runtime
        self.live = live
        self.title = f"gateway {runtime.gateway_id}"
        self.feed = LiveFeed(max_fps=s.console_live_fps)
        self._links = LinkVerifier(
            gateway_id=runtime.gateway_id,
            trust_domain=runtime.trust_domain,
            ca_bundle_pem=runtime.identity.ca_bundle.read_bytes(),
        )
        self._frames: deque[tuple[float, float]] = deque(maxlen=10)
        self._revoked: dict[str, str] = {}
        self._stack = contextlib.AsyncExitStack()

    # -- lifecycle ------------------------------------------------------------------------------

    async def started(self) -> None:
        door = self.runtime.door
        previous = door.detection_hook
        door.detection_hook = self.feed.wrap(previous)

        def restore() -> None:
            if getattr(door.detection_hook, "previous", object()) is previous:
                door.detection_hook = previous

        self._stack.callback(restore)
        live = self.live
        # A frame inside a live Detect or StreamDetect call came over gRPC; other frames
        # reaching the hook came through the MQTT bridge (a device's Subscribe stream for its
        # events says nothing about how its frames travel).
        self.feed.on_grpc = lambda device_id: (
            live.count(device_id, method="Detect") + live.count(device_id, method="StreamDetect")
            > 0
        )
        self.runtime.events.add_listener(self.feed.on_event)
        self.runtime.revocation.add_listener(self._on_revocation)
        self._stack.callback(self.runtime.revocation.remove_listener, self._on_revocation)
        self.runtime.revocation.add_operator_listener(self._on_operator_revoked)
        self._stack.callback(
            self.runtime.revocation.remove_operator_listener, self._on_operator_revoked
        )
        tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
        worker = tasks.create_task(self.feed.run(), name="edgeward-console-live")
        self._stack.callback(worker.cancel)

    async def stopping(self) -> None:
        await self._stack.aclose()

    def _on_revocation(self, event: RevocationEvent) -> None:
        self._revoked[event.device_id] = event.reason
        self.feed.on_revoked(event.device_id, event.serial, event.reason)

    def _on_operator_revoked(self, event: RevocationEvent) -> None:
        ended = self.sessions.drop_operator(event.device_id)
        audit(
            "console.operator_sessions_ended",
            None,
            operator=event.device_id,
            sessions=ended,
            sequence=event.sequence,
            reason=event.reason,
            gateway_id=self.runtime.gateway_id,
        )

    def _refuse_revoked(self, name: str, *, method: str, peer: str) -> None:
        if self.runtime.revocation.operator_revoked(name):
            audit(
                "console.login_refused",
                None,
                operator=name,
                reason="operator revoked",
                method=method,
                peer=peer,
                gateway_id=self.runtime.gateway_id,
            )
            raise pki.CertificateRevoked(name)

    # -- authentication -------------------------------------------------------------------------

    async def still_allowed(self, operator: Operator) -> Operator | None:
        return None if self.runtime.revocation.operator_revoked(operator.name) else operator

    async def login_secret(self, secret: str, *, peer: str) -> Operator:
        try:
            link = self._links.verify(secret.removeprefix("link="))
        except pki.SignatureInvalid as exc:
            audit(
                "console.login_refused",
                None,
                reason=str(exc),
                method="link",
                peer=peer,
                gateway_id=self.runtime.gateway_id,
            )
            raise
        self._refuse_revoked(link.operator, method="link", peer=peer)
        return Operator(link.operator, link.role, "link")

    async def login_certificate(self, cert: x509.Certificate, *, peer: str) -> Operator:
        identity = pki.identity_from_certificate(
            cert, trust_domain=self.trust_domain, role=pki.Role.OPERATOR
        )
        self._refuse_revoked(identity.id, method="certificate", peer=peer)
        return Operator(identity.id, pki.OperatorRole.VIEWER, "certificate")

    # -- figures ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        rt = self.runtime
        m = rt.metrics
        now = time.monotonic()
        frames = _total(m.frames) + self.feed.mqtt_frames
        self._frames.append((now, frames))
        t0, f0 = self._frames[0]
        fps = (frames - f0) / (now - t0) if now - t0 > 0.5 else 0.0
        hits = _total(m.cache_lookups, kind="exact") + _total(m.cache_lookups, kind="perceptual")
        lookups = hits + _total(m.cache_lookups, kind="miss")
        live = self.live
        wall = time.time()
        devices = sorted(
            {d for d, (t, _) in self.feed.seen.items() if wall - t < 10}
            | set(getattr(live, "_calls", {}))
        )
        return {
            "type": "stats",
            "gateway": rt.gateway_id,
            "region": rt.settings.region,
            "healthy": rt.revocation.healthy(),
            "feed_lag_s": round(rt.revocation.stale_for(), 2),
            "revocation_sequence": rt.revocation.last_sequence,
            "fps": round(fps, 1),
            "cache_hit_rate": round(hits / lookups, 3) if lookups else None,
            "provider": rt.models.provider,
            "model": self.feed.model,
            "devices": devices,
            "grpc_calls": live.count(),
            "revoked": sorted(self._revoked),
        }

    # -- pages ----------------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self._index),
            web.get("/live", self._live_page),
            web.get("/api/live", self._live_stream),
            web.get("/api/stats", self._stats),
            web.get("/internal/devices", self._devices),
        ]

    async def _index(self, _request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther("/live")

    async def _live_page(self, request: web.Request) -> web.StreamResponse:
        return self.render(
            request, "live.html", gateway_id=self.runtime.gateway_id, stats=self.stats()
        )

    async def _stats(self, _request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats())

    async def _devices(self, _request: web.Request) -> web.StreamResponse:
        """For the core's console (a core certificate): this gateway's figures and, per
        device, when its last frame was judged here and over which transport. No pixels."""
        telemetry = self.runtime.door.telemetry
        seen: dict[str, Any] = {}
        for d, (t, transport) in self.feed.seen.items():
            latest = telemetry.latest(d)
            seen[d] = {
                "last_seen": t,
                "transport": transport,
                "revoked": d in self._revoked,
                "detections": list(self.feed.recent.get(d, ())),
                "telemetry": None
                if latest is None
                else {
                    "received_at": latest.received_at.timestamp(),
                    "battery_percent": latest.battery_percent,
                    "temperature_c": latest.temperature_c,
                    "firmware_version": latest.firmware_version[:64],
                },
            }
        return web.json_response({"stats": self.stats(), "devices": seen})

    async def _live_stream(self, request: web.Request) -> web.StreamResponse:
        sid = request.cookies.get(self.cookie_name, "")
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await response.prepare(request)

        async def send(message: dict[str, Any]) -> None:
            await response.write(f"data: {json.dumps(message)}\n\n".encode())

        async with self.feed.watch() as queue:
            await send(self.stats())
            next_stats = time.monotonic() + _STATS_EVERY_S
            while True:
                if self.sessions.get(sid)[0] is None:
                    break  # logged out, expired or revoked: the stream ends with the session
                # The session is looked at twice a second at least, so a revoked operator's
                # stream ends within half a second of the revocation reaching this gateway.
                timeout = min(_SESSION_CHECK_S, max(0.05, next_stats - time.monotonic()))
                try:
                    async with asyncio.timeout(timeout):
                        message = await queue.get()
                except TimeoutError:
                    await send(self.stats())
                    next_stats = time.monotonic() + _STATS_EVERY_S
                    continue
                await send(message)
        return response
