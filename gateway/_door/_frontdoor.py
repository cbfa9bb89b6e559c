"""The gateway's one front door: what happens to a device's message, whichever transport carried it.

Both transports (the gRPC servicer and the MQTT bridge) identify the sender their own way
(the TLS peer certificate; the broker-enforced topic of the certificate's CN) and hand
everything else to :class:`FrontDoor`::

    admission   revocation feed fresh ─→ identity ─→ authorisation by device type ─→ budget
                (FeedStale)              (transport)  (PermissionDenied, DeviceRevoked)
                                                                    (RateLimited: refused
                                                                     before any work queues;
                                                                     all frames, for a while,
                                                                     of a device caught
                                                                     flooding)
    pipeline    fair turn (round robin per device) ─→ engine ─→ escalation hook (marks,
                remembered for cached repeats) ─→ DetectionResult
    telemetry   validated report ─→ the one store (latest per device)
    refusals    one status mapping ─→ Prometheus count ─→ bounded audit line
                (─→ bounded error event on ``devices/<id>/events`` for MQTT)

:meth:`FrontDoor.admit_now` is the cheap, synchronous admission a transport calls on receipt
(no await: the registry facts are the authoriser's cache); it returns ``None`` only when the
device's facts must be fetched, and :meth:`FrontDoor.admit` does the same steps with the
look-up. A refused message costs a dictionary look-up and a token-bucket check: no decoding,
no inference, and (through :class:`~gateway._refusals.RefusalLog`) no log line of its own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog

import pki
from gateway._config import LimitsSettings
from gateway._door._authorise import Authoriser, DeviceInfo
from gateway._door._budget import RateLimiter
from gateway._door._fair import FairQueue
from gateway._door._marks import DetectionHook, EscalationMemory, Frame
from gateway._door._render import result_to_pb
from gateway._door._telemetry_store import TelemetryRecord, TelemetryStore
from gateway._events import ErrorEvent, EventHub
from gateway._inference import InferenceResult
from gateway._metrics import GatewayMetrics
from gateway._refusals import RefusalLog
from gateway._revocation import RevocationEvent, RevocationState
from gateway._status import Status, status_of
from gateway.errors import (
    DeadlineExceeded,
    DeviceRevoked,
    FeedStale,
    RateLimited,
    Unauthenticated,
)
from protos.edgeward.v1 import common_pb2

__all__ = [
    "Admitted",
    "Detector",
    "FrontDoor",
    "Identity",
    "TopicIdentity",
]

_log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Refusals of who is asking or how much, counted in ``denials_total``.
_DENIAL_CODES = frozenset(
    {"PERMISSION_DENIED", "UNAUTHENTICATED", "UNAVAILABLE", "RESOURCE_EXHAUSTED"}
)

#: The golden ratio's fraction: its multiples mod 1 cover [0, 1) evenly, in any stretch.
_PHI = 0.6180339887498949

#: Methods charged to the device's budget: one frame budget, one report budget.
_BUDGETED = frozenset({"Detect", "StreamDetect", "ReportTelemetry"})
#: Methods of the frame budget (a flood penalty refuses these).
_FRAME_METHODS = frozenset({"Detect", "StreamDetect"})


class Detector(Protocol):
    """What the front door needs of the inference engine (the gateway's model catalog, which
    runs the model of the device's ``region``)."""

    async def detect_with_frame(
        self,
        image: bytes,
        *,
        deadline: float | None = None,
        key: str | None = None,
        region: str | None = None,
    ) -> tuple[InferenceResult, Frame | None]: ...


class Identity(Protocol):
    """Who sent a message, as the transport judged it (the ``identify`` callables of
    :meth:`FrontDoor.admit` judge when called, and raise the refusal)."""

    @property
    def device_id(self) -> str: ...

    @property
    def serial(self) -> str | None: ...

    def recheck(self) -> None:
        """Raise if the identity is no longer good (revoked or expired meanwhile)."""


@dataclass(frozen=True, slots=True)
class TopicIdentity:
    """An MQTT sender: the device id of its topic, which the broker's ACL ties to its CN.

    Re-validated here: a certificate of the CA with an odd CN must not become a device, and a
    message queued at the broker before a revocation's kick must not be served.
    """

    device_id: str
    revocation: RevocationState | None = None
    serial: str | None = None

    @classmethod
    def judge(cls, device_id: str, revocation: RevocationState | None) -> TopicIdentity:
        """The sender of a message on ``devices/<device_id>/…``, or the refusal."""
        identity = cls(device_id, revocation)
        identity.recheck()
        return identity

    def recheck(self) -> None:
        if pki.ID_PATTERN.fullmatch(self.device_id) is None:
            raise Unauthenticated(f"topic id {self.device_id!r} is not a device id")
        if self.revocation is not None and self.revocation.is_revoked(self.device_id, ""):
            raise DeviceRevoked(self.device_id)


@dataclass(frozen=True, slots=True)
class Admitted:
    """A message the front door let in: who, on which method, from which region."""

    device_id: str
    serial: str | None
    method: str
    region: str | None


class FrontDoor:
    """Admission, the frame pipeline, the telemetry store and refusals for every transport.

    ``authoriser`` ``None`` admits every device type (no registry, tests); ``revocation``
    ``None`` treats the feed as always fresh. ``slots`` frames are in the engine at once, at
    most ``per_device`` of one device while it is alone and ``shared_per_device`` while
    other devices are present, and at most ``max_waiting`` wait for a turn, at most
    ``limits.frames_waiting_per_device`` of one device (:class:`~gateway._door._fair.FairQueue`).
    ``detection_hook`` is installed by the escalation plug-in and read per frame.
    """

    #: Shortest a flooding device's refused call is held before it is answered ...
    REFUSAL_HOLD_S = 0.5
    #: ... and how much longer some are: holds are spread evenly over this much more, so a
    #: flood's held calls are answered (and sent again) a few at a time, not all at once.
    REFUSAL_HOLD_SPREAD_S = 0.25
    #: Refused calls of one device held at once; beyond it they are answered at once.
    MAX_HELD_PER_DEVICE = 256

    def __init__(
        self,
        *,
        gateway_id: str,
        engine: Detector,
        limits: LimitsSettings | None = None,
        revocation: RevocationState | None = None,
        authoriser: Authoriser | None = None,
        events: EventHub | None = None,
        metrics: GatewayMetrics | None = None,
        refusals: RefusalLog | None = None,
        slots: int = 16,
        max_waiting: int = 64,
        per_device: int = 2,
        shared_per_device: int = 1,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        limits = limits if limits is not None else LimitsSettings()
        self.gateway_id = gateway_id
        self.limits = limits
        self.engine = engine
        self.revocation = revocation
        self._authoriser = authoriser
        self.events = events if events is not None else EventHub()
        self._metrics = metrics
        self.clock = clock
        self._frames = RateLimiter(rate=limits.frames_per_s, burst=limits.burst)
        self._reports = RateLimiter(rate=limits.frames_per_s, burst=limits.burst)
        self.fair = FairQueue(
            slots=slots,
            max_waiting=max_waiting,
            per_device=per_device,
            shared_per_device=shared_per_device,
            max_waiting_per_device=limits.frames_waiting_per_device or limits.burst,
        )
        self._held: dict[str, int] = {}  # refusals held per device (hold_refusal)
        # Devices caught flooding → until when no frame of theirs is admitted (penalise).
        self._penalised: OrderedDict[str, float] = OrderedDict()
        self._monotonic = time.monotonic
        self._holds = 0  # refusals held so far (spreads the holds, hold_refusal)
        #: Installed by the escalation plug-in; read per frame.
        self.detection_hook: DetectionHook | None = None
        #: Escalation marks of answers, given again with cached repeats.
        self.escalations = EscalationMemory()
        #: The latest telemetry per device, from either transport.
        self.telemetry = TelemetryStore()
        #: Audit of refused calls and messages, bounded per device.
        self.refusals = refusals or RefusalLog(
            interval_s=limits.refusal_log_interval_s,
            events_per_interval=limits.refusal_events_per_interval,
        )
        self.refusals.on_suppressed = self._on_suppressed_events
        if revocation is not None:
            revocation.add_listener(self._on_revocation)

    def close(self) -> None:
        """Log the last interval's refusal counts and stop listening for revocations."""
        if self.revocation is not None:
            self.revocation.remove_listener(self._on_revocation)
        self.refusals.close()

    def _on_revocation(self, event: RevocationEvent) -> None:
        if self._metrics is not None:
            self._metrics.revocation_events.inc()
        if self._authoriser is not None:
            self._authoriser.forget(event.device_id)

    # -- admission --------------------------------------------------------------------------

    def check_feed(self) -> None:
        """Step 1: a gateway that may have missed a revocation takes no new work."""
        if self.revocation is not None and not self.revocation.healthy():
            raise FeedStale(self.revocation.stale_for())

    def admit_now(
        self, method: str, identify: Callable[[], Identity], *, charge: bool = True
    ) -> Admitted | None:
        """Admit at once, or ``None`` when the device's registry facts must be fetched.

        Raises the refusal (a :class:`~gateway.errors.GatewayError`). ``charge`` ``False``
        skips the budget (MQTT telemetry: only the latest report is kept, so a flood costs
        parsing, not memory).
        """
        self.check_feed()
        identity = identify()
        info: DeviceInfo | None = None
        if self._authoriser is not None:
            info = self._authoriser.check_cached(identity.device_id, method, serial=identity.serial)
            if info is None:
                return None
        return self._charge(method, identity, info, charge=charge)

    async def admit(
        self, method: str, identify: Callable[[], Identity], *, charge: bool = True
    ) -> Admitted:
        """The steps of :meth:`admit_now`, fetching registry facts when they are not cached."""
        self.check_feed()
        identity = identify()
        info: DeviceInfo | None = None
        if self._authoriser is not None:
            info = await self._authoriser.check(identity.device_id, method, serial=identity.serial)
            # A revocation applied while the registry was asked found nothing of this call
            # to cut: judge again now (no await between here and the caller's registration).
            identity.recheck()
        return self._charge(method, identity, info, charge=charge)

    def _charge(
        self, method: str, identity: Identity, info: DeviceInfo | None, *, charge: bool
    ) -> Admitted:
        # A stream is paced per frame (``pace``), not charged for opening.
        if charge and method in _BUDGETED and method != "StreamDetect":
            device_id = identity.device_id
            if method == "ReportTelemetry":
                self._reports.take(device_id)
            else:
                left = self.penalised_for(device_id)
                if left > 0.0:
                    self._frames.count_refusal(device_id)
                    raise RateLimited(device_id, left)
                try:
                    self._frames.take(device_id)
                except RateLimited:
                    if self.flooding(method, device_id):
                        self.penalise(device_id)
                    raise
        return Admitted(
            identity.device_id, identity.serial, method, info.region if info is not None else None
        )

    def refused_in_row(self, method: str, device_id: str) -> int:
        """Refusals of ``device_id`` on ``method``'s budget since it was last admitted."""
        if method not in _BUDGETED:
            return 0
        limiter = self._reports if method == "ReportTelemetry" else self._frames
        return limiter.refused_in_row(device_id)

    def refused_recently(self, method: str, device_id: str) -> int:
        """Refusals of ``device_id`` on ``method``'s budget within the current second."""
        if method not in _BUDGETED:
            return 0
        limiter = self._reports if method == "ReportTelemetry" else self._frames
        return limiter.refused_recently(device_id)

    def flooding(self, method: str, device_id: str) -> bool:
        """Whether ``device_id`` was refused more than its burst on ``method``'s budget in a
        row since it was last admitted, or within the current second: a flood, not a device
        a little over budget.

        The second's count matters because the budget lets a flood's frame through whenever
        a token is back (every 100 ms at 10 frames a second), and each admitted frame ends
        a run of refusals: by the run alone, a flood would be answered at once for its next
        ``burst`` calls after every admitted frame, most of its refusals.
        """
        burst = self.limits.burst
        return (
            self.refused_in_row(method, device_id) > burst
            or self.refused_recently(method, device_id) > burst
            or (method in _FRAME_METHODS and device_id in self._penalised)
        )

    #: Devices remembered as penalised at most (the oldest penalties are forgotten first).
    MAX_PENALISED = 100_000

    def penalise(self, device_id: str, seconds: float | None = None) -> None:
        """No frame of ``device_id`` is admitted for ``seconds`` (default
        ``limits.flood_penalty_s``) from now: it was caught flooding (refused more than its
        burst within a second, or refused by the managed broker's ingest limit).

        A flood's frames that the budget still lets through (one whenever a token is back)
        each run the model, and another device's frame that arrives meanwhile waits for that
        run; a device that ignores retry-after is better refused outright until it has
        stopped. Its frames already waiting for a turn when it is caught are refused too.
        Bounded: at most :attr:`MAX_PENALISED` devices remembered.
        """
        seconds = self.limits.flood_penalty_s if seconds is None else seconds
        if seconds <= 0.0:
            return
        now = self._monotonic()
        until = now + seconds
        was = self._penalised.get(device_id, 0.0)
        if until > was:
            self._penalised[device_id] = until
            self._penalised.move_to_end(device_id)
        while len(self._penalised) > self.MAX_PENALISED:
            self._penalised.popitem(last=False)
        if was <= now:
            # Newly caught: its frames still waiting for a turn (its burst, admitted moments
            # ago) are refused too, answered with the same retry-after rather than run one
            # after another while other devices' frames wait behind each run. A run in
            # progress finishes.
            self.fair.refuse_waiting(device_id, lambda: RateLimited(device_id, seconds))

    def penalised_for(self, device_id: str) -> float:
        """Seconds ``device_id`` stays penalised (:meth:`penalise`); 0.0 when it is not."""
        until = self._penalised.get(device_id)
        if until is None:
            return 0.0
        left = until - self._monotonic()
        if left <= 0.0:
            del self._penalised[device_id]
            return 0.0
        return left

    def held_refusals(self, device_id: str) -> int:
        """Refused calls of ``device_id`` being held now (:meth:`hold_refusal`)."""
        return self._held.get(device_id, 0)

    async def hold_refusal(
        self, method: str, device_id: str, *, remaining: float | None = None
    ) -> float:
        """Back-pressure on a flooding device: wait before its refusal is answered.

        A device refused more than its burst in a row, or within a second, is flooding
        (:meth:`flooding`), not a little over budget. Answering each of its calls at once
        would let it send as fast as the gateway can refuse; holding the refusal for
        :attr:`REFUSAL_HOLD_S` to :attr:`REFUSAL_HOLD_S` + :attr:`REFUSAL_HOLD_SPREAD_S`
        (within the call's deadline, ``remaining`` seconds) makes its own concurrency limit
        (HTTP/2 streams, its SDK's window) slow it to a few calls per second, at the cost of
        one sleeping task per held call. At most :attr:`MAX_HELD_PER_DEVICE` of a device's
        refusals are held at once (memory stays bounded); the rest are answered at once.

        The holds are spread (successive ones cover the spread evenly, a golden-ratio
        sequence): a flood's calls arrive together, and held for the same time they would be
        answered together and sent again together, every round, each round a burst of
        refusals that holds up the event loop, and another device's call behind it, for as
        long as the burst takes. Returns the seconds held (0.0: not held).
        """
        if not self.flooding(method, device_id):
            return 0.0
        held = self._held.get(device_id, 0)
        if held >= self.MAX_HELD_PER_DEVICE:
            return 0.0
        self._holds += 1
        hold = self.REFUSAL_HOLD_S + self.REFUSAL_HOLD_SPREAD_S * ((self._holds * _PHI) % 1.0)
        if remaining is not None:
            # Answered before the caller's deadline: it must see the refusal, not a timeout.
            hold = min(hold, remaining / 2)
        if hold <= 0.0:
            return 0.0
        self._held[device_id] = held + 1
        try:
            await asyncio.sleep(hold)
        finally:
            if self._held[device_id] <= 1:
                del self._held[device_id]
            else:
                self._held[device_id] -= 1
        return hold

    async def pace(self, device_id: str) -> None:
        """Take a frame token for a stream's next frame, waiting for one (gRPC flow control)."""
        await self._frames.wait_take(device_id)

    def pace_now(self, device_id: str) -> bool:
        """Take a frame token for a stream's next frame if one is there (no wait); whether
        it was (else :meth:`pace` waits for one)."""
        return self._frames.try_take(device_id) == 0.0

    # -- pipeline ---------------------------------------------------------------------------

    async def detect(
        self,
        admitted: Admitted,
        *,
        frame_id: str,
        image: bytes,
        deadline: float | None,
        guard: Callable[[Awaitable[Any]], Awaitable[Any]] | None = None,
    ) -> tuple[common_pb2.DetectionResult, InferenceResult]:
        """One admitted frame through its fair turn, the engine and the escalation hook."""
        device_id = admitted.device_id

        async def run() -> tuple[InferenceResult, Frame | None]:
            # Waiting for a turn counts against the frame's deadline, as the engine's queue does.
            wait = None if deadline is None else deadline - time.monotonic()
            try:
                async with asyncio.timeout(wait):
                    await self.fair.acquire(device_id)
            except TimeoutError:
                raise DeadlineExceeded("deadline passed while waiting for a turn") from None
            try:
                return await self.engine.detect_with_frame(
                    image, deadline=deadline, key=device_id, region=admitted.region
                )
            finally:
                self.fair.release(device_id)

        if guard is not None:
            result, decoded = await guard(run())
        else:
            result, decoded = await run()
        marks = await self.escalations.marks(
            self.detection_hook,
            device_id=device_id,
            region=admitted.region,
            frame_id=frame_id,
            result=result,
            frame=decoded,
        )
        msg = result_to_pb(result, frame_id=frame_id, gateway_id=self.gateway_id, escalated=marks)
        return msg, result

    # -- telemetry --------------------------------------------------------------------------

    def keep(self, record: TelemetryRecord) -> None:
        """Store an admitted device's validated report (the one telemetry store)."""
        self.telemetry.put(record)

    # -- refusals ---------------------------------------------------------------------------

    def refused(
        self,
        exc: BaseException,
        *,
        device_id: str | None,
        transport: str,
        method: str,
        frame_id: str = "",
        notify: bool = False,
        times: int = 1,
        **fields: Any,
    ) -> Status:
        """Count and audit one refused call or message (``times`` of them: refused
        elsewhere, by the broker's ingest limit); tell the device once when ``notify``.

        The status comes from the one mapping (:func:`gateway._status.status_of`); an
        unexpected error is an internal error, logged with its traceback. ``notify`` sends a
        bounded error event on the device's events (MQTT, which has no status to return);
        never to a revoked device.
        """
        status = status_of(exc)
        if status.reason == "internal":
            _log.error("unexpected error", method=method, exc_info=exc)
            return status
        self.count(status, times)
        if status.reason != "idle":
            if isinstance(exc, Unauthenticated):
                fields["detail"] = exc.reason  # for the audit only, never for the caller
            self.refusals.refused(
                device_id,
                status.reason,
                times=times,
                transport=transport,
                method=method,
                code=status.code,
                **fields,
            )
        if notify and device_id is not None and status.reason != "revoked":
            self.tell(device_id, status, frame_id)
        return status

    def count(self, status: Status, times: int = 1) -> None:
        """Count ``times`` refusals in ``denials_total`` when a denial (who, or how much)."""
        if self._metrics is not None and status.code in _DENIAL_CODES:
            self._metrics.denials.labels(reason=status.reason).inc(times)

    def tell(self, device_id: str, status: Status, frame_id: str = "") -> None:
        """An error event about a refused message, within the device's events per interval."""
        if pki.ID_PATTERN.fullmatch(device_id) is None:
            return
        held = self.refusals.allow_event(device_id, status.code)
        if held is None:
            return  # counted; reported in one event when the interval ends
        message = status.message
        if held:
            message = f"{message} ({held} earlier refused messages not reported)"
        self.events.publish(
            device_id, ErrorEvent(code=status.code, message=message, frame_id=frame_id)
        )

    def _on_suppressed_events(self, device_id: str, count: int, code: str) -> None:
        if pki.ID_PATTERN.fullmatch(device_id) is None:
            return
        interval = self.refusals.interval_s
        self.events.publish(
            device_id,
            ErrorEvent(
                code=code,
                message=f"{count} more refused messages not reported in the last "
                f"{interval:g} s (at most {self.refusals.events_per_interval} errors are "
                "reported per interval)",
            ),
        )
