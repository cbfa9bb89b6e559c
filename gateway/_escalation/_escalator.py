"""The escalator: decides, redacts, stores, delivers, and hands the answers to the device.

One frame goes through::

    edge result ──select (policy)──► candidates ──budgets──► admitted
      ──crop + face blur + JPEG (CPU thread)──┬─► outbox row (committed, fsynced)
                                              │     ──► detection marked escalated=True with
                                              │         its escalation id, returned to the device
                                              └─► Core.Escalate, at once (first attempt)

and, in the background, for what the first attempt did not settle::

    outbox ──Core.Escalate (mTLS, backoff + jitter while the core is away)──► answer
      ──one transaction: answer stored for the device, outbox row removed──► EventHub.publish

The first attempt runs while the row is being written and fsynced (a few milliseconds on an
ordinary disk), so the flush is off the answer's path; it is made only while the core is
answering (no back-off), a delivery slot is free and the outbox has room. Its answer, whatever
it is, waits for the row to be durable before it is stored and handed to the device: an
answer never overtakes its "pending", and an escalation whose row could not be stored (full
outbox, a crash before the commit) is not delivered at all, since the device was never told
it was pending. A crash between the call and the commit loses nothing that was promised: a
committed row is sent again at the next start (same escalation id; the core replays its
answer), an uncommitted one was never reported as pending.

Delivery guarantees (tested with exact counts in ``tests/escalation``):

- A detection is marked pending only after its escalation is committed to the outbox.
- The escalation id is the idempotency key: the core runs its models at most once per id and
  replays its stored answer for a retry, so a reply lost to a crash or a cut costs nothing.
- An outbox row is removed only in the transaction that stores its answer (or its final
  error), so each escalation ends with exactly one stored answer.
- Stored answers outlive a gateway restart (TTL ``delivery_ttl_s``, bounded in number): at
  start they are handed to the event hub again, so a device that was offline receives them
  when it subscribes. A device that had already received one before the restart may see it
  again (the hub replays everything after a restart); the escalation id tells it apart.
- When the outbox is full, new escalations are refused (the detection stays an edge answer,
  the refusal is logged and counted); stored ones are never dropped. An escalation the core
  refuses for good, or that outlives its TTL, ends as an error event to the device.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, Self, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
import structlog

from gateway._events import AnsweredObject, ErrorEvent, EscalationAnswer, EventPayload
from gateway._inference._detection import Detection
from gateway.errors import CoreUnavailable, EscalationFailed, OutboxFull, RedactionUnavailable
from protos.edgeward.v1 import core_pb2

from ._client import CoreClient
from ._config import EscalationSettings, RegionPolicy
from ._crop import FaceRedactor, Upload, prepare_upload
from ._outbox import Outbox, OutboxEntry
from ._policy import Budgets, Candidate, EscalationReason, select

__all__ = [
    "AnswerSink",
    "EscalationOutcome",
    "Escalator",
    "PendingEscalation",
    "RefusedEscalation",
]

_log = structlog.get_logger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

#: Where answers go: ``EventHub.publish`` (``publish(device_id, payload)``), event-loop only.
AnswerSink = Callable[[str, EventPayload], object]


@dataclass(frozen=True, slots=True)
class PendingEscalation:
    """A detection (``index``; ``None``: the whole frame) stored in the outbox."""

    index: int | None
    escalation_id: str
    reason: EscalationReason


@dataclass(frozen=True, slots=True)
class RefusedEscalation:
    """A detection the policy picked that was not escalated, and why.

    ``reason``: ``device_budget``, ``region_budget``, ``empty_frame_budget``, ``outbox_full``,
    ``face_blur_unavailable``, ``no_frame`` (the answer came from the exact cache, so there
    are no pixels to crop) or ``shutting_down``.
    """

    index: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class EscalationOutcome:
    """What :meth:`Escalator.escalate` did with one frame."""

    pending: tuple[PendingEscalation, ...] = ()
    refused: tuple[RefusedEscalation, ...] = ()

    def escalation_id(self, index: int | None) -> str | None:
        """The escalation id of detection ``index`` (``None``: the frame), if it escalated."""
        for p in self.pending:
            if p.index == index:
                return p.escalation_id
        return None


@dataclass(slots=True)
class _Backoff:
    failures: int = 0
    next_at: float = 0.0


class Escalator:
    """Escalates doubtful edge detections to the core and delivers the answers.

    An async context manager: entering opens the outbox, hands stored answers to the sink
    again (they survived a restart), and starts the delivery worker; leaving stops it (the
    outbox keeps whatever is pending for the next start).

    ``credentials`` are the gateway's own mTLS channel credentials: the core admits gateway
    identities only. ``sink`` receives ``(device_id, EscalationAnswer | ErrorEvent)``; pass
    ``EventHub.publish``.
    """

    def __init__(
        self,
        settings: EscalationSettings,
        *,
        gateway_id: str,
        gateway_region: str,
        credentials: grpc.ChannelCredentials,
        sink: AnswerSink,
        models_dir: Path,
        default_core_address: str | None = None,
        redactor: FaceRedactor | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._gateway_id = gateway_id
        self._gateway_region = gateway_region
        self._sink = sink
        self._core_address = settings.core_address or default_core_address
        self._redactor = redactor or FaceRedactor(models_dir=models_dir)
        self._budgets = Budgets(clock=clock)
        self._wall = wall_clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._client = CoreClient(credentials=credentials, timeout_s=settings.call_timeout_s)
        self._backoff: dict[str, _Backoff] = {}
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._db_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._cpu_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._outbox: Outbox | None = None
        self._runner: asyncio.Task[None] | None = None
        #: First attempts started while their rows were being stored, by escalation id; the
        #: delivery loop leaves these rows to them.
        self._first_attempts: dict[str, asyncio.Task[None]] = {}
        #: Rows in the outbox as this process counts them (set at open): a first attempt is
        #: made only while the outbox has room, so no pixels leave for an escalation that is
        #: then refused as ``outbox_full``.
        self._stored_rows = 0
        self._open = False
        #: Counters for metrics and tests ("queued", "answered", "refused_<reason>", …).
        self.counts: Counter[str] = Counter()

    # ---------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Self:
        self._db_pool = concurrent.futures.ThreadPoolExecutor(1, "edgeward-outbox")
        self._cpu_pool = concurrent.futures.ThreadPoolExecutor(1, "edgeward-escalation")
        s = self.settings
        self._outbox = await self._db(
            Outbox,
            s.outbox_path,
            max_entries=s.max_outbox_entries,
            max_answers=s.max_stored_answers,
        )
        await self._replay_answers()
        pending = await self._db(self._outbox.pending_count)
        self._stored_rows = pending
        self._open = True
        self._runner = asyncio.create_task(self._run(), name="edgeward-escalation")
        _log.info("escalation outbox open", path=str(s.outbox_path), pending=pending)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        tasks = [*self._first_attempts.values()]
        if self._runner is not None:
            tasks.append(self._runner)
        # What is stored stays in the outbox for the next start; an attempt cut here is made
        # again then, under the same escalation id.
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._client.aclose()
        if self._outbox is not None:
            await self._db(self._outbox.close)
        for pool in (self._db_pool, self._cpu_pool):
            if pool is not None:
                pool.shutdown(wait=True)

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._deliver_loop(), name="edgeward-escalation-deliver")
            tg.create_task(self._expiry_loop(), name="edgeward-escalation-expiry")

    async def _db(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run an outbox call on its own thread (SQLite commits fsync: never on the loop)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_pool, lambda: fn(*args, **kwargs))

    async def _replay_answers(self) -> None:
        assert self._outbox is not None  # noqa: S101 - set just before
        stored = await self._db(self._outbox.stored_answers, self._wall())
        for answer in stored:
            self._sink(answer.device_id, answer.payload)
        if stored:
            _log.info("stored escalation answers handed to devices again", count=len(stored))

    # ---------------------------------------------------------------- the edge side
    def policy_for(self, region: str | None) -> RegionPolicy | None:
        """The policy applying to a device of ``region`` (``None``: nothing escalates)."""
        return self.settings.policy_for(region, self._gateway_region)

    async def pending_count(self) -> int:
        """Escalations in the outbox, waiting for the core."""
        assert self._outbox is not None  # noqa: S101 - only while open
        return await self._db(self._outbox.pending_count)

    async def escalate(
        self,
        *,
        device_id: str,
        frame_id: str,
        detections: tuple[Detection, ...],
        frame: npt.NDArray[np.uint8] | None,
        region: str | None = None,
        edge_model: str = "",
        edge_labels: tuple[str, ...] | None = None,
    ) -> EscalationOutcome:
        """Escalate what the policy picks from one frame's edge ``detections``.

        ``edge_model`` names the model that produced them and ``edge_labels`` are all the
        labels it can give (the edge set where the region's policy names none); the model is
        recorded with each escalation.

        ``frame`` is the decoded RGB frame the detections came from (``None`` when the
        engine answered from its exact cache: nothing can be cropped, nothing escalates).
        ``region`` is the device's registry region (``None``: the gateway's). Returns as soon
        as the escalations are stored; never raises for a refused escalation.
        """
        policy = self.policy_for(region)
        if policy is None:
            return EscalationOutcome()
        candidates = select(policy, detections, model_labels=edge_labels or None)
        if not candidates:
            return EscalationOutcome()
        region_name = region if region in self.settings.regions else self._gateway_region
        pending: list[PendingEscalation] = []
        refused: list[RefusedEscalation] = []
        for candidate in candidates:
            reason = self._precheck(
                device_id, region_name, policy, frame, whole_frame=candidate.index is None
            )
            if reason is None:
                assert frame is not None  # noqa: S101 - precheck refuses a missing frame
                result = await self._escalate_one(
                    device_id,
                    region_name,
                    frame_id,
                    policy,
                    candidate,
                    detections,
                    frame,
                    edge_model,
                )
                if isinstance(result, PendingEscalation):
                    pending.append(result)
                    continue
                reason = result
            refused.append(RefusedEscalation(candidate.index, reason))
            self.counts[f"refused_{reason}"] += 1
            _log.info(
                "escalation refused",
                device_id=device_id,
                frame_id=frame_id,
                reason=reason,
                escalation_reason=candidate.reason,
            )
        return EscalationOutcome(tuple(pending), tuple(refused))

    def _precheck(
        self,
        device_id: str,
        region: str,
        policy: RegionPolicy,
        frame: npt.NDArray[np.uint8] | None,
        *,
        whole_frame: bool,
    ) -> str | None:
        if not self._open:
            return "shutting_down"
        if frame is None:
            return "no_frame"
        if self._core_address is None and policy.core_address is None:
            return "no_core"
        return self._budgets.try_take(device_id, region, policy, whole_frame=whole_frame)

    async def _escalate_one(  # noqa: PLR0917 - private; one call site
        self,
        device_id: str,
        region: str,
        frame_id: str,
        policy: RegionPolicy,
        candidate: Candidate,
        detections: tuple[Detection, ...],
        frame: npt.NDArray[np.uint8],
        edge_model: str,
    ) -> PendingEscalation | str:
        assert self._outbox is not None  # noqa: S101 - only while open
        det = None if candidate.index is None else detections[candidate.index]
        redactor = self._redactor if policy.require_face_blur else None
        loop = asyncio.get_running_loop()
        try:
            upload: Upload = await loop.run_in_executor(
                self._cpu_pool,
                lambda: prepare_upload(
                    frame,
                    None if det is None else det.box,
                    margin=policy.crop_margin,
                    max_side=policy.max_side_px,
                    jpeg_quality=policy.jpeg_quality,
                    redactor=redactor,
                    face_score_threshold=policy.face_score_threshold,
                ),
            )
        except RedactionUnavailable:
            # Fail closed: the region asked for faces blurred and we cannot guarantee it.
            return "face_blur_unavailable"
        escalation_id = f"esc-{secrets.token_hex(12)}"
        now = self._wall()
        entry = OutboxEntry(
            escalation_id=escalation_id,
            device_id=device_id,
            region=region,
            frame_id=frame_id,
            core_address=policy.core_address or self._core_address or "",
            image=upload.jpeg,
            is_full_frame=upload.is_full_frame,
            edge_label="" if det is None else det.label,
            edge_score=0.0 if det is None else det.score,
            created_at=now,
            next_attempt_at=now,
            reason=candidate.reason,
        )
        stored = loop.run_in_executor(self._db_pool, self._outbox.add, entry)
        sent_first = self._may_send_first(entry.core_address)
        if sent_first:
            self._first_attempts[escalation_id] = asyncio.create_task(
                self._first_attempt(entry, stored), name="edgeward-escalation-first"
            )
        try:
            # Shielded: a caller that gives up does not cut the first attempt short, which
            # waits for the same commit.
            await asyncio.shield(stored)
        except OutboxFull:
            return "outbox_full"
        self._stored_rows += 1
        if not sent_first:
            self._wake.set()  # the delivery loop sends it
        self.counts["queued"] += 1
        _log.info(
            "escalation queued",
            device_id=device_id,
            frame_id=frame_id,
            escalation_id=escalation_id,
            reason=candidate.reason,
            edge_model=edge_model,
            edge_label=entry.edge_label,
            edge_score=round(entry.edge_score, 3),
            sent="frame" if upload.is_full_frame else "crop",
            width=upload.width,
            height=upload.height,
            bytes=len(upload.jpeg),
            faces_blurred=upload.faces_blurred,
            core=entry.core_address,
        )
        return PendingEscalation(candidate.index, escalation_id, candidate.reason)

    # ---------------------------------------------------------------- delivery
    def _may_send_first(self, address: str) -> bool:
        """Whether an escalation for ``address`` is sent while its row is being stored."""
        rows = self._stored_rows + len(self._first_attempts)
        if self._slots.locked() or rows >= self.settings.max_outbox_entries:
            return False
        state = self._backoff.get(address)
        # A core in back-off gets its probes from the delivery loop, not a burst from here.
        return state is None or (not state.failures and state.next_at <= self._wall())

    async def _first_attempt(self, entry: OutboxEntry, stored: asyncio.Future[None]) -> None:
        settled = False
        try:
            settled = await self._deliver(entry, stored=stored)
        finally:
            self._first_attempts.pop(entry.escalation_id, None)
            if not settled:
                # What it left (a retry time, a core in back-off) is the loop's now.
                self._wake.set()

    async def _durable(self, stored: asyncio.Future[None] | None) -> bool:
        """Wait until the entry's row is committed; ``False`` when it never will be."""
        if stored is None:
            return True
        try:
            await asyncio.shield(stored)
        except Exception:  # noqa: BLE001 - the caller of escalate() reports why
            return False
        return True

    async def _deliver_loop(self) -> None:
        assert self._outbox is not None  # noqa: S101 - started after open
        batch_size = self.settings.concurrency * 2
        while True:
            self._wake.clear()
            now = self._wall()
            waiting = frozenset(a for a, b in self._backoff.items() if b.next_at > now)
            sending = frozenset(self._first_attempts)
            batch = await self._db(
                self._outbox.due,
                now,
                limit=batch_size,
                skip_addresses=waiting,
                skip_ids=sending,
            )
            # A core that has been failing gets one probe, not a burst, until it answers.
            probing: set[str] = set()
            chosen: list[OutboxEntry] = []
            for entry in batch:
                state = self._backoff.get(entry.core_address)
                if state is not None and state.failures:
                    if entry.core_address in probing:
                        continue
                    probing.add(entry.core_address)
                chosen.append(entry)
            if chosen:
                async with asyncio.TaskGroup() as tg:
                    for entry in chosen:
                        tg.create_task(self._deliver(entry))
                continue
            next_due = await self._db(self._outbox.next_due_at, skip_ids=sending)
            wake_at = [b.next_at for b in self._backoff.values() if b.next_at > now]
            if next_due is not None:
                wake_at.append(next_due)
            delay = min([*(t - now for t in wake_at), 1.0])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.005, delay)):
                    await self._wake.wait()

    def _failed(self, address: str) -> float:
        """Record a failure of ``address``; return when to try it next (backoff + jitter)."""
        now = self._wall()
        state = self._backoff.setdefault(address, _Backoff())
        if state.next_at <= now:  # failures of calls already in flight count once
            state.failures += 1
            s = self.settings
            ceiling = min(s.retry_backoff_max_s, s.retry_backoff_base_s * 2 ** (state.failures - 1))
            # "Equal jitter": at least half the backoff, so retries stay spaced out, and a
            # random rest, so gateways that lost the core together do not return in step.
            state.next_at = now + ceiling / 2 + self._rng.uniform(0.0, ceiling / 2)
        return state.next_at

    async def _deliver(
        self, entry: OutboxEntry, *, stored: asyncio.Future[None] | None = None
    ) -> bool:
        """One attempt at ``entry``; ``stored``: its row's commit, when still under way.

        Nothing is written for an entry before its row is durable (:meth:`_durable`).
        Returns ``False`` when the entry waits in the outbox for another attempt.
        """
        assert self._outbox is not None  # noqa: S101 - started after open
        s = self.settings
        age = self._wall() - entry.created_at
        if stored is None and (
            age > s.delivery_ttl_s or (s.max_attempts and entry.attempts >= s.max_attempts)
        ):
            await self._finish(
                entry,
                ErrorEvent(
                    code="DEADLINE_EXCEEDED",
                    message="the core did not answer this escalation in time",
                    frame_id=entry.frame_id,
                ),
                outcome="expired",
            )
            return True
        request = core_pb2.EscalationRequest(
            escalation_id=entry.escalation_id,
            device_id=entry.device_id,
            region=entry.region,
            image=entry.image,
            is_full_frame=entry.is_full_frame,
            edge_label=entry.edge_label,
            edge_score=entry.edge_score,
            frame_id=entry.frame_id,
        )
        async with self._slots:
            try:
                result = await self._client.escalate(entry.core_address, request)
            except CoreUnavailable as exc:
                first = not self._backoff.get(entry.core_address, _Backoff()).failures
                next_at = self._failed(entry.core_address)
                if not await self._durable(stored):
                    return True
                self.counts["retries"] += 1
                await self._db(
                    self._outbox.retry_later,
                    entry.escalation_id,
                    next_attempt_at=next_at,
                    error=str(exc),
                )
                (_log.warning if first else _log.debug)(
                    "core unavailable; escalations wait in the outbox",
                    core=entry.core_address,
                    code=exc.code,
                    retry_in_s=round(next_at - self._wall(), 3),
                )
                return False
            except EscalationFailed as exc:
                if not await self._durable(stored):
                    return True
                await self._finish(
                    entry,
                    ErrorEvent(
                        code=exc.code,
                        message="the core could not process this escalation",
                        frame_id=entry.frame_id,
                    ),
                    outcome="failed",
                )
                return True
        if self._backoff.pop(entry.core_address, None) is not None:
            _log.info("core reachable again", core=entry.core_address)
        if not await self._durable(stored):
            return True
        a = result.answer
        answer = EscalationAnswer(
            # Our own id, not the core's echo: the answer is filed under what we sent.
            escalation_id=entry.escalation_id,
            frame_id=entry.frame_id,
            label=a.label,
            score=float(a.score),
            model_name=a.model_name,
            still_unknown=a.still_unknown,
            edge_label=entry.edge_label,
            edge_score=entry.edge_score,
            reason=entry.reason,
            objects=tuple(
                AnsweredObject(
                    o.label, o.score, (o.box.x_min, o.box.y_min, o.box.x_max, o.box.y_max)
                )
                for o in a.objects
            ),
        )
        await self._finish(entry, answer, outcome="answered", model_ms=float(result.model_ms))
        return True

    async def _finish(
        self,
        entry: OutboxEntry,
        payload: EscalationAnswer | ErrorEvent,
        *,
        outcome: str,
        model_ms: float | None = None,
    ) -> None:
        assert self._outbox is not None  # noqa: S101 - started after open
        stored = await self._db(
            self._outbox.complete,
            entry.escalation_id,
            entry.device_id,
            payload,
            now=self._wall(),
            ttl_s=self.settings.delivery_ttl_s,
        )
        if not stored:
            return
        self._stored_rows -= 1
        self.counts[outcome] += 1
        self._sink(entry.device_id, payload)
        fields: dict[str, Any] = {}
        if isinstance(payload, EscalationAnswer):
            fields = {
                "label": payload.label,
                "score": round(payload.score, 3),
                "model": payload.model_name,
                "still_unknown": payload.still_unknown,
                "model_ms": None if model_ms is None else round(model_ms, 2),
            }
        else:
            fields = {"code": payload.code}
        (_log.info if outcome == "answered" else _log.warning)(
            "escalation " + outcome,
            device_id=entry.device_id,
            frame_id=entry.frame_id,
            escalation_id=entry.escalation_id,
            attempts=entry.attempts + 1,
            age_s=round(self._wall() - entry.created_at, 3),
            **fields,
        )

    async def _expiry_loop(self) -> None:
        assert self._outbox is not None  # noqa: S101 - started after open
        while True:
            removed = await self._db(self._outbox.expire_answers, self._wall())
            if removed:
                _log.info("expired escalation answers removed", count=removed)
            await asyncio.sleep(min(60.0, self.settings.delivery_ttl_s / 4))
