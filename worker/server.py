"""The gradpool worker: a gRPC server that runs shards with the engine.

A worker caches checked `Program`s by graph id (bounded LRU), runs forward
and backward on the contiguous slice of a batch the coordinator sends it,
and keeps itself registered with a coordinator from a background thread:
it registers with backoff until the coordinator is up, heartbeats, and
registers again whenever the coordinator has forgotten it (restarted or
dropped its lease). It checks everything it receives and answers bad input
with INVALID_ARGUMENT; nothing a client sends can stop it serving.

The first section holds the gRPC plumbing the coordinator shares (message
limits, token interceptor, health and reflection, shutdown signals). It
lives here because `worker` may not import `server`, while `server` and
`client` may import `worker`.
"""

from __future__ import annotations

import argparse
import functools
import hmac
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import OrderedDict
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import grpc
import numpy as np

from protos import gradpool_pb2 as pb
from protos import gradpool_pb2_grpc as pb_grpc
from worker.engine import Program, as_dtype, from_named, graph_id
from worker.engine.errors import GradpoolError
from worker.engine.tensors import DTYPE_TO_PROTO

log = logging.getLogger("gradpool.worker")

VERSION = "0.1.0"

# ---------------------------------------------------------------- shared gRPC plumbing

# gRPC's default limit is 4 MB received per message. Tensors travel inside
# one message each way (streaming in chunks is a later optimisation), so the
# limit is raised on purpose, on every server and channel, to something that
# fits 100 MB of params plus a 100 MB batch with room to spare. gRPC lengths
# are signed 32-bit, so 2 GiB - 1 byte is the hard cap.
DEFAULT_MAX_MESSAGE_MB = 1024.0
GRPC_HARD_LIMIT_BYTES = 2**31 - 1
AUTH_HEADER = "authorization"
# Liveness probes (docker, grpc_health_probe) need no token; they learn nothing.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)
PARENT_PID_ENV = "GRADPOOL_EXIT_WITH_PARENT"


def message_limit_bytes(max_message_mb: float) -> int:
    """The message size limit in bytes, refusing values gRPC cannot honour."""
    if not max_message_mb > 0:
        raise ValueError(f"max message size must be positive, got {max_message_mb} MB")
    limit = int(max_message_mb * 1024 * 1024)
    if limit > GRPC_HARD_LIMIT_BYTES:
        raise ValueError(f"max message size {max_message_mb} MB exceeds gRPC's hard cap of 2047 MB")
    return limit


def channel_options(max_message_mb: float = DEFAULT_MAX_MESSAGE_MB) -> list[tuple[str, int]]:
    """Options for every server and channel: raised send/receive limits."""
    limit = message_limit_bytes(max_message_mb)
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def server_options(max_message_mb: float = DEFAULT_MAX_MESSAGE_MB) -> list[tuple[str, int]]:
    # No SO_REUSEPORT: a second server on a taken port must fail, not share it.
    return channel_options(max_message_mb) + [("grpc.so_reuseport", 0)]


def auth_metadata(token: Optional[str]) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the shared token, or nothing without one."""
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


class TokenInterceptor(grpc.ServerInterceptor):
    """Rejects every RPC (except health checks) without `authorization: Bearer <token>`."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        if handler_call_details.method.startswith(UNAUTHENTICATED_PREFIXES):
            return continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get(AUTH_HEADER, "")
        if hmac.compare_digest(str(given).encode(), self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        return _rejecting_handler(handler, "missing or wrong token: send metadata 'authorization: Bearer <token>'")


def _rejecting_handler(handler: Optional[grpc.RpcMethodHandler], message: str) -> Optional[grpc.RpcMethodHandler]:
    """A handler of the same streaming shape as `handler` that answers UNAUTHENTICATED."""
    if handler is None:
        return None

    def reject(request_or_iterator, context):  # type: ignore[no-untyped-def]
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject)
    return grpc.unary_unary_rpc_method_handler(reject)


def interceptors(token: Optional[str]) -> list[grpc.ServerInterceptor]:
    return [TokenInterceptor(token)] if token else []


def add_health_and_reflection(server: grpc.Server, service_names: Iterable[str]):  # type: ignore[no-untyped-def]
    """Standard health (SERVING) and reflection services, so grpcurl and probes work."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    names = list(service_names)
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="health"))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in names + [health.OVERALL_HEALTH]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return health_servicer


def format_address(host: str, port: int) -> str:
    """host:port, with brackets around an IPv6 literal."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def bind(server: grpc.Server, host: str, port: int) -> int:
    """Bind an insecure port and return the real one (`port` 0 picks a free one)."""
    try:
        bound = server.add_insecure_port(format_address(host, port))
    except RuntimeError as err:  # gRPC raises when it cannot bind
        raise OSError(f"cannot listen on {format_address(host, port)}: {err}") from None
    if bound == 0:
        raise OSError(f"cannot listen on {format_address(host, port)} (port taken or host not local?)")
    return bound


def announce(role: str, host: str, port: int) -> None:
    """The one stdout line launchers (LocalCluster) read to learn the real port."""
    print(f"gradpool {role} listening on {format_address(host, port)}", flush=True)


def env_default(name: str, fallback: object) -> str:
    """A flag's default: the environment variable if set, else `fallback` (as text for argparse)."""
    value = os.environ.get(name)
    return value if value not in (None, "") else str(fallback)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def wait_for_shutdown(stop: Optional[threading.Event] = None) -> str:
    """Block until SIGTERM/SIGINT (or `stop`), and say why.

    Also returns when the process named by GRADPOOL_EXIT_WITH_PARENT exits,
    so that children of a LocalCluster whose parent was killed do not linger.
    """
    stop = stop or threading.Event()
    reason = ["stop requested"]

    def on_signal(signum, frame):  # type: ignore[no-untyped-def]
        reason[0] = signal.Signals(signum).name
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    parent = os.environ.get(PARENT_PID_ENV, "")
    parent_pid = int(parent) if parent.isdigit() else None
    while not stop.wait(0.5):
        if parent_pid is not None and os.getppid() != parent_pid:
            reason[0] = f"parent process {parent_pid} exited"
            break
    return reason[0]


def add_named(field, arrays: Mapping[str, np.ndarray]) -> None:  # type: ignore[no-untyped-def]
    """Encode arrays straight into a repeated NamedTensor field of a message.

    Same bytes as `to_named`, but each tensor's data is copied once into the
    message instead of being built as a separate message and copied again:
    for 100 MB tensors every copy counts.
    """
    for name, array in arrays.items():
        dtype = as_dtype(array.dtype)
        tensor = field.add(name=name).tensor
        tensor.dtype = DTYPE_TO_PROTO[dtype]
        tensor.shape.extend(array.shape)
        tensor.data = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()


class RpcFailure(Exception):
    """Raised inside a servicer method to end the RPC with `code` and a message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def translate_errors(method: Callable) -> Callable:
    """Servicer method decorator: RpcFailure -> its status, GradpoolError ->
    INVALID_ARGUMENT, anything else -> INTERNAL (logged), never a crash."""

    @functools.wraps(method)
    def wrapper(self, request, context):  # type: ignore[no-untyped-def]
        try:
            return method(self, request, context)
        except RpcFailure as err:
            code, message = err.code, str(err)
        except GradpoolError as err:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(err)
        except Exception as err:  # a bug; keep serving and say what happened
            log.exception("%s failed", method.__name__)
            code, message = grpc.StatusCode.INTERNAL, f"{method.__name__} failed: {type(err).__name__}: {err}"
        context.abort(code, message)

    return wrapper


# ---------------------------------------------------------------- the worker service

class GraphCache:
    """Thread-safe LRU of checked Programs by graph id."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"graph cache size must be >= 1, got {capacity}")
        self.capacity = capacity
        self._programs: OrderedDict[str, Program] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Optional[Program]:
        with self._lock:
            program = self._programs.get(key)
            if program is not None:
                self._programs.move_to_end(key)
            return program

    def put(self, key: str, program: Program) -> None:
        with self._lock:
            self._programs[key] = program
            self._programs.move_to_end(key)
            while len(self._programs) > self.capacity:
                evicted, _ = self._programs.popitem(last=False)
                log.info("evicted graph %s from the cache", evicted[:12])

    def __len__(self) -> int:
        with self._lock:
            return len(self._programs)


class WorkerServicer(pb_grpc.WorkerServicer):
    """LoadGraph / RunShard / GetWorkerStatus on top of the engine."""

    def __init__(self, worker_id: str, max_graphs: int = 64):
        self.worker_id = worker_id
        self.graphs = GraphCache(max_graphs)
        self._lock = threading.Lock()
        self.graphs_loaded = 0
        self.shards_served = 0
        self.examples_served = 0

    @translate_errors
    def LoadGraph(self, request: pb.LoadGraphRequest, context: grpc.ServicerContext) -> pb.LoadGraphResponse:
        key = request.graph_id
        if self.graphs.get(key) is not None:
            return pb.LoadGraphResponse()
        actual = graph_id(request.graph)
        if key != actual:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"graph id {key[:12]!r} does not match the graph's content hash {actual[:12]}")
        try:
            program = Program(request.graph)
        except GradpoolError as err:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"invalid graph {key[:12]}: {err}") from None
        self.graphs.put(key, program)
        with self._lock:
            self.graphs_loaded += 1
        log.info("loaded graph %s (%s, %d nodes)", key[:12], program.name, len(program.nodes))
        return pb.LoadGraphResponse()

    @translate_errors
    def RunShard(self, request: pb.ShardRequest, context: grpc.ServicerContext) -> pb.ShardResponse:
        started = time.perf_counter()
        program = self.graphs.get(request.graph_id)
        if program is None:
            raise RpcFailure(grpc.StatusCode.NOT_FOUND,
                             f"graph {request.graph_id[:12]!r} is not loaded on worker {self.worker_id}; "
                             "send it with LoadGraph")
        if not context.is_active():  # the caller gave up (deadline, cancel) while this waited for a thread
            raise RpcFailure(grpc.StatusCode.CANCELLED, "the caller gave up before the shard started")
        params = from_named(request.params, "param")
        inputs = from_named(request.inputs, "input")
        global_batch = request.global_batch or None
        if request.mode == pb.ShardRequest.GRADIENTS:
            result = program.run(params, inputs, global_batch=global_batch,
                                 include_batch_independent=request.include_batch_independent)
        elif request.mode == pb.ShardRequest.FORWARD:
            if not request.outputs:
                raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "FORWARD mode needs at least one output name")
            result = program.run(params, inputs, global_batch=global_batch,
                                 include_batch_independent=request.include_batch_independent,
                                 gradients=False, outputs=list(request.outputs))
        else:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"unknown shard mode {request.mode}")
        with self._lock:
            self.shards_served += 1
            self.examples_served += result.examples
        response = pb.ShardResponse(loss=result.loss, examples=result.examples)
        add_named(response.grads, result.grads)
        add_named(response.outputs, result.outputs)
        response.seconds = time.perf_counter() - started
        return response

    @translate_errors
    def GetWorkerStatus(self, request: pb.WorkerStatusRequest,
                        context: grpc.ServicerContext) -> pb.WorkerStatusResponse:
        with self._lock:
            return pb.WorkerStatusResponse(worker_id=self.worker_id, graphs_cached=len(self.graphs),
                                           graphs_loaded=self.graphs_loaded, shards_served=self.shards_served,
                                           examples_served=self.examples_served)


# ---------------------------------------------------------------- staying registered

class CoordinatorLink:
    """Keeps this worker in the coordinator's pool from a background thread.

    Registers (retrying with backoff until the coordinator is up), then
    heartbeats at the interval the coordinator asks for. A heartbeat answered
    `known=False` (the coordinator restarted or dropped our lease) or that
    fails at all sends it back to registering; registering again under the
    same worker id is harmless.
    """

    INITIAL_BACKOFF = 0.05
    MAX_BACKOFF = 2.0
    CALL_TIMEOUT = 5.0

    def __init__(self, coordinator: str, advertise: str, capacity: float, worker_id: str,
                 token: Optional[str] = None, max_message_mb: float = DEFAULT_MAX_MESSAGE_MB):
        self.coordinator = coordinator
        self.advertise = advertise
        self.capacity = capacity
        self.worker_id = worker_id
        self._metadata = auth_metadata(token)
        self._channel = grpc.insecure_channel(coordinator, options=channel_options(max_message_mb))
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
        request = pb.RegisterWorkerRequest(address=self.advertise, capacity=self.capacity, worker_id=self.worker_id)
        try:
            response = self._stub.RegisterWorker(request, timeout=self.CALL_TIMEOUT, metadata=self._metadata)
        except grpc.RpcError as err:
            self._complain(f"cannot register with the coordinator at {self.coordinator}: "
                           f"{err.code().name}: {err.details()}")
            return False
        self.worker_id = response.worker_id or self.worker_id
        if response.heartbeat_seconds > 0:
            self.heartbeat_seconds = response.heartbeat_seconds
        self._last_error = ""
        self.registered.set()
        log.info("registered with %s as %s (%s, capacity %g)", self.coordinator, self.worker_id,
                 self.advertise, self.capacity)
        return True

    def _heartbeat(self) -> None:
        try:
            known = self._stub.Heartbeat(pb.HeartbeatRequest(worker_id=self.worker_id), timeout=self.CALL_TIMEOUT,
                                         metadata=self._metadata).known
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
                self._stub.DeregisterWorker(pb.DeregisterWorkerRequest(worker_id=self.worker_id), timeout=2.0,
                                            metadata=self._metadata)
                log.info("deregistered from %s", self.coordinator)
            except grpc.RpcError as err:
                log.warning("could not deregister from %s: %s", self.coordinator, err.details())
        self._channel.close()


# ---------------------------------------------------------------- configuration and main

@dataclass
class WorkerConfig:
    coordinator: Optional[str] = None
    host: str = "0.0.0.0"
    port: int = 50052
    advertise: Optional[str] = None
    capacity: float = float(os.cpu_count() or 1)
    worker_id: Optional[str] = None
    token: Optional[str] = None
    max_message_mb: float = DEFAULT_MAX_MESSAGE_MB
    max_graphs: int = 64
    threads: int = 8
    grace_seconds: float = 5.0
    log_level: str = "INFO"


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
    add("--token", default=os.environ.get("GRADPOOL_TOKEN") or None,
        help="shared secret: required from callers and sent to the coordinator (env GRADPOOL_TOKEN)")
    add("--max-message-mb", type=float, default=env_default("GRADPOOL_MAX_MESSAGE_MB", DEFAULT_MAX_MESSAGE_MB),
        help="largest gRPC message sent or received, in MB, at most 2047 (env GRADPOOL_MAX_MESSAGE_MB, "
             "default %(default)s)")
    add("--max-graphs", type=int, default=env_default("GRADPOOL_MAX_GRAPHS", 64),
        help="graphs kept in the LRU cache (env GRADPOOL_MAX_GRAPHS, default %(default)s)")
    add("--threads", type=int, default=env_default("GRADPOOL_THREADS", 8),
        help="concurrent RPCs served (env GRADPOOL_THREADS, default %(default)s)")
    add("--grace-seconds", type=float, default=env_default("GRADPOOL_GRACE_SECONDS", 5.0),
        help="on SIGTERM, how long running shards may finish (env GRADPOOL_GRACE_SECONDS, default %(default)s)")
    add("--log-level", default=env_default("GRADPOOL_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper,
        help="log verbosity on stderr (env GRADPOOL_LOG_LEVEL, default %(default)s)")
    args = parser.parse_args(argv)
    if not args.capacity > 0:
        parser.error(f"--capacity must be positive, got {args.capacity}")
    if args.max_graphs < 1 or args.threads < 1:
        parser.error("--max-graphs and --threads must be at least 1")
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
        self.server.stop(grace).wait()


def start(config: WorkerConfig) -> RunningWorker:
    """Start serving (and registering) without blocking."""
    worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="worker-rpc"),
                         options=server_options(config.max_message_mb), interceptors=interceptors(config.token))
    servicer = WorkerServicer(worker_id, config.max_graphs)
    pb_grpc.add_WorkerServicer_to_server(servicer, server)
    health = add_health_and_reflection(server, [pb.DESCRIPTOR.services_by_name["Worker"].full_name])
    port = bind(server, config.host, config.port)
    server.start()
    wildcard = config.host in ("0.0.0.0", "::", "[::]", "")
    advertise = config.advertise or format_address(socket.gethostname() if wildcard else config.host, port)
    link = None
    if config.coordinator:
        link = CoordinatorLink(config.coordinator, advertise, config.capacity, worker_id, config.token,
                               config.max_message_mb)
        link.start()
    return RunningWorker(server, servicer, port, advertise, health, link)


def serve(config: WorkerConfig) -> None:
    """Run a worker until SIGTERM/SIGINT, then leave the pool and stop gracefully."""
    running = start(config)
    announce("worker", config.host, running.port)
    log.info("worker %s serving on port %d, advertised as %s, capacity %g%s", running.servicer.worker_id,
             running.port, running.address, config.capacity,
             f", coordinator {config.coordinator}" if config.coordinator else " (no coordinator: static only)")
    reason = wait_for_shutdown()
    log.info("shutting down (%s)", reason)
    running.stop(config.grace_seconds)


def main(argv: Optional[Sequence[str]] = None, prog: str = "gradpool worker") -> int:
    config = parse_args(argv, prog)
    configure_logging(config.log_level)
    try:
        serve(config)
    except OSError as err:
        log.error("%s", err)
        return 1
    return 0
