"""Console operators: one-time login tokens, and who a login token or certificate names.

Revoking an operator (:func:`revoke_operator`) ends everything it holds: its role, its unused
login tokens, its recorded client certificates (listed by the CRL), and, through the
revocation sequence, its sessions at the core's and every gateway's console.

An operator is an identity of the trust domain, ``spiffe://<td>/operator/<name>``, whose
viewer or admin role is kept in the registry (:class:`~pki.OperatorRecord`). It logs in to the
console either with a client certificate (role ``operator``, ``clientAuth`` only) or with a
one-time token from ``edgeward pki operator-token``, which reads ``<name>.<secret>`` like an
enrolment token: 256 random bits, of which the registry keeps only the SHA-256.
"""

from __future__ import annotations

import datetime as dt

import structlog

from pki._registry import OperatorRecord, OperatorRegistry, OperatorRole, RevocationRecord
from pki._tokens import generate_token, hash_token, token_device_id
from pki.errors import LastAdmin, RegistryError, TokenRejected

__all__ = [
    "DEFAULT_OPERATOR_TOKEN_TTL",
    "create_operator_token",
    "redeem_operator_token",
    "revoke_operator",
]

_audit = structlog.get_logger("pki.audit")

#: A login token is for logging in now, not for keeping: ten minutes unless asked otherwise.
DEFAULT_OPERATOR_TOKEN_TTL = dt.timedelta(minutes=10)
_MAX_OPERATOR_TOKEN_TTL = dt.timedelta(days=1)


def create_operator_token(
    registry: OperatorRegistry,
    *,
    name: str,
    role: OperatorRole | str,
    ttl: dt.timedelta = DEFAULT_OPERATOR_TOKEN_TTL,
    now: dt.datetime,
) -> str:
    """A one-time console login token for operator ``name`` with ``role``; audit-logged.

    Registers the operator (or changes its role). Raises :class:`~pki.errors.IdentityConflict`
    when a device, gateway or core holds the name, :class:`~pki.errors.RegistryError` when the
    operator is revoked, :class:`ValueError` for a bad role or a lifetime over a day.
    """
    role = OperatorRole(role)
    if not dt.timedelta(0) < ttl <= _MAX_OPERATOR_TOKEN_TTL:
        raise ValueError("an operator token lives more than 0 and at most 1 day")
    token = generate_token(name)
    try:
        registry.create_operator_token(
            hash_token(token), operator_id=name, role=role, expires_at=now + ttl, now=now
        )
    except RegistryError as exc:
        _audit.warning("operator_token.refused", audit=True, operator=name, reason=str(exc))
        raise
    _audit.info(
        "operator_token.created",
        audit=True,
        operator=name,
        operator_role=role.value,
        expires_at=(now + ttl).isoformat(),
    )
    return token


def redeem_operator_token(
    registry: OperatorRegistry, token: str, *, now: dt.datetime, peer: str = ""
) -> OperatorRecord:
    """Spend a login token; the operator it names, or :class:`~pki.errors.TokenRejected`.

    Both outcomes are audited; the token itself never is (only the name it claims).
    """
    try:
        name = token_device_id(token)
    except TokenRejected as exc:
        _audit.warning("operator.login_refused", audit=True, reason=exc.reason, peer=peer)
        raise
    try:
        record = registry.consume_operator_token(hash_token(token), now=now)
    except TokenRejected as exc:
        _audit.warning(
            "operator.login_refused", audit=True, operator=name, reason=exc.reason, peer=peer
        )
        raise
    _audit.info(
        "operator.login",
        audit=True,
        operator=record.id,
        operator_role=record.role.value,
        method="token",
        peer=peer,
    )
    return record


def revoke_operator(
    registry: OperatorRegistry,
    name: str,
    *,
    reason: str,
    now: dt.datetime,
    by: str = "",
    force: bool = False,
) -> list[RevocationRecord]:
    """Revoke operator ``name``; audit-logged (``operator.revoked``, naming ``by``, who did it).

    Returns the revocations: the operator's own (``serial`` None) first, then one per
    certificate recorded for it. Raises :class:`~pki.errors.LastAdmin` when ``name`` is the
    last active admin (unless ``force``), :class:`~pki.errors.RegistryError` for an unknown
    or already revoked operator; refusals are audited too.
    """
    try:
        records = registry.revoke_operator(name, reason=reason, now=now, force=force)
    except RegistryError as exc:
        _audit.warning(
            "operator.revoke_refused",
            audit=True,
            operator=name,
            by=by,
            last_admin=isinstance(exc, LastAdmin),
            reason=str(exc),
        )
        raise
    _audit.info(
        "operator.revoked",
        audit=True,
        operator=name,
        by=by,
        sequence=records[0].sequence,
        certificates=[r.serial for r in records[1:]],
        reason=records[0].reason,
        forced=force,
    )
    return records
