#!/bin/sh
# Builds the managed broker's per-device ingest limit, a Mosquitto 2.0 plugin, beside its
# source (or at the path given): where the gateway looks for it unless mqtt.ingest_plugin
# says otherwise. Needs a C compiler and Mosquitto's plugin headers (Debian: gcc, libc6-dev,
# mosquitto-dev, libmosquitto-dev). Shipped in the package, so an installed gateway runs it:
#   sh "$(python -c 'from gateway._mqtt import PLUGIN_SOURCE; print(PLUGIN_SOURCE.parent)')/build.sh"
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/edgeward_ingest.so}
tmp="$out.tmp.$$"
# -U first: some toolchains predefine _FORTIFY_SOURCE (at 3), and a redefinition would be an
# error under -Werror.
"${CC:-cc}" -std=c11 -D_POSIX_C_SOURCE=200809L -O2 -fPIC -shared \
  -Wall -Wextra -Werror -fstack-protector-strong -U_FORTIFY_SOURCE -D_FORTIFY_SOURCE=2 \
  -Wl,-z,relro,-z,now -o "$tmp" "$here/edgeward_ingest.c"
mv -f "$tmp" "$out"
echo "built $out"
