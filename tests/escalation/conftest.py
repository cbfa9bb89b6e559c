"""Fixtures for the escalation tests: a real core (CoreServer + EscalateService over mTLS),
a gateway identity, the edge model's answers on real photos, and an escalator factory."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import pki
from gateway import (
    CoreEscalationSettings,
    CoreServer,
    Detection,
    EscalateService,
    EscalationSettings,
    EventPayload,
    RegionPolicy,
    load_core_settings,
)
from gateway._escalation import Escalator
from gateway._inference._image import decode_image
from gateway._inference._manifest import load_manifest, open_session
from gateway._inference._ssd import postprocess_ssd, preprocess_ssd
from tests.conftest import PHOTOS, ROOT, IssueFn

MODELS = ROOT / "models"
EDGE_MODEL = "edge_ssd_mobilenetv2_oid24"


@functools.cache
def _edge_session() -> Any:
    return open_session(load_manifest(MODELS), EDGE_MODEL)


@functools.cache
def frame_of(name: str) -> npt.NDArray[np.uint8]:
    """A photo from tests/data/photos, decoded."""
    frame = decode_image((PHOTOS / name).read_bytes(), max_pixels=40_000_000)
    frame.setflags(write=False)
    return frame


@functools.cache
def edge_detections(name: str) -> tuple[Detection, ...]:
    """What the real edge model (SSD, OID-24) sees in a photo."""
    session = _edge_session()
    boxes, classes = session.run(
        ["box_encodings", "class_predictions"], {"input": preprocess_ssd([frame_of(name)])}
    )
    labels = load_manifest(MODELS).entry(EDGE_MODEL).labels
    return postprocess_ssd(boxes, classes, labels)[0]


class Recorder:
    """An answer sink recording ``(device_id, payload)`` (a seam we own: EventHub.publish)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, EventPayload]] = []

    def __call__(self, device_id: str, payload: EventPayload) -> None:
        self.events.append((device_id, payload))

    def ids(self) -> list[str]:
        return [getattr(p, "escalation_id", "") for _, p in self.events]


class Cores:
    """Starts real cores (mTLS CoreServer with an EscalateService) for one test."""

    def __init__(self, pki_dir: Path, tmp_path: Path) -> None:
        self.pki_dir = pki_dir
        self.tmp_path = tmp_path
        self.services: list[EscalateService] = []

    def service(self, **overrides: Any) -> EscalateService:
        settings = CoreEscalationSettings(
            models_dir=MODELS,
            providers="cpu",
            answer_store=self.tmp_path / "core-answers.sqlite3",
            **overrides,
        )
        svc = EscalateService(settings)
        self.services.append(svc)
        return svc

    @property
    def runs(self) -> int:
        """Model runs over every core started in this test."""
        return sum(s.models.runs for s in self.services)

    @contextlib.asynccontextmanager
    async def run(
        self, handler: Any = None, *, port: int = 0, **overrides: Any
    ) -> AsyncIterator[CoreServer]:
        settings = load_core_settings(
            None,
            pki_dir=self.pki_dir,
            core_id="core-esc",
            listen=f"127.0.0.1:{port}",
            enrol_listen="127.0.0.1:0",
            metrics_listen="127.0.0.1:0",
            identity_dir=self.tmp_path / "core-identity",
            registry=self.tmp_path / "registry.sqlite3",
            shutdown_grace_s=0.2,
        )
        async with CoreServer(settings, escalate=handler or self.service(**overrides)) as core:
            yield core


@pytest.fixture
def cores(pki_dir: Path, tmp_path: Path) -> Cores:
    return Cores(pki_dir, tmp_path)


@pytest.fixture
def gateway_identity(issue: IssueFn) -> pki.IdentityFiles:
    return issue("gateway", "gw-esc")


def region(**overrides: Any) -> RegionPolicy:
    """A region policy for tests: no face blur unless asked (faster), generous budgets."""
    base: dict[str, Any] = {
        "require_face_blur": False,
        "device_budget_per_min": 1000.0,
        "region_budget_per_min": 1000.0,
        "empty_frame_budget_per_min": 1000.0,
    }
    base.update(overrides)
    return RegionPolicy(**base)


EscalatorFactory = Callable[..., Escalator]


@pytest.fixture
def make_escalator(gateway_identity: pki.IdentityFiles, tmp_path: Path) -> EscalatorFactory:
    """``make_escalator(core_address, sink, policy=…, **settings)`` → an Escalator (not open)."""

    def make(
        core_address: str,
        sink: Callable[[str, EventPayload], object],
        *,
        policy: RegionPolicy | None = None,
        clock: Callable[[], float] | None = None,
        **settings: Any,
    ) -> Escalator:
        values: dict[str, Any] = {
            "outbox_path": tmp_path / "outbox.sqlite3",
            "retry_backoff_base_s": 0.05,
            "retry_backoff_max_s": 0.3,
            "call_timeout_s": 5.0,
            "regions": {"home": policy or region()},
        }
        values.update(settings)
        extra: dict[str, Any] = {} if clock is None else {"clock": clock}
        return Escalator(
            EscalationSettings(**values),
            gateway_id="gw-esc",
            gateway_region="home",
            credentials=pki.grpc_channel_credentials(
                ca_bundle_pem=gateway_identity.ca_bundle.read_bytes(), identity=gateway_identity
            ),
            sink=sink,
            models_dir=MODELS,
            default_core_address=core_address,
            **extra,
        )

    return make
