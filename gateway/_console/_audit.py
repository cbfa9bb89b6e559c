"""The audit trail the console shows: a bounded ring of this process's audit lines.

Audit lines (``audit=True``) are log lines first: every issuance, refusal and revocation is
written by the function that does it, whoever calls it (the CLI, the core, the console). The
core keeps the most recent ones in memory too, captured by a structlog processor placed just
before the renderer (after the redaction of secret keys), so the console shows exactly what
the log says. A ring rather than a registry table: the registry's schema stays what the
replicated (PostgreSQL) backend implements, and the log remains the durable record. What
other processes did (``edgeward pki revoke`` on another machine) reaches the console through
the registry itself: its revocations are merged into the trail from there.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

__all__ = ["AuditEntry", "AuditRing", "install_audit_ring", "uninstall_audit_ring"]

_MAX_VALUE = 300


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: dt.datetime
    event: str
    level: str
    fields: Mapping[str, str]

    def matches(self, text: str) -> bool:
        if not text:
            return True
        text = text.lower()
        return text in self.event.lower() or any(text in v.lower() for v in self.fields.values())


class AuditRing:
    """The last ``size`` audit lines of this process (thread-safe)."""

    def __init__(self, size: int = 2000) -> None:
        self._lines: deque[AuditEntry] = deque(maxlen=size)
        self._lock = threading.Lock()

    def __call__(
        self, _logger: object, method: str, event_dict: structlog.types.EventDict
    ) -> structlog.types.EventDict:
        """The structlog processor: records audit lines, passes every line on unchanged."""
        if event_dict.get("audit") is True:
            fields = {
                str(k): str(v)[:_MAX_VALUE]
                for k, v in event_dict.items()
                if k not in {"audit", "event", "timestamp", "level"}
            }
            entry = AuditEntry(
                dt.datetime.now(dt.UTC),
                str(event_dict.get("event", ""))[:_MAX_VALUE],
                str(event_dict.get("level", method)),
                fields,
            )
            with self._lock:
                self._lines.append(entry)
        return event_dict

    def entries(self) -> Iterator[AuditEntry]:
        """Newest first."""
        with self._lock:
            lines = list(self._lines)
        return reversed(lines)


def install_audit_ring(ring: AuditRing) -> None:
    """Insert ``ring`` into structlog's processors, just before the renderer (idempotent)."""
    config: dict[str, Any] = structlog.get_config()
    processors = list(config["processors"])
    if ring in processors:
        return
    processors.insert(max(len(processors) - 1, 0), ring)
    structlog.configure(processors=processors)


def uninstall_audit_ring(ring: AuditRing) -> None:
    processors = [p for p in structlog.get_config()["processors"] if p is not ring]
    structlog.configure(processors=processors)
