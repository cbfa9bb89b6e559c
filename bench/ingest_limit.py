"""What the broker's per-device ingest limit plugin costs Mosquitto, against Mosquitto without it.

Two brokers on plain loopback listeners (TLS costs both sides the same, so it is left out):
one as it comes, one with the ``edgeward_ingest`` plugin (built by
``scripts/build_mqtt_plugin.sh``) at a limit far above the load, so that it counts every
message and refuses none. ``mosquitto_pub --repeat`` (the C client) sends the same messages to
each, from ``--devices`` client ids at once, to a ``mosquitto_sub`` that counts them; the runs
alternate. Then the plugin's refusal path: one client sending far over a tiny bucket, every
message answered PUBACK 0x87 by the broker. Prints the figures, then one JSON line::

    plain_msgs_per_s, plugin_msgs_per_s, ratio, refused_per_s, devices, messages

    PYTHONPATH=. .venv/bin/python bench/ingest_limit.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway import free_port  # noqa: E402
from gateway._mqtt import BUILT_PLUGIN, IngestLimit  # noqa: E402

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
PUB = shutil.which("mosquitto_pub") or "mosquitto_pub"
SUB = shutil.which("mosquitto_sub") or "mosquitto_sub"


@contextmanager
def broker(tmp: Path, name: str, limit: IngestLimit | None) -> Iterator[int]:
    port = free_port()
    lines = [
        # As whoever runs this: started as root, Mosquitto would become user "mosquitto".
        f"user {pwd.getpwuid(os.geteuid()).pw_name}",
        "per_listener_settings true",
        "log_dest stderr",
        "log_type error",
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        *(limit.conf_lines(BUILT_PLUGIN) if limit is not None else []),
    ]
    conf = tmp / f"{name}.conf"
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(
            [PUB, "-p", str(port), "-t", "probe", "-m", "x"], capture_output=True, check=False
        ).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} broker did not start")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def through(port: int, devices: int, per_device: int, qos: int) -> float:
    """Messages a second from ``devices`` publishers to one subscriber that gets them all."""
    total = devices * per_device
    sub = subprocess.Popen(
        [SUB, "-p", str(port), "-t", "devices/+/telemetry", "-C", str(total), "-q", str(qos)],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    started = time.perf_counter()
    pubs = [
        subprocess.Popen(
            [
                PUB,
                *("-p", str(port), "-i", f"dev-{i}", "-V", "mqttv5"),
                *("-t", f"devices/dev-{i}/telemetry", "-m", '{"battery": 0.5}'),
                *("-q", str(qos), "--repeat", str(per_device)),
            ],
            stdout=subprocess.DEVNULL,
        )
        for i in range(devices)
    ]
    for p in pubs:
        p.wait(120)
    sub.wait(120)
    return total / (time.perf_counter() - started)


def refused_rate(port: int, n: int) -> float:
    """Refusals a second of one client far over its bucket (QoS 1: each answered 0x87)."""
    started = time.perf_counter()
    done = subprocess.run(
        [
            PUB,
            *("-p", str(port), "-i", "dev-flood", "-V", "mqttv5"),
            *("-t", "devices/dev-flood/frames", "-m", "x", "-q", "1", "--repeat", str(n)),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    took = time.perf_counter() - started
    refused = done.stderr.count("Not authorized")
    if refused < n - 1:
        raise RuntimeError(f"expected {n - 1} refusals, saw {refused}")
    return refused / took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages and runs")
    parser.add_argument("--devices", type=int, default=20)
    args = parser.parse_args()
    if not BUILT_PLUGIN.is_file():
        sys.exit(f"{BUILT_PLUGIN} missing: run scripts/build_mqtt_plugin.sh")
    per_device = 2_000 if args.quick else 10_000
    runs = 3 if args.quick else 5
    far_above = IngestLimit(1e6, 1_000_000, 1e6, 1_000_000)
    tiny = IngestLimit(0.001, 1, 0.001, 1)
    plain: list[float] = []
    limited: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        with (
            broker(Path(tmp), "plain", None) as p0,
            broker(Path(tmp), "plugin", far_above) as p1,
        ):
            for _ in range(runs):
                plain.append(through(p0, args.devices, per_device, 0))
                limited.append(through(p1, args.devices, per_device, 0))
        with broker(Path(tmp), "tiny", tiny) as p2:
            refused = refused_rate(p2, per_device * 5)
    a, b = statistics.median(plain), statistics.median(limited)
    print(
        f"{args.devices} devices x {per_device} QoS 0 messages, {runs} alternated runs: "
        f"plain {a:,.0f} msg/s ({', '.join(f'{x:,.0f}' for x in plain)}), with the plugin "
        f"{b:,.0f} msg/s ({', '.join(f'{x:,.0f}' for x in limited)}); one device over its "
        f"bucket: {refused:,.0f} refusals/s (PUBACK 0x87)",
        flush=True,
    )
    print(
        json.dumps(
            {
                "plain_msgs_per_s": round(a),
                "plugin_msgs_per_s": round(b),
                "ratio": round(b / a, 3),
                "refused_per_s": round(refused),
                "devices": args.devices,
                "messages": args.devices * per_device,
            }
        )
    )


if __name__ == "__main__":
    main()
