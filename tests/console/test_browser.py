"""The console in a real headless Chromium against a real stack (PKI, core, two gateways, the
two demo devices as ``edgeward device simulate`` processes): log in with a one-time link, see
both devices on the fleet page, watch a detection with its box appear live on the gateway's
console, open an escalation and read the core's answer, revoke a device and watch it go
offline, and be refused as a viewer doing an admin action.

The browser trusts exactly the three consoles' keys: ``--ignore-certificate-errors-spki-list``
pins the SHA-256 of each console's SubjectPublicKeyInfo (read from the identities the stack
issued), so any other certificate is still an error; nothing else is relaxed.

Screenshots go to the test's temporary directory (``screenshots/``). Chromium, chromedriver and
Selenium missing fail under ``CI=true`` (scripts/setup.sh installs them) and skip elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import pki
from edgeward._cli_device import Simulator  # noqa: F401 - the simulator's module must import
from edgeward._stack import DEMO_DEVICES, DemoStack, ServiceProcess, edgeward_command
from tests.conftest import require_tool

pytestmark = pytest.mark.timeout(900)

PET, PET_TYPE, PET_REGION, _ = DEMO_DEVICES[0]
VACUUM = DEMO_DEVICES[1][0]
WAIT_S = 120  # generous: a loaded 2-core machine runs two gateways, a core and two devices


def _selenium() -> Any:
    try:
        from selenium import webdriver
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("selenium is not installed (pip install -e '.[dev]')")
        pytest.skip("selenium is not installed")
    return webdriver


def _spki_pin(cert_pem: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStack]:
    require_tool("mosquitto")
    root = tmp_path_factory.mktemp("console-stack")
    # The response cache off: every frame is judged afresh, so the live view has frames to show
    # however late the browser starts watching (a cached answer repeats an earlier frame's).
    s = DemoStack(root, cache=False)
    sims: list[ServiceProcess] = []
    try:

        async def start() -> None:
            await s.setup()
            await s.start_core()
            await asyncio.gather(*(s.start_gateway(gid) for gid in s.plans))

        asyncio.run(start())
        for device_id, device_type, region, transport in DEMO_DEVICES:
            identity = asyncio.run(s.enrol(device_id, device_type=device_type, region=region))
            sim = ServiceProcess(
                f"sim-{device_id}",
                [
                    *edgeward_command(),
                    "device",
                    "simulate",
                    "--identity",
                    str(identity),
                    "--kind",
                    device_type,
                    "--rate",
                    "2",
                    "--transport",
                    transport,
                ],
                s.log_dir / f"sim-{device_id}.log",
            )
            sim.start()
            sims.append(sim)
        yield s
    finally:
        for sim in sims:
            sim.stop()
        s.stop_all()


@pytest.fixture(scope="module")
def browser(stack: DemoStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    chromium = require_tool("chromium")
    driver_path = require_tool("chromedriver")
    webdriver = _selenium()
    pins = [_spki_pin(stack.root / "identities" / "core-core-1" / "cert.pem")] + [
        _spki_pin(stack.gateway_identity(gid) / "cert.pem") for gid in stack.plans
    ]
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        f"--ignore-certificate-errors-spki-list={','.join(pins)}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=driver_path)
    )
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def _wait(driver: Any, predicate: Any, within_s: float = WAIT_S, what: str = "") -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, within_s, poll_frequency=0.2).until(predicate, message=what)


def _by_css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def _login(driver: Any, stack: DemoStack, name: str, role: str) -> None:
    token = asyncio.run(stack.operator_token(name, role, ttl="10m"))
    driver.get(stack.console_url + "/fleet")
    if _by_css(driver, "form.logout button"):
        _by_css(driver, "form.logout button")[0].click()
        _wait(driver, lambda d: d.current_url.endswith("/login"), what="logged out")
    driver.get(stack.login_link(token))
    _wait(driver, lambda d: d.current_url.endswith("/fleet"), what="logged in")
    assert "#token" not in driver.current_url
    who = _by_css(driver, "#who")[0]
    assert who.get_attribute("data-role") == role


def test_log_in_and_see_both_devices_on_the_fleet(
    browser: Any, stack: DemoStack, shots: Path
) -> None:
    browser.get(stack.console_url + "/fleet")
    assert browser.current_url.endswith("/login")  # nothing without a login
    _login(browser, stack, "ops-admin", "admin")
    for device_id in (PET, VACUUM):
        status = _by_css(browser, f'tr[data-device="{device_id}"] .status')
        assert status, f"{device_id} is not on the fleet page"
        assert status[0].get_attribute("data-status") == "active"
    row = _by_css(browser, f'tr[data-device="{PET}"]')[0].text
    assert PET_TYPE in row
    assert PET_REGION in row
    # Where each device is comes from the gateways' consoles (read by the core every 2 s).
    for device_id, gateway, transport in ((PET, PET_REGION, "grpc"), (VACUUM, "us-nyc", "mqtt")):
        cells = f'tr[data-device="{device_id}"]'
        _wait(
            browser,
            lambda d, c=cells, g=gateway, t=transport: (
                _by_css(d, f"{c} .gateway")[0].text == g
                and _by_css(d, f"{c} .transport")[0].text == t
                and bool(_by_css(d, f"{c} .last-seen")[0].text)
            ),
            what=f"{device_id} on {gateway} over {transport}",
        )
    browser.save_screenshot(str(shots / "fleet.png"))


def test_a_detection_with_its_box_appears_live(browser: Any, stack: DemoStack, shots: Path) -> None:
    browser.get(stack.console_url + "/gateways")
    _by_css(browser, f"#live-{PET_REGION}")[0].click()  # the camera's gateway (its region)
    _wait(browser, lambda d: d.current_url.endswith("/live"), what="gateway console login")
    assert "#link" not in browser.current_url
    tile = f"#tile-{PET}"

    def boxed(d: Any) -> bool:
        canvases = _by_css(d, f"{tile} canvas")
        return bool(canvases) and int(canvases[0].get_attribute("data-boxes") or 0) > 0

    _wait(browser, boxed, what="a live frame with boxes")
    labels = [li.get_attribute("data-label") for li in _by_css(browser, f"{tile} li.det")]
    assert labels
    # The canvas holds the frame's pixels (not a blank): sample its centre.
    filled = browser.execute_script(
        "const c = document.querySelector(arguments[0] + ' canvas');"
        "const p = c.getContext('2d').getImageData(c.width / 2, c.height / 2, 1, 1).data;"
        "return p[3] > 0 && (p[0] + p[1] + p[2]) > 0;",
        tile,
    )
    assert filled
    assert _by_css(browser, "#s-provider")[0].text  # the gateway's figures arrived too
    _wait(browser, lambda d: float(_by_css(d, "#s-fps")[0].text or 0) > 0, what="frames/s")
    # For the screenshot, one of the camera's photos with several things in it.
    _wait(
        browser,
        lambda d: int(_by_css(d, f"{tile} canvas")[0].get_attribute("data-boxes") or 0) >= 3,
        what="a frame with several boxes",
    )
    browser.save_screenshot(str(shots / "live.png"))


def test_open_an_escalation_and_see_the_cores_answer(browser: Any, stack: DemoStack) -> None:
    def listed(d: Any) -> bool:
        d.get(stack.console_url + "/escalations")
        return bool(_by_css(d, "table.escalations td a"))

    _wait(browser, listed, what="an escalation answered by the core")
    _by_css(browser, "table.escalations td a")[0].click()
    _wait(browser, lambda d: bool(_by_css(d, "#core-answer")), what="escalation page")
    answer = _by_css(browser, "#core-answer")[0].text
    assert answer.strip()
    assert "nanodet" in answer.lower() or "efficientnet" in answer.lower() or "unknown" in answer
    loaded = browser.execute_script(
        "const i = document.getElementById('crop'); return i.complete && i.naturalWidth > 0;"
    )
    assert loaded  # the crop as it left the edge


def test_revoke_a_device_and_see_it_go_offline(browser: Any, stack: DemoStack, shots: Path) -> None:
    live = browser.current_window_handle
    browser.get(stack.console_url + f"/gateways/{PET_REGION}/live")
    _wait(browser, lambda d: bool(_by_css(d, f"#tile-{PET} canvas")), what="the camera's tile")
    browser.switch_to.new_window("tab")
    browser.get(stack.console_url + f"/devices/{PET}")
    _by_css(browser, "#revoke-reason")[0].send_keys("reported stolen")
    _by_css(browser, "#revoke")[0].click()
    clicked = time.monotonic()
    _wait(
        browser,
        lambda d: bool(_by_css(d, '#device-status[data-status="revoked"]')),
        what="device page says revoked",
    )
    browser.switch_to.window(live)
    _wait(
        browser,
        lambda d: "revoked" in (_by_css(d, f"#tile-{PET} .state") or [None])[0].text,
        what="the live view marks the camera revoked and cut off",
    )
    shown_after = time.monotonic() - clicked
    browser.save_screenshot(str(shots / "revoked.png"))
    frames = int(_by_css(browser, f"#tile-{PET}")[0].get_attribute("data-frames"))
    time.sleep(3.0)
    assert int(_by_css(browser, f"#tile-{PET}")[0].get_attribute("data-frames")) == frames
    print(f"revocation shown on the gateway's live view {shown_after:.2f} s after the click")
    browser.get(stack.console_url + "/fleet")
    status = _by_css(browser, f'tr[data-device="{PET}"] .status')[0]
    assert status.get_attribute("data-status") == "revoked"
    browser.get(stack.console_url + "/audit?q=" + PET)
    assert "device.revoked" in browser.page_source
    assert "console.device_revoked" in browser.page_source


def test_a_viewer_is_refused_an_admin_action(browser: Any, stack: DemoStack) -> None:
    _login(browser, stack, "ops-viewer", "viewer")
    browser.get(stack.console_url + f"/devices/{VACUUM}")
    assert not _by_css(browser, "#revoke-form")  # no admin forms for a viewer
    # What the vacuum's gateway reported: its recent detections (labels only, no pixels).
    _wait(
        browser,
        lambda d: d.refresh() or bool(_by_css(d, "table.detections td.mono")),
        what="the vacuum's recent detections",
    )
    # Try anyway, as the page's own script could: the session's CSRF token, same origin.
    status = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "const csrf = document.querySelector('input[name=csrf]').value;"
        "fetch(arguments[0], {method: 'POST', credentials: 'same-origin',"
        " headers: {'X-CSRF-Token': csrf}, body: new URLSearchParams({reason: 'viewer'})})"
        ".then(r => done(r.status), e => done(String(e)));",
        f"/devices/{VACUUM}/revoke",
    )
    assert status == 403
    browser.get(stack.console_url + "/fleet")
    vac = _by_css(browser, f'tr[data-device="{VACUUM}"] .status')[0]
    assert vac.get_attribute("data-status") == "active"


def test_the_fleet_pages_filters_and_refreshes_on_change(browser: Any, stack: DemoStack) -> None:
    """Sixty more devices (ids after the demo's): the fleet shows 50 a page with a link to the
    next; the search narrows to ids that start with what was typed, the status filter to one
    state; and a revocation made elsewhere shows on the filtered page without a reload (the
    page's poll gets 304 until something on it changed)."""
    now = dt.datetime.now(dt.UTC)
    with pki.SqliteRegistry(pki.PkiLayout(stack.pki_dir).registry) as registry:
        for n in range(60):
            device_id = f"zz-{n:04d}"
            registry.upsert_device(device_id, type="pet_camera", region="home", now=now)
            registry.record_certificate(
                pki.CertificateRecord(
                    f"{0xF00000 + n:x}", device_id, now + dt.timedelta(days=1),
                    pki.Status.ACTIVE, now,
                )
            )  # fmt: skip
    _login(browser, stack, "ops-pager", "viewer")
    browser.get(stack.console_url + "/fleet")
    rows = _by_css(browser, "#fleet tr[data-device]")
    assert len(rows) == 50
    assert [r.get_attribute("data-device") for r in rows[:2]] == [PET, VACUUM]
    assert _by_css(browser, '[data-count="all"]')[0].text == "62"
    _by_css(browser, "#next-page")[0].click()
    _wait(browser, lambda d: "page=2" in d.current_url, what="the second page")
    ids = [r.get_attribute("data-device") for r in _by_css(browser, "#fleet tr[data-device]")]
    assert ids == [f"zz-{n:04d}" for n in range(48, 60)]
    assert not _by_css(browser, "#next-page")

    search = _by_css(browser, 'form.filters input[name="q"]')[0]
    search.clear()
    search.send_keys("zz-003")
    _by_css(browser, "form.filters button")[0].click()
    _wait(browser, lambda d: "q=zz-003" in d.current_url, what="the search")
    ids = [r.get_attribute("data-device") for r in _by_css(browser, "#fleet tr[data-device]")]
    assert ids == [f"zz-{n:04d}" for n in range(30, 40)]
    assert "10 matching" in _by_css(browser, "#page-info")[0].text

    with pki.SqliteRegistry(pki.PkiLayout(stack.pki_dir).registry) as registry:
        registry.revoke_device("zz-0031", reason="lost", now=dt.datetime.now(dt.UTC))
    _wait(
        browser,
        lambda d: bool(_by_css(d, 'tr[data-device="zz-0031"] .status[data-status="revoked"]')),
        within_s=30,
        what="the revocation shown without a reload",
    )
    assert "q=zz-003" in browser.current_url  # no navigation happened

    browser.get(stack.console_url + "/fleet?status=revoked")
    ids = {r.get_attribute("data-device") for r in _by_css(browser, "#fleet tr[data-device]")}
    assert "zz-0031" in ids
    assert VACUUM not in ids
    statuses = {s.get_attribute("data-status") for s in _by_css(browser, "#fleet .status")}
    assert statuses == {"revoked"}
