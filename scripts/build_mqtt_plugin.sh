#!/usr/bin/env bash
# Builds the managed broker's per-device ingest limit (a Mosquitto 2.0 plugin) beside its
# source, gateway/_mqtt/ingest/edgeward_ingest.so, with the build script the package ships
# (gateway/_mqtt/ingest/build.sh, which an installed gateway runs the same way).
# Usage: scripts/build_mqtt_plugin.sh [output.so]
set -euo pipefail
cd "$(dirname "$0")/.."
exec sh gateway/_mqtt/ingest/build.sh "$@"
