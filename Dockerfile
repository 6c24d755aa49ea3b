# One image for the coordinator, the workers and (with EXTRAS=demo) the demo.
# Build stage: install gradpool and its runtime dependencies from pyproject
# into a prefix; the final stage copies only that prefix, so no compiler,
# pip cache, tests or sources beyond the installed packages are left in it.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG EXTRAS=""
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY protos protos
COPY worker worker
COPY server server
COPY client client
RUN pip install --no-cache-dir --prefix=/install ".${EXTRAS:+[$EXTRAS]}"

FROM python:${PYTHON_VERSION}-slim
COPY --from=build /install /usr/local
RUN useradd --create-home --uid 10001 gradpool
USER gradpool
WORKDIR /home/gradpool
ENV PYTHONUNBUFFERED=1 \
    GRADPOOL_HOST=0.0.0.0 \
    GRADPOOL_PORT=50051
EXPOSE 50051
ENTRYPOINT ["gradpool"]
CMD ["coordinator"]
