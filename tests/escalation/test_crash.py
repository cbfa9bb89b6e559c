"""kill -9 of the gateway with escalations pending: none lost, none answered twice."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

import pki
from gateway import free_port

from .conftest import ROOT, Cores

pytestmark = pytest.mark.slow


class Proc:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, mode: str, outbox: Path, core: str, identity: Path) -> Proc:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.escalation._gateway_proc",
            "--mode",
            mode,
            "--outbox",
            str(outbox),
            "--core",
            core,
            "--identity",
            str(identity),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self = cls(proc)
        assert await self.line() == "ready"
        return self

    async def line(self) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        assert raw, "gateway process ended early"
        return raw.decode().strip()

    async def send(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.line()


async def test_kill_9_with_pending_escalations(
    cores: Cores, gateway_identity: pki.IdentityFiles, tmp_path: Path
) -> None:
    port = free_port()
    core = f"127.0.0.1:{port}"
    outbox = tmp_path / "outbox.sqlite3"
    first = cores.service()
    async with cores.run(first, port=port):
        gw = await Proc.start("enqueue", outbox, core, gateway_identity.directory)
        answered = (await gw.send("enqueue 2")).split()[1:]
        assert await gw.send("wait-answers 2") == "answered"
    # The core is down now: these wait in the outbox, and the gateway dies with them.
    pending = (await gw.send("enqueue 4")).split()[1:]
    assert len(answered) == 2
    assert len(pending) == 4
    gw.proc.send_signal(signal.SIGKILL)
    assert await asyncio.wait_for(gw.proc.wait(), 30) == -signal.SIGKILL

    second = cores.service()
    async with cores.run(second, port=port):
        restarted = await Proc.start("drain", outbox, core, gateway_identity.directory)
        hub_line = await restarted.line()
        assert await asyncio.wait_for(restarted.proc.wait(), 30) == 0
    assert hub_line.startswith("hub ")
    in_hub = json.loads(hub_line[4:])
    # None lost: every escalation, answered before the kill or pending at it, is waiting
    # for the device after the restart; none twice.
    assert sorted(in_hub) == sorted(answered + pending)
    assert len(in_hub) == len(set(in_hub)) == 6
    # The core ran its models once per escalation: the 2 answered before the kill were
    # not sent again, the 4 pending ones were sent by the restarted gateway.
    assert first.models.runs == 2
    assert second.models.runs == 4
