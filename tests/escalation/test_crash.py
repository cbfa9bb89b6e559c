"""kill -9 of the gateway with escalations pending: none lost, none answered twice."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

import pki
from gateway import EscalateService, free_port
from protos.edgeward.v1 import core_pb2

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

    async def write(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()

    async def send(self, command: str) -> str:
        await self.write(command)
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


class Holding:
    """A Core.Escalate handler that records each request and, while ``hold`` is set, never
    answers it (the call waits until the caller goes away or the core stops)."""

    def __init__(self, inner: EscalateService) -> None:
        self.inner = inner
        self.requests: list[str] = []
        self.hold = False

    async def __aenter__(self) -> Holding:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.inner.__aexit__(None, None, None)

    async def __call__(
        self, request: core_pb2.EscalationRequest, context: Any, *, gateway: Any
    ) -> core_pb2.EscalationResult:
        self.requests.append(request.escalation_id)
        if self.hold:
            await asyncio.Event().wait()
        return await self.inner(request, context, gateway=gateway)


async def wait_for(predicate: Any, limit_s: float = 60.0) -> None:
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110 - what a real core received
            await asyncio.sleep(0.02)


async def test_kill_9_between_the_call_and_the_commit(
    cores: Cores, gateway_identity: pki.IdentityFiles, tmp_path: Path
) -> None:
    """The first attempt reaches the core while the row is not yet committed (another
    connection holds the outbox's write lock); the gateway dies before or after the commit."""
    port = free_port()
    core = f"127.0.0.1:{port}"
    outbox = tmp_path / "outbox.sqlite3"
    handler = Holding(cores.service())
    async with cores.run(handler, port=port):
        gw = await Proc.start("enqueue", outbox, core, gateway_identity.directory)
        # A first escalation answered: the gateway's channel to the core is up.
        warm = (await gw.send("enqueue 1")).split()[1:]
        assert await gw.send("wait-answers 1") == "answered"
        handler.hold = True

        # Killed before the commit: the core was asked, the device never told "pending".
        lock = sqlite3.connect(outbox, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        await gw.write("enqueue 1")
        await wait_for(lambda: len(handler.requests) == 2)
        gw.proc.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(gw.proc.wait(), 30) == -signal.SIGKILL
        lock.execute("ROLLBACK")
        uncommitted = handler.requests[1]

        # Killed after the commit, with the core's answer still to come.
        gw = await Proc.start("enqueue", outbox, core, gateway_identity.directory)
        lock.execute("BEGIN IMMEDIATE")
        await gw.write("enqueue 1")
        await wait_for(lambda: len(handler.requests) == 3)
        lock.execute("ROLLBACK")
        lock.close()
        queued = (await gw.line()).split()[1:]
        assert queued == [handler.requests[2]]  # stored, then reported pending
        gw.proc.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(gw.proc.wait(), 30) == -signal.SIGKILL

        handler.hold = False
        restarted = await Proc.start("drain", outbox, core, gateway_identity.directory)
        hub_line = await restarted.line()
        assert await asyncio.wait_for(restarted.proc.wait(), 30) == 0
    in_hub = json.loads(hub_line.removeprefix("hub "))
    # The committed one is answered once after the restart; the uncommitted one, never
    # reported pending, is not answered at all.
    assert sorted(in_hub) == sorted(warm + queued)
    assert uncommitted not in in_hub
    assert handler.requests[3:] == queued  # sent again under the same id
    assert handler.inner.models.runs == 2  # warm-up and the committed one, once each
