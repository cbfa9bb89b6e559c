"""Fixtures shared by every test: a real PKI, identities minted from it, external tools.

Area-specific fixtures live in ``tests/<area>/conftest.py``; reusable helpers (starting a
broker, a gateway, a core) live in ``tests/_support/`` so other areas can import them.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

import pki
from tests._support.postgres import PostgresServer, find_postgres_bin, running_postgres

TRUST_DOMAIN = "test.example"
ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "tests" / "data" / "photos"

IssueFn = Callable[..., pki.IdentityFiles]

# Every core and gateway a test starts (in this process or as an ``edgeward`` subprocess, which
# inherits the environment) serves its console on a free port rather than the fixed default,
# so tests running side by side never compete for 9443/9444. Flags still win (the demo stack).
os.environ.setdefault("EDGEWARD_CORE_CONSOLE_LISTEN", "127.0.0.1:0")
os.environ.setdefault("EDGEWARD_GATEWAY_CONSOLE_LISTEN", "127.0.0.1:0")


def require_tool(name: str) -> str:
    """Path of an external tool; missing fails under CI=true and skips on a developer machine."""
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed (scripts/setup.sh installs it)")
        pytest.skip(f"{name} is not installed; run scripts/setup.sh")
    return path


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PKI initialised once per test session (trust domain ``test.example``)."""
    d = tmp_path_factory.mktemp("pki")
    pki.init_pki(d, trust_domain=TRUST_DOMAIN)
    return d


@pytest.fixture(scope="session")
def other_pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated PKI with the same trust domain name: its certificates must be refused."""
    d = tmp_path_factory.mktemp("other-pki")
    pki.init_pki(d, trust_domain=TRUST_DOMAIN)
    return d


def _issuer(base: Path, pki_path: Path) -> IssueFn:
    def issue(
        role: pki.Role | str,
        id: str,
        *,
        dns_names: Sequence[str] = ("localhost",),
        ip_addresses: Sequence[str] = ("127.0.0.1",),
        lifetime: dt.timedelta | None = None,
        now: dt.datetime | None = None,
    ) -> pki.IdentityFiles:
        role = pki.Role(role)
        server = role is not pki.Role.DEVICE
        return pki.issue_identity(
            pki_path,
            base / f"{role.value}-{id}-{len(list(base.iterdir()))}",
            role=role,
            id=id,
            dns_names=dns_names if server else (),
            ip_addresses=ip_addresses if server else (),
            lifetime=lifetime,
            now=now,
        )

    return issue


@pytest.fixture
def issue(pki_dir: Path, tmp_path: Path) -> IssueFn:
    """``issue(role, id, …)`` mints an identity directory from the session PKI.

    Devices minted this way bypass enrolment (no registry entry); use the enrolment service
    where the registry matters.
    """
    base = tmp_path / "identities"
    base.mkdir()
    return _issuer(base, pki_dir)


@pytest.fixture
def issue_foreign(other_pki_dir: Path, tmp_path: Path) -> IssueFn:
    """Like ``issue`` but from an unrelated CA."""
    base = tmp_path / "foreign-identities"
    base.mkdir()
    return _issuer(base, other_pki_dir)


@pytest.fixture(scope="session")
def photos() -> Path:
    return PHOTOS


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (Debian's ``postgresql`` package).

    Missing binaries fail under CI=true and skip on a developer machine, like the broker.
    """
    bindir = find_postgres_bin()
    if bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL is not installed (scripts/setup.sh installs it)")
        pytest.skip("PostgreSQL is not installed; run scripts/setup.sh")
    with running_postgres(bindir) as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a fresh, empty database on the session's PostgreSQL server."""
    return postgres_server.create_database()
