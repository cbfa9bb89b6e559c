# edgeward: core, gateways and simulated devices from one image.
#   docker build -t edgeward .
# Built in two stages: the first builds the release wheels (scripts/build_dist.sh: edgeward
# and edgeward-models, each from its sdist), the second installs those wheels and nothing of
# the source tree. Gateways and the core use the `gateway` extra (onnxruntime on the CPU, the
# models from the edgeward-models wheel); Mosquitto comes from Debian and is started and
# supervised by each gateway (the [mqtt] table, managed = true).

FROM python:3.11-slim AS wheels
RUN pip install --no-cache-dir "build>=1.2"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scripts/build_dist.sh ./scripts/
COPY pki ./pki
COPY gateway ./gateway
COPY device_sdk ./device_sdk
COPY protos ./protos
COPY edgeward ./edgeward
# The pretrained ONNX models with their manifest and licences (see models/README.md), packaged
# as the edgeward-models distribution by models/pyproject.toml.
COPY models ./models
RUN PYTHON=python bash scripts/build_dist.sh /wheels

# The managed broker's per-device ingest limit: a Mosquitto plugin built from the source in
# the gateway package against Debian's Mosquitto headers (the same Mosquitto as below).
FROM python:3.11-slim AS plugin
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev mosquitto-dev libmosquitto-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY gateway/_mqtt/ingest/edgeward_ingest.c gateway/_mqtt/ingest/build.sh ./gateway/_mqtt/ingest/
RUN sh gateway/_mqtt/ingest/build.sh

# The wheels installed into a virtual environment, copied whole into the final image (no wheel
# files or build tools left in its layers).
FROM python:3.11-slim AS install
COPY --from=wheels /wheels /wheels
# The wheels by file name, never by project name from an index: an index could offer another
# "edgeward" or "edgeward-models" (dependency confusion); third-party dependencies come from PyPI.
RUN python -m venv /opt/edgeward \
    && /opt/edgeward/bin/pip install --no-cache-dir \
        /wheels/edgeward_models-*.whl "$(echo /wheels/edgeward-*.whl)[gateway]"

FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends mosquitto \
    && rm -rf /var/lib/apt/lists/* \
    # Debian's package would start a system broker; the gateways run their own.
    && rm -f /etc/mosquitto/conf.d/*

COPY --from=install /opt/edgeward /opt/edgeward
# Where the gateway looks for it by default (mqtt.ingest_plugin unset).
COPY --from=plugin /src/gateway/_mqtt/ingest/edgeward_ingest.so \
    /opt/edgeward/lib/python3.11/site-packages/gateway/_mqtt/ingest/
ENV PATH=/opt/edgeward/bin:$PATH
RUN edgeward --version

# Run as an unprivileged user; the volumes below are created owned by it.
RUN useradd --system --uid 10001 --home-dir /var/lib/edgeward --create-home edgeward \
    && mkdir -p /pki /gateways /devices/pet-camera-1 /devices/robot-vacuum-1 /device /bootstrap \
        /var/lib/edgeward \
    && chown -R edgeward:edgeward /pki /gateways /devices /device /bootstrap /var/lib/edgeward
USER edgeward
WORKDIR /var/lib/edgeward
ENTRYPOINT ["edgeward"]
CMD ["--help"]
