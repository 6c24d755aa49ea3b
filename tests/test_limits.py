"""Limits before allocation (the security issue, item 5), each attack against
real server processes, measuring the attacked server's peak memory (VmHWM,
reset before each attack) and its memory after (VmRSS). Before the limits, a
graph message's repeated fields were parsed by protobuf (and copied into
Python tuples) before any limit was looked at, a graph broadcasting to a
huge intermediate ran, and numpy's MemoryError came back as INTERNAL."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

import gradpool as gp
from gradpool.cluster import LocalCluster
from gradpool.protos import gradpool_pb2 as pb
from gradpool.protos import gradpool_pb2_grpc as pb_grpc
from gradpool.worker import wire
from gradpool.worker.engine import Program, graph_id, to_named
from gradpool.worker.engine.limits import LIMITS
from gradpool.worker.rpc import LruCache, method_path

from models import batch_for, params_for, softmax_mlp

MB = 2**20
# What an attacked server may grow by, at its peak, while refusing: the
# message itself is held by gRPC and once as bytes (50 MB attacks).
PEAK_BOUND = 192 * MB
# What it may still hold after (allocators keep some freed buffers for reuse;
# the servers below run with glibc's own policy, --keep-freed-mb 0, so that
# what is measured is what the attack made them hold, not what they keep on
# purpose: with the default 512, a server's resident size stays near its
# peak instead).
KEPT_BOUND = 128 * MB


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) * 1024
    return values


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as clear:  # "5": reset VmHWM to the current RSS
        clear.write("5")


class Measured:
    """The peak growth and the growth kept of a process over a block."""

    def __init__(self, pid: int):
        self.pid = pid

    def __enter__(self) -> "Measured":
        reset_peak(self.pid)
        self.before = memory(self.pid)["VmRSS"]
        return self

    def __exit__(self, *exc: object) -> None:
        after = memory(self.pid)
        self.peak = after["VmHWM"] - self.before
        self.kept = after["VmRSS"] - self.before
        print(f"pid {self.pid}: peak +{self.peak / MB:.1f} MB, kept +{self.kept / MB:.1f} MB")


def field(number: int, data: bytes) -> bytes:
    return wire.key(number, wire.LEN) + wire.varint(len(data)) + data


def raw_call(channel: grpc.Channel, service: str, method: str, data: bytes) -> grpc.RpcError:
    call = channel.unary_unary(method_path(service, method), request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        call(data, timeout=120)
    return caught.value


def graph_bytes(graph: pb.Graph, patch: dict[int, bytes]) -> bytes:
    """`graph` serialized node by node, with raw bytes appended to some nodes
    (a later occurrence of a field: protobuf appends repeated values, and the
    last map entry of a key wins)."""
    parts = [field(1, graph.name.encode())]
    for i, node in enumerate(graph.nodes):
        parts.append(field(2, node.SerializeToString() + patch.get(i, b"")))
    parts.append(wire.key(3, wire.VARINT) + wire.varint(graph.loss))
    return b"".join(parts)


def sum_graph() -> tuple[pb.Graph, int]:
    """A valid graph and the index of its `sum` node."""
    g = gp.Graph("sums")
    w = g.param("w", (4, 3))
    g.set_loss((w * w).sum())
    proto = g.to_proto()
    return proto, next(i for i, node in enumerate(proto.nodes) if node.op == "sum")


@pytest.fixture(scope="module")
def cluster():
    """Open mode (no tokens), so that a worker's LoadGraph can be called directly too."""
    keep = ["--keep-freed-mb", "0"]
    with LocalCluster(workers=1, coordinator_args=["--max-request-memory-mb", "256", *keep],
                      worker_args=["--max-request-memory-mb", "256", *keep]) as running:
        yield running


def targets(cluster: LocalCluster):
    """(process, service, method, framing) of the two servers that take graphs."""
    return [(cluster.coordinator, "Coordinator", "RegisterGraph", lambda g: field(1, g)),
            (cluster.workers[0], "Worker", "LoadGraph",
             lambda g: field(1, b"0" * 64) + field(2, g))]


def attack(cluster: LocalCluster, graph: bytes) -> list[tuple[grpc.RpcError, Measured]]:
    results = []
    for process, service, method, frame in targets(cluster):
        with grpc.insecure_channel(process.address, options=[("grpc.max_send_message_length", 64 * MB)]) as channel:
            with Measured(process.pid) as measured:
                err = raw_call(channel, service, method, frame(graph))
        results.append((err, measured))
    return results


def assert_refused_cheaply(results, words: str) -> None:
    for err, measured in results:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert words in err.details() and len(err.details()) < 400
        assert measured.peak < PEAK_BOUND and measured.kept < KEPT_BOUND


def still_serves(cluster: LocalCluster) -> None:
    graph = softmax_mlp()
    with cluster.client() as client:
        result = client.gradients(graph, params_for(graph), batch_for(graph, 8))
    assert np.isfinite(result.loss)


# ------------------------------------------------------------------ the graph's structure, before parsing


def test_a_graph_of_ten_million_nodes_is_refused_before_it_is_parsed(cluster) -> None:
    """The attack: a 5M-node graph cost the coordinator +1.3 GB before the node limit was looked at.
    Ten million nodes of five bytes fit one 50 MB message."""
    node = field(2, field(1, b"n"))
    graph = field(1, b"many") + node * 10_000_000
    results = attack(cluster, graph)
    assert_refused_cheaply(results, f"more than {LIMITS.max_nodes} nodes; the limit is {LIMITS.max_nodes}")
    still_serves(cluster)


def test_an_attribute_list_repeated_forty_million_times_is_refused(cluster) -> None:
    """The attack: a `sum` node whose `axes` list held 40M values was accepted and cached
    (+2.0 GB on the coordinator, +1.2 GB on a worker)."""
    proto, index = sum_graph()
    axes = field(4, field(1, b"axes") + field(2, field(5, field(1, b"\x00" * 40_000_000))))
    results = attack(cluster, graph_bytes(proto, {index: axes}))
    assert_refused_cheaply(results, f"the limit is {LIMITS.max_attr_ints}")
    assert "nodes[" in results[0][0].details()  # where: the node's index
    still_serves(cluster)


def test_a_shape_of_forty_million_dims_is_refused(cluster) -> None:
    """The attack: a node shape with 40M dims cost +1.5 GB."""
    proto, index = sum_graph()
    results = attack(cluster, graph_bytes(proto, {index: field(5, b"\x01" * 40_000_000)}))
    assert_refused_cheaply(results, f"the limit is {LIMITS.max_rank}")


def test_a_dataset_header_of_forty_million_dims_is_refused(cluster) -> None:
    header = field(1, field(1, b"0" * 64) + field(2, field(1, b"x") + field(3, b"\x01" * 40_000_000)))
    with grpc.insecure_channel(cluster.address, options=[("grpc.max_send_message_length", 64 * MB)]) as channel:
        upload = channel.stream_unary(method_path("Coordinator", "UploadDataset"), request_serializer=None,
                                      response_deserializer=None)
        with Measured(cluster.coordinator.pid) as measured, pytest.raises(grpc.RpcError) as caught:
            upload(iter([header]), timeout=120)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"the limit is {LIMITS.max_rank}" in caught.value.details()
    assert measured.peak < PEAK_BOUND and measured.kept < KEPT_BOUND


def test_a_request_of_millions_of_tiny_tensors_is_refused(cluster) -> None:
    """Each named tensor becomes a few Python objects: their number is bounded before they are built."""
    tensor = field(1, b"") + field(2, wire.key(1, wire.VARINT) + wire.varint(pb.FLOAT32) + field(3, b"\0\0\0\0"))
    request = field(1, b"0" * 64) + field(2, tensor) * 3_000_000
    with grpc.insecure_channel(cluster.address, options=[("grpc.max_send_message_length", 64 * MB)]) as channel:
        with Measured(cluster.coordinator.pid) as measured:
            err = raw_call(channel, "Coordinator", "ComputeGradients", request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"more than {LIMITS.max_tensors} params" in err.details()
    assert measured.peak < PEAK_BOUND


# ------------------------------------------------------------------ memory: the static estimate


def broadcast_bomb() -> gp.Graph:
    """190 KB of nothing much: (batch, 600, 1) + (1, 600) is 1.4 MB a row."""
    g = gp.Graph("bomb")
    x = g.input("x", (600, 1))
    w = g.param("w", (1, 600))
    g.set_loss((x + w).sum())
    return g


def test_a_broadcast_to_a_gigabyte_is_refused_before_it_runs(cluster) -> None:
    """The attack: a small graph that broadcasts to a 1.15 GB intermediate ran on a worker."""
    graph = broadcast_bomb()
    params = {"w": np.ones((1, 600), np.float32)}
    worker = cluster.workers[0]
    with cluster.client() as client:
        client.register(graph)
        with Measured(worker.pid) as on_worker, Measured(cluster.coordinator.pid) as on_coordinator:
            with pytest.raises(gp.ServiceError) as caught:
                client.gradients(graph, params, {"x": np.ones((800, 600, 1), np.float32)})
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        message = str(caught.value)
        assert "(batch, 600, 600)" in message and "add" in message and "--max-request-memory-mb" in message
        assert on_worker.peak < 64 * MB and on_coordinator.peak < 64 * MB
        # The same graph with a batch that fits runs, exactly.
        small = {"x": np.ones((20, 600, 1), np.float32)}
        result = client.gradients(graph, params, small)
        assert result.loss == pytest.approx(gp.local_gradients(graph, params, small)[0])
        # A forward-only run (Evaluate) is estimated the same way.
        [added] = [node.name for node in graph.to_proto().nodes if node.op == "add"]
        with pytest.raises(gp.ServiceError) as caught:
            client.forward(graph, params, {"x": np.ones((800, 600, 1), np.float32)}, [added])
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def four_tib() -> gp.Graph:
    g = gp.Graph("tebibytes")
    a = g.param("a", (2**20, 1))
    b = g.param("b", (1, 2**20))
    g.set_loss((a + b).sum())  # (2**20, 2**20) of float32: 4 TiB, whatever the batch
    return g


def eight_gib_a_row() -> gp.Graph:
    g = gp.Graph("gibibytes")
    x = g.input("x", (2**15, 1))
    w = g.param("w", (1, 2**16))
    g.set_loss((x + w).sum())  # (batch, 2**15, 2**16) of float32: 8 GiB an example
    return g


def test_a_graph_whose_one_value_is_terabytes_is_refused_at_registration(cluster) -> None:
    """The attack: numpy was asked for 4 TiB, and the MemoryError came back INTERNAL.
    A shape of 2**40 elements is refused on the wire; one of 8 GiB an example
    by the memory cap, before anything runs."""
    for graph, code, words in [(four_tib(), grpc.StatusCode.INVALID_ARGUMENT, "1099511627776 elements"),
                               (eight_gib_a_row(), grpc.StatusCode.RESOURCE_EXHAUSTED, "8.0 GiB per example")]:
        proto = graph.to_proto()
        for process, service, method, _ in targets(cluster):
            message = (pb.LoadGraphRequest(graph_id=graph_id(proto), graph=proto) if method == "LoadGraph"
                       else pb.RegisterGraphRequest(graph=proto))
            with grpc.insecure_channel(process.address) as channel:
                err = raw_call(channel, service, method, message.SerializeToString())
            assert err.code() == code, err.details()
            assert words in err.details(), err.details()
    still_serves(cluster)


def test_a_memory_error_while_running_is_resource_exhausted_not_internal() -> None:
    """With the estimate's cap lifted, numpy's own MemoryError (512 GiB, more
    than the machine has) is the server's capacity, not a bug: RESOURCE_EXHAUSTED,
    and the worker serves on."""
    graph = eight_gib_a_row()
    proto = graph.to_proto()
    params = {"w": np.ones((1, 2**16), np.float32)}
    inputs = {"x": np.ones((64, 2**15, 1), np.float32)}
    with LocalCluster(workers=1, worker_args=["--max-request-memory-mb", "1e12"]) as running:
        with grpc.insecure_channel(running.workers[0].address) as channel:
            stub = pb_grpc.WorkerStub(channel)
            stub.LoadGraph(pb.LoadGraphRequest(graph_id=graph_id(proto), graph=proto), timeout=60)
            request = pb.ShardRequest(graph_id=graph_id(proto), params=to_named(params), inputs=to_named(inputs),
                                      global_batch=64, include_batch_independent=True)
            with pytest.raises(grpc.RpcError) as caught:
                stub.RunShard(request, timeout=120)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
        assert "ran out of memory" in caught.value.details()
        still_serves(running)


def test_the_estimate_counts_values_alive_at_once() -> None:
    """Forward values the backward pass reads stay; the others are dropped as the run goes."""
    g = gp.Graph()
    x = g.input("x", (100,))
    w = g.param("w", (100,))
    h = gp.tanh(x * w)  # kept for the backward pass (tanh's VJP reads it)
    g.set_loss(h.sum())
    program = Program(g.to_proto())
    per_row = 100 * 4  # float32
    # x, x*w, tanh and, going back, an adjoint and a VJP result per node: a few rows, never a hundred.
    assert 3 * per_row * 1000 <= program._plan((), frozenset(), True).memory(1000) <= 8 * per_row * 1000 + 10_000
    with pytest.raises(gp.GradpoolError, match="the largest value is node"):
        program.check_memory(1000, 2 * per_row * 1000)
    program.check_memory(1000, 8 * per_row * 1000 + 10_000)


# ------------------------------------------------------------------ caches by bytes


def test_the_graph_cache_is_bounded_by_bytes() -> None:
    cache: LruCache[str] = LruCache(100, what="graph", max_bytes=10 * MB)
    for i in range(5):
        cache.put(f"g{i}", "x", 3 * MB)
    assert len(cache) == 3 and cache.nbytes == 9 * MB and cache.get("g0") is None and cache.get("g4") == "x"
    with pytest.raises(gp.GradpoolError, match="larger than the 10 MB"):
        cache.put("huge", "x", 11 * MB)


def test_a_coordinator_keeps_graphs_by_bytes() -> None:
    """Graphs of 1 MB consts: a 3 MB cache keeps the last two, and refuses a graph larger than all of it."""
    def const_graph(seed: int, size: int) -> gp.Graph:
        g = gp.Graph(f"c{seed}")
        w = g.param("w", (size,))
        g.set_loss((w * np.full(size, float(seed))).sum())
        return g

    with LocalCluster(workers=0, coordinator_args=["--graph-cache-mb", "3"]) as running:
        with running.client() as client:
            for seed in range(4):
                client.register(const_graph(seed, 2**17))  # 1 MB of float64
            assert running.status().graphs_registered == 2
            with pytest.raises(gp.ServiceError) as caught:
                client.register(const_graph(9, 2**19))  # 4 MB
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


# ------------------------------------------------------------------ temporaries the estimate must count (found by the fuzz)


def padded_pool() -> gp.Graph:
    """4,096 channels of an (8, 8) image, pooled by a 256 x 256 window padded by half of it: a (4096, 1, 1)
    output of a 1.1 GB padded input (4 bytes of input a channel, 1 MB of values in all)."""
    g = gp.Graph("padded-pool")
    x = gp.broadcast_to(g.input("x", (1, 8, 8)) * g.param("w", (1,)), (4096, 8, 8))
    g.set_loss(gp.max_pool2d(x, 256, padding=128).sum())
    return g


def padded_conv() -> gp.Graph:
    """A (4, 4) output of a 3x3 conv dilated by 8192 over an image padded by 8192: a 1 GiB padded buffer."""
    g = gp.Graph("padded-conv")
    x = g.input("x", (1, 4, 4))
    g.set_loss(gp.conv2d(x, g.param("w", (1, 1, 3, 3)), padding=8192, dilation=8192).sum())
    return g


def test_padding_that_dwarfs_a_small_output_is_counted_before_it_runs(cluster) -> None:
    """Found by the fuzz: the estimate counted values only, so conv's and pooling's padded inputs (and
    im2col's columns) ran uncounted: a graph of (1, 1) values asked numpy for 2 TiB (RESOURCE_EXHAUSTED
    only because the machine lacked it; 1 GiB was simply allocated). Op.scratch now adds them."""
    for graph in (padded_pool(), padded_conv()):
        params = params_for(graph)
        batch = {"x": np.ones((1, 1, 8, 8) if graph.name == "padded-pool" else (1, 1, 4, 4), np.float32)}
        with cluster.client() as client:
            with Measured(cluster.workers[0].pid) as on_worker, Measured(cluster.coordinator.pid) as on_coordinator:
                with pytest.raises(gp.ServiceError) as caught:
                    client.gradients(graph, params, batch)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, str(caught.value)
        assert "temporaries" in str(caught.value) and "--max-request-memory-mb" in str(caught.value)
        assert on_worker.peak < 64 * MB and on_coordinator.peak < 64 * MB
    # The same ops with a padding that fits still run (and agree with one process).
    g = gp.Graph("small-padding")
    x = g.input("x", (1, 6, 6))
    g.set_loss(gp.max_pool2d(gp.conv2d(x, g.param("w", (2, 1, 3, 3)), padding=2, dilation=2), 4, padding=2).sum())
    params, batch = params_for(g), {"x": np.random.default_rng(0).normal(size=(4, 1, 6, 6)).astype(np.float32)}
    with cluster.client() as client:
        result = client.gradients(g, params, batch)
    loss, want = gp.local_gradients(g, params, batch)
    assert result.loss == pytest.approx(loss) and np.allclose(result.grads["w"], want["w"], rtol=1e-5)



def test_a_kernel_of_more_taps_than_the_limit_is_refused_at_registration(cluster) -> None:
    """Found by the fuzz: pooling loops over its window's taps, so a 2**14 x 2**14 window (of an 8 x 8 image
    padded by half the window) was 2**28 Python iterations on a worker."""
    g = gp.Graph("many-taps")
    x = g.input("x", (1, 8, 8))
    g.set_loss(x.sum())
    proto = g.to_proto()  # x, its sum; then a pool of x and its sum as the loss, by hand (the SDK refuses it)
    node = proto.nodes.add(name="pool", op="max_pool2d", inputs=[0], shape=[-1, 1, 1, 1], dtype=pb.FLOAT32)
    node.attrs["kernel"].ints.values.extend([2**14])
    node.attrs["padding"].ints.values.extend([2**13])
    proto.nodes.add(name="loss", op="sum", inputs=[2], dtype=pb.FLOAT32)
    proto.loss = 3
    with grpc.insecure_channel(cluster.address) as channel:
        err = raw_call(channel, "Coordinator", "RegisterGraph", pb.RegisterGraphRequest(graph=proto).SerializeToString())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "268435456 taps; the limit is 65536" in err.details()
    with pytest.raises(gp.GraphError, match="taps"):
        gp.conv2d(x, g.param("w", (1, 1, 300, 300)))


def test_a_program_with_many_kinds_of_run_stays_within_its_footprint() -> None:
    """Found by the fuzz (a coordinator kept 540 MB with a 256 MB graph cache): each kind of run (forward-only
    runs are keyed by the outputs asked for) kept a Plan of about 0.55 KB a node, up to sixteen, beyond the
    footprint the caches count. Now the Plans kept are bounded by steps as well."""
    import tracemalloc

    n = 3_000  # the footprint and the plans both grow with n: their ratio is what is tested
    graph = pb.Graph(name="chain")
    graph.nodes.add(name="x", op="input", shape=[-1, 4], dtype=pb.FLOAT32)
    graph.nodes.add(name="w", op="param", shape=[4], dtype=pb.FLOAT32)
    graph.nodes.add(name="xw", op="mul", inputs=[0, 1], shape=[-1, 4], dtype=pb.FLOAT32)
    for i in range(3, n - 1):
        graph.nodes.add(name=f"n{i}", op="tanh", inputs=[i - 1], shape=[-1, 4], dtype=pb.FLOAT32)
    graph.nodes.add(name="loss", op="sum", inputs=[n - 2], dtype=pb.FLOAT32)
    graph.loss = n - 1
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        program = Program(graph)
        program.check_memory(8, 2**40)  # the gradient run's plan
        for i in range(16):  # sixteen forward-only runs, each asking for another output near the end
            program.check_memory(8, 2**40, gradients=False, outputs=[f"n{n - 3 - i}"])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    print(f"held {held / MB:.1f} MB, footprint {program.footprint / MB:.1f} MB")
    assert held < program.footprint
