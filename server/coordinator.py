"""The gradpool coordinator: graphs in, exact summed gradients out.

Clients register a graph once (checked with the engine's `Program`, cached
by content id) and then send params and a minibatch by graph id. The
coordinator checks the request against the graph, cuts the batch into
contiguous shards in proportion to worker capacity, sends every shard at
once, and folds the shard gradients into an `OrderedSum` as they arrive, so
the result is bitwise the same whatever order the workers answer in.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import grpc
import numpy as np

from gradpool.protos import gradpool_pb2 as pb
from gradpool.protos import gradpool_pb2_grpc as pb_grpc
from gradpool.worker import wire
from gradpool.worker.datasets import Dataset, DatasetStore, assemble, check_indices, indices_from, parsed_chunks
from gradpool.worker.engine import OrderedSum, Program, graph_id
from gradpool.worker.engine.errors import GradpoolError, GraphError, InputError, quoted
from gradpool.worker.observability import (BYTES_IN, BYTES_OUT, DATASET_BYTES, DATASETS, EXAMPLES, GRAPHS,
                                           REQUEST_ID_HEADER, call_context)
from gradpool.worker.engine.tensors import DTYPE_TO_PROTO, EXACT, wire_dtype_field
from gradpool.worker.engine.sharding import MAX_CAPACITY
from gradpool.worker.rpc import (
    CLIENT,
    MISSING_DATASET,
    MISSING_GRAPH,
    NEVER_REFUSED_PREFIXES,
    VERSION,
    WORKER,
    WORKER_METHODS,
    AdmissionInterceptor,
    LruCache,
    RpcFailure,
    add_health_and_reflection,
    add_servicer,
    announce,
    auth_metadata,
    bind,
    channel_options,
    interceptors,
    method_path,
    run_main,
    serve_until_signalled,
    server_options,
    server_threads,
    translate_errors,
    warn_about_tokens,
)
from gradpool.worker.streams import PROTOBUF_LIMIT_BYTES, ArrivingMessage, to_frames

from .config import CoordinatorConfig, parse_args
from .fanout import (
    Batch,
    FanOut,
    GraphRecord,
    Shard,
    ShardFailed,
    plan,
    shard_requests,
)
from .incoming import ArrivingRequest
from .registry import WorkerRegistry

log = logging.getLogger("gradpool.coordinator")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name


class GraphStore:
    """Registered graphs by id: checked once, an LRU bounded by count and by
    bytes (an evicted graph answers NOT_FOUND and the SDK registers it again)."""

    def __init__(self, capacity: int, max_bytes: Optional[int] = None, max_memory: Optional[int] = None):
        self._records: LruCache[GraphRecord] = LruCache(capacity, what="graph", max_bytes=max_bytes)
        self.max_memory = max_memory

    def get(self, key: str) -> Optional[GraphRecord]:
        return self._records.get(key)

    def add_serialized(self, data: bytes) -> GraphRecord:
        """A RegisterGraphRequest's bytes: sizes checked on the wire before protobuf parses them."""
        self._records.fits(len(data))
        graph = wire.parse_checked(pb.RegisterGraphRequest, data, error=GraphError).graph
        return self.add(graph)

    def add(self, graph: pb.Graph) -> GraphRecord:
        key = graph_id(graph)
        record = self.get(key)
        if record is not None:
            return record
        program = Program(graph)  # GraphError/ShardingError -> INVALID_ARGUMENT, the engine's message
        if self.max_memory is not None:
            program.check_fits(self.max_memory)  # CapacityError -> RESOURCE_EXHAUSTED, naming the node
        # The LoadGraph message as bytes, built once (the parsed Graph is not kept).
        load = wire.Parts().bytes_field(1, key.encode()).bytes_field(2, graph.SerializeToString()).join()
        record = GraphRecord(key, program, load)  # type: ignore[arg-type]
        self._records.put(key, record, len(load) + program.footprint)
        log.info("registered graph %s (%s, %d nodes)", key[:12], program.name, len(program.nodes))
        return record

    @property
    def nbytes(self) -> int:
        return self._records.nbytes

    def __len__(self) -> int:
        return len(self._records)


@dataclass
class Totals:
    requests_served: int = 0
    requests_failed: int = 0
    examples_served: int = 0


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """The Coordinator service: graph registry, worker registry, fan-out and reduction."""

    def __init__(self, config: CoordinatorConfig):
        self.config = config
        self.registry = WorkerRegistry(config.lease_seconds, channel_options(config.max_message_mb),
                                       config.worker_tls)
        for address in config.workers:
            self.registry.add_static(address)
        self.graphs = GraphStore(config.max_graphs, int(config.graph_cache_mb * 2**20),
                                 int(config.max_request_memory_mb * 2**20))
        self.datasets = DatasetStore(int(config.dataset_cache_mb * 2**20))
        self.max_stream_bytes = PROTOBUF_LIMIT_BYTES
        self.max_request_memory = int(config.max_request_memory_mb * 2**20)
        # One thread reads each streamed request while its handler plans and sends shards.
        self._stream_readers = futures.ThreadPoolExecutor(config.max_concurrent_requests,
                                                          thread_name_prefix="request-stream")
        self.totals = Totals()
        self._totals_lock = threading.Lock()
        self._metadata = auth_metadata(config.to_workers_token)
        self._started = time.monotonic()
        # Which shards are audited: unpredictable to workers, so a liar cannot
        # tell an audited shard from another.
        self._audit_draw = random.SystemRandom()

    # ------------------------------------------------------------ clients

    @translate_errors
    def RegisterGraph(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Raw bytes in (see `add_servicer`): the graph's sizes are checked on the wire before it is parsed."""
        key = self.graphs.add_serialized(request).graph_id
        self._cache_gauges()
        return pb.RegisterGraphResponse(graph_id=key).SerializeToString()

    # ComputeGradients, Evaluate and their *Stream twins take and return raw
    # bytes (registered so by `add_servicer`): the tensors in them are read in
    # place and forwarded as views, never copied through protobuf objects.

    @translate_errors
    def ComputeGradients(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self._sent(self._compute_gradients(self._received(request), context)).join()

    @translate_errors
    def ComputeGradientsStream(self, request_iterator: Iterator[bytes],
                               context: grpc.ServicerContext) -> Iterator[bytes]:
        return to_frames(self._sent(self._compute_gradients(self._arriving(request_iterator), context)))

    @translate_errors
    def Evaluate(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self._sent(self._evaluate(self._received(request), context)).join()

    @translate_errors
    def EvaluateStream(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        return to_frames(self._sent(self._evaluate(self._arriving(request_iterator, evaluate=True), context)))

    def _arriving(self, frames: Iterator[bytes], evaluate: bool = False) -> "bytes | bytearray | ArrivingRequest":
        """A streamed request: read while it arrives when its sender promised
        the order (incoming.py), else once it is all in."""
        message = ArrivingMessage.start(frames, self.max_stream_bytes, self._stream_readers)
        if not message.header_bytes:
            message.finish()
            return self._received(b"".join(message.pieces(0, message.total)))
        BYTES_IN.labels("coordinator").inc(message.total)
        return ArrivingRequest(message, evaluate)

    @staticmethod
    def _received(data: "bytes | bytearray") -> "bytes | bytearray":
        BYTES_IN.labels("coordinator").inc(len(data))
        return data

    @staticmethod
    def _read(data: "bytes | bytearray | ArrivingRequest", evaluate: bool = False) -> wire.RequestView:
        return data.header() if isinstance(data, ArrivingRequest) else wire.read_request(data, evaluate)

    @staticmethod
    def _sent(parts: wire.Parts) -> wire.Parts:
        BYTES_OUT.labels("coordinator").inc(parts.size)
        return parts

    def _compute_gradients(self, data: "bytes | bytearray | ArrivingRequest",
                           context: grpc.ServicerContext) -> wire.Parts:
        started = time.perf_counter()
        arriving = data if isinstance(data, ArrivingRequest) else None
        request = self._read(data)
        with self._tally() as tally, call_context(request.request_id, request.graph_id) as request_id:
            wire_dtype = wire_dtype_field(request.wire_dtype)
            record = self._graph(request.graph_id)
            program = record.program
            program.signature.check_wire_params(request.params)  # float params may come compact
            seed = program.check_seed(request.seed)  # a graph with dropout needs one
            batch = self._batch(program, request, arriving=arriving)
            program.check_memory(batch.examples, self.max_request_memory)  # before any worker computes
            shards = self._shards(record, request.param_fields, batch, wire_dtype=wire_dtype, seed=seed)
            total = OrderedSum(len(shards))
            with self._fan_out(shards, record, batch, context, request_id,
                               gradient_problem(program, wire_dtype), arriving) as results:
                for shard, response in results:
                    total.add(shard.index, response.loss, self._shard_grads(program, response))
            self._arrived_well(program, request, arriving)
            assert total.grads is not None
            tally.examples = batch.examples
            return wire.gradients_response(total.loss, total.grads, batch.examples, [s.stats() for s in shards],
                                           time.perf_counter() - started, wire_dtype)

    def _evaluate(self, data: "bytes | bytearray | ArrivingRequest", context: grpc.ServicerContext) -> wire.Parts:
        started = time.perf_counter()
        arriving = data if isinstance(data, ArrivingRequest) else None
        request = self._read(data, evaluate=True)
        with self._tally() as tally, call_context(request.request_id, request.graph_id) as request_id:
            record = self._graph(request.graph_id)
            program = record.program
            outputs = request.outputs
            program.check_outputs(outputs)
            needed_inputs, needed_params = program.sources_for(outputs)
            program.signature.check_wire_params(request.params, needed_params)
            batch = self._batch(program, request, needed_inputs, arriving)
            program.check_memory(batch.examples, self.max_request_memory, gradients=False, outputs=outputs)
            shards = self._shards(record, request.param_fields, batch, mode=pb.ShardRequest.FORWARD,
                                  outputs=outputs)
            pieces: list[Optional[wire.ResultView]] = [None] * len(shards)
            with self._fan_out(shards, record, batch, context, request_id,
                               output_problem(program, outputs), arriving) as results:
                for shard, response in results:
                    pieces[shard.index] = response
            self._arrived_well(program, request, arriving, needed_inputs)
            tally.examples = batch.examples
            return wire.evaluate_response(self._concat_outputs(program, outputs, shards, pieces), batch.examples,
                                          [s.stats() for s in shards], time.perf_counter() - started)

    @translate_errors
    def UploadDataset(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """Raw chunks in (see `add_servicer`): each one's sizes are checked on the wire before it is parsed."""
        dataset = assemble(parsed_chunks(request_iterator), self.datasets.max_bytes)
        for evicted in self.datasets.put(dataset):
            log.info("evicted dataset %s (least recently used) to make room", evicted[:12])
        log.info("dataset %s resident (%d examples, %.1f MB)", dataset.dataset_id[:12], dataset.examples,
                 dataset.nbytes / 2**20)
        self._cache_gauges()
        return dataset.info().SerializeToString()

    def _cache_gauges(self) -> None:
        datasets, dataset_bytes = self.datasets.stats()
        DATASETS.labels("coordinator").set(datasets)
        DATASET_BYTES.labels("coordinator").set(dataset_bytes)
        GRAPHS.labels("coordinator").set(len(self.graphs))

    @translate_errors
    def GetDataset(self, request: pb.GetDatasetRequest, context: grpc.ServicerContext) -> pb.DatasetInfo:
        return self._dataset(request.dataset_id).info()

    @translate_errors
    def GetStatus(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        now = time.monotonic()
        with self._totals_lock:
            totals = Totals(**vars(self.totals))
        datasets, dataset_bytes = self.datasets.stats()
        return pb.StatusResponse(workers=[w.info(now) for w in self.registry.all()],
                                 requests_served=totals.requests_served, requests_failed=totals.requests_failed,
                                 examples_served=totals.examples_served, graphs_registered=len(self.graphs),
                                 uptime_seconds=now - self._started, version=VERSION,
                                 datasets_resident=datasets, dataset_bytes=dataset_bytes)

    # ------------------------------------------------------------ workers

    @translate_errors
    def RegisterWorker(self, request: pb.RegisterWorkerRequest,
                       context: grpc.ServicerContext) -> pb.RegisterWorkerResponse:
        address = request.address.strip()
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"worker address {quoted(address)} is not HOST:PORT")
        if not 0 < request.capacity <= MAX_CAPACITY:  # NaN fails too
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"worker capacity must be a number in (0, {MAX_CAPACITY:g}], got {request.capacity}")
        entry = self.registry.register(address, request.capacity, request.worker_id or address, request.lease_secret)
        return pb.RegisterWorkerResponse(worker_id=entry.worker_id, heartbeat_seconds=self.config.heartbeat_seconds,
                                         lease_seconds=self.config.lease_seconds, lease_secret=entry.secret)

    @translate_errors
    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse(known=self.registry.heartbeat(request.worker_id, request.lease_secret))

    @translate_errors
    def DeregisterWorker(self, request: pb.DeregisterWorkerRequest,
                         context: grpc.ServicerContext) -> pb.DeregisterWorkerResponse:
        self.registry.deregister(request.worker_id, request.lease_secret)
        return pb.DeregisterWorkerResponse()

    # ------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def _tally(self) -> Iterator[Totals]:
        """Count the request as served (with its examples) or failed."""
        tally = Totals()
        try:
            yield tally
        except BaseException:
            with self._totals_lock:
                self.totals.requests_failed += 1
            raise
        with self._totals_lock:
            self.totals.requests_served += 1
            self.totals.examples_served += tally.examples
        EXAMPLES.labels("coordinator").inc(tally.examples)

    def _graph(self, key: str) -> GraphRecord:
        record = self.graphs.get(key)
        if record is None:
            raise RpcFailure(grpc.StatusCode.NOT_FOUND, f"graph {quoted(key, 80)} not registered (the coordinator "
                             "may have restarted): register it again", MISSING_GRAPH)
        return record

    def _dataset(self, key: str) -> Dataset:
        dataset = self.datasets.get(key)
        if dataset is None:
            raise RpcFailure(grpc.StatusCode.NOT_FOUND, f"dataset {quoted(key, 80)} is not resident (never "
                             "uploaded, evicted, or the coordinator restarted): upload it again", MISSING_DATASET)
        return dataset

    def _batch(self, program: Program, request: wire.RequestView, required: Optional[set[str]] = None,
               arriving: Optional[ArrivingRequest] = None) -> Batch:
        """The request's examples: inline inputs (checked, bytes kept to slice)
        or rows of a resident dataset (checked against the graph, indices in range).
        A request still arriving has its inputs read up to the last one needed."""
        if arriving is not None:
            request.inputs = arriving.read_inputs(set(program.inputs) if required is None else set(required))
        if request.rows is None:
            examples, inputs = program.signature.check_wire_inputs(request.inputs, required)
            return Batch(examples, inputs=inputs)
        if request.inputs:
            raise InputError("send the batch as inputs or as dataset rows, not both")
        dataset = self._dataset(request.rows.dataset_id)
        program.signature.check_dataset({name: (a.dtype.newbyteorder("="), a.shape)
                                         for name, a in dataset.arrays.items()},
                                        f"{dataset.dataset_id[:12]}", required)
        indices = indices_from(request.rows)
        check_indices(indices, dataset.examples, dataset.dataset_id)
        if not indices.size:
            raise InputError("the batch is empty: send at least one example")
        return Batch(int(indices.size), dataset=dataset, indices=indices)

    def _shards(self, record: GraphRecord, params: Sequence[memoryview], batch: Batch,
                mode: int = pb.ShardRequest.GRADIENTS, outputs: Sequence[str] = (),
                wire_dtype: int = EXACT, seed: Optional[int] = None) -> list[Shard]:
        pool = self.registry.pool()
        if not pool:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE,
                             "no live workers: start one with `gradpool worker --coordinator HOST:PORT`")
        row_bytes = sum(item.row_bytes for item in batch.inputs)  # inline batches only: rows travel
        assignment = plan(pool, batch.examples, row_bytes, int(self.config.max_shard_mb * 2**20))
        requests = shard_requests(record.graph_id, params, batch, [(a, b) for _, a, b in assignment], mode, outputs,
                                  wire_dtype, seed)
        fraction = self.config.audit_fraction
        return [Shard(i, start, stop, make_request, worker,
                      audit=fraction > 0 and self._audit_draw.random() < fraction)
                for i, ((worker, start, stop), make_request) in enumerate(zip(assignment, requests))]

    @staticmethod
    def _arrived_well(program: Program, request: wire.RequestView, arriving: Optional[ArrivingRequest],
                      required: Optional[set[str]] = None) -> None:
        """A streamed request ended as declared, and the inputs that came after
        the ones its shards needed are no unknown or repeated ones."""
        if arriving is None:
            return
        names = [name for name, _ in arriving.finish()]
        if request.rows is not None and names:
            raise InputError("send the batch as inputs or as dataset rows, not both")
        if request.rows is None:
            program.signature.check_names(names, "input", required)

    @contextlib.contextmanager
    def _fan_out(self, shards: list[Shard], record: GraphRecord, batch: Batch,
                 context: grpc.ServicerContext, request_id: str, check: Callable[[Shard, wire.ResultView], str],
                 arriving: Optional[ArrivingRequest] = None) -> Iterator[Iterator[tuple[Shard, wire.ResultView]]]:
        """The shard results as they arrive, under the client's deadline (or
        ours); a failed shard becomes the request's status, and leaving the
        block for any reason cancels what is still running. A request still
        arriving has each shard sent once its rows are in."""
        remaining = context.time_remaining()
        limit = self.config.request_timeout_seconds
        timeout = limit if remaining is None or remaining > limit else remaining
        log.debug("request %s: %d shard(s), %.1fs to go", request_id or "-", len(shards), timeout)
        metadata = self._metadata + (((REQUEST_ID_HEADER, request_id),) if request_id else ())
        arrived_rows = None if arriving is None else functools.partial(arriving.rows, batch.inputs, batch.examples)
        with FanOut(shards, record, self.registry, time.monotonic() + timeout, metadata, batch.dataset,
                    int(self.config.stream_threshold_mb * 2**20), check,
                    result_difference(self.config.audit_tolerance), arrived_rows) as fan:
            if arriving is not None:
                arriving.message.on_progress = fan.wake
            context.add_callback(fan.cancel)  # the client went away
            try:
                yield fan.results()
            except ShardFailed as failure:
                log.warning("request %s failed: %s", request_id or "-", failure)
                raise failure.status() from None
            finally:
                if arriving is not None:  # no cycle (message -> fan -> shards -> message) holds the frames
                    arriving.message.on_progress = lambda: None

    @staticmethod
    def _shard_grads(program: Program, response: wire.ResultView) -> dict:
        """A shard's gradients (`gradient_problem` checked them): read-only views
        of its response or, sent compact, decoded to each param's own dtype, so
        that the sum is in float32/float64, in shard order."""
        tensors = dict(response.grads)
        return {name: tensors[name].values(node.dtype) for name, node in program.params.items()}

    @staticmethod
    def _concat_outputs(program: Program, outputs: list[str], shards: list[Shard],
                        pieces: list[Optional[wire.ResultView]]) -> list[tuple[str, int, tuple, list[memoryview]]]:
        """Each output's rows from every shard (`output_problem` checked them), joined as raw bytes when sent."""
        joined = []
        for name in outputs:
            node = program.node(name)
            datas = [dict(response.outputs)[name].data for response in pieces if response is not None]
            rows = sum(s.examples for s in shards)
            joined.append((name, DTYPE_TO_PROTO[node.dtype], (rows, *node.shape[1:]), datas))
        return joined


def gradient_problem(program: Program, wire_dtype: int = EXACT) -> Callable[[Shard, wire.ResultView], str]:
    """What is wrong with a shard's gradients ("" when nothing): names, shapes and
    dtypes (or the compact encoding asked for) against the graph's params,
    before anything enters the sum."""
    def check(shard: Shard, response: wire.ResultView) -> str:
        try:
            grads = wire.named_map(response.grads, "gradient")
        except GradpoolError as err:
            return str(err)
        if set(grads) != set(program.params):
            return f"gradients for {quoted(sorted(grads))}, not the graph's params {quoted(sorted(program.params))}"
        for name, node in program.params.items():
            tensor = grads[name]
            if (tensor.shape != node.shape or tensor.compact != wire_dtype
                    or (not wire_dtype and tensor.dtype != node.dtype)):
                return f"gradient {quoted(name)} as {tensor.shape} of {tensor.dtype}"
        return ""
    return check


def output_problem(program: Program, outputs: Sequence[str]) -> Callable[[Shard, wire.ResultView], str]:
    """What is wrong with a shard's forward outputs ("" when nothing)."""
    def check(shard: Shard, response: wire.ResultView) -> str:
        try:
            given = wire.named_map(response.outputs, "output")
        except GradpoolError as err:
            return str(err)
        for name in outputs:
            node, tensor = program.node(name), given.get(name)
            if tensor is None:
                return f"no value for {quoted(name)}"
            if tensor.dtype != node.dtype or tensor.shape != (shard.examples, *node.shape[1:]):
                return f"{quoted(name)} as {tensor.shape} of {tensor.dtype}"
        return ""
    return check


def result_difference(tolerance: float = 0.0) -> Callable[[wire.ResultView, wire.ResultView], str]:
    """How two results of one shard differ ("" when they agree), for the audit:
    loss, gradients and outputs bitwise (`tolerance` 0), or elementwise within
    |a - b| <= tolerance * (1 + max(|a|, |b|)), NaN matching NaN. Both were
    checked against the graph (`gradient_problem`, `output_problem`) first."""
    def mismatches(a: wire.TensorView, b: wire.TensorView) -> str:
        if not tolerance:
            x, y = np.frombuffer(a.data, np.uint8), np.frombuffer(b.data, np.uint8)
            return "" if np.array_equal(x, y) else f"{np.count_nonzero(x != y)} of {x.size} bytes differ"
        x, y = (np.asarray(t.values(np.dtype(np.float64)), dtype=np.float64) for t in (a, b))
        return _beyond(x, y, tolerance)

    def compare(first: wire.ResultView, second: wire.ResultView) -> str:
        x, y = np.array([first.loss]), np.array([second.loss])
        if (x.tobytes() != y.tobytes()) if not tolerance else _beyond(x, y, tolerance):
            return f"loss {first.loss!r} vs {second.loss!r}"
        for kind, mine, theirs in (("gradient", first.grads, second.grads),
                                   ("output", first.outputs, second.outputs)):
            others = dict(theirs)
            if len(others) != len(mine):
                return f"{len(mine)} vs {len(others)} {kind}s"
            for name, tensor in mine:
                other = others.get(name)
                if other is None or other.shape != tensor.shape or other.proto_dtype != tensor.proto_dtype:
                    return f"{kind} {quoted(name)} missing or of another shape or dtype"
                problem = mismatches(tensor, other)
                if problem:
                    return f"{kind} {quoted(name)}: {problem}"
        return ""
    return compare


def _beyond(x: np.ndarray, y: np.ndarray, tolerance: float) -> str:
    """Which elements of x and y differ by more than the audit's tolerance ("" when none)."""
    with np.errstate(invalid="ignore", over="ignore"):
        close = np.abs(x - y) <= tolerance * (1 + np.maximum(np.abs(x), np.abs(y)))
    count = np.count_nonzero(~(close | (np.isnan(x) & np.isnan(y))))
    return f"{count} of {x.size} elements differ by more than {tolerance:g}" if count else ""


class Maintenance:
    """Background upkeep: drop lapsed leases, probe unreachable static workers."""

    def __init__(self, registry: WorkerRegistry, period: float, metadata: tuple[tuple[str, str], ...]):
        self._registry = registry
        self._period = period
        self._metadata = metadata
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maintenance", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self._registry.expire()
                self._registry.publish()
                for entry in self._registry.unreachable_static():
                    try:
                        entry.stub.GetWorkerStatus(pb.WorkerStatusRequest(), timeout=1.0, metadata=self._metadata)
                    except grpc.RpcError:
                        continue
                    except ValueError:  # channel closed under us
                        continue
                    log.info("static worker %s is reachable again", entry.describe())
                    self._registry.mark_reachable(entry)
            except Exception:  # keep the upkeep alive whatever happens
                log.exception("maintenance pass failed")


@dataclass
class RunningCoordinator:
    server: grpc.Server
    servicer: CoordinatorServicer
    port: int
    health: object
    maintenance: Maintenance

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking requests, let running ones finish, then close worker channels."""
        self.health.enter_graceful_shutdown()  # type: ignore[attr-defined]
        self.server.stop(grace).wait()
        self.maintenance.stop()
        self.servicer.registry.close()


def start(config: CoordinatorConfig) -> RunningCoordinator:
    """Start serving without blocking."""
    pool_upkeep = tuple(method_path("Coordinator", name) for name in WORKER_METHODS)
    admission = AdmissionInterceptor(config.max_concurrent_requests, pool_upkeep + NEVER_REFUSED_PREFIXES)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=server_threads(config.threads,
                                                                               config.max_concurrent_requests),
                                                    thread_name_prefix="coordinator"),
                         options=server_options(config.max_message_mb),
                         interceptors=interceptors({CLIENT: config.token, WORKER: config.worker_token}) + [admission])
    servicer = CoordinatorServicer(config)
    add_servicer(server, servicer, "Coordinator",
                 raw=("RegisterGraph", "ComputeGradients", "ComputeGradientsStream", "Evaluate", "EvaluateStream",
                      "UploadDataset"))
    health = add_health_and_reflection(server, [SERVICE_NAME])
    port = bind(server, config.host, config.port, config.tls)
    server.start()
    maintenance = Maintenance(servicer.registry, min(config.heartbeat_seconds, config.lease_seconds / 4),
                              auth_metadata(config.to_workers_token))
    maintenance.start()
    return RunningCoordinator(server, servicer, port, health, maintenance)


def serve(config: CoordinatorConfig) -> None:
    """Run the coordinator until SIGTERM/SIGINT, then stop gracefully."""
    warn_about_tokens({CLIENT: config.token, WORKER: config.worker_token}, log)
    running = start(config)
    announce("coordinator", config.host, running.port)
    tokens = "client and worker tokens" if config.token or config.worker_token else "no tokens"
    tls = ("mTLS" if config.mtls else "TLS") if config.tls_cert else "plaintext"
    log.info("coordinator %s serving on port %d (heartbeat %.3gs, lease %.3gs, messages up to %g MB, %s, %s)",
             VERSION, running.port, config.heartbeat_seconds, config.lease_seconds, config.max_message_mb, tls,
             tokens)
    serve_until_signalled(running, config.grace_seconds, log)


def main(argv: Optional[Sequence[str]] = None, prog: str = "gradpool coordinator") -> int:
    config = parse_args(argv, prog)
    return run_main(serve, config, log)
