#!/usr/bin/env bash
# Builds the managed broker's per-device ingest limit (a Mosquitto 2.0 plugin) beside its
# source: gateway/_mqtt/ingest/edgeward_ingest.so. Needs a C compiler and Mosquitto's
# plugin headers (Debian: gcc, libc6-dev, mosquitto-dev, libmosquitto-dev).
# Usage: scripts/build_mqtt_plugin.sh [output.so]
set -euo pipefail
cd "$(dirname "$0")/.."
src=gateway/_mqtt/ingest/edgeward_ingest.c
out=${1:-gateway/_mqtt/ingest/edgeward_ingest.so}
tmp="$out.tmp.$$"
"${CC:-cc}" -std=c11 -D_POSIX_C_SOURCE=200809L -O2 -fPIC -shared \
  -Wall -Wextra -Werror -fstack-protector-strong -U_FORTIFY_SOURCE -D_FORTIFY_SOURCE=2 -Wl,-z,relro,-z,now \
  -o "$tmp" "$src"
mv -f "$tmp" "$out"
echo "built $out"
