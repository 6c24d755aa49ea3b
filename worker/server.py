"""The gradpool worker: a gRPC server that runs shards with the engine.

A worker caches checked `Program`s by graph id (bounded LRU), runs forward
and backward on the contiguous slice of a batch the coordinator sends it,
and keeps itself registered with a coordinator from a background thread:
it registers with backoff until the coordinator is up, heartbeats, and
registers again whenever the coordinator has forgotten it (restarted or
dropped its lease). It checks everything it receives and answers bad input
with INVALID_ARGUMENT; nothing a client sends can stop it serving.
The gRPC plumbing it shares with the coordinator and the SDK is in
worker/rpc.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import grpc

from gradpool.protos import gradpool_pb2 as pb
from gradpool.protos import gradpool_pb2_grpc as pb_grpc
from gradpool.worker import wire
from gradpool.worker.datasets import DEFAULT_DATASET_CACHE_BYTES, DatasetStore, assemble, indices_from, parsed_chunks
from gradpool.worker.engine import Program, graph_id
from gradpool.worker.engine.errors import GradpoolError, GraphError
from gradpool.worker.engine.limits import LIMITS, MB
from gradpool.worker.malloc import DEFAULT_KEEP_FREED_MB
from gradpool.worker.observability import (BYTES_IN, BYTES_OUT, DATASET_BYTES, DATASETS, EXAMPLES, GRAPHS,
                                           REQUEST_ID_HEADER, call_context)
from gradpool.worker.engine.tensors import wire_dtype_field
from gradpool.worker.engine.sharding import MAX_CAPACITY
from gradpool.worker.rpc import (
    COORDINATOR,
    DEFAULT_MAX_MESSAGE_MB,
    MISSING_DATASET,
    MISSING_GRAPH,
    NEVER_REFUSED_PREFIXES,
    AdmissionInterceptor,
    LruCache,
    RpcFailure,
    ServerTls,
    TlsConfig,
    add_health_and_reflection,
    add_memory_flags,
    add_observability_flags,
    add_server_tls_arguments,
    add_servicer,
    announce,
    auth_metadata,
    bind,
    channel_options,
    env_default,
    format_address,
    interceptors,
    message_limit_bytes,
    open_channel,
    run_main,
    serve_until_signalled,
    server_options,
    server_threads,
    server_tls,
    translate_errors,
    warn_about_tokens,
    with_port,
)
from gradpool.worker.streams import PROTOBUF_LIMIT_BYTES, from_frames, to_frames

log = logging.getLogger("gradpool.worker")

LINGER_SECONDS = 0.5

# ---------------------------------------------------------------- the worker service

class WorkerServicer(pb_grpc.WorkerServicer):
    """LoadGraph / RunShard / GetWorkerStatus on top of the engine."""

    def __init__(self, worker_id: str, max_graphs: int = 64, dataset_cache_bytes: int = DEFAULT_DATASET_CACHE_BYTES,
                 graph_cache_bytes: int = LIMITS.graph_cache_bytes,
                 max_request_memory: int = LIMITS.max_request_memory_bytes):
        self.worker_id = worker_id
        self.graphs: LruCache[Program] = LruCache(max_graphs, what="graph", max_bytes=graph_cache_bytes)
        self.datasets = DatasetStore(dataset_cache_bytes)
        self.max_request_memory = max_request_memory
        self._lock = threading.Lock()
        self._running = 0  # shards being computed now
        self.graphs_loaded = 0
        self.shards_served = 0
        self.examples_served = 0

    @translate_errors
    def LoadGraph(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Raw bytes in (see `add_servicer`): the graph's sizes are checked on the wire before it is parsed."""
        self.graphs.fits(len(request))
        message = wire.parse_checked(pb.LoadGraphRequest, request, error=GraphError)
        key = message.graph_id
        if self.graphs.get(key) is not None:
            return b""  # LoadGraphResponse has no fields
        actual = graph_id(message.graph)
        if key != actual:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"graph id {key[:12]!r} does not match the graph's content hash {actual[:12]}")
        try:
            program = Program(message.graph)
        except GradpoolError as err:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"invalid graph {key[:12]}: {err}") from None
        del message  # the Program keeps what it needs (consts copied out)
        program.check_fits(self.max_request_memory)  # CapacityError -> RESOURCE_EXHAUSTED, naming the node
        self.graphs.put(key, program, program.footprint)
        with self._lock:
            self.graphs_loaded += 1
        log.info("loaded graph %s (%s, %d nodes)", key[:12], program.name, len(program.nodes))
        self._cache_gauges()
        return b""

    @translate_errors
    def RunShard(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Raw bytes in and out (see `add_servicer`): tensors are read in place."""
        BYTES_IN.labels("worker").inc(len(request))
        return self._traced_shard(wire.read_shard_request(request), context).join()

    @translate_errors
    def RunShardStream(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        data = from_frames(request_iterator, PROTOBUF_LIMIT_BYTES)
        BYTES_IN.labels("worker").inc(len(data))
        return to_frames(self._traced_shard(wire.read_shard_request(data), context))

    def _traced_shard(self, request: wire.ShardRequestView, context: grpc.ServicerContext) -> wire.Parts:
        """The shard, its log lines carrying the client's request id (sent along by the coordinator)."""
        request_id = dict(context.invocation_metadata() or ()).get(REQUEST_ID_HEADER, "")
        with self._lock:
            self._running += 1
        try:
            with call_context(request_id, request.graph_id, self.worker_id):
                response = self._run_shard(request, context)
        finally:
            with self._lock:
                self._running -= 1
        BYTES_OUT.labels("worker").inc(response.size)
        return response

    def _run_shard(self, request: wire.ShardRequestView, context: grpc.ServicerContext) -> wire.Parts:
        started = time.perf_counter()
        program = self.graphs.get(request.graph_id)
        if program is None:
            raise RpcFailure(grpc.StatusCode.NOT_FOUND,
                             f"graph {request.graph_id[:12]!r} is not loaded on worker {self.worker_id}; "
                             "send it with LoadGraph", MISSING_GRAPH)
        stop = threading.Event()  # set when the call ends early: the engine stops between two nodes
        if not context.add_callback(stop.set) or not context.is_active():
            raise RpcFailure(grpc.StatusCode.CANCELLED, "the caller gave up before the shard started")
        wire_dtype = wire_dtype_field(request.wire_dtype)  # the gradients' encoding (outputs are never compacted)
        params = wire.param_arrays(request.params, program.signature)  # compact ones decoded to the graph's dtypes
        inputs = self._inputs(program, request)
        global_batch = request.global_batch or None
        if request.mode == pb.ShardRequest.GRADIENTS:
            result = program.run(params, inputs, global_batch=global_batch,
                                 include_batch_independent=request.include_batch_independent, stop=stop,
                                 seed=request.seed, example_offset=request.example_offset,
                                 max_memory=self.max_request_memory)
        elif request.mode == pb.ShardRequest.FORWARD:
            if not request.outputs:
                raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "FORWARD mode needs at least one output name")
            result = program.run(params, inputs, global_batch=global_batch,
                                 include_batch_independent=request.include_batch_independent,
                                 gradients=False, outputs=request.outputs, stop=stop,
                                 example_offset=request.example_offset, max_memory=self.max_request_memory)
        else:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"unknown shard mode {request.mode}")
        with self._lock:
            self.shards_served += 1
            self.examples_served += result.examples
        EXAMPLES.labels("worker").inc(result.examples)
        log.debug("shard of %d example(s) computed in %.3fs", result.examples, time.perf_counter() - started)
        return wire.shard_response(result.loss, result.grads, result.outputs, result.examples,
                                   time.perf_counter() - started, wire_dtype)

    def _inputs(self, program: Program, request: wire.ShardRequestView) -> dict:
        """The shard's inputs: views of the request's bytes, or a cached dataset's rows."""
        if request.rows is None:
            return {name: tensor.array() for name, tensor in wire.named_map(request.inputs, "input").items()}
        if request.inputs:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "a shard carries inputs or dataset rows, not both")
        dataset_id = request.rows.dataset_id
        dataset = self.datasets.get(dataset_id)
        if dataset is None:
            raise RpcFailure(grpc.StatusCode.NOT_FOUND, f"dataset {dataset_id[:12]!r} is not cached on worker "
                             f"{self.worker_id}; send it with LoadDataset", MISSING_DATASET)
        if request.mode == pb.ShardRequest.FORWARD:
            names = program.sources_for(request.outputs)[0]
        else:
            names = set(program.inputs)
        return dataset.rows(indices_from(request.rows), names & set(dataset.arrays))

    @translate_errors
    def LoadDataset(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """Raw chunks in (see `add_servicer`): each one's sizes are checked on the wire before it is parsed."""
        dataset = assemble(parsed_chunks(request_iterator), self.datasets.max_bytes)
        for evicted in self.datasets.put(dataset):
            log.info("evicted dataset %s from the cache", evicted[:12])
        log.info("cached dataset %s (%d examples, %.1f MB)", dataset.dataset_id[:12], dataset.examples,
                 dataset.nbytes / 2**20)
        self._cache_gauges()
        return dataset.info().SerializeToString()

    def in_flight(self) -> int:
        with self._lock:
            return self._running

    def _cache_gauges(self) -> None:
        datasets, dataset_bytes = self.datasets.stats()
        GRAPHS.labels("worker").set(len(self.graphs))
        DATASETS.labels("worker").set(datasets)
        DATASET_BYTES.labels("worker").set(dataset_bytes)

    @translate_errors
    def GetWorkerStatus(self, request: pb.WorkerStatusRequest,
                        context: grpc.ServicerContext) -> pb.WorkerStatusResponse:
        with self._lock:
            datasets, dataset_bytes = self.datasets.stats()
            return pb.WorkerStatusResponse(worker_id=self.worker_id, graphs_cached=len(self.graphs),
                                           graphs_loaded=self.graphs_loaded, shards_served=self.shards_served,
                                           examples_served=self.examples_served, datasets_cached=datasets,
                                           dataset_bytes_cached=dataset_bytes)


# ---------------------------------------------------------------- staying registered

class CoordinatorLink:
    """Keeps this worker in the coordinator's pool from a background thread.

    Registers (retrying with backoff until the coordinator is up), then
    heartbeats at the interval the coordinator asks for. A heartbeat answered
    `known=False` (the coordinator restarted or dropped our lease) or that
    fails at all sends it back to registering; registering again under the
    same worker id is harmless. The lease secret the coordinator returns goes
    with every heartbeat, the deregistration and registering again: without
    it no one can take over, renew or remove this worker's entry.
    """

    INITIAL_BACKOFF = 0.05
    MAX_BACKOFF = 0.5  # back within about a second of a restarted coordinator
    CALL_TIMEOUT = 5.0

    def __init__(self, coordinator: str, advertise: str, capacity: float, worker_id: str,
                 token: Optional[str] = None, max_message_mb: float = DEFAULT_MAX_MESSAGE_MB,
                 tls: Optional[TlsConfig] = None):
        self.coordinator = coordinator = with_port(coordinator)
        self.advertise = advertise
        self.capacity = capacity
        self.worker_id = worker_id
        self.lease_secret = ""
        self._metadata = auth_metadata(token)
        self._channel = open_channel(coordinator, tls, channel_options(max_message_mb))
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coordinator-link", daemon=True)
        self.registered = threading.Event()
        self.heartbeat_seconds = 1.0
        self._last_error = ""

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        backoff = self.INITIAL_BACKOFF
        while not self._stop.is_set():
            if not self.registered.is_set():
                if self._register():
                    backoff = self.INITIAL_BACKOFF
                else:
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.MAX_BACKOFF)
                continue
            if self._stop.wait(self.heartbeat_seconds):
                break
            self._heartbeat()

    def _register(self) -> bool:
        request = pb.RegisterWorkerRequest(address=self.advertise, capacity=self.capacity, worker_id=self.worker_id,
                                           lease_secret=self.lease_secret)
        try:
            response = self._stub.RegisterWorker(request, timeout=self.CALL_TIMEOUT, metadata=self._metadata)
        except grpc.RpcError as err:
            self._complain(f"cannot register with the coordinator at {self.coordinator}: "
                           f"{err.code().name}: {err.details()}")
            return False
        self.worker_id = response.worker_id or self.worker_id
        self.lease_secret = response.lease_secret
        if response.heartbeat_seconds > 0:
            self.heartbeat_seconds = response.heartbeat_seconds
        self._last_error = ""
        self.registered.set()
        log.info("registered with %s as %s (%s, capacity %g)", self.coordinator, self.worker_id,
                 self.advertise, self.capacity)
        return True

    def _heartbeat(self) -> None:
        try:
            known = self._stub.Heartbeat(pb.HeartbeatRequest(worker_id=self.worker_id, lease_secret=self.lease_secret),
                                         timeout=self.CALL_TIMEOUT, metadata=self._metadata).known
        except grpc.RpcError as err:
            self._complain(f"heartbeat to {self.coordinator} failed: {err.code().name}: {err.details()}")
            self.registered.clear()
            return
        if not known:
            log.info("the coordinator at %s does not know this worker any more; registering again",
                     self.coordinator)
            self.registered.clear()

    def _complain(self, message: str) -> None:
        """Log a failure once at WARNING, its repeats at DEBUG (retrying is normal)."""
        log.log(logging.DEBUG if message == self._last_error else logging.WARNING, "%s", message)
        self._last_error = message

    def stop(self, deregister: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=self.CALL_TIMEOUT)
        if deregister and self.registered.is_set():
            try:
                self._stub.DeregisterWorker(pb.DeregisterWorkerRequest(worker_id=self.worker_id,
                                                                       lease_secret=self.lease_secret),
                                            timeout=2.0, metadata=self._metadata)
                log.info("deregistered from %s", self.coordinator)
            except grpc.RpcError as err:
                log.warning("could not deregister from %s: %s", self.coordinator, err.details())
        self._channel.close()


# ---------------------------------------------------------------- configuration and main

@dataclass
class WorkerConfig(ServerTls):
    coordinator: Optional[str] = None
    host: str = "0.0.0.0"
    port: int = 50052
    advertise: Optional[str] = None
    capacity: float = float(os.cpu_count() or 1)
    worker_id: Optional[str] = None
    worker_token: Optional[str] = None  # sent to the coordinator to join its pool
    coordinator_token: Optional[str] = None  # required from callers (default: worker_token)
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_ca: Optional[str] = None
    mtls: bool = False
    token: Optional[str] = None  # the clients' token: accepted and ignored (a worker has no client methods)
    max_message_mb: float = DEFAULT_MAX_MESSAGE_MB
    max_graphs: int = 64
    graph_cache_mb: float = LIMITS.graph_cache_bytes / MB
    max_request_memory_mb: float = LIMITS.max_request_memory_bytes / MB
    keep_freed_mb: float = DEFAULT_KEEP_FREED_MB
    dataset_cache_mb: float = DEFAULT_DATASET_CACHE_BYTES / 2**20
    threads: int = 8
    max_concurrent_shards: int = 16
    grace_seconds: float = 5.0
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_port: int = 0

    @property
    def coordinator_tls(self) -> Optional[TlsConfig]:
        """TLS of the channel to the coordinator."""
        return self.peer_tls()

    @property
    def callers_token(self) -> Optional[str]:
        """The token callers (the coordinator) must present."""
        return self.coordinator_token or self.worker_token


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "gradpool worker") -> WorkerConfig:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run a gradpool worker: computes gradients of batch shards for a coordinator. "
        "Every flag can also be set by the environment variable shown.")
    add = parser.add_argument
    add("--coordinator", default=os.environ.get("GRADPOOL_COORDINATOR") or None,
        help="coordinator HOST:PORT to register with (env GRADPOOL_COORDINATOR); without it the worker only "
             "serves coordinators that list it in --workers")
    add("--host", default=env_default("GRADPOOL_WORKER_HOST", "0.0.0.0"),
        help="interface to listen on (env GRADPOOL_WORKER_HOST, default %(default)s)")
    add("--port", type=int, default=env_default("GRADPOOL_WORKER_PORT", 50052),
        help="port to listen on, 0 for any free one (env GRADPOOL_WORKER_PORT, default %(default)s)")
    add("--advertise", default=os.environ.get("GRADPOOL_ADVERTISE") or None,
        help="HOST:PORT the coordinator should call (env GRADPOOL_ADVERTISE; default this host's name and the "
             "bound port)")
    add("--capacity", type=float, default=env_default("GRADPOOL_CAPACITY", os.cpu_count() or 1),
        help="relative speed used to size this worker's shards (env GRADPOOL_CAPACITY, default: CPU cores, "
             "%(default)s)")
    add("--worker-id", default=os.environ.get("GRADPOOL_WORKER_ID") or None,
        help="stable name for this worker (env GRADPOOL_WORKER_ID; default host-pid-random)")
    add("--worker-token", default=os.environ.get("GRADPOOL_WORKER_TOKEN") or None,
        help="the workers' token: sent to the coordinator to join its pool, and required from callers unless "
             "--coordinator-token is given (env GRADPOOL_WORKER_TOKEN)")
    add("--coordinator-token", default=os.environ.get("GRADPOOL_COORDINATOR_TOKEN") or None,
        help="the token the coordinator calls workers with, required from every caller "
             "(env GRADPOOL_COORDINATOR_TOKEN; default the worker token)")
    add("--token", default=os.environ.get("GRADPOOL_TOKEN") or None,
        help="the clients' token (env GRADPOOL_TOKEN): a worker has no client methods and ignores it; it joins "
             "the pool with --worker-token")
    add_server_tls_arguments(parser)
    add("--max-message-mb", type=float, default=env_default("GRADPOOL_MAX_MESSAGE_MB", DEFAULT_MAX_MESSAGE_MB),
        help="largest gRPC message sent or received, in MB, at most 2047 (env GRADPOOL_MAX_MESSAGE_MB, "
             "default %(default)s)")
    add("--max-graphs", type=int, default=env_default("GRADPOOL_MAX_GRAPHS", 64),
        help="graphs kept in the LRU cache (env GRADPOOL_MAX_GRAPHS, default %(default)s)")
    add("--dataset-cache-mb", type=float, default=env_default("GRADPOOL_DATASET_CACHE_MB",
                                                               DEFAULT_DATASET_CACHE_BYTES // 2**20),
        help="memory for resident datasets, in MB (LRU; env GRADPOOL_DATASET_CACHE_MB, default %(default)s)")
    add_memory_flags(add)
    add("--threads", type=int, default=env_default("GRADPOOL_THREADS", 8),
        help="concurrent RPCs served (env GRADPOOL_THREADS, default %(default)s)")
    add("--max-concurrent-shards", type=int, default=env_default("GRADPOOL_MAX_CONCURRENT_SHARDS", 16),
        help="RPCs admitted at once; past that, an immediate RESOURCE_EXHAUSTED and the coordinator sends the "
             "shard to another worker (env GRADPOOL_MAX_CONCURRENT_SHARDS, default %(default)s)")
    add("--grace-seconds", type=float, default=env_default("GRADPOOL_GRACE_SECONDS", 5.0),
        help="on SIGTERM, how long running shards may finish (env GRADPOOL_GRACE_SECONDS, default %(default)s)")
    add_observability_flags(add)
    args = parser.parse_args(argv)
    if not 0 < args.capacity <= MAX_CAPACITY:
        parser.error(f"--capacity must be positive and at most {MAX_CAPACITY:g}, got {args.capacity}")
    server_tls(args.tls_cert, args.tls_key, args.tls_ca, args.mtls, parser.error)
    if (args.max_graphs < 1 or args.threads < 1 or not args.dataset_cache_mb > 0 or args.max_concurrent_shards < 1
            or not args.graph_cache_mb > 0 or not args.max_request_memory_mb > 0 or args.keep_freed_mb < 0):
        parser.error("--max-graphs, --threads, --dataset-cache-mb, --graph-cache-mb and --max-request-memory-mb "
                     "must be positive")
    try:
        message_limit_bytes(args.max_message_mb)
    except ValueError as err:
        parser.error(str(err))
    return WorkerConfig(**vars(args))


@dataclass
class RunningWorker:
    """A started worker server and what is needed to stop it cleanly."""
    server: grpc.Server
    servicer: WorkerServicer
    port: int
    address: str
    health: object
    link: Optional[CoordinatorLink]

    def stop(self, grace: float = 5.0) -> None:
        """Leave the pool first (no new shards), then let running shards finish."""
        self.health.enter_graceful_shutdown()  # type: ignore[attr-defined]
        if self.link is not None:
            self.link.stop(deregister=True)
        answered, busy = self.servicer.shards_served, self.servicer.in_flight()
        self.server.stop(grace).wait()
        if busy or self.servicer.shards_served != answered:
            # The last answers are written but may still be in flight: exiting at
            # once can reset the connection under them (seen in CI), and the
            # coordinator would redo a shard that was done. That includes a
            # shard that had arrived but not yet started when the stop began.
            time.sleep(LINGER_SECONDS)


def start(config: WorkerConfig) -> RunningWorker:
    """Start serving (and registering) without blocking."""
    worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    admission = AdmissionInterceptor(config.max_concurrent_shards, NEVER_REFUSED_PREFIXES)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=server_threads(config.threads,
                                                                               config.max_concurrent_shards),
                                                    thread_name_prefix="worker-rpc"),
                         options=server_options(config.max_message_mb),
                         interceptors=interceptors({COORDINATOR: config.callers_token}) + [admission])
    servicer = WorkerServicer(worker_id, config.max_graphs, int(config.dataset_cache_mb * 2**20),
                              int(config.graph_cache_mb * MB), int(config.max_request_memory_mb * MB))
    add_servicer(server, servicer, "Worker", raw=("LoadGraph", "RunShard", "RunShardStream", "LoadDataset"))
    health = add_health_and_reflection(server, [pb.DESCRIPTOR.services_by_name["Worker"].full_name])
    port = bind(server, config.host, config.port, config.tls)
    server.start()
    wildcard = config.host in ("0.0.0.0", "::", "[::]", "")
    advertise = config.advertise or format_address(socket.gethostname() if wildcard else config.host, port)
    link = None
    if config.coordinator:
        link = CoordinatorLink(config.coordinator, advertise, config.capacity, worker_id, config.worker_token,
                               config.max_message_mb, config.coordinator_tls)
        link.start()
    return RunningWorker(server, servicer, port, advertise, health, link)


def serve(config: WorkerConfig) -> None:
    """Run a worker until SIGTERM/SIGINT, then leave the pool and stop gracefully."""
    if config.token and not config.worker_token:
        log.warning("GRADPOOL_TOKEN/--token is the clients' token and a worker does not use it: join a pool "
                    "that needs a token with --worker-token (GRADPOOL_WORKER_TOKEN)")
    warn_about_tokens({COORDINATOR: config.callers_token}, log)
    running = start(config)
    announce("worker", config.host, running.port)
    log.info("worker %s serving on port %d, advertised as %s, capacity %g%s", running.servicer.worker_id,
             running.port, running.address, config.capacity,
             f", coordinator {config.coordinator}" if config.coordinator else " (no coordinator: static only)")
    serve_until_signalled(running, config.grace_seconds, log)


def main(argv: Optional[Sequence[str]] = None, prog: str = "gradpool worker") -> int:
    config = parse_args(argv, prog)
    return run_main(serve, config, log)
