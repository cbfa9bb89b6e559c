"""The core's console: fleet, gateways, escalations, audit trail, and the admin's actions.

Everything here comes from what the core holds: the registry (devices, certificates,
operators, gateways, revocations), the escalations it answered (:class:`EscalationLog`: the
crops exactly as they left the edge), and its audit lines (:class:`AuditRing`). Pixels of
whole frames never reach the core; the live view is served by each gateway's own console,
which an operator opens from here with a one-time link signed by the issuing CA.

Actions go through the same functions as the CLI (``pki.revoke_device`` via the core, which
also wakes the revocation feed at once; ``pki.create_token``), so they write the same audit
lines, plus one ``console.*`` line naming the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from aiohttp import web
from cryptography import x509

import pki
from gateway._console._audit import AuditRing
from gateway._console._links import mint_link
from gateway._console._records import EscalationLog
from gateway._console._web import (
    SESSION,
    Operator,
    WebConsole,
    admin_only,
    audit,
    form_text,
    read_form,
)

if TYPE_CHECKING:
    from gateway._core._server import CoreServer

__all__ = ["CoreConsole", "DeviceRow"]

_log = structlog.get_logger(__name__)
_TTL_CHOICES = ("1h", "24h", "7d")
#: How often the core reads each gateway console's figures, and how long it waits for them.
_POLL_S = 2.0
_POLL_TIMEOUT_S = 3.0


@dataclass(frozen=True, slots=True)
class DeviceRow:
    id: str
    type: str
    region: str
    status: str  # active, revoked, expired
    serial: str
    not_after: dt.datetime | None
    created_at: dt.datetime
    last_escalation: dt.datetime | None
    gateway: str
    last_seen: dt.datetime | None = None
    transport: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "region": self.region,
            "status": self.status,
            "serial": self.serial,
            "not_after": self.not_after.isoformat() if self.not_after else None,
            "gateway": self.gateway,
            "transport": self.transport,
            "last_seen": self.last_seen.isoformat() if self.last_seen else None,
        }


class CoreConsole(WebConsole):
    """The core's console (``console_listen``); see the module docstring."""

    title = "edgeward core console"
    home = "/fleet"

    def __init__(
        self,
        server: CoreServer,
        *,
        escalations: EscalationLog,
        audit_ring: AuditRing,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        s = server.settings
        super().__init__(
            listen=s.console_listen,
            identity=server.identity,
            trust_domain=server.trust_domain,
            cookie_name="__Host-edgeward-core",
            session_ttl_s=s.console_session_ttl_s,
            session_max_age_s=s.console_session_max_age_s,
            max_body_bytes=s.console_max_body_bytes,
        )
        self.server = server
        self.escalations = escalations
        self.audit_ring = audit_ring
        self._clock = clock
        self._gateway_consoles = dict(s.console_gateways)
        self._gateway_reads = {**self._gateway_consoles, **s.console_gateways_internal}
        #: Gateway id → (monotonic time read, what its console reported), see _poll_gateways.
        self.edge: dict[str, tuple[float, dict[str, Any]]] = {}
        self._stack = contextlib.AsyncExitStack()

    async def started(self) -> None:
        if not self._gateway_reads:
            return
        tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
        poller = tasks.create_task(self._poll_gateways(), name="edgeward-console-gateways")
        self._stack.callback(poller.cancel)

    async def stopping(self) -> None:
        await self._stack.aclose()

    async def _poll_gateways(self) -> None:
        """Read each gateway console's figures (no pixels) over mutual TLS: the core presents
        its certificate, and demands the gateway's role-pinned name, whatever the URL's host."""
        identity = self.server.identity
        contexts = {
            gid: pki.client_ssl_context(identity, server_name=pki.gateway_server_name(gid))
            for gid in self._gateway_reads
        }
        timeout = aiohttp.ClientTimeout(total=_POLL_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:

            async def read(gid: str, url: str) -> None:
                try:
                    async with http.get(
                        f"{url.rstrip('/')}/internal/devices", ssl=contexts[gid]
                    ) as r:
                        if r.status == 200:
                            self.edge[gid] = (time.monotonic(), await r.json())
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    _log.debug("gateway console unreachable", gateway_id=gid, error=str(exc))
                except Exception:  # noqa: BLE001 - figures are best effort; the core runs on
                    _log.exception("reading a gateway console failed", gateway_id=gid)

            while True:
                await asyncio.gather(*(read(g, u) for g, u in self._gateway_reads.items()))
                await asyncio.sleep(_POLL_S)

    def edge_view(self, max_age_s: float = 3 * _POLL_S + _POLL_TIMEOUT_S) -> dict[str, Any]:
        """What fresh gateway reports say: per gateway its figures, per device where it is."""
        now = time.monotonic()
        gateways: dict[str, dict[str, Any]] = {}
        devices: dict[str, tuple[float, str, str]] = {}
        details: dict[str, dict[str, Any]] = {}
        for gid, (at, report) in self.edge.items():
            if now - at > max_age_s:
                continue
            gateways[gid] = report.get("stats", {})
            for device_id, d in report.get("devices", {}).items():
                seen = float(d.get("last_seen", 0))
                if device_id not in devices or seen > devices[device_id][0]:
                    devices[device_id] = (seen, gid, str(d.get("transport", "")))
                    details[device_id] = d
        return {"gateways": gateways, "devices": devices, "details": details}

    @property
    def registry(self) -> pki.CoreRegistry:
        return self.server.registry

    # -- authentication -------------------------------------------------------------------------

    async def login_secret(self, secret: str, *, peer: str) -> Operator:
        record = pki.redeem_operator_token(self.registry, secret, now=self._clock(), peer=peer)
        return Operator(record.id, record.role, "token")

    async def login_certificate(self, cert: x509.Certificate, *, peer: str) -> Operator:
        identity = pki.identity_from_certificate(
            cert, trust_domain=self.trust_domain, role=pki.Role.OPERATOR
        )
        record = self.registry.get_operator(identity.id)
        if record is None or record.status is not pki.Status.ACTIVE:
            raise pki.InvalidIdentity(f"operator {identity.id} is not registered or revoked")
        return Operator(record.id, record.role, "certificate")

    async def still_allowed(self, operator: Operator) -> Operator | None:
        record = self.registry.get_operator(operator.name)
        if record is None or record.status is not pki.Status.ACTIVE:
            return None
        return Operator(record.id, record.role, operator.method)

    # -- data -----------------------------------------------------------------------------------

    def fleet(self) -> list[DeviceRow]:
        now = self._clock()
        certs: dict[str, list[pki.CertificateRecord]] = {}
        for c in self.registry.list_certificates():
            certs.setdefault(c.device_id, []).append(c)
        last: dict[str, tuple[dt.datetime, str]] = {}
        for e in reversed(self.escalations.recent(limit=10_000)):
            last[e.device_id] = (e.at, e.gateway_id)
        edge = self.edge_view()["devices"]
        rows = []
        for d in self.registry.list_devices():
            mine = sorted(certs.get(d.id, []), key=lambda c: c.issued_at)
            current = next(
                (c for c in reversed(mine) if c.status is pki.Status.ACTIVE),
                mine[-1] if mine else None,
            )
            status = d.status.value
            if status == "active" and (current is None or current.not_after <= now):
                status = "expired"
            seen = last.get(d.id)
            where = edge.get(d.id)
            rows.append(
                DeviceRow(
                    d.id,
                    d.type,
                    d.region,
                    status,
                    current.serial if current else "",
                    current.not_after if current else None,
                    d.created_at,
                    seen[0] if seen else None,
                    where[1] if where else (seen[1] if seen else ""),
                    dt.datetime.fromtimestamp(where[0], dt.UTC) if where else None,
                    where[2] if where else "",
                )
            )
        return sorted(rows, key=lambda r: r.id)

    def gateways(self) -> list[dict[str, Any]]:
        entries: dict[str, dict[str, Any]] = {}
        for g in self.server.settings.gateways:
            entries[g.id] = {
                "id": g.id,
                "region": g.region,
                "grpc": g.grpc_address,
                "mqtt": g.mqtt_address,
                "announced": None,
            }
        for r in self.registry.list_gateways():
            entries[r.id] = {
                "id": r.id,
                "region": r.region,
                "grpc": r.grpc_address,
                "mqtt": r.mqtt_address,
                "announced": r.updated_at,
            }
        certs = self.registry.list_server_certificates(pki.Role.GATEWAY)
        edge_stats = self.edge_view()["gateways"]
        for gid, entry in entries.items():
            mine = [c for c in certs if c.server_id == gid]
            entry["status"] = (
                "revoked"
                if mine and all(c.status is pki.Status.REVOKED for c in mine)
                else "active"
            )
            entry["console"] = gid in self._gateway_consoles
            entry["edge"] = edge_stats.get(gid)
        return [entries[k] for k in sorted(entries)]

    def trail(self, text: str) -> list[dict[str, Any]]:
        lines: list[dict[str, Any]] = [
            {"at": e.at, "event": e.event, "level": e.level, "fields": dict(e.fields)}
            for e in self.audit_ring.entries()
            if e.matches(text)
        ]
        # Revocations made by other processes (the CLI) reach the trail through the registry.
        since = max(0, self.registry.last_sequence() - 500)
        for r in reversed(self.registry.revocations_since(since, limit=500)):
            fields = {
                "id": r.device_id,
                "role": r.role.value,
                "reason": r.reason,
                "sequence": str(r.sequence),
                "serial": r.serial or "all",
            }
            if not text or any(text.lower() in v.lower() for v in fields.values()):
                lines.append(
                    {
                        "at": r.revoked_at,
                        "event": "registry.revocation",
                        "level": "info",
                        "fields": fields,
                    }
                )
        lines.sort(key=lambda x: x["at"], reverse=True)
        return lines[:1000]

    # -- pages ----------------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self._index),
            web.get("/fleet", self._fleet),
            web.get("/api/fleet", self._fleet_json),
            web.get("/devices/{id}", self._device),
            web.post("/devices/{id}/revoke", admin_only(self._revoke_device)),
            web.post("/tokens", admin_only(self._token)),
            web.get("/gateways", self._gateways),
            web.post("/gateways/{id}/revoke", admin_only(self._revoke_gateway)),
            web.get("/gateways/{id}/live", self._gateway_live),
            web.get("/escalations", self._escalations),
            web.get("/escalations/{gw}/{id}", self._escalation),
            web.get("/escalations/{gw}/{id}/image", self._escalation_image),
            web.get("/audit", self._audit),
        ]

    async def _index(self, _request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther("/fleet")

    async def _fleet(self, request: web.Request) -> web.StreamResponse:
        q = request.query.get("q", "")[:100].strip().lower()
        status = request.query.get("status", "")[:20]
        rows = [
            r
            for r in self.fleet()
            if (not q or q in f"{r.id} {r.type} {r.region} {r.serial} {r.gateway}".lower())
            and (not status or r.status == status)
        ]
        return self.render(
            request, "fleet.html", rows=rows, q=q, status=status, ttl_choices=_TTL_CHOICES
        )

    async def _fleet_json(self, _request: web.Request) -> web.StreamResponse:
        return web.json_response({"devices": [r.as_json() for r in self.fleet()]})

    def _device_or_404(self, request: web.Request) -> pki.DeviceRecord:
        device_id = request.match_info["id"]
        try:
            pki.validate_id(device_id, kind="device id")
        except pki.InvalidName:
            raise web.HTTPNotFound(text="no such device") from None
        record = self.registry.get_device(device_id)
        if record is None:
            raise web.HTTPNotFound(text="no such device")
        return record

    async def _device(self, request: web.Request) -> web.StreamResponse:
        device = self._device_or_404(request)
        row = next(r for r in self.fleet() if r.id == device.id)
        return self.render(
            request,
            "device.html",
            device=row,
            certificates=self.registry.list_certificates(device.id),
            escalations=self.escalations.recent(device.id, limit=50),
            edge=self.edge_view()["details"].get(device.id, {}),
            trail=self.trail(device.id)[:100],
            ttl_choices=_TTL_CHOICES,
        )

    async def _revoke_device(self, request: web.Request) -> web.StreamResponse:
        device = self._device_or_404(request)
        form = await read_form(request)
        reason = form_text(form, "reason") or "revoked from the console"
        try:
            record = self.server.revoke_device(device.id, reason=reason)
        except pki.PkiError as exc:
            audit(
                "console.action_refused",
                request,
                action="revoke_device",
                device_id=device.id,
                reason=str(exc),
            )
            raise web.HTTPConflict(text=str(exc).splitlines()[0]) from None
        audit(
            "console.device_revoked",
            request,
            device_id=device.id,
            sequence=record.sequence,
            reason=record.reason,
        )
        raise web.HTTPSeeOther(f"/devices/{device.id}")

    async def _token(self, request: web.Request) -> web.StreamResponse:
        form = await read_form(request)
        device_id = form_text(form, "device_id", max_len=64)
        device_type = form_text(form, "type", max_len=32)
        region = form_text(form, "region", max_len=64)
        ttl_text = form_text(form, "ttl", max_len=8) or "24h"
        try:
            if ttl_text not in _TTL_CHOICES:
                ttl_text = "(invalid)"
            lifetime = pki.parse_ttl(ttl_text)
            pki.validate_id(device_id, kind="device id")
            pki.validate_device_type(device_type)
            pki.validate_id(region, kind="region")
            token = self.server.create_token(
                device_id, device_type=device_type, region=region, ttl=lifetime
            )
        except (pki.PkiError, ValueError) as exc:
            audit(
                "console.action_refused",
                request,
                action="create_token",
                device_id=device_id[:64],
                reason=str(exc),
            )
            return self.render(
                request,
                "token.html",
                http_status=400,
                error=str(exc),
                token="",
                device_id=device_id,
                enrol_endpoint="",
            )
        audit(
            "console.token_created",
            request,
            device_id=device_id,
            device_type=device_type,
            region=region,
            ttl=ttl_text,
        )
        return self.render(
            request,
            "token.html",
            error="",
            token=token,
            device_id=device_id,
            enrol_endpoint=self.server.enrol_address,
        )

    async def _gateways(self, request: web.Request) -> web.StreamResponse:
        return self.render(request, "gateways.html", gateways=self.gateways())

    async def _revoke_gateway(self, request: web.Request) -> web.StreamResponse:
        gateway_id = request.match_info["id"]
        if gateway_id not in {g["id"] for g in self.gateways()}:
            raise web.HTTPNotFound(text="no such gateway")
        form = await read_form(request)
        reason = form_text(form, "reason") or "revoked from the console"
        try:
            records = self.server.revoke_gateway(gateway_id, reason=reason)
        except pki.PkiError as exc:
            audit(
                "console.action_refused",
                request,
                action="revoke_gateway",
                gateway_id=gateway_id,
                reason=str(exc),
            )
            raise web.HTTPConflict(text=str(exc).splitlines()[0]) from None
        audit(
            "console.gateway_revoked",
            request,
            gateway_id=gateway_id,
            certificates=len(records),
            reason=reason,
        )
        raise web.HTTPSeeOther("/gateways")

    async def _gateway_live(self, request: web.Request) -> web.StreamResponse:
        gateway_id = request.match_info["id"]
        url = self._gateway_consoles.get(gateway_id)
        if url is None:
            raise web.HTTPNotFound(text="no console known for this gateway")
        session = request[SESSION]
        link = mint_link(
            self.server.ca,
            gateway_id=gateway_id,
            operator=session.operator.name,
            role=session.operator.role,
        )
        audit("console.gateway_link", request, gateway_id=gateway_id)
        raise web.HTTPSeeOther(f"{url.rstrip('/')}/login#link={link}")

    async def _escalations(self, request: web.Request) -> web.StreamResponse:
        device = request.query.get("device", "")[:64] or None
        return self.render(request, "escalations.html", escalations=self.escalations.recent(device))

    def _escalation_or_404(self, request: web.Request) -> Any:
        record = self.escalations.get(request.match_info["gw"], request.match_info["id"])
        if record is None:
            raise web.HTTPNotFound(text="no such escalation (or no longer kept)")
        return record

    async def _escalation(self, request: web.Request) -> web.StreamResponse:
        return self.render(request, "escalation.html", e=self._escalation_or_404(request))

    async def _escalation_image(self, request: web.Request) -> web.StreamResponse:
        record = self._escalation_or_404(request)
        return web.Response(body=record.image, content_type=record.image_type)

    async def _audit(self, request: web.Request) -> web.StreamResponse:
        q = request.query.get("q", "")[:100]
        return self.render(request, "audit.html", lines=self.trail(q), q=q)
