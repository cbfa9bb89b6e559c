"""The broker's per-device ingest limit: the ``edgeward_ingest`` Mosquitto plugin.

The bridge refuses a frame over its device's budget the moment it reads it, but reading it
is the cost: the broker hands every device's frames to the bridge first-in-first-out, so a
device that floods (and reconnects whenever it is disconnected) fills that one queue, and the
bridge's TLS and parsing, ahead of every other device's frames. Mosquitto 2.0 has no
per-client ingest limit of its own, so the managed broker loads a small plugin
(``gateway/_mqtt/ingest/edgeward_ingest.c``, built by ``scripts/build_mqtt_plugin.sh``) on
the devices' listener. It keeps a token bucket per client id (the certificate CN: a
reconnect does not refill it) for frames and one for other messages, ``ingest_limit_factor``
times the front door's budget (``[limits] frames_per_s`` and ``burst``), and refuses what is
over it in the broker: MQTT 5 QoS 1 senders get PUBACK 0x87 (the refusal code Mosquitto 2.0
lets a plugin give), QoS 0 messages are dropped, and nothing of the flood reaches the
bridge. The front door still applies the real budget to what gets through (and disconnects
a device refused ``disconnect_after_refusals`` frames within a second); this limit sits above
it, so a device within its budget, or a little over it, never meets it.

The plugin reports refusals in bounded lines on the broker's log (at a device's first
refusal, then at most once per ``report_s`` and when it disconnects)::

    edgeward-ingest: refused <device id> frames=<n> other=<n>

:func:`parse_report` reads them; the bridge counts them in Prometheus (``denials_total``,
``mqtt_broker_refused``) and the refusal audit log, and tells the device on its events.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import pki
from gateway._config import LimitsSettings

__all__ = [
    "BUILT_PLUGIN",
    "PLUGIN_SOURCE",
    "BrokerRefusal",
    "IngestLimit",
    "parse_report",
]

#: The plugin's source and where ``scripts/build_mqtt_plugin.sh`` builds it.
PLUGIN_SOURCE = Path(__file__).resolve().parent / "ingest" / "edgeward_ingest.c"
BUILT_PLUGIN = PLUGIN_SOURCE.with_suffix(".so")

_REPORT = re.compile(
    r"edgeward-ingest: refused (\S{1,128}) frames=(\d{1,19}) other=(\d{1,19})( disconnected)?"
)


@dataclass(frozen=True, slots=True)
class IngestLimit:
    """Per-device token buckets the broker enforces (frames; other messages)."""

    frames_per_s: float
    frames_burst: int
    messages_per_s: float
    messages_burst: int
    #: At most one refusal report per device per this many seconds.
    report_s: float = 1.0
    #: Refusals within one second that make the broker end the connection (0: never).
    disconnect_after: int = 0
    #: Devices tracked at most: idle ones are forgotten to make room; while every tracked one
    #: is busy, a new device is not limited by the broker (the front door still limits it).
    max_clients: int = 1_048_576

    @classmethod
    def above(
        cls, limits: LimitsSettings, factor: float, *, disconnect_after: int = 0
    ) -> IngestLimit:
        """``factor`` times the front door's budget (frames and reports share its numbers)."""
        if not factor >= 1:
            raise ValueError("the broker's ingest limit must be at least the device's budget")
        rate = limits.frames_per_s * factor
        burst = max(1, math.ceil(limits.burst * factor))
        return cls(rate, burst, rate, burst, disconnect_after=disconnect_after)

    def conf_lines(self, plugin: Path) -> list[str]:
        """The ``plugin`` lines of the devices' listener."""
        return [
            f"plugin {plugin}",
            f"plugin_opt_frames_per_s {self.frames_per_s:g}",
            f"plugin_opt_frames_burst {self.frames_burst}",
            f"plugin_opt_messages_per_s {self.messages_per_s:g}",
            f"plugin_opt_messages_burst {self.messages_burst}",
            f"plugin_opt_report_s {self.report_s:g}",
            f"plugin_opt_max_clients {self.max_clients}",
            f"plugin_opt_disconnect_after {self.disconnect_after}",
        ]


@dataclass(frozen=True, slots=True)
class BrokerRefusal:
    """Messages of one device the broker refused since its last report, by kind."""

    device_id: str
    frames: int
    other: int
    #: The broker ended the device's connection (refused ``disconnect_after`` in a second).
    disconnected: bool = False


def parse_report(line: str) -> BrokerRefusal | None:
    """The refusal report in one broker log line, or ``None`` (any other line, or a report
    naming something that is not a device id)."""
    match = _REPORT.fullmatch(line.strip())
    if match is None:
        return None
    device_id = match.group(1)
    if pki.ID_PATTERN.fullmatch(device_id) is None:
        return None
    return BrokerRefusal(
        device_id, int(match.group(2)), int(match.group(3)), match.group(4) is not None
    )
