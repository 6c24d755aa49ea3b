"""One request's shards: planned, sliced, sent to workers concurrently, and
handed back one by one as they arrive; a failed or straggling shard costs a
shard, never the request.

A shard's bytes do not depend on the worker, so it can run anywhere. Every
failure is decided in one place (`FanOut._on_failure`):

* the worker lost the graph or the dataset (NOT_FOUND): send it, retry there;
* the worker is gone, hung, draining, busy or answered nonsense (UNAVAILABLE,
  CANCELLED by its side, RESOURCE_EXHAUSTED, INTERNAL, UNKNOWN, a malformed
  response, its lease lapsed): retry the same bytes on another live worker,
  at most MAX_WORKERS_PER_SHARD workers per shard;
* the input is wrong (INVALID_ARGUMENT) or the deadline passed: fail the
  request, naming the worker and shard.

Stragglers are hedged (`FanOut._hedge_stragglers`): a shard running longer
than HEDGE_FACTOR x its slowest finished sibling and at least HEDGE_FLOOR
seconds gets a copy on a free worker; the first answer wins and the other is
cancelled. The straggler is marked suspect until it next finishes a shard.
Results are reduced in shard order by the caller, whoever computed them.

Audit (`--audit-fraction`; `FanOut._verify`): a shard drawn for audit is,
once its result is in, sent again (the same bytes) to a live worker that has
not run it, and the two results are compared (`compare`: bitwise, or within
`--audit-tolerance`). Agreeing, the first is used. Disagreeing, a third
worker breaks the tie: the worker outvoted is quarantined (registry.py) and
the majority's result used. With no third worker, or three different
answers, the request fails with DATA_LOSS naming the workers: one of them
is wrong and there is no telling which, so no result is better than a
possibly wrong one; nobody is quarantined. A shard with no second live
worker to audit it is served unaudited (counted as skipped).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import queue
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import grpc
import numpy as np

from gradpool.protos import gradpool_pb2 as pb
from gradpool.worker import wire
from gradpool.worker.datasets import Dataset
from gradpool.worker.engine import GradpoolError, Program, shard_bounds
from gradpool.worker.engine.signature import WireInput
from gradpool.worker.engine.tensors import fill_tensor
from gradpool.worker.observability import SHARD_SECONDS, SHARDS_AUDITED, SHARDS_HEDGED, SHARDS_RETRIED
from gradpool.worker.rpc import MISSING_DATASET, RpcFailure, rpc_error_kind
from gradpool.worker.streams import PROTOBUF_LIMIT_BYTES, STREAM_THRESHOLD_BYTES, StreamedCall
from gradpool.worker.wire import Parts

from .registry import WorkerEntry, WorkerRegistry

log = logging.getLogger("gradpool.coordinator")

# Including the first: one NOT_FOUND -> LoadGraph -> retry cycle, plus one
# in case the worker evicted the graph again in between.
MAX_ATTEMPTS = 3
# Different workers one shard may be sent to (failures and hedges together).
MAX_WORKERS_PER_SHARD = 4
# Hedging: a shard running longer than HEDGE_FACTOR x its slowest finished
# sibling, and at least HEDGE_FLOOR seconds, gets a copy on a free worker.
HEDGE_FACTOR = 2.0
HEDGE_FLOOR = 1.0
# Codes that say "this worker cannot do it now", not "this request is wrong".
WORKER_FAILURES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                   grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED,
                   grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.DATA_LOSS)
# Put in the queue of finished attempts when more of a streamed request arrived.
WAKE: tuple = ("more rows arrived",)
# Streamed shards block a thread each for their transfer (unary ones do not).
STREAM_EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="shard-stream")


@dataclass(frozen=True)
class GraphRecord:
    """A registered graph: checked once, and its LoadGraph message serialized once
    (workers take LoadGraph as raw bytes, checked before they parse it)."""
    graph_id: str
    program: Program
    load_request: bytes


@dataclass
class Batch:
    """A request's examples: inline inputs' bytes, or indices into a resident dataset."""
    examples: int
    inputs: Sequence[WireInput] = ()
    dataset: Optional[Dataset] = None
    indices: Optional[np.ndarray] = None


@dataclass(eq=False)
class Attempt:
    """One send of a shard to one worker."""
    worker: WorkerEntry
    started: float
    future: Optional[object] = None  # grpc.Future or StreamedCall
    hedge: bool = False
    phase: int = 0  # the shard's phase when sent (see Shard.phase): a late answer of an earlier one is dropped


@dataclass(eq=False)
class Shard:
    index: int
    start: int
    stop: int
    # Its ShardRequest, worker-independent (views of the client's bytes), made
    # when first sent: a streamed request's rows may not be in before.
    make_request: Callable[[], Parts]
    worker: WorkerEntry  # where it runs now; at the end, who served it
    request: Optional[Parts] = None
    attempts: int = 0  # sends, to any worker
    first_sent: float = 0.0
    seconds: float = 0.0
    running: list[Attempt] = field(default_factory=list)
    tried: list[WorkerEntry] = field(default_factory=list)  # workers it was sent to
    done: bool = False
    audit: bool = False  # drawn for audit: run twice (three times on disagreement) and compared
    phase: int = 0  # 0: computing; 1: the audit copy; 2: the tiebreak
    results: list[tuple[WorkerEntry, wire.ResultView]] = field(default_factory=list)  # audited shards' results

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
        if self.code == grpc.StatusCode.DATA_LOSS:  # the audit could not tell a right result from a wrong one
            return RpcFailure(self.code, f"shard {self.shard.index} (examples {self.shard.start}:{self.shard.stop}): "
                              f"{self.details}")
        if self.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                         grpc.StatusCode.RESOURCE_EXHAUSTED):
            return RpcFailure(self.code, f"{where}: {self.details}")
        # The worker's own status (NOT_FOUND twice, UNAUTHENTICATED: a token
        # mismatch between coordinator and worker, INTERNAL) is the service's
        # fault, not the client's.
        return RpcFailure(grpc.StatusCode.INTERNAL, f"{where} failed with {self.code.name}: {self.details}")


def plan(pool: Sequence[WorkerEntry], examples: int, row_bytes: int = 0,
         max_shard_bytes: int = 0) -> list[tuple[WorkerEntry, int, int]]:
    """(worker, start, stop) per shard: `shard_bounds` by capacity.

    `shard_bounds` drops empty shards (fewer examples than workers); the
    shards then go to the fastest workers (ties: pool order), kept in pool
    order. A batch with no examples still gets one (empty) shard, as in
    `local_gradients`. With `max_shard_bytes`, a worker whose share of the
    inline batch is larger gets it as several consecutive shards of at most
    that size (pipelining: the next transfers while the first computes); the
    plan still depends only on the pool and the batch, so it is reproducible.
    """
    bounds = shard_bounds(examples, [w.capacity for w in pool]) or [(0, examples)]
    if len(bounds) < len(pool):
        fastest = sorted(range(len(pool)), key=lambda i: (-pool[i].capacity, i))[: len(bounds)]
        pool = [pool[i] for i in sorted(fastest)]
    shards = []
    for worker, (start, stop) in zip(pool, bounds):
        pieces = -(-(stop - start) * row_bytes // max_shard_bytes) if max_shard_bytes and row_bytes else 1
        for a, b in shard_bounds(stop - start, [1.0] * max(1, pieces)) or [(0, stop - start)]:
            shards.append((worker, start + a, start + b))
    return shards


def shard_requests(graph_id: str, param_fields: Sequence[memoryview], batch: Batch,
                   bounds: Sequence[tuple[int, int]], mode: int = pb.ShardRequest.GRADIENTS,
                   outputs: Sequence[str] = (), wire_dtype: int = pb.DTYPE_UNSPECIFIED,
                   seed: Optional[int] = None) -> list[Callable[[], Parts]]:
    """Makers of one ShardRequest per (start, stop), none of them copying a
    tensor: inline inputs are cut by row stride from the client's bytes (once
    the shard's rows are in, for a streamed request), params are the client's
    own fields (compact or not, as they came), and a resident dataset's shard
    is its slice of the indices. The bytes are joined once, when a shard is
    sent. `wire_dtype`: the encoding the gradients come back in. Every shard
    carries the request's `seed` and its `start` as its example offset, so a
    retried or pipelined shard draws its own examples' masks."""
    requests = []
    for index, (start, stop) in enumerate(bounds):
        header = pb.ShardRequest(graph_id=graph_id, global_batch=batch.examples,
                                 include_batch_independent=index == 0, mode=mode, outputs=outputs,
                                 wire_dtype=wire_dtype, example_offset=start)
        if seed is not None:
            header.seed = seed
        if batch.dataset is not None:
            assert batch.indices is not None
            header.rows.dataset_id = batch.dataset.dataset_id
            fill_tensor(header.rows.indices, batch.indices[start:stop])
        requests.append(functools.partial(wire.shard_request, header, batch.inputs, (start, stop), param_fields))
    return requests


@dataclass(eq=False)
class FanOut:
    """Runs shards concurrently under one deadline, retrying and hedging them
    on other workers as needed (see the module docstring).

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
    # What is wrong with a response ("" when nothing): a wrong one counts as
    # its worker's failure, and the shard is retried elsewhere.
    check: Callable[[Shard, wire.ResultView], str] = lambda shard, response: ""
    # How two results of an audited shard differ ("" when they agree).
    compare: Callable[[wire.ResultView, wire.ResultView], str] = lambda a, b: ""
    # How many of the batch's first rows are in (a streamed request still
    # arriving; `wake` when more come): a shard is sent once all its rows
    # are. None: all are in.
    arrived_rows: Optional[Callable[[], int]] = None
    _done: "queue.SimpleQueue[tuple]" = field(default_factory=queue.SimpleQueue)
    _finished_seconds: list[float] = field(default_factory=list)
    _cancelled: bool = False

    def __enter__(self) -> "FanOut":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()
        # Let go of the request's bytes now: the shards stay reachable from the
        # calls' callbacks (a cycle) until the garbage collector runs.
        for shard in self.shards:
            shard.request, shard.make_request = None, wire.Parts
        self.arrived_rows = None

    def cancel(self) -> None:
        self._cancelled = True  # the caller left, or the request failed: no more retries
        for shard in self.shards:
            for attempt in list(shard.running):
                if attempt.future is not None:
                    attempt.future.cancel()  # type: ignore[attr-defined]

    def wake(self) -> None:
        """More rows arrived (called from the thread reading the request)."""
        self._done.put(WAKE)

    def results(self) -> Iterator[tuple[Shard, wire.ResultView]]:
        """(shard, response) in arrival order, each shard once; raises ShardFailed
        when a shard cannot be computed anywhere."""
        unsent = list(self.shards)
        self._send_arrived(unsent)
        pending = len(self.shards)
        while pending:
            item = self._next_done()
            if item is WAKE:
                self._send_arrived(unsent)
                continue
            if item is None:  # no answer for a while: look for stragglers and workers gone
                self._hedge_stragglers()
                continue
            shard, attempt = item
            if attempt in shard.running:
                shard.running.remove(attempt)
            if shard.done or attempt.phase != shard.phase:
                continue  # a hedge's twin answered first; this one was cancelled
            response = self._response(shard, attempt)
            if response is None:
                continue  # retried, or still running elsewhere
            for other in shard.running:  # the losing hedge
                other.future.cancel()  # type: ignore[union-attr]
            shard.running.clear()
            self._finished_seconds.append(time.monotonic() - attempt.started)
            SHARD_SECONDS.observe(self._finished_seconds[-1])
            attempt.worker.served(shard.examples)
            verified = self._verify(shard, attempt.worker, response)
            if verified is None:
                continue  # sent to another worker to check it
            shard.done = True
            shard.worker, response = verified
            shard.request = wire.Parts()  # kept only for retries and audits: let go of the views now
            shard.seconds = time.perf_counter() - shard.first_sent
            pending -= 1
            yield shard, response

    def _send_arrived(self, unsent: list[Shard]) -> None:
        """Send, in order, the shards whose rows are all in."""
        rows = self.arrived_rows() if unsent and self.arrived_rows is not None else None
        while unsent and (rows is None or unsent[0].stop <= rows):
            shard = unsent.pop(0)
            shard.first_sent = time.perf_counter()
            self._send(shard, shard.worker)

    def _response(self, shard: Shard, attempt: Attempt) -> Optional[wire.ResultView]:
        """The attempt's checked response, or None after handling its failure."""
        future = attempt.future
        try:
            response = future.result()  # type: ignore[union-attr]
        except (grpc.RpcError, grpc.FutureCancelledError, concurrent.futures.CancelledError) as err:
            if isinstance(err, grpc.RpcError):
                self._on_failure(shard, attempt, err.code(), err.details() or "", rpc_error_kind(err))
            else:
                self._on_failure(shard, attempt, grpc.StatusCode.CANCELLED, "cancelled")
            return None
        except GradpoolError as err:  # a streamed response that does not parse
            self._on_failure(shard, attempt, grpc.StatusCode.INTERNAL, f"sent a malformed response: {err}")
            return None
        if not isinstance(response, wire.ResultView):  # a unary call's raw bytes
            try:
                response = wire.read_shard_response(response)
            except GradpoolError as err:
                self._on_failure(shard, attempt, grpc.StatusCode.INTERNAL, f"sent a malformed response: {err}")
                return None
        problem = (f"reported {response.examples} examples for {shard.examples}"
                   if response.examples != shard.examples else self.check(shard, response))
        if problem:
            self._on_failure(shard, attempt, grpc.StatusCode.INTERNAL, f"sent a wrong response: {problem}")
            return None
        return response

    def _verify(self, shard: Shard, worker: WorkerEntry,
                response: wire.ResultView) -> Optional[tuple[WorkerEntry, wire.ResultView]]:
        """The shard's verified (worker, result), or None after sending it to
        another worker to check (see the module docstring)."""
        if not shard.audit:
            return worker, response
        shard.results.append((worker, response))
        if len(shard.results) == 1:
            auditor = self._free_worker(shard)
            if auditor is None:
                SHARDS_AUDITED.labels("skipped").inc()
                log.debug("shard %d: no other live worker to audit %s", shard.index, worker.describe())
                return worker, response
            shard.phase = 1
            self._send(shard, auditor)
            return None
        (first, first_result), (second, second_result) = shard.results[:2]
        if len(shard.results) == 2:
            problem = self.compare(first_result, second_result)
            if not problem:
                SHARDS_AUDITED.labels("agreed").inc()
                return first, first_result
            SHARDS_AUDITED.labels("disagreed").inc()
            referee = self._free_worker(shard)
            log.warning("shard %d (examples %d:%d): audit: %s and %s disagree (%s); %s", shard.index, shard.start,
                        shard.stop, first.describe(), second.describe(), problem,
                        f"breaking the tie on {referee.describe()}" if referee else "no third worker to break the tie")
            if referee is None:
                raise ShardFailed(shard, grpc.StatusCode.DATA_LOSS,
                                  f"audit: workers {first.describe()} and {second.describe()} computed different "
                                  f"results ({problem}) and no third live worker can break the tie; no result is "
                                  "returned rather than a possibly wrong one")
            shard.phase = 2
            self._send(shard, referee)
            return None
        referee, referee_result = shard.results[2]
        first_agrees = not self.compare(first_result, referee_result)
        second_agrees = not self.compare(second_result, referee_result)
        if first_agrees and second_agrees:  # only with a tolerance: the referee is between the two
            log.warning("shard %d: the tiebreak on %s agrees with both; nobody quarantined", shard.index,
                        referee.describe())
            return first, first_result
        for agrees, (right, result), wrong in ((first_agrees, (first, first_result), second),
                                               (second_agrees, (second, second_result), first)):
            if agrees:
                self.registry.quarantine(wrong, f"its result for shard {shard.index} (examples {shard.start}:"
                                         f"{shard.stop}) differs from those of {right.describe()} and "
                                         f"{referee.describe()}")
                return right, result
        raise ShardFailed(shard, grpc.StatusCode.DATA_LOSS,
                          f"audit: workers {first.describe()}, {second.describe()} and {referee.describe()} computed "
                          "three different results; no result is returned rather than a possibly wrong one (a "
                          "nonzero --audit-tolerance suits workers that differ in hardware or libraries)")

    def _on_failure(self, shard: Shard, attempt: Attempt, code: grpc.StatusCode, details: str,
                    kind: str = "") -> None:
        """The one place a failed attempt is decided: resend, retry elsewhere, or fail."""
        worker = attempt.worker
        if shard.running:  # a hedge of this shard is still running: let it finish
            worker.failed()
            return
        if code == grpc.StatusCode.NOT_FOUND and shard.attempts < MAX_ATTEMPTS + len(shard.tried):
            if kind == MISSING_DATASET and self.dataset is not None:
                worker.forget_dataset(self.dataset.dataset_id)
            else:
                worker.forget_graph(self.graph.graph_id)
            self._send(shard, worker)
            return
        gone = (worker.retired or code in WORKER_FAILURES) and not self._cancelled
        if code == grpc.StatusCode.CANCELLED and self._remaining() <= 0:
            gone = False  # our own deadline, not the worker's doing
        worker.failed()
        if code == grpc.StatusCode.UNAVAILABLE:
            self.registry.mark_unreachable(worker, details)
        if gone:
            elsewhere = self._free_worker(shard)
            if (elsewhere is not None and len(shard.tried) < MAX_WORKERS_PER_SHARD + shard.phase
                    and self._remaining() > 0):
                log.warning("shard %d (examples %d:%d): %s failed with %s (%s); retrying on %s", shard.index,
                            shard.start, shard.stop, worker.describe(), code.name, details[:200],
                            elsewhere.describe())
                SHARDS_RETRIED.inc()
                self._send(shard, elsewhere)
                return
            if elsewhere is None:
                details += "; no other live worker could take the shard"
        shard.worker = worker
        raise ShardFailed(shard, code, details, kind)

    def _hedge_stragglers(self) -> None:
        """Copy a straggling shard to a free worker, and retry shards whose worker left the pool."""
        now = time.monotonic()
        bound = max(HEDGE_FLOOR, HEDGE_FACTOR * max(self._finished_seconds)) if self._finished_seconds else None
        for shard in self.shards:
            if shard.done or not shard.running:
                continue
            lost = [a for a in shard.running if a.worker.lapsed]
            for attempt in lost:  # its lease lapsed mid-shard (hung or dead): its answer may never come
                attempt.future.cancel()  # type: ignore[union-attr]
            if bound is None or len(shard.running) > 1 or len(shard.tried) >= MAX_WORKERS_PER_SHARD + shard.phase:
                continue
            attempt = shard.running[0]
            if now - attempt.started > bound:
                spare = self._free_worker(shard, idle_only=True)
                if spare is not None:
                    attempt.worker.mark_suspect()
                    log.warning("shard %d (examples %d:%d) on %s has run %.1fs (> %.1fs): hedging on %s",
                                shard.index, shard.start, shard.stop, attempt.worker.describe(),
                                now - attempt.started, bound, spare.describe())
                    SHARDS_HEDGED.inc()
                    self._send(shard, spare, hedge=True)

    def _free_worker(self, shard: Shard, idle_only: bool = False) -> Optional[WorkerEntry]:
        """A live worker this shard has not been sent to, the least busy first."""
        candidates = [w for w in self.registry.pool() if w not in shard.tried and not w.suspect]
        if idle_only:
            candidates = [w for w in candidates if w.in_flight == 0]
        return min(candidates, key=lambda w: (w.in_flight, -w.capacity, w.worker_id), default=None)

    def _remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _next_done(self) -> Optional[tuple]:
        """The next finished attempt; None after a short wait (time to check for stragglers)."""
        remaining = self._remaining()
        if remaining <= -5.0:  # every call carries the deadline; this is a safety net
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded waiting for workers")
        try:
            return self._done.get(timeout=min(HEDGE_FLOOR / 4, max(0.01, remaining + 5.0)))
        except queue.Empty:
            return None

    def _send(self, shard: Shard, worker: WorkerEntry, hedge: bool = False) -> None:
        remaining = self._remaining()
        if remaining <= 0:
            raise ShardFailed(shard, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the shard was sent")
        shard.worker = worker
        if worker not in shard.tried:
            shard.tried.append(worker)
        attempt = Attempt(worker, time.monotonic(), hedge=hedge, phase=shard.phase)
        try:
            self._ensure_graph(shard, remaining)
            self._ensure_dataset(shard)
        except ShardFailed as failure:
            if failure.code == grpc.StatusCode.INVALID_ARGUMENT:
                raise
            self._on_failure(shard, attempt, failure.code, failure.details, failure.kind)
            return
        if shard.request is None:
            shard.request = shard.make_request()
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
            self._on_failure(shard, attempt, grpc.StatusCode.UNAVAILABLE, "the worker left the pool")
            return
        attempt.future = future
        shard.running.append(attempt)

        def on_done(done: object) -> None:
            worker.release()
            self._done.put((shard, attempt))

        future.add_done_callback(on_done)  # type: ignore[attr-defined]

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
                raise ShardFailed(shard, err.code(), f"sending graph {key[:12]}: {err.details()}") from None
            except ValueError:
                raise ShardFailed(shard, grpc.StatusCode.UNAVAILABLE, "the worker left the pool") from None
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
                raise ShardFailed(shard, err.code(),
                                  f"sending dataset {dataset.dataset_id[:12]}: {err.details()}") from None
            except ValueError:
                raise ShardFailed(shard, grpc.StatusCode.UNAVAILABLE, "the worker left the pool") from None
            finally:
                worker.release()
            worker.dataset_sent(dataset.dataset_id)
