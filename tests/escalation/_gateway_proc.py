"""A gateway's escalation side in a process of its own, for the kill -9 test.

``python -m tests.escalation._gateway_proc --mode enqueue …`` reads commands on stdin
(``enqueue K``: escalate K frames, answer ``queued <ids>`` once they are stored;
``wait-answers M``: answer ``answered`` once M answers were handed to the event hub) and runs
until killed. ``--mode drain`` starts, delivers what the outbox holds, then prints the
escalation ids its event hub holds for the device (what a device subscribing now receives)
as ``hub <json list>`` and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import pki
from edgeward._logging import configure_logging
from gateway import EscalationAnswer, EscalationSettings, EventHub, RegionPolicy
from gateway._escalation import Escalator
from gateway._inference._image import decode_image

ROOT = Path(__file__).resolve().parents[2]


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["enqueue", "drain"], required=True)
    parser.add_argument("--outbox", type=Path, required=True)
    parser.add_argument("--core", required=True)
    parser.add_argument("--identity", type=Path, required=True)
    args = parser.parse_args()
    configure_logging(level="warning", json=True)

    identity = pki.IdentityFiles(args.identity)
    hub = EventHub()
    settings = EscalationSettings(
        outbox_path=args.outbox,
        retry_backoff_base_s=0.05,
        retry_backoff_max_s=0.3,
        regions={
            "home": RegionPolicy(
                escalate_empty_frames=True,
                send="frame",
                require_face_blur=False,
                device_budget_per_min=1000,
                region_budget_per_min=1000,
                empty_frame_budget_per_min=1000,
            )
        },
    )
    escalator = Escalator(
        settings,
        gateway_id="gw-esc",
        gateway_region="home",
        credentials=pki.grpc_channel_credentials(
            ca_bundle_pem=identity.ca_bundle.read_bytes(), identity=identity
        ),
        sink=hub.publish,
        models_dir=ROOT / "models",
        default_core_address=args.core,
    )
    frame = decode_image(
        (ROOT / "tests/data/photos/motorcycle.jpg").read_bytes(), max_pixels=10_000_000
    )
    loop = asyncio.get_running_loop()
    async with escalator:
        print("ready", flush=True)
        if args.mode == "drain":
            while await escalator.pending_count():  # noqa: ASYNC110 - polls another thread's db
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # a duplicate, were there one, would land now
            ids = [
                e.payload.escalation_id
                for e in hub.stored("dev-1")
                if isinstance(e.payload, EscalationAnswer)
            ]
            print("hub " + json.dumps(ids), flush=True)
            return 0
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command, _, arg = line.strip().partition(" ")
            if command == "enqueue":
                ids = []
                for i in range(int(arg)):
                    outcome = await escalator.escalate(
                        device_id="dev-1", frame_id=f"f{i}", detections=(), frame=frame
                    )
                    ids.extend(p.escalation_id for p in outcome.pending)
                print("queued " + " ".join(ids), flush=True)
            elif command == "wait-answers":
                while len(hub.stored("dev-1")) < int(arg):  # noqa: ASYNC110 - test polling
                    await asyncio.sleep(0.02)
                print("answered", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
