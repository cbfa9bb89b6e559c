"""Choosing the nearest gateway, failing over, and coming back.

The selector is pure bookkeeping (no I/O): the client probes each gateway with an mTLS
health-check round trip and reports the result here; the selector keeps a smoothed round-trip
time per gateway and answers "which gateway now?".

Ranking: the lowest smoothed round trip wins. Gateways within ``tie_margin_s`` of the best are
treated as equally near (round trips on one network jitter by a millisecond or two, and
flapping between two equal gateways would cost a TLS handshake each time); among those the
device's own region wins, then the gateway in use, then the directory order. A gateway that
failed is out of the ranking until ``down_for`` has passed or a probe succeeds again, so the
client fails over at once and comes back when the nearer gateway recovers.

While no gateway answers, the client probes after :func:`offline_pause`: exponential backoff
with full jitter, so that a fleet cut off at the same moment (a gateway restart) comes back
spread over the pause rather than all in the same second, a storm of TLS handshakes that
would time out and be retried.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from device_sdk._types import GatewayInfo

__all__ = ["GatewaySelector", "GatewayStatus", "offline_pause"]


def offline_pause(rounds: int, *, base_s: float, max_s: float, rng: random.Random) -> float:
    """The pause before the next probe after ``rounds`` rounds in which no gateway answered.

    Full jitter ("Exponential Backoff and Jitter", AWS Architecture Blog, 2015): uniform over
    ``[0, min(max_s, base_s * 2**rounds)]``. The ceiling grows while the outage lasts, so the
    fleet's probes thin out, and each device's pause is independent of the others', so their
    reconnects spread evenly instead of arriving in waves.
    """
    ceiling = min(max_s, base_s * 2 ** min(rounds, 32))
    return rng.uniform(0.0, max(ceiling, 0.0))


@dataclass(slots=True)
class GatewayStatus:
    """What the selector knows about one gateway."""

    info: GatewayInfo
    order: int
    rtt_s: float | None = None
    down_until: float = 0.0
    failures: int = 0
    last_error: str = ""

    def up(self, now: float) -> bool:
        return self.rtt_s is not None and now >= self.down_until


class GatewaySelector:
    """Ranks gateways by measured round trip (see the module docstring)."""

    def __init__(
        self,
        gateways: Sequence[GatewayInfo],
        *,
        region: str = "",
        tie_margin_s: float = 0.010,
        smoothing: float = 0.3,
        down_for_s: float = 2.0,
        max_down_for_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._status = {g.gateway_id: GatewayStatus(g, i) for i, g in enumerate(gateways)}
        self.region = region
        self.tie_margin_s = tie_margin_s
        self.smoothing = smoothing
        self.down_for_s = down_for_s
        self.max_down_for_s = max_down_for_s
        self._clock = clock
        self.current: GatewayInfo | None = None

    @property
    def gateways(self) -> list[GatewayInfo]:
        return [s.info for s in sorted(self._status.values(), key=lambda s: s.order)]

    def status(self, gateway_id: str) -> GatewayStatus:
        return self._status[gateway_id]

    def record_probe(self, gateway_id: str, rtt_s: float | None, error: str = "") -> None:
        """A probe's outcome: a round trip in seconds, or ``None`` with the error."""
        st = self._status.get(gateway_id)
        if st is None:
            return
        if rtt_s is None:
            self._mark_down(st, error)
            return
        st.rtt_s = rtt_s if st.rtt_s is None else st.rtt_s + self.smoothing * (rtt_s - st.rtt_s)
        st.failures = 0
        st.down_until = 0.0
        st.last_error = ""

    def report_failure(self, gateway_id: str, error: str) -> None:
        """A call to the gateway failed for a transport reason: fail over now."""
        st = self._status.get(gateway_id)
        if st is not None:
            self._mark_down(st, error)

    def _mark_down(self, st: GatewayStatus, error: str) -> None:
        st.failures += 1
        backoff = min(self.down_for_s * 2 ** (st.failures - 1), self.max_down_for_s)
        st.down_until = self._clock() + backoff
        st.last_error = error
        if self.current is not None and self.current.gateway_id == st.info.gateway_id:
            self.current = None

    def ranking(self) -> list[GatewayInfo]:
        """Gateways that are up, best first."""
        now = self._clock()
        up = [s for s in self._status.values() if s.up(now)]
        if not up:
            return []
        best = min(s.rtt_s or 0.0 for s in up)
        current_id = self.current.gateway_id if self.current else None

        def key(s: GatewayStatus) -> tuple[int, int, int, float, int]:
            rtt = s.rtt_s or 0.0
            near = 0 if rtt <= best + self.tie_margin_s else 1
            own_region = 0 if self.region and s.info.region == self.region else 1
            in_use = 0 if s.info.gateway_id == current_id else 1
            return (near, own_region if near == 0 else 0, in_use, rtt, s.order)

        return [s.info for s in sorted(up, key=key)]

    def choose(self) -> GatewayInfo | None:
        """The gateway to use now (remembered as :attr:`current`); ``None`` when none is up."""
        ranked = self.ranking()
        self.current = ranked[0] if ranked else None
        return self.current
