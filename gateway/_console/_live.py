"""Live detections for a gateway's console: frames with their boxes, only while watched.

:class:`LiveFeed` takes detections through the one seam both transports (gRPC and MQTT) call
for every freshly judged frame, the front door's ``detection_hook``: it wraps the hook already
installed (the escalation plug-in's), calls it first, and then, only when an operator is
watching, hands the frame to its worker (a bounded queue: a full queue drops the frame, never
the device's answer). The worker shrinks and encodes the frame as JPEG in a thread, at most
``max_fps`` frames per device, and fans it out to the watching consoles. Escalation answers
reach the view through the event hub's listener. Frames answered from the response cache
are not judged again and so do not appear (the same picture was shown before).

Pixels never leave this process except to an authenticated operator of this console.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from PIL import Image

from gateway._events import DeviceEvent, EscalationAnswer

__all__ = ["LiveFeed", "LiveFrame"]

_log = structlog.get_logger(__name__)
_MAX_SIDE = 640
_MAX_DEVICES = 10_000


@dataclass(frozen=True, slots=True)
class LiveFrame:
    """One frame as the live view shows it."""

    device_id: str
    frame_id: str
    at: float
    jpeg: bytes
    width: int
    height: int
    detections: tuple[dict[str, Any], ...]
    model: str

    def as_json(self) -> dict[str, Any]:
        return {
            "type": "frame",
            "device": self.device_id,
            "frame_id": self.frame_id[:64],
            "at": self.at,
            "image": "data:image/jpeg;base64," + base64.b64encode(self.jpeg).decode(),
            "width": self.width,
            "height": self.height,
            "detections": list(self.detections),
            "model": self.model,
        }


def _encode(frame: npt.NDArray[np.uint8]) -> tuple[bytes, int, int]:
    image = Image.fromarray(frame, mode="RGB")
    image.thumbnail((_MAX_SIDE, _MAX_SIDE))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=75)
    return out.getvalue(), image.width, image.height


class LiveFeed:
    """Bounded fan-out of live frames and events to watching consoles; see the module doc."""

    def __init__(self, *, max_fps: float = 2.0, queue_size: int = 8) -> None:
        self._min_gap = 1.0 / max_fps
        self._work: asyncio.Queue[tuple[str, str, Any, Any]] = asyncio.Queue(queue_size)
        self._watchers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._last_sent: dict[str, float] = {}
        self.latest: dict[str, LiveFrame] = {}
        #: Device id → (wall time of its last freshly judged frame, transport).
        self.seen: dict[str, tuple[float, str]] = {}
        #: Tells whether a device's frame came over gRPC (it has a live call right now).
        self.on_grpc: Any = lambda _device_id: False
        self.dropped = 0
        #: Frames judged afresh over MQTT (gRPC frames are counted by the metrics).
        self.mqtt_frames = 0
        #: The edge model that judged the last frame.
        self.model = ""
        #: Per device, what its last frames held (labels and scores, never pixels).
        self.recent: dict[str, deque[dict[str, Any]]] = {}

    @property
    def watched(self) -> bool:
        return bool(self._watchers)

    def wrap(self, previous: Any) -> Any:
        """A detection hook calling ``previous`` (may be ``None``) and then feeding the view."""

        async def hook(
            *,
            device_id: str,
            region: str | None,
            frame_id: str,
            result: Any,
            frame: Any,
        ) -> Any:
            marks: Any = {}
            if previous is not None:
                marks = await previous(
                    device_id=device_id,
                    region=region,
                    frame_id=frame_id,
                    result=result,
                    frame=frame,
                )
            self.offer(device_id, frame_id, result, frame, marks)
            return marks

        hook.previous = previous  # type: ignore[attr-defined]
        return hook

    def offer(self, device_id: str, frame_id: str, result: Any, frame: Any, marks: Any) -> None:
        """Take one judged frame (never blocks; drops when unwatched, too soon or busy)."""
        now = time.monotonic()
        transport = "grpc" if self.on_grpc(device_id) else "mqtt"
        self.seen[device_id] = (time.time(), transport)
        self.mqtt_frames += transport == "mqtt"
        self.model = f"{result.model_name} {result.model_version}".strip()
        recent = self.recent.get(device_id)
        if recent is None:
            if len(self.recent) >= _MAX_DEVICES:
                self.recent.pop(next(iter(self.recent)))
            recent = self.recent[device_id] = deque(maxlen=10)
        recent.append(
            {
                "at": time.time(),
                "frame_id": frame_id[:64],
                "transport": transport,
                "labels": [[d.label, round(float(d.score), 2)] for d in result.detections][:10],
                "escalated": len(marks or {}),
            }
        )
        if not self._watchers or frame is None:
            return
        if now - self._last_sent.get(device_id, 0.0) < self._min_gap:
            return
        try:
            self._work.put_nowait((device_id, frame_id, result, (frame, dict(marks or {}))))
        except asyncio.QueueFull:
            self.dropped += 1
            return
        self._last_sent[device_id] = now

    def on_event(self, device_id: str, event: DeviceEvent) -> None:
        """The event hub's listener: escalation answers shown beside the frames."""
        p = event.payload
        if isinstance(p, EscalationAnswer):
            self._fan_out(
                {
                    "type": "answer",
                    "device": device_id,
                    "escalation_id": p.escalation_id,
                    "label": p.label,
                    "score": round(p.score, 3),
                    "still_unknown": p.still_unknown,
                    "edge_label": p.edge_label,
                }
            )

    def on_revoked(self, device_id: str, serial: str | None, reason: str) -> None:
        self._fan_out(
            {"type": "revoked", "device": device_id, "reason": reason[:200], "serial": serial or ""}
        )

    def _fan_out(self, message: dict[str, Any]) -> None:
        for q in list(self._watchers):
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()  # a slow viewer skips, it does not hold memory
            q.put_nowait(message)

    async def run(self) -> None:
        """The worker: encode frames off the event loop and fan them out."""
        while True:
            device_id, frame_id, result, (frame, marks) = await self._work.get()
            try:
                jpeg, width, height = await asyncio.to_thread(_encode, frame)
            except (ValueError, OSError, TypeError):  # not an RGB frame: skip it, keep serving
                _log.exception("live view: frame not shown", device_id=device_id)
                continue
            detections = tuple(
                {
                    "label": d.label,
                    "score": round(float(d.score), 3),
                    "box": [
                        round(float(v), 4)
                        for v in (d.box.x_min, d.box.y_min, d.box.x_max, d.box.y_max)
                    ],
                    "escalated": i in marks,
                }
                for i, d in enumerate(result.detections)
            )
            live = LiveFrame(
                device_id,
                frame_id,
                time.time(),
                jpeg,
                width,
                height,
                detections,
                f"{result.model_name} {result.model_version}".strip(),
            )
            self.latest[device_id] = live
            self._fan_out(live.as_json())

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        """A queue of messages for one viewer, live while the context is open."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(16)
        self._watchers.add(q)
        try:
            for live in list(self.latest.values())[-q.maxsize :]:
                q.put_nowait(live.as_json())
            yield q
        finally:
            self._watchers.discard(q)
