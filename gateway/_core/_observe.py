"""What the core's metrics need from its services: a stable reason for each refusal, and a
registry that times its own operations.

Reasons are metric labels, so they form a small fixed set named after the error (never a
message, an id or anything a caller sent). :class:`TimedRegistry` wraps the registry the
core's services use and reports each operation's latency, whichever service calls it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import pki
from gateway._core._status import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unimplemented,
)

__all__ = ["TimedRegistry", "refusal_reason", "timed_registry"]

_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (pki.TokenRejected, "token_rejected"),
    (pki.RateLimited, "rate_limited"),
    (pki.InvalidCsr, "invalid_csr"),
    (pki.InvalidName, "invalid_name"),
    (pki.CertificateRevoked, "revoked"),
    (pki.CertificateExpired, "expired"),
    (pki.InvalidIdentity, "invalid_identity"),
    (pki.RegistryError, "registry"),
    (Unauthenticated, "unauthenticated"),
    (PermissionDenied, "permission_denied"),
    (NotFound, "not_found"),
    (Unimplemented, "unimplemented"),
    (InvalidArgument, "invalid_argument"),
    (ResourceExhausted, "busy"),
)


def refusal_reason(exc: BaseException) -> str:
    """The metric label for a refusal raised as ``exc`` (``"other"`` for anything unmapped)."""
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "other"


#: The registry's operations (the :class:`pki.Registry` protocol's methods), timed by name.
_OPERATIONS = frozenset(
    name for name in vars(pki.Registry) if not name.startswith("_") and name != "close"
)


class TimedRegistry:
    """A :class:`pki.Registry` that reports each operation's duration to ``observe``.

    ``observe(operation, seconds)`` runs after every call of a protocol method, failed ones
    included; everything else passes through untouched.
    """

    def __init__(self, inner: pki.Registry, observe: Callable[[str, float], None]) -> None:
        self._inner = inner
        self._observe = observe

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in _OPERATIONS or not callable(attr):
            return attr
        observe = self._observe

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                observe(name, time.perf_counter() - started)

        return timed


def timed_registry(inner: pki.Registry, observe: Callable[[str, float], None]) -> pki.Registry:
    """``inner`` behind a :class:`TimedRegistry`, typed as the protocol it implements."""
    return cast(pki.Registry, TimedRegistry(inner, observe))
