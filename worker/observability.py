"""Prometheus metrics and structured logs for the coordinator and the workers.

Metrics (prometheus-client) are served on `--metrics-port` (env
GRADPOOL_METRICS_PORT; 0, the default, serves none). Names follow the
Prometheus conventions: counters end in `_total`, durations are `_seconds`
histograms, sizes `_bytes`. Every RPC is counted by `rpc.translate_errors`,
so no method can be missed; the rest is observed where it happens.

Logs: `--log-format json` (env GRADPOOL_LOG_FORMAT) writes one JSON object a
line with time, level, logger and message, plus the request id, graph id and
worker of the call being served, where they apply. The client's request id
travels to the workers in call metadata, so one request's lines can be
found on every machine.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import time
from typing import Any, Iterator, Optional

from prometheus_client import Counter, Gauge, Histogram, start_http_server

REQUEST_ID_HEADER = "gradpool-request-id"

# The call being served, for log lines (set by the servers, read by the formatter).
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
graph_id: contextvars.ContextVar[str] = contextvars.ContextVar("graph_id", default="")
worker: contextvars.ContextVar[str] = contextvars.ContextVar("worker", default="")

SAFE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@contextlib.contextmanager
def call_context(request: str = "", graph: str = "", serving_worker: str = "") -> Iterator[str]:
    """The ids of the call being served, for its log lines; reset afterwards
    (server threads are reused). Yields the request id if it is safe to pass
    on in metadata (a client chooses it), else ""."""
    request = request if SAFE_ID.match(request or "") else ""
    tokens = [var.set(value) for var, value in ((request_id, request), (graph_id, graph[:12]),
                                                (worker, serving_worker))]
    try:
        yield request
    finally:
        for var, token in zip((request_id, graph_id, worker), tokens):
            var.reset(token)


# ---------------------------------------------------------------- metrics

RPCS = Counter("gradpool_rpcs_total", "RPCs served, by server, method and status code",
               ["server", "method", "code"])
RPC_SECONDS = Histogram("gradpool_rpc_seconds", "Time to serve an RPC, by server and method",
                        ["server", "method"], buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
IN_FLIGHT = Gauge("gradpool_rpcs_in_flight", "RPCs being served now, by server", ["server"])
SHARD_SECONDS = Histogram("gradpool_shard_seconds", "Coordinator: time from sending a shard to its answer",
                          buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
SHARDS_RETRIED = Counter("gradpool_shards_retried_total",
                         "Coordinator: shards sent again to another worker after a failure")
SHARDS_HEDGED = Counter("gradpool_shards_hedged_total", "Coordinator: straggling shards copied to a free worker")
WORKERS = Gauge("gradpool_workers", "Coordinator: workers in the pool, by state", ["state"])
EXAMPLES = Counter("gradpool_examples_total", "Examples computed (coordinator: per request; worker: per shard)",
                   ["server"])
BYTES_IN = Counter("gradpool_received_bytes_total", "Bytes of heavy messages received", ["server"])
BYTES_OUT = Counter("gradpool_sent_bytes_total", "Bytes of heavy messages sent", ["server"])
GRAPHS = Gauge("gradpool_graphs_cached", "Graphs cached", ["server"])
DATASETS = Gauge("gradpool_datasets_cached", "Resident datasets cached", ["server"])
DATASET_BYTES = Gauge("gradpool_dataset_cached_bytes", "Bytes of resident datasets cached", ["server"])
SHARDS_AUDITED = Counter("gradpool_shards_audited_total",
                         "Coordinator: shards re-run on another worker to check a result, by outcome (agreed; "
                         "disagreed; skipped: no other live worker)", ["outcome"])
WORKERS_QUARANTINED = Counter("gradpool_workers_quarantined_total",
                              "Coordinator: workers quarantined because an audit found their result wrong")


def serve_metrics(port: int, host: str = "0.0.0.0") -> Optional[int]:
    """Serve /metrics over HTTP on `port` (0: not at all); returns the port."""
    if not port:
        return None
    try:
        start_http_server(port, addr=host)
    except OSError as err:
        raise OSError(f"cannot serve metrics on {host}:{port}: {err.strerror or err}") from None
    return port


class Observed:
    """Counts and times one RPC (used by `rpc.translate_errors`)."""

    def __init__(self, server: str, method: str):
        self.server, self.method = server, method
        self.started = time.perf_counter()
        IN_FLIGHT.labels(server).inc()

    def done(self, code: str) -> None:
        IN_FLIGHT.labels(self.server).dec()
        RPCS.labels(self.server, self.method, code).inc()
        RPC_SECONDS.labels(self.server, self.method).observe(time.perf_counter() - self.started)


def server_role(servicer: object) -> str:
    """'coordinator' or 'worker', from the servicer's class name."""
    name = type(servicer).__name__.lower()
    return "coordinator" if "coordinator" in name else "worker" if "worker" in name else name


# ---------------------------------------------------------------- logs

class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and the call's ids."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key, var in (("request_id", request_id), ("graph_id", graph_id), ("worker", worker)):
            value = getattr(record, key, "") or var.get()
            if value:
                entry[key] = value
        event = getattr(record, "event", "")  # a machine-readable name for lines alerts key on
        if event:
            entry["event"] = event
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
        logging.Formatter.converter = time.gmtime
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
