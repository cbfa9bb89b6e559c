#!/usr/bin/env bash
# Installs what edgeward needs on a Debian/Ubuntu machine with Python >= 3.11:
# Mosquitto and its clients, OpenSSL, a C compiler and Mosquitto's plugin headers (the
# broker's ingest limit plugin is built here), Chromium and its driver (the console's browser
# tests), PostgreSQL (the tests start their own server), then a virtual environment in
# .venv with the project (gateway extra) and the development tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# The broker's per-device ingest limit is a Mosquitto plugin built from source here.
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
[[ -f /usr/include/mosquitto_plugin.h ]] || need_apt+=(mosquitto-dev)
[[ -f /usr/include/mosquitto.h ]] || need_apt+=(libmosquitto-dev)
# A real headless browser for tests/console/ (Debian's packages; Selenium drives them).
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || command -v pg_ctl >/dev/null 2>&1 \
  || need_apt+=(postgresql)
if [[ "${EDGEWARD_SETUP_COMPOSE:-1}" == "1" ]]; then
  command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
fi
if ((${#need_apt[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    echo "setup: installing Debian packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "setup: missing ${need_apt[*]}; install them with: sudo apt-get install ${need_apt[*]}" >&2
  fi
fi
# Debian starts a system-wide broker on 1883 and a PostgreSQL cluster on 5432 when
# the packages are installed; the project never uses them (every broker and
# database server it needs is started on a free port).

if command -v cc >/dev/null 2>&1 && [[ -f /usr/include/mosquitto_plugin.h && -f /usr/include/mosquitto.h ]]; then
  bash scripts/build_mqtt_plugin.sh
else
  echo "setup: no C compiler or Mosquitto plugin headers: the managed broker will run without" \
    "its per-device ingest limit (install gcc libc6-dev mosquitto-dev libmosquitto-dev, then run" \
    "scripts/build_mqtt_plugin.sh)" >&2
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The models are their own distribution (models/pyproject.toml), installed editable first so
# that the gateway extra finds it here rather than on an index.
.venv/bin/python -m pip install -q -e ./models -e ".[gateway,dev]"
