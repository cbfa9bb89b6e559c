"""Which edge detections escalate to the core, and how many one device or region may send.

:func:`select` is pure: given a region's policy and what the edge model said, it names the
candidates (a detection in the uncertainty band, a label outside the region's edge set, or
an empty frame). :class:`Budgets` then admits or refuses each candidate with two token
buckets, one per device and one per region, so that one chatty device cannot exhaust its
region's share of the core, and no region the core's.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway._inference._detection import Box, Detection

from ._config import RegionPolicy

__all__ = ["Budgets", "Candidate", "EscalationReason", "TokenBucket", "select"]

EscalationReason = Literal["uncertain", "outside_edge_set", "empty_frame"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A detection to escalate (``index`` into the result's detections; ``None``: the frame)."""

    index: int | None
    reason: EscalationReason


def select(
    policy: RegionPolicy,
    detections: Sequence[Detection],
    *,
    model_labels: Collection[str] | None = None,
) -> list[Candidate]:
    """The detections the policy escalates, most doubtful first, at most ``max_per_frame``.

    The edge set is the policy's ``edge_labels``, else ``model_labels``: every label of the
    model that produced ``detections`` (a region may run another edge model than the
    default, see ``inference.region_models``).

    An empty frame is a candidate where the region escalates empty frames and lets frames
    leave the edge (``send = 'frame'``). Otherwise the candidates are detections whose label
    is outside the region's edge set (the edge cannot name them at all) and then those whose
    score is in the uncertainty band; within each, the biggest object first, and one
    escalation per object: a box overlapping an already chosen one by half (IoU 0.5) is the
    same thing under another label or score. Ranking by score instead spends the per-frame
    cap on the smallest, lowest boxes -- the edge's borderline background hits -- and leaves
    out a doubtful person in the middle of the frame.
    """
    if not detections:
        if policy.escalate_empty_frames and policy.send == "frame":
            return [Candidate(None, "empty_frame")]
        return []
    labels = policy.edge_labels if policy.edge_labels is not None else model_labels
    edge_set = None if labels is None else frozenset(labels)
    ranked: list[tuple[int, float, float, int, EscalationReason]] = []
    for i, det in enumerate(detections):
        if edge_set is not None and det.label not in edge_set:
            ranked.append((0, -det.box.area, det.score, i, "outside_edge_set"))
        elif policy.band_low <= det.score < policy.band_high:
            ranked.append((1, -det.box.area, det.score, i, "uncertain"))
    chosen: list[Candidate] = []
    for *_, i, reason in sorted(ranked):
        box = detections[i].box
        if any(_iou(box, detections[c.index].box) >= 0.5 for c in chosen if c.index is not None):
            continue
        chosen.append(Candidate(i, reason))
        if len(chosen) == policy.max_per_frame:
            break
    return chosen


def _iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a.x_max, b.x_max) - max(a.x_min, b.x_min))
    iy = max(0.0, min(a.y_max, b.y_max) - max(a.y_min, b.y_min))
    inter = ix * iy
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


class TokenBucket:
    """``rate_per_min`` tokens a minute, holding at most ``burst``; starts full."""

    def __init__(self, rate_per_min: float, burst: float, now: float) -> None:
        self.rate_per_s = rate_per_min / 60.0
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate_per_s)
        self.updated = now

    def available(self, now: float) -> bool:
        """Whether one token can be taken now."""
        self._refill(now)
        return self.tokens >= 1.0

    def take(self, now: float) -> None:
        """Take one token (the caller checked :meth:`available`)."""
        self._refill(now)
        self.tokens -= 1.0


class Budgets:
    """Per-device and per-region escalation budgets (escalations per minute).

    Memory is bounded: at most ``max_devices`` device buckets are kept, the least recently
    used dropped first (a dropped device starts again with a full bucket, which is at most
    one burst more than its budget). Event-loop only.
    """

    def __init__(
        self, *, max_devices: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._max_devices = max_devices
        self._devices: OrderedDict[str, TokenBucket] = OrderedDict()
        self._regions: dict[str, TokenBucket] = {}

    def try_take(
        self, device_id: str, region: str, policy: RegionPolicy, *, whole_frame: bool = False
    ) -> str | None:
        """Take one escalation from the budgets; on refusal return which was empty.

        ``whole_frame`` (an empty frame sent whole) also takes from the device's own
        ``empty_frame_budget_per_min`` bucket: a camera facing an empty room would otherwise
        send every frame. All buckets are checked before any is charged, so a refusal costs
        nothing.
        """
        now = self._clock()
        device = self._bucket(device_id, policy.device_budget_per_min, now)
        regional = self._regions.get(region)
        if regional is None:
            burst = max(1.0, policy.region_budget_per_min)
            regional = TokenBucket(policy.region_budget_per_min, burst, now)
            self._regions[region] = regional
        frames = (
            self._bucket(f"{device_id}\x00frames", policy.empty_frame_budget_per_min, now)
            if whole_frame
            else None
        )
        if frames is not None and not frames.available(now):
            return "empty_frame_budget"
        if not device.available(now):
            return "device_budget"
        if not regional.available(now):
            return "region_budget"
        device.take(now)
        regional.take(now)
        if frames is not None:
            frames.take(now)
        return None

    def _bucket(self, key: str, rate_per_min: float, now: float) -> TokenBucket:
        bucket = self._devices.get(key)
        if bucket is None:
            bucket = TokenBucket(rate_per_min, max(1.0, rate_per_min), now)
            self._devices[key] = bucket
            while len(self._devices) > self._max_devices:
                self._devices.popitem(last=False)
        self._devices.move_to_end(key)
        return bucket
