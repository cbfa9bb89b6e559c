"""The operator console: the core's (fleet, gateways, escalations, audit, actions) and each
gateway's (live detections drawn on frames that never leave the edge).

An aiohttp application per service, on its own TLS port beside the gRPC servers in the same
event loop; pages rendered on the server (Jinja2, autoescaped) with a little plain JavaScript
(no build step), live updates by server-sent events. Security: :mod:`gateway._console._web`.
"""

from gateway._console._audit import AuditEntry, AuditRing, install_audit_ring, uninstall_audit_ring
from gateway._console._core_console import CoreConsole
from gateway._console._gateway_console import GatewayConsole
from gateway._console._links import LINK_TTL_S, LinkVerifier, mint_link
from gateway._console._live import LiveFeed
from gateway._console._records import EscalationLog, EscalationRecord
from gateway._console._web import Operator, SessionStore, WebConsole

__all__ = [
    "LINK_TTL_S",
    "AuditEntry",
    "AuditRing",
    "CoreConsole",
    "EscalationLog",
    "EscalationRecord",
    "GatewayConsole",
    "LinkVerifier",
    "LiveFeed",
    "Operator",
    "SessionStore",
    "WebConsole",
    "install_audit_ring",
    "mint_link",
    "uninstall_audit_ring",
]
