"""What the core console shows of escalations: the crop as it left the edge and the answer.

:class:`EscalationLog` wraps the core's escalation handler: each answered request is kept in
memory (bounded in count and bytes), with the image exactly as the gateway sent it (crops
are cut, and faces blurred where the region says so, before anything leaves the edge), the
edge's guess, the core's answer and the time it took. Nothing else of a frame ever reaches
the core, so nothing else can be shown here; whole frames stay on their gateway's console.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pki
from protos.edgeward.v1 import core_pb2

__all__ = ["EscalationLog", "EscalationRecord"]


@dataclass(frozen=True, slots=True)
class EscalationRecord:
    gateway_id: str
    escalation_id: str
    device_id: str
    region: str
    frame_id: str
    is_full_frame: bool
    image: bytes
    edge_label: str
    edge_score: float
    label: str
    score: float
    model_name: str
    still_unknown: bool
    model_ms: float
    total_ms: float
    at: dt.datetime

    @property
    def image_type(self) -> str:
        return "image/png" if self.image.startswith(b"\x89PNG") else "image/jpeg"


class EscalationLog:
    """The most recent escalations this core answered, newest last."""

    def __init__(self, *, max_entries: int = 500, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._entries: OrderedDict[tuple[str, str], EscalationRecord] = OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0

    def wrap(self, handler: Any) -> Callable[..., Any]:
        """A handler with ``handler``'s signature that records every answer it gives."""

        async def recording(
            request: core_pb2.EscalationRequest, context: Any, *, gateway: pki.Identity
        ) -> core_pb2.EscalationResult:
            started = time.perf_counter()
            result: core_pb2.EscalationResult = await handler(request, context, gateway=gateway)
            self.add(gateway.id, request, result, (time.perf_counter() - started) * 1000)
            return result

        return recording

    def add(
        self,
        gateway_id: str,
        request: core_pb2.EscalationRequest,
        result: core_pb2.EscalationResult,
        total_ms: float,
    ) -> None:
        a = result.answer
        record = EscalationRecord(
            gateway_id=gateway_id,
            escalation_id=request.escalation_id,
            device_id=request.device_id,
            region=request.region,
            frame_id=request.frame_id,
            is_full_frame=request.is_full_frame,
            image=bytes(request.image),
            edge_label=request.edge_label,
            edge_score=request.edge_score,
            label=a.label,
            score=a.score,
            model_name=a.model_name,
            still_unknown=a.still_unknown,
            model_ms=result.model_ms,
            total_ms=total_ms,
            at=dt.datetime.now(dt.UTC),
        )
        key = (gateway_id, request.escalation_id)
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old.image)
        self._entries[key] = record
        self._bytes += len(record.image)
        while self._entries and (
            len(self._entries) > self._max_entries or self._bytes > self._max_bytes
        ):
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= len(dropped.image)

    def get(self, gateway_id: str, escalation_id: str) -> EscalationRecord | None:
        return self._entries.get((gateway_id, escalation_id))

    def last_per_device(self) -> dict[str, tuple[dt.datetime, str]]:
        """Per device, when its latest kept escalation was answered and through which gateway."""
        return {r.device_id: (r.at, r.gateway_id) for r in self._entries.values()}

    def recent(self, device_id: str | None = None, limit: int = 200) -> list[EscalationRecord]:
        """Newest first."""
        out = [
            r
            for r in reversed(self._entries.values())
            if device_id is None or r.device_id == device_id
        ]
        return out[:limit]
