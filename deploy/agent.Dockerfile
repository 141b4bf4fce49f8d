# syntax=docker/dockerfile:1
# Container image for relay-agent (the agent only: no server extra, no database, no crypto
# at rest). Build from the repository root:
#   docker build -f deploy/agent.Dockerfile -t stowhook-agent .
# Run it with a config (see deploy/agent.toml) and the token mounted read-only:
#   docker run -d --name stowhook-agent --restart unless-stopped --stop-timeout 45 \
#     -v /etc/stowhook/agent.toml:/etc/stowhook/agent.toml:ro \
#     -v /etc/stowhook/agent.token:/etc/stowhook/agent.token:ro \
#     -v /var/spool/stowhook:/var/spool/stowhook \
#     stowhook-agent
# The mounted files must be readable by uid 10001 (the image's user). --stop-timeout 45:
# on SIGTERM the agent finishes or NACKs what it holds (30 s grace); Docker's default of
# 10 s would SIGKILL it first: nothing is lost (the server retries once the leases run
# out), but those events arrive later, and some twice.
#
# The image's file system can be read-only (docker run --read-only, Kubernetes
# readOnlyRootFilesystem): the agent writes only to the folders of `dir` destinations.
#
# Not built on the machine this was written on (it has no Docker engine): the steps are
# plain pip and useradd on Debian, but treat the first build as the first test; the test
# suite lints this file with hadolint (tests/unit/test_deploy.py). It needs BuildKit (the
# default builder since Docker 23) for the RUN --mount below.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
# Only what the agent's package needs; relay_server is left out of the wheel.
COPY pyproject.toml README.md ./
COPY relay_agent ./relay_agent
COPY relay_proto ./relay_proto
# Wheels for stowhook and every dependency, so the final stage installs offline.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STOWHOOK_LOG_FORMAT=json
# Versions are pinned by the build stage: /wheels holds exactly one of each (DL3013).
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels stowhook \
    && useradd --system --user-group --uid 10001 --no-create-home \
        --shell /usr/sbin/nologin stowhook \
    && install -d -o stowhook -g stowhook -m 0750 /var/spool/stowhook \
    && install -d -m 0755 /etc/stowhook
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /var/spool/stowhook
# The agent drains on SIGTERM (the default stop signal, stated for the reader).
STOPSIGNAL SIGTERM
# Local /healthz and /metrics inside the container (not published unless you map it).
# /healthz answers 503 while no stream to the server is open, so the container shows
# unhealthy while it is cut off from the relay (it keeps reconnecting meanwhile).
ENV STOWHOOK_METRICS_LISTEN=127.0.0.1:9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4)"]
ENTRYPOINT ["relay-agent"]
CMD ["run", "-c", "/etc/stowhook/agent.toml"]
