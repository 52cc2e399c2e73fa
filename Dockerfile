# segproxy: the compiled request path in a slim image, run as a non-root user.
#   docker build -t segproxy .
#   docker run -p 8080:8080 -v segproxy-data:/var/lib/segproxy \
#     -e SEGPROXY_SOURCES_WRITE_KEYS=YOUR_KEY segproxy
# Configure it with SEGPROXY_* variables (docs/configuration.md), or mount a TOML file and run
# `serve --config /etc/segproxy/segproxy.toml`. docs/deployment.md has the details.
# tests/package checks this file and runs its build and install steps outside Docker.

ARG PYTHON_VERSION=3.11
# (every stage reads these: ARG before the first FROM, then named again in each stage)
ARG WHEELS=/wheels
ARG VENV=/opt/segproxy

# Build: a C compiler for mypyc, then segproxy's wheel and its dependencies' wheels.
FROM python:${PYTHON_VERSION}-slim AS build
ARG WHEELS
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# SEGPROXY_NATIVE=1: compiled, or the build fails (an image must not quietly run slower).
RUN SEGPROXY_NATIVE=1 python -m pip wheel --no-cache-dir --wheel-dir "$WHEELS" .

# Run: the wheels installed in a virtual environment, no compiler, no build tools.
FROM python:${PYTHON_VERSION}-slim AS runtime
ARG WHEELS
ARG VENV
COPY --from=build ${WHEELS} ${WHEELS}
RUN python -m venv "$VENV" \
    && "$VENV/bin/python" -m pip install --no-cache-dir --no-index --find-links "$WHEELS" segproxy \
    && rm -rf "$WHEELS"
# A dedicated user that owns only the data directory (the queue and nothing else is written).
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/segproxy --no-create-home \
        --shell /usr/sbin/nologin segproxy \
    && install -d -o segproxy -g segproxy -m 0700 /var/lib/segproxy
ENV PATH="${VENV}/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SEGPROXY_LISTEN=0.0.0.0:8080 \
    SEGPROXY_DATA_DIR=/var/lib/segproxy
# The durable queue (queue.db under data_dir): keep it on a volume across restarts and upgrades.
VOLUME ["/var/lib/segproxy"]
USER segproxy:segproxy
WORKDIR /var/lib/segproxy
EXPOSE 8080
# Ready: listening, not stopping, queue not full. Reads the same SEGPROXY_* variables as the
# proxy (admin.listen and admin.token included); give it --config too if you mount a file.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-m", "segproxy.healthcheck"]
# SIGTERM (docker stop) drains: give it more than twice limits.shutdown_grace, e.g.
# `docker stop -t 30` or `stop_grace_period: 30s` in compose (Docker's default is 10 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["segproxy"]
CMD ["serve"]
