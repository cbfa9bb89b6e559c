"""``edgeward gateway run`` as a process: serves over mTLS, stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest

import pki
from protos.edgeward.v1 import common_pb2, gateway_pb2_grpc
from tests._support.gateway import MODELS, ROOT

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]


async def _read_json_line(stream: asyncio.StreamReader, event: str) -> dict[str, object]:
    while True:
        line = await asyncio.wait_for(stream.readline(), timeout=30)
        assert line, f"process ended before logging {event!r}"
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            return dict(record)


async def test_gateway_run_serves_and_stops_on_sigterm(issue, tmp_path, photos):
    gateway_identity = issue("gateway", "gw-cli")
    registry_dir = tmp_path / "pki"
    pki.SqliteRegistry(pki.PkiLayout(registry_dir).registry).close()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'pki_dir = "{registry_dir}"\n'
        'listen = "127.0.0.1:0"\nmetrics_listen = "127.0.0.1:0"\nshutdown_grace_s = 2\n'
        f'[inference]\nmodels_dir = "{MODELS}"\nthreads = 1\n'
    )
    env = {**os.environ, "EDGEWARD_GATEWAY_LOG_LEVEL": "info"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from edgeward.cli import main; main()",
        "gateway",
        "run",
        "--config",
        str(config),
        "--identity",
        str(gateway_identity.directory),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        started = await _read_json_line(proc.stderr, "gateway started")
        port = started["grpc_port"]
        device = issue("device", "cam-cli")
        creds = pki.grpc_channel_credentials(
            ca_bundle_pem=device.ca_bundle.read_bytes(), identity=device
        )
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
            stub = gateway_pb2_grpc.DeviceGatewayStub(channel)
            image = (Path(photos) / "chelsea.jpg").read_bytes()
            result = await stub.Detect(common_pb2.Frame(image=image), timeout=10)
        assert "Cat" in {d.label for d in result.detections}
        proc.send_signal(signal.SIGTERM)
        await _read_json_line(proc.stderr, "gateway stopped")
        assert await asyncio.wait_for(proc.wait(), timeout=15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_bad_configuration_names_the_key(tmp_path):
    from click.testing import CliRunner

    from edgeward.cli import main

    config = tmp_path / "gateway.toml"
    config.write_text('identity_dir = "/x"\npki_dir = "/y"\n[limits]\nburst = 0\n')
    result = CliRunner().invoke(main, ["gateway", "run", "--config", str(config)])
    assert result.exit_code != 0
    assert "limits.burst" in result.output
    assert "EDGEWARD_GATEWAY_LIMITS__BURST" in result.output
