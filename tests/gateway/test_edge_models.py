"""Edge models per region through a running gateway: configuration, routing, idle release."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway import ConfigError, FrontDoor, InferenceResult, load_gateway_settings
from gateway._door import Admitted
from protos.edgeward.v1 import common_pb2
from tests._support.gateway import MODELS, start_gateway

from ._helpers import wait_until

SSD = "edge_ssd_mobilenetv2_oid24"
NANODET = "core_nanodet_coco80"


def _frame(photos: Path, name: str, frame_id: str = "f") -> common_pb2.Frame:
    return common_pb2.Frame(image=(photos / name).read_bytes(), frame_id=frame_id)


def _base(tmp_path: Path, **inference: Any) -> dict[str, Any]:
    return {
        "identity_dir": tmp_path,
        "pki_dir": tmp_path,
        "inference": {"models_dir": MODELS, **inference},
    }


def test_a_region_naming_an_unknown_model_stops_the_start_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError) as info:
        load_gateway_settings(None, overrides=_base(tmp_path, region_models={"lab": "yolo-x"}))
    message = str(info.value)
    assert "inference.region_models.lab: 'yolo-x'" in message
    assert f"it has: {NANODET}, {SSD}" in message  # what the manifest offers the edge
    assert "EDGEWARD_GATEWAY_INFERENCE__REGION_MODELS__LAB" in message
    # The default model too; and a model that is no detector (the core's classifier).
    with pytest.raises(ConfigError, match=r"inference\.model: 'core_efficientnet_lite2'"):
        load_gateway_settings(None, overrides=_base(tmp_path, model="core_efficientnet_lite2"))
    # An environment override names the region as the registry spells it.
    monkeypatch.setenv("EDGEWARD_GATEWAY_INFERENCE__REGION_MODELS__LAB_EU", NANODET)
    settings = load_gateway_settings(None, overrides=_base(tmp_path))
    assert settings.inference.region_models == {"lab-eu": NANODET}


def test_edge_labels_must_be_labels_of_the_model_the_region_runs(tmp_path: Path) -> None:
    def settings(labels: list[str], **inference: Any) -> Any:
        base = _base(tmp_path, **inference)
        base["core_address"] = "127.0.0.1:1"
        base["escalation"] = {"regions": {"lab": {"edge_labels": labels}}}
        return load_gateway_settings(None, overrides=base)

    # The SSD's vocabulary is capitalised (Open Images); NanoDet's is COCO's.
    assert settings(["Person", "Cat"]).inference.region_models == {}
    with pytest.raises(ConfigError) as info:
        settings(["Person", "Cat"], region_models={"lab": NANODET})
    assert "escalation.regions.lab.edge_labels: 'Person', 'Cat' not labels of " in str(info.value)
    assert settings(["person", "cat"], region_models={"lab": NANODET})
    # A region without a policy of its own is judged by the gateway region's: its labels
    # must be labels of that region's model too.
    base = _base(tmp_path, region_models={"lab": NANODET})
    base["region"] = "home"
    base["core_address"] = "127.0.0.1:1"
    base["escalation"] = {"regions": {"home": {"edge_labels": ["Person"]}}}
    with pytest.raises(ConfigError, match=r"escalation\.regions\.home\.edge_labels: 'Person'"):
        load_gateway_settings(None, overrides=base)


async def test_frames_go_through_their_region_model_and_the_hook_knows_which(
    issue: Any, tmp_path: Path, photos: Path
) -> None:
    overrides = {
        "inference": {"models_dir": MODELS, "threads": 1, "region_models": {"lab": NANODET}},
        "cache": {"enabled": True},
    }
    async with start_gateway(issue=issue, tmp_path=tmp_path, overrides=overrides) as gw:
        gw.register("cam-home", "pet_camera", region="home")
        gw.register("cam-lab", "pet_camera", region="lab")
        assert gw.service.models.loaded() == {SSD}  # preloaded; the region's waits for a frame
        results = {}
        for device in ("cam-home", "cam-lab"):
            async with gw.channel(issue("device", device)) as channel:
                stub = gw.stub(channel)
                first = await stub.Detect(_frame(photos, "dog.jpg"), timeout=60)
                again = await stub.Detect(_frame(photos, "dog.jpg"), timeout=60)
            results[device] = (first, again)
        home, home_again = results["cam-home"]
        lab, lab_again = results["cam-lab"]
        # The same bytes: each region's model ran them, neither got the other's answer.
        assert (home.model_name, home.from_cache) == (SSD, False)
        assert (lab.model_name, lab.from_cache) == (NANODET, False)
        assert "Dog" in {d.label for d in home.detections}
        assert "dog" in {d.label for d in lab.detections}
        assert (home_again.model_name, home_again.from_cache) == (SSD, True)
        assert (lab_again.model_name, lab_again.from_cache) == (NANODET, True)
        assert gw.service.models.loaded() == {SSD, NANODET}
        text = gw.metrics_text()
        assert f'edgeward_gateway_edge_model_loads_total{{model="{NANODET}"}} 1.0' in text

        # The detection hook (escalation's seam) is told which model answered, with its labels.
        seen: list[InferenceResult] = []

        async def hook(**kwargs: Any) -> dict[int | None, str]:
            seen.append(kwargs["result"])
            return {}

        door = gw.service.door
        assert isinstance(door, FrontDoor)
        door.detection_hook = hook
        image = (photos / "chelsea.jpg").read_bytes()
        for region in ("lab", "home"):
            admitted = Admitted(f"cam-{region}", None, "Detect", region)
            await door.detect(admitted, frame_id="h", image=image, deadline=None)
        assert [(r.model_name, len(r.labels)) for r in seen] == [(NANODET, 80), (SSD, 24)]
        assert "cat" in seen[0].labels
        assert "cat" not in seen[1].labels
        assert "Cat" in seen[1].labels


async def test_an_idle_model_is_released_and_loaded_again_by_the_next_frame(
    issue: Any, tmp_path: Path, photos: Path
) -> None:
    overrides = {
        "inference": {"models_dir": MODELS, "threads": 1, "preload": False, "idle_release_s": 0.3}
    }
    with capture_logs() as logs:
        async with start_gateway(
            issue=issue, tmp_path=tmp_path, overrides=overrides, use_registry=False
        ) as gw:
            gw.register("cam-idle", "pet_camera")
            models = gw.service.models
            assert models.loaded() == frozenset()  # nothing until a frame needs it
            async with gw.channel(issue("device", "cam-idle")) as channel:
                stub = gw.stub(channel)
                first = await stub.Detect(_frame(photos, "chelsea.jpg"), timeout=60)
                await wait_until(lambda: models.loaded() == frozenset(), within_s=60)
                # Released: the next frame loads it again and is answered, not refused.
                second = await stub.Detect(_frame(photos, "chelsea.jpg"), timeout=60)
            assert [d.label for d in first.detections] == ["Cat"]
            assert [d.label for d in second.detections] == ["Cat"]
            assert models.loads(SSD) >= 2
            text = gw.metrics_text()
            assert f'edgeward_gateway_edge_model_releases_total{{model="{SSD}"}}' in text
    events = [e["event"] for e in logs if e.get("model") == SSD]
    assert events[:3] == ["edge model loaded", "edge model released", "edge model loaded"]
