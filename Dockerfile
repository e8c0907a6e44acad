# Image for the user-datalake-service (pyproject name `user-datalake-service`, Python package `service/`).
#
#   docker build -t user-datalake-service .
#   docker run -p 8080:8080 -e MINIO_ENDPOINT=... -e MINIO_ACCESS_KEY=... -e MINIO_SECRET_KEY=... user-datalake-service
#
# Stages:
#   graphiql-assets  fetches the offline GraphiQL bundles from npm (pinned versions, sha512-checked)
#   builder          installs the locked dependencies (requirements.lock) and the package into /opt/venv
#   runtime          the final image: the virtualenv, the assets, a non-root user; no compilers, no tests

# --- GraphiQL browser bundles (scripts/fetch_graphiql_assets.py needs npm and python3 >= 3.9) ---------
FROM node:20-bookworm-slim AS graphiql-assets
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
COPY scripts/fetch_graphiql_assets.py /build/fetch_graphiql_assets.py
RUN python3 /build/fetch_graphiql_assets.py --dest /graphiql-assets

# --- Dependencies and package, in a virtualenv ---------------------------------------------------------
# Must be the same base image as the runtime stage: the venv's interpreter is a symlink to it.
FROM python:3.11-slim-bookworm AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
# Dependencies first, from the runtime lock alone: this layer is rebuilt only when requirements.lock
# changes, not on every source edit. Exact versions with their hashes, the ones the test suite ran
# against (requirements-test.lock pins the same); runtime dependencies only (no `[test]` extra).
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
# Then the package itself, without resolving anything again: `pip check` proves the lock satisfies
# every range in pyproject.toml. README.md is the project's `readme` in pyproject.toml, which
# setuptools reads while building the metadata. The import check runs from / so that it imports the
# installed copy, not ./service.
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install --no-deps . \
    && pip check \
    && cd / && python -c "import service.cli"

# --- Runtime ------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="user-datalake-service" \
      org.opencontainers.image.description="Aggregates per-user CSV files from a MinIO bucket; serves GraphQL and REST."
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin app \
    && mkdir -p /data \
    && chown 10001:10001 /data
COPY --from=builder /opt/venv /opt/venv
COPY --from=graphiql-assets /graphiql-assets /opt/graphiql-assets
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GRAPHIQL_ASSETS_DIR=/opt/graphiql-assets \
    DATA_DIR=/data
# An empty working directory: `python -m` puts the cwd first on sys.path, so nothing there may shadow
# the installed package.
WORKDIR /opt/app
USER 10001:10001
EXPOSE 8080
# Liveness only (GET /healthz); /readyz answers 503 until the first aggregate is loaded. The slim image
# has no curl, hence urllib. Follows PORT if it is overridden (default 8080, as in service/config.py).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('PORT', '').strip() or '8080'), timeout=4)"]
CMD ["python", "-m", "service", "serve"]
