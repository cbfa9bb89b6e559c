"""A core replica in a process of its own, for the tests that kill one with -9.

``python -m tests.escalation._core_proc --pki-dir P --registry R --answers A --identity D``
runs a real :class:`gateway._core.CoreServer` with the real ``EscalateService`` (models,
answer store at ``A``: replicas share it) on ``127.0.0.1:0`` and prints ``ready <address>``.
For every ``Core.Escalate`` it prints ``received <escalation id>``; then, by ``--hold``:

- ``none``: answers, printing ``answered <id> runs=<model runs so far>``;
- ``before``: never answers (the replica is stuck before its models; the test kills it);
- ``after``: runs the models and stores the answer, prints ``stored <id>``, and never
  replies (the replica dies after its answer was stored, before the gateway got it).

The hold is a wrapper around the real handler (a seam we own), not a fake model.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from edgeward._logging import configure_logging
from gateway import CoreEscalationSettings, CoreServer, EscalateService, load_core_settings
from protos.edgeward.v1 import core_pb2

ROOT = Path(__file__).resolve().parents[2]


class Holding:
    """The real ``Core.Escalate`` handler, announcing each request and holding by mode."""

    def __init__(self, inner: EscalateService, hold: str) -> None:
        self.inner = inner
        self.hold = hold

    async def __aenter__(self) -> Holding:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.inner.__aexit__(None, None, None)

    async def __call__(
        self, request: core_pb2.EscalationRequest, context: Any, *, gateway: Any
    ) -> core_pb2.EscalationResult:
        print(f"received {request.escalation_id}", flush=True)
        if self.hold == "before":
            await asyncio.Event().wait()
        result = await self.inner(request, context, gateway=gateway)
        if self.hold == "after":
            print(f"stored {request.escalation_id}", flush=True)
            await asyncio.Event().wait()
        print(f"answered {request.escalation_id} runs={self.inner.models.runs}", flush=True)
        return result


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pki-dir", type=Path, required=True)
    parser.add_argument("--registry", type=Path, required=True)
    parser.add_argument("--answers", type=Path, required=True)
    parser.add_argument("--identity", type=Path, required=True)
    parser.add_argument("--core-id", default="core-replica")
    parser.add_argument("--hold", choices=["none", "before", "after"], default="none")
    parser.add_argument("--feed-heartbeat-s", type=float, default=5.0)
    args = parser.parse_args()
    configure_logging(level="warning", json=True)
    settings = load_core_settings(
        None,
        pki_dir=args.pki_dir,
        core_id=args.core_id,
        listen="127.0.0.1:0",
        enrol_listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",  # several cores on one machine
        identity_dir=args.identity,
        registry=args.registry,
        shutdown_grace_s=0.2,
        feed_heartbeat_s=args.feed_heartbeat_s,
    )
    service = EscalateService(
        CoreEscalationSettings(
            models_dir=ROOT / "models", providers="cpu", answer_store=args.answers
        )
    )
    async with CoreServer(settings, escalate=Holding(service, args.hold)) as core:
        print(f"ready {core.address}", flush=True)
        await asyncio.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
