# One image for the coordinator, the workers and (with EXTRAS=demo) the demo.
# Build stage: install gradpool and its runtime dependencies from pyproject
# into a prefix; the final stage copies only that prefix, so no compiler,
# pip cache, tests or sources beyond the installed packages are left in it.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG EXTRAS=""
WORKDIR /src
# Dependencies first, read from pyproject.toml alone and pinned by
# constraints.txt: a change to the sources reuses this layer instead of
# reinstalling numpy and grpcio, and every build gets the same versions.
COPY pyproject.toml constraints.txt ./
COPY scripts/requirements.py scripts/
RUN python scripts/requirements.py --extras "${EXTRAS}" >requirements.txt \
 && pip install --no-cache-dir --prefix=/install -c constraints.txt -r requirements.txt
COPY README.md LICENSE ./
COPY protos protos
COPY worker worker
COPY server server
COPY client client
RUN pip install --no-cache-dir --no-deps --prefix=/install .

FROM python:${PYTHON_VERSION}-slim
LABEL org.opencontainers.image.title="gradpool" \
      org.opencontainers.image.description="A distributed gradient service: coordinator and workers over gRPC" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="The gradpool developers" \
      org.opencontainers.image.documentation="README.md, sections Cluster and Kubernetes"
COPY --from=build /install /usr/local
# The demo's output folder exists, owned by the user: a named volume mounted
# there starts with this owner (a folder Docker creates would be root's).
RUN useradd --create-home --uid 10001 --user-group gradpool \
 && install -d -o 10001 -g 10001 /home/gradpool/gradpool-out
USER 10001
WORKDIR /home/gradpool
ENV PYTHONUNBUFFERED=1 \
    GRADPOOL_HOST=0.0.0.0 \
    GRADPOOL_PORT=50051
# No EXPOSE: the same image listens on 50051 as the coordinator and on 50052
# as a worker, so the port is declared where the role is chosen (compose's
# `ports`/`expose`, or `docker run -p 50051:50051`).
# Healthy when the server of this container answers the gRPC health check:
# the coordinator's port, else the worker's (compose sets its own per service).
# Shell form on purpose: it expands ${GRADPOOL_PORT} and falls back with ||,
# which the exec (JSON) form cannot.
# hadolint ignore=DL3025
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD gradpool health "localhost:${GRADPOOL_PORT:-50051}" --timeout 2 >/dev/null 2>&1 \
   || gradpool health "localhost:${GRADPOOL_WORKER_PORT:-50052}" --timeout 2
ENTRYPOINT ["gradpool"]
CMD ["coordinator"]
