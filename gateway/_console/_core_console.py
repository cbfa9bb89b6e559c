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
import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
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

__all__ = ["PAGE_SIZE", "CoreConsole", "DeviceRow"]

_log = structlog.get_logger(__name__)
_TTL_CHOICES = ("1h", "24h", "7d")
_PREFIX = re.compile(r"[a-z0-9-]{1,63}")
#: How often the core reads each gateway console's figures, and how long it waits for them.
_POLL_S = 2.0
_POLL_TIMEOUT_S = 3.0
#: Devices per fleet page.
PAGE_SIZE = 50
#: Fleet pages read from the registry are reused until its fleet version moves, or this
#: long at most (a certificate that expires changes no version).
_EXPIRY_BUCKET_S = 10.0
_FLEET_CACHE_SIZE = 64


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
            "last_escalation": self.last_escalation.isoformat() if self.last_escalation else None,
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
        self._fleet_cache: OrderedDict[tuple[Any, ...], pki.FleetPage] = OrderedDict()
        self._fleet_lock = threading.Lock()
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

    def _registry_page(self, prefix: str, state: str | None, page: int) -> pki.FleetPage:
        """The registry's fleet page, reused while its fleet version stands (a worker thread:
        two registry reads at most)."""
        now = self._clock()
        version = self.registry.fleet_version()
        key = (prefix, state, page, version, int(now.timestamp() // _EXPIRY_BUCKET_S))
        with self._fleet_lock:
            found = self._fleet_cache.get(key)
            if found is not None:
                self._fleet_cache.move_to_end(key)
                return found
        found = self.registry.fleet_page(
            prefix=prefix, state=state, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE, now=now
        )
        with self._fleet_lock:
            self._fleet_cache[key] = found
            while len(self._fleet_cache) > _FLEET_CACHE_SIZE:
                self._fleet_cache.popitem(last=False)
        return found

    async def fleet_page(
        self, *, prefix: str = "", state: str | None = None, page: int = 1
    ) -> tuple[list[DeviceRow], pki.FleetPage, int]:
        """One page of the fleet (``PAGE_SIZE`` rows) as the console shows it, the registry's
        page (counts included) and the number of pages. The registry is read only when its
        fleet version moved (or every ``_EXPIRY_BUCKET_S``, for certificates expiring);
        where each device was last seen comes from the gateways' reports."""
        page = max(1, page)
        found = await asyncio.to_thread(self._registry_page, prefix, state, page)
        last = self.escalations.last_per_device()
        edge = self.edge_view()["devices"]
        rows = []
        for r in found.rows:
            d, current = r.device, r.current
            seen = last.get(d.id)
            where = edge.get(d.id)
            rows.append(
                DeviceRow(
                    d.id,
                    d.type,
                    d.region,
                    r.state,
                    current.serial if current else "",
                    current.not_after if current else None,
                    d.created_at,
                    seen[0] if seen else None,
                    where[1] if where else (seen[1] if seen else ""),
                    dt.datetime.fromtimestamp(where[0], dt.UTC) if where else None,
                    where[2] if where else "",
                )
            )
        pages = max(1, -(-found.matching // PAGE_SIZE))
        return rows, found, pages

    async def device_row(self, device_id: str) -> DeviceRow | None:
        """The fleet row of one device (the first row of the page its id starts)."""
        rows, _, _ = await self.fleet_page(prefix=device_id)
        return rows[0] if rows and rows[0].id == device_id else None

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
            web.get("/operators", self._operators),
            web.post("/operators/{name}/revoke", admin_only(self._revoke_operator)),
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

    def _fleet_query(self, request: web.Request) -> tuple[str, str | None, int, str]:
        """The fleet filter a request asks for: id prefix, state, page; and why it is refused
        ('' when it is not)."""
        q = request.query.get("q", "")[:64].strip().lower()
        status = request.query.get("status", "")[:20]
        try:
            page = int(request.query.get("page", "1")[:6])
        except ValueError:
            page = 1
        error = ""
        if q and not _PREFIX.fullmatch(q):
            error = "search by the start of a device id: a-z, 0-9 and '-'"
        if status and status not in pki.FLEET_STATES:
            error = "unknown status"
        return q, status or None, max(1, page), error

    async def _fleet(self, request: web.Request) -> web.StreamResponse:
        q, status, page, error = self._fleet_query(request)
        if error:
            rows: list[DeviceRow] = []
            counts = {"all": 0, "active": 0, "expired": 0, "revoked": 0}
            matching, pages = 0, 1
        else:
            rows, found, pages = await self.fleet_page(prefix=q, state=status, page=page)
            counts, matching = found.counts, found.matching
        return self.render(
            request,
            "fleet.html",
            http_status=400 if error else 200,
            rows=rows,
            q=q,
            status=status or "",
            page=page,
            pages=pages,
            matching=matching,
            counts=counts,
            error=error,
            ttl_choices=_TTL_CHOICES,
        )

    async def _fleet_json(self, request: web.Request) -> web.StreamResponse:
        """The fleet page as JSON for the page's refresh. Its ``ETag`` is the digest of the
        body: a poll sending it back (``If-None-Match``) gets 304 and no body while nothing
        it shows changed, and the registry is read again only when its fleet version moved."""
        q, status, page, error = self._fleet_query(request)
        if error:
            raise web.HTTPBadRequest(text=error)
        rows, found, pages = await self.fleet_page(prefix=q, state=status, page=page)
        body = json.dumps(
            {
                "devices": [r.as_json() for r in rows],
                "matching": found.matching,
                "counts": found.counts,
                "page": page,
                "pages": pages,
                "page_size": PAGE_SIZE,
            },
            separators=(",", ":"),
        ).encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=body, content_type="application/json", headers={"ETag": etag})

    async def _operators(self, request: web.Request) -> web.StreamResponse:
        operators = await asyncio.to_thread(self.registry.list_operators)
        return self.render(request, "operators.html", operators=operators, error="")

    async def _revoke_operator(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        try:
            pki.validate_id(name, kind="operator name")
        except pki.InvalidName:
            raise web.HTTPNotFound(text="no such operator") from None
        form = await read_form(request)
        reason = form_text(form, "reason") or "revoked from the console"
        by = request[SESSION].operator.name
        try:
            records = await asyncio.to_thread(
                self.server.revoke_operator, name, reason=reason, by=by
            )
        except pki.PkiError as exc:
            audit(
                "console.action_refused",
                request,
                action="revoke_operator",
                target=name,
                reason=str(exc),
            )
            operators = await asyncio.to_thread(self.registry.list_operators)
            return self.render(
                request,
                "operators.html",
                http_status=409,
                operators=operators,
                error=str(exc).splitlines()[0],
            )
        audit(
            "console.operator_revoked",
            request,
            target=name,
            sequence=records[0].sequence,
            certificates=len(records) - 1,
            reason=records[0].reason,
        )
        if name == by:  # revoked oneself: the session is gone
            raise web.HTTPSeeOther("/login")
        raise web.HTTPSeeOther("/operators")

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
        row = await self.device_row(device.id)
        if row is None:
            raise web.HTTPNotFound(text="no such device")
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
