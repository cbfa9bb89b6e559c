"""The registry on PostgreSQL, for a core replicated over several processes or machines.

:class:`PostgresRegistry` implements :class:`pki.Registry` and :class:`pki.OperatorRegistry`
(the console's operators) with the guarantees :class:`pki.SqliteRegistry` documents, shared
by every replica that opens the same database:

* **One writer at a time.** Every write transaction first takes one transaction-scoped
  advisory lock (``pg_advisory_xact_lock``), the counterpart of SQLite's ``BEGIN IMMEDIATE``.
  The checks a write makes (one id namespace across roles, a revoked device stays revoked) and
  the rows it adds are therefore atomic with respect to every other replica, and reads after
  the lock see every earlier commit (READ COMMITTED takes a snapshot per statement). Reads take
  no lock. Certificates are signed before the transaction, so the lock is held for a few
  statements only.
* **Single-use tokens.** ``UPDATE … WHERE used_at IS NULL … RETURNING`` decides among
  concurrent enrolments (or console logins) with one token, on any replica: only the one that
  changed the row wins.
* **A gap-free revocation sequence in commit order.** A gateway resumes its feed with "every
  revocation after ``n``"; a PostgreSQL ``SEQUENCE`` would not do, because numbers are taken at
  insert time, not commit time (a reader could see 6 committed before 5 and never ask for 5
  again) and a rolled-back transaction leaves a gap. The next number comes from the
  ``counters`` row ``revocation_sequence``, bumped under the writer lock in the transaction that
  inserts the revocation, so numbers become visible strictly in order, each exactly once.
* **Pushed revocations.** The same transaction sends ``NOTIFY edgeward_revocations``; PostgreSQL
  delivers it at commit, to every replica listening (:meth:`PostgresRegistry.watch_revocations`).
  A listener that lost its connection reports a change when it is back, so its reader re-reads.
* **Global counters.** The CRL number and the gateway directory version are ``counters`` rows,
  bumped under the same lock: the same on every replica.

Schema changes are numbered migrations (:mod:`pki._registry_pg_schema`); every start applies
the missing ones under a session advisory lock, so replicas starting together apply each once.

Times are stored as UTC POSIX seconds (``double precision``), as in SQLite, so that a
registry moves between the two without conversion (``edgeward pki migrate``).

psycopg 3 rather than asyncpg: the ``Registry`` interface is synchronous and called from worker
threads (``asyncio.to_thread``) and from the ``edgeward pki`` commands; psycopg 3 has a
synchronous API, a thread-safe connection pool (psycopg_pool), LISTEN/NOTIFY and COPY, and is
the maintained successor of psycopg2.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pki._names import Role, validate_device_type, validate_id
from pki._registry import (
    _REPLACED_REASON,
    _SERVER_ROLES,
    FLEET_COUNTS_SQL,
    FLEET_PAGE_SQL,
    FLEET_VERSION_SQL,
    CertificateRecord,
    DeviceRecord,
    EnrolmentRecord,
    FleetPage,
    GatewayRecord,
    OperatorRecord,
    OperatorRole,
    RevocationRecord,
    ServerCertificateRecord,
    Status,
    TokenRecord,
    _canonical_serial,
    _cert_row,
    _clean_reason,
    _device_row,
    _dt,
    _fleet_filter,
    _fleet_page,
    _operator_row,
    _server_row,
    _ts,
    _unspent_reason,
    redacted_url,
)
from pki._registry_pg_schema import apply_migrations
from pki.errors import (
    CertificateRevoked,
    IdentityConflict,
    InvalidIdentity,
    LastAdmin,
    RegistryError,
    RegistryUnavailable,
    TokenRejected,
)

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

__all__ = ["NOTIFY_CHANNEL", "PostgresRegistry"]

#: The channel every revocation is announced on (payload: its sequence number).
NOTIFY_CHANNEL = "edgeward_revocations"
# The writer lock: an advisory lock key (64-bit, arbitrary but fixed).
_WRITE_LOCK = 0x6564_6765_7761_7201


def _error(what: str, exc: BaseException) -> RegistryError:
    """The registry error for a driver or pool error: :class:`RegistryUnavailable` when the
    database could not be reached (a lost connection, a pool that found none), so callers can
    retry elsewhere."""
    # psycopg's messages name the server, never the password; keep the first line only.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    import psycopg
    import psycopg_pool

    unreachable = (psycopg.OperationalError, psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed)
    if isinstance(exc, unreachable) and not isinstance(exc, psycopg.errors.QueryCanceled):
        return RegistryUnavailable(f"{what}: {text}")
    return RegistryError(f"{what}: {text}")


class PostgresRegistry:
    """The registry in a PostgreSQL database shared by every core replica.

    ``url`` is a libpq URL (``postgresql://user:password@host:port/db?sslmode=verify-full``).
    A pool of up to ``pool_size`` connections serves every thread of the process; a connection
    found broken (a restarted server) is replaced before use. Errors are :class:`RegistryError`
    and never carry the password.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 8,
        connect_timeout_s: float = 5.0,
        application_name: str = "edgeward",
    ) -> None:
        try:
            import psycopg
            import psycopg_pool
        except ImportError as exc:  # a device install has no database driver
            raise RegistryError(
                "a PostgreSQL registry needs psycopg: pip install 'edgeward[gateway]'"
            ) from exc
        self._psycopg = psycopg
        self.url = url
        self._kwargs: dict[str, Any] = {
            "connect_timeout": max(1, round(connect_timeout_s)),
            "application_name": application_name,
            # A silent network loss must not leave the listener waiting on a dead socket.
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        }
        self._listeners: list[Callable[[], None]] = []
        self._listen_lock = threading.Lock()
        self._listen_thread: threading.Thread | None = None
        self._closing = threading.Event()
        # One direct connection first: a clear error (refused, unknown database, bad
        # password) at once instead of a pool timeout, and the migrations run on it.
        try:
            with psycopg.connect(url, **self._kwargs) as conn:
                apply_migrations(conn)
        except psycopg.Error as exc:
            raise _error(f"cannot open registry {redacted_url(url)}", exc) from None
        try:
            self._pool: psycopg_pool.ConnectionPool[psycopg.Connection[tuple[Any, ...]]] = (
                psycopg_pool.ConnectionPool(
                    url,
                    min_size=1,
                    max_size=max(1, pool_size),
                    kwargs=self._kwargs,
                    check=psycopg_pool.ConnectionPool.check_connection,
                    timeout=connect_timeout_s,
                    open=False,
                    name="edgeward-registry",
                )
            )
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise _error(f"cannot open registry {redacted_url(url)}", exc) from None

    def __repr__(self) -> str:
        return f"PostgresRegistry({redacted_url(self.url)!r})"

    # -- lifecycle -------------------------------------------------------------------------

    def schema_version(self) -> int:
        rows = self._read("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        return int(rows[0][0])

    def close(self) -> None:
        self._closing.set()
        thread = self._listen_thread
        if thread is not None:
            thread.join(timeout=5)
        self._pool.close()

    def __enter__(self) -> PostgresRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(
        self, what: str = "registry write failed"
    ) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """A transaction holding the registry's one writer lock until it ends; a database
        error (a duplicate serial, a lost connection) becomes :class:`RegistryError` ``what``.
        """
        psycopg = self._psycopg
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
                yield conn
        except psycopg.Error as exc:
            raise _error(what, exc) from None
        except self._pool_errors() as exc:
            raise _error("registry is unreachable", exc) from None

    def _pool_errors(self) -> tuple[type[BaseException], ...]:
        import psycopg_pool

        return (psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed)

    def _read(self, sql: str, args: Sequence[object] | dict[str, object] = ()) -> list[Any]:
        psycopg = self._psycopg
        try:
            with self._pool.connection() as conn:
                return list(conn.execute(sql, args).fetchall())
        except psycopg.Error as exc:
            raise _error("registry read failed", exc) from None
        except self._pool_errors() as exc:
            raise _error("registry is unreachable", exc) from None

    # -- pushed revocations ----------------------------------------------------------------

    def watch_revocations(self, callback: Callable[[], None]) -> Callable[[], None] | None:
        """Call ``callback`` (from a listener thread) after every committed revocation.

        One ``LISTEN`` connection per registry serves every callback; each time it (re)connects
        every callback is called once, since what was committed before it listened was never
        announced to it (a restarted server). Returns a function that removes ``callback``,
        which must be quick and thread-safe (``loop.call_soon_threadsafe``).
        """
        with self._listen_lock:
            self._listeners.append(callback)
            if self._listen_thread is None:
                self._listen_thread = threading.Thread(
                    target=self._listen, name="registry-listen", daemon=True
                )
                self._listen_thread.start()

        def remove() -> None:
            with self._listen_lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return remove

    def _notify_listeners(self) -> None:
        with self._listen_lock:
            callbacks = list(self._listeners)
        for callback in callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001, S112 - one bad listener must not stop the others
                continue

    def _listen(self) -> None:
        psycopg = self._psycopg
        backoff = 0.1
        while not self._closing.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, **self._kwargs) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    # Listening from here on; what was committed before (while connecting, or
                    # while the server was away) was not announced to us: re-read once.
                    self._notify_listeners()
                    backoff = 0.1
                    while not self._closing.is_set() and not conn.closed:
                        # Each notification at once: the generator itself runs until its
                        # timeout, which only bounds how late close() is noticed.
                        for _ in conn.notifies(timeout=0.5):
                            self._notify_listeners()
            except psycopg.Error:
                pass
            if self._closing.wait(backoff):
                return
            backoff = min(backoff * 2, 2.0)

    @staticmethod
    def _announce(conn: psycopg.Connection[Any], sequence: int) -> None:
        # Delivered at commit, to every listening replica; never if the transaction rolls back.
        conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(sequence)))

    # -- one id namespace across roles ----------------------------------------------------

    @staticmethod
    def _claim_id(conn: psycopg.Connection[Any], id: str, *, role: Role, now: dt.datetime) -> None:
        """Raise :class:`IdentityConflict` when a role other than ``role`` holds ``id``
        (inside the caller's write transaction, under the writer lock)."""
        server = conn.execute(
            "SELECT role FROM server_certificates WHERE server_id = %s AND role != %s LIMIT 1",
            (id, role.value),
        ).fetchone()
        if server is not None:
            raise IdentityConflict(id, holder=str(server[0]), wanted=role.value)
        if (
            role is not Role.GATEWAY
            and conn.execute("SELECT 1 FROM gateways WHERE id = %s", (id,)).fetchone()
        ):
            raise IdentityConflict(id, holder=Role.GATEWAY.value, wanted=role.value)
        if (
            role is not Role.OPERATOR
            and conn.execute("SELECT 1 FROM operators WHERE id = %s", (id,)).fetchone()
        ):
            raise IdentityConflict(id, holder=Role.OPERATOR.value, wanted=role.value)
        if role is Role.DEVICE:
            return
        if conn.execute("SELECT 1 FROM devices WHERE id = %s", (id,)).fetchone():
            raise IdentityConflict(id, holder=Role.DEVICE.value, wanted=role.value)
        if conn.execute(
            "SELECT 1 FROM tokens WHERE device_id = %s AND used_at IS NULL"
            " AND voided_at IS NULL AND expires_at > %s LIMIT 1",
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
        its role) in the same transaction (see :meth:`pki.SqliteRegistry.create_operator_token`):
        :class:`IdentityConflict` when a device, gateway or core holds the id,
        :class:`RegistryError` when the operator is revoked. Earlier unused tokens of the
        operator stay valid until used or expired, as in SQLite."""
        validate_id(operator_id, kind="operator name")
        role = OperatorRole(role)
        with self._write("cannot store operator token") as conn:
            self._claim_id(conn, operator_id, role=Role.OPERATOR, now=now)
            row = conn.execute(
                "SELECT status FROM operators WHERE id = %s", (operator_id,)
            ).fetchone()
            if row is not None and row[0] == Status.REVOKED:
                raise RegistryError(f"operator {operator_id} is revoked")
            conn.execute(
                "INSERT INTO operators (id, role, status, created_at)"
                " VALUES (%s, %s, 'active', %s)"
                " ON CONFLICT (id) DO UPDATE SET role = excluded.role",
                (operator_id, role.value, _ts(now)),
            )
            conn.execute(
                "INSERT INTO operator_tokens (token_hash, operator_id, expires_at, used_at,"
                " created_at) VALUES (%s, %s, %s, NULL, %s)",
                (token_hash, operator_id, _ts(expires_at), _ts(now)),
            )

    def consume_operator_token(self, token_hash: str, *, now: dt.datetime) -> OperatorRecord:
        """Spend a login token and return its operator; single use across every replica (the
        conditional ``UPDATE … RETURNING`` under the writer lock decides).
        :class:`TokenRejected` for an unknown, used or expired token or a revoked operator."""
        with self._write() as conn:
            spent = conn.execute(
                "UPDATE operator_tokens SET used_at = %s WHERE token_hash = %s"
                " AND used_at IS NULL AND expires_at > %s RETURNING operator_id",
                (_ts(now), token_hash, _ts(now)),
            ).fetchall()
            row = None
            if not spent:
                row = conn.execute(
                    "SELECT used_at FROM operator_tokens WHERE token_hash = %s", (token_hash,)
                ).fetchone()
        if not spent:
            if row is None:
                raise TokenRejected("unknown token")
            raise TokenRejected(self._unspent_reason(row[0], None))
        operator = self.get_operator(str(spent[0][0]))
        if operator is None or operator.status is not Status.ACTIVE:
            raise TokenRejected("operator is revoked")
        return operator

    def get_operator(self, operator_id: str) -> OperatorRecord | None:
        rows = self._read(
            "SELECT id, role, status, created_at FROM operators WHERE id = %s", (operator_id,)
        )
        return self._operator(rows[0]) if rows else None

    def list_operators(self) -> list[OperatorRecord]:
        rows = self._read("SELECT id, role, status, created_at FROM operators ORDER BY id")
        return [self._operator(r) for r in rows]

    _operator = staticmethod(_operator_row)

    def record_operator_certificate(
        self, serial: str, *, operator_id: str, not_after: dt.datetime, now: dt.datetime
    ) -> None:
        """See :meth:`pki.SqliteRegistry.record_operator_certificate`."""
        validate_id(operator_id, kind="operator name")
        with self._write(f"cannot record certificate {serial}") as conn:
            row = conn.execute(
                "SELECT status FROM operators WHERE id = %s", (operator_id,)
            ).fetchone()
            if row is None or row[0] != Status.ACTIVE:
                raise RegistryError(f"operator {operator_id} is not registered or revoked")
            conn.execute(
                "INSERT INTO operator_certificates"
                " (serial, operator_id, not_after, status, issued_at)"
                " VALUES (%s, %s, %s, 'active', %s)",
                (_canonical_serial(serial), operator_id, _ts(not_after), _ts(now)),
            )

    def revoke_operator(
        self, operator_id: str, *, reason: str, now: dt.datetime, force: bool = False
    ) -> list[RevocationRecord]:
        """See :meth:`pki.SqliteRegistry.revoke_operator`; under the writer lock, so the
        last-admin check and the revocation are one step on every replica."""
        validate_id(operator_id, kind="operator name")
        reason = _clean_reason(reason)
        with self._write() as conn:
            row = conn.execute(
                "SELECT role, status FROM operators WHERE id = %s", (operator_id,)
            ).fetchone()
            if row is None:
                raise RegistryError(f"no operator {operator_id} in the registry")
            if row[1] == Status.REVOKED:
                raise RegistryError(f"operator {operator_id} is already revoked")
            if row[0] == OperatorRole.ADMIN and not force:
                others = conn.execute(
                    "SELECT COUNT(*) FROM operators WHERE role = 'admin' AND status = 'active'"
                    " AND id != %s",
                    (operator_id,),
                ).fetchone()
                if others is None or int(others[0]) == 0:
                    raise LastAdmin(operator_id)
            conn.execute("UPDATE operators SET status = 'revoked' WHERE id = %s", (operator_id,))
            conn.execute(
                "UPDATE operator_tokens SET used_at = %s WHERE operator_id = %s"
                " AND used_at IS NULL",
                (_ts(now), operator_id),
            )
            serials = conn.execute(
                "UPDATE operator_certificates SET status = 'revoked' WHERE operator_id = %s"
                " AND status = 'active' RETURNING serial",
                (operator_id,),
            ).fetchall()
            return [
                self._insert_revocation(
                    conn,
                    device_id=operator_id,
                    serial=serial,
                    reason=reason,
                    now=now,
                    role=Role.OPERATOR,
                )
                for serial in [None, *sorted(str(s) for (s,) in serials)]
            ]

    # -- tokens ---------------------------------------------------------------------------

    def create_token(self, record: TokenRecord, *, now: dt.datetime) -> int:
        """Store a new token (its hash) and void the device's earlier unused ones; returns how
        many were voided (see :meth:`pki.SqliteRegistry.create_token`)."""
        validate_id(record.device_id, kind="device id")
        validate_device_type(record.type)
        validate_id(record.region, kind="region")
        with self._write("cannot store token") as conn:
            row = conn.execute(
                "SELECT status FROM devices WHERE id = %s", (record.device_id,)
            ).fetchone()
            if row is not None and row[0] == Status.REVOKED:
                raise RegistryError(
                    f"device {record.device_id} is revoked; enrol the hardware under a new id"
                )
            self._claim_id(conn, record.device_id, role=Role.DEVICE, now=now)
            voided = conn.execute(
                "UPDATE tokens SET voided_at = %s WHERE device_id = %s AND used_at IS NULL"
                " AND voided_at IS NULL AND expires_at > %s",
                (_ts(now), record.device_id, _ts(now)),
            ).rowcount
            conn.execute(
                "INSERT INTO tokens (token_hash, device_id, type, region, expires_at,"
                " used_at, created_at) VALUES (%s, %s, %s, %s, %s, NULL, %s)",
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
            " FROM tokens WHERE token_hash = %s",
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
        """Mark the token used and return what it grants, or raise :class:`TokenRejected`;
        single use across every replica (the conditional UPDATE decides)."""
        with self._write() as conn:
            won = (
                conn.execute(
                    "UPDATE tokens SET used_at = %s WHERE token_hash = %s AND used_at IS NULL"
                    " AND voided_at IS NULL AND expires_at > %s",
                    (_ts(now), token_hash, _ts(now)),
                ).rowcount
                == 1
            )
        record = self.get_token(token_hash)
        if record is None:
            raise TokenRejected("unknown token")
        if not won:
            raise TokenRejected(self._unspent_reason(record.used_at, record.voided_at))
        return record

    def complete_enrolment(
        self, token_hash: str, *, certificate: CertificateRecord, now: dt.datetime
    ) -> EnrolmentRecord:
        """Spend the token, register the device, revoke the certificates the new one replaces
        and record it, all or nothing (see :meth:`pki.SqliteRegistry.complete_enrolment`)."""
        with self._write(f"cannot record certificate {certificate.serial}") as conn:
            spent = conn.execute(
                "UPDATE tokens SET used_at = %s WHERE token_hash = %s AND used_at IS NULL"
                " AND voided_at IS NULL AND expires_at > %s"
                " RETURNING device_id, type, region",
                (_ts(now), token_hash, _ts(now)),
            ).fetchall()
            if not spent:
                row = conn.execute(
                    "SELECT used_at, voided_at FROM tokens WHERE token_hash = %s",
                    (token_hash,),
                ).fetchone()
                if row is None:
                    raise TokenRejected("unknown token")
                raise TokenRejected(self._unspent_reason(row[0], row[1]))
            device_id, typ, region = (str(v) for v in spent[0])
            if device_id != certificate.device_id:
                raise TokenRejected("token names another device")
            self._claim_id(conn, device_id, role=Role.DEVICE, now=now)
            created = conn.execute(
                "INSERT INTO devices (id, type, region, status, created_at)"
                " VALUES (%s, %s, %s, 'active', %s)"
                " ON CONFLICT (id) DO UPDATE SET type = excluded.type,"
                " region = excluded.region WHERE devices.status != 'revoked'"
                " RETURNING id, type, region, status, created_at",
                (device_id, typ, region, _ts(now)),
            ).fetchall()
            if not created:
                raise CertificateRevoked(device_id)
            old = conn.execute(
                "UPDATE certificates SET status = 'revoked' WHERE device_id = %s"
                " AND status = 'active' AND not_after > %s RETURNING serial",
                (device_id, _ts(now)),
            ).fetchall()
            replaced = tuple(
                self._insert_revocation(
                    conn,
                    device_id=device_id,
                    serial=str(serial),
                    reason=_REPLACED_REASON,
                    now=now,
                )
                for (serial,) in sorted(old)
            )
            conn.execute(
                "INSERT INTO certificates (serial, device_id, not_after, status, issued_at)"
                " VALUES (%s, %s, %s, %s, %s)",
                (
                    certificate.serial,
                    device_id,
                    _ts(certificate.not_after),
                    certificate.status.value,
                    _ts(certificate.issued_at),
                ),
            )
            self._bump(conn, "fleet")
        return EnrolmentRecord(self._device(created[0]), replaced)

    # -- devices and certificates ----------------------------------------------------------

    def upsert_device(
        self, device_id: str, *, type: str, region: str, now: dt.datetime
    ) -> DeviceRecord:
        validate_id(device_id, kind="device id")
        validate_device_type(type)
        validate_id(region, kind="region")
        with self._write() as conn:
            row = conn.execute("SELECT status FROM devices WHERE id = %s", (device_id,)).fetchone()
            if row is not None and row[0] == Status.REVOKED:
                raise CertificateRevoked(device_id)
            self._claim_id(conn, device_id, role=Role.DEVICE, now=now)
            created = conn.execute(
                "INSERT INTO devices (id, type, region, status, created_at)"
                " VALUES (%s, %s, %s, 'active', %s)"
                " ON CONFLICT (id) DO UPDATE SET type = excluded.type, region = excluded.region"
                " RETURNING id, type, region, status, created_at",
                (device_id, type, region, _ts(now)),
            ).fetchall()
            self._bump(conn, "fleet")
        return self._device(created[0])

    def get_device(self, device_id: str) -> DeviceRecord | None:
        rows = self._read(
            "SELECT id, type, region, status, created_at FROM devices WHERE id = %s", (device_id,)
        )
        return self._device(rows[0]) if rows else None

    def list_devices(self) -> list[DeviceRecord]:
        rows = self._read("SELECT id, type, region, status, created_at FROM devices ORDER BY id")
        return [self._device(r) for r in rows]

    _device = staticmethod(_device_row)

    def fleet_page(
        self,
        *,
        prefix: str = "",
        state: str | None = None,
        limit: int = 50,
        offset: int = 0,
        now: dt.datetime,
    ) -> FleetPage:
        """One page of the fleet (see :meth:`pki.SqliteRegistry.fleet_page`), read in one
        REPEATABLE READ snapshot; ids ordered byte-wise (``COLLATE "C"``) as in SQLite."""
        args: dict[str, object] = {
            "prefix": _fleet_filter(prefix, state, limit, offset),
            "state": state,
            "now": _ts(now),
            "limit": int(limit),
            "offset": int(offset),
        }
        psycopg = self._psycopg
        try:
            with self._pool.connection() as conn:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                rows = conn.execute(
                    FLEET_PAGE_SQL.replace("{collate}", 'COLLATE "C"'), args
                ).fetchall()
                certs = conn.execute(
                    "SELECT serial, device_id, not_after, status, issued_at FROM certificates"
                    " WHERE device_id = ANY(%s)",
                    ([str(r[0]) for r in rows],),
                ).fetchall()
                counts = conn.execute(FLEET_COUNTS_SQL, args).fetchone()
        except psycopg.Error as exc:
            raise _error("registry read failed", exc) from None
        except self._pool_errors() as exc:
            raise _error("registry is unreachable", exc) from None
        assert counts is not None  # noqa: S101 - an aggregate always has a row
        return _fleet_page(rows, certs, counts)

    def fleet_version(self) -> str:
        """See :meth:`pki.SqliteRegistry.fleet_version`."""
        row = self._read(FLEET_VERSION_SQL)[0]
        return f"{int(row[0])}.{int(row[1])}"

    def record_certificate(self, record: CertificateRecord) -> None:
        with self._write(f"cannot record certificate {record.serial}") as conn:
            conn.execute(
                "INSERT INTO certificates (serial, device_id, not_after, status, issued_at)"
                " VALUES (%s, %s, %s, %s, %s)",
                (
                    record.serial,
                    record.device_id,
                    _ts(record.not_after),
                    record.status.value,
                    _ts(record.issued_at),
                ),
            )
            self._bump(conn, "fleet")

    def record_renewal(self, previous_serial: str, certificate: CertificateRecord) -> None:
        """Record a renewed certificate if its device and ``previous_serial`` still may renew
        (see :meth:`pki.SqliteRegistry.record_renewal`)."""
        device_id = certificate.device_id
        with self._write(f"cannot record certificate {certificate.serial}") as conn:
            device = conn.execute(
                "SELECT status FROM devices WHERE id = %s", (device_id,)
            ).fetchone()
            if device is None:
                raise InvalidIdentity(
                    "certificate is not known to the registry; enrol with a token"
                )
            if device[0] == Status.REVOKED:
                raise CertificateRevoked(device_id)
            previous = conn.execute(
                "SELECT device_id, status FROM certificates WHERE serial = %s",
                (previous_serial,),
            ).fetchone()
            if previous is None or previous[0] != device_id:
                raise InvalidIdentity(
                    "certificate is not known to the registry; enrol with a token"
                )
            if previous[1] == Status.REVOKED:
                raise CertificateRevoked(device_id, previous_serial)
            conn.execute(
                "INSERT INTO certificates (serial, device_id, not_after, status, issued_at)"
                " VALUES (%s, %s, %s, 'active', %s)",
                (
                    certificate.serial,
                    device_id,
                    _ts(certificate.not_after),
                    _ts(certificate.issued_at),
                ),
            )
            self._bump(conn, "fleet")

    def get_certificate(self, serial: str) -> CertificateRecord | None:
        rows = self._read(
            "SELECT serial, device_id, not_after, status, issued_at FROM certificates"
            " WHERE serial = %s",
            (serial,),
        )
        return self._cert(rows[0]) if rows else None

    def list_certificates(self, device_id: str | None = None) -> list[CertificateRecord]:
        sql = "SELECT serial, device_id, not_after, status, issued_at FROM certificates"
        if device_id is None:
            rows = self._read(sql + " ORDER BY issued_at, serial")
        else:
            rows = self._read(
                sql + " WHERE device_id = %s ORDER BY issued_at, serial", (device_id,)
            )
        return [self._cert(r) for r in rows]

    _cert = staticmethod(_cert_row)

    # -- server (gateway, core) certificates ------------------------------------------------

    def record_server_certificate(self, record: ServerCertificateRecord) -> None:
        """Record a gateway's or core's certificate, so that it can be revoked later."""
        if record.role not in _SERVER_ROLES:
            raise ValueError("device certificates are recorded by enrolment, not here")
        validate_id(record.server_id, kind=f"{record.role.value} id")
        with self._write(f"cannot record certificate {record.serial}") as conn:
            self._claim_id(conn, record.server_id, role=record.role, now=record.issued_at)
            conn.execute(
                "INSERT INTO server_certificates"
                " (serial, role, server_id, not_after, status, issued_at)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    record.serial,
                    record.role.value,
                    record.server_id,
                    _ts(record.not_after),
                    record.status.value,
                    _ts(record.issued_at),
                ),
            )

    def get_server_certificate(self, serial: str) -> ServerCertificateRecord | None:
        rows = self._read(
            "SELECT serial, role, server_id, not_after, status, issued_at"
            " FROM server_certificates WHERE serial = %s",
            (_canonical_serial(serial),),
        )
        return self._server(rows[0]) if rows else None

    def list_server_certificates(
        self, role: Role | None = None, server_id: str | None = None
    ) -> list[ServerCertificateRecord]:
        rows = self._read(
            "SELECT serial, role, server_id, not_after, status, issued_at"
            " FROM server_certificates"
            " WHERE (%(role)s::text IS NULL OR role = %(role)s::text)"
            " AND (%(id)s::text IS NULL OR server_id = %(id)s::text)"
            " ORDER BY role, server_id, issued_at, serial",
            {"role": None if role is None else Role(role).value, "id": server_id},
        )
        return [self._server(r) for r in rows]

    _server = staticmethod(_server_row)

    # -- revocation ------------------------------------------------------------------------

    def _insert_revocation(
        self,
        conn: psycopg.Connection[Any],
        *,
        device_id: str,
        serial: str | None,
        reason: str,
        now: dt.datetime,
        role: Role = Role.DEVICE,
    ) -> RevocationRecord:
        """One revocation with the next sequence number, announced at commit (writer lock
        held: numbers are gap-free and visible in order)."""
        row = conn.execute(
            "INSERT INTO counters (name, value) VALUES ('revocation_sequence', 1)"
            " ON CONFLICT (name) DO UPDATE SET value = counters.value + 1 RETURNING value"
        ).fetchone()
        sequence = int(row[0]) if row else 0
        conn.execute(
            "INSERT INTO revocations (sequence, device_id, serial, reason, revoked_at, role)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (sequence, device_id, serial, reason, _ts(now), role.value),
        )
        self._announce(conn, sequence)
        return RevocationRecord(sequence, device_id, serial, reason, now, role)

    def revoke_device(self, device_id: str, *, reason: str, now: dt.datetime) -> RevocationRecord:
        """Revoke a device and every certificate it holds; the next sequence number is its."""
        validate_id(device_id, kind="device id")
        reason = _clean_reason(reason)
        with self._write() as conn:
            row = conn.execute("SELECT status FROM devices WHERE id = %s", (device_id,)).fetchone()
            if row is None:
                raise RegistryError(f"no device {device_id} in the registry")
            conn.execute("UPDATE devices SET status = 'revoked' WHERE id = %s", (device_id,))
            conn.execute(
                "UPDATE certificates SET status = 'revoked' WHERE device_id = %s", (device_id,)
            )
            # Pending tokens of a revoked device must not enrol it again.
            conn.execute(
                "UPDATE tokens SET used_at = %s WHERE device_id = %s AND used_at IS NULL",
                (_ts(now), device_id),
            )
            return self._insert_revocation(
                conn, device_id=device_id, serial=None, reason=reason, now=now
            )

    def revoke_serial(self, serial: str, *, reason: str, now: dt.datetime) -> RevocationRecord:
        """Revoke one certificate, a device's or a server's; its owner keeps its others."""
        serial = _canonical_serial(serial)
        reason = _clean_reason(reason)
        with self._write() as conn:
            row = conn.execute(
                "SELECT device_id FROM certificates WHERE serial = %s", (serial,)
            ).fetchone()
            if row is not None:
                conn.execute(
                    "UPDATE certificates SET status = 'revoked' WHERE serial = %s", (serial,)
                )
                return self._insert_revocation(
                    conn, device_id=str(row[0]), serial=serial, reason=reason, now=now
                )
            server = conn.execute(
                "SELECT role, server_id FROM server_certificates WHERE serial = %s", (serial,)
            ).fetchone()
            if server is None:
                raise RegistryError(f"no certificate with serial {serial} in the registry")
            conn.execute(
                "UPDATE server_certificates SET status = 'revoked' WHERE serial = %s", (serial,)
            )
            return self._insert_revocation(
                conn,
                device_id=str(server[1]),
                serial=serial,
                reason=reason,
                now=now,
                role=Role(str(server[0])),
            )

    def revoke_server(
        self, role: Role, server_id: str, *, reason: str, now: dt.datetime
    ) -> list[RevocationRecord]:
        """Revoke every certificate recorded for a gateway or core; one record per serial
        not yet revoked. Raises :class:`RegistryError` when none is recorded."""
        role = Role(role)
        if role not in _SERVER_ROLES:
            raise ValueError("revoke devices with revoke_device")
        validate_id(server_id, kind=f"{role.value} id")
        reason = _clean_reason(reason)
        with self._write() as conn:
            rows = conn.execute(
                "SELECT serial, status FROM server_certificates WHERE role = %s"
                " AND server_id = %s ORDER BY issued_at, serial",
                (role.value, server_id),
            ).fetchall()
            if not rows:
                raise RegistryError(f"no certificate of {role.value} {server_id} in the registry")
            records = []
            for serial, status in rows:
                if status == Status.REVOKED:
                    continue
                conn.execute(
                    "UPDATE server_certificates SET status = 'revoked' WHERE serial = %s",
                    (serial,),
                )
                records.append(
                    self._insert_revocation(
                        conn,
                        device_id=server_id,
                        serial=str(serial),
                        reason=reason,
                        now=now,
                        role=role,
                    )
                )
            return records

    def revocations_since(self, sequence: int, *, limit: int = 1000) -> list[RevocationRecord]:
        rows = self._read(
            "SELECT sequence, device_id, serial, reason, revoked_at, role FROM revocations"
            " WHERE sequence > %s ORDER BY sequence LIMIT %s",
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
        """Every revoked certificate with the time its revocation was recorded (for the CRL);
        the same rules as :meth:`pki.SqliteRegistry.revoked_serials`."""
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
        rows = self._read("SELECT status FROM devices WHERE id = %s", (device_id,))
        if rows and rows[0][0] == Status.REVOKED:
            return True
        if serial is not None:
            rows = self._read("SELECT status FROM certificates WHERE serial = %s", (serial,))
            return bool(rows) and rows[0][0] == Status.REVOKED
        return False

    @staticmethod
    def _bump(conn: psycopg.Connection[Any], name: str) -> int:
        row = conn.execute(
            "INSERT INTO counters (name, value) VALUES (%s, 1)"
            " ON CONFLICT (name) DO UPDATE SET value = counters.value + 1 RETURNING value",
            (name,),
        ).fetchone()
        return int(row[0]) if row else 0

    def next_crl_number(self) -> int:
        """A CRL number greater than every one handed out before, by any replica
        (RFC 5280 §5.2.3)."""
        with self._write() as conn:
            return self._bump(conn, "crl_number")

    # -- gateway directory -----------------------------------------------------------------

    def upsert_gateway(self, record: GatewayRecord) -> int:
        """Add or update a gateway entry; returns the directory version (bumped on change)."""
        validate_id(record.id, kind="gateway id")
        validate_id(record.region, kind="region")
        with self._write() as conn:
            row = conn.execute(
                "SELECT region, grpc_address, mqtt_address FROM gateways WHERE id = %s",
                (record.id,),
            ).fetchone()
            if row is not None and tuple(row) == (
                record.region,
                record.grpc_address,
                record.mqtt_address,
            ):
                found = conn.execute(
                    "SELECT value FROM counters WHERE name = 'directory'"
                ).fetchone()
                return int(found[0]) if found else 0
            conn.execute(
                "INSERT INTO gateways (id, region, grpc_address, mqtt_address, updated_at)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET"
                " region = excluded.region, grpc_address = excluded.grpc_address,"
                " mqtt_address = excluded.mqtt_address, updated_at = excluded.updated_at",
                (
                    record.id,
                    record.region,
                    record.grpc_address,
                    record.mqtt_address,
                    _ts(record.updated_at),
                ),
            )
            return self._bump(conn, "directory")

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
