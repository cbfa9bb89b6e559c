"""Renewal timing: two thirds with jitter, clock jumps, a device off past the renewal point,
expiry one second either side of the boundary. Time is injected; nothing sleeps for real."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from device_sdk import (
    CertificateExpired,
    DeviceRevoked,
    EnrollmentUnavailable,
    RenewalPlan,
    plan_renewal,
)
from device_sdk._renewal import run_renewal

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


def test_two_thirds_with_bounded_jitter() -> None:
    rng = random.Random(7)
    points = [plan_renewal(T0, T0 + 9 * DAY, jitter=0.05, rng=rng).renew_at for _ in range(200)]
    low, high = T0 + 9 * DAY * (2 / 3 - 0.05), T0 + 9 * DAY * (2 / 3 + 0.05)
    assert all(low <= p <= high for p in points)
    assert len(set(points)) > 100, "jitter spreads a fleet"
    assert plan_renewal(T0, T0 + 9 * DAY, jitter=0).renew_at == T0 + 6 * DAY


class FakeTime:
    """Wall clock + sleep for the renewal loop; sleeping advances the clock."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now
        self.slept: list[float] = []

    def clock(self) -> dt.datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += dt.timedelta(seconds=seconds)


class Renewer:
    def __init__(self, t: FakeTime, lifetime: dt.timedelta, fail: list[Exception]) -> None:
        self.t = t
        self.lifetime = lifetime
        self.fail = fail
        self.calls: list[dt.datetime] = []

    async def __call__(self) -> tuple[dt.datetime, dt.datetime]:
        self.calls.append(self.t.now)
        if self.fail:
            raise self.fail.pop(0)
        return self.t.now, self.t.now + self.lifetime


def _replan(nb: dt.datetime, na: dt.datetime) -> RenewalPlan:
    return plan_renewal(nb, na, jitter=0)


async def _run(t: FakeTime, plan: RenewalPlan, renewer: Renewer, renewals: int) -> None:
    done: list[RenewalPlan] = []

    async def on_renewed(p: RenewalPlan) -> None:
        done.append(p)
        if len(done) == renewals:
            raise _Stop

    with pytest.raises(_Stop):
        await run_renewal(
            device_id="dev-1",
            plan=plan,
            renew=renewer,
            clock=t.clock,
            replan=_replan,
            check_interval_s=60,
            sleep=t.sleep,
            on_renewed=on_renewed,
        )


class _Stop(Exception):
    pass


async def test_renews_at_the_planned_point_and_keeps_going() -> None:
    t = FakeTime(T0)
    renewer = Renewer(t, 3 * DAY, [])
    await _run(t, _replan(T0, T0 + 3 * DAY), renewer, renewals=2)
    assert renewer.calls[0] == T0 + 2 * DAY
    assert renewer.calls[1] == T0 + 4 * DAY
    assert max(t.slept) <= 60, "never sleeps past one check interval"


async def test_clock_jump_forward_is_noticed_within_one_interval() -> None:
    t = FakeTime(T0)
    renewer = Renewer(t, 3 * DAY, [])
    jumped = False
    real_sleep = t.sleep

    async def sleep(seconds: float) -> None:
        nonlocal jumped
        await real_sleep(seconds)
        if not jumped:
            jumped = True
            t.now += dt.timedelta(days=2, hours=12)  # NTP sync after a long suspend

    t.sleep = sleep  # type: ignore[method-assign]
    await _run(t, _replan(T0, T0 + 3 * DAY), renewer, renewals=1)
    assert renewer.calls[0] < T0 + 2 * DAY + dt.timedelta(hours=13)
    assert len(t.slept) == 1


async def test_device_off_past_the_renewal_point_renews_at_once() -> None:
    t = FakeTime(T0 + dt.timedelta(days=2, hours=20))  # past 2/3, still valid
    renewer = Renewer(t, 3 * DAY, [])
    await _run(t, _replan(T0, T0 + 3 * DAY), renewer, renewals=1)
    assert renewer.calls == [T0 + dt.timedelta(days=2, hours=20)]
    assert t.slept == []


@pytest.mark.parametrize(("offset_s", "expired"), [(-1, False), (0, True), (1, True)])
async def test_expiry_boundary(offset_s: int, expired: bool) -> None:
    not_after = T0 + 3 * DAY
    t = FakeTime(not_after + dt.timedelta(seconds=offset_s))
    renewer = Renewer(t, 3 * DAY, [])
    if expired:
        with pytest.raises(CertificateExpired) as info:
            await run_renewal(
                device_id="dev-1",
                plan=_replan(T0, not_after),
                renew=renewer,
                clock=t.clock,
                replan=_replan,
                sleep=t.sleep,
            )
        assert "enrol again" in str(info.value)
        assert info.value.final
        assert renewer.calls == []
    else:
        await _run(t, _replan(T0, not_after), renewer, renewals=1)
        assert renewer.calls == [not_after - dt.timedelta(seconds=1)]


async def test_transient_failures_retry_with_backoff_until_expiry() -> None:
    t = FakeTime(T0 + 2 * DAY)
    fails: list[Exception] = [EnrollmentUnavailable("core down") for _ in range(3)]
    renewer = Renewer(t, 3 * DAY, fails)
    await _run(t, _replan(T0, T0 + 3 * DAY), renewer, renewals=1)
    assert len(renewer.calls) == 4
    assert t.slept == [1.0, 2.0, 4.0]


async def test_core_out_of_reach_until_expiry_ends_in_certificate_expired() -> None:
    t = FakeTime(T0 + 3 * DAY - dt.timedelta(seconds=10))
    renewer = Renewer(t, 3 * DAY, [EnrollmentUnavailable("down") for _ in range(100)])
    with pytest.raises(CertificateExpired):
        await run_renewal(
            device_id="dev-1",
            plan=_replan(T0, T0 + 3 * DAY),
            renew=renewer,
            clock=t.clock,
            replan=_replan,
            sleep=t.sleep,
        )


async def test_revoked_is_final() -> None:
    t = FakeTime(T0 + 2 * DAY)
    renewer = Renewer(t, 3 * DAY, [DeviceRevoked("dev-1", "revoked by operator")])
    with pytest.raises(DeviceRevoked):
        await run_renewal(
            device_id="dev-1",
            plan=_replan(T0, T0 + 3 * DAY),
            renew=renewer,
            clock=t.clock,
            replan=_replan,
            sleep=t.sleep,
        )
    assert len(renewer.calls) == 1
