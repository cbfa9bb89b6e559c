"""One process per port: a second server on a port in use stops with an error naming the setting.

gRPC turns ``SO_REUSEPORT`` on by default, so without care a second core on the same port
starts fine and the kernel splits connections between the two processes. Every listener the
project opens is checked here against a real first server: the core's mutual-TLS, enrolment
and metrics ports (Python API and ``edgeward core run``), the gateway's gRPC and metrics ports,
and the managed Mosquitto's two listeners.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import pki
from gateway import MqttSettings
from gateway._mqtt import MosquittoBroker
from gateway.errors import ListenError
from tests._support.core import running_core
from tests._support.gateway import ROOT, start_gateway
from tests._support.mqtt import BrokerHarness
from tests.conftest import TRUST_DOMAIN, IssueFn, require_tool

pytestmark = pytest.mark.timeout(120)

EDGEWARD = [sys.executable, "-c", "from edgeward.cli import main; main()"]


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


async def test_a_second_core_on_a_busy_port_names_the_setting(
    pki_dir: Path, tmp_path: Path
) -> None:
    async with running_core(pki_dir, tmp_path) as first:
        metrics = f"127.0.0.1:{first.server.metrics_port}"
        for setting, overrides in (
            ("listen", {"listen": first.address}),
            ("enrol_listen", {"enrol_listen": first.enrol_address}),
            ("metrics_listen", {"metrics_listen": metrics}),
        ):
            with pytest.raises(ListenError) as caught:
                async with running_core(pki_dir, tmp_path, **overrides):
                    pass
            assert caught.value.setting == setting
            message = str(caught.value)
            assert f"({setting})" in message
            assert "address already in use" in message
            assert "\n" not in message
        # The first core still answers on its ports.
        async with first.channel() as channel:
            await asyncio.wait_for(channel.channel_ready(), 10)


async def test_edgeward_core_run_on_a_busy_port_exits_with_one_line(
    pki_dir: Path, tmp_path: Path
) -> None:
    """The quick start's second instance: exit 1 and one error line naming ``listen``."""
    own_pki = tmp_path / "pki"
    pki.init_pki(own_pki, trust_domain=TRUST_DOMAIN)
    async with running_core(pki_dir, tmp_path) as first:
        proc = await asyncio.create_subprocess_exec(
            *EDGEWARD, "core", "run", "--pki-dir", str(own_pki), "--listen", first.address,
            "--enrol-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            _out, err = await asyncio.wait_for(proc.communicate(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            pytest.fail("a second core started on a port in use and kept serving")
        errors = [line for line in err.decode().splitlines() if line.startswith("Error:")]
        assert proc.returncode == 1
        assert errors == [
            f"Error: cannot listen on {first.address} (listen): "
            "address already in use (is another instance running?)"
        ]
        # The port was refused before anything was issued into the PKI.
        assert not (own_pki / "servers").exists() or not any((own_pki / "servers").iterdir())


@pytest.mark.slow
async def test_a_second_gateway_on_a_busy_port_names_the_setting(
    issue: IssueFn, tmp_path: Path
) -> None:
    async with start_gateway(issue=issue, tmp_path=tmp_path, gateway_id="gw-first") as first:
        metrics = f"127.0.0.1:{first.service.metrics_port}"
        for setting, overrides in (
            ("listen", {"listen": first.address}),
            ("metrics_listen", {"metrics_listen": metrics}),
        ):
            with pytest.raises(OSError, match=rf"\({setting}\): address already in use"):
                async with start_gateway(
                    issue=issue, tmp_path=tmp_path, gateway_id="gw-second", overrides=overrides
                ):
                    pass
        # The first gateway still answers.
        async with first.channel(issue("device", "cam-ports")) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_second_managed_broker_on_a_busy_port_names_the_setting(
    pki_dir: Path, issue: IssueFn, tmp_path: Path
) -> None:
    require_tool("mosquitto")
    gateway = issue("gateway", "gw-mqtt-ports")
    harness = BrokerHarness(pki_dir=pki_dir, gateway=gateway, data_dir=tmp_path / "first")
    async with harness.run() as first:
        for setting, ports in (
            ("mqtt.port", {"port": first.port, "bridge_port": 0}),
            ("mqtt.bridge_port", {"port": 0, "bridge_port": first.broker.bridge_port}),
        ):
            settings = MqttSettings(
                data_dir=tmp_path / f"second-{setting}", telemetry_workers=0, **ports
            )
            with pytest.raises(ListenError) as caught:
                async with MosquittoBroker(settings, identity=gateway, crl_source=first.crl):
                    pass
            assert caught.value.setting == setting
            assert "address already in use" in str(caught.value)
        assert first.broker.pid is not None


async def test_an_address_not_on_this_machine_names_the_setting(
    pki_dir: Path, tmp_path: Path
) -> None:
    """192.0.2.1 is TEST-NET-1 (RFC 5737): never assigned to a host."""
    with pytest.raises(ListenError) as caught:
        async with running_core(pki_dir, tmp_path, enrol_listen="192.0.2.1:7444"):
            pass
    assert caught.value.setting == "enrol_listen"
    assert str(caught.value) == (
        "cannot listen on 192.0.2.1:7444 (enrol_listen): address not available on this machine"
    )
