"""The console's pages and API under hostile input, over real TLS from a real core.

No session, an expired session, a viewer attempting an admin action, forged or missing CSRF
tokens, cross-origin posts, one-time tokens replayed or expired, oversized and malformed
requests, path traversal on static files, certificates of the wrong role: each is refused, and
each refusal is an audit line.
"""

from __future__ import annotations

import datetime as dt
import secrets
from pathlib import Path

import pytest
from yarl import URL

import pki
from tests._support.core import RunningCore, unique_id
from tests.console._client import console_client
from tests.console.conftest import now, operator_token


def _audit(core: RunningCore, event: str) -> list[dict[str, str]]:
    return [dict(e.fields) for e in core.server.audit_ring.entries() if e.event == event]


def _device(core: RunningCore) -> str:
    device_id = unique_id("cam")
    core.registry.upsert_device(device_id, type="pet_camera", region="home", now=now())
    return device_id


async def test_no_page_or_api_without_a_session(core: RunningCore) -> None:
    device_id = _device(core)
    async with console_client(core.server.console.url, core.pki_dir / "ca-bundle.pem") as c:
        for path in ("/", "/fleet", f"/devices/{device_id}", "/gateways", "/escalations", "/audit"):
            status, headers, _ = await c.get(path)
            assert (status, headers.get("Location")) == (303, "/login"), path
        status, _, _ = await c.get("/api/fleet")
        assert status == 401
        status, _, _ = await c.post(f"/devices/{device_id}/revoke", data={"reason": "x"})
        assert status == 401
    assert core.registry.get_device(device_id).status is pki.Status.ACTIVE  # type: ignore[union-attr]
    reasons = {f["reason"] for f in _audit(core, "console.refused")}
    assert "no session" in reasons


async def test_a_forged_session_cookie_is_refused(core: RunningCore) -> None:
    async with console_client(core.server.console.url, core.pki_dir / "ca-bundle.pem") as c:
        c.http.cookie_jar.update_cookies(
            {"__Host-edgeward-core": secrets.token_urlsafe(32)}, URL(c.base)
        )
        status, headers, _ = await c.get("/fleet")
    assert (status, headers.get("Location")) == (303, "/login")
    assert "unknown session" in {f["reason"] for f in _audit(core, "console.refused")}


async def test_token_login_gives_a_strict_cookie_and_works_once(core: RunningCore) -> None:
    token = operator_token(core, "ops-alice", "admin")
    async with console_client(core.server.console.url, core.pki_dir / "ca-bundle.pem") as c:
        status, headers = await c.login(token)
        assert (status, headers["Location"]) == (303, "/fleet")
        cookie = headers["Set-Cookie"]
        assert cookie.startswith("__Host-edgeward-core=")
        for attribute in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/"):
            assert attribute in cookie
        assert "Domain" not in cookie
        status, _, body = await c.get("/fleet")
        assert status == 200
        assert "ops-alice (admin)" in body
    async with console_client(core.server.console.url, core.pki_dir / "ca-bundle.pem") as c:
        status, _ = await c.login(token)  # the same token again
        assert status == 401
        assert (await c.get("/fleet"))[0] == 303
    refused = _audit(core, "operator.login_refused")
    assert refused[0]["reason"] == "token already used"
    assert all(
        token not in str(f) for e in ("operator.login", "console.login") for f in _audit(core, e)
    )


async def test_an_expired_or_unknown_token_is_refused(core: RunningCore) -> None:
    expired = operator_token(
        core, "ops-late", "admin", ttl=dt.timedelta(minutes=1), now=now() - dt.timedelta(minutes=2)
    )
    async with console_client(core.server.console.url, core.pki_dir / "ca-bundle.pem") as c:
        assert (await c.login(expired))[0] == 401
        assert (await c.login("ops-late." + secrets.token_urlsafe(32)))[0] == 401
        assert (await c.login("not a token at all"))[0] == 401
    reasons = [f["reason"] for f in _audit(core, "operator.login_refused")]
    assert "token expired" in reasons
    assert "unknown token" in reasons


async def test_an_expired_session_is_refused(core: RunningCore) -> None:
    clock = [1000.0]
    core.server.console.sessions._clock = lambda: clock[0]
    token = operator_token(core, "ops-idle", "viewer")
    ttl = core.server.settings.console_session_ttl_s
    async with console_client(core.server.console.url, core.pki_dir / "ca-bundle.pem") as c:
        assert (await c.login(token))[0] == 303
        clock[0] += ttl - 1
        assert (await c.get("/fleet"))[0] == 200  # still within the idle time (and touched)
        clock[0] += ttl + 1
        status, headers, _ = await c.get("/fleet")
        assert (status, headers.get("Location")) == (303, "/login")
        assert (await c.get("/api/fleet"))[0] == 401
    assert "session expired" in {f["reason"] for f in _audit(core, "console.refused")}


async def test_a_viewer_cannot_take_admin_actions(core: RunningCore) -> None:
    device_id = _device(core)
    token = operator_token(core, "ops-bob", "viewer")
    async with console_client(core.server.console.url, core.pki_dir / "ca-bundle.pem") as c:
        assert (await c.login(token))[0] == 303
        csrf = await c.csrf()
        status, _, body = await c.get(f"/devices/{device_id}")
        assert status == 200
        assert "revoke-form" not in body
        status, _, _ = await c.post(
            f"/devices/{device_id}/revoke", data={"csrf": csrf, "reason": "viewer tries"}
        )
        assert status == 403
        status, _, _ = await c.post(
            "/tokens",
            data={
                "csrf": csrf,
                "device_id": unique_id("new"),
                "type": "pet_camera",
                "region": "home",
                "ttl": "1h",
            },
        )
        assert status == 403
    assert core.registry.get_device(device_id).status is pki.Status.ACTIVE  # type: ignore[union-attr]
    refused = [f for f in _audit(core, "console.refused") if f.get("operator") == "ops-bob"]
    assert len(refused) == 2
    assert {f["reason"] for f in refused} == {"admin role required"}


async def test_state_changes_need_the_sessions_csrf_token_and_origin(core: RunningCore) -> None:
    device_id = _device(core)
    token = operator_token(core, "ops-carol", "admin")
    path = f"/devices/{device_id}/revoke"
    async with console_client(core.server.console.url, core.pki_dir / "ca-bundle.pem") as c:
        assert (await c.login(token))[0] == 303
        csrf = await c.csrf()
        forged = secrets.token_urlsafe(32)
        assert (await c.post(path, data={"reason": "no token"}))[0] == 403
        assert (await c.post(path, data={"csrf": forged, "reason": "forged"}))[0] == 403
        assert (await c.post(path, data={"csrf": csrf[:-1], "reason": "cut"}))[0] == 403
        assert (
            await c.post(path, data={"csrf": csrf, "reason": "x"}, origin="https://evil.example")
        )[0] == 403
        assert (await c.post(path, data={"csrf": csrf, "reason": "x"}, origin=None))[0] == 403
        assert core.registry.get_device(device_id).status is pki.Status.ACTIVE  # type: ignore[union-attr]
        # Another session's token is no good either.
        async with console_client(c.base, core.pki_dir / "ca-bundle.pem") as other:
            await other.login(operator_token(core, "ops-dave", "admin"))
            theirs = await other.csrf()
        assert (await c.post(path, data={"csrf": theirs, "reason": "x"}))[0] == 403
        status, headers, _ = await c.post(path, data={"csrf": csrf, "reason": "lost"})
        assert (status, headers["Location"]) == (303, f"/devices/{device_id}")
    assert core.registry.get_device(device_id).status is pki.Status.REVOKED  # type: ignore[union-attr]
    reasons = [f["reason"] for f in _audit(core, "console.refused")]
    assert reasons.count("missing or wrong CSRF token") == 4
    assert reasons.count("cross-origin or origin-less request") == 2
    # The same audit line as 'edgeward pki revoke', and the console's own naming the operator.
    assert _audit(core, "device.revoked")[0]["device_id"] == device_id
    action = _audit(core, "console.device_revoked")[0]
    assert (action["operator"], action["device_id"], action["reason"]) == (
        "ops-carol",
        device_id,
        "lost",
    )


async def test_login_needs_the_consoles_origin(core: RunningCore) -> None:
    token = operator_token(core, "ops-erin", "admin")
    async with console_client(core.server.console.url, core.pki_dir / "ca-bundle.pem") as c:
        status, _, _ = await c.post("/login", data={"token": token}, origin="https://evil.example")
        assert status == 403
        assert (await c.login(token))[0] == 303  # not spent by the refused attempt


async def test_oversized_and_malformed_requests(core: RunningCore) -> None:
    token = operator_token(core, "ops-frank", "admin")
    async with console_client(core.server.console.url, core.pki_dir / "ca-bundle.pem") as c:
        limit = core.server.settings.console_max_body_bytes
        status, _, _ = await c.post("/login", data={"token": "x" * (limit + 10)})
        assert status == 413
        assert (
            await c.post(
                "/login",
                data=b"\xff\xfe\x00garbage",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
        )[0] in (400, 401)
        assert (await c.post("/login", json={"token": token}))[0] == 400
        assert (await c.post("/login", data={"token": "a" * 5000}))[0] == 400
        status, _, _ = await c.get("/fleet", headers={"X-Big": "y" * 20_000})
        assert status in (400, 431)
        assert (await c.login(token))[0] == 303
        csrf = await c.csrf()
        for bad in ("../../etc", "UPPER", "a+b", "%00x", "x" * 70):
            status, _, _ = await c.get(f"/devices/{bad}")
            assert status == 404, bad
        status, _, body = await c.post(
            "/tokens",
            data={
                "csrf": csrf,
                "device_id": "bad/id",
                "type": "pet_camera",
                "region": "home",
                "ttl": "1h",
            },
        )
        assert status == 400
        assert "Refused" in body
        status, _, body = await c.post(
            "/tokens",
            data={
                "csrf": csrf,
                "device_id": unique_id("cam"),
                "type": "pet_camera",
                "region": "home",
                "ttl": "999d",
            },
        )
        assert status == 400
        assert (await c.get("/escalations/gw-x/../../etc/passwd"))[0] == 404
        assert (await c.get("/gateways/nope/live"))[0] == 404
    assert _audit(core, "console.action_refused")


async def test_static_files_admit_no_path_traversal(core: RunningCore) -> None:
    async with console_client(core.server.console.url, core.pki_dir / "ca-bundle.pem") as c:
        status, headers, body = await c.get("/static/console.css")
        assert status == 200
        assert headers["Content-Type"].startswith("text/css")
        assert "body" in body
        for raw in (
            "/static/../_web.py",
            "/static/%2e%2e/_web.py",
            "/static/..%2f_web.py",
            "/static/%2e%2e%2f%2e%2e%2fpki%2f_ca.py",
            "/static/..%5c_web.py",
            "/static//etc/passwd",
            "/static/%2fetc%2fpasswd",
            "/static/templates",
            "/static/login.html",
            "/static/console.css%00.js",
            "/static/",
        ):
            async with c.http.get(
                URL(c.base + raw, encoded=True), ssl=c.ssl, allow_redirects=False
            ) as r:
                text = await r.text()
                assert r.status in (303, 404), (raw, r.status)
                assert "import" not in text
                assert "root:" not in text


async def test_every_response_carries_the_security_headers(core: RunningCore) -> None:
    async with console_client(core.server.console.url, core.pki_dir / "ca-bundle.pem") as c:
        for path in ("/login", "/fleet", "/static/live.js"):
            _, headers, _ = await c.get(path)
            csp = headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp
            assert "frame-ancestors 'none'" in csp
            assert "unsafe-inline" not in csp
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert headers["X-Frame-Options"] == "DENY"


async def test_operator_certificate_logs_in_other_roles_do_not(
    core: RunningCore, pki_dir: Path, tmp_path: Path, issue: object
) -> None:
    operator_token(core, "ops-cert", "viewer")  # registers the operator (viewer)
    cert = pki.issue_identity(pki_dir, tmp_path / "op", role=pki.Role.OPERATOR, id="ops-cert")
    ca = pki_dir / "ca-bundle.pem"
    async with console_client(core.server.console.url, ca, cert) as c:
        status, _, body = await c.get("/fleet")
        assert status == 200
        assert "ops-cert (viewer)" in body
    stranger = pki.issue_identity(
        pki_dir, tmp_path / "op2", role=pki.Role.OPERATOR, id="ops-nobody"
    )
    device = issue("device", unique_id("cam"))  # type: ignore[operator]
    for identity in (stranger, device):
        async with console_client(core.server.console.url, ca, identity) as c:
            status, headers, _ = await c.get("/fleet")
            assert (status, headers.get("Location")) == (303, "/login")
    reasons = [f["reason"] for f in _audit(core, "console.login_refused")]
    assert any("not registered" in r for r in reasons)
    assert any("not operator" in r for r in reasons)
    logins = [f for f in _audit(core, "console.login") if f.get("method") == "certificate"]
    assert logins
    assert logins[0]["operator"] == "ops-cert"


async def test_an_operator_certificate_from_another_ca_is_refused_by_tls(
    core: RunningCore, other_pki_dir: Path, tmp_path: Path
) -> None:
    foreign = pki.issue_identity(
        other_pki_dir, tmp_path / "f", role=pki.Role.OPERATOR, id="ops-cert"
    )
    with pytest.raises(Exception):  # noqa: B017, PT011 - the TLS handshake fails
        async with console_client(
            core.server.console.url, core.pki_dir / "ca-bundle.pem", foreign
        ) as c:
            await c.get("/fleet")


async def test_admin_issues_an_enrolment_token_shown_once(core: RunningCore) -> None:
    device_id = unique_id("cam")
    async with console_client(core.server.console.url, core.pki_dir / "ca-bundle.pem") as c:
        await c.login(operator_token(core, "ops-gina", "admin"))
        csrf = await c.csrf()
        status, _, body = await c.post(
            "/tokens",
            data={
                "csrf": csrf,
                "device_id": device_id,
                "type": "pet_camera",
                "region": "home",
                "ttl": "1h",
            },
        )
    assert status == 200
    token = body.split('<pre id="token">')[1].split("</pre>")[0]
    assert token.startswith(device_id + ".")
    assert f"edgeward enroll --endpoint {core.enrol_address}" in body
    record = core.registry.get_token(pki.hash_token(token))
    assert record is not None
    assert record.device_id == device_id
    assert _audit(core, "token.created")[0]["device_id"] == device_id
    assert token not in str([e.fields for e in core.server.audit_ring.entries()])


async def test_admin_revokes_a_gateway_with_the_clis_audit_line(core: RunningCore) -> None:
    gateway_id = unique_id("gw")
    # Canonical, as certificates are recorded (pki.serial_hex): no leading zero.
    serial = pki.serial_hex(int(secrets.token_hex(8), 16))
    core.registry.record_server_certificate(
        pki.ServerCertificateRecord(
            serial,
            pki.Role.GATEWAY,
            gateway_id,
            now() + dt.timedelta(days=30),
            pki.Status.ACTIVE,
            now(),
        )
    )
    core.registry.upsert_gateway(pki.GatewayRecord(gateway_id, "home", "127.0.0.1:1", "", now()))
    async with console_client(core.server.console.url, core.pki_dir / "ca-bundle.pem") as c:
        await c.login(operator_token(core, "ops-hank", "admin"))
        csrf = await c.csrf("/gateways")
        assert (await c.post("/gateways/gw-nope/revoke", data={"csrf": csrf}))[0] == 404
        status, headers, _ = await c.post(
            f"/gateways/{gateway_id}/revoke", data={"csrf": csrf, "reason": "decommissioned"}
        )
        assert (status, headers["Location"]) == (303, "/gateways")
        _, _, body = await c.get("/gateways")
    record = core.registry.get_server_certificate(serial)
    assert record is not None
    assert record.status is pki.Status.REVOKED
    assert f'data-gateway="{gateway_id}"' in body
    revoked = _audit(core, "certificate.revoked")
    assert revoked[0]["gateway_id"] == gateway_id
    assert _audit(core, "console.gateway_revoked")[0]["operator"] == "ops-hank"
