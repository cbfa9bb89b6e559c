"""``edgeward gateway run`` from flags alone does what the product is for: with ``--core`` it
escalates under the default policy of its region, and it serves MQTT when Mosquitto is
installed (saying so in one line when it is not). The environment wins over these defaults;
the README walk-through (``tests/test_readme_walkthrough.py``) runs them end to end."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from edgeward import _cli_gateway
from gateway import EscalationSettings, MqttSettings, load_gateway_settings
from tests.conftest import require_tool


def _flags(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:7500",
        "identity_dir": tmp_path / "id-gw-seoul",
        "region": "kr-seoul",
        **extra,
    }


def test_a_gateway_given_a_core_escalates_and_speaks_mqtt(tmp_path: Path) -> None:
    require_tool("mosquitto")
    settings = load_gateway_settings(None, overrides=_flags(tmp_path, core_address="core:7443"))
    assert settings.mqtt is None
    assert settings.escalation is None
    with capture_logs() as logs:
        quick = _cli_gateway._quick_start_defaults(settings)
    escalation = quick.section("escalation", EscalationSettings)
    assert escalation is not None
    assert escalation.enabled
    assert set(escalation.regions) == {"kr-seoul"}
    policy = escalation.regions["kr-seoul"]
    # The safe defaults: crops only, faces blurred before any pixel leaves.
    assert policy.send == "crop"
    assert policy.require_face_blur
    assert policy.band_low < policy.band_high
    assert escalation.outbox_path == Path("var/id-gw-seoul/escalation-outbox.sqlite3")
    mqtt = quick.section("mqtt", MqttSettings)
    assert mqtt is not None
    assert mqtt.enabled
    assert mqtt.managed
    assert (mqtt.host, mqtt.port, mqtt.bridge_port) == ("127.0.0.1", 7501, 0)
    assert mqtt.bridge_host == "127.0.0.1"
    assert mqtt.data_dir == Path("var/id-gw-seoul/mqtt")
    events = [entry["event"] for entry in logs]
    assert any(e.startswith("MQTT on") for e in events), events
    assert any(e.startswith("escalation on") for e in events), events


def test_without_mosquitto_mqtt_is_off_with_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    settings = load_gateway_settings(None, overrides=_flags(tmp_path, core_address="core:7443"))
    with capture_logs() as logs:
        quick = _cli_gateway._quick_start_defaults(settings)
    assert quick.mqtt is None
    off = [entry for entry in logs if entry["event"].startswith("MQTT off")]
    assert len(off) == 1, logs
    assert "mosquitto not found" in off[0]["event"]
    assert off[0]["log_level"] == "warning"
    assert quick.escalation is not None  # escalation does not need the broker


def test_standalone_gateway_has_no_core_to_escalate_to(tmp_path: Path) -> None:
    settings = load_gateway_settings(None, overrides=_flags(tmp_path, pki_dir=tmp_path / "trust"))
    assert _cli_gateway._quick_start_defaults(settings).escalation is None


def test_the_environment_wins_over_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEWARD_GATEWAY_MQTT__ENABLED", "false")
    monkeypatch.setenv("EDGEWARD_GATEWAY_ESCALATION__ENABLED", "false")
    settings = load_gateway_settings(None, overrides=_flags(tmp_path, core_address="core:7443"))
    quick = _cli_gateway._quick_start_defaults(settings)
    mqtt = quick.section("mqtt", MqttSettings)
    escalation = quick.section("escalation", EscalationSettings)
    assert mqtt is not None
    assert not mqtt.enabled
    assert escalation is not None
    assert not escalation.enabled


@pytest.mark.parametrize(("listen", "mqtt_port"), [("127.0.0.1:0", 0), ("[::1]:65535", 0)])
def test_the_mqtt_port_follows_the_grpc_port_only_when_it_can(
    tmp_path: Path, listen: str, mqtt_port: int
) -> None:
    require_tool("mosquitto")
    settings = load_gateway_settings(
        None, overrides=_flags(tmp_path, core_address="core:7443", listen=listen)
    )
    mqtt = _cli_gateway._quick_start_defaults(settings).section("mqtt", MqttSettings)
    assert mqtt is not None
    assert mqtt.port == mqtt_port
