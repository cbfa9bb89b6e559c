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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway._inference._detection import Detection

from ._config import RegionPolicy

__all__ = ["Budgets", "Candidate", "EscalationReason", "TokenBucket", "select"]

EscalationReason = Literal["uncertain", "outside_edge_set", "empty_frame"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A detection to escalate (``index`` into the result's detections; ``None``: the frame)."""

    index: int | None
    reason: EscalationReason


def select(policy: RegionPolicy, detections: Sequence[Detection]) -> list[Candidate]:
    """The detections the policy escalates, most doubtful first, at most ``max_per_frame``.

    Outside-the-set labels come first (the edge cannot name them at all), then band members
    by ascending score. An empty frame is a candidate only when the region asks for it.
    """
    if not detections:
        if policy.escalate_empty_frames:
            return [Candidate(None, "empty_frame")]
        return []
    edge_set = None if policy.edge_labels is None else frozenset(policy.edge_labels)
    outside: list[tuple[float, int]] = []
    uncertain: list[tuple[float, int]] = []
    for i, det in enumerate(detections):
        if edge_set is not None and det.label not in edge_set:
            outside.append((det.score, i))
        elif policy.band_low <= det.score < policy.band_high:
            uncertain.append((det.score, i))
    chosen = [Candidate(i, "outside_edge_set") for _, i in sorted(outside)]
    chosen += [Candidate(i, "uncertain") for _, i in sorted(uncertain)]
    return chosen[: policy.max_per_frame]


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

    def try_take(self, device_id: str, region: str, policy: RegionPolicy) -> str | None:
        """Take one escalation from both budgets; on refusal return which was empty.

        Both buckets are checked before either is charged, so a refusal costs nothing.
        """
        now = self._clock()
        device = self._devices.get(device_id)
        if device is None:
            burst = max(1.0, policy.device_budget_per_min)
            device = TokenBucket(policy.device_budget_per_min, burst, now)
            self._devices[device_id] = device
            while len(self._devices) > self._max_devices:
                self._devices.popitem(last=False)
        self._devices.move_to_end(device_id)
        regional = self._regions.get(region)
        if regional is None:
            burst = max(1.0, policy.region_budget_per_min)
            regional = TokenBucket(policy.region_budget_per_min, burst, now)
            self._regions[region] = regional
        if not device.available(now):
            return "device_budget"
        if not regional.available(now):
            return "region_budget"
        device.take(now)
        regional.take(now)
        return None
