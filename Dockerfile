# MONITAUR exporter image.
#   docker build -t monitaur-exporter:0.1.0 .
#   docker run --rm -p 127.0.0.1:9717:9717 -e MONITAUR_PUSH__ENABLED=false monitaur-exporter:0.1.0 run
# Configuration: MONITAUR_* environment variables and/or `run --config FILE`
# (see docker-compose.yml for a complete example).

# --- build: a wheel of the project, without its dependencies ---------------------------
FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# .dockerignore lets in only what the package needs (pyproject.toml, README.md, exporter/).
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- runtime ---------------------------------------------------------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels

# A fixed, non-root user. The directories below belong to it, so that empty named
# volumes mounted there (docker-compose.yml) start out writable by it.
RUN groupadd --system --gid 10001 monitaur \
 && useradd --system --uid 10001 --gid monitaur --home-dir /var/lib/monitaur --shell /usr/sbin/nologin monitaur \
 && mkdir -p /var/lib/monitaur /var/log/monitaur \
 && chown monitaur:monitaur /var/lib/monitaur /var/log/monitaur
USER 10001:10001
WORKDIR /var/lib/monitaur

# Inside a container the exporter must listen on all interfaces to be scraped; it then
# requires push tokens (MONITAUR_PUSH__TOKENS_FILE) or MONITAUR_PUSH__ENABLED=false.
ENV MONITAUR_LISTEN__HOST=0.0.0.0 \
    MONITAUR_STATE__DIR=/var/lib/monitaur \
    MONITAUR_FILES__PATHS=/var/log/monitaur/*.jsonl

EXPOSE 9717
# /healthz over the exporter's own listener, TLS included (exporter/healthcheck.py).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["monitaur-exporter", "healthcheck"]

ENTRYPOINT ["monitaur-exporter"]
CMD ["run"]
