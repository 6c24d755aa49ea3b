"""The SDK's connection to a gradpool coordinator.

    with gp.Client("localhost:50051") as service:
        loss, grads = service.gradients(graph, params, batch)

`Client` registers each graph once per connection (and again, invisibly,
when the coordinator has forgotten it), casts arrays to the graph's dtypes,
and returns numpy arrays. Every gRPC error becomes a `ServiceError` carrying
the status code and the server's message; transient failures (the
coordinator restarting, no worker up yet) are retried with backoff by one
decorator, `retried`, which never retries the codes in `NEVER_RETRIED`.
"""

from __future__ import annotations

import functools
import os
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, TypeVar, Union

import grpc
import numpy as np

from gradpool.protos import gradpool_pb2 as pb
from gradpool.protos import gradpool_pb2_grpc as pb_grpc
from gradpool.worker import wire
from gradpool.worker.engine.errors import GradpoolError, GraphError, InputError, ShardingError
from gradpool.worker.engine.tensors import EXACT, fill_tensor
from gradpool.worker.engine.tensors import wire_dtype as parse_wire_dtype
from gradpool.worker.malloc import keep_freed_bytes_from_env, keep_freed_memory
from gradpool.worker.rpc import (BUSY_DETAILS, DEFAULT_MAX_MESSAGE_MB, MISSING_DATASET, TlsConfig, auth_metadata, channel_options,
                                 method_path, open_channel, rpc_error_kind, with_port)
from gradpool.worker.streams import PROTOBUF_LIMIT_BYTES, REQUEST_STREAM_THRESHOLD_BYTES, call_streamed

from .data import DatasetRef, DatasetRows
from .graph import Graph
from .local import check_rows, checked_arrays, prepare_arrays

# Retrying these cannot help: the request itself is wrong, or the caller may
# not make it, or it already ran out of time (the deadline bounds all tries).
NEVER_RETRIED: tuple[grpc.StatusCode, ...] = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # "message larger than max" fails again (but see `busy`)
    grpc.StatusCode.DEADLINE_EXCEEDED,
    # Not CANCELLED: the SDK never cancels its own calls, so a CANCELLED comes
    # from the other side, as gRPC answers the calls that reach a server while
    # it shuts down (seen on every third or so restart of the compose coordinator
    # during training); every call here is idempotent, so it is sent again.
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNKNOWN,
)


# How the coordinator's own UNAVAILABLE messages begin (no workers, a worker
# down); any other UNAVAILABLE means the coordinator itself was not reached.
COORDINATOR_UNAVAILABLE_PREFIXES = ("no live workers", "worker ")


class ServiceError(GradpoolError):
    """The service refused or failed a request; `.code` is the gRPC status code
    and `.details` the server's own message."""

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None, details: str = "", kind: str = ""):
        super().__init__(message)
        self.code = code
        self.details = details
        self.kind = kind  # what a NOT_FOUND is missing ("graph", "dataset"), or the engine error class


class ServiceUnavailable(ServiceError):
    """The coordinator could not be reached, or has no live workers, even after retrying."""


class RemoteInputError(ServiceError, InputError):
    """The service refused the params or the batch: `except gp.InputError` catches it
    as it catches the same mistake found in-process."""


class RemoteGraphError(ServiceError, GraphError):
    """The service refused the graph (also a `gp.GraphError`)."""


class RemoteShardingError(RemoteGraphError, ShardingError):
    """The service refused a graph that cannot be sharded (also a `gp.ShardingError`)."""


REMOTE_ERRORS: dict[str, type[ServiceError]] = {
    "InputError": RemoteInputError, "GraphError": RemoteGraphError, "ShardingError": RemoteShardingError}


def service_error(err: grpc.RpcError, address: str) -> ServiceError:
    """A gRPC error as the SDK's own exception, with a message a user can act on."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (err.details() if callable(getattr(err, "details", None)) else "") or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        if details.startswith(COORDINATOR_UNAVAILABLE_PREFIXES):  # the coordinator answered, its pool did not
            return ServiceUnavailable(f"gradpool coordinator at {address}: {details}", code, details)
        return ServiceUnavailable(f"cannot reach the gradpool coordinator at {address} (is it running?): {details}",
                                  code, details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServiceError(f"deadline exceeded: {details}", code, details)
    kind = rpc_error_kind(err)
    if code == grpc.StatusCode.INVALID_ARGUMENT and kind in REMOTE_ERRORS:
        return REMOTE_ERRORS[kind](details, code, details, kind)
    if code == grpc.StatusCode.NOT_FOUND:
        return ServiceError(f"NOT_FOUND: {details}", code, details, kind)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ServiceError(f"the coordinator at {address} refused the token: {details}", code, details)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return ServiceError(f"the coordinator at {address} does not let this token do that: {details}", code,
                            details)
    return ServiceError(f"{code.name}: {details}", code, details)


# A call's deadline when the Client is given none (`timeout=None` asks for none).
DEFAULT_TIMEOUT_SECONDS = 300.0


def busy(err: grpc.RpcError) -> bool:
    return err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and BUSY_DETAILS in (err.details() or "")


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried: with backoff, for up to
    `budget_seconds` (by default long enough to ride out a coordinator
    restart of 30 s) and, if set, at most `attempts` times; the call's
    deadline bounds it all."""
    attempts: Optional[int] = None
    initial_backoff: float = 0.1
    max_backoff: float = 1.0
    multiplier: float = 2.0
    budget_seconds: float = 30.0


T = TypeVar("T")


def retried(method: Callable[..., T]) -> Callable[..., T]:
    """The SDK's one retry loop: backoff with jitter on retryable codes, the
    deadline (`timeout=`) shared by all attempts, every RpcError turned into
    a ServiceError. Wraps methods of classes with `.retry` and `.address`."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> T:
        policy: RetryPolicy = self.retry
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        delay = policy.initial_backoff
        attempt = 0
        while True:
            attempt += 1
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return method(self, *args, timeout=remaining, **kwargs)
            except grpc.RpcError as err:
                sleep = delay * random.uniform(0.8, 1.2)
                now = time.monotonic()
                out_of_time = ((deadline is not None and now + sleep >= deadline)
                               or now + sleep - started > policy.budget_seconds)
                last = policy.attempts is not None and attempt >= policy.attempts
                if (err.code() in NEVER_RETRIED and not busy(err)) or last or out_of_time:
                    raise service_error(err, self.address) from None
            time.sleep(sleep)
            delay = min(delay * policy.multiplier, policy.max_backoff)

    return wrapper


class CoordinatorRpc:
    """The Coordinator stub with typed methods, retries and error translation."""

    def __init__(self, channel: grpc.Channel, address: str, token: Optional[str] = None,
                 retry: RetryPolicy = RetryPolicy(), stream_threshold: int = REQUEST_STREAM_THRESHOLD_BYTES):
        self.address = address
        self.retry = retry
        self.stream_threshold = stream_threshold
        self._stub = pb_grpc.CoordinatorStub(channel)
        self._metadata = auth_metadata(token)
        # The heavy calls on raw bytes: requests written and responses read by wire.py.
        raw = {"request_serializer": None, "response_deserializer": None}
        self._compute = channel.unary_unary(method_path("Coordinator", "ComputeGradients"), **raw)
        self._compute_stream = channel.stream_stream(method_path("Coordinator", "ComputeGradientsStream"), **raw)
        self._evaluate = channel.unary_unary(method_path("Coordinator", "Evaluate"), **raw)
        self._evaluate_stream = channel.stream_stream(method_path("Coordinator", "EvaluateStream"), **raw)

    @retried
    def register_graph(self, graph: pb.Graph, *, timeout: Optional[float] = None) -> str:
        request = pb.RegisterGraphRequest(graph=graph)
        return self._stub.RegisterGraph(request, timeout=timeout, metadata=self._metadata).graph_id

    @retried
    def compute_gradients(self, request: "wire.Parts | bytes | pb.GradientsRequest", *,
                          timeout: Optional[float] = None) -> wire.ResultView:
        """A GradientsRequest (as written by `wire.request_parts`, or any
        serialized one) in, the response read in place; streamed when large."""
        return wire.read_gradients_response(self._call(self._compute, self._compute_stream, request, timeout))

    @retried
    def evaluate(self, request: "wire.Parts | bytes | pb.EvaluateRequest", *,
                 timeout: Optional[float] = None) -> wire.ResultView:
        return wire.read_evaluate_response(self._call(self._evaluate, self._evaluate_stream, request, timeout))

    def _call(self, unary: grpc.UnaryUnaryMultiCallable, streamed: grpc.StreamStreamMultiCallable,
              request: "wire.Parts | bytes | Any", timeout: Optional[float]) -> "bytes | bytearray":
        if not isinstance(request, (wire.Parts, bytes)):
            request = request.SerializeToString()
        size = request.size if isinstance(request, wire.Parts) else len(request)
        if size > self.stream_threshold:
            return call_streamed(streamed, request, PROTOBUF_LIMIT_BYTES, timeout=timeout, metadata=self._metadata)
        return unary(request.join() if isinstance(request, wire.Parts) else request, timeout=timeout,
                     metadata=self._metadata)

    @retried
    def upload_dataset(self, dataset: DatasetRef, *, timeout: Optional[float] = None) -> pb.DatasetInfo:
        """Streams the dataset's chunks (afresh on every attempt)."""
        return self._stub.UploadDataset(dataset.chunks(), timeout=timeout, metadata=self._metadata)

    @retried
    def get_dataset(self, dataset_id: str, *, timeout: Optional[float] = None) -> pb.DatasetInfo:
        return self._stub.GetDataset(pb.GetDatasetRequest(dataset_id=dataset_id), timeout=timeout,
                                     metadata=self._metadata)

    @retried
    def get_status(self, *, timeout: Optional[float] = None) -> pb.StatusResponse:
        return self._stub.GetStatus(pb.StatusRequest(), timeout=timeout, metadata=self._metadata)


# ---------------------------------------------------------------- results

@dataclass(frozen=True)
class ShardStat:
    """Where one shard ran and how long it took (attempts > 1: the graph was re-sent)."""
    worker: str
    start: int
    examples: int
    seconds: float
    attempts: int

    @classmethod
    def from_proto(cls, s: pb.ShardStats) -> "ShardStat":
        return cls(s.worker, s.start, s.examples, s.seconds, s.attempts)


@dataclass
class GradientsResult:
    """Loss and summed gradients of a whole batch, and where its shards ran.

    Unpacks like the tuple `local_gradients` returns: `loss, grads = client.gradients(...)`.
    """
    loss: float
    grads: dict[str, np.ndarray]
    examples: int
    shards: list[ShardStat]
    seconds: float  # on the coordinator, from request to reduced result

    def __iter__(self) -> Iterator[Any]:
        return iter((self.loss, self.grads))


@dataclass
class ForwardResult(Mapping[str, np.ndarray]):
    """Forward values of per-example nodes, by name (a read-only mapping, like
    `local_forward`'s dict), and where the shards ran."""
    outputs: dict[str, np.ndarray]
    examples: int
    shards: list[ShardStat]
    seconds: float

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.outputs)

    def __len__(self) -> int:
        return len(self.outputs)


@dataclass(frozen=True)
class WorkerStatus:
    worker_id: str
    address: str
    capacity: float
    state: str
    seconds_since_heartbeat: float
    shards_served: int
    examples_served: int
    graphs_sent: int
    errors: int
    static: bool


@dataclass
class ClusterStatus:
    workers: list[WorkerStatus]
    requests_served: int
    requests_failed: int
    examples_served: int
    graphs_registered: int
    uptime_seconds: float
    version: str
    datasets_resident: int = 0
    dataset_bytes: int = 0

    @classmethod
    def from_proto(cls, s: pb.StatusResponse) -> "ClusterStatus":
        workers = [WorkerStatus(w.worker_id, w.address, w.capacity, w.state, w.seconds_since_heartbeat,
                                w.shards_served, w.examples_served, w.graphs_sent, w.errors, w.static)
                   for w in s.workers]
        return cls(workers, s.requests_served, s.requests_failed, s.examples_served, s.graphs_registered,
                   s.uptime_seconds, s.version, s.datasets_resident, s.dataset_bytes)

    @property
    def live_workers(self) -> list[WorkerStatus]:
        """Workers taking shards: "live", and "suspect" (one of its shards straggled and was hedged)."""
        return [w for w in self.workers if w.state in ("live", "suspect")]

    def table(self) -> str:
        """The status as a readable table (what `gradpool status` prints)."""
        header = ("WORKER", "ADDRESS", "CAPACITY", "STATE", "HEARTBEAT", "SHARDS", "EXAMPLES", "GRAPHS", "ERRORS")
        rows = [(w.worker_id + (" (static)" if w.static else ""), w.address, f"{w.capacity:g}", w.state,
                 f"{w.seconds_since_heartbeat:.1f}s ago", str(w.shards_served), str(w.examples_served),
                 str(w.graphs_sent), str(w.errors)) for w in self.workers]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                 for row in [header, *rows]]
        if not rows:
            lines.append("(no workers)")
        lines += ["",
                  f"{len(self.live_workers)} live of {len(self.workers)} worker(s); "
                  f"{self.requests_served} request(s) served, {self.requests_failed} failed, "
                  f"{self.examples_served} example(s); {self.graphs_registered} graph(s) registered; "
                  f"{self.datasets_resident} dataset(s) resident ({self.dataset_bytes / 2**20:.1f} MB); "
                  f"up {self.uptime_seconds:.0f}s; gradpool {self.version}"]
        return "\n".join(lines)


# ---------------------------------------------------------------- the client

class _Default:
    def __repr__(self) -> str:
        return "the client's wire_dtype"


CLIENT_DEFAULT: Any = _Default()


def client_tls_config(tls: "TlsConfig | bool | str | os.PathLike[str] | None") -> Optional[TlsConfig]:
    """`Client(tls=...)` as a TlsConfig (None: plaintext)."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return TlsConfig()
    if isinstance(tls, TlsConfig):
        return tls
    if isinstance(tls, (str, os.PathLike)):
        if not os.path.isdir(tls):
            raise ValueError(f"tls={str(tls)!r} is not a folder made by `gradpool certs`")
        return TlsConfig.from_dir(tls, "client")
    raise TypeError(f"tls must be a bool, a gp.TlsConfig or a certs folder, not {type(tls).__name__}")


class Client:
    """A connection to a gradpool coordinator.

    `timeout` (seconds, default 300) bounds every call, retries included;
    `timeout=None` means no deadline at all; each method also takes its own
    `timeout=`. A coordinator that cannot be reached is retried with backoff
    for `retry.budget_seconds` (30 s: a restart), and graphs and datasets it
    forgot are sent again, unseen. `token` (the client token, GRADPOOL_TOKEN
    on the coordinator) is sent as `authorization: Bearer`.

    `tls`: None or False for plaintext; True for TLS verified by the system's
    CAs; a `gp.TlsConfig(ca=..., cert=..., key=...)` for a private CA and, for
    a coordinator that requires client certificates (mTLS), the client's own;
    or a folder made by `gradpool certs DIR` (its ca.pem, client.pem and
    client-key.pem).

    `wire_dtype` ("bfloat16" or "float16"; default None: exact) sends float
    params and gets gradients back as 16-bit floats: half the params and
    gradient traffic, **not exact**. Params are rounded (through float32) on
    the way out, each shard's gradient on the way back, their sum again for
    the reply; results come back in the params' own dtypes. bfloat16 keeps
    float32's range with 8 significant bits; float16 has 11 but overflows to
    inf beyond 65504 and loses gradients below about 6e-8. Inputs always
    travel exact; `forward` ignores it. `gradients(..., wire_dtype=)`
    overrides it for one call (None: exact).

    Creating a client lets this process keep up to 512 MB of freed memory
    for reuse (GRADPOOL_KEEP_FREED_MB; 0 turns it off), as the servers do:
    sending a large batch then fills warm pages instead of page-faulting
    fresh ones, which took most of the client's CPU on a 13 MB request (see
    gradpool/worker/malloc.py).
    """

    def __init__(self, address: str, token: Optional[str] = None,
                 timeout: Optional[float] = DEFAULT_TIMEOUT_SECONDS, *,
                 max_message_mb: float = DEFAULT_MAX_MESSAGE_MB, retry: RetryPolicy = RetryPolicy(),
                 stream_threshold_mb: float = REQUEST_STREAM_THRESHOLD_BYTES / 2**20, wire_dtype: Optional[str] = None,
                 tls: "TlsConfig | bool | str | os.PathLike[str] | None" = None):
        self._wire_dtype = parse_wire_dtype(wire_dtype)  # an InputError now, not at the first step
        keep_freed_memory(keep_freed_bytes_from_env())
        self.wire_dtype = wire_dtype
        self.address = address = with_port(address)
        self.timeout = timeout
        self.tls = client_tls_config(tls)
        self._channel = open_channel(address, self.tls, channel_options(max_message_mb))
        self._rpc = CoordinatorRpc(self._channel, address, token, retry, int(stream_threshold_mb * 2**20))
        self._registered: set[str] = set()
        self._uploaded: set[str] = set()

    # ------------------------------------------------------------ graphs

    def register(self, graph: Graph, *, timeout: Optional[float] = None) -> str:
        """Send the graph to the coordinator (checked there); returns its id."""
        proto = graph.to_proto()
        key = graph.graph_id
        server_key = self._rpc.register_graph(proto, timeout=self._timeout(timeout))
        if server_key != key:
            raise ServiceError(f"the coordinator names this graph {server_key[:12]}, the SDK {key[:12]}: "
                               "client and coordinator versions differ", grpc.StatusCode.FAILED_PRECONDITION)
        self._registered.add(key)
        return key

    def upload(self, data: "Mapping[str, Any] | DatasetRef", *, timeout: Optional[float] = None) -> DatasetRef:
        """Make a dataset (input name -> array, examples first) resident on the
        service, streamed in chunks, and return its reference; `ref.take(indices)`
        then names a minibatch. Idempotent: a dataset the coordinator already
        holds (same content) is not sent again."""
        ref = data if isinstance(data, DatasetRef) else DatasetRef.of(data)
        timeout = self._timeout(timeout)
        if ref.dataset_id in self._uploaded:
            return ref
        try:
            self._rpc.get_dataset(ref.dataset_id, timeout=timeout)
        except ServiceError as err:
            if err.code != grpc.StatusCode.NOT_FOUND:
                raise
            info = self._rpc.upload_dataset(ref, timeout=timeout)
            if info.dataset_id != ref.dataset_id:
                raise ServiceError(f"the coordinator names this dataset {info.dataset_id[:12]}, the SDK "
                                   f"{ref.dataset_id[:12]}: client and coordinator versions differ",
                                   grpc.StatusCode.FAILED_PRECONDITION)
        self._uploaded.add(ref.dataset_id)
        return ref

    def _with_resources(self, graph: Graph, rows: Optional[DatasetRows], call: Callable[[str], T],
                        timeout: Optional[float]) -> T:
        """Run `call(graph_id)` with the graph registered and the dataset (if the
        batch names rows of one) resident, sending either again, invisibly, if
        the coordinator forgot it (a restart, an eviction)."""
        key = graph.graph_id
        for attempt in range(3):
            if key not in self._registered:
                self.register(graph, timeout=timeout)
            if rows is not None:
                self.upload(rows.dataset, timeout=timeout)
            try:
                return call(key)
            except ServiceError as err:
                if err.code != grpc.StatusCode.NOT_FOUND or attempt == 2:
                    raise
                if err.kind == MISSING_DATASET and rows is not None:
                    self._uploaded.discard(rows.dataset.dataset_id)
                else:
                    self._registered.discard(key)
        raise AssertionError("unreachable")

    def _request_body(self, graph: Graph, params: Mapping[str, Any], batch: "Mapping[str, Any] | DatasetRows",
                      outputs: Optional[Sequence[str]] = None, wire_dtype: int = EXACT,
                      seed: Optional[int] = None) -> tuple[wire.Parts, Optional[DatasetRows]]:
        """Params and batch checked as every backend checks them, written once as
        the request's body (views of the arrays, not copies; float params
        encoded in `wire_dtype` when that is not EXACT): all but the graph id."""
        rows_message = None
        if isinstance(batch, DatasetRows):
            rows = batch
            needed_inputs, needed_params = (None, None) if outputs is None else graph.program().sources_for(outputs)
            if outputs is not None:
                graph.program().check_outputs(outputs)
            check_rows(graph, batch, needed_inputs)
            params = prepare_arrays(graph, params, "param")
            graph.program().signature.check_arrays(params, "param", needed_params)
            arrays: Mapping[str, np.ndarray] = {}
            rows_message = pb.DatasetRows(dataset_id=batch.dataset.dataset_id)
            fill_tensor(rows_message.indices, batch.indices)
        else:
            rows = None
            params, arrays, _ = checked_arrays(graph, params, batch, outputs)
        _, body = wire.request_parts("", params, arrays, uuid.uuid4().hex, rows_message, outputs, wire_dtype, seed)
        return body, rows

    # ------------------------------------------------------------ computing

    def gradients(self, graph: Graph, params: Mapping[str, Any], batch: "Mapping[str, Any] | DatasetRows", *,
                  timeout: Optional[float] = None, wire_dtype: Optional[str] = CLIENT_DEFAULT,
                  seed: Optional[int] = None) -> GradientsResult:
        """Loss and parameter gradients of the whole batch, as `local_gradients`
        computes them (`loss, grads = ...` unpacks it), with where each shard ran.
        `batch` is arrays, or rows of an uploaded dataset (`ref.take(indices)`).
        `wire_dtype` overrides the client's for this call (None: exact; see `Client`).
        `seed` keys random ops (dropout), as in `local_gradients`: a graph with
        one needs it, and the same seed gives the same masks on any pool."""
        timeout = self._timeout(timeout)
        encoding = self._wire_dtype if wire_dtype is CLIENT_DEFAULT else parse_wire_dtype(wire_dtype)
        seed = graph.program().check_seed(seed)  # refused here, before anything is sent
        body, rows = self._request_body(graph, params, batch, wire_dtype=encoding, seed=seed)
        response = self._with_resources(
            graph, rows, lambda key: self._rpc.compute_gradients(wire.with_graph_id(key, body), timeout=timeout),
            timeout)
        dtypes = {name: dtype for name, (_, dtype) in graph.params.items()}
        return GradientsResult(response.loss, _arrays(response.grads, "gradient", dtypes), response.examples,
                               [ShardStat.from_proto(s) for s in response.shards], response.seconds)

    def forward(self, graph: Graph, params: Mapping[str, Any], batch: "Mapping[str, Any] | DatasetRows",
                outputs: Union[str, Sequence[str]], *, timeout: Optional[float] = None) -> ForwardResult:
        """Values of per-example nodes (e.g. predictions) for the batch, forward
        only, as `local_forward` computes them."""
        timeout = self._timeout(timeout)
        outputs = [outputs] if isinstance(outputs, str) else list(outputs)
        body, rows = self._request_body(graph, params, batch, outputs)
        response = self._with_resources(
            graph, rows, lambda key: self._rpc.evaluate(wire.with_graph_id(key, body), timeout=timeout), timeout)
        return ForwardResult(_arrays(response.outputs, "output"), response.examples,
                             [ShardStat.from_proto(s) for s in response.shards], response.seconds)

    def status(self, *, timeout: Optional[float] = None) -> ClusterStatus:
        """The coordinator's workers and totals."""
        return ClusterStatus.from_proto(self._rpc.get_status(timeout=self._timeout(timeout)))

    # ------------------------------------------------------------ lifetime

    def _timeout(self, timeout: Optional[float]) -> Optional[float]:
        return self.timeout if timeout is None else timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<gradpool.Client {self.address}>"


def _arrays(named: Sequence[tuple[str, wire.TensorView]], what: str,
            dtypes: Optional[Mapping[str, np.dtype]] = None) -> dict[str, np.ndarray]:
    """Writable arrays of their own (the views are read-only and would keep the
    response alive); compact gradients decoded to their param's dtype (`dtypes`)."""
    out = {}
    for name, tensor in wire.named_map(named, what).items():
        if tensor.compact:
            if dtypes is None or name not in dtypes:
                raise ServiceError(f"the coordinator sent {what} {name!r} as {tensor.dtype_name}, unasked")
            out[name] = tensor.values(dtypes[name])
        else:
            out[name] = np.array(tensor.array())
    return out
