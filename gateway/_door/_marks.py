"""Escalation marks: what the detection hook decided about an answer, remembered for repeats.

The escalation plug-in installs a :class:`DetectionHook` on the front door; the door calls it
through :class:`EscalationMemory` for every fresh result, whichever transport carried the
frame, and renders the marks into the answer (:func:`gateway._door._render.result_to_pb`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import numpy.typing as npt
import structlog

from gateway._inference import InferenceResult

__all__ = [
    "WHOLE_FRAME_LABEL",
    "DetectionHook",
    "EscalationMarks",
    "EscalationMemory",
    "Frame",
]

_log = structlog.get_logger(__name__)

Frame = npt.NDArray[np.uint8]

#: What a detection hook escalated: detection index → escalation id, and ``None`` → the id
#: of an escalation of the whole frame (rendered as one extra detection, see
#: :func:`result_to_pb`).
EscalationMarks = Mapping[int | None, str]

#: Label of the extra detection standing for an escalated whole frame (the edge found
#: nothing it could name); score 0, box the whole frame.
WHOLE_FRAME_LABEL = "unknown"


class DetectionHook(Protocol):
    """Called with every fresh result, empty ones included (the escalation plug-in).

    The hook's policy decides what escalates: detections, or (``None`` key) the whole frame,
    e.g. when the edge found nothing. The front door marks them ``escalated`` in the answer.
    It must not block (store work, return). Called through :class:`EscalationMemory`: not
    again for a device's repeat of a picture it already had judged (the response cache
    answers it, and the first answer's marks are given again), nor when no hook is installed.
    """

    async def __call__(
        self,
        *,
        device_id: str,
        region: str | None,
        frame_id: str,
        result: InferenceResult,
        frame: Frame | None,
    ) -> EscalationMarks: ...


class EscalationMemory:
    """The escalation marks given with each answer, so that a cached answer carries them too.

    The response cache repeats the engine's result (same detections, same ``result_id``) but
    not what the detection hook decided about it. This remembers, per (device, result), the
    marks of the first answer: when the same device sends the same picture again and the
    cache answers, the answer carries the same ``escalated`` flags and the *same* escalation
    ids. The picture is not escalated a second time: the core's final answer for that id
    comes once, on ``Subscribe`` or ``devices/<id>/events``, and answers both.

    Another device whose frame hits the cache entry gets its own judgement (the hook is
    called for it, with the decoded frame when there is one; an exact-cache hit has none, so
    nothing can be cropped and nothing escalates for it): escalation answers go to the
    device that was given the id, never to another. Bounded: the least recently used of
    ``max_entries`` is forgotten (a forgotten repeat is judged again, as a fresh one).
    The front door owns one, so both transports share it. Event-loop only.
    """

    def __init__(self, *, max_entries: int = 8192) -> None:
        self._max_entries = max_entries
        self._marks: OrderedDict[tuple[str, str], EscalationMarks] = OrderedDict()

    def __len__(self) -> int:
        return len(self._marks)

    async def marks(
        self,
        hook: DetectionHook | None,
        *,
        device_id: str,
        region: str | None,
        frame_id: str,
        result: InferenceResult,
        frame: Frame | None,
    ) -> EscalationMarks:
        """The marks for this answer: remembered for a cached repeat, else the hook's."""
        if hook is None:
            # No hook (escalation not configured): no call, nothing added to the hot path.
            return {}
        key = (device_id, result.result_id)
        if result.from_cache and result.result_id:
            known = self._marks.get(key)
            if known is not None:
                self._marks.move_to_end(key)
                return known
        # Empty results too: the region's policy may escalate frames the edge found nothing
        # in.
        try:
            marks = await hook(
                device_id=device_id, region=region, frame_id=frame_id, result=result, frame=frame
            )
        except Exception:  # noqa: BLE001 - escalation is best effort: the edge answer stands
            _log.exception("detection hook failed", device_id=device_id, frame_id=frame_id)
            return {}
        if result.result_id:
            self._marks[key] = dict(marks)
            self._marks.move_to_end(key)
            while len(self._marks) > self._max_entries:
                self._marks.popitem(last=False)
        return marks
