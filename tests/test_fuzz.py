"""Structured fuzzing of live servers: a coordinator and two workers (real
processes, with client and worker tokens) get hypothesis-made graphs,
tensors, attributes, shapes, frame streams, dataset uploads and worker
registrations through raw gRPC stubs (the SDK's own checks never see them),
for GRADPOOL_FUZZ_SECONDS (20 by default; set it higher for a longer run).

Besides malformed input, the memory and compute bombs of the security
issue: small graphs that run with large values (broadcasts, tile, pad,
broadcast_to, outer-product matmuls and einsums, one_hot, padded and
dilated conv and pooling, concat of up to 1,024 inputs) with sizes from 1 to
2**62, run through the coordinator, Evaluate, or straight on a worker; deep
graphs up to and past the node limit whose origins bring them near the
64 MB message limit; the issue's structure bombs as raw bytes (10M nodes,
40M-value int lists, 40M-dim shapes in graphs, request tensors and dataset
headers, 3M tensors in a request); templates with batches past the
request memory cap. The servers run with a 128 MB request memory cap and a
256 MB graph cache, so that what a request may use stays under the bounds.

Asserted: every answer is OK or one of the expected refusals (never
INTERNAL, UNKNOWN, UNAVAILABLE or a timeout, which would be a crash or a
hang); every process is alive afterwards; in every case, each server's
resident memory peaked (VmHWM, reset before the case through
/proc/PID/clear_refs) less than PEAK_BOUND above where it stood, and over
the run it grew by less than RSS_BOUND; and a valid request is still
served, bitwise right. The figures (cases, codes, memory) are printed at
the end (`pytest -s` shows them).
"""
from __future__ import annotations

import collections
import math
import os
import time
from typing import Any, Callable, Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradpool as gp
from gradpool.cluster import LocalCluster
from gradpool.protos import gradpool_pb2 as pb
from gradpool.protos import gradpool_pb2_grpc as pb_grpc
from gradpool.worker import wire
from gradpool.worker.datasets import _header_digest
from gradpool.worker.engine import REGISTRY, graph_id
from gradpool.worker.engine.limits import LIMITS
from gradpool.worker.engine.tensors import fill_tensor
from gradpool.worker.rpc import method_path
from gradpool.worker.streams import FRAME_BYTES

from models import batch_for, logistic_regression, params_for, softmax_mlp

BUDGET_SECONDS = float(os.environ.get("GRADPOOL_FUZZ_SECONDS", "20"))
CALL_TIMEOUT = 60.0  # a call that takes longer is a hang (checking a 100k-node graph takes seconds)
MB = 2**20
# The servers' caps in this run: small, so that what a request may legitimately use stays well under the
# bounds below, and a bomb that slipped past the estimate would show.
REQUEST_MEMORY_MB, GRAPH_CACHE_MB = 128, 256
# glibc's own malloc policy (--keep-freed-mb 0): the resident-memory bounds below are for what the cases
# make a server hold, not for the freed memory the servers keep for reuse by default (worker/malloc.py).
SERVER_ARGS = ["--max-request-memory-mb", str(REQUEST_MEMORY_MB), "--graph-cache-mb", str(GRAPH_CACHE_MB),
               "--keep-freed-mb", "0"]
CLIENT_TOKEN, WORKER_TOKEN = "fuzz-client", "fuzz-worker"
S = grpc.StatusCode
# What a server may answer to anything: success or a refusal that names the problem.
ALLOWED = {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.RESOURCE_EXHAUSTED, S.FAILED_PRECONDITION,
           S.PERMISSION_DENIED, S.UNAUTHENTICATED}
# Resident memory a server may keep after the run: its graph cache (by the Programs' estimated size, 2 KB a
# node) and what the allocators keep of the peaks (measured: up to 390 MB on the coordinator in 30 s).
RSS_BOUND = (GRAPH_CACHE_MB + 250) * MB
# How far above where it stood before a case any server's resident memory may peak during that case (VmHWM,
# reset before each case): a request's cap and numpy's temporaries, or the largest graph that passes the
# limits (100k nodes, a 60 MB message: its bytes, parsed nodes, Program and a run, about 420 MB measured).
PEAK_BOUND = 512 * MB

TEMPLATES = {"mlp": softmax_mlp(), "logistic": logistic_regression("float32")}
CODES: collections.Counter = collections.Counter()  # (case kind, code name) -> count
SECONDS: collections.Counter = collections.Counter()  # case kind -> seconds its calls took


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "VmHWM")))
    return {name: int(value.split()[0]) * 1024 for name, value in fields.items()}


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as clear:  # "5": reset VmHWM to the current RSS
        clear.write("5")


class Target:
    """Raw stubs of the live cluster: bytes in, bytes out, no SDK checks."""

    def __init__(self, cluster: LocalCluster):
        self.cluster = cluster
        options = [("grpc.max_send_message_length", 128 * MB)]  # bombs of up to 70 MB: the servers refuse them
        self.channel = grpc.insecure_channel(cluster.address, options=options)
        self.coordinator = pb_grpc.CoordinatorStub(self.channel)
        self.worker_channels = [grpc.insecure_channel(a, options=options) for a in cluster.worker_addresses]
        self.workers = [pb_grpc.WorkerStub(c) for c in self.worker_channels]

    def raw(self, service: str, method: str, worker: int = -1, stream: bool | str = False) -> Any:
        """stream: True for stream-stream, "unary" for stream-unary (uploads)."""
        channel = self.channel if worker < 0 else self.worker_channels[worker]
        make = channel.stream_unary if stream == "unary" else channel.stream_stream if stream else channel.unary_unary
        return make(method_path(service, method), request_serializer=None, response_deserializer=None)

    def close(self) -> None:
        for channel in [self.channel, *self.worker_channels]:
            channel.close()


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with LocalCluster(workers=2, token=CLIENT_TOKEN, worker_token=WORKER_TOKEN, threads_per_worker=1,
                      coordinator_args=SERVER_ARGS, worker_args=SERVER_ARGS) as cluster:
        target = Target(cluster)
        with cluster.client(timeout=60) as service:  # the templates registered, loaded on both workers
            for graph in TEMPLATES.values():
                service.gradients(graph, params_for(graph), batch_for(graph, 4))
        yield target
        target.close()


def send(kind: str, call: Callable[[], Any]) -> grpc.StatusCode:
    """Make one call; count its code; fail on a code outside ALLOWED (a crash or a hang)."""
    try:
        result = call()
        if isinstance(result, Iterator):
            collections.deque(result, maxlen=0)  # a stream's answer: read to the end
        code, details = S.OK, ""
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
    CODES[(kind, code.name)] += 1
    assert code in ALLOWED, f"{kind}: {code.name}: {details[:500]}"
    return code


# ------------------------------------------------------------------ strategies

DIMS = st.sampled_from([-1, 0, 1, 2, 3, 5, 8])
HUGE_DIMS = st.one_of(DIMS, st.sampled_from([2**31, 2**40, 2**62, -7, -(2**62)]), st.integers(-2**63, 2**63 - 1))
DTYPES = st.one_of(st.sampled_from([pb.FLOAT32, pb.FLOAT64, pb.INT32, pb.INT64, pb.BOOL, pb.FLOAT16, pb.BFLOAT16]),
                   st.integers(0, 40))
# Long values are made by repeating a drawn one (hypothesis draws each element of a long list: slow).
LONG_TEXT = st.builds(lambda piece, times: piece * times, st.text(min_size=1, max_size=3), st.integers(100, 5000))
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["x", "y", "W1", "b1", "logits", "w", "b", "t", ""]),
                 LONG_TEXT)
OP_NAMES = st.one_of(st.sampled_from(sorted(REGISTRY)), st.sampled_from(["input", "param", "const"]), TEXT)
ATTR_NAMES = st.one_of(st.sampled_from(sorted({a for op in REGISTRY.values() for a in op.attrs})), TEXT)


def attr_values(ints: st.SearchStrategy, list_size: int) -> st.SearchStrategy:
    tensor = st.builds(lambda d, shape, data: pb.Tensor(dtype=d, shape=shape, data=data),
                       DTYPES, st.lists(ints, max_size=4), st.binary(max_size=64))
    return st.one_of(st.builds(lambda v: pb.AttrValue(i=v), ints),
                     st.builds(lambda v: pb.AttrValue(f=v), st.floats(allow_nan=True, allow_infinity=True)),
                     st.builds(lambda v: pb.AttrValue(s=v), TEXT),
                     st.builds(lambda v: pb.AttrValue(b=v), st.booleans()),
                     st.builds(lambda v: pb.AttrValue(ints=pb.IntList(values=v)), st.lists(ints, max_size=6)),
                     st.builds(lambda v, n: pb.AttrValue(ints=pb.IntList(values=v * n)), st.lists(ints, max_size=3),
                               st.integers(0, list_size)),
                     st.builds(lambda t: pb.AttrValue(tensor=t), tensor),
                     st.just(pb.AttrValue()))


@st.composite
def random_graphs(draw: Any) -> pb.Graph:
    """Any nodes: ops of the registry (or not), any inputs, attributes, shapes and dtypes; never run."""
    graph = pb.Graph(name=draw(TEXT))
    count = draw(st.integers(0, 8))
    for _ in range(count):
        node = graph.nodes.add(name=draw(TEXT), op=draw(OP_NAMES), dtype=draw(DTYPES), origin=draw(TEXT))
        node.inputs.extend(draw(st.lists(st.integers(-2, count + 1), max_size=3)))
        node.shape.extend(draw(st.lists(HUGE_DIMS, max_size=6)))
        for name, value in draw(st.dictionaries(ATTR_NAMES, attr_values(HUGE_DIMS, 100_000), max_size=3)).items():
            node.attrs[name].CopyFrom(value)
    graph.loss = draw(st.integers(-1, count + 1))
    return graph


@st.composite
def mutated_graphs(draw: Any) -> tuple[str, pb.Graph]:
    """A template's graph with one to three small changes: may register, and then runs (small values only)."""
    name = draw(st.sampled_from(sorted(TEMPLATES)))
    graph = pb.Graph()
    graph.CopyFrom(TEMPLATES[name].to_proto())
    for _ in range(draw(st.integers(1, 3))):
        index = draw(st.integers(0, len(graph.nodes) - 1))
        node = graph.nodes[index]
        change = draw(st.sampled_from(["op", "attr", "shape", "dtype", "inputs", "loss", "drop", "name"]))
        if change == "op":
            node.op = draw(OP_NAMES)
        elif change == "attr":
            node.attrs[draw(ATTR_NAMES)].CopyFrom(draw(attr_values(DIMS, 6)))
        elif change == "shape":
            del node.shape[:]
            node.shape.extend(draw(st.lists(DIMS, max_size=4)))
        elif change == "dtype":
            node.dtype = draw(DTYPES)
        elif change == "inputs":
            del node.inputs[:]
            node.inputs.extend(draw(st.lists(st.integers(-1, len(graph.nodes)), max_size=3)))
        elif change == "loss":
            graph.loss = draw(st.integers(-1, len(graph.nodes)))
        elif change == "drop" and len(graph.nodes) > 1:
            del graph.nodes[index]
        else:
            node.name = draw(TEXT)
    return name, graph


def tensor_proto(array: np.ndarray) -> pb.Tensor:
    tensor = pb.Tensor()
    fill_tensor(tensor, array)
    return tensor


@st.composite
def mutated_tensors(draw: Any, tensors: dict[str, np.ndarray]) -> list[pb.NamedTensor]:
    """A template's params or batch with its tensors' names, dtypes, shapes or bytes changed."""
    named = [pb.NamedTensor(name=name, tensor=tensor_proto(value)) for name, value in tensors.items()]
    for _ in range(draw(st.integers(0, 3))):
        if not named:
            break
        item = named[draw(st.integers(0, len(named) - 1))]
        change = draw(st.sampled_from(["dtype", "shape", "huge", "short", "long", "name", "drop", "dup", "nan"]))
        tensor = item.tensor
        if change == "dtype":
            tensor.dtype = draw(DTYPES)
        elif change == "shape":
            del tensor.shape[:]
            tensor.shape.extend(draw(st.lists(DIMS, max_size=4)))
        elif change == "huge":  # claims far more elements than it carries
            del tensor.shape[:]
            tensor.shape.extend(draw(st.lists(HUGE_DIMS, min_size=1, max_size=5)))
        elif change == "short":
            tensor.data = tensor.data[: draw(st.integers(0, max(0, len(tensor.data) - 1)))]
        elif change == "long":
            tensor.data += draw(st.binary(min_size=1, max_size=64))
        elif change == "name":
            item.name = draw(TEXT)
        elif change == "drop":
            named.remove(item)
        elif change == "dup":
            named.append(pb.NamedTensor(name=item.name, tensor=tensor))
        elif tensor.dtype in (pb.FLOAT32, pb.FLOAT64) and tensor.data and len(tensor.data) % 8 == 0:
            # NaN/inf values: computed, not refused
            array = np.frombuffer(tensor.data, np.float32 if tensor.dtype == pb.FLOAT32 else np.float64).copy()
            array[draw(st.integers(0, array.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            tensor.data = array.tobytes()
    return named


def template_request(name: str, examples: int, seed: int = 0) -> tuple[gp.Graph, dict, dict]:
    graph = TEMPLATES[name]
    return graph, params_for(graph), batch_for(graph, examples, seed=seed)


@st.composite
def gradient_requests(draw: Any) -> tuple[str, bytes]:
    """ComputeGradients or Evaluate bodies: mutated tensors, junk fields, or flipped bytes of a valid one."""
    name = draw(st.sampled_from(sorted(TEMPLATES)))
    graph, params, batch = template_request(name, draw(st.integers(1, 6)), draw(st.integers(0, 100)))
    graph_key = draw(st.one_of(st.just(graph.graph_id), TEXT))
    evaluate = draw(st.booleans())
    if evaluate:
        request = pb.EvaluateRequest(graph_id=graph_key, params=draw(mutated_tensors(params)),
                                     inputs=draw(mutated_tensors(batch)), request_id=draw(TEXT),
                                     outputs=draw(st.lists(st.one_of(st.sampled_from(["logits", "y", "z"]), TEXT),
                                                           max_size=3)))
    else:
        request = pb.GradientsRequest(graph_id=graph_key, params=draw(mutated_tensors(params)),
                                      inputs=draw(mutated_tensors(batch)), request_id=draw(TEXT),
                                      wire_dtype=draw(st.one_of(st.just(0), DTYPES)))
    if draw(st.integers(0, 4)) == 0:  # rows of a dataset instead of (or besides) inputs
        request.rows.dataset_id = draw(TEXT)
        request.rows.indices.CopyFrom(tensor_proto(np.array(draw(st.lists(HUGE_DIMS, max_size=5)), np.int64)))
    body = request.SerializeToString()
    flips = draw(st.lists(st.tuples(st.integers(0, max(0, len(body) - 1)), st.integers(0, 255)), max_size=4))
    if flips and body:
        mutable = bytearray(body)
        for position, value in flips:
            mutable[position] = value
        body = bytes(mutable[: draw(st.integers(0, len(mutable)))]) if draw(st.booleans()) else bytes(mutable)
    return ("Evaluate" if evaluate else "ComputeGradients"), body


@st.composite
def frame_streams(draw: Any) -> tuple[str, list[bytes]]:
    """A valid request's bytes as Frames that lie: totals too small, too large or huge, declared twice,
    cut off, or junk frames; and, half the time, the fields in the SDK's order (every field but the
    inputs first) with a `header_bytes` promise that is true, off, or absurd, and bytes flipped in the
    inputs (the coordinator reads such a request while it arrives: server/incoming.py)."""
    name = draw(st.sampled_from(sorted(TEMPLATES)))
    graph, params, batch = template_request(name, draw(st.integers(1, 6)))
    head = pb.GradientsRequest(graph_id=graph.graph_id, params=[pb.NamedTensor(name=k, tensor=tensor_proto(v))
                                                                 for k, v in params.items()]).SerializeToString()
    tail = bytearray(pb.GradientsRequest(inputs=[pb.NamedTensor(name=k, tensor=tensor_proto(v))
                                                 for k, v in batch.items()]).SerializeToString())
    for position, value in draw(st.lists(st.tuples(st.integers(0, max(0, len(tail) - 1)), st.integers(0, 255)),
                                         max_size=3)) if tail else ():
        tail[position] = value
    body = head + bytes(tail)
    promise = draw(st.one_of(st.just(0), st.just(len(head)), st.integers(0, 2 * len(body)),
                             st.sampled_from([2**40, 2**63 - 1, -1])))
    size = draw(st.integers(1, 700))
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    total = draw(st.one_of(st.just(len(body)), st.integers(0, 2 * len(body)),
                           st.sampled_from([2**31 - 2, 2**31, 2**40, 2**62, 2**63 - 1, -1])))
    frames = [pb.Frame(total_bytes=total if i == 0 else 0, header_bytes=promise if i == 0 else 0,
                       data=piece).SerializeToString() for i, piece in enumerate(pieces)]
    cut = draw(st.sampled_from(["none", "cut", "again", "junk", "empty"]))
    if cut == "cut":
        frames = frames[: draw(st.integers(0, len(frames)))]
    elif cut == "again" and len(frames) > 1:
        frames[1] = pb.Frame(total_bytes=total, data=pieces[1]).SerializeToString()
    elif cut == "junk":
        frames.insert(draw(st.integers(0, len(frames))), draw(st.binary(max_size=64)))
    elif cut == "empty":
        frames = []
    return draw(st.sampled_from(["ComputeGradientsStream", "EvaluateStream", "RunShardStream"])), frames


@st.composite
def registrations(draw: Any) -> tuple[str, Any, tuple]:
    """RegisterWorker / Heartbeat / DeregisterWorker with any token, address, capacity, id and secret."""
    token = draw(st.sampled_from([WORKER_TOKEN, WORKER_TOKEN, CLIENT_TOKEN, "", "guess"]))
    worker_id = draw(st.one_of(TEXT, st.just("fuzz-fake")))
    secret = draw(st.one_of(st.just(""), TEXT))
    method = draw(st.sampled_from(["RegisterWorker", "RegisterWorker", "Heartbeat", "DeregisterWorker"]))
    if method == "RegisterWorker":
        address = draw(st.one_of(st.sampled_from(["127.0.0.1:1", "localhost:9", "[::1]:7"]), TEXT,
                                 st.builds(lambda h, p: f"{h}:{p}", TEXT, st.integers(-5, 70000))))
        capacity = draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, 1e6, 1.0])))
        request: Any = pb.RegisterWorkerRequest(address=address, capacity=capacity, worker_id=worker_id,
                                                lease_secret=secret)
    elif method == "Heartbeat":
        request = pb.HeartbeatRequest(worker_id=worker_id, lease_secret=secret)
    else:
        request = pb.DeregisterWorkerRequest(worker_id=worker_id, lease_secret=secret)
    return method, request, bearer(token)


@st.composite
def dataset_uploads(draw: Any) -> list[pb.DatasetChunk]:
    """Dataset uploads whose header, sizes, chunks or id lie."""
    arrays = draw(st.lists(st.builds(lambda n, d, s: pb.ArraySpec(name=n, dtype=d, shape=s), TEXT, DTYPES,
                                     st.lists(HUGE_DIMS, max_size=3)), max_size=3))
    header = pb.DatasetHeader(arrays=arrays)
    data = draw(st.binary(max_size=256))
    if draw(st.booleans()):  # the right id for these bytes (which may still not fit the arrays)
        digest = _header_digest(header)
        digest.update(data)
        header.dataset_id = digest.hexdigest()
    else:
        header.dataset_id = draw(TEXT)
    chunks = [pb.DatasetChunk(header=header)]
    size = draw(st.integers(1, 64))
    chunks += [pb.DatasetChunk(data=data[i:i + size]) for i in range(0, len(data), size)]
    if draw(st.booleans()) and len(chunks) > 1:
        chunks[draw(st.integers(1, len(chunks) - 1))].header.CopyFrom(header)  # a second header
    return chunks[: draw(st.integers(0, len(chunks)))] if draw(st.booleans()) else chunks


# ------------------------------------------------------------------ memory and compute bombs (the limits of item 5)

# Sizes from tiny to absurd: a bomb is a small graph whose values are not.
SIZE = st.one_of(st.integers(1, 8), st.builds(lambda e, k: k << e, st.integers(3, 34), st.integers(1, 3)),
                 st.sampled_from([2**31 - 1, 2**31, 2**62, 0, -1]))
# An even roll in [0, 1) for the rates of rare cases: hypothesis draws integers with a bias to the ends of
# their range, and bytes to zeros (shifted here away from 0: measured, a 4% rate comes out at 4%).
ROLL = st.binary(min_size=4, max_size=4).map(lambda b: ((int.from_bytes(b, "big") + 0x9E3779B9) % 2**32) / 2**32)
SOURCE_LIMIT = 2**22  # elements the test sends for one run's params and inputs (the bomb is in the intermediates)
EINSUMS = ["i,j->ij", "i,j->", "ij,kl->", "ij,kl->ijkl", "ij,jk->ik", "i,i,i->i"]


def _bomb(g: gp.Graph, recipe: str, n: list[int], subscripts: str) -> gp.Expr:
    """One recipe's loss, for sizes n[0..2] (n[3] is a count)."""
    a, b, c, count = n
    if recipe == "broadcast":  # (batch, a, 1) + (1, b) [* (c, 1, 1)]
        value = g.input("x", (a, 1)) + g.param("w", (1, b))
        return (value * g.param("z", (c, 1, 1))).sum() if count % 2 else value.sum()
    if recipe == "tile":
        return gp.tile(g.param("w", (min(a, 64),)) if count % 2 else g.input("x", (min(a, 64),)), (b, c)).sum()
    if recipe == "pad":
        return (gp.pad(g.input("x", (min(a, 64),)), b) * g.param("w", (1,))).sum()
    if recipe == "broadcast_to":
        return gp.broadcast_to(g.param("w", (1, 1)), (a, b)).sum()
    if recipe == "matmul":  # an outer product (m, 1) @ (1, n), or per example (batch, a, c) @ (c, b)
        if count % 2:
            return (g.input("x", (a, min(c, 8))) @ g.param("w", (min(c, 8), b))).sum()
        return (g.param("a", (a, 1)) @ g.param("b", (1, b))).sum()
    if recipe == "einsum":
        operands = [g.param(f"p{i}", (a,) if len(spec) == 1 else (a, min(b, 64)))
                    for i, spec in enumerate(subscripts.split("->")[0].split(","))]
        return gp.einsum(subscripts, *operands).sum()
    if recipe == "one_hot":
        return (gp.one_hot(g.input("y", (), dtype="int64"), a) * g.param("w", (1,))).sum()
    if recipe == "conv2d":  # a small image, padded and dilated without bound
        x = g.input("x", (1, min(a, 8), min(a, 8)))
        return gp.conv2d(x, g.param("w", (min(count, 4), 1, 3, 3)), padding=b, dilation=min(c, 4)).sum()
    if recipe == "max_pool2d":
        return gp.max_pool2d(g.input("x", (1, min(a, 16), min(a, 16))) * g.param("w", (1,)), b, padding=min(c, b // 2)).sum()
    if recipe == "concat":  # one value, joined up to 1,024 times
        return gp.concat([g.param("w", (a,))] * max(1, min(count, 1024))).sum()
    raise AssertionError(recipe)


def _patch_huge(proto: pb.Graph, draw: Any) -> None:
    """Set an int or int-list attribute of some op node (or a source's shape) to huge values."""
    candidates = [(node, name) for node in proto.nodes for name, value in node.attrs.items()
                  if value.WhichOneof("value") in ("ints", "i")]
    if candidates and draw(st.booleans()):
        node, name = candidates[draw(st.integers(0, len(candidates) - 1))]
        if node.attrs[name].WhichOneof("value") == "i":
            node.attrs[name].i = draw(HUGE_DIMS)
        else:
            values = node.attrs[name].ints.values
            values[:] = [draw(HUGE_DIMS) for _ in values]
    else:
        sources = [node for node in proto.nodes if node.op in ("param", "input")]
        node = sources[draw(st.integers(0, len(sources) - 1))]
        batch = [-1] if node.op == "input" else []
        node.shape[:] = batch + draw(st.lists(HUGE_DIMS, min_size=1, max_size=4))


@st.composite
def bomb_graphs(draw: Any) -> tuple[pb.Graph, gp.Graph | None, int]:
    """A small graph with large values: built by the SDK when its shape rules take the sizes (then it runs),
    else a valid small one with a huge attribute or source shape patched in (refused at registration)."""
    recipe = draw(st.sampled_from(["broadcast", "tile", "pad", "broadcast_to", "matmul", "einsum", "one_hot",
                                   "conv2d", "max_pool2d", "concat"]))
    sizes = [draw(SIZE) for _ in range(3)] + [draw(st.integers(1, 1024))]
    subscripts = draw(st.sampled_from(EINSUMS))
    g = gp.Graph(f"bomb-{recipe}")
    try:
        g.set_loss(_bomb(g, recipe, sizes, subscripts))
        return g.to_proto(), g, draw(st.sampled_from([1, 2, 3, 16, 256, 4096]))
    except (gp.GradpoolError, ValueError, OverflowError):  # the SDK refused the sizes: send them anyway
        g = gp.Graph(f"bomb-{recipe}")
        g.set_loss(_bomb(g, recipe, [2, 2, 2, 2], subscripts))
        proto = g.to_proto()
        _patch_huge(proto, draw)
        return proto, None, 1


def source_arrays(graph: gp.Graph, examples: int) -> tuple[dict, dict] | None:
    """Params and a batch for `graph` (int inputs as zeros: a valid index), or None if they are too big to send."""
    params = {name: (shape, dtype) for name, (shape, dtype) in graph.params.items()}
    inputs = {name: ((examples, *shape), dtype) for name, (shape, dtype) in graph.inputs.items()}
    if sum(math.prod(shape) for shape, _ in [*params.values(), *inputs.values()]) > SOURCE_LIMIT:
        return None
    make = lambda shape, dtype: np.zeros(shape, dtype) if dtype.kind == "i" else np.full(shape, 0.5, dtype)  # noqa: E731
    return ({name: make(*spec) for name, spec in params.items()}, {name: make(*spec) for name, spec in inputs.items()})


def named(arrays: dict[str, np.ndarray]) -> list[pb.NamedTensor]:
    return [pb.NamedTensor(name=k, tensor=tensor_proto(v)) for k, v in arrays.items()]


DEEP_OPS = ["tanh", "sin", "neg", "square", "sigmoid"]


@st.composite
def deep_graphs(draw: Any) -> tuple[pb.Graph, int]:
    """A chain of elementwise ops up to (and past) the node limit, with origins that bring the message near
    the 64 MB limit: what every node costs a server besides its values. Graphs near the limit are rare
    (each takes seconds to check and run) and come in a few sizes, so their ids repeat and the caches
    answer most of them."""
    near_limit = draw(ROLL) < 1 / 6
    count = draw(st.sampled_from([LIMITS.max_nodes - 1, LIMITS.max_nodes, LIMITS.max_nodes + 1] if near_limit
                                 else [10, 100, 1_000, 5_000, 20_000]))
    # 20k nodes of 3,000 bytes: 60 MB, just in. Near the node limit, one width and origin (two graphs that
    # register, their ids repeat): 100k nodes are 200 MB of the 256 MB graph cache by the estimate.
    origin = "o" * (64 if near_limit else draw(st.sampled_from([0, 64, 600, 3_000])))
    width = 4 if near_limit else draw(st.sampled_from([1, 4, 256]))
    graph = pb.Graph(name=f"deep-{count}")
    graph.nodes.add(name="x", op="input", shape=[-1, width], dtype=pb.FLOAT32, origin=origin)
    graph.nodes.add(name="w", op="param", shape=[width], dtype=pb.FLOAT32, origin=origin)
    graph.nodes.add(name="xw", op="mul", inputs=[0, 1], shape=[-1, width], dtype=pb.FLOAT32, origin=origin)
    for i in range(3, count - 1):
        graph.nodes.add(name=f"n{i}", op=DEEP_OPS[i % len(DEEP_OPS)], inputs=[i - 1], shape=[-1, width],
                        dtype=pb.FLOAT32, origin=origin)
    graph.nodes.add(name="loss", op="sum", inputs=[count - 2], dtype=pb.FLOAT32, origin=origin)
    graph.loss = count - 1
    return graph, width


def field(number: int, data: bytes) -> bytes:
    return wire.key(number, wire.LEN) + wire.varint(len(data)) + data


def _sum_graph_bytes(patch: bytes) -> bytes:
    """A valid small graph (w * w summed) with raw bytes appended to its `sum` node."""
    g = gp.Graph("sums")
    w = g.param("w", (4, 3))
    g.set_loss((w * w).sum())
    proto = g.to_proto()
    parts = [field(1, proto.name.encode())]
    for node in proto.nodes:
        parts.append(field(2, node.SerializeToString() + (patch if node.op == "sum" else b"")))
    return b"".join(parts) + wire.key(3, wire.VARINT) + wire.varint(proto.loss)


@st.composite
def raw_bombs(draw: Any) -> tuple[str, str, bytes]:
    """The issue's structure bombs as raw wire bytes (protobuf would take seconds to build them): millions
    of nodes, int lists of 40M values, shapes of 40M dims, millions of tensors in a request, a dataset
    header of 40M dims. Each fits the 64 MB message limit, or just does not."""
    kind = draw(st.sampled_from(["nodes", "attr ints", "shape dims", "tensor dims", "tensors", "header dims"]))
    if kind == "nodes":
        count = draw(st.sampled_from([LIMITS.max_nodes + 1, 10**6, 10**7, 14_000_000]))
        body = field(1, b"many") + field(2, field(1, b"n")) * count  # 14M nodes: 70 MB, past the message limit
    elif kind == "attr ints":
        count = draw(st.sampled_from([LIMITS.max_attr_ints + 1, 10**5, LIMITS.max_graph_ints + 1, 40_000_000]))
        body = _sum_graph_bytes(field(4, field(1, b"axes") + field(2, field(5, field(1, b"\x00" * count)))))
    elif kind == "shape dims":
        count = draw(st.sampled_from([LIMITS.max_rank + 1, 10**5, 40_000_000]))
        body = _sum_graph_bytes(field(5, b"\x01" * count))
    elif kind in ("tensor dims", "tensors"):
        dims = draw(st.sampled_from([LIMITS.max_rank + 1, 10**5, 40_000_000])) if kind == "tensor dims" else 1
        tensor = field(1, b"w") + field(2, wire.key(1, wire.VARINT) + wire.varint(pb.FLOAT32)
                                        + field(2, b"\x01" * dims) + field(3, b"\0\0\0\0"))
        count = 1 if kind == "tensor dims" else draw(st.sampled_from([LIMITS.max_tensors + 1, 3_000_000]))
        body = field(1, TEMPLATES["mlp"].graph_id.encode()) + field(draw(st.sampled_from([2, 3])), tensor) * count
    else:
        count = draw(st.sampled_from([LIMITS.max_rank + 1, 40_000_000]))
        body = field(1, field(1, b"0" * 64) + field(2, field(1, b"x") + field(3, b"\x01" * count)))
    return kind, draw(st.sampled_from(["coordinator", "worker"])), body


@st.composite
def big_batches(draw: Any) -> tuple[str, int]:
    """A template with a batch from one example to past the request memory cap (whole batch on the
    coordinator, each shard on a worker)."""
    return draw(st.sampled_from(sorted(TEMPLATES))), draw(st.sampled_from([1, 1_000, 30_000, 100_000, 400_000]))


LIGHT_CASES = st.one_of(
    st.tuples(st.just("graph"), random_graphs(), st.booleans()),
    st.tuples(st.just("mutated graph"), mutated_graphs(), st.integers(1, 6)),
    st.tuples(st.just("tensors"), gradient_requests()),
    st.tuples(st.just("stream"), frame_streams()),
    st.tuples(st.just("registration"), registrations()),
    st.tuples(st.just("dataset"), dataset_uploads(), st.booleans()),
    st.tuples(st.just("shard"), gradient_requests(), st.integers(0, 1)),
    st.tuples(st.just("bomb"), bomb_graphs(), st.sampled_from(["gradients", "evaluate", "worker"])),
    st.tuples(st.just("big batch"), big_batches()),
)
# Cases that cost a server seconds (a 10M-node graph scanned, a 100k-node graph checked and run): 3%.
HEAVY_CASES = st.one_of(st.tuples(st.just("deep graph"), deep_graphs()), st.tuples(st.just("raw bomb"), raw_bombs()))
CASES = ROLL.flatmap(lambda roll: HEAVY_CASES if roll < 0.03 else LIGHT_CASES)
CASE_KINDS = {"graph", "mutated graph", "tensors", "stream", "registration", "dataset", "shard", "bomb",
              "deep graph", "raw bomb", "big batch"}


def run_case(target: Target, case: tuple) -> None:
    kind = case[0]
    client, coordinator = bearer(CLIENT_TOKEN), bearer(WORKER_TOKEN)  # the coordinator calls workers so
    options = {"timeout": CALL_TIMEOUT}
    if kind == "graph":
        graph, on_worker = case[1], case[2]
        send(kind, lambda: target.coordinator.RegisterGraph(pb.RegisterGraphRequest(graph=graph), metadata=client,
                                                            **options))
        if on_worker:
            key = graph_id(graph)
            send("load graph", lambda: target.workers[0].LoadGraph(pb.LoadGraphRequest(graph_id=key, graph=graph),
                                                                   metadata=coordinator, **options))
    elif kind == "mutated graph":
        (name, graph), examples = case[1], case[2]
        code = send(kind, lambda: target.coordinator.RegisterGraph(pb.RegisterGraphRequest(graph=graph),
                                                                   metadata=client, **options))
        if code == S.OK:  # it registered: run it on the template's data
            _, params, batch = template_request(name, examples)
            body = pb.GradientsRequest(graph_id=graph_id(graph),
                                       params=[pb.NamedTensor(name=k, tensor=tensor_proto(v)) for k, v in params.items()],
                                       inputs=[pb.NamedTensor(name=k, tensor=tensor_proto(v)) for k, v in batch.items()])
            send("mutated graph run", lambda: target.raw("Coordinator", "ComputeGradients")(
                body.SerializeToString(), metadata=client, **options))
    elif kind == "tensors":
        method, body = case[1]
        send(kind, lambda: target.raw("Coordinator", method)(body, metadata=client, **options))
    elif kind == "stream":
        method, frames = case[1]
        service, metadata = ("Worker", coordinator) if method == "RunShardStream" else ("Coordinator", client)
        send(kind, lambda: target.raw(service, method, worker=0 if service == "Worker" else -1, stream=True)(
            iter(frames), metadata=metadata, **options))
    elif kind == "registration":
        method, request, metadata = case[1]
        holder: dict = {}

        def call() -> Any:
            holder["response"] = getattr(target.coordinator, method)(request, metadata=metadata, **options)
        if send(kind, call) == S.OK and method == "RegisterWorker":
            # A fake that got in leaves again at once, so later cases see the real pool.
            response = holder["response"]
            send("deregistration", lambda: target.coordinator.DeregisterWorker(
                pb.DeregisterWorkerRequest(worker_id=response.worker_id, lease_secret=response.lease_secret),
                metadata=bearer(WORKER_TOKEN), **options))
    elif kind == "dataset":
        chunks, on_worker = case[1], case[2]
        if on_worker:
            send(kind, lambda: target.workers[1].LoadDataset(iter(chunks), metadata=coordinator, **options))
        else:
            send(kind, lambda: target.coordinator.UploadDataset(iter(chunks), metadata=client, **options))
    elif kind == "shard":
        (method, body), worker = case[1], case[2]
        # The same bodies straight to a worker, as the coordinator would send a shard (fields 1-3 line up).
        send(kind, lambda: target.raw("Worker", "RunShard", worker=worker)(body, metadata=coordinator, **options))
    elif kind == "bomb":
        (proto, graph, examples), how = case[1], case[2]
        if send(kind, lambda: target.coordinator.RegisterGraph(pb.RegisterGraphRequest(graph=proto),
                                                               metadata=client, **options)) != S.OK or graph is None:
            return
        arrays = source_arrays(graph, examples) or source_arrays(graph, 1)
        if arrays is None:
            return
        params, batch = arrays
        key = graph_id(proto)
        if how == "gradients":
            body = pb.GradientsRequest(graph_id=key, params=named(params), inputs=named(batch))
            send("bomb run", lambda: target.raw("Coordinator", "ComputeGradients")(
                body.SerializeToString(), metadata=client, **options))
        elif how == "evaluate":  # forward only, the value just before the loss
            body = pb.EvaluateRequest(graph_id=key, params=named(params), inputs=named(batch),
                                      outputs=[proto.nodes[-2].name])
            send("bomb run", lambda: target.raw("Coordinator", "Evaluate")(
                body.SerializeToString(), metadata=client, **options))
        elif send("bomb load", lambda: target.workers[1].LoadGraph(pb.LoadGraphRequest(graph_id=key, graph=proto),
                                                                   metadata=coordinator, **options)) == S.OK:
            shard = pb.ShardRequest(graph_id=key, params=named(params), inputs=named(batch),
                                    global_batch=len(next(iter(batch.values()), ())) or 1,
                                    include_batch_independent=True)  # straight to a worker: its own estimate
            send("bomb run", lambda: target.raw("Worker", "RunShard", worker=1)(
                shard.SerializeToString(), metadata=coordinator, **options))
    elif kind == "deep graph":
        proto, width = case[1]
        if send(kind, lambda: target.coordinator.RegisterGraph(pb.RegisterGraphRequest(graph=proto),
                                                               metadata=client, **options)) == S.OK:
            body = pb.GradientsRequest(graph_id=graph_id(proto), params=named({"w": np.full(width, 0.5, np.float32)}),
                                       inputs=named({"x": np.full((4, width), 0.5, np.float32)}))
            send("deep graph run", lambda: target.raw("Coordinator", "ComputeGradients")(
                body.SerializeToString(), metadata=client, **options))
    elif kind == "raw bomb":
        what, where, body = case[1]
        worker = where == "worker"
        metadata = coordinator if worker else client
        if what == "header dims":
            method = target.raw("Worker", "LoadDataset", worker=1, stream="unary") if worker else \
                target.raw("Coordinator", "UploadDataset", stream="unary")
            send(kind, lambda: method(iter([body]), metadata=metadata, **options))
        elif what in ("tensor dims", "tensors"):
            method = target.raw("Worker", "RunShard", worker=1) if worker else target.raw("Coordinator",
                                                                                          "ComputeGradients")
            send(kind, lambda: method(body, metadata=metadata, **options))
        elif worker:
            send(kind, lambda: target.raw("Worker", "LoadGraph", worker=1)(field(1, b"0" * 64) + field(2, body),
                                                                           metadata=metadata, **options))
        else:
            send(kind, lambda: target.raw("Coordinator", "RegisterGraph")(field(1, body), metadata=metadata,
                                                                         **options))
    elif kind == "big batch":
        name, examples = case[1]
        graph, params, batch = template_request(name, examples)
        # registered again first: big graphs may have pushed the template out of the cache
        send("big batch register", lambda: target.coordinator.RegisterGraph(
            pb.RegisterGraphRequest(graph=graph.to_proto()), metadata=client, **options))
        body = pb.GradientsRequest(graph_id=graph.graph_id, params=named(params), inputs=named(batch))
        send(kind, lambda: target.raw("Coordinator", "ComputeGradients")(body.SerializeToString(), metadata=client,
                                                                         **options))
    else:
        raise AssertionError(kind)


# ------------------------------------------------------------------ regressions found by the fuzz


def lying_frames(total: int) -> Iterator[bytes]:
    yield pb.Frame(total_bytes=total, data=b"\x0a\x03abc").SerializeToString()


def test_a_stream_that_claims_a_huge_total_is_not_allocated(target: Target):
    """Found by the fuzz: the first frame's total (up to 2 GiB) was allocated, and zeroed, before any data
    came, so a 30-byte stream cost the coordinator 1.9 GB of resident memory (and a worker the same)."""
    pid = target.cluster.coordinator.pid
    before = memory(pid)["VmRSS"]
    call = target.raw("Coordinator", "ComputeGradientsStream", stream=True)
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as caught:
            collections.deque(call(lying_frames(2**31 - 2), metadata=bearer(CLIENT_TOKEN), timeout=30), maxlen=0)
        assert caught.value.code() == S.INVALID_ARGUMENT and "ended after" in caught.value.details()
    assert memory(pid)["VmHWM"] - before < 200 * 2**20
    worker = target.cluster.workers[0].pid
    before = memory(worker)["VmRSS"]
    with pytest.raises(grpc.RpcError) as caught:
        collections.deque(target.raw("Worker", "RunShardStream", worker=0, stream=True)(
            lying_frames(2**31 - 2), metadata=bearer(WORKER_TOKEN), timeout=30), maxlen=0)
    assert caught.value.code() == S.INVALID_ARGUMENT
    assert memory(worker)["VmHWM"] - before < 200 * 2**20


def test_a_dataset_header_that_claims_gigabytes_is_not_allocated(target: Target):
    """Found by the fuzz: an upload's header declaring up to the cache size (4 GiB by default) had that
    much allocated and zeroed before its first data chunk."""
    pid = target.cluster.coordinator.pid
    before = memory(pid)["VmRSS"]
    header = pb.DatasetHeader(dataset_id="0" * 64, arrays=[pb.ArraySpec(name="x", dtype=pb.FLOAT64,
                                                                        shape=[2**18, 1024])])  # 2 GiB
    with pytest.raises(grpc.RpcError) as caught:
        target.coordinator.UploadDataset(iter([pb.DatasetChunk(header=header, data=b"12345678")]),
                                         metadata=bearer(CLIENT_TOKEN), timeout=30)
    assert caught.value.code() == S.INVALID_ARGUMENT and "ended after" in caught.value.details()
    assert memory(pid)["VmHWM"] - before < 200 * 2**20


# ------------------------------------------------------------------ the fuzz


@pytest.mark.timeout(BUDGET_SECONDS + 150)  # the run, the last batch, the checks (the suite's default is 120 s)
def test_fuzz_the_live_servers(target: Target):
    cluster = target.cluster
    processes = {"coordinator": cluster.coordinator, **{f"worker{i}": w for i, w in enumerate(cluster.workers)}}
    start = {name: memory(p.pid) for name, p in processes.items()}
    CODES.clear()
    SECONDS.clear()
    stop = time.monotonic() + BUDGET_SECONDS
    batches = 0
    peaks = {name: (0, "") for name in processes}  # the largest peak growth within one case, and its kind

    @settings(max_examples=25, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(case=CASES)
    def fuzz(case: tuple) -> None:
        before = {}
        for name, process in processes.items():
            reset_peak(process.pid)
            before[name] = memory(process.pid)["VmRSS"]
        began = time.monotonic()
        run_case(target, case)
        SECONDS[case[0]] += time.monotonic() - began
        for name, process in processes.items():
            grown = memory(process.pid)["VmHWM"] - before[name]
            if grown > peaks[name][0]:
                peaks[name] = (grown, case[0] + (f" {case[1][0]}" if case[0] == "raw bomb" else ""))
            assert grown < PEAK_BOUND, f"{name} peaked +{grown / MB:.0f} MB in a {case[0]} case"

    while time.monotonic() < stop:  # hypothesis runs in batches, so the wall clock bounds the run
        fuzz()
        batches += 1
        assert all(p.alive() for p in processes.values()), "a server died"

    end = {name: memory(p.pid) for name, p in processes.items()}
    cases = sum(count for (kind, _), count in CODES.items() if kind in CASE_KINDS)
    by_code = collections.Counter()
    for (_, code), count in CODES.items():
        by_code[code] += count
    print(f"\nfuzz: {cases} cases ({sum(CODES.values())} calls) in {BUDGET_SECONDS:.0f}s, {batches} batches; "
          f"codes {dict(by_code.most_common())}")
    print("fuzz: by case " + ", ".join(f"{kind} {code} {count}" for (kind, code), count in sorted(CODES.items())))
    print("fuzz: seconds by case " + ", ".join(f"{kind} {seconds:.1f}" for kind, seconds in SECONDS.most_common()))
    for name in processes:
        print(f"fuzz: {name}: RSS {start[name]['VmRSS'] / MB:.0f} -> {end[name]['VmRSS'] / MB:.0f} MB, "
              f"largest peak in one case +{peaks[name][0] / MB:.0f} MB ({peaks[name][1]})")
    assert cases >= 50, "the fuzz hardly ran"  # (a 100k-node graph takes a loaded machine 15 s of the 30)
    assert by_code["OK"] > 0 and by_code["INVALID_ARGUMENT"] > 0
    for name in processes:
        assert end[name]["VmRSS"] - start[name]["VmRSS"] < RSS_BOUND, name
    # Still serving, and right.
    graph = TEMPLATES["mlp"]
    params, batch = params_for(graph), batch_for(graph, 24, seed=5)
    with cluster.client(timeout=60) as service:
        loss, grads = service.gradients(graph, params, batch)
        assert len(service.status().live_workers) == 2
    want_loss, want = gp.local_gradients(graph, params, batch, shards=2)
    assert loss == want_loss and all(grads[k].tobytes() == want[k].tobytes() for k in want)
