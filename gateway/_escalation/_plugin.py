"""The escalation component as a gateway plug-in (``edgeward gateway run`` finds it).

``plugin(settings)`` validates the ``[escalation]`` table (a bad key, or no core to escalate
to, stops the start-up with a :class:`~gateway.errors.ConfigError` naming it) and returns a
factory the :class:`~gateway._service.GatewayService` calls with its runtime (the component
contract of :mod:`gateway._service`). Entering the plug-in opens the outbox, starts delivery
and installs the detection hook on the gateway's front door, which calls it for every fresh
result from either transport, empty ones included (a device's repeat answered from the
response cache gets the first answer's marks again instead, see
``gateway._door.EscalationMemory``); leaving
removes the hook, then stops delivery (what is pending stays in the outbox for the next
start).
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from gateway._core_endpoints import core_channel_credentials
from gateway._events import EscalationId
from gateway._inference import InferenceResult
from gateway._settings import ConfigError

from ._config import EscalationSettings
from ._escalator import Escalator

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from gateway._config import GatewaySettings
    from gateway._door import EscalationMarks
    from gateway._service import GatewayRuntime

__all__ = ["EscalationPlugin", "plugin"]


class EscalationPlugin:
    """Runs an :class:`Escalator` inside a gateway and hooks it to fresh detections."""

    def __init__(self, settings: EscalationSettings, runtime: GatewayRuntime) -> None:
        self._runtime = runtime
        self._unexport: Callable[[], None] = lambda: None
        gw = runtime.settings
        identity = runtime.identity
        self.escalator = Escalator(
            settings,
            gateway_id=runtime.gateway_id,
            gateway_region=gw.region,
            credentials=core_channel_credentials(identity),
            sink=runtime.events.publish,
            models_dir=gw.inference.models_dir,
            default_core_address=gw.core_address,
        )

    async def hook(
        self,
        *,
        device_id: str,
        region: str | None,
        frame_id: str,
        result: InferenceResult,
        frame: npt.NDArray[np.uint8] | None,
    ) -> EscalationMarks:
        """The front door's detection hook: escalate what the region's policy picks.

        Returns detection index → escalation id, and ``None`` → the id of a whole-frame
        escalation (an empty frame, when the region escalates those); the front door renders
        that one as an extra detection (``gateway._door.result_to_pb``).
        """
        outcome = await self.escalator.escalate(
            device_id=device_id,
            region=region,
            frame_id=frame_id,
            detections=result.detections,
            frame=frame,
            edge_model=result.model_name,
            edge_labels=result.labels,
        )
        return {p.index: EscalationId(p.escalation_id, p.reason) for p in outcome.pending}

    async def __aenter__(self) -> EscalationPlugin:
        await self.escalator.__aenter__()
        self._runtime.door.detection_hook = self.hook
        self._unexport = self._runtime.metrics.add_counters("", self._counts, label="outcome")
        return self

    def _counts(self) -> dict[str, float | dict[str, float]]:
        return {"escalations": {k: float(v) for k, v in dict(self.escalator.counts).items()}}

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runtime.door.detection_hook == self.hook:
            self._runtime.door.detection_hook = None
        self._unexport()
        await self.escalator.__aexit__(exc_type, exc, tb)


def plugin(
    settings: GatewaySettings,
) -> Callable[[GatewayRuntime], AbstractAsyncContextManager[Any]] | None:
    """The plug-in factory for ``settings``' ``[escalation]`` table, or ``None`` when off."""
    section = settings.section("escalation", EscalationSettings)
    if section is None or not section.enabled:
        return None
    if section.core_address is None and settings.core_address is None:
        unpinned = sorted(
            name for name, r in section.regions.items() if r.enabled and r.core_address is None
        )
        if unpinned:
            # Caught at start rather than as a "no_core" refusal on every frame.
            raise ConfigError(
                "invalid configuration:\n  escalation.core_address: no core to escalate to "
                f"for region(s) {', '.join(unpinned)}; set escalation.core_address, "
                "core_address, or the region's core_address (environment override: "
                "EDGEWARD_GATEWAY_ESCALATION__CORE_ADDRESS)"
            )

    def factory(runtime: GatewayRuntime) -> AbstractAsyncContextManager[Any]:
        return EscalationPlugin(section, runtime)

    return factory
