"""An escalation is answered exactly once across core replicas, even when the replica
handling it is killed (-9) mid-request and the gateway retries another.

Two real core processes share one registry and one answer store (SQLite, WAL); the gateway's
escalator knows both addresses. The replica to be killed holds the request at a seam we own
(a wrapper around the real handler): before its models run, or after its answer was stored
but before it replied."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from gateway import CoreEscalationSettings, EscalateService, EscalationAnswer
from gateway._core._escalate import AnswerStore
from protos.edgeward.v1 import common_pb2, core_pb2
from tests.conftest import PHOTOS, IssueFn
from tests.pki.test_role_pinning import serving

from .conftest import MODELS, ROOT, Cores, EscalatorFactory, Recorder, frame_of, region

pytestmark = [pytest.mark.timeout(240)]

FRAMES = region(escalate_empty_frames=True, send="frame")


class Replica:
    """A core process (``tests.escalation._core_proc``) and its output lines."""

    def __init__(self, proc: asyncio.subprocess.Process, address: str) -> None:
        self.proc = proc
        self.address = address

    async def line(self, limit_s: float = 120.0) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), limit_s)
        assert raw, "core process ended early"
        return raw.decode().strip()

    async def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(self.proc.wait(), 30) == -signal.SIGKILL


@asynccontextmanager
async def replica(
    pki_dir: Path, tmp_path: Path, name: str, *, hold: str = "none", feed_heartbeat_s: float = 5.0
) -> AsyncIterator[Replica]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.escalation._core_proc",
        "--pki-dir",
        str(pki_dir),
        "--registry",
        str(tmp_path / "shared-registry.sqlite3"),
        "--answers",
        str(tmp_path / "shared-answers.sqlite3"),
        "--identity",
        str(tmp_path / f"identity-{name}"),
        "--core-id",
        name,
        "--hold",
        hold,
        "--feed-heartbeat-s",
        str(feed_heartbeat_s),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        raw = await asyncio.wait_for(proc.stdout.readline(), 120)
        word, _, address = raw.decode().strip().partition(" ")
        assert word == "ready", raw
        yield Replica(proc, address)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("hold", ["before", "after"])
async def test_killed_replica_mid_request_the_other_answers_once(
    pki_dir: Path, tmp_path: Path, make_escalator: EscalatorFactory, hold: str
) -> None:
    sink = Recorder()
    async with (
        replica(pki_dir, tmp_path, "core-a", hold=hold) as a,
        replica(pki_dir, tmp_path, "core-b") as b,
    ):
        escalator = make_escalator(
            f"{a.address},{b.address}", sink, policy=FRAMES, call_timeout_s=60.0
        )
        async with escalator as esc:
            outcome = await esc.escalate(
                device_id="dev-1", frame_id="f1", detections=(), frame=frame_of("motorcycle.jpg")
            )
            (pending,) = outcome.pending
            eid = pending.escalation_id
            assert await a.line() == f"received {eid}"
            if hold == "after":
                assert await a.line() == f"stored {eid}"
            await a.kill()  # mid-request: the gateway is still waiting for A's reply
            # The same escalation, same id, goes to B at once.
            assert await b.line() == f"received {eid}"
            answered = await b.line()
            # A stored answer is replayed from the shared store: B's models never run.
            assert answered == f"answered {eid} runs={1 if hold == 'before' else 0}"
            async with asyncio.timeout(60):
                while not sink.events:  # noqa: ASYNC110 - the sink is a plain callable
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # a second answer, were there one, would land now
            assert await esc.pending_count() == 0
            assert esc.counts["answered"] == 1
            assert esc.counts["retries"] == 0  # failed over within the attempt, no backoff
    answers = [p for _, p in sink.events if isinstance(p, EscalationAnswer)]
    assert [(d, p.escalation_id) for d, p in sink.events] == [("dev-1", eid)]
    assert len(answers) == 1
    assert answers[0].label == "motorcycle"


async def test_the_outbox_skips_a_gateway_posing_as_a_replica(
    cores: Cores, make_escalator: EscalatorFactory, issue: IssueFn
) -> None:
    """A stolen gateway key at the first listed address never receives a crop: the pin holds
    at every address, and the escalation is answered by the real core behind it."""
    sink = Recorder()
    async with (
        serving(issue("gateway", "gw-rogue-esc"), require_client_auth=True) as (rogue_addr, rogue),
        cores.run() as core,
        make_escalator(f"{rogue_addr},{core.address}", sink, policy=FRAMES) as esc,
    ):
        outcome = await esc.escalate(
            device_id="dev-1", frame_id="f1", detections=(), frame=frame_of("motorcycle.jpg")
        )
        (pending,) = outcome.pending
        async with asyncio.timeout(60):
            while not sink.events:  # noqa: ASYNC110 - the sink is a plain callable
                await asyncio.sleep(0.02)
        assert esc.counts["retries"] == 0
    assert [p.escalation_id for _, p in sink.events] == [pending.escalation_id]
    assert rogue.calls == []
    assert cores.runs == 1


class _RacedStore(AnswerStore):
    """The shared store as a replica sees it when another replica stores the same id while
    its own models run: the first look finds nothing, the answer lands meanwhile."""

    def __init__(self, *args: Any, other: core_pb2.EscalationResult, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.other = other
        self.looks = 0

    def get(self, gateway_id: str, escalation_id: str) -> core_pb2.EscalationResult | None:
        self.looks += 1
        if self.looks == 1:
            return None
        return super().get(gateway_id, escalation_id)

    def put(
        self, gateway_id: str, escalation_id: str, result: core_pb2.EscalationResult
    ) -> core_pb2.EscalationResult:
        super().put(gateway_id, escalation_id, self.other)  # the other replica was first
        return super().put(gateway_id, escalation_id, result)  # first write wins


async def test_replicas_racing_on_one_id_return_the_first_stored_answer(tmp_path: Path) -> None:
    first = core_pb2.EscalationResult(
        answer=common_pb2.EscalationAnswer(escalation_id="esc-1", label="from-the-other"),
        model_ms=1.0,
    )
    settings = CoreEscalationSettings(models_dir=MODELS, providers="cpu")
    store = _RacedStore(
        tmp_path / "shared-answers.sqlite3", max_entries=100, ttl_s=3600, other=first
    )
    async with EscalateService(settings, store=store) as service:
        result, replayed = await asyncio.wrap_future(
            service.models.run_in_worker(
                lambda: service._answer_sync(
                    ("gw-1", "esc-1"),
                    (PHOTOS / "motorcycle.jpg").read_bytes(),
                    True,
                    frame_id="f1",
                    edge=("", 0.0),
                )
            )
        )
    assert service.models.runs == 1  # this replica did run its models ...
    assert not replayed
    assert result == first  # ... and still answers with what the shared store holds
    store.close()
