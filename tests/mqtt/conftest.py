"""Fixtures for the MQTT tests: a real Mosquitto managed by the gateway's own code.

Every broker runs on free loopback ports with the gateway identity minted from the session
PKI; the CRL is built by the test (``harness.revoke_serial``) the way the core would build it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests._support.mqtt import BrokerHarness
from tests.conftest import IssueFn, require_tool

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"


@pytest.fixture
async def harness(pki_dir: Path, issue: IssueFn, tmp_path: Path) -> AsyncIterator[BrokerHarness]:
    """A managed broker (devices' and bridge listeners), control client and enforcer."""
    require_tool("mosquitto")
    gateway = issue("gateway", "gw-mqtt")
    h = BrokerHarness(pki_dir=pki_dir, gateway=gateway, data_dir=tmp_path / "mqtt")
    async with h.run():
        yield h


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The committed edge model; missing fails under CI=true, skips elsewhere."""
    if not (MODELS / "edge_ssd_mobilenetv2_oid24.onnx").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail("models/edge_ssd_mobilenetv2_oid24.onnx missing")
        pytest.skip("models/edge_ssd_mobilenetv2_oid24.onnx missing; run scripts/build_models.py")
    return MODELS
