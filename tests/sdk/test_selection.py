"""Gateway ranking, failover and return, with probe results fed in directly (a seam we own)."""

from __future__ import annotations

from device_sdk import GatewayInfo
from device_sdk._selection import GatewaySelector

SEOUL = GatewayInfo("kr-seoul", "kr-seoul", "127.0.0.1:1")
NYC = GatewayInfo("us-nyc", "us-nyc", "127.0.0.1:2")
TOKYO = GatewayInfo("jp-tokyo", "jp-tokyo", "127.0.0.1:3")


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_lowest_round_trip_wins() -> None:
    sel = GatewaySelector([SEOUL, NYC, TOKYO], clock=Clock())
    sel.record_probe("kr-seoul", 0.120)
    sel.record_probe("us-nyc", 0.015)
    sel.record_probe("jp-tokyo", 0.050)
    assert sel.choose() == NYC
    assert sel.ranking() == [NYC, TOKYO, SEOUL]


def test_ties_go_to_own_region_then_current() -> None:
    sel = GatewaySelector([NYC, SEOUL], region="kr-seoul", tie_margin_s=0.005, clock=Clock())
    sel.record_probe("us-nyc", 0.001)
    sel.record_probe("kr-seoul", 0.003)
    assert sel.choose() == SEOUL
    sel2 = GatewaySelector([NYC, SEOUL], tie_margin_s=0.005, clock=Clock())
    sel2.record_probe("us-nyc", 0.002)
    sel2.record_probe("kr-seoul", 0.001)
    sel2.current = NYC
    assert sel2.choose() == NYC, "no flapping between equally near gateways"


def test_failover_and_return_when_the_nearest_recovers() -> None:
    clock = Clock()
    sel = GatewaySelector([SEOUL, NYC], down_for_s=1.0, clock=clock)
    sel.record_probe("kr-seoul", 0.010)
    sel.record_probe("us-nyc", 0.080)
    assert sel.choose() == SEOUL
    sel.report_failure("kr-seoul", "UNAVAILABLE")
    assert sel.current is None
    assert sel.choose() == NYC
    # Still down: a failed probe extends the backoff.
    sel.record_probe("kr-seoul", None, "connection refused")
    clock.t += 1.5
    assert sel.choose() == NYC
    sel.record_probe("kr-seoul", 0.010)
    assert sel.choose() == SEOUL


def test_backoff_grows_and_is_bounded() -> None:
    clock = Clock()
    sel = GatewaySelector([SEOUL], down_for_s=1.0, max_down_for_s=4.0, clock=clock)
    sel.record_probe("kr-seoul", 0.01)
    for _ in range(6):
        sel.report_failure("kr-seoul", "x")
    assert sel.status("kr-seoul").down_until - clock.t == 4.0
    clock.t += 4.0
    assert sel.choose() == SEOUL


def test_nothing_up_means_no_gateway() -> None:
    sel = GatewaySelector([SEOUL, NYC], clock=Clock())
    assert sel.choose() is None
    sel.record_probe("us-nyc", None, "refused")
    assert sel.choose() is None
