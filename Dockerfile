# The xsettle command in a container, for docker-compose.yml or any Kafka cluster:
#   docker build -t xsettle:0.1.0 .
#   docker run --rm -e XSETTLE_BOOTSTRAP=host:9092 xsettle:0.1.0 xsettle demo --bootstrap host:9092
# Health of a gateway without curl (not in this image): python's urllib on /readyz, as the
# gateway-<code>-a and -b services of docker-compose.yml do.
# No ENTRYPOINT: the command is always spelled out in full, starting with `xsettle`.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# An unprivileged user whose home holds the durable state (SQLite files).
RUN groupadd --gid 10001 xsettle \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /var/lib/xsettle \
       --shell /usr/sbin/nologin xsettle

# Only what the wheel is built from (see pyproject.toml, [tool.hatch.build.targets.wheel]).
COPY pyproject.toml README.md /tmp/xsettle/
COPY bus /tmp/xsettle/bus
COPY adapters /tmp/xsettle/adapters
COPY schemas /tmp/xsettle/schemas
COPY simulators /tmp/xsettle/simulators
RUN pip install --no-cache-dir /tmp/xsettle \
    && rm -rf /tmp/xsettle

USER 10001:10001
WORKDIR /var/lib/xsettle
ENV XSETTLE_STATE_DIR=/var/lib/xsettle/var
# The state folder exists in the image, owned by xsettle: a named volume mounted on it (the
# gateways of docker-compose.yml) starts with that owner, so the gateway can write into it.
# Not a VOLUME: the demo keeps nothing, and a volume is the compose file's choice.
RUN mkdir -p "$XSETTLE_STATE_DIR"

CMD ["xsettle", "--help"]
