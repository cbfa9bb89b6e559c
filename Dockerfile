# edgeward: core, gateways and simulated devices from one image.
#   docker build -t edgeward .
# Gateways and the core install the `gateway` extra (onnxruntime on the CPU); Mosquitto comes
# from Debian and is started and supervised by each gateway (the [mqtt] table, managed = true).
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends mosquitto \
    && rm -rf /var/lib/apt/lists/* \
    # Debian's package would start a system broker; the gateways run their own.
    && rm -f /etc/mosquitto/conf.d/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pki ./pki
COPY gateway ./gateway
COPY device_sdk ./device_sdk
COPY protos ./protos
COPY edgeward ./edgeward
RUN pip install --no-cache-dir ".[gateway]"
# The pretrained ONNX models with their manifest and licences (see models/README.md).
COPY models ./models

# Run as an unprivileged user; the volumes below are created owned by it.
RUN useradd --system --uid 10001 --home-dir /var/lib/edgeward --create-home edgeward \
    && mkdir -p /pki /gateways /devices/pet-camera-1 /devices/robot-vacuum-1 /device /bootstrap \
        /var/lib/edgeward \
    && chown -R edgeward:edgeward /pki /gateways /devices /device /bootstrap /var/lib/edgeward
USER edgeward
ENTRYPOINT ["edgeward"]
CMD ["--help"]
