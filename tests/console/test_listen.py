"""A console on a port in use stops its service's start with an error naming console_listen
(the project's one check, ``gateway._wire.check_listen``), and console_enabled turns it off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway import load_core_settings
from gateway.errors import ListenError
from tests._support.core import running_core
from tests._support.gateway import start_gateway

pytestmark = pytest.mark.timeout(120)


async def test_a_busy_console_port_names_the_setting(
    pki_dir: Path, tmp_path: Path, issue: Any
) -> None:
    async with running_core(pki_dir, tmp_path, console_listen="127.0.0.1:0") as first:
        busy = f"127.0.0.1:{first.server.console.port}"
        with pytest.raises(ListenError) as caught:
            async with running_core(pki_dir, tmp_path, console_listen=busy):
                pass
        assert caught.value.setting == "console_listen"
        assert "address already in use" in str(caught.value)
        with pytest.raises(ListenError) as caught:
            async with start_gateway(
                issue=issue, tmp_path=tmp_path, overrides={"console_listen": busy}
            ):
                pass
        assert caught.value.setting == "console_listen"


async def test_console_enabled_false_serves_none(pki_dir: Path, tmp_path: Path, issue: Any) -> None:
    async with running_core(pki_dir, tmp_path, console_enabled=False) as core:
        assert core.server.console is None
    async with start_gateway(
        issue=issue, tmp_path=tmp_path, overrides={"console_enabled": False}
    ) as gw:
        assert gw.service.console is None
        assert gw.service.door.detection_hook is None  # nothing wrapped either


def test_the_console_listens_on_loopback_by_default(
    pki_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGEWARD_CORE_CONSOLE_LISTEN", raising=False)
    settings = load_core_settings(None, pki_dir=pki_dir)
    assert settings.console_enabled is True
    assert settings.console_listen == "127.0.0.1:9443"
    with pytest.raises(Exception, match="console_gateways"):
        load_core_settings(None, pki_dir=pki_dir, console_gateways={"gw-a": "http://x:1"})
