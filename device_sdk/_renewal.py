"""When to renew the device certificate, and the loop that does it.

The plan follows short-lived-certificate practice (renew at about two thirds of the lifetime,
with jitter so that a fleet enrolled in one afternoon does not renew in one second). The loop
never sleeps until the renewal point in one go: it wakes at least every ``check_interval_s``
and reads the wall clock again, so a clock that jumps forward (NTP sync after boot, a device
that was suspended) is noticed within one interval, and a device switched on past its renewal
point renews at once while the certificate is still valid. Once the certificate has expired,
renewal is impossible (the core refuses an expired client certificate): the loop ends with the
final :class:`~device_sdk.errors.CertificateExpired`, which tells the owner to re-enrol.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from device_sdk.errors import CertificateExpired, DeviceRevoked, DeviceSdkError

__all__ = ["RenewalPlan", "plan_renewal", "run_renewal"]

_log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RenewalPlan:
    """Validity of the current certificate and the moment to renew it."""

    not_before: dt.datetime
    not_after: dt.datetime
    renew_at: dt.datetime


def plan_renewal(
    not_before: dt.datetime,
    not_after: dt.datetime,
    *,
    fraction: float = 2 / 3,
    jitter: float = 0.05,
    rng: random.Random | None = None,
) -> RenewalPlan:
    """Renew at ``fraction`` of the lifetime, moved by up to ``±jitter`` of the lifetime.

    The result always leaves at least a tenth of the lifetime before expiry, so jitter can
    never push renewal past the point where a retry would still fit.
    """
    if not 0 < fraction < 1:
        raise ValueError("fraction must be between 0 and 1")
    lifetime = not_after - not_before
    offset = (rng or random.Random()).uniform(-jitter, jitter)  # noqa: S311 (not security)
    share = min(max(fraction + offset, 0.05), 0.9)
    return RenewalPlan(not_before, not_after, not_before + lifetime * share)


RenewFn = Callable[[], Awaitable[tuple[dt.datetime, dt.datetime]]]


async def run_renewal(
    *,
    device_id: str,
    plan: RenewalPlan,
    renew: RenewFn,
    clock: Callable[[], dt.datetime],
    replan: Callable[[dt.datetime, dt.datetime], RenewalPlan],
    check_interval_s: float = 30.0,
    retry_min_s: float = 1.0,
    retry_max_s: float = 60.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    on_renewed: Callable[[RenewalPlan], Awaitable[None]] | None = None,
) -> None:
    """Renew the certificate whenever its plan says so, forever.

    ``renew`` performs one renewal and returns the new certificate's validity. Transient
    failures are retried with exponential backoff (never past expiry). Raises
    :class:`CertificateExpired` once the certificate has expired and
    :class:`DeviceRevoked` when the core refuses a revoked device; both are final.
    """
    retry_s = retry_min_s
    while True:
        now = clock()
        if now >= plan.not_after:
            raise CertificateExpired(device_id, plan.not_after.isoformat())
        if now < plan.renew_at:
            wait = (plan.renew_at - now).total_seconds()
            await sleep(min(wait, check_interval_s))
            continue
        try:
            not_before, not_after = await renew()
        except (DeviceRevoked, CertificateExpired):
            raise
        except DeviceSdkError as exc:
            _log.warning("certificate renewal failed; retrying", error=str(exc), retry_s=retry_s)
            left = (plan.not_after - clock()).total_seconds()
            await sleep(max(min(retry_s, left, check_interval_s), 0.0))
            retry_s = min(retry_s * 2, retry_max_s)
            continue
        retry_s = retry_min_s
        plan = replan(not_before, not_after)
        _log.info("certificate renewed", not_after=not_after.isoformat(), renew_at=plan.renew_at)
        if on_renewed is not None:
            await on_renewed(plan)
