"""Print each benchmark's targets beside its figures: met or not, one line each."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
}


def report_targets(
    figures: Mapping[str, float], targets: Sequence[tuple[str, str, float]]
) -> dict[str, bool]:
    """Print ``key: value (target op bound): met|NOT met`` for each target; return the verdicts.

    A figure missing from ``figures`` is reported as not measured (and not met)."""
    verdicts: dict[str, bool] = {}
    print("targets:")
    for key, op, bound in targets:
        value = figures.get(key)
        if value is None:
            print(f"  {key}: not measured (target {op} {bound:g}): NOT met")
            verdicts[key] = False
            continue
        met = _OPS[op](float(value), bound)
        verdicts[key] = met
        print(f"  {key}: {value:g} (target {op} {bound:g}): {'met' if met else 'NOT met'}")
    return verdicts
