"""One request's shards: planned, sliced, sent to workers concurrently, and
handed back one by one as they arrive.

Per shard, the retry decision lives in one place (`FanOut._retry`): today a
worker that lost the graph (NOT_FOUND: restarted or evicted it) is sent the
graph again and the shard retried there, invisibly to the client; every
other failure ends the request with a status naming the worker and shard.
Retrying a failed shard on another live worker slots into `_retry` by
setting `shard.worker` before re-dispatching: the shard's request bytes do
not depend on the worker.
"""

from __future__ import annotations

import concurrent.futures
import queue
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import grpc
import numpy as np

from gradpool.protos import gradpool_pb2 as pb
from gradpool.worker import wire
from gradpool.worker.datasets import Dataset
from gradpool.worker.engine import GradpoolError, Program, shard_bounds
from gradpool.worker.engine.signature import WireInput
from gradpool.worker.engine.tensors import fill_tensor
from gradpool.worker.rpc import MISSING_DATASET, RpcFailure, rpc_error_kind
from gradpool.worker.streams import PROTOBUF_LIMIT_BYTES, STREAM_THRESHOLD_BYTES, StreamedCall
from gradpool.worker.wire import Parts

from .registry import WorkerEntry, WorkerRegistry

# Including the first: one NOT_FOUND -> LoadGraph -> retry cycle, plus one
# in case the worker evicted the graph again in between.
MAX_ATTEMPTS = 3
# Streamed shards block a thread each for their transfer (unary ones do not).
STREAM_EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="shard-stream")


@dataclass(frozen=True)
class GraphRecord:
    """A registered graph: checked once, and its LoadGraph message built once."""
    graph_id: str
    program: Program
    load_request: pb.LoadGraphRequest


@dataclass
class Batch:
    """A request's examples: inline inputs' bytes, or indices into a resident dataset."""
    examples: int
    inputs: Sequence[WireInput] = ()
    dataset: Optional[Dataset] = None
    indices: Optional[np.ndarray] = None


@dataclass(eq=False)
class Shard:
    index: int
    start: int
    stop: int
    request: Parts  # a ShardRequest, worker-independent (views of the client's bytes)
    worker: WorkerEntry
    attempts: int = 0
    first_sent: float = 0.0
    seconds: float = 0.0

    @property
    def examples(self) -> int:
        return self.stop - self.start

    def describe(self) -> str:
        return f"worker {self.worker.describe()} on shard {self.index} (examples {self.start}:{self.stop})"

    def stats(self) -> pb.ShardStats:
        return pb.ShardStats(worker=self.worker.describe(), start=self.start, examples=self.examples,
                             seconds=self.seconds, attempts=self.attempts)


class ShardFailed(Exception):
    """A shard could not be computed; says where and why."""

    def __init__(self, shard: Shard, code: grpc.StatusCode, details: str, kind: str = ""):
        super().__init__(f"{shard.describe()}: {code.name}: {details}")
        self.shard, self.code, self.details, self.kind = shard, code, details, kind

    def status(self) -> RpcFailure:
        """The status the client sees: worker and shard named, the worker's message kept."""
        where = self.shard.describe()
        if self.code == grpc.StatusCode.INVALID_ARGUMENT:
            return RpcFailure(self.code, f"{where} rejected the input: {self.details}", self.kind)
        if self.code == grpc.StatusCode.UNAVAILABLE:
            return RpcFailure(self.code, f"{where} is unreachable: {self.details}")
        if self.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                         grpc.StatusCode.RESOURCE_EXHAUSTED):
            return RpcFailure(self.code, f"{where}: {self.details}")
        # The worker's own status (NOT_FOUND twice, UNAUTHENTICATED: a token
        # mismatch between coordinator and worker, INTERNAL) is the service's
        # fault, not the client's.
        return RpcFailure(grpc.StatusCode.INTERNAL, f"{where} failed with {self.code.name}: {self.details}")


def plan(pool: Sequence[WorkerEntry], examples: int) -> list[tuple[WorkerEntry, int, int]]:
    """(worker, start, stop) per shard: `shard_bounds` by capacity.

    `shard_bounds` drops empty shards (fewer examples than workers); the
    shards then go to the fastest workers (ties: pool order), kept in pool
    order. A batch with no examples still gets one (empty) shard, as in
    `local_gradients`.
    """
    bounds = shard_bounds(examples, [w.capacity for w in pool]) or [(0, examples)]
    if len(bounds) < len(pool):
        fastest = sorted(range(len(pool)), key=lambda i: (-pool[i].capacity, i))[: len(bounds)]
        pool = [pool[i] for i in sorted(fastest)]
    return [(worker, start, stop) for worker, (start, stop) in zip(pool, bounds)]


def shard_requests(graph_id: str, param_fields: Sequence[memoryview], batch: Batch,
                   bounds: Sequence[tuple[int, int]], mode: int = pb.ShardRequest.GRADIENTS,
                   outputs: Sequence[str] = (), wire_dtype: int = pb.DTYPE_UNSPECIFIED) -> list[Parts]:
    """One ShardRequest per (start, stop), none of them copying a tensor yet:
    inline inputs are cut by row stride from the client's bytes, params are the
    client's own fields (compact or not, as they came), and a resident
    dataset's shard is its slice of the indices. The bytes are joined once,
    when a shard is sent. `wire_dtype`: the encoding the gradients come back in."""
    requests = []
    for index, (start, stop) in enumerate(bounds):
        header = pb.ShardRequest(graph_id=graph_id, global_batch=batch.examples,
                                 include_batch_independent=index == 0, mode=mode, outputs=outputs,
                                 wire_dtype=wire_dtype)
        if batch.dataset is not None:
            assert batch.indices is not None
            header.rows.dataset_id = batch.dataset.dataset_id
            fill_tensor(header.rows.indices, batch.indices[start:stop])
        requests.append(wire.shard_request(header, batch.inputs, (start, stop), param_fields))
    return requests


@dataclass(eq=False)
class FanOut:
    """Runs shards concurrently (one RunShard future each) under one deadline.

    Use as a context manager: leaving it cancels whatever is still running
    (a failed shard, the client gone, an exception in the caller).
    """

    shards: Sequence[Shard]
    graph: GraphRecord
    registry: WorkerRegistry
    deadline: float  # time.monotonic()
    metadata: tuple[tuple[str, str], ...] = ()
    dataset: Optional[Dataset] = None
    stream_threshold: int = STREAM_THRESHOLD_BYTES
    _done: "queue.SimpleQueue[tuple[Shard, grpc.Future]]" = field(default_factory=queue.SimpleQueue)
    _futures: dict[int, grpc.Future] = field(default_factory=dict)

    def __enter__(self) -> "FanOut":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def cancel(self) -> None:
        for future in list(self._futures.values()):
            future.cancel()

    def results(self) -> Iterator[tuple[Shard, wire.ResultView]]:
        """(shard, response) in arrival order; raises ShardFailed on the first failure."""
        for shard in self.shards:
            shard.first_sent = time.perf_counter()
            self._dispatch(shard)
        pending = len(self.shards)
        while pending:
            shard, future = self._next_done()
            try:
                response = future.result()
            except (grpc.RpcError, grpc.FutureCancelledError, concurrent.futures.CancelledError) as err:
                code = err.code() if isinstance(err, grpc.RpcError) else grpc.StatusCode.CANCELLED
                details = err.details() if isinstance(err, grpc.RpcError) else "cancelled"
                kind = rpc_error_kind(err) if isinstance(err, grpc.RpcError) else ""
                self._retry(shard, code, details or "", kind)
                continue
            if not isinstance(response, wire.ResultView):  # a unary call's raw bytes
                try:
                    response = wire.read_shard_response(response)
                except GradpoolError as err:
                    self._failed(shard, grpc.StatusCode.INTERNAL, f"sent a malformed response: {err}")
            del self._futures[shard.index]
            shard.request = wire.Parts()  # kept only for retries: let go of the views now
            shard.seconds = time.perf_counter() - shard.first_sent
            shard.worker.served(shard.examples)
            pending -= 1
            yield shard, response

    def _remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _next_done(self) -> tuple[Shard, grpc.Future]:
        # Every future carries the deadline, so this wait is a safety net.
        try:
            return self._done.get(timeout=max(0.0, self._remaining()) + 5.0)
        except queue.Empty:
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded waiting for workers") from None

    def _retry(self, shard: Shard, code: grpc.StatusCode, details: str, kind: str = "") -> None:
        """Send the shard again where that can help; otherwise fail the request."""
        if code == grpc.StatusCode.NOT_FOUND and shard.attempts < MAX_ATTEMPTS:
            if kind == MISSING_DATASET and self.dataset is not None:
                shard.worker.forget_dataset(self.dataset.dataset_id)
            else:
                shard.worker.forget_graph(self.graph.graph_id)
            self._dispatch(shard)
            return
        self._failed(shard, code, details, kind)

    def _failed(self, shard: Shard, code: grpc.StatusCode, details: str, kind: str = "") -> None:
        shard.worker.failed()
        if code == grpc.StatusCode.UNAVAILABLE:
            self.registry.mark_unreachable(shard.worker, details)
        raise ShardFailed(shard, code, details, kind)

    def _dispatch(self, shard: Shard) -> None:
        remaining = self._remaining()
        if remaining <= 0:
            raise ShardFailed(shard, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the shard was sent")
        worker = shard.worker
        self._ensure_graph(shard, remaining)
        self._ensure_dataset(shard)
        shard.attempts += 1
        worker.acquire()
        try:
            if shard.request.size > self.stream_threshold:
                future = StreamedCall.start(STREAM_EXECUTOR, worker.run_shard_stream, shard.request,
                                            wire.read_shard_response, PROTOBUF_LIMIT_BYTES,
                                            timeout=self._remaining(), metadata=self.metadata)
            else:
                future = worker.run_shard.future(shard.request.join(), timeout=self._remaining(),
                                                 metadata=self.metadata)
        except ValueError:  # the channel closed: the worker left the pool just now
            worker.release()
            self._failed(shard, grpc.StatusCode.UNAVAILABLE, "the worker left the pool")
            return
        self._futures[shard.index] = future

        def on_done(done: grpc.Future) -> None:
            worker.release()
            self._done.put((shard, done))

        future.add_done_callback(on_done)

    def _ensure_graph(self, shard: Shard, remaining: float) -> None:
        """LoadGraph once per worker and graph (a 1,000-step loop sends it once)."""
        worker, key = shard.worker, self.graph.graph_id
        if worker.has_graph(key):
            return
        with worker.load_lock:
            if worker.has_graph(key):
                return
            worker.acquire()
            try:
                worker.stub.LoadGraph(self.graph.load_request, timeout=remaining, metadata=self.metadata)
            except grpc.RpcError as err:
                self._failed(shard, err.code(), f"sending graph {key[:12]}: {err.details()}")
            except ValueError:
                self._failed(shard, grpc.StatusCode.UNAVAILABLE, "the worker left the pool")
            finally:
                worker.release()
            worker.graph_sent(key)

    def _ensure_dataset(self, shard: Shard) -> None:
        """LoadDataset once per worker and dataset, streamed from the coordinator's copy."""
        worker, dataset = shard.worker, self.dataset
        if dataset is None or worker.has_dataset(dataset.dataset_id):
            return
        with worker.load_lock:
            if worker.has_dataset(dataset.dataset_id):
                return
            worker.acquire()
            try:
                worker.stub.LoadDataset(dataset.chunks(), timeout=max(0.0, self._remaining()),
                                        metadata=self.metadata)
            except grpc.RpcError as err:
                self._failed(shard, err.code(), f"sending dataset {dataset.dataset_id[:12]}: {err.details()}")
            except ValueError:
                self._failed(shard, grpc.StatusCode.UNAVAILABLE, "the worker left the pool")
            finally:
                worker.release()
            worker.dataset_sent(dataset.dataset_id)
