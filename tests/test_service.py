"""The distributed service end to end: a real coordinator and real worker
processes over localhost (LocalCluster), checked against the in-process
`local_gradients` / `local_forward`.

One cluster serves the whole module; tests scale it with add_worker /
stop_worker instead of restarting it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

import gradpool as gp
from gradpool.cluster import LocalCluster
from gradpool.remote import ServiceError
from gradpool.protos import gradpool_pb2 as pb
from gradpool.protos import gradpool_pb2_grpc as pb_grpc
from gradpool.worker.engine import graph_id, to_named, to_tensor

from models import batch_for, logistic_regression, params_for, softmax_mlp, two_layer_net

MODELS = {
    "logistic_regression": logistic_regression,
    "two_layer_net": two_layer_net,
    "softmax_mlp": softmax_mlp,
}
RTOL = {"float64": 1e-10, "float32": 1e-5}
BATCH_SIZES = [1, 3, 7, 64, 1000]
WORKER_COUNTS = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(workers=1) as running:
        yield running


@pytest.fixture(scope="module")
def service(cluster):
    with cluster.client(timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def workers(request):
    """The worker count a parametrized test wants (module scope groups the cases by it)."""
    return request.param


@pytest.fixture
def pool(cluster, workers):
    cluster.scale_to(workers)
    return workers


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float, what: str) -> None:
    scale = float(np.max(np.abs(expected))) if np.size(expected) else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def assert_matches_local(result, graph, params, batch, rtol):
    loss, grads = gp.local_gradients(graph, params, batch)
    assert result.loss == pytest.approx(loss, rel=rtol, abs=rtol)
    assert sorted(result.grads) == sorted(grads)
    for name, expected in grads.items():
        assert result.grads[name].dtype == expected.dtype
        assert result.grads[name].shape == expected.shape
        assert_close(result.grads[name], expected, rtol, f"gradient of {name}")


def worker_stub(address: str) -> pb_grpc.WorkerStub:
    return pb_grpc.WorkerStub(grpc.insecure_channel(address))


def coordinator_stub(cluster: LocalCluster) -> pb_grpc.CoordinatorStub:
    return pb_grpc.CoordinatorStub(grpc.insecure_channel(cluster.address))


# ---------------------------------------------------------------- correctness

@pytest.mark.parametrize("workers", WORKER_COUNTS, indirect=True, scope="module")
@pytest.mark.parametrize("examples", BATCH_SIZES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_gradients_match_local_gradients(service, pool, model, dtype, examples):
    graph = MODELS[model](dtype=dtype)
    params, batch = params_for(graph, seed=examples), batch_for(graph, examples, seed=examples)
    result = service.gradients(graph, params, batch)
    assert result.examples == examples
    assert sum(s.examples for s in result.shards) == examples
    assert len(result.shards) == min(pool, examples)
    assert [s.start for s in result.shards] == sorted(s.start for s in result.shards)
    assert_matches_local(result, graph, params, batch, RTOL[dtype])


def test_repeated_calls_are_bitwise_identical_and_equal_the_sharded_reference(cluster, service):
    cluster.scale_to(3)
    graph = softmax_mlp()
    params, batch = params_for(graph), batch_for(graph, 64)
    first = service.gradients(graph, params, batch)
    # Equal capacities: the service's shards are local_gradients(shards=3)'s,
    # summed in the same order, so the bits agree too.
    loss, grads = gp.local_gradients(graph, params, batch, shards=3)
    assert first.loss == loss
    for _ in range(4):
        again = service.gradients(graph, params, batch)
        assert again.loss == first.loss
        for name in grads:
            assert again.grads[name].tobytes() == first.grads[name].tobytes()
            assert first.grads[name].tobytes() == grads[name].tobytes()


# ---------------------------------------------------------------- graph caching

def test_a_20_step_loop_sends_the_graph_once_per_worker(cluster, service):
    cluster.scale_to(3)
    graph = softmax_mlp(h=19)  # a graph no other test registers
    key = graph.graph_id
    before = {w.address: w.graphs_sent for w in cluster.status().workers}
    loaded_before = {a: worker_stub(a).GetWorkerStatus(pb.WorkerStatusRequest()).graphs_loaded
                     for a in cluster.worker_addresses}
    params = params_for(graph)
    for step in range(20):
        service.gradients(graph, params, batch_for(graph, 30, seed=step))
    after = {w.address: w.graphs_sent for w in cluster.status().workers}
    assert {a: after[a] - before[a] for a in after} == {a: 1 for a in cluster.worker_addresses}
    for address in cluster.worker_addresses:
        status = worker_stub(address).GetWorkerStatus(pb.WorkerStatusRequest())
        assert status.graphs_loaded - loaded_before[address] == 1
    assert key in service._registered


def test_concurrent_first_requests_send_the_graph_once_and_all_match(cluster):
    cluster.scale_to(2)
    graph = two_layer_net(h=7)  # a graph no other test registers
    params = params_for(graph)
    batches = [batch_for(graph, 33, seed=i) for i in range(8)]
    before = {w.address: w.graphs_sent for w in cluster.status().workers}
    with cluster.client(timeout=60) as client, ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda b: client.gradients(graph, params, b), batches))
    for result, batch in zip(results, batches):
        assert_matches_local(result, graph, params, batch, RTOL["float64"])
    after = {w.address: w.graphs_sent for w in cluster.status().workers}
    assert {a: after[a] - before[a] for a in after} == {a: 1 for a in cluster.worker_addresses}


def test_a_worker_that_lost_the_graph_is_sent_it_again(cluster, service):
    cluster.scale_to(1)
    small = cluster.add_worker(args=["--max-graphs", "1"])  # its LRU holds one graph
    try:
        first, second = softmax_mlp(h=21), softmax_mlp(h=22)
        p1, p2 = params_for(first), params_for(second)
        batch = batch_for(first, 8)
        service.gradients(first, p1, batch)
        service.gradients(second, p2, batch)  # evicts `first` on the small worker
        result = service.gradients(first, p1, batch)  # NOT_FOUND -> LoadGraph -> retry
        assert_matches_local(result, first, p1, batch, RTOL["float64"])
        on_small = [s for s in result.shards if small.address in s.worker]
        assert [s.attempts for s in on_small] == [2]
        sent = {w.address: w.graphs_sent for w in cluster.status().workers}
        assert sent[small.address] == 3
    finally:
        cluster.stop_worker(cluster.workers.index(small))


# ---------------------------------------------------------------- a changing pool

def test_workers_join_and_leave_between_requests(cluster, service):
    cluster.scale_to(2)
    graph = two_layer_net()
    params, batch = params_for(graph), batch_for(graph, 90)
    result = service.gradients(graph, params, batch)
    assert len(result.shards) == 2

    joined = cluster.add_worker()
    result = service.gradients(graph, params, batch)
    assert len(result.shards) == 3
    assert any(joined.address in s.worker for s in result.shards)
    assert_matches_local(result, graph, params, batch, RTOL["float64"])

    left = cluster.stop_worker(0)
    assert left.popen.returncode == 0  # SIGTERM: deregistered and exited cleanly
    result = service.gradients(graph, params, batch)
    assert len(result.shards) == 2
    assert not any(left.address in s.worker for s in result.shards)
    assert_matches_local(result, graph, params, batch, RTOL["float64"])


def test_a_killed_worker_is_routed_around_and_dropped_after_its_lease(cluster, service):
    cluster.scale_to(2)
    graph = logistic_regression()
    params, batch = params_for(graph), batch_for(graph, 50)
    service.gradients(graph, params, batch)
    victim = cluster.stop_worker(-1, kill=True, wait=False)
    # The first attempt fails on the dead worker, which the coordinator then
    # leaves out; the client's retry runs on the rest of the pool.
    result = service.gradients(graph, params, batch)
    assert not any(victim.address in s.worker for s in result.shards)
    assert_matches_local(result, graph, params, batch, RTOL["float64"])
    cluster.wait_for_workers(timeout=cluster.lease_seconds + 10)  # dropped when its lease lapsed
    assert victim.address not in [w.address for w in cluster.status().workers]


# ---------------------------------------------------------------- errors

def test_a_worker_error_fails_the_request_with_its_message(cluster, service):
    """A label out of range is found by the SDK first; a request that skips the
    SDK's checks is refused by the worker, whose message and error kind reach
    the client through the coordinator."""
    cluster.scale_to(2)
    graph = softmax_mlp()
    params, batch = params_for(graph), batch_for(graph, 10)
    batch["y"][7] = 99  # on the second shard
    with pytest.raises(gp.InputError, match="input 'y' .* has 99 at example 7"):
        service.gradients(graph, params, batch)
    service.register(graph)
    raw = pb.GradientsRequest(graph_id=graph.graph_id, params=to_named(params), inputs=to_named(batch))
    with pytest.raises(gp.InputError) as caught:
        service._rpc.compute_gradients(raw)  # the stub, past the SDK's own checks
    assert isinstance(caught.value, ServiceError) and caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    message = str(caught.value)
    assert "label 99 is out of range [0, 5)" in message
    assert "shard 1 (examples 5:10)" in message and "worker" in message
    # The cluster keeps serving.
    batch["y"][7] = 1
    result = service.gradients(graph, params, batch)
    assert_matches_local(result, graph, params, batch, RTOL["float64"])
    assert sum(w.errors for w in cluster.status().workers) >= 1


def _request(graph: gp.Graph, examples: int = 4, **changes) -> pb.GradientsRequest:
    params, batch = params_for(graph), batch_for(graph, examples)
    request = pb.GradientsRequest(graph_id=graph.graph_id, params=to_named(params), inputs=to_named(batch))
    for field, edit in changes.items():
        edit(getattr(request, field))
    return request


def _set_bytes(name, data):
    def edit(items):
        next(i for i in items if i.name == name).tensor.data = data
    return edit


def _set_dtype(name, dtype):
    def edit(items):
        next(i for i in items if i.name == name).tensor.dtype = dtype
    return edit


def _replace(name, array):
    def edit(items):
        next(i for i in items if i.name == name).tensor.CopyFrom(to_tensor(array))
    return edit


def _append(name, array):
    def edit(items):
        items.add(name=name, tensor=to_tensor(array))
    return edit


def _drop(name):
    def edit(items):
        kept = [i for i in items if i.name != name]
        del items[:]
        items.extend(kept)
    return edit


BAD_REQUESTS = {
    "garbage param bytes": (dict(params=_set_bytes("W1", b"\x01\x02\x03")), "needs 1024 bytes, got 3"),
    "dtype enum flipped on float64 bytes": (dict(params=_set_dtype("b1", pb.FLOAT32)), "needs 64 bytes, got 128"),
    "param of the wrong dtype": (dict(params=_replace("b1", np.zeros(16, np.float32))),
                                 "param 'b1' is float32, but the graph declares float64"),
    "input of the wrong dtype": (dict(inputs=_replace("y", np.zeros(4, np.int32))),
                                 "input 'y' is int32, but the graph declares int64"),
    "param of the wrong shape": (dict(params=_replace("W1", np.zeros((16, 8)))),
                                 "param 'W1' has shape (16, 8), but the graph declares (8, 16)"),
    "missing param": (dict(params=_drop("b2")), "missing param(s) ['b2']"),
    "unknown input": (dict(inputs=_append("z", np.zeros(4))), "unknown input(s) ['z']"),
    "inputs disagree on the batch": (dict(inputs=_replace("x", np.zeros((2, 8)))),
                                     "inputs disagree on the batch size: {'x': 2, 'y': 4}"),
    "unknown dtype enum": (dict(inputs=_set_dtype("x", 77)), "unknown dtype enum 77"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_the_coordinator_rejects_bad_requests_before_fan_out(cluster, service, case):
    graph = softmax_mlp()
    service.register(graph)
    changes, expected = BAD_REQUESTS[case]
    before = {w.address: w.shards_served for w in cluster.status().workers}
    with pytest.raises(grpc.RpcError) as caught:
        coordinator_stub(cluster).ComputeGradients(_request(graph, **changes), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in caught.value.details()
    assert {w.address: w.shards_served for w in cluster.status().workers} == before  # no worker saw it


def test_the_coordinator_answers_unknown_graphs_and_invalid_graphs(cluster):
    stub = coordinator_stub(cluster)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ComputeGradients(pb.GradientsRequest(graph_id="feed" * 16), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "not registered" in caught.value.details()

    bad = softmax_mlp().to_proto()
    bad.nodes[3].inputs.append(5)  # a forward reference
    with pytest.raises(grpc.RpcError) as caught:
        stub.RegisterGraph(pb.RegisterGraphRequest(graph=bad), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not name an earlier node" in caught.value.details()

    graph = softmax_mlp()
    empty = {"x": np.zeros((0, 8)), "y": np.zeros(0, np.int64)}
    with cluster.client(timeout=10) as fresh:
        with pytest.raises(gp.InputError, match="the batch is empty"):
            fresh.gradients(graph, params_for(graph), empty)  # the SDK's own check
        fresh.register(graph)
        raw = pb.GradientsRequest(graph_id=graph.graph_id, params=to_named(params_for(graph)), inputs=to_named(empty))
        with pytest.raises(gp.InputError, match="the batch is empty") as error:
            fresh._rpc.compute_gradients(raw)  # the coordinator's, with the same words
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_worker_rejects_bad_input_and_keeps_serving(cluster, service):
    cluster.scale_to(1)
    stub = worker_stub(cluster.worker_addresses[0])
    graph = softmax_mlp(h=23)
    proto, key = graph.to_proto(), graph.graph_id

    def code_of(call, request):
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=10)
        return caught.value.code(), caught.value.details()

    code, details = code_of(stub.LoadGraph, pb.LoadGraphRequest(graph_id="0" * 64, graph=proto))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "does not match" in details
    broken = pb.Graph()
    broken.CopyFrom(proto)
    broken.nodes[0].op = "no_such_op"
    code, details = code_of(stub.LoadGraph, pb.LoadGraphRequest(graph_id=graph_id(broken), graph=broken))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no_such_op" in details

    request = pb.ShardRequest(graph_id=key, params=to_named(params_for(graph)),
                              inputs=to_named(batch_for(graph, 4)), global_batch=4, include_batch_independent=True)
    code, details = code_of(stub.RunShard, request)
    assert code == grpc.StatusCode.NOT_FOUND and "not loaded" in details
    stub.LoadGraph(pb.LoadGraphRequest(graph_id=key, graph=proto), timeout=10)

    garbage = pb.ShardRequest()
    garbage.CopyFrom(request)
    garbage.inputs[0].tensor.data = b"\xde\xad\xbe\xef"
    code, details = code_of(stub.RunShard, garbage)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in details
    wrong_dtype = pb.ShardRequest()
    wrong_dtype.CopyFrom(request)
    wrong_dtype.params[0].tensor.CopyFrom(to_tensor(params_for(graph)["W1"].astype(np.float32)))
    code, details = code_of(stub.RunShard, wrong_dtype)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "float32" in details
    huge = pb.ShardRequest()
    huge.CopyFrom(request)
    huge.inputs[0].tensor.shape[0] = 10**12  # claims a terabyte, sends 256 bytes
    code, details = code_of(stub.RunShard, huge)
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    # Bytes that are not a ShardRequest at all.
    raw = grpc.insecure_channel(cluster.worker_addresses[0]).unary_unary(
        "/gradpool.v1.Worker/RunShard", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        raw(b"\xff\xff\xff\xff\x0f not protobuf", timeout=10)
    assert caught.value.code() != grpc.StatusCode.OK

    response = stub.RunShard(request, timeout=10)
    assert response.examples == 4 and len(response.grads) == 4
    assert stub.GetWorkerStatus(pb.WorkerStatusRequest(), timeout=10).graphs_cached >= 1
    small = softmax_mlp()
    params, batch = params_for(small), batch_for(small, 9)
    assert_matches_local(service.gradients(small, params, batch), small, params, batch, 1e-10)


def deep_tanh_chain(layers: int = 20, width: int = 256) -> gp.Graph:
    """Much arithmetic per byte sent: slow to compute, quick to transfer."""
    g = gp.Graph("deep_tanh_chain")
    h = g.input("x", (width,))
    W = g.param("W", (width, width))
    for _ in range(layers):
        h = gp.tanh(h @ W)
    g.set_loss((h ** 2).mean())
    return g


def test_the_client_deadline_bounds_the_request_and_the_worker_calls(cluster, service):
    cluster.scale_to(2)
    graph = deep_tanh_chain()
    params = {"W": np.random.default_rng(0).normal(scale=0.06, size=(256, 256)).astype(np.float32)}
    rows, local_seconds = 1024, 0.0
    while local_seconds < 1.0 and rows < 16384:  # big enough that each worker needs longer than the deadline
        rows *= 2
        batch = {"x": np.random.default_rng(rows).normal(size=(rows, 256)).astype(np.float32)}
        started = time.perf_counter()
        gp.local_gradients(graph, params, batch)
        local_seconds = time.perf_counter() - started
    before = cluster.status()
    started = time.perf_counter()
    with pytest.raises(ServiceError) as caught:
        service.gradients(graph, params, batch, timeout=0.3)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.perf_counter() - started < 1.0
    # Had the coordinator waited for the workers, it would count the request
    # served once they finished. Its worker calls carry the client's deadline
    # (and are cancelled when the client's call ends), so it counts it failed.
    give_up = time.monotonic() + 10
    while (status := cluster.status()).requests_failed == before.requests_failed and time.monotonic() < give_up:
        time.sleep(0.05)
    assert (status.requests_failed, status.requests_served) == (before.requests_failed + 1,
                                                                before.requests_served)
    small = {"x": batch["x"][:5]}
    assert_matches_local(service.gradients(graph, params, small), graph, params, small, RTOL["float32"])


# ---------------------------------------------------------------- large tensors

def test_100_mb_of_params_and_a_100_mb_batch(cluster, service):
    cluster.scale_to(2)
    wide = gp.Graph("wide_params")
    x = wide.input("x", (1000,), dtype="float64")
    W = wide.param("W", (1000, 12_500), dtype="float64")  # 100 MB
    wide.set_loss(0.5 * ((x @ W) ** 2).sum())
    params = {"W": np.random.default_rng(1).normal(size=(1000, 12_500))}
    batch = {"x": np.random.default_rng(2).normal(size=(3, 1000))}
    assert params["W"].nbytes == 100_000_000
    result = service.gradients(wide, params, batch)
    assert result.grads["W"].nbytes == 100_000_000
    assert_matches_local(result, wide, params, batch, 1e-10)
    del params, result

    tall = gp.Graph("tall_batch")
    x = tall.input("x", (1000,), dtype="float64")
    V = tall.param("V", (1000, 4), dtype="float64")
    tall.set_loss(((x @ V) ** 2).mean())
    params = {"V": np.random.default_rng(3).normal(size=(1000, 4))}
    batch = {"x": np.random.default_rng(4).normal(size=(12_500, 1000))}  # 100 MB
    assert batch["x"].nbytes == 100_000_000
    result = service.gradients(tall, params, batch)
    assert result.examples == 12_500 and len(result.shards) == 2
    assert_matches_local(result, tall, params, batch, 1e-10)


# ---------------------------------------------------------------- evaluate, status, CLI

@pytest.mark.parametrize("examples", [1, 7, 1000])
def test_evaluate_matches_local_forward(cluster, service, examples):
    cluster.scale_to(3)
    graph = softmax_mlp(dtype="float32")
    params, batch = params_for(graph), batch_for(graph, examples)
    outputs = service.forward(graph, params, {"x": batch["x"]}, ["logits"])
    expected = gp.local_forward(graph, params, {"x": batch["x"]}, ["logits"])
    assert outputs["logits"].shape == (examples, 5) and outputs["logits"].dtype == np.float32
    np.testing.assert_allclose(outputs["logits"], expected["logits"], rtol=1e-6, atol=1e-6)
    assert outputs.examples == examples and sum(s.examples for s in outputs.shards) == examples


def test_evaluate_refuses_values_that_are_not_per_example(service):
    graph = logistic_regression()
    with pytest.raises(gp.InputError, match="only per-example nodes"):
        service.forward(graph, params_for(graph), batch_for(graph, 3), ["L"])
    service.register(graph)
    raw = pb.EvaluateRequest(graph_id=graph.graph_id, params=to_named(params_for(graph)),
                             inputs=to_named(batch_for(graph, 3)), outputs=["L"])
    with pytest.raises(gp.InputError, match="only per-example nodes") as caught:
        service._rpc.evaluate(raw)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_status_reports_workers_and_totals(cluster, service):
    cluster.scale_to(2)
    before = service.status()
    graph = logistic_regression()
    service.gradients(graph, params_for(graph), batch_for(graph, 11))
    status = service.status()
    assert sorted(w.address for w in status.live_workers) == sorted(cluster.worker_addresses)
    assert all(w.capacity == 1.0 and w.seconds_since_heartbeat < cluster.lease_seconds for w in status.workers)
    assert status.requests_served == before.requests_served + 1
    assert status.examples_served == before.examples_served + 11
    assert status.graphs_registered >= 1 and status.version == gp.__version__ and status.uptime_seconds > 0
    assert sum(w.examples_served for w in status.workers) >= 11


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradpool.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_status_prints_a_table(cluster):
    cluster.scale_to(2)
    done = run_cli("status", "--coordinator", cluster.address)
    assert done.returncode == 0, done.stderr
    assert "CAPACITY" in done.stdout and "live" in done.stdout
    for address in cluster.worker_addresses:
        assert address in done.stdout
    assert "2 live of 2 worker(s)" in done.stdout and "request(s) served" in done.stdout


def test_cli_errors_are_one_line_and_help_is_there():
    down = run_cli("status", "--coordinator", "127.0.0.1:1", "--timeout", "1")
    assert down.returncode != 0
    assert down.stderr.strip().startswith("gradpool: error: cannot reach the gradpool coordinator at 127.0.0.1:1")
    assert len(down.stderr.strip().splitlines()) == 1 and "Traceback" not in down.stderr
    top = run_cli("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("coordinator", "worker", "status", "demo"))
    for command in ("coordinator", "worker", "status"):
        sub = run_cli(command, "--help")
        assert sub.returncode == 0 and f"gradpool {command}" in sub.stdout
    bad_flag = run_cli("worker", "--capacity", "-1")
    assert bad_flag.returncode != 0 and "capacity must be positive" in bad_flag.stderr
