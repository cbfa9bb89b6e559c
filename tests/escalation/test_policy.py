"""Which detections escalate, budgets with exact counts, and the [escalation] table's checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway._config import GatewaySettings
from gateway._escalation import Budgets, EscalationSettings, RegionPolicy, select
from gateway._inference._detection import Box, Detection
from gateway.errors import ConfigError


def det(label: str, score: float) -> Detection:
    return Detection(label=label, class_id=0, score=score, box=Box(0.1, 0.1, 0.5, 0.5))


def test_band_is_half_open_and_most_doubtful_first() -> None:
    policy = RegionPolicy(band_low=0.5, band_high=0.7)
    dets = (det("Cat", 0.69), det("Dog", 0.7), det("Person", 0.5), det("Chair", 0.95))
    chosen = select(policy, dets)
    assert [(c.index, c.reason) for c in chosen] == [(2, "uncertain"), (0, "uncertain")]


def test_label_outside_the_region_set_escalates_whatever_its_score() -> None:
    policy = RegionPolicy(band_low=0.5, band_high=0.6, edge_labels=("Person", "Cat"))
    dets = (det("Cat", 0.9), det("Car", 0.95), det("Person", 0.55))
    chosen = select(policy, dets)
    assert [(c.index, c.reason) for c in chosen] == [(1, "outside_edge_set"), (2, "uncertain")]


def test_empty_frames_only_when_asked_and_at_most_max_per_frame() -> None:
    assert select(RegionPolicy(), ()) == []
    frames = RegionPolicy(escalate_empty_frames=True, send="frame")
    assert [(c.index, c.reason) for c in select(frames, ())] == [(None, "empty_frame")]
    capped = RegionPolicy(band_low=0.0, band_high=1.0, max_per_frame=2)
    assert len(select(capped, tuple(det("Cat", 0.6) for _ in range(5)))) == 2


def test_device_and_region_budgets_with_exact_counts() -> None:
    now = [1000.0]
    budgets = Budgets(clock=lambda: now[0])
    policy = RegionPolicy(device_budget_per_min=3, region_budget_per_min=4)
    results = [budgets.try_take("dev-a", "home", policy) for _ in range(5)]
    assert results == [None, None, None, "device_budget", "device_budget"]
    # dev-b has its own device budget, but the region has one token left.
    assert [budgets.try_take("dev-b", "home", policy) for _ in range(2)] == [
        None,
        "region_budget",
    ]
    # Tokens come back at the configured rate: 3/min for the device = one per 20 s.
    now[0] += 20.0
    assert budgets.try_take("dev-a", "home", policy) is None
    assert budgets.try_take("dev-a", "home", policy) == "device_budget"


def test_config_refuses_unknown_keys_and_inconsistent_policies(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        RegionPolicy(band_low=0.8, band_high=0.6)
    with pytest.raises(ValidationError, match="escalate_empty_frames needs send"):
        RegionPolicy(escalate_empty_frames=True)
    with pytest.raises(ValidationError):
        EscalationSettings(retry_backoff_base_s=10, retry_backoff_max_s=1)
    settings = GatewaySettings(
        identity_dir=tmp_path,
        escalation={"regions": {"home": {"band_low": 0.5, "colour": "red"}}},
    )
    with pytest.raises(ConfigError) as info:
        settings.section("escalation", EscalationSettings)
    message = str(info.value)
    assert "escalation.regions.home.colour: unknown key" in message
    assert "EDGEWARD_GATEWAY_ESCALATION__REGIONS__HOME__COLOUR" in message


def test_policy_for_a_region() -> None:
    settings = EscalationSettings(
        regions={"home": RegionPolicy(), "lab": RegionPolicy(enabled=False)}
    )
    assert settings.policy_for("home", "home") is settings.regions["home"]
    assert settings.policy_for("elsewhere", "home") is settings.regions["home"]
    assert settings.policy_for("lab", "home") is None
    assert settings.policy_for(None, "nowhere") is None
    assert (
        EscalationSettings(enabled=False, regions={"home": RegionPolicy()}).policy_for(
            "home", "home"
        )
        is None
    )


def test_plugin_entry_point(tmp_path: Path) -> None:
    from gateway._escalation import plugin

    assert plugin(GatewaySettings(identity_dir=tmp_path)) is None
    off = GatewaySettings(identity_dir=tmp_path, escalation={"enabled": False})
    assert plugin(off) is None
    on = GatewaySettings(
        identity_dir=tmp_path,
        core_address="127.0.0.1:7443",
        escalation={"regions": {"home": {}}},
    )
    assert callable(plugin(on))
    # No core anywhere: refused at start, not as a refusal on every frame.
    with pytest.raises(ConfigError, match=r"escalation\.core_address: no core .* home"):
        plugin(GatewaySettings(identity_dir=tmp_path, escalation={"regions": {"home": {}}}))
    with pytest.raises(ConfigError, match=r"escalation\.outbox: unknown key"):
        plugin(GatewaySettings(identity_dir=tmp_path, escalation={"outbox": "x"}))


_GATEWAY_TOML = """
gateway_id = "gw-1"
identity_dir = "{identity}"
core_address = "127.0.0.1:7443"
{inference}
[escalation.regions.home-eu]
band_low = {low}
band_high = 0.7
"""


def _write_config(tmp_path: Path, *, low: float, inference: str = "") -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(_GATEWAY_TOML.format(identity=tmp_path, inference=inference, low=low))
    return path


def test_a_band_below_the_engine_threshold_is_refused_naming_both_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway._config import load_gateway_settings

    # The engine (threshold 0.5 by default) never reports a 0.3 detection: refused.
    with pytest.raises(ConfigError) as info:
        load_gateway_settings(_write_config(tmp_path, low=0.3))
    message = str(info.value)
    assert "escalation.regions.home-eu.band_low: 0.3 is below inference.score_threshold (0.5)" in (
        message
    )
    assert "EDGEWARD_GATEWAY_ESCALATION__REGIONS__HOME_EU__BAND_LOW" in message
    assert "EDGEWARD_GATEWAY_INFERENCE__SCORE_THRESHOLD" in message
    # A threshold raised by the environment makes the default band (0.5) refused as well.
    monkeypatch.setenv("EDGEWARD_GATEWAY_INFERENCE__SCORE_THRESHOLD", "0.6")
    with pytest.raises(ConfigError, match=r"band_low: 0\.5 is below .*score_threshold \(0\.6\)"):
        load_gateway_settings(_write_config(tmp_path, low=0.5))
    monkeypatch.delenv("EDGEWARD_GATEWAY_INFERENCE__SCORE_THRESHOLD")
    # Valid: the band starts at the threshold, or the threshold was lowered to the band.
    ok = load_gateway_settings(_write_config(tmp_path, low=0.5))
    section = ok.section("escalation", EscalationSettings)
    assert section is not None
    assert section.regions["home-eu"].band_low == 0.5
    lowered = load_gateway_settings(
        _write_config(tmp_path, low=0.3, inference="[inference]\nscore_threshold = 0.3\n")
    )
    assert lowered.inference.score_threshold == 0.3
    # An empty band escalates nothing, whatever its value; a disabled region is not judged.
    empty = tmp_path / "empty.toml"
    empty.write_text(
        _GATEWAY_TOML.format(identity=tmp_path, inference="", low=0.0).replace(
            "band_high = 0.7", "band_high = 0.0"
        )
    )
    assert load_gateway_settings(empty).escalation is not None
    off = tmp_path / "off.toml"
    off.write_text(_write_config(tmp_path, low=0.3).read_text() + "enabled = false\n")
    assert load_gateway_settings(off).escalation is not None
