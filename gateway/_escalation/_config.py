"""The ``[escalation]`` table of the gateway configuration: per-region policy and the outbox.

Validated by :meth:`gateway._config.GatewaySettings.section` with :class:`EscalationSettings`,
so a bad key is reported as ``escalation.regions.home.band_low`` with its environment
override. Every field carries a description (``docs/escalation.md`` lists them).

A region's policy answers three questions: *what* escalates (an uncertainty band of scores,
labels outside the region's edge set, optionally frames where the edge found nothing), *how
much* (escalations per minute per device and per region) and *what may leave the edge* (crops
or whole frames, faces blurred or not, which core).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway._core_endpoints import join_core_addresses, parse_core_addresses

__all__ = ["EscalationSettings", "RegionPolicy", "region_key"]


def region_key(name: str) -> str:
    """A region name as ``regions`` holds it: registry spelling, ``_`` read as ``-``."""
    return name.replace("_", "-")


class RegionPolicy(BaseModel):
    """What escalates in one region, how often, and what may leave the edge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="Escalate at all in this region.")
    band_low: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Lower end (inclusive) of the uncertainty band: an edge detection scoring "
        "in [band_low, band_high) is escalated. The edge model reports nothing below its own "
        "score threshold (inference.score_threshold), so a band_low under it is refused at "
        "start-up.",
    )
    band_high: float = Field(
        default=0.65,
        ge=0.0,
        le=1.0,
        description="Upper end (exclusive) of the uncertainty band; at or above it the edge's "
        "answer stands.",
    )
    edge_labels: tuple[str, ...] | None = Field(
        default=None,
        description="The region's edge label set: a detection whose label is not in it is "
        "escalated whatever its score. Unset = every label of the edge model.",
    )
    escalate_empty_frames: bool = Field(
        default=True,
        description="Escalate a frame in which the edge found nothing, whole. It takes effect "
        "only where frames may leave the edge (send = 'frame'; an empty frame has no crop) "
        "and is budgeted per device by empty_frame_budget_per_min.",
    )
    empty_frame_budget_per_min: float = Field(
        default=2.0,
        gt=0.0,
        description="Empty frames per minute one device may have escalated whole (token "
        "bucket, burst of the same size), within its device_budget_per_min: a camera facing "
        "an empty room does not send every frame.",
    )
    device_budget_per_min: float = Field(
        default=6.0,
        gt=0.0,
        description="Escalations per minute one device may cause (token bucket, burst of the "
        "same size); beyond it detections are answered by the edge alone.",
    )
    region_budget_per_min: float = Field(
        default=120.0,
        gt=0.0,
        description="Escalations per minute for all devices of the region together.",
    )
    max_per_frame: int = Field(
        default=4,
        ge=1,
        le=32,
        description="At most this many escalations from one frame: labels outside the edge "
        "set first, then the uncertainty band, biggest object first, one per object.",
    )
    send: Literal["crop", "frame"] = Field(
        default="crop",
        description="'crop': only the detection's box (with crop_margin) leaves the edge; "
        "'frame': the whole frame may be sent (needed for escalate_empty_frames).",
    )
    crop_margin: float = Field(
        default=0.15,
        ge=0.0,
        le=1.0,
        description="Margin added around a box on each side, as a fraction of its size, so "
        "the core sees some context.",
    )
    max_side_px: int = Field(
        default=640,
        ge=64,
        le=4096,
        description="What is sent is shrunk so its longer side is at most this many pixels.",
    )
    jpeg_quality: int = Field(default=85, ge=30, le=95, description="JPEG quality of what is sent.")
    require_face_blur: bool = Field(
        default=True,
        description="Blur every face CenterFace finds before any pixel leaves the edge. When "
        "the face model cannot run, nothing is sent (fail closed).",
    )
    face_score_threshold: float = Field(
        default=0.35,
        gt=0.0,
        lt=1.0,
        description="CenterFace score from which a region counts as a face to blur (low on "
        "purpose: a blurred non-face costs little, a missed face leaks).",
    )
    core_address: str | None = Field(
        default=None,
        description="host:port of the core this region's escalations are pinned to (a comma "
        "or TOML list: replicas, with failover); unset = "
        "escalation.core_address, then the gateway's core_address.",
    )

    @field_validator("core_address", mode="before")
    @classmethod
    def _check_core(cls, value: Any) -> str | None:
        return None if value is None else join_core_addresses(parse_core_addresses(value))

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        if self.band_low > self.band_high:
            raise ValueError("band_low must not exceed band_high")
        # The default (on) is inert under send = 'crop'; asking for it there is a mistake.
        if (
            "escalate_empty_frames" in self.model_fields_set
            and self.escalate_empty_frames
            and self.send != "frame"
        ):
            raise ValueError(
                "escalate_empty_frames needs send = 'frame' (an empty frame has no crop)"
            )
        return self


class EscalationSettings(BaseModel):
    """The gateway's ``[escalation]`` table: the outbox, delivery and per-region policies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="Escalation on or off for this gateway.")
    core_address: str | None = Field(
        default=None,
        description="host:port of the core to escalate to (a comma or TOML list: replicas, "
        "with failover); unset = the gateway's core_address.",
    )
    regions: dict[str, RegionPolicy] = Field(
        default_factory=dict,
        description="Policy per region ([escalation.regions.<name>]). A device uses its "
        "registry region's policy, else the gateway region's; a region without a policy "
        "escalates nothing.",
    )
    outbox_path: Path = Field(
        default=Path("escalation-outbox.sqlite3"),
        description="SQLite file (WAL mode) of the durable outbox and of answers waiting for "
        "offline devices.",
    )
    max_outbox_entries: int = Field(
        default=10_000,
        ge=1,
        description="Escalations waiting for the core at most. When full, new escalations are "
        "refused (the detection is answered by the edge alone, with the reason logged and "
        "counted); stored ones are never dropped.",
    )
    max_stored_answers: int = Field(
        default=100_000,
        ge=1,
        description="Answers kept for devices at most; beyond it the oldest expire early.",
    )
    delivery_ttl_s: float = Field(
        default=86_400.0,
        gt=0.0,
        description="Seconds an answer is kept for a device that is offline.",
    )
    retry_backoff_base_s: float = Field(
        default=0.2,
        gt=0.0,
        description="First retry delay while the core is unreachable; doubles per attempt.",
    )
    retry_backoff_max_s: float = Field(
        default=30.0,
        gt=0.0,
        description="Longest retry delay (full jitter: a random delay up to the backoff).",
    )
    max_attempts: int = Field(
        default=0,
        ge=0,
        description="Give up after this many failed attempts and tell the device (an error "
        "event); 0 = retry until delivery_ttl_s has passed since the escalation.",
    )
    call_timeout_s: float = Field(
        default=10.0, gt=0.0, description="Deadline of one Escalate call to the core."
    )
    concurrency: int = Field(
        default=4, ge=1, le=64, description="Escalate calls in flight to the core at once."
    )
    max_pixels: int = Field(
        default=16_000_000, ge=1, description="Pixel bound for frames the escalator decodes."
    )

    @field_validator("core_address", mode="before")
    @classmethod
    def _check_core(cls, value: Any) -> str | None:
        return None if value is None else join_core_addresses(parse_core_addresses(value))

    @field_validator("regions", mode="before")
    @classmethod
    def _region_names(cls, value: Any) -> Any:
        """Spell region names as the registry does (``home-eu``), merging env overrides.

        Region ids are ``[a-z0-9-]``, but an environment variable cannot hold ``-``:
        ``EDGEWARD_GATEWAY_ESCALATION__REGIONS__HOME_EU__BAND_HIGH`` arrives as ``home_eu``.
        Without this it would silently be a second region no device belongs to; here its
        keys override those of the file's ``home-eu`` table.
        """
        if not isinstance(value, dict):
            return value
        merged: dict[str, Any] = {}
        # Hyphenated (file) names first, so the underscored (environment) ones land on top.
        for name in sorted(value, key=lambda n: "_" in str(n)):
            key = region_key(str(name))
            table = value[name]
            if isinstance(merged.get(key), dict) and isinstance(table, dict):
                merged[key] = {**merged[key], **table}
            else:
                merged[key] = table
        return merged

    @model_validator(mode="after")
    def _check_backoff(self) -> Self:
        if self.retry_backoff_base_s > self.retry_backoff_max_s:
            raise ValueError("retry_backoff_base_s must not exceed retry_backoff_max_s")
        return self

    def policy_for(self, region: str | None, gateway_region: str) -> RegionPolicy | None:
        """The policy for a device of ``region`` at a gateway serving ``gateway_region``."""
        if not self.enabled:
            return None
        policy = None
        if region is not None:
            policy = self.regions.get(region_key(region))
        if policy is None:
            policy = self.regions.get(region_key(gateway_region))
        return policy if policy is not None and policy.enabled else None
