"""The PostgreSQL registry's schema: numbered migrations, applied at start-up, each once.

``schema_migrations`` records the versions applied. :func:`apply_migrations` takes a session
advisory lock first, so replicas that start together apply each step once (``CREATE TABLE IF
NOT EXISTS`` alone can still collide in the catalog), and refuses a database made by a newer
edgeward. Each step runs in its own transaction with its version row. Add a step by appending
to :data:`MIGRATIONS`; never edit one that has shipped.
"""

from __future__ import annotations

import time
from typing import Any

from pki.errors import RegistryError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "apply_migrations"]

_MIGRATE_LOCK = 0x6564_6765_7761_7202  # advisory lock key (64-bit, arbitrary but fixed)

#: Numbered schema migrations, applied in order, each once (``schema_migrations``).
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    region TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(id),
    not_after DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    issued_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX certificates_device ON certificates(device_id);
CREATE TABLE tokens (
    token_hash TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    type TEXT NOT NULL,
    region TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    used_at DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL,
    voided_at DOUBLE PRECISION
);
CREATE INDEX tokens_device ON tokens(device_id);
CREATE TABLE server_certificates (
    serial TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('gateway', 'core')),
    server_id TEXT NOT NULL,
    not_after DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    issued_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX server_certificates_id ON server_certificates(role, server_id);
CREATE INDEX server_certificates_server ON server_certificates(server_id);
CREATE TABLE revocations (
    sequence BIGINT PRIMARY KEY,
    device_id TEXT NOT NULL,
    serial TEXT,
    reason TEXT NOT NULL,
    revoked_at DOUBLE PRECISION NOT NULL,
    role TEXT NOT NULL DEFAULT 'device'
);
CREATE INDEX revocations_serial ON revocations(serial);
CREATE INDEX revocations_device ON revocations(device_id);
CREATE TABLE gateways (
    id TEXT PRIMARY KEY,
    region TEXT NOT NULL,
    grpc_address TEXT NOT NULL,
    mqtt_address TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
""",
    ),
    (
        2,
        """
CREATE TABLE operators (
    id TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('viewer', 'admin')),
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE operator_tokens (
    token_hash TEXT PRIMARY KEY,
    operator_id TEXT NOT NULL REFERENCES operators(id),
    expires_at DOUBLE PRECISION NOT NULL,
    used_at DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX operator_tokens_operator ON operator_tokens(operator_id);
""",
    ),
    (
        3,
        """
CREATE TABLE operator_certificates (
    serial TEXT PRIMARY KEY,
    operator_id TEXT NOT NULL REFERENCES operators(id),
    not_after DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    issued_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX operator_certificates_operator ON operator_certificates(operator_id);
CREATE INDEX certificates_valid ON certificates(device_id, status, not_after);
""",
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


def apply_migrations(conn: Any) -> int:
    """Bring the database of ``conn`` (a psycopg connection, idle) to :data:`SCHEMA_VERSION`;
    returns the version it found."""
    conn.autocommit = True
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATE_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
        )
        row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
        current = int(row[0]) if row else 0
        if current > SCHEMA_VERSION:
            raise RegistryError(
                f"registry schema version {current} is newer than this edgeward "
                f"({SCHEMA_VERSION}); upgrade edgeward"
            )
        for version, script in MIGRATIONS:
            if version <= current:
                continue
            with conn.transaction():
                conn.execute(script.encode())
                conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (%s, %s)",
                    (version, time.time()),
                )
        return current
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATE_LOCK,))
        conn.autocommit = False
