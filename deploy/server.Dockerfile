# syntax=docker/dockerfile:1
# Container image for relay-server, with SQLite and PostgreSQL support. Build it from the
# repository root:
#   docker build -f deploy/server.Dockerfile -t stowhook-server .
# Nothing secret is in the image: the AES key file comes in at run time (a Compose or
# Kubernetes secret, mode 0600 or 0400, owned by uid 10001), and so does the database URL
# (STOWHOOK_DATABASE_URL; a PostgreSQL password goes in PGPASSFILE, not in the URL).
# SQLite (one replica only):
#   docker run -d --name stowhook --read-only --stop-timeout 40 \
#     -p 8080:8080 -p 50051:50051 -v stowhook-data:/var/lib/stowhook \
#     -v /etc/stowhook/stowhook.key:/run/secrets/stowhook.key:ro stowhook-server
# PostgreSQL, several replicas: see deploy/compose.yaml and deploy/k8s/, and
# docs/operations.md. The container listens on all interfaces: put the TLS proxy or the
# certificates (STOWHOOK_HTTP_TLS_*, STOWHOOK_GRPC_TLS_*) in front of it.
#
# Not built on the machine this was written on (it has no Docker engine); the test suite
# lints this file with hadolint (tests/unit/test_deploy.py). Needs BuildKit (the default
# builder since Docker 23) for RUN --mount.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay_server ./relay_server
COPY relay_agent ./relay_agent
COPY relay_proto ./relay_proto
# The stowhook wheel and a wheel of every dependency, so that the final stage installs
# offline and has no compiler, no pip cache and no source tree.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[server,postgres,fast]"

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STOWHOOK_LOG_FORMAT=json \
    STOWHOOK_DATABASE_URL=sqlite:////var/lib/stowhook/stowhook.db \
    STOWHOOK_KEY_FILE=/run/secrets/stowhook.key \
    STOWHOOK_HTTP_LISTEN=0.0.0.0:8080 \
    STOWHOOK_GRPC_LISTEN=0.0.0.0:50051
# Versions are pinned by the build stage: /wheels holds exactly one of each (DL3013).
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "stowhook[server,postgres,fast]" \
    && useradd --system --user-group --uid 10001 --no-create-home \
        --shell /usr/sbin/nologin stowhook \
    && install -d -o stowhook -g stowhook -m 0700 /var/lib/stowhook
# The SQLite database lives here: a volume, so that it never ends up in the container's
# writable layer (and with --read-only it is the only writable place). Unused on PostgreSQL.
VOLUME ["/var/lib/stowhook"]
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /var/lib/stowhook
EXPOSE 8080 50051
# SIGTERM: /readyz and new webhooks turn 503, in-flight requests commit, leases go back.
STOPSIGNAL SIGTERM
# Liveness only (/healthz says the process answers); /readyz also checks the database and
# is the one for load balancers. Plain HTTP on the ingress port from STOWHOOK_HTTP_LISTEN.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('STOWHOOK_HTTP_LISTEN', '').rpartition(':')[2] or '8080'; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
ENTRYPOINT ["relay-server"]
CMD ["serve"]
