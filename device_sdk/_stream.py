"""The streaming gRPC transport: frames on one long-lived ``StreamDetect`` call.

With ``transport=Transport.GRPC_STREAM`` the sender (:mod:`device_sdk._delivery`) hands each
frame to :meth:`FrameStreams.detect` instead of a unary ``Detect`` call. The outbox rules do
not change: the frame leaves the outbox only when its result came back.

One :class:`_StreamSession` is open at a time for new frames: to the gateway in use, on the
channel of the current certificate. Results are matched to frames by frame id, so their order
does not matter. How each way a stream ends is handled (the gateway's behaviour is in
``gateway/_grpc/_servicer.py``, ``StreamDetect``):

* **Idle**: a stream that sends nothing for the gateway's ``stream_idle_timeout_s`` is ended
  with ``DEADLINE_EXCEEDED`` ("stream sent nothing for …"). That is not a gateway failure:
  frames on it (a frame racing the timeout) are sent again, and the next frame opens a new
  stream. Nothing is reopened while there is nothing to send.
* **A refused frame**: the gateway judges frames one at a time, in the order they arrive, and
  a refusal (``INVALID_ARGUMENT`` for an image it cannot decode, a non-final
  ``PERMISSION_DENIED``) ends the whole stream. The refused frame is the oldest one not yet
  answered; it is reported as :class:`~device_sdk.FrameRejected` and the frames behind it
  are sent again on a new stream.
* **A lost status**: when the gateway ends a stream while the client still writes to it,
  grpc.aio may report ``INTERNAL`` instead of the gateway's status (:func:`is_lost_status`).
  The frames on it are sent again, one at a time until one is judged, so that a refused
  frame gets its real status on the next stream; no failover.
* **Gateway loss** (``UNAVAILABLE``…, or no answer within ``call_timeout_s``): every frame on
  the stream fails with :class:`~device_sdk._grpc.GatewayDown`; the client fails over and the
  frames, still in the outbox, go to the next gateway.
* **Revocation**: the gateway cuts the stream with the final ``PERMISSION_DENIED``; every
  frame on it raises :class:`~device_sdk.errors.DeviceRevoked` and the client stops.
* **A new gateway or a renewed certificate**: the old stream is half-closed (no new frames),
  so it ends naturally once the gateway answered what it holds; a new stream carries the
  next frames. If the old channel is closed first (the old certificate retired after the
  grace of ``call_timeout_s``), its unanswered frames are sent again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from device_sdk._grpc import Busy, GatewayDown, Refused, classify
from device_sdk._queue import QueuedItem
from device_sdk._types import DetectionResult, GatewayInfo, Transport, timestamp
from protos.edgeward.v1 import common_pb2, gateway_pb2_grpc

__all__ = ["FrameStreams", "Resend", "is_idle_end", "is_lost_status"]

#: How the gateway words the end of an idle stream (``gateway.errors.StreamIdle``).
_IDLE_DETAILS = "stream sent nothing for"


class Resend(Exception):
    """The stream ended before this frame was judged; send it again (no failure)."""


def is_idle_end(exc: grpc.aio.AioRpcError, *, pending: int) -> bool:
    """Whether the gateway ended the stream for being idle.

    Its idle timer runs only while it waits for the next frame, so ``DEADLINE_EXCEEDED``
    with nothing pending is always the idle end; with frames pending (one sent just as the
    timer fired) the gateway's wording tells.
    """
    if exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
        return False
    return pending == 0 or (exc.details() or "").startswith(_IDLE_DETAILS)


def is_lost_status(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the stream's real status was lost to a write that raced the gateway's end.

    When the gateway ends a stream (a refused frame) while the client is still writing the
    frames behind it, grpc.aio fails the write and reports ``INTERNAL`` ("Internal error
    from Core") instead of the gateway's status. That says nothing about the gateway's
    health, so it is no reason to fail over.
    """
    return exc.code() is grpc.StatusCode.INTERNAL and (exc.details() or "").startswith(
        "Internal error from Core"
    )


class _StreamSession:
    """One ``StreamDetect`` call and the frames sent on it, not yet answered."""

    def __init__(
        self,
        *,
        gateway: GatewayInfo,
        stub: gateway_pb2_grpc.DeviceGatewayAsyncStub,
        device_id: str,
        log: Any,
    ) -> None:
        self.gateway = gateway
        self.stub = stub
        self._device_id = device_id
        self._log = log
        self._requests: asyncio.Queue[common_pb2.Frame | None] = asyncio.Queue()
        #: Frame id -> the future of its outcome, in the order the frames were sent.
        self._pending: collections.OrderedDict[str, asyncio.Future[DetectionResult]] = (
            collections.OrderedDict()
        )
        self.open = True  # accepts new frames
        #: The call ended with a status gRPC lost (see :func:`is_lost_status`).
        self.status_lost = False
        self.ended = False
        self._failure: Exception | None = None
        self._call: Any = stub.StreamDetect(self._frames())
        self.reader = asyncio.ensure_future(self._read())

    async def _frames(self) -> AsyncIterator[common_pb2.Frame]:
        while True:
            frame = await self._requests.get()
            if frame is None:
                return  # half-close: the gateway answers what it holds, then ends
            yield frame

    def send(self, frame: common_pb2.Frame) -> asyncio.Future[DetectionResult]:
        fut: asyncio.Future[DetectionResult] = asyncio.get_running_loop().create_future()
        self._pending[frame.frame_id] = fut
        self._requests.put_nowait(frame)
        return fut

    def retire(self) -> None:
        """No new frames; the stream ends once the gateway answered the ones it has."""
        if self.open:
            self.open = False
            self._requests.put_nowait(None)
            if not self._pending:
                # Nothing to wait for: end now rather than hold a stream slot until idle.
                self._call.cancel()

    def fail(self, exc: Exception) -> None:
        """End the stream now; every frame on it fails with ``exc``."""
        if self._failure is None:
            self._failure = exc
        self.open = False
        self._call.cancel()

    async def _read(self) -> None:
        end: Exception | None = None
        try:
            async for msg in self._call:
                fut = self._pending.pop(msg.frame_id, None)
                if fut is None:
                    self._log.warning("stream answer for an unknown frame", frame_id=msg.frame_id)
                    continue
                if not fut.done():
                    fut.set_result(DetectionResult.from_proto(msg, transport=Transport.GRPC_STREAM))
        except asyncio.CancelledError:
            # grpc.aio ends a call cancelled on our side this way; our own task being
            # cancelled (the client stops) is re-raised after the frames are settled.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                self._settle(Resend("the client stopped"), first=None)
                raise
            end = Resend("stream closed")
        except grpc.aio.AioRpcError as exc:
            end = self._ended_by(exc)
        else:
            end = Resend("stream ended")
        self._settle(end, first=None)

    def _ended_by(self, exc: grpc.aio.AioRpcError) -> Exception:
        if self._failure is not None or exc.code() is grpc.StatusCode.CANCELLED:
            return Resend("stream closed")
        if is_idle_end(exc, pending=len(self._pending)):
            self._log.debug("stream ended idle", gateway=self.gateway.gateway_id)
            return Resend("stream idle")
        if is_lost_status(exc):
            self.status_lost = True
            self._log.info("stream status lost; resending", gateway=self.gateway.gateway_id)
            return Resend("the stream's status was lost")
        err = classify(exc, device_id=self._device_id)
        if isinstance(err, Refused) and self._pending:
            # The gateway judges frames in order: the oldest unanswered one was refused.
            frame_id = next(iter(self._pending))
            self._settle(Resend("stream ended by a refused frame"), first=(frame_id, err))
        return err

    def _settle(self, exc: Exception, *, first: tuple[str, Exception] | None) -> None:
        self.ended = True
        self.open = False
        if first is not None:
            fut = self._pending.pop(first[0])
            if not fut.done():
                fut.set_exception(first[1])
        failure = self._failure or exc
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(failure)
        self._pending.clear()
        with contextlib.suppress(asyncio.QueueFull):
            self._requests.put_nowait(None)

    def forget(self, frame_id: str) -> None:
        self._pending.pop(frame_id, None)


class FrameStreams:
    """The stream sessions of one client (see the module docstring)."""

    def __init__(
        self,
        *,
        device_id: str,
        stub: Callable[[GatewayInfo], gateway_pb2_grpc.DeviceGatewayAsyncStub],
        call_timeout_s: float,
        log: Any,
    ) -> None:
        self._device_id = device_id
        self._stub = stub
        self._timeout = call_timeout_s
        self._log = log
        self._session: _StreamSession | None = None
        self._retired: set[_StreamSession] = set()
        self.opened = 0
        # After a lost status, one frame at a time until one is judged: a lone frame cannot
        # race its own refusal, so a refused frame gets its real status on the next stream.
        self._solo = False
        self._solo_lock = asyncio.Lock()

    def _session_for(self, gateway: GatewayInfo) -> _StreamSession:
        try:
            stub = self._stub(gateway)
        except grpc.aio.UsageError as exc:
            raise Busy("channel replaced") from exc
        session = self._session
        if session is not None and session.open and not session.ended:
            if session.gateway == gateway and session.stub is stub:
                return session
            # Another gateway, or a renewed certificate (a new channel): let it finish.
            session.retire()
            self._keep(session)
        try:
            session = _StreamSession(
                gateway=gateway, stub=stub, device_id=self._device_id, log=self._log
            )
        except grpc.aio.UsageError as exc:
            raise Busy("channel replaced") from exc
        self._session = session
        self.opened += 1
        return session

    def _keep(self, session: _StreamSession) -> None:
        """Hold a retired session until its reader ends (it answers its last frames)."""
        self._retired.add(session)
        session.reader.add_done_callback(lambda _: self._retired.discard(session))

    async def detect(self, gateway: GatewayInfo, item: QueuedItem) -> DetectionResult:
        """Send one frame on the stream to ``gateway`` and wait for its result.

        Raises :class:`Resend` (send it again), :class:`GatewayDown`, :class:`Busy`,
        :class:`Refused` or :class:`~device_sdk.errors.DeviceRevoked`, as the module docstring says.
        """
        if self._solo:
            async with self._solo_lock:
                if self._solo:
                    return await self._detect(gateway, item)
        return await self._detect(gateway, item)

    async def _detect(self, gateway: GatewayInfo, item: QueuedItem) -> DetectionResult:
        frame = common_pb2.Frame(image=item.payload, frame_id=item.frame_id)
        frame.captured_at.CopyFrom(timestamp(dt.datetime.fromtimestamp(item.captured_at, dt.UTC)))
        session = self._session_for(gateway)
        fut = session.send(frame)
        try:
            async with asyncio.timeout(self._timeout):
                result = await asyncio.shield(fut)
        except Refused:
            self._solo = False
            raise
        except Resend:
            if session.status_lost:
                self._solo = True
            raise
        except TimeoutError:
            # A stream that answers nothing for a whole call timeout is as good as dead.
            session.fail(GatewayDown(f"no answer on the stream within {self._timeout:g} s"))
            raise GatewayDown("no answer on the stream in time") from None
        finally:
            session.forget(item.frame_id)
        self._solo = False
        return result

    async def close(self) -> None:
        """Cancel every stream (the client stops; unanswered frames stay in the outbox)."""
        sessions = [*self._retired, *([self._session] if self._session else [])]
        self._session = None
        for session in sessions:
            session.fail(Resend("the client stopped"))
        for session in sessions:
            session.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await session.reader
