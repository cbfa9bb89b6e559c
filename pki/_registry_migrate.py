"""Move an SQLite registry into a PostgreSQL one (``edgeward pki migrate``).

Everything the registry holds moves: devices, certificates, server certificates, tokens
(hashes; their used/voided state), revocations with their sequence numbers, the gateway
directory, the console's operators and their login tokens (hashes; used or not), and the
counters (CRL number, directory version, and the revocation sequence, set to the highest number
SQLite ever handed out so that no number is used twice). The source is read
in one read transaction (a consistent snapshot, while a core may keep running on it); the
target is written in one transaction under the registry's writer lock, and the row count of
every table is compared with the source's before it commits. A target that already holds data
is refused unless ``replace`` (its tables are emptied first, in the same transaction).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import structlog

from pki._registry import SqliteRegistry, redacted_url
from pki._registry_pg import PostgresRegistry
from pki.errors import RegistryError

__all__ = ["MIGRATED_TABLES", "MigrationReport", "migrate_registry"]

#: Tables moved, in foreign-key order, with their columns (the same in both backends).
MIGRATED_TABLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("devices", ("id", "type", "region", "status", "created_at")),
    ("certificates", ("serial", "device_id", "not_after", "status", "issued_at")),
    (
        "server_certificates",
        ("serial", "role", "server_id", "not_after", "status", "issued_at"),
    ),
    (
        "tokens",
        (
            "token_hash",
            "device_id",
            "type",
            "region",
            "expires_at",
            "used_at",
            "created_at",
            "voided_at",
        ),
    ),
    ("revocations", ("sequence", "device_id", "serial", "reason", "revoked_at", "role")),
    ("gateways", ("id", "region", "grpc_address", "mqtt_address", "updated_at")),
    ("operators", ("id", "role", "status", "created_at")),
    ("operator_tokens", ("token_hash", "operator_id", "expires_at", "used_at", "created_at")),
    (
        "operator_certificates",
        ("serial", "operator_id", "not_after", "status", "issued_at"),
    ),
    ("counters", ("name", "value")),
)
_SEQUENCE_COUNTER = "revocation_sequence"
_audit = structlog.get_logger("pki.audit")


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """Rows per table, identical in source and target (checked), and the revocation sequence."""

    counts: dict[str, int]
    last_sequence: int


def _read_source(path: Path) -> tuple[dict[str, list[tuple[object, ...]]], int]:
    if not path.is_file():
        raise RegistryError(f"no registry at {path}")
    SqliteRegistry(path).close()  # brings a registry of an earlier version up to date
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.execute("BEGIN")  # one snapshot for every table
        rows = {
            table: list(db.execute(f"SELECT {', '.join(cols)} FROM {table}"))  # noqa: S608 - fixed names
            for table, cols in MIGRATED_TABLES
        }
        found = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'revocations'").fetchone()
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        raise RegistryError(f"cannot read registry {path}: {exc}") from exc
    finally:
        db.close()
    highest = max([int(found[0]) if found else 0] + [int(str(r[0])) for r in rows["revocations"]])
    # The PostgreSQL registry keeps the revocation sequence in a counter; SQLite has none.
    rows["counters"] = [r for r in rows["counters"] if r[0] != _SEQUENCE_COUNTER]
    rows["counters"].append((_SEQUENCE_COUNTER, highest))
    return rows, highest


def migrate_registry(
    source: Path, target: PostgresRegistry, *, replace: bool = False
) -> MigrationReport:
    """Copy the SQLite registry at ``source`` into ``target``; see the module's description.

    Raises :class:`RegistryError` when the target holds data (and not ``replace``) or when a
    count differs (nothing is committed then).
    """
    rows, highest = _read_source(source)
    with target._write("registry migration failed") as conn:
        present = {
            table: int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])  # type: ignore[index]  # noqa: S608
            for table, _ in MIGRATED_TABLES
        }
        if any(present.values()) and not replace:
            held = ", ".join(f"{t} {n}" for t, n in present.items() if n)
            raise RegistryError(
                f"the target registry is not empty ({held}); give --force to replace it"
            )
        if any(present.values()):
            conn.execute(
                "TRUNCATE " + ", ".join(t for t, _ in MIGRATED_TABLES)  # fixed names
            )
        for table, cols in MIGRATED_TABLES:
            with conn.cursor().copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as copy:
                for row in rows[table]:
                    copy.write_row(row)
        counts: dict[str, int] = {}
        for table, _ in MIGRATED_TABLES:
            counted = int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])  # type: ignore[index]  # noqa: S608
            if counted != len(rows[table]):
                raise RegistryError(
                    f"migration check failed: {table} has {counted} rows in the target, "
                    f"{len(rows[table])} in the source; nothing was written"
                )
            counts[table] = counted
    _audit.info(
        "registry.migrated",
        audit=True,
        source=str(source),
        target=redacted_url(target.url),
        replaced=bool(any(present.values())),
        last_sequence=highest,
        **counts,
    )
    return MigrationReport(counts, highest)
