"""Which detections escalate, budgets with exact counts, and the [escalation] table's checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway import (
    Box,
    Detection,
    EscalationSettings,
    GatewaySettings,
    InferenceResult,
    RegionPolicy,
)
from gateway._door import result_to_pb
from gateway._escalation import Budgets, select
from gateway._events import EscalationId
from gateway.errors import ConfigError


def det(label: str, score: float, box: Box | None = None) -> Detection:
    return Detection(label=label, class_id=0, score=score, box=box or Box(0.1, 0.1, 0.5, 0.5))


def tile(i: int, side: float = 0.1) -> Box:
    """Non-overlapping boxes along the top of the frame."""
    return Box(i * 0.12, 0.0, i * 0.12 + side, side)


def test_band_is_half_open() -> None:
    policy = RegionPolicy(band_low=0.5, band_high=0.7)
    dets = (
        det("Cat", 0.69, tile(0)),
        det("Dog", 0.7, tile(1)),
        det("Person", 0.5, tile(2)),
        det("Chair", 0.95, tile(3)),
    )
    chosen = select(policy, dets)
    assert sorted((c.index, c.reason) for c in chosen) == [(0, "uncertain"), (2, "uncertain")]


def test_label_outside_the_region_set_escalates_whatever_its_score() -> None:
    policy = RegionPolicy(band_low=0.5, band_high=0.6, edge_labels=("Person", "Cat"))
    dets = (det("Cat", 0.9, tile(0)), det("Car", 0.95, tile(1)), det("Person", 0.55, tile(2)))
    chosen = select(policy, dets)
    assert [(c.index, c.reason) for c in chosen] == [(1, "outside_edge_set"), (2, "uncertain")]


def test_the_cap_takes_the_doubtful_person_not_the_borderline_specks() -> None:
    # Four small boxes at the edge's threshold and a doubtful person filling the frame's
    # middle: ranking by score spent the cap of 4 on the specks and left the person out.
    specks = tuple(det("Bottle", 0.5 + i / 1000, tile(i, side=0.05)) for i in range(4))
    person = det("Person", 0.63, Box(0.3, 0.2, 0.7, 0.95))
    chosen = select(RegionPolicy(max_per_frame=4), (*specks, person))
    assert next((c.index, c.reason) for c in chosen) == (4, "uncertain")
    assert len(chosen) == 4


def test_one_escalation_per_object() -> None:
    # The edge hesitating between two labels on one box is one doubtful object, not two.
    box = Box(0.2, 0.2, 0.6, 0.9)
    dets = (det("Dog", 0.6, box), det("Cattle", 0.55, Box(0.21, 0.2, 0.6, 0.88)))
    assert [c.index for c in select(RegionPolicy(), dets)] == [0]


def test_empty_frames_escalate_whole_by_default_where_frames_may_leave() -> None:
    # The default region sends crops only: an empty frame has nothing to send.
    assert select(RegionPolicy(), ()) == []
    frames = RegionPolicy(send="frame")
    assert [(c.index, c.reason) for c in select(frames, ())] == [(None, "empty_frame")]
    assert select(RegionPolicy(send="frame", escalate_empty_frames=False), ()) == []
    capped = RegionPolicy(band_low=0.5, band_high=1.0, max_per_frame=2)
    assert len(select(capped, tuple(det("Cat", 0.6, tile(i)) for i in range(5)))) == 2


def test_empty_frames_have_a_budget_of_their_own() -> None:
    now = [1000.0]
    budgets = Budgets(clock=lambda: now[0])
    policy = RegionPolicy(send="frame", empty_frame_budget_per_min=2, device_budget_per_min=10)
    frames = [budgets.try_take("dev-a", "home", policy, whole_frame=True) for _ in range(3)]
    assert frames == [None, None, "empty_frame_budget"]
    # Detections of the same device still escalate: only whole frames are held back.
    assert budgets.try_take("dev-a", "home", policy) is None
    # Another device has its own empty-frame budget.
    assert budgets.try_take("dev-b", "home", policy, whole_frame=True) is None
    now[0] += 30.0  # 2/min = one every 30 s
    assert budgets.try_take("dev-a", "home", policy, whole_frame=True) is None


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
    from gateway import load_gateway_settings

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


def test_the_reason_for_each_escalation_is_shown_on_its_detection() -> None:
    def result(*detections: Detection) -> InferenceResult:
        return InferenceResult(detections, "m", "1", 1.0, False, 64, 64)

    marked = result_to_pb(
        result(det("Person", 0.6), det("Car", 0.9)),
        frame_id="f1",
        gateway_id="gw",
        escalated={
            0: EscalationId("esc-a", "uncertain"),
            1: EscalationId("esc-b", "outside_edge_set"),
        },
    )
    assert [(d.escalation_id, d.escalation_reason) for d in marked.detections] == [
        ("esc-a", "uncertain"),
        ("esc-b", "outside_edge_set"),
    ]
    empty = result_to_pb(
        result(),
        frame_id="f2",
        gateway_id="gw",
        escalated={None: EscalationId("esc-c", "empty_frame")},
    )
    (whole,) = empty.detections
    assert (whole.label, whole.escalation_reason, whole.box.x_max) == (
        "unknown",
        "empty_frame",
        1.0,
    )


def test_without_edge_labels_the_answering_models_labels_are_the_edge_set() -> None:
    # A region may run another edge model (inference.region_models): the hook passes the
    # labels of the model that answered, and a label outside them is outside the edge set.
    dets = (det("dog", 0.9, tile(0)), det("Dog", 0.9, tile(1)))
    chosen = select(RegionPolicy(), dets, model_labels=("dog", "cat"))
    assert [(c.index, c.reason) for c in chosen] == [(1, "outside_edge_set")]
    assert select(RegionPolicy(), dets) == []  # no list known: the band alone decides
    # The region's own edge set, where it names one, is what counts.
    named = RegionPolicy(edge_labels=("Dog",))
    chosen = select(named, dets, model_labels=("dog", "cat"))
    assert [(c.index, c.reason) for c in chosen] == [(0, "outside_edge_set")]
