"""What both consoles share: TLS, operator sessions, CSRF, security headers, static files.

Security model (the console is a listener like the others: nothing is anonymous):

* **TLS** with the service's own certificate (the trust domain's PKI). The TLS layer *asks*
  for a client certificate (``CERT_OPTIONAL``, verified against the trust domain's bundle):
  an operator certificate (``spiffe://<td>/operator/<name>``) logs in without a token.
* **Sessions** are server-side (a random 256-bit id; the store keeps only its SHA-256), idle
  for at most ``session_ttl_s`` and never older than ``session_max_age_s``. The cookie is
  ``HttpOnly``, ``Secure``, ``SameSite=Strict`` and ``__Host-`` prefixed (RFC 6265bis §4.1.3:
  no ``Domain``, path ``/``, so no sibling host can plant or read it); each console has its
  own cookie name, because cookies are not isolated by port.
* **CSRF**: every state-changing request (any method but GET/HEAD) needs the session's
  synchroniser token (form field ``csrf`` or header ``X-CSRF-Token``, compared in constant
  time) *and* an ``Origin`` (or, lacking it, ``Referer``) of this very console (OWASP CSRF
  cheat sheet: defence in depth). Login forms, which have no session yet, need the origin.
* **Headers**: a strict Content-Security-Policy (no inline script or style, no framing),
  ``nosniff``, no referrer to other sites, no caching of pages, HSTS.
* **Bounds**: request bodies over ``max_body_bytes`` get 413 before they are read; static
  files are a fixed set read from the package at start, looked up by exact name, so no path
  can reach anything else.

Every refusal (no session, expired session, bad CSRF token or origin, a viewer attempting an
admin action, a bad login) and every action is an audit line (``audit=True``), with the
operator's name and never a token or session id.
"""

from __future__ import annotations

import abc
import contextlib
import datetime as dt
import hashlib
import hmac
import importlib.resources
import re
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import jinja2
import structlog
from aiohttp import web
from cryptography import x509

import pki

__all__ = [
    "PEER",
    "SESSION",
    "Operator",
    "SessionStore",
    "WebConsole",
    "admin_only",
    "audit",
]

_audit = structlog.get_logger("edgeward.console.audit")
_log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_STATIC_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,40}\.(?:css|js|svg)")
_STATIC_TYPES = {"css": "text/css", "js": "text/javascript", "svg": "image/svg+xml"}
_SAFE_METHODS = frozenset({"GET", "HEAD"})
#: Paths reachable without a session: the login page and form, and the static files.
_PUBLIC = ("/login", "/static/")


@dataclass(frozen=True, slots=True)
class Operator:
    """Who is logged in, their role, and how they proved it (token, certificate, link)."""

    name: str
    role: pki.OperatorRole
    method: str


@dataclass(slots=True)
class _Session:
    operator: Operator
    csrf: str
    created: float
    last_seen: float


#: Where the middleware puts the request's session for the handlers.
SESSION = web.RequestKey("session", _Session)
#: Where it puts the verified peer of a machine call (``/internal/``): a core identity.
PEER = web.RequestKey("peer", pki.Identity)


def _digest(sid: str) -> str:
    return hashlib.sha256(sid.encode("utf-8", "surrogatepass")).hexdigest()


class SessionStore:
    """Server-side sessions: idle and absolute lifetimes, bounded in number (oldest first)."""

    def __init__(
        self,
        *,
        idle_s: float,
        max_age_s: float,
        max_sessions: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._idle_s = idle_s
        self._max_age_s = max_age_s
        self._max = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    def create(self, operator: Operator) -> tuple[str, _Session]:
        sid = secrets.token_urlsafe(32)
        now = self._clock()
        session = _Session(operator, secrets.token_urlsafe(32), now, now)
        self._sessions[_digest(sid)] = session
        while len(self._sessions) > self._max:
            self._sessions.popitem(last=False)
        return sid, session

    def get(self, sid: str) -> tuple[_Session | None, str]:
        """The live session for ``sid`` (touched), or ``None`` and why."""
        if not sid or len(sid) > 100:
            return None, "no session"
        key = _digest(sid)
        session = self._sessions.get(key)
        if session is None:
            return None, "unknown session"
        now = self._clock()
        if now - session.last_seen > self._idle_s or now - session.created > self._max_age_s:
            del self._sessions[key]
            return None, "session expired"
        session.last_seen = now
        self._sessions.move_to_end(key)
        return session, ""

    def drop(self, sid: str) -> None:
        self._sessions.pop(_digest(sid), None)

    def drop_operator(self, name: str) -> int:
        """End every session of operator ``name``; how many there were."""
        keys = [k for k, s in self._sessions.items() if s.operator.name == name]
        for key in keys:
            del self._sessions[key]
        return len(keys)

    def __len__(self) -> int:
        return len(self._sessions)


def audit(event: str, request: web.Request | None = None, **fields: Any) -> None:
    """One audit line for a console action or refusal."""
    if request is not None:
        session: _Session | None = request.get(SESSION)
        if session is not None:
            fields.setdefault("operator", session.operator.name)
            fields.setdefault("operator_role", session.operator.role.value)
        fields.setdefault("peer", request.remote or "")
        fields.setdefault("path", request.path[:200])
        fields.setdefault("method", request.method)
    refusal = event.endswith(("refused", "denied"))
    (_audit.warning if refusal else _audit.info)(event, audit=True, **fields)


def admin_only(handler: Handler) -> Handler:
    """Refuse (403, audited) unless the session's operator is an admin."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        session = request[SESSION]
        if session.operator.role is not pki.OperatorRole.ADMIN:
            audit("console.refused", request, reason="admin role required")
            raise web.HTTPForbidden(text="this action needs the admin role")
        return await handler(request)

    guarded.__name__ = handler.__name__
    return guarded


def _load_static() -> dict[str, tuple[bytes, str]]:
    files: dict[str, tuple[bytes, str]] = {}
    for entry in importlib.resources.files("gateway._console").joinpath("static").iterdir():
        if _STATIC_NAME.fullmatch(entry.name):
            ext = entry.name.rsplit(".", 1)[1]
            files[entry.name] = (entry.read_bytes(), _STATIC_TYPES[ext])
    return files


def peer_certificate(request: web.Request) -> x509.Certificate | None:
    """The client certificate the TLS layer verified (``CERT_OPTIONAL``), if one was sent."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return None if der is None else x509.load_der_x509_certificate(der)


class WebConsole(abc.ABC):
    """An aiohttp application on its own TLS port, entered as an async context manager.

    Subclasses add their pages (:meth:`routes`) and say how operators log in
    (:meth:`login_secret`, :meth:`login_certificate`) and whether a session still stands
    (:meth:`still_allowed`).
    """

    #: Where a fresh session lands.
    home = "/"
    #: Shown on the login page.
    title = "edgeward console"

    def __init__(
        self,
        *,
        listen: str,
        identity: pki.IdentityFiles,
        trust_domain: str,
        cookie_name: str,
        session_ttl_s: float,
        session_max_age_s: float,
        max_body_bytes: int,
    ) -> None:
        self.listen = listen
        self.identity = identity
        self.trust_domain = trust_domain
        self.cookie_name = cookie_name
        self.max_body_bytes = max_body_bytes
        self.sessions = SessionStore(idle_s=session_ttl_s, max_age_s=session_max_age_s)
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._static = _load_static()
        self._jinja = jinja2.Environment(
            loader=jinja2.PackageLoader("gateway._console", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self._jinja.filters["when"] = _when

    # -- to implement -------------------------------------------------------------------------

    @abc.abstractmethod
    def routes(self) -> list[web.RouteDef]:
        """The console's own pages and API (all behind a session)."""

    @abc.abstractmethod
    async def login_secret(self, secret: str, *, peer: str) -> Operator:
        """The operator a pasted login token or link names; raise ``PkiError`` to refuse."""

    @abc.abstractmethod
    async def login_certificate(self, cert: x509.Certificate, *, peer: str) -> Operator:
        """The operator a verified client certificate names; raise ``PkiError`` to refuse."""

    async def still_allowed(self, operator: Operator) -> Operator | None:
        """The operator as now authorised (its role may have changed), or ``None``."""
        return operator

    async def started(self) -> None:  # noqa: B027 - an optional hook
        """Called once the site listens."""

    async def stopping(self) -> None:  # noqa: B027 - an optional hook
        """Called before the site closes."""

    # -- lifecycle ------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        ctx = pki.server_ssl_context(self.identity, require_client_cert=False)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def application(self) -> web.Application:
        app = web.Application(
            middlewares=[self._headers_middleware, self._auth_middleware],
            client_max_size=self.max_body_bytes,
        )
        app.add_routes(
            [
                web.get("/login", self._login_page),
                web.post("/login", self._login),
                web.post("/logout", self._logout),
                web.get("/static/{name}", self._static_file),
                *self.routes(),
            ]
        )
        return app

    async def __aenter__(self) -> Self:
        host, _, port = self.listen.rpartition(":")
        host = host.strip("[]")
        runner = web.AppRunner(self.application(), access_log=None, handle_signals=False)
        await runner.setup()
        self._runner = runner
        try:
            site = web.TCPSite(
                runner, host, int(port), ssl_context=self.ssl_context(), reuse_port=False
            )
            await site.start()
            self.port = int(runner.addresses[0][1])
            await self.started()
        except BaseException:
            await runner.cleanup()
            self._runner = None
            raise
        _log.info("console listening", url=self.url)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(Exception):
            await self.stopping()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        host = self.listen.rpartition(":")[0].strip("[]")
        if host in ("", "0.0.0.0", "::"):  # noqa: S104 - a comparison, not a bind
            host = "127.0.0.1"
        return f"https://{host if ':' not in host else f'[{host}]'}:{self.port}"

    # -- rendering ------------------------------------------------------------------------------

    def render(
        self, request: web.Request, template: str, http_status: int = 200, **context: Any
    ) -> web.Response:
        session: _Session | None = request.get(SESSION)
        text = self._jinja.get_template(template).render(
            operator=session.operator if session else None,
            csrf=session.csrf if session else "",
            title=self.title,
            path=request.path,
            **context,
        )
        return web.Response(text=text, status=http_status, content_type="text/html")

    # -- middlewares ------------------------------------------------------------------------------

    @web.middleware
    async def _headers_middleware(self, request: web.Request, handler: Handler) -> Any:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        h = response.headers
        h.setdefault("Content-Security-Policy", _CSP)
        h.setdefault("X-Content-Type-Options", "nosniff")
        # same-origin, not no-referrer: under no-referrer browsers send "Origin: null" with
        # form posts, and the origin check needs the real one. Nothing leaves for other sites.
        h.setdefault("Referrer-Policy", "same-origin")
        h.setdefault("X-Frame-Options", "DENY")
        h.setdefault("Cache-Control", "no-store")
        h.setdefault("Strict-Transport-Security", "max-age=31536000")
        if isinstance(response, web.HTTPException):
            raise response
        return response

    def _same_origin(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None or origin == "null":
            referer = request.headers.get("Referer", "")
            if not referer:
                return False
            parts = urlsplit(referer)
            origin = f"{parts.scheme}://{parts.netloc}"
        return hmac.compare_digest(origin.encode(), f"https://{request.host}".encode())

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Handler) -> Any:
        path = request.path
        public = path == "/login" or path.startswith("/static/")
        unsafe = request.method not in _SAFE_METHODS
        if unsafe and not self._same_origin(request):
            audit("console.refused", request, reason="cross-origin or origin-less request")
            raise web.HTTPForbidden(text="cross-origin request refused")
        if public:
            return await handler(request)
        if path.startswith("/internal/"):
            # Machine calls (the core reading a gateway's figures): a core's client certificate
            # verified by TLS, nothing else; no cookie, no operator, read-only.
            cert = peer_certificate(request)
            try:
                if cert is None or unsafe:
                    raise pki.InvalidIdentity("a core's client certificate is required")
                request[PEER] = pki.identity_from_certificate(
                    cert, trust_domain=self.trust_domain, role=pki.Role.CORE
                )
            except pki.PkiError as exc:
                audit("console.refused", request, reason=str(exc))
                raise web.HTTPUnauthorized(text="refused") from None
            return await handler(request)
        sid = request.cookies.get(self.cookie_name, "")
        session, why = self.sessions.get(sid)
        if session is not None:
            operator = await self.still_allowed(session.operator)
            if operator is None:
                self.sessions.drop(sid)
                session, why = None, "operator no longer allowed"
            else:
                session.operator = operator
        new_sid = ""
        if session is None:
            cert = peer_certificate(request)
            if cert is not None:
                try:
                    operator = await self.login_certificate(cert, peer=request.remote or "")
                except pki.PkiError as exc:
                    audit("console.login_refused", request, reason=str(exc), method="certificate")
                else:
                    new_sid, session = self.sessions.create(operator)
                    audit(
                        "console.login",
                        request,
                        operator=operator.name,
                        operator_role=operator.role.value,
                        method="certificate",
                    )
        if session is None:
            audit("console.refused", request, reason=why)
            if request.method == "GET" and not path.startswith("/api/"):
                raise web.HTTPSeeOther("/login")
            raise web.HTTPUnauthorized(text="log in first")
        request[SESSION] = session
        if unsafe:
            sent = request.headers.get("X-CSRF-Token", "")
            if not sent and request.content_type in (
                "application/x-www-form-urlencoded",
                "multipart/form-data",
            ):
                form = await read_form(request)
                value = form.get("csrf", "")
                sent = value if isinstance(value, str) else ""
            if not sent or not hmac.compare_digest(sent.encode(), session.csrf.encode()):
                audit("console.refused", request, reason="missing or wrong CSRF token")
                raise web.HTTPForbidden(text="CSRF token missing or wrong")
        response = await handler(request)
        if new_sid:
            self._set_cookie(response, new_sid)
        return response

    def _set_cookie(self, response: web.StreamResponse, sid: str) -> None:
        response.set_cookie(
            self.cookie_name, sid, path="/", secure=True, httponly=True, samesite="Strict"
        )

    # -- login, logout, static --------------------------------------------------------------------

    async def _login_page(self, request: web.Request) -> web.StreamResponse:
        sid = request.cookies.get(self.cookie_name, "")
        if self.sessions.get(sid)[0] is not None:
            raise web.HTTPSeeOther(self.home)
        cert = peer_certificate(request)
        if cert is not None:
            try:
                operator = await self.login_certificate(cert, peer=request.remote or "")
            except pki.PkiError as exc:
                audit("console.login_refused", request, reason=str(exc), method="certificate")
            else:
                return self._logged_in(request, operator)
        return self.render(request, "login.html", error="")

    async def _login(self, request: web.Request) -> web.StreamResponse:
        form = await read_form(request)
        secret = form.get("token", "")
        if not isinstance(secret, str) or not 0 < len(secret) <= 4096:
            audit("console.login_refused", request, reason="malformed login")
            return self.render(request, "login.html", http_status=400, error="malformed login")
        try:
            operator = await self.login_secret(secret.strip(), peer=request.remote or "")
        except (pki.PkiError, ValueError):
            # Said little to the caller; the reason is in the audit line.
            return self.render(request, "login.html", http_status=401, error="login refused")
        return self._logged_in(request, operator)

    def _logged_in(self, request: web.Request, operator: Operator) -> web.StreamResponse:
        sid, _ = self.sessions.create(operator)
        audit(
            "console.login",
            request,
            operator=operator.name,
            operator_role=operator.role.value,
            method=operator.method,
        )
        response = web.HTTPSeeOther(self.home)
        self._set_cookie(response, sid)
        return response

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        self.sessions.drop(request.cookies.get(self.cookie_name, ""))
        audit("console.logout", request)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(self.cookie_name, path="/")
        return response

    async def _static_file(self, request: web.Request) -> web.StreamResponse:
        found = self._static.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        body, content_type = found
        return web.Response(body=body, content_type=content_type)


def _when(value: Any) -> str:
    """A time as ``2026-12-06 00:15:30 UTC``; empty for ``None``."""
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        value = dt.datetime.fromtimestamp(value, dt.UTC)
    return f"{value:%Y-%m-%d %H:%M:%S} UTC"


async def read_form(request: web.Request) -> Mapping[str, Any]:
    """The posted form; 400 for a body that is not one (bad encoding, broken multipart)."""
    try:
        return await request.post()
    except ValueError:
        audit("console.refused", request, reason="malformed form")
        raise web.HTTPBadRequest(text="malformed form") from None


def form_text(form: Mapping[str, Any], name: str, *, max_len: int = 200) -> str:
    """A text field of a posted form, bounded; '' when absent or not text."""
    value = form.get(name, "")
    return value[:max_len] if isinstance(value, str) else ""
