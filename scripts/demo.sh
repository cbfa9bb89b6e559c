#!/usr/bin/env bash
# The demo: installs what it needs (scripts/setup.sh), then runs `edgeward demo`:
# a PKI, a core and two regional gateways (each with its own Mosquitto) on loopback
# ports, a simulated pet camera and robot vacuum, a gateway failover and a revocation,
# shown live. Arguments go to `edgeward demo` (--duration S, --dir D, --no-live).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/edgeward demo "$@"
