"""The escalation component as a gateway plug-in (``edgeward gateway run`` finds it).

``plugin(settings)`` validates the ``[escalation]`` table (a bad key stops the start-up with
a :class:`~gateway.errors.ConfigError` naming it) and returns a factory the
:class:`~gateway._service.GatewayService` calls with its runtime. Entering the plug-in opens
the outbox, starts delivery and installs the detection hook on the device servicer; leaving
removes the hook, then stops delivery (what is pending stays in the outbox for the next start).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

import pki
from gateway._inference import InferenceResult

from ._config import EscalationSettings
from ._escalator import Escalator

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from gateway._config import GatewaySettings
    from gateway._service import GatewayRuntime

__all__ = ["EscalationPlugin", "plugin"]


class EscalationPlugin:
    """Runs an :class:`Escalator` inside a gateway and hooks it to fresh detections."""

    def __init__(self, settings: EscalationSettings, runtime: GatewayRuntime) -> None:
        self._runtime = runtime
        gw = runtime.settings
        identity = runtime.identity
        self.escalator = Escalator(
            settings,
            gateway_id=runtime.gateway_id,
            gateway_region=gw.region,
            credentials=pki.grpc_channel_credentials(
                ca_bundle_pem=identity.ca_bundle.read_bytes(), identity=identity
            ),
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
    ) -> Mapping[int, str]:
        """The servicer's detection hook: escalate, return detection index → escalation id."""
        outcome = await self.escalator.escalate(
            device_id=device_id,
            region=region,
            frame_id=frame_id,
            detections=result.detections,
            frame=frame,
        )
        return {p.index: p.escalation_id for p in outcome.pending if p.index is not None}

    async def __aenter__(self) -> EscalationPlugin:
        await self.escalator.__aenter__()
        self._runtime.servicer.detection_hook = self.hook
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runtime.servicer.detection_hook == self.hook:
            self._runtime.servicer.detection_hook = None
        await self.escalator.__aexit__(exc_type, exc, tb)


def plugin(
    settings: GatewaySettings,
) -> Callable[[GatewayRuntime], AbstractAsyncContextManager[Any]] | None:
    """The plug-in factory for ``settings``' ``[escalation]`` table, or ``None`` when off."""
    section = settings.section("escalation", EscalationSettings)
    if section is None or not section.enabled:
        return None

    def factory(runtime: GatewayRuntime) -> AbstractAsyncContextManager[Any]:
        return EscalationPlugin(section, runtime)

    return factory
