"""The fleet a page at a time: filtered and counted by the registry (both backends), served by
the core console's ``/api/fleet`` with an ``ETag`` that answers 304 while nothing changed."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import pki
from tests._support.core import running_core
from tests.console._client import console_client

pytestmark = pytest.mark.timeout(120)

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[pki.CoreRegistry]:
    url = (
        str(request.getfixturevalue("postgres_url"))
        if request.param == "postgresql"
        else str(tmp_path / "registry.sqlite3")
    )
    r = pki.open_registry(url)
    yield r
    r.close()


def _etag(headers: dict[str, str]) -> str:
    return next(v for k, v in headers.items() if k.lower() == "etag")


def _cert(serial: str, device_id: str, not_after: dt.datetime) -> pki.CertificateRecord:
    return pki.CertificateRecord(serial, device_id, not_after, pki.Status.ACTIVE, NOW - DAY)


def _fill(registry: pki.Registry) -> None:
    """121 devices: cam-000…059 valid, cam-060…089 with an expired certificate, cam-090…099
    with none (both: expired), cam-100…119 revoked, and dog-1 valid."""
    for n in range(120):
        device_id = f"cam-{n:03d}"
        registry.upsert_device(device_id, type="pet_camera", region="home", now=NOW - DAY)
        if n < 60 or n >= 100:
            registry.record_certificate(_cert(f"{0x1000 + n:x}", device_id, NOW + DAY))
        elif n < 90:
            registry.record_certificate(
                _cert(f"{0x1000 + n:x}", device_id, NOW - dt.timedelta(seconds=1))
            )
    registry.upsert_device("dog-1", type="robot_vacuum", region="home", now=NOW - DAY)
    registry.record_certificate(_cert("d0", "dog-1", NOW + DAY))
    # cam-000 also holds a newer certificate, revoked: the page shows its active one.
    registry.record_certificate(
        pki.CertificateRecord("ff0", "cam-000", NOW + 2 * DAY, pki.Status.ACTIVE, NOW)
    )
    registry.revoke_serial("ff0", reason="lost", now=NOW)
    for n in range(100, 120):
        registry.revoke_device(f"cam-{n:03d}", reason="returned", now=NOW)


def test_a_fleet_page_is_filtered_ordered_and_counted_by_the_registry(
    registry: pki.CoreRegistry,
) -> None:
    _fill(registry)
    counts = {"all": 121, "active": 61, "expired": 40, "revoked": 20}

    first = registry.fleet_page(now=NOW)
    assert [r.device.id for r in first.rows] == [f"cam-{n:03d}" for n in range(50)]
    assert (first.matching, first.counts) == (121, counts)
    assert first.rows[0].current is not None
    assert (first.rows[0].current.serial, first.rows[0].state) == ("1000", "active")
    last = registry.fleet_page(now=NOW, offset=100)
    assert [r.device.id for r in last.rows] == [*(f"cam-{n}" for n in range(100, 120)), "dog-1"]
    assert registry.fleet_page(now=NOW, offset=150).rows == ()

    revoked = registry.fleet_page(prefix="cam-1", now=NOW)
    assert revoked.matching == 20
    assert {r.state for r in revoked.rows} == {"revoked"}
    assert revoked.counts == counts  # the whole fleet's, whatever the filter

    expired = registry.fleet_page(state="expired", now=NOW, limit=5)
    assert expired.matching == 40
    assert [r.device.id for r in expired.rows] == [f"cam-{n:03d}" for n in range(60, 65)]
    none_yet = registry.fleet_page(prefix="cam-09", state="expired", now=NOW)
    assert [r.current for r in none_yet.rows] == [None] * 10
    assert registry.fleet_page(prefix="dog", state="active", now=NOW).matching == 1
    assert registry.fleet_page(prefix="dog", state="revoked", now=NOW).rows == ()
    # An hour later the valid certificates are still valid; two days later none is.
    assert registry.fleet_page(state="expired", now=NOW + 2 * DAY).matching == 101

    for bad in ({"prefix": "CAM"}, {"prefix": "cam%"}, {"prefix": "x" * 64}, {"state": "gone"}):
        with pytest.raises(ValueError, match=r"prefix|state"):
            registry.fleet_page(now=NOW, **bad)  # type: ignore[arg-type]
    for limit, offset in ((0, 0), (pki.MAX_FLEET_PAGE + 1, 0), (10, -1)):
        with pytest.raises(ValueError, match="limit"):
            registry.fleet_page(now=NOW, limit=limit, offset=offset)


def test_the_fleet_version_moves_with_every_change_the_fleet_shows(
    registry: pki.CoreRegistry,
) -> None:
    seen = {registry.fleet_version()}

    def moved() -> bool:
        version = registry.fleet_version()
        new = version not in seen
        seen.add(version)
        return new

    registry.upsert_device("cam-1", type="pet_camera", region="home", now=NOW)
    assert moved()
    registry.record_certificate(_cert("a1", "cam-1", NOW + DAY))
    assert moved()
    registry.fleet_page(now=NOW)
    registry.list_devices()
    assert not moved()  # reads change nothing
    registry.revoke_serial("a1", reason="lost", now=NOW)
    assert moved()
    registry.revoke_device("cam-1", reason="gone", now=NOW)
    assert moved()
    pki.create_operator_token(registry, name="ops-x", role="viewer", now=NOW)
    assert not moved()  # operators are not the fleet


async def test_the_fleet_api_pages_filters_and_answers_304_while_nothing_changed(
    pki_dir: Path, tmp_path: Path
) -> None:
    async with running_core(
        pki_dir, tmp_path, console_enabled=True, console_listen="127.0.0.1:0"
    ) as core:
        now = dt.datetime.now(dt.UTC)
        registry = core.registry
        for n in range(60):
            device_id = f"pet-{n:02d}"
            registry.upsert_device(device_id, type="pet_camera", region="home", now=now)
            registry.record_certificate(
                pki.CertificateRecord(f"{n + 1:x}00", device_id, now + DAY, pki.Status.ACTIVE, now)
            )
        token = pki.create_operator_token(registry, name="ops-fleet", role="viewer", now=now)
        async with console_client(core.server.console.url, pki_dir / "ca-bundle.pem") as c:
            assert (await c.get("/api/fleet"))[0] == 401
            assert (await c.login(token))[0] == 303
            status, headers, body = await c.get("/api/fleet")
            assert status == 200
            data = json.loads(body)
            assert [d["id"] for d in data["devices"]] == [f"pet-{n:02d}" for n in range(50)]
            assert (data["page"], data["pages"], data["matching"]) == (1, 2, 60)
            assert data["counts"] == {"all": 60, "active": 60, "expired": 0, "revoked": 0}
            etag = _etag(headers)

            status, headers, body = await c.get("/api/fleet", headers={"If-None-Match": etag})
            assert (status, body, _etag(headers)) == (304, "", etag)

            registry.revoke_device("pet-07", reason="stolen", now=now)
            status, headers, body = await c.get("/api/fleet", headers={"If-None-Match": etag})
            assert status == 200
            assert _etag(headers) != etag
            data = json.loads(body)
            assert next(d for d in data["devices"] if d["id"] == "pet-07")["status"] == "revoked"
            assert data["counts"]["revoked"] == 1

            status, _, body = await c.get("/api/fleet?q=pet-0&status=revoked")
            data = json.loads(body)
            assert [d["id"] for d in data["devices"]] == ["pet-07"]
            assert data["matching"] == 1
            status, _, body = await c.get("/api/fleet?page=2")
            assert [d["id"] for d in json.loads(body)["devices"]] == [
                f"pet-{n}" for n in range(50, 60)
            ]
            for bad in ("q=pet_1", "q=pet%25", "q=a%27%20OR%201%3D1", "status=gone"):
                assert (await c.get(f"/api/fleet?{bad}"))[0] == 400

            status, _, page = await c.get("/fleet?q=pet-5&page=1")
            assert status == 200
            assert re.findall(r'data-device="([^"]+)"', page) == [f"pet-5{n}" for n in range(10)]
            assert "page 1 of 1 (10 matching)" in page
            status, _, page = await c.get("/fleet")
            assert 'id="next-page"' in page
            assert len(re.findall(r'data-device="', page)) == 50
            status, _, page = await c.get("/fleet?q=bad%21")
            assert status == 400
            assert 'id="fleet-error"' in page
            status, _, page = await c.get("/devices/pet-07")
            assert status == 200
            assert "revoked" in page
