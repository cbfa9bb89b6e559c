"""The registry: devices, certificates, enrolment tokens, revocations and the gateway directory.

:class:`Registry` is the interface the rest of the system uses; :class:`SqliteRegistry` is the
default implementation, one SQLite file in WAL mode so that the core (reader and writer) and
``edgeward pki`` commands in other processes can use it at the same time. The interface is small
and speaks in value objects so that a PostgreSQL backend can implement it for a replicated core.

Revocations carry a sequence number from ``INTEGER PRIMARY KEY AUTOINCREMENT``: SQLite never
reuses or lowers it (sqlite.org/autoinc.html), so a gateway resuming with "everything after
``n``" gets no gaps and no repeats.

Gateway and core (server) certificates live in their own table, ``server_certificates``
(serial, role, id): they belong to no device, and the ``certificates`` table's device foreign
key stays as it is in registries made by earlier versions. A server revocation is one
``revocations`` row per certificate (``role`` = gateway/core, ``serial`` set), so it gets a
sequence number, wakes the core's feed and reaches the CRL like a device's, and never affects
a device of the same id (which only a registry made before ids were unique across roles can
hold).

Ids are unique across roles within the trust domain (DESIGN.md, Identity): an id is held by
a device once the device is registered or an unused, unexpired enrolment token names it, and by
a gateway or core once a certificate of that server is recorded (or a gateway announced itself
in the directory). Revoked devices and servers keep their ids: a revocation entry must never
come to mean another holder. Every writer that claims an id (:meth:`SqliteRegistry.create_token`,
:meth:`SqliteRegistry.complete_enrolment`, :meth:`SqliteRegistry.record_server_certificate`,
:meth:`SqliteRegistry.create_operator_token`)
checks the other roles inside its own write transaction, so of two concurrent claimants in
any processes exactly one wins and the other gets :class:`~pki.errors.IdentityConflict`.

One device id has at most one live enrolment token (a new token voids the unused ones before
it) and one live identity: enrolling again (a replaced or reset device) revokes the earlier
certificates that are still valid, each with its own revocation sequence number, in the same
transaction that records the new one. Renewal keeps the earlier certificate until it expires.

Times are stored as UTC POSIX seconds (REAL) so that comparisons run inside SQL.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pki._names import Role, validate_device_type, validate_id
from pki.errors import (
    CertificateRevoked,
    IdentityConflict,
    InvalidIdentity,
    LastAdmin,
    RegistryError,
    TokenRejected,
)

__all__ = [
    "FLEET_STATES",
    "MAX_FLEET_PAGE",
    "CertificateRecord",
    "CoreRegistry",
    "DeviceRecord",
    "EnrolmentRecord",
    "FleetPage",
    "FleetRow",
    "GatewayRecord",
    "OperatorRecord",
    "OperatorRegistry",
    "OperatorRole",
    "Registry",
    "RevocationRecord",
    "ServerCertificateRecord",
    "SqliteRegistry",
    "Status",
    "TokenRecord",
    "is_postgres_url",
    "open_registry",
    "redacted_url",
]


class Status(enum.StrEnum):
    """A device's or a certificate's standing in the registry."""

    ACTIVE = "active"
    REVOKED = "revoked"


class OperatorRole(enum.StrEnum):
    """What a console operator may do: look (viewer), or also act (admin)."""

    VIEWER = "viewer"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class OperatorRecord:
    """A console operator (``spiffe://td/operator/<id>``); the role is kept here, not in any
    certificate, so it can change without reissuing."""

    id: str
    role: OperatorRole
    status: Status
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    id: str
    type: str
    region: str
    status: Status
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    serial: str
    device_id: str
    not_after: dt.datetime
    status: Status
    issued_at: dt.datetime


@dataclass(frozen=True, slots=True)
class ServerCertificateRecord:
    """A gateway's or core's certificate (``edgeward pki issue-server``, the core's own)."""

    serial: str
    role: Role  # Role.GATEWAY or Role.CORE
    server_id: str
    not_after: dt.datetime
    status: Status
    issued_at: dt.datetime


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """What a token grants; the token itself is never stored, only ``token_hash``.

    ``voided_at`` is set when a newer token for the same device replaced this one unused.
    """

    token_hash: str
    device_id: str
    type: str
    region: str
    expires_at: dt.datetime
    used_at: dt.datetime | None
    voided_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class RevocationRecord:
    """One revocation. ``device_id`` is the device's id, or the server's id when ``role`` is
    gateway or core (server revocations always name one ``serial``)."""

    sequence: int
    device_id: str
    serial: str | None  # None: the whole device
    reason: str
    revoked_at: dt.datetime
    role: Role = Role.DEVICE


@dataclass(frozen=True, slots=True)
class EnrolmentRecord:
    """A completed enrolment: the device as registered, and the revocations of the
    certificates its new one replaces (empty on a first enrolment)."""

    device: DeviceRecord
    replaced: tuple[RevocationRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class GatewayRecord:
    id: str
    region: str
    grpc_address: str
    mqtt_address: str
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class FleetRow:
    """A device as the console's fleet list shows it: ``state`` is ``revoked``, ``expired``
    (active, but no active certificate valid now) or ``active``; ``current`` its newest
    active certificate (else its newest), if any."""

    device: DeviceRecord
    state: str
    current: CertificateRecord | None


@dataclass(frozen=True, slots=True)
class FleetPage:
    """One page of the fleet (``rows``, ordered by id), how many devices match the filter
    (``matching``), and the whole fleet's ``counts`` by state (``all``, ``active``,
    ``expired``, ``revoked``): read together, from one aggregate query."""

    rows: tuple[FleetRow, ...]
    matching: int
    counts: dict[str, int]


#: The states a fleet page filters on.
FLEET_STATES = ("active", "expired", "revoked")
#: The most rows one fleet page holds.
MAX_FLEET_PAGE = 200


def _fleet_filter(prefix: str, state: str | None, limit: int, offset: int) -> str:
    """Checked fleet filter values (no SQL is built from them; they are bound parameters)."""
    if prefix and not _PREFIX.fullmatch(prefix):
        raise ValueError("a device id prefix holds only a-z, 0-9 and '-' (at most 63)")
    if state is not None and state not in FLEET_STATES:
        raise ValueError(f"state must be one of {', '.join(FLEET_STATES)}")
    if not 0 < limit <= MAX_FLEET_PAGE or offset < 0:
        raise ValueError(f"limit must be 1 to {MAX_FLEET_PAGE}, offset 0 or more")
    return prefix


def _current_certificates(
    rows: Sequence[Sequence[Any]],
) -> dict[str, CertificateRecord]:
    """Per device, the certificate the fleet shows: the newest active one, else the newest."""
    mine: dict[str, list[CertificateRecord]] = {}
    for row in rows:
        c = _cert_row(row)
        mine.setdefault(c.device_id, []).append(c)
    found: dict[str, CertificateRecord] = {}
    for device_id, certs in mine.items():
        certs.sort(key=lambda c: (c.issued_at, c.serial))
        active = [c for c in certs if c.status is Status.ACTIVE]
        found[device_id] = (active or certs)[-1]
    return found


@runtime_checkable
class Registry(Protocol):
    """What the core and the ``pki`` commands need from the registry.

    An implementation keeps the guarantees :class:`SqliteRegistry` documents: one id namespace
    across roles, checked inside the claiming write (serialisable, so concurrent claimants
    cannot both win); a new token voids the device's unused ones; enrolling again revokes the
    certificates it replaces with fresh revocation sequence numbers.
    """

    def create_token(self, record: TokenRecord, *, now: dt.datetime) -> int: ...
    def get_token(self, token_hash: str) -> TokenRecord | None: ...
    def consume_token(self, token_hash: str, *, now: dt.datetime) -> TokenRecord: ...
    def complete_enrolment(
        self, token_hash: str, *, certificate: CertificateRecord, now: dt.datetime
    ) -> EnrolmentRecord: ...
    def upsert_device(
        self, device_id: str, *, type: str, region: str, now: dt.datetime
    ) -> DeviceRecord: ...
    def get_device(self, device_id: str) -> DeviceRecord | None: ...
    def list_devices(self) -> list[DeviceRecord]: ...
    def fleet_page(
        self,
        *,
        prefix: str = "",
        state: str | None = None,
        limit: int = 50,
        offset: int = 0,
        now: dt.datetime,
    ) -> FleetPage: ...
    def fleet_version(self) -> str: ...
    def record_certificate(self, record: CertificateRecord) -> None: ...
    def record_renewal(self, previous_serial: str, certificate: CertificateRecord) -> None: ...
    def get_certificate(self, serial: str) -> CertificateRecord | None: ...
    def list_certificates(self, device_id: str | None = None) -> list[CertificateRecord]: ...
    def record_server_certificate(self, record: ServerCertificateRecord) -> None: ...
    def get_server_certificate(self, serial: str) -> ServerCertificateRecord | None: ...
    def list_server_certificates(
        self, role: Role | None = None, server_id: str | None = None
    ) -> list[ServerCertificateRecord]: ...
    def revoke_device(
        self, device_id: str, *, reason: str, now: dt.datetime
    ) -> RevocationRecord: ...
    def revoke_serial(self, serial: str, *, reason: str, now: dt.datetime) -> RevocationRecord: ...
    def revoke_server(
        self, role: Role, server_id: str, *, reason: str, now: dt.datetime
    ) -> list[RevocationRecord]: ...
    def revocations_since(self, sequence: int, *, limit: int = 1000) -> list[RevocationRecord]: ...
    def last_sequence(self) -> int: ...
    def revoked_serials(self) -> list[tuple[str, dt.datetime]]: ...
    def is_revoked(self, device_id: str, serial: str | None = None) -> bool: ...
    def next_crl_number(self) -> int: ...
    def upsert_gateway(self, record: GatewayRecord) -> int: ...
    def list_gateways(self) -> list[GatewayRecord]: ...
    def directory_version(self) -> int: ...
    def watch_revocations(self, callback: Callable[[], None]) -> Callable[[], None] | None:
        """Call ``callback`` from another thread after each revocation committed by any
        process; returns a function that stops it, or ``None`` when this backend cannot push
        (the caller polls :meth:`last_sequence`)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class OperatorRegistry(Protocol):
    """Operators and their one-time login tokens (the console). Operator ids share the one
    id namespace with devices, gateways and cores."""

    def create_operator_token(
        self,
        token_hash: str,
        *,
        operator_id: str,
        role: OperatorRole,
        expires_at: dt.datetime,
        now: dt.datetime,
    ) -> None: ...
    def consume_operator_token(self, token_hash: str, *, now: dt.datetime) -> OperatorRecord: ...
    def get_operator(self, operator_id: str) -> OperatorRecord | None: ...
    def list_operators(self) -> list[OperatorRecord]: ...
    def record_operator_certificate(
        self, serial: str, *, operator_id: str, not_after: dt.datetime, now: dt.datetime
    ) -> None: ...
    def revoke_operator(
        self, operator_id: str, *, reason: str, now: dt.datetime, force: bool = False
    ) -> list[RevocationRecord]: ...


@runtime_checkable
class CoreRegistry(Registry, OperatorRegistry, Protocol):
    """What a core opens (:func:`open_registry`): the registry and its console operators.
    Both backends, SQLite and PostgreSQL, keep both."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    region TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(id),
    not_after REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    issued_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS certificates_device ON certificates(device_id);
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    type TEXT NOT NULL,
    region TEXT NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL,
    created_at REAL NOT NULL,
    voided_at REAL
);
CREATE INDEX IF NOT EXISTS tokens_device ON tokens(device_id);
CREATE TABLE IF NOT EXISTS server_certificates (
    serial TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('gateway', 'core')),
    server_id TEXT NOT NULL,
    not_after REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    issued_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS server_certificates_id ON server_certificates(role, server_id);
CREATE TABLE IF NOT EXISTS revocations (
    sequence INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    serial TEXT,
    reason TEXT NOT NULL,
    revoked_at REAL NOT NULL,
    role TEXT NOT NULL DEFAULT 'device'
);
CREATE TABLE IF NOT EXISTS gateways (
    id TEXT PRIMARY KEY,
    region TEXT NOT NULL,
    grpc_address TEXT NOT NULL,
    mqtt_address TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS operators (
    id TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('viewer', 'admin')),
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS operator_tokens (
    token_hash TEXT PRIMARY KEY,
    operator_id TEXT NOT NULL REFERENCES operators(id),
    expires_at REAL NOT NULL,
    used_at REAL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS operator_certificates (
    serial TEXT PRIMARY KEY,
    operator_id TEXT NOT NULL REFERENCES operators(id),
    not_after REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    issued_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS operator_certificates_operator ON operator_certificates(operator_id);
CREATE INDEX IF NOT EXISTS operator_tokens_operator ON operator_tokens(operator_id);
-- The fleet page's "has a valid certificate" test, answered from the index alone.
CREATE INDEX IF NOT EXISTS certificates_valid ON certificates(device_id, status, not_after);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

_MAX_REASON = 200
_PREFIX = re.compile(r"[a-z0-9-]{1,63}")
_SERVER_ROLES = frozenset({Role.GATEWAY, Role.CORE})
_REPLACED_REASON = "replaced by a new enrolment"
# Columns added after the first release: (table, column, definition), applied by _migrate.
_ADDED_COLUMNS = (
    ("revocations", "role", "TEXT NOT NULL DEFAULT 'device'"),
    ("tokens", "voided_at", "REAL"),
)


def _ts(t: dt.datetime) -> float:
    if t.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return t.timestamp()


def _dt(v: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(v, dt.UTC)


# Rows to records: the same for every backend's SQL.


def _device_row(row: Sequence[Any]) -> DeviceRecord:
    i, t, r, s, c = row
    return DeviceRecord(str(i), str(t), str(r), Status(str(s)), _dt(float(c)))


def _operator_row(row: Sequence[Any]) -> OperatorRecord:
    return OperatorRecord(str(row[0]), OperatorRole(row[1]), Status(row[2]), _dt(float(row[3])))


def _cert_row(row: Sequence[Any]) -> CertificateRecord:
    s, d, na, st, ia = row
    return CertificateRecord(
        str(s),
        str(d),
        _dt(float(na)),
        Status(str(st)),
        _dt(float(ia)),
    )


def _server_row(row: Sequence[Any]) -> ServerCertificateRecord:
    s, role, sid, na, st, ia = row
    return ServerCertificateRecord(
        str(s), Role(str(role)), str(sid), _dt(float(na)), Status(str(st)), _dt(float(ia))
    )


def _unspent_reason(used_at: object, voided_at: object) -> str:
    """Why a known token could not be spent (for the audit log only)."""
    if voided_at is not None:
        return "token voided by a newer token"
    return "token already used" if used_at is not None else "token expired"


def _canonical_serial(serial: str) -> str:
    """A serial as the registry keys it (see ``pki.serial_hex``): lower-case hex, no 0x, no
    leading zeros."""
    return serial.strip().lower().removeprefix("0x").lstrip("0") or "0"


def _clean_reason(reason: str) -> str:
    # Reasons end up in logs and on the wire: printable, one line, bounded.
    text = "".join(c if c.isprintable() else " " for c in reason).strip()
    return text[:_MAX_REASON] or "unspecified"


# The fleet as the console lists it, written once for both backends (psycopg's named
# parameters; SQLite's spelling is derived by _sqlite_params). Every value is bound.
_FLEET_STATE = (
    "CASE WHEN d.status = 'revoked' THEN 'revoked'"
    " WHEN EXISTS (SELECT 1 FROM certificates c WHERE c.device_id = d.id"
    " AND c.status = 'active' AND c.not_after > %(now)s) THEN 'active' ELSE 'expired' END"
)
_FLEET_MATCH = (
    "(CAST(%(prefix)s AS TEXT) = '' OR substr(d.id, 1, length(CAST(%(prefix)s AS TEXT)))"
    " = CAST(%(prefix)s AS TEXT))"
)
_FLEET_STATE_MATCH = "(CAST(%(state)s AS TEXT) IS NULL OR f.state = CAST(%(state)s AS TEXT))"
# Fixed fragments joined once at import; every value is a bound parameter.
FLEET_PAGE_SQL = "".join(
    (
        "SELECT f.id, f.type, f.region, f.status, f.created_at, f.state FROM (",
        "SELECT d.id, d.type, d.region, d.status, d.created_at, ",
        _FLEET_STATE,
        " AS state FROM devices d WHERE ",
        _FLEET_MATCH,
        ") f WHERE ",
        _FLEET_STATE_MATCH,
        " ORDER BY f.id {collate} LIMIT %(limit)s OFFSET %(offset)s",
    )
)
FLEET_COUNTS_SQL = "".join(
    (
        "SELECT COUNT(*),",
        " COALESCE(SUM(CASE WHEN f.state = 'active' THEN 1 ELSE 0 END), 0),",
        " COALESCE(SUM(CASE WHEN f.state = 'expired' THEN 1 ELSE 0 END), 0),",
        " COALESCE(SUM(CASE WHEN f.state = 'revoked' THEN 1 ELSE 0 END), 0),",
        " COALESCE(SUM(CASE WHEN f.m = 1 AND ",
        _FLEET_STATE_MATCH,
        " THEN 1 ELSE 0 END), 0) FROM (SELECT ",
        _FLEET_STATE,
        " AS state, CASE WHEN ",
        _FLEET_MATCH,
        " THEN 1 ELSE 0 END AS m FROM devices d) f",
    )
)
#: The fleet's version: bumped by every write that changes what the fleet list shows
#: (enrolment, renewal, a device's facts; revocations advance the sequence).
FLEET_VERSION_SQL = (
    "SELECT COALESCE((SELECT value FROM counters WHERE name = 'fleet'), 0),"
    " COALESCE((SELECT MAX(sequence) FROM revocations), 0)"
)


def _sqlite_params(sql: str) -> str:
    return re.sub(r"%\((\w+)\)s", r":\1", sql)


def _fleet_page(
    rows: Sequence[Sequence[Any]],
    certs: Sequence[Sequence[Any]],
    counts: Sequence[Any],
) -> FleetPage:
    current = _current_certificates(certs)
    total, active, expired, revoked, matching = (int(v) for v in counts)
    return FleetPage(
        tuple(FleetRow(_device_row(r[:5]), str(r[5]), current.get(str(r[0]))) for r in rows),
        matching,
        {"all": total, "active": active, "expired": expired, "revoked": revoked},
    )


class SqliteRegistry:
    """The registry in one SQLite file (WAL).

    One connection guarded by a lock serves every thread of a process; other processes share
    the file through SQLite's own locking, waiting up to ``busy_timeout_s`` for a writer.
    """

    def __init__(self, path: Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(
                self.path,
                timeout=busy_timeout_s,
                isolation_level=None,  # explicit BEGIN IMMEDIATE below
                check_same_thread=False,  # guarded by self._lock
            )
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            with self._lock:
                # executescript commits on its own; every statement is idempotent.
                self._db.executescript(_SCHEMA)
                self._migrate()
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open registry {self.path}: {exc}") from exc
        self.path.chmod(0o600)

    def __repr__(self) -> str:
        return f"SqliteRegistry({str(self.path)!r})"

    def _migrate(self) -> None:
        """Bring a registry made by an earlier version up to this schema (additive only).

        Checked again inside the write transaction: two processes may open an old file at once.
        """
        if all(self._has_column(t, c) for t, c, _ in _ADDED_COLUMNS):
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for table, column, definition in _ADDED_COLUMNS:
                if not self._has_column(table, column):
                    # Fixed names from _ADDED_COLUMNS above, never input.
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _has_column(self, table: str, column: str) -> bool:
        return any(row[1] == column for row in self._db.execute(f"PRAGMA table_info({table})"))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def watch_revocations(self, callback: Callable[[], None]) -> Callable[[], None] | None:
        """``None``: SQLite cannot tell another process's commit; readers poll."""
        return None

    def __enter__(self) -> SqliteRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken up front (BEGIN IMMEDIATE), so two writers never deadlock
        trying to upgrade a read lock."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise RegistryError(f"registry is busy or unwritable: {exc}") from exc
            try:
                yield self._db
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                raise
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise RegistryError(f"registry write failed: {exc}") from exc
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def _read(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._db.execute(sql, args).fetchall())
            except sqlite3.Error as exc:
                raise RegistryError(f"registry read failed: {exc}") from exc

    # -- one id namespace across roles ----------------------------------------------------

    @staticmethod
    def _claim_id(db: sqlite3.Connection, id: str, *, role: Role, now: dt.datetime) -> None:
        """Raise :class:`IdentityConflict` when a role other than ``role`` holds ``id``.

        Runs inside the caller's write transaction (BEGIN IMMEDIATE holds the database's one
        write lock), so the check and the caller's insert are atomic with respect to every
        other writer, in this process or another.
        """
        server = db.execute(
            "SELECT role FROM server_certificates WHERE server_id = ? AND role != ? LIMIT 1",
            (id, role.value),
        ).fetchone()
        if server is not None:
            raise IdentityConflict(id, holder=str(server[0]), wanted=role.value)
        if (
            role is not Role.GATEWAY
            and db.execute("SELECT 1 FROM gateways WHERE id = ?", (id,)).fetchone()
        ):
            raise IdentityConflict(id, holder=Role.GATEWAY.value, wanted=role.value)
        if (
            role is not Role.OPERATOR
            and db.execute("SELECT 1 FROM operators WHERE id = ?", (id,)).fetchone()
        ):
            raise IdentityConflict(id, holder=Role.OPERATOR.value, wanted=role.value)
        if role is Role.DEVICE:
            return
        if db.execute("SELECT 1 FROM devices WHERE id = ?", (id,)).fetchone():
            raise IdentityConflict(id, holder=Role.DEVICE.value, wanted=role.value)
        if db.execute(
            "SELECT 1 FROM tokens WHERE device_id = ? AND used_at IS NULL AND voided_at IS NULL"
            " AND expires_at > ? LIMIT 1",
            (id, _ts(now)),
        ).fetchone():
            raise IdentityConflict(id, holder=Role.DEVICE.value, wanted=role.value, pending=True)

    # -- operators (the console) -----------------------------------------------------------

    def create_operator_token(
        self,
        token_hash: str,
        *,
        operator_id: str,
        role: OperatorRole,
        expires_at: dt.datetime,
        now: dt.datetime,
    ) -> None:
        """Store a login token's hash for ``operator_id``, registering the operator (or setting
        its role) in the same transaction. Raises :class:`IdentityConflict` when a device,
        gateway or core holds the id, :class:`RegistryError` when the operator is revoked."""
        validate_id(operator_id, kind="operator name")
        role = OperatorRole(role)
        with self._write() as db:
            self._claim_id(db, operator_id, role=Role.OPERATOR, now=now)
            row = db.execute("SELECT status FROM operators WHERE id = ?", (operator_id,)).fetchone()
            if row is not None and row[0] == Status.REVOKED:
                raise RegistryError(f"operator {operator_id} is revoked")
            db.execute(
                "INSERT INTO operators (id, role, status, created_at) VALUES (?, ?, 'active', ?)"
                " ON CONFLICT(id) DO UPDATE SET role = excluded.role",
                (operator_id, role.value, _ts(now)),
            )
            db.execute(
                "INSERT INTO operator_tokens (token_hash, operator_id, expires_at, used_at,"
                " created_at) VALUES (?, ?, ?, NULL, ?)",
                (token_hash, operator_id, _ts(expires_at), _ts(now)),
            )

    def consume_operator_token(self, token_hash: str, *, now: dt.datetime) -> OperatorRecord:
        """Spend a login token (once, even under concurrent attempts) and return its operator;
        :class:`TokenRejected` for an unknown, used or expired token or a revoked operator."""
        with self._write() as db:
            won = (
                db.execute(
                    "UPDATE operator_tokens SET used_at = ? WHERE token_hash = ?"
                    " AND used_at IS NULL AND expires_at > ?",
                    (_ts(now), token_hash, _ts(now)),
                ).rowcount
                == 1
            )
            row = db.execute(
                "SELECT operator_id, used_at FROM operator_tokens WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
        if row is None:
            raise TokenRejected("unknown token")
        if not won:
            raise TokenRejected(self._unspent_reason(row[1], None))
        operator = self.get_operator(str(row[0]))
        if operator is None or operator.status is not Status.ACTIVE:
            raise TokenRejected("operator is revoked")
        return operator

    def get_operator(self, operator_id: str) -> OperatorRecord | None:
        rows = self._read(
            "SELECT id, role, status, created_at FROM operators WHERE id = ?", (operator_id,)
        )
        return self._operator(rows[0]) if rows else None

    def list_operators(self) -> list[OperatorRecord]:
        rows = self._read("SELECT id, role, status, created_at FROM operators ORDER BY id")
        return [self._operator(r) for r in rows]

    _operator = staticmethod(_operator_row)

    def record_operator_certificate(
        self, serial: str, *, operator_id: str, not_after: dt.datetime, now: dt.datetime
    ) -> None:
        """Record an operator's client certificate, so that revoking the operator revokes it
        (and the CRL lists it). Raises :class:`RegistryError` unless the operator is
        registered and active."""
        validate_id(operator_id, kind="operator name")
        try:
            with self._write() as db:
                row = db.execute(
                    "SELECT status FROM operators WHERE id = ?", (operator_id,)
                ).fetchone()
                if row is None or row[0] != Status.ACTIVE:
                    raise RegistryError(f"operator {operator_id} is not registered or revoked")
                db.execute(
                    "INSERT INTO operator_certificates"
                    " (serial, operator_id, not_after, status, issued_at)"
                    " VALUES (?, ?, ?, 'active', ?)",
                    (_canonical_serial(serial), operator_id, _ts(not_after), _ts(now)),
                )
        except sqlite3.IntegrityError as exc:
            raise RegistryError(f"cannot record certificate {serial}: {exc}") from exc

    def revoke_operator(
        self, operator_id: str, *, reason: str, now: dt.datetime, force: bool = False
    ) -> list[RevocationRecord]:
        """Revoke an operator, in one transaction: its status, its unused login tokens (spent),
        its recorded certificates, and one revocation per certificate plus one for the
        operator itself (``serial`` None), each with the next sequence number, so the feed
        carries them to every gateway console. Raises :class:`RegistryError` for an unknown
        or already revoked operator, :class:`LastAdmin` when it is the last active admin
        (unless ``force``): checked inside the write, so two admins revoking each other at
        once cannot both win."""
        validate_id(operator_id, kind="operator name")
        reason = _clean_reason(reason)
        with self._write() as db:
            row = db.execute(
                "SELECT role, status FROM operators WHERE id = ?", (operator_id,)
            ).fetchone()
            if row is None:
                raise RegistryError(f"no operator {operator_id} in the registry")
            if row[1] == Status.REVOKED:
                raise RegistryError(f"operator {operator_id} is already revoked")
            if row[0] == OperatorRole.ADMIN and not force:
                others = db.execute(
                    "SELECT COUNT(*) FROM operators WHERE role = 'admin' AND status = 'active'"
                    " AND id != ?",
                    (operator_id,),
                ).fetchone()
                if int(others[0]) == 0:
                    raise LastAdmin(operator_id)
            db.execute("UPDATE operators SET status = 'revoked' WHERE id = ?", (operator_id,))
            db.execute(
                "UPDATE operator_tokens SET used_at = ? WHERE operator_id = ? AND used_at IS NULL",
                (_ts(now), operator_id),
            )
            serials = db.execute(
                "UPDATE operator_certificates SET status = 'revoked' WHERE operator_id = ?"
                " AND status = 'active' RETURNING serial",
                (operator_id,),
            ).fetchall()
            records = []
            for serial in [None, *sorted(str(s) for (s,) in serials)]:
                cur = db.execute(
                    "INSERT INTO revocations (device_id, serial, reason, revoked_at, role)"
                    " VALUES (?, ?, ?, ?, 'operator')",
                    (operator_id, serial, reason, _ts(now)),
                )
                records.append(
                    RevocationRecord(
                        int(cur.lastrowid or 0), operator_id, serial, reason, now, Role.OPERATOR
                    )
                )
            return records

    # -- tokens ---------------------------------------------------------------------------

    def create_token(self, record: TokenRecord, *, now: dt.datetime) -> int:
        """Store a new token (its hash) and void the device's earlier unused ones.

        Returns how many live tokens were voided, so that one device id never has two ways
        in. Raises :class:`IdentityConflict` when a gateway or core holds the id, and
        :class:`RegistryError` when the device is revoked.
        """
        validate_id(record.device_id, kind="device id")
        validate_device_type(record.type)
        validate_id(record.region, kind="region")
        with self._write() as db:
            row = db.execute(
                "SELECT status FROM devices WHERE id = ?", (record.device_id,)
            ).fetchone()
            if row is not None and row[0] == Status.REVOKED:
                raise RegistryError(
                    f"device {record.device_id} is revoked; enrol the hardware under a new id"
                )
            self._claim_id(db, record.device_id, role=Role.DEVICE, now=now)
            voided = db.execute(
                "UPDATE tokens SET voided_at = ? WHERE device_id = ? AND used_at IS NULL"
                " AND voided_at IS NULL AND expires_at > ?",
                (_ts(now), record.device_id, _ts(now)),
            ).rowcount
            db.execute(
                "INSERT INTO tokens (token_hash, device_id, type, region, expires_at, used_at,"
                " created_at) VALUES (?, ?, ?, ?, ?, NULL, ?)",
                (
                    record.token_hash,
                    record.device_id,
                    record.type,
                    record.region,
                    _ts(record.expires_at),
                    _ts(now),
                ),
            )
        return int(voided)

    def get_token(self, token_hash: str) -> TokenRecord | None:
        rows = self._read(
            "SELECT token_hash, device_id, type, region, expires_at, used_at, voided_at"
            " FROM tokens WHERE token_hash = ?",
            (token_hash,),
        )
        if not rows:
            return None
        h, dev, typ, region, exp, used, voided = rows[0]
        return TokenRecord(
            str(h),
            str(dev),
            str(typ),
            str(region),
            _dt(float(exp)),
            None if used is None else _dt(float(used)),
            None if voided is None else _dt(float(voided)),
        )

    _unspent_reason = staticmethod(_unspent_reason)

    def consume_token(self, token_hash: str, *, now: dt.datetime) -> TokenRecord:
        """Mark the token used and return what it grants, or raise :class:`TokenRejected`.

        Single use even under concurrent attempts, in this process or another: the one
        conditional UPDATE decides, and only the attempt that changed a row wins.
        """
        with self._write() as db:
            cur = db.execute(
                "UPDATE tokens SET used_at = ? WHERE token_hash = ? AND used_at IS NULL"
                " AND voided_at IS NULL AND expires_at > ?",
                (_ts(now), token_hash, _ts(now)),
            )
            won = cur.rowcount == 1
        record = self.get_token(token_hash)
        if record is None:
            raise TokenRejected("unknown token")
        if not won:
            raise TokenRejected(self._unspent_reason(record.used_at, record.voided_at))
        return record

    def complete_enrolment(
        self, token_hash: str, *, certificate: CertificateRecord, now: dt.datetime
    ) -> EnrolmentRecord:
        """Spend the token, register the device and record its certificate, all or nothing.

        The certificate was signed before this call but is handed out only if this succeeds;
        the conditional UPDATE decides among concurrent attempts with the same token. The id
        is checked again here (a gateway or core may have taken it since the token was
        made: :class:`IdentityConflict`). Enrolling a device that is already registered
        replaces its identity: every certificate of it that is still valid is revoked in the
        same transaction, each with the next revocation sequence number (returned in
        :attr:`EnrolmentRecord.replaced`), so gateways cut the old certificate's sessions.
        """
        # Few statements in one transaction (each UPDATE/INSERT reports back with RETURNING
        # instead of a SELECT after it): enrolment is the core's hottest write path.
        with self._write() as db:
            spent = db.execute(
                "UPDATE tokens SET used_at = ? WHERE token_hash = ? AND used_at IS NULL"
                " AND voided_at IS NULL AND expires_at > ? RETURNING device_id, type, region",
                (_ts(now), token_hash, _ts(now)),
            ).fetchall()  # to the end: a RETURNING statement is finished only when drained
            if not spent:
                # Lost (or never could win): say why. Only failures pay for this read.
                row = db.execute(
                    "SELECT used_at, voided_at FROM tokens WHERE token_hash = ?", (token_hash,)
                ).fetchone()
                if row is None:
                    raise TokenRejected("unknown token")
                raise TokenRejected(self._unspent_reason(row[0], row[1]))
            device_id, typ, region = (str(v) for v in spent[0])
            if device_id != certificate.device_id:
                raise TokenRejected("token names another device")
            self._claim_id(db, device_id, role=Role.DEVICE, now=now)
            # A revoked device stays revoked: the conditional DO UPDATE leaves its row alone and
            # returns nothing, which refuses the enrolment (and rolls the token back).
            created = db.execute(
                "INSERT INTO devices (id, type, region, status, created_at)"
                " VALUES (?, ?, ?, 'active', ?)"
                " ON CONFLICT(id) DO UPDATE SET type = excluded.type, region = excluded.region"
                " WHERE devices.status != 'revoked'"
                " RETURNING id, type, region, status, created_at",
                (device_id, typ, region, _ts(now)),
            ).fetchall()
            if not created:
                raise CertificateRevoked(device_id)
            # The identity this enrolment replaces: its certificates that could still be used.
            old = db.execute(
                "UPDATE certificates SET status = 'revoked' WHERE device_id = ?"
                " AND status = 'active' AND not_after > ? RETURNING serial",
                (device_id, _ts(now)),
            ).fetchall()
            replaced = tuple(
                self._record_serial_revocation(
                    db, str(serial), device_id=device_id, reason=_REPLACED_REASON, now=now
                )
                for (serial,) in sorted(old)
            )
            db.execute(
                "INSERT INTO certificates (serial, device_id, not_after, status, issued_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    certificate.serial,
                    device_id,
                    _ts(certificate.not_after),
                    certificate.status.value,
                    _ts(certificate.issued_at),
                ),
            )
            self._bump(db, "fleet")
        return EnrolmentRecord(self._device(created[0]), replaced)

    # -- devices and certificates ----------------------------------------------------------

    def upsert_device(
        self, device_id: str, *, type: str, region: str, now: dt.datetime
    ) -> DeviceRecord:
        validate_id(device_id, kind="device id")
        validate_device_type(type)
        validate_id(region, kind="region")
        with self._write() as db:
            row = db.execute("SELECT status FROM devices WHERE id = ?", (device_id,)).fetchone()
            if row is not None and row[0] == Status.REVOKED:
                raise CertificateRevoked(device_id)
            self._claim_id(db, device_id, role=Role.DEVICE, now=now)
            db.execute(
                "INSERT INTO devices (id, type, region, status, created_at)"
                " VALUES (?, ?, ?, 'active', ?)"
                " ON CONFLICT(id) DO UPDATE SET type = excluded.type, region = excluded.region",
                (device_id, type, region, _ts(now)),
            )
            self._bump(db, "fleet")
        device = self.get_device(device_id)
        if device is None:  # deleted by another process between the two statements
            raise RegistryError(f"device {device_id} vanished from the registry")
        return device

    def get_device(self, device_id: str) -> DeviceRecord | None:
        rows = self._read(
            "SELECT id, type, region, status, created_at FROM devices WHERE id = ?", (device_id,)
        )
        return self._device(rows[0]) if rows else None

    def list_devices(self) -> list[DeviceRecord]:
        rows = self._read("SELECT id, type, region, status, created_at FROM devices ORDER BY id")
        return [self._device(r) for r in rows]

    def fleet_page(
        self,
        *,
        prefix: str = "",
        state: str | None = None,
        limit: int = 50,
        offset: int = 0,
        now: dt.datetime,
    ) -> FleetPage:
        """One page of the fleet for the console: devices whose id starts with ``prefix`` and
        whose state is ``state`` (any when None), ordered by id; ``limit`` rows from
        ``offset``. Three reads: the page, the page's certificates, and one aggregate for the
        counts; none reads the whole certificate table."""
        args = {
            "prefix": _fleet_filter(prefix, state, limit, offset),
            "state": state,
            "now": _ts(now),
            "limit": int(limit),
            "offset": int(offset),
        }
        with self._lock:
            try:
                self._db.execute("BEGIN")  # one snapshot for the three reads
                try:
                    rows = self._db.execute(
                        _sqlite_params(FLEET_PAGE_SQL.replace("{collate}", "")), args
                    ).fetchall()
                    ids = [str(r[0]) for r in rows]
                    # One placeholder per id of the page; the ids are bound.
                    sql = "".join(
                        (
                            "SELECT serial, device_id, not_after, status, issued_at",
                            " FROM certificates WHERE device_id IN (",
                            ", ".join("?" * len(ids)),
                            ")",
                        )
                    )
                    certs = self._db.execute(sql, ids).fetchall()
                    counts = self._db.execute(_sqlite_params(FLEET_COUNTS_SQL), args).fetchone()
                finally:
                    self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise RegistryError(f"registry read failed: {exc}") from exc
        return _fleet_page(rows, certs, counts)

    def fleet_version(self) -> str:
        """Changes whenever what :meth:`fleet_page` shows may have changed (besides the clock
        passing a certificate's expiry): the fleet counter and the revocation sequence."""
        row = self._read(FLEET_VERSION_SQL)[0]
        return f"{int(row[0])}.{int(row[1])}"

    _device = staticmethod(_device_row)

    def record_certificate(self, record: CertificateRecord) -> None:
        try:
            with self._write() as db:
                db.execute(
                    "INSERT INTO certificates (serial, device_id, not_after, status, issued_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        record.serial,
                        record.device_id,
                        _ts(record.not_after),
                        record.status.value,
                        _ts(record.issued_at),
                    ),
                )
                self._bump(db, "fleet")
        except sqlite3.IntegrityError as exc:
            raise RegistryError(f"cannot record certificate {record.serial}: {exc}") from exc

    def record_renewal(self, previous_serial: str, certificate: CertificateRecord) -> None:
        """Record a renewed certificate if its device and ``previous_serial`` still may renew.

        The check and the insert are one transaction (like :meth:`complete_enrolment`), so a
        revocation that lands while the new certificate is being signed either comes first
        (this raises :class:`CertificateRevoked` and the certificate is never handed out) or
        after (it revokes the new certificate with the rest). Raises :class:`InvalidIdentity`
        when the device or the previous serial is unknown or belongs to another device.
        """
        device_id = certificate.device_id
        try:
            with self._write() as db:
                device = db.execute(
                    "SELECT status FROM devices WHERE id = ?", (device_id,)
                ).fetchone()
                if device is None:
                    raise InvalidIdentity(
                        "certificate is not known to the registry; enrol with a token"
                    )
                if device[0] == Status.REVOKED:
                    raise CertificateRevoked(device_id)
                previous = db.execute(
                    "SELECT device_id, status FROM certificates WHERE serial = ?",
                    (previous_serial,),
                ).fetchone()
                if previous is None or previous[0] != device_id:
                    raise InvalidIdentity(
                        "certificate is not known to the registry; enrol with a token"
                    )
                if previous[1] == Status.REVOKED:
                    raise CertificateRevoked(device_id, previous_serial)
                db.execute(
                    "INSERT INTO certificates (serial, device_id, not_after, status, issued_at)"
                    " VALUES (?, ?, ?, 'active', ?)",
                    (
                        certificate.serial,
                        device_id,
                        _ts(certificate.not_after),
                        _ts(certificate.issued_at),
                    ),
                )
                self._bump(db, "fleet")
        except sqlite3.IntegrityError as exc:
            raise RegistryError(f"cannot record certificate {certificate.serial}: {exc}") from exc

    def get_certificate(self, serial: str) -> CertificateRecord | None:
        rows = self._read(
            "SELECT serial, device_id, not_after, status, issued_at FROM certificates"
            " WHERE serial = ?",
            (serial,),
        )
        return self._cert(rows[0]) if rows else None

    def list_certificates(self, device_id: str | None = None) -> list[CertificateRecord]:
        sql = "SELECT serial, device_id, not_after, status, issued_at FROM certificates"
        if device_id is None:
            rows = self._read(sql + " ORDER BY issued_at, serial")
        else:
            rows = self._read(sql + " WHERE device_id = ? ORDER BY issued_at", (device_id,))
        return [self._cert(r) for r in rows]

    _cert = staticmethod(_cert_row)

    # -- server (gateway, core) certificates ------------------------------------------------

    def record_server_certificate(self, record: ServerCertificateRecord) -> None:
        """Record a gateway's or core's certificate, so that it can be revoked later.

        Raises :class:`IdentityConflict` when a device (registered, or named by an unused
        token) or a server of the other role holds the id; ``issued_at`` is the time judged.
        """
        if record.role not in _SERVER_ROLES:
            raise ValueError("device certificates are recorded by enrolment, not here")
        validate_id(record.server_id, kind=f"{record.role.value} id")
        try:
            with self._write() as db:
                self._claim_id(db, record.server_id, role=record.role, now=record.issued_at)
                db.execute(
                    "INSERT INTO server_certificates"
                    " (serial, role, server_id, not_after, status, issued_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        record.serial,
                        record.role.value,
                        record.server_id,
                        _ts(record.not_after),
                        record.status.value,
                        _ts(record.issued_at),
                    ),
                )
        except sqlite3.IntegrityError as exc:
            raise RegistryError(f"cannot record certificate {record.serial}: {exc}") from exc

    def get_server_certificate(self, serial: str) -> ServerCertificateRecord | None:
        rows = self._read(
            "SELECT serial, role, server_id, not_after, status, issued_at"
            " FROM server_certificates WHERE serial = ?",
            (_canonical_serial(serial),),
        )
        return self._server(rows[0]) if rows else None

    def list_server_certificates(
        self, role: Role | None = None, server_id: str | None = None
    ) -> list[ServerCertificateRecord]:
        # NULL parameters match everything: one fixed statement, no SQL built from input.
        rows = self._read(
            "SELECT serial, role, server_id, not_after, status, issued_at"
            " FROM server_certificates"
            " WHERE (?1 IS NULL OR role = ?1) AND (?2 IS NULL OR server_id = ?2)"
            " ORDER BY role, server_id, issued_at, serial",
            (None if role is None else Role(role).value, server_id),
        )
        return [self._server(r) for r in rows]

    _server = staticmethod(_server_row)

    # -- revocation ------------------------------------------------------------------------

    def revoke_device(self, device_id: str, *, reason: str, now: dt.datetime) -> RevocationRecord:
        """Revoke a device and every certificate it holds; the next sequence number is its."""
        validate_id(device_id, kind="device id")
        reason = _clean_reason(reason)
        with self._write() as db:
            row = db.execute("SELECT status FROM devices WHERE id = ?", (device_id,)).fetchone()
            if row is None:
                raise RegistryError(f"no device {device_id} in the registry")
            db.execute("UPDATE devices SET status = 'revoked' WHERE id = ?", (device_id,))
            db.execute(
                "UPDATE certificates SET status = 'revoked' WHERE device_id = ?", (device_id,)
            )
            # Pending tokens of a revoked device must not enrol it again.
            db.execute(
                "UPDATE tokens SET used_at = ? WHERE device_id = ? AND used_at IS NULL",
                (_ts(now), device_id),
            )
            cur = db.execute(
                "INSERT INTO revocations (device_id, serial, reason, revoked_at)"
                " VALUES (?, NULL, ?, ?)",
                (device_id, reason, _ts(now)),
            )
            seq = int(cur.lastrowid or 0)
        return RevocationRecord(seq, device_id, None, reason, now)

    def revoke_serial(self, serial: str, *, reason: str, now: dt.datetime) -> RevocationRecord:
        """Revoke one certificate, a device's or a server's; its owner keeps its others."""
        serial = _canonical_serial(serial)
        reason = _clean_reason(reason)
        with self._write() as db:
            row = db.execute(
                "SELECT device_id FROM certificates WHERE serial = ?", (serial,)
            ).fetchone()
            if row is not None:
                db.execute("UPDATE certificates SET status = 'revoked' WHERE serial = ?", (serial,))
                return self._record_serial_revocation(
                    db, serial, device_id=str(row[0]), reason=reason, now=now
                )
            server = db.execute(
                "SELECT role, server_id FROM server_certificates WHERE serial = ?", (serial,)
            ).fetchone()
            if server is None:
                raise RegistryError(f"no certificate with serial {serial} in the registry")
            return self._revoke_server_serial(
                db,
                serial,
                role=Role(str(server[0])),
                server_id=str(server[1]),
                reason=reason,
                now=now,
            )

    def revoke_server(
        self, role: Role, server_id: str, *, reason: str, now: dt.datetime
    ) -> list[RevocationRecord]:
        """Revoke every certificate recorded for a gateway or core; one record per serial.

        Certificates already revoked are left as they are (and not listed). Raises
        :class:`RegistryError` when the registry knows no certificate of that server.
        """
        role = Role(role)
        if role not in _SERVER_ROLES:
            raise ValueError("revoke devices with revoke_device")
        validate_id(server_id, kind=f"{role.value} id")
        reason = _clean_reason(reason)
        with self._write() as db:
            rows = db.execute(
                "SELECT serial, status FROM server_certificates WHERE role = ? AND server_id = ?"
                " ORDER BY issued_at, serial",
                (role.value, server_id),
            ).fetchall()
            if not rows:
                raise RegistryError(f"no certificate of {role.value} {server_id} in the registry")
            return [
                self._revoke_server_serial(
                    db, str(serial), role=role, server_id=server_id, reason=reason, now=now
                )
                for serial, status in rows
                if status != Status.REVOKED
            ]

    @staticmethod
    def _record_serial_revocation(
        db: sqlite3.Connection, serial: str, *, device_id: str, reason: str, now: dt.datetime
    ) -> RevocationRecord:
        """The revocation entry (next sequence number) of one device certificate."""
        cur = db.execute(
            "INSERT INTO revocations (device_id, serial, reason, revoked_at) VALUES (?, ?, ?, ?)",
            (device_id, serial, reason, _ts(now)),
        )
        return RevocationRecord(int(cur.lastrowid or 0), device_id, serial, reason, now)

    @staticmethod
    def _revoke_server_serial(
        db: sqlite3.Connection,
        serial: str,
        *,
        role: Role,
        server_id: str,
        reason: str,
        now: dt.datetime,
    ) -> RevocationRecord:
        db.execute("UPDATE server_certificates SET status = 'revoked' WHERE serial = ?", (serial,))
        cur = db.execute(
            "INSERT INTO revocations (device_id, serial, reason, revoked_at, role)"
            " VALUES (?, ?, ?, ?, ?)",
            (server_id, serial, reason, _ts(now), role.value),
        )
        return RevocationRecord(int(cur.lastrowid or 0), server_id, serial, reason, now, role)

    def revocations_since(self, sequence: int, *, limit: int = 1000) -> list[RevocationRecord]:
        rows = self._read(
            "SELECT sequence, device_id, serial, reason, revoked_at, role FROM revocations"
            " WHERE sequence > ? ORDER BY sequence LIMIT ?",
            (int(sequence), int(limit)),
        )
        return [
            RevocationRecord(
                int(q),
                str(d),
                None if s is None else str(s),
                str(r),
                _dt(float(at)),
                Role(str(role)),
            )
            for q, d, s, r, at, role in rows
        ]

    def last_sequence(self) -> int:
        rows = self._read("SELECT COALESCE(MAX(sequence), 0) FROM revocations")
        return int(rows[0][0])

    def revoked_serials(self) -> list[tuple[str, dt.datetime]]:
        """Every revoked certificate with the time its revocation was recorded (for the CRL).

        Every certificate of a revoked device is listed whatever its own status says, so a
        certificate recorded after the device's revocation can never be missing; revoked
        gateway and core certificates are listed too.
        """
        rows = self._read(
            "SELECT c.serial, COALESCE("
            "  (SELECT MIN(r.revoked_at) FROM revocations r WHERE r.serial = c.serial),"
            "  (SELECT MIN(r.revoked_at) FROM revocations r"
            "    WHERE r.device_id = c.device_id AND r.serial IS NULL AND r.role = 'device'),"
            "  c.issued_at)"
            " FROM certificates c WHERE c.status = 'revoked'"
            "  OR c.device_id IN (SELECT id FROM devices WHERE status = 'revoked')"
            " UNION ALL "
            "SELECT s.serial, COALESCE("
            "  (SELECT MIN(r.revoked_at) FROM revocations r WHERE r.serial = s.serial),"
            "  s.issued_at)"
            " FROM server_certificates s WHERE s.status = 'revoked'"
            " UNION ALL "
            "SELECT o.serial, COALESCE("
            "  (SELECT MIN(r.revoked_at) FROM revocations r WHERE r.serial = o.serial),"
            "  o.issued_at)"
            " FROM operator_certificates o WHERE o.status = 'revoked'"
            " ORDER BY 1"
        )
        return [(str(s), _dt(float(at))) for s, at in rows]

    def is_revoked(self, device_id: str, serial: str | None = None) -> bool:
        rows = self._read("SELECT status FROM devices WHERE id = ?", (device_id,))
        if rows and rows[0][0] == Status.REVOKED:
            return True
        if serial is not None:
            rows = self._read("SELECT status FROM certificates WHERE serial = ?", (serial,))
            return bool(rows) and rows[0][0] == Status.REVOKED
        return False

    def _bump(self, db: sqlite3.Connection, name: str) -> int:
        row = db.execute(
            "INSERT INTO counters (name, value) VALUES (?, 1)"
            " ON CONFLICT(name) DO UPDATE SET value = value + 1 RETURNING value",
            (name,),
        ).fetchone()
        return int(row[0])

    def next_crl_number(self) -> int:
        """A CRL number greater than every one handed out before (RFC 5280 §5.2.3)."""
        with self._write() as db:
            return self._bump(db, "crl_number")

    # -- gateway directory -----------------------------------------------------------------

    def upsert_gateway(self, record: GatewayRecord) -> int:
        """Add or update a gateway entry; returns the new directory version."""
        validate_id(record.id, kind="gateway id")
        validate_id(record.region, kind="region")
        with self._write() as db:
            row = db.execute(
                "SELECT region, grpc_address, mqtt_address FROM gateways WHERE id = ?",
                (record.id,),
            ).fetchone()
            if row == (record.region, record.grpc_address, record.mqtt_address):
                cur = db.execute("SELECT value FROM counters WHERE name = 'directory'")
                found = cur.fetchone()
                return int(found[0]) if found else 0
            db.execute(
                "INSERT INTO gateways (id, region, grpc_address, mqtt_address, updated_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET region = excluded.region,"
                " grpc_address = excluded.grpc_address, mqtt_address = excluded.mqtt_address,"
                " updated_at = excluded.updated_at",
                (
                    record.id,
                    record.region,
                    record.grpc_address,
                    record.mqtt_address,
                    _ts(record.updated_at),
                ),
            )
            return self._bump(db, "directory")

    def list_gateways(self) -> list[GatewayRecord]:
        rows = self._read(
            "SELECT id, region, grpc_address, mqtt_address, updated_at FROM gateways ORDER BY id"
        )
        return [
            GatewayRecord(str(i), str(r), str(g), str(m), _dt(float(u))) for i, r, g, m, u in rows
        ]

    def directory_version(self) -> int:
        rows = self._read("SELECT value FROM counters WHERE name = 'directory'")
        return int(rows[0][0]) if rows else 0


def open_registry(target: str | Path) -> CoreRegistry:
    """The registry ``target`` names: a PostgreSQL URL (``postgresql://…``, ``postgres://…``),
    an SQLite URL (``sqlite:///path``) or a file path (SQLite).

    The PostgreSQL backend is imported only here, so installs without a database driver
    (devices) never need it. Raises :class:`RegistryError` for another URL scheme; no error
    carries the URL's password.
    """
    if isinstance(target, Path):
        return SqliteRegistry(target)
    text = str(target).strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        return SqliteRegistry(Path(text))
    scheme = scheme.lower()
    if scheme in {"postgresql", "postgres"}:
        from pki._registry_pg import PostgresRegistry

        return PostgresRegistry(text)
    if scheme == "sqlite":
        path = rest.removeprefix("/") if rest.startswith("//") else rest
        if not path:
            raise RegistryError("sqlite:// needs a path: sqlite:///var/lib/edgeward/registry")
        return SqliteRegistry(Path(path))
    raise RegistryError(
        f"unsupported registry URL scheme {scheme!r}: use a file path, sqlite:///PATH "
        "or postgresql://USER@HOST/DB"
    )


def is_postgres_url(target: str | Path | None) -> bool:
    """Whether ``target`` names a PostgreSQL registry."""
    if target is None or isinstance(target, Path):
        return False
    return str(target).strip().lower().startswith(("postgresql://", "postgres://"))


def redacted_url(url: str) -> str:
    """``url`` with its password (in the user part or a ``password=`` parameter) replaced by
    ``***``: the only form of a registry URL that is logged or printed."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            host = parts.hostname or ""
            host = f"[{host}]" if ":" in host else host
            netloc = f"{parts.username or ''}:***@{host}"
            if parts.port is not None:
                netloc += f":{parts.port}"
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if any(k.lower() == "password" for k, _ in query):
            query = [(k, "***" if k.lower() == "password" else v) for k, v in query]
            new_query = urllib.parse.urlencode(query, safe="*")
        else:
            new_query = parts.query
    except ValueError:
        return "<unparsable URL>"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=new_query))
