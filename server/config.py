"""Coordinator settings: flags, each with an environment variable, checked once."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from gradpool.worker.datasets import DEFAULT_DATASET_CACHE_BYTES
from gradpool.worker.engine.limits import LIMITS, MB
from gradpool.worker.malloc import DEFAULT_KEEP_FREED_MB
from gradpool.worker.rpc import (DEFAULT_MAX_MESSAGE_MB, ServerTls, TlsConfig, add_memory_flags,
                                 add_observability_flags, add_server_tls_arguments, env_default,
                                 message_limit_bytes, server_tls)
from gradpool.worker.streams import STREAM_THRESHOLD_BYTES


@dataclass
class CoordinatorConfig(ServerTls):
    host: str = "0.0.0.0"
    port: int = 50051
    workers: list[str] = field(default_factory=list)
    token: Optional[str] = None  # clients' token
    worker_token: Optional[str] = None  # workers' token, to join the pool
    coordinator_token: Optional[str] = None  # sent to workers (default: worker_token)
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_ca: Optional[str] = None
    mtls: bool = False
    tls_worker_name: Optional[str] = None
    max_message_mb: float = DEFAULT_MAX_MESSAGE_MB
    heartbeat_seconds: float = 1.0
    lease_seconds: float = 4.0
    # Bounds a request whose client set no deadline, so a hung worker cannot
    # hold a coordinator thread forever.
    request_timeout_seconds: float = 600.0
    max_graphs: int = 256
    graph_cache_mb: float = LIMITS.graph_cache_bytes / MB
    max_request_memory_mb: float = LIMITS.max_request_memory_bytes / MB
    keep_freed_mb: float = DEFAULT_KEEP_FREED_MB
    dataset_cache_mb: float = DEFAULT_DATASET_CACHE_BYTES / 2**20
    stream_threshold_mb: float = STREAM_THRESHOLD_BYTES / 2**20
    max_shard_mb: float = 0.0
    threads: int = 32
    max_concurrent_requests: int = 64
    grace_seconds: float = 5.0
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_port: int = 0
    # Shard audit: the fraction of shards re-run on a second worker and
    # compared (0: none), and how far the two may differ (0: bitwise).
    audit_fraction: float = 0.0
    audit_tolerance: float = 0.0

    @property
    def worker_tls(self) -> Optional[TlsConfig]:
        """TLS of the channels to workers, whose certificates must name `tls_worker_name`."""
        return self.peer_tls(self.tls_worker_name)

    @property
    def to_workers_token(self) -> Optional[str]:
        """The token the coordinator sends to workers."""
        return self.coordinator_token or self.worker_token


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "gradpool coordinator") -> CoordinatorConfig:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run the gradpool coordinator: clients send it graphs and minibatches, it shards "
        "them over the registered workers and sums their gradients. Every flag can also be set by the "
        "environment variable shown.")
    add = parser.add_argument
    add("--host", default=env_default("GRADPOOL_HOST", "0.0.0.0"),
        help="interface to listen on (env GRADPOOL_HOST, default %(default)s)")
    add("--port", type=int, default=env_default("GRADPOOL_PORT", 50051),
        help="port to listen on, 0 for any free one (env GRADPOOL_PORT, default %(default)s)")
    add("--workers", default=env_default("GRADPOOL_WORKERS", ""),
        help="static workers, HOST:PORT,... used besides those that register (env GRADPOOL_WORKERS)")
    add("--token", default=os.environ.get("GRADPOOL_TOKEN") or None,
        help="the clients' token: graphs, gradients, datasets and status need 'authorization: Bearer TOKEN' "
             "(env GRADPOOL_TOKEN). With any token set, each role needs its own")
    add("--worker-token", default=os.environ.get("GRADPOOL_WORKER_TOKEN") or None,
        help="the workers' token: RegisterWorker, Heartbeat and DeregisterWorker need it "
             "(env GRADPOOL_WORKER_TOKEN)")
    add("--coordinator-token", default=os.environ.get("GRADPOOL_COORDINATOR_TOKEN") or None,
        help="token sent to workers with every call (env GRADPOOL_COORDINATOR_TOKEN; default the worker token); "
             "a dedicated one keeps workers from calling each other")
    add_server_tls_arguments(parser)
    add("--tls-worker-name", default=os.environ.get("GRADPOOL_TLS_WORKER_NAME") or None, metavar="NAME",
        help="name checked in every worker's certificate instead of its advertised host, for workers whose "
             "host names are not known in advance (containers) (env GRADPOOL_TLS_WORKER_NAME)")
    add("--max-message-mb", type=float, default=env_default("GRADPOOL_MAX_MESSAGE_MB", DEFAULT_MAX_MESSAGE_MB),
        help="largest gRPC message sent or received, in MB, at most 2047 (env GRADPOOL_MAX_MESSAGE_MB, "
             "default %(default)s)")
    add("--heartbeat-seconds", type=float, default=env_default("GRADPOOL_HEARTBEAT_SECONDS", 1.0),
        help="how often workers heartbeat (env GRADPOOL_HEARTBEAT_SECONDS, default %(default)s)")
    add("--lease-seconds", type=float, default=env_default("GRADPOOL_LEASE_SECONDS", 4.0),
        help="a worker silent this long is dropped (env GRADPOOL_LEASE_SECONDS, default %(default)s)")
    add("--request-timeout-seconds", type=float, default=env_default("GRADPOOL_REQUEST_TIMEOUT_SECONDS", 600.0),
        help="deadline for requests whose client set none (env GRADPOOL_REQUEST_TIMEOUT_SECONDS, "
             "default %(default)s)")
    add("--max-graphs", type=int, default=env_default("GRADPOOL_MAX_GRAPHS", 256),
        help="registered graphs kept (LRU; an evicted graph is registered again by the client) "
             "(env GRADPOOL_MAX_GRAPHS, default %(default)s)")
    add("--dataset-cache-mb", type=float, default=env_default("GRADPOOL_DATASET_CACHE_MB",
                                                               DEFAULT_DATASET_CACHE_BYTES // 2**20),
        help="memory for resident datasets, in MB; the largest dataset a client may upload (LRU; an evicted "
             "one is uploaded again by the SDK) (env GRADPOOL_DATASET_CACHE_MB, default %(default)s)")
    add_memory_flags(add)
    add("--stream-threshold-mb", type=float, default=env_default("GRADPOOL_STREAM_THRESHOLD_MB",
                                                                  STREAM_THRESHOLD_BYTES // 2**20),
        help="shards larger than this go to workers as a stream of chunks (RunShardStream), not one message "
             "(env GRADPOOL_STREAM_THRESHOLD_MB, default %(default)s)")
    add("--max-shard-mb", type=float, default=env_default("GRADPOOL_MAX_SHARD_MB", 0),
        help="pipelining: a worker whose share of an inline batch is larger gets it as several shards of at most "
             "this many MB, so the next transfers while the first computes; 0: one shard per worker "
             "(env GRADPOOL_MAX_SHARD_MB, default %(default)s)")
    add("--threads", type=int, default=env_default("GRADPOOL_THREADS", 32),
        help="concurrent RPCs served (env GRADPOOL_THREADS, default %(default)s)")
    add("--max-concurrent-requests", type=int, default=env_default("GRADPOOL_MAX_CONCURRENT_REQUESTS", 64),
        help="RPCs admitted at once; past that, an immediate RESOURCE_EXHAUSTED that the SDK retries with "
             "backoff (env GRADPOOL_MAX_CONCURRENT_REQUESTS, default %(default)s)")
    add("--grace-seconds", type=float, default=env_default("GRADPOOL_GRACE_SECONDS", 5.0),
        help="on SIGTERM, how long running requests may finish (env GRADPOOL_GRACE_SECONDS, "
             "default %(default)s)")
    add("--audit-fraction", type=float, default=env_default("GRADPOOL_AUDIT_FRACTION", 0.0),
        help="shard audit: this fraction of shards (drawn at random) is re-run on a second worker and the results "
             "compared; a worker found wrong (a third one breaks the tie) is quarantined: it gets no more shards "
             "until it restarts (env GRADPOOL_AUDIT_FRACTION, 0 to 1, default %(default)s: no audit)")
    add("--audit-tolerance", type=float, default=env_default("GRADPOOL_AUDIT_TOLERANCE", 0.0),
        help="how far two audited results may differ: |a - b| <= tol * (1 + max(|a|, |b|)) elementwise; 0 asks "
             "for bitwise equality, right for identical workers (env GRADPOOL_AUDIT_TOLERANCE, "
             "default %(default)s)")
    add_observability_flags(add)
    args = parser.parse_args(argv)
    if not 0 <= args.audit_fraction <= 1:  # NaN fails too
        parser.error(f"--audit-fraction must be in [0, 1], got {args.audit_fraction}")
    if not 0 <= args.audit_tolerance < float("inf"):
        parser.error(f"--audit-tolerance must be a finite number >= 0, got {args.audit_tolerance}")
    workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    for address in workers:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            parser.error(f"--workers: {address!r} is not HOST:PORT")
    if not 0 < args.heartbeat_seconds < args.lease_seconds:
        parser.error(f"need 0 < --heartbeat-seconds ({args.heartbeat_seconds}) < --lease-seconds "
                     f"({args.lease_seconds})")
    if (not args.request_timeout_seconds > 0 or args.max_graphs < 1 or args.threads < 1
            or not args.dataset_cache_mb > 0 or not args.stream_threshold_mb > 0 or args.max_concurrent_requests < 1
            or args.max_shard_mb < 0 or not args.graph_cache_mb > 0 or not args.max_request_memory_mb > 0 or args.keep_freed_mb < 0):
        parser.error("--request-timeout-seconds, --max-graphs, --dataset-cache-mb, --graph-cache-mb, "
                     "--max-request-memory-mb and --threads must be positive")
    try:
        message_limit_bytes(args.max_message_mb)
    except ValueError as err:
        parser.error(str(err))
    server_tls(args.tls_cert, args.tls_key, args.tls_ca, args.mtls, parser.error)
    values = vars(args)
    values["workers"] = workers
    return CoordinatorConfig(**values)
