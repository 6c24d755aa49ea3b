"""Dropout: a mask keyed by (seed, node, global example index, element), so
that every split of a batch -- shards in-process, workers, pipelined
sub-shards, resident datasets -- draws the same mask as one process.

Bitwise claims across *different* splits are made on a graph whose sums are
exact (small integers): there the order of the shard sums cannot hide a
wrong mask. For the MLP, each split is bitwise equal to the service with the
same split, and different splits agree to rounding.
"""

from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

import gradpool as gp
from gradpool.protos import gradpool_pb2 as pb
from gradpool.protos import gradpool_pb2_grpc as pb_grpc
from gradpool.training import LocalBackend, Trainer, step_seed
from gradpool.worker import wire
from gradpool.worker.engine.ops import Call, dropout_keep
from gradpool.worker.rpc import add_servicer

from models import batch_for, dropout_mlp, params_for
from test_training import assert_same_state, sgd_momentum, teacher_data

SEED = 1234


def integer_graph(width: int = 64, rate: float = 0.5) -> gp.Graph:
    """loss = sum(dropout(x * w)): with rate 1/2 (scale 2) and small integers
    every value and every sum is exact, whatever the order of the additions."""
    g = gp.Graph("exact_dropout")
    x = g.input("x", (width,), dtype="float64")
    w = g.param("w", (width,), dtype="float64")
    g.set_loss(gp.dropout(x * w, rate).named("dropped").sum())
    return g


def integer_data(n: int = 200, width: int = 64) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    return ({"w": rng.integers(-3, 4, width).astype(np.float64)},
            {"x": rng.integers(-4, 5, (n, width)).astype(np.float64)})


def ones_graph(size: int, rate: float, dtype: str = "float64", name: str = "dropped") -> gp.Graph:
    """loss = sum(dropout(w)): the gradient of w is the mask times the scale."""
    g = gp.Graph("mask")
    g.set_loss(gp.dropout(g.param("w", (size,), dtype=dtype), rate).named(name).sum())
    return g


def mask_of(graph: gp.Graph, seed: int, value: float = 1.0) -> np.ndarray:
    size = graph.params["w"][0][0]
    dtype = graph.params["w"][1]
    return gp.local_gradients(graph, {"w": np.full(size, value, dtype)}, {}, seed=seed)[1]["w"]


# ------------------------------------------------------------------ in process


def test_the_mask_does_not_depend_on_the_split() -> None:
    graph = integer_graph()
    params, batch = integer_data()
    whole = gp.local_gradients(graph, params, batch, seed=SEED)
    keep = dropout_keep(Call(graph.program().node("dropped").attrs, per_example=True, node="dropped", seed=SEED,
                             training=True), batch["x"].shape)
    assert 0.4 < keep.mean() < 0.6
    assert whole[0] == float((batch["x"] * params["w"] * 2 * keep).sum())
    np.testing.assert_array_equal(whole[1]["w"], (batch["x"] * 2 * keep).sum(axis=0))
    for shards in (2, 3, 4):
        loss, grads = gp.local_gradients(graph, params, batch, shards=shards, seed=SEED)
        assert loss == whole[0] and np.array_equal(grads["w"], whole[1]["w"]), shards


def test_the_mlp_agrees_across_splits_and_seeds_matter() -> None:
    graph = dropout_mlp()
    params, batch = params_for(graph), batch_for(graph, 37)
    loss, grads = gp.local_gradients(graph, params, batch, seed=SEED)
    for shards in (2, 3, 4):
        other_loss, other = gp.local_gradients(graph, params, batch, shards=shards, seed=SEED)
        assert other_loss == pytest.approx(loss, rel=1e-13)
        for name in grads:
            np.testing.assert_allclose(other[name], grads[name], rtol=1e-12, atol=1e-15)
    again_loss, again = gp.local_gradients(graph, params, batch, seed=SEED)
    assert again_loss == loss and all(np.array_equal(again[k], grads[k]) for k in grads)
    _, reseeded = gp.local_gradients(graph, params, batch, seed=SEED + 1)
    assert np.abs(reseeded["W2"] - grads["W2"]).max() > 1e-3


def test_same_seed_same_mask_other_seed_or_node_other_mask() -> None:
    graph = ones_graph(4096, 0.5)
    first, again = mask_of(graph, 7), mask_of(graph, 7)
    assert np.array_equal(first, again)
    for other in (mask_of(graph, 8), mask_of(graph, 0), mask_of(graph, 2**64 - 1),
                  mask_of(ones_graph(4096, 0.5, name="elsewhere"), 7)):
        agree = np.mean((other != 0) == (first != 0))
        assert 0.45 < agree < 0.55  # independent masks agree on about half the elements


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_keep_rate_and_scale(rate: float, dtype: str) -> None:
    n = 200_000
    grad = mask_of(ones_graph(n, rate, dtype), SEED)
    assert grad.dtype == np.dtype(dtype)
    scale = np.dtype(dtype).type(1) / np.dtype(dtype).type(1 - rate)  # torch's: mask / (1 - p) in x's dtype
    assert set(np.unique(grad)) == {0, scale}
    kept = np.mean(grad != 0)
    assert abs(kept - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)


def test_per_example_keep_rate_is_even_over_examples_and_elements() -> None:
    """No stripes: examples and positions within an example are kept alike."""
    g = gp.Graph()
    x = g.input("x", (100,))
    w = g.param("w", ())
    g.set_loss(gp.dropout(x * w, 0.25).named("d").sum())
    keep = dropout_keep(Call(g.program().node("d").attrs, per_example=True, node="d", seed=3, training=True),
                        (4000, 100))
    assert abs(keep.mean() - 0.75) < 0.005
    assert np.abs(keep.mean(axis=0) - 0.75).max() < 0.05  # each position, over 4000 examples
    assert np.abs(keep.mean(axis=1) - 0.75).max() < 0.25  # each example, over 100 positions
    assert not np.array_equal(keep[0], keep[1])


def test_a_zero_input_still_passes_the_gradient_of_kept_elements() -> None:
    """d out / d x is mask / (1 - rate) even where x is 0: reading the mask
    off the output (out != 0) would drop those gradients."""
    graph = ones_graph(1000, 0.5)
    at_zero, at_one = mask_of(graph, SEED, 0.0), mask_of(graph, SEED, 1.0)
    assert np.count_nonzero(at_zero) > 400
    np.testing.assert_array_equal(at_zero, at_one)


def test_forward_only_is_the_identity() -> None:
    g = gp.Graph()
    x = g.input("x", (6,))
    w = g.param("w", (6,))
    h = (x * w).named("h")
    g.set_loss(gp.dropout(h, 0.5).named("d").sum())
    params, batch = {"w": np.arange(1.0, 7.0)}, {"x": np.random.default_rng(0).normal(size=(9, 6))}
    out = gp.local_forward(g, params, batch, ["h", "d"])
    np.testing.assert_array_equal(out["d"], out["h"])
    _, grads = gp.local_gradients(g, params, batch, seed=1)
    assert np.count_nonzero(grads["w"] != batch["x"].sum(axis=0))  # training does drop


def test_rate_zero_changes_nothing() -> None:
    g = integer_graph(rate=0.0)
    params, batch = integer_data(20)
    loss, grads = gp.local_gradients(g, params, batch, seed=SEED)
    assert loss == float((batch["x"] * params["w"]).sum())
    np.testing.assert_array_equal(grads["w"], batch["x"].sum(axis=0))


def test_dropout_of_a_per_example_value_passes_a_gradient_check() -> None:
    """Central differences with the seed fixed (the mask is then a constant),
    through a matmul, on three shards."""
    g = gp.Graph()
    x = g.input("x", (4,), dtype="float64")
    W = g.param("W", (4, 3), dtype="float64")
    weights = g.const(np.random.default_rng(1).normal(size=(3,)))
    g.set_loss((gp.dropout(gp.tanh(x @ W), 0.4) * weights).sum())
    params = {"W": np.random.default_rng(2).normal(size=(4, 3))}
    batch = {"x": np.random.default_rng(3).normal(size=(10, 4))}
    _, grads = gp.local_gradients(g, params, batch, shards=3, seed=SEED)
    numeric = np.zeros_like(params["W"])
    eps = 1e-6
    for idx in np.ndindex(params["W"].shape):
        up, down = params["W"].copy(), params["W"].copy()
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (gp.local_gradients(g, {"W": up}, batch, seed=SEED)[0]
                        - gp.local_gradients(g, {"W": down}, batch, seed=SEED)[0]) / (2 * eps)
    np.testing.assert_allclose(grads["W"], numeric, rtol=1e-6, atol=1e-8)


def test_a_missing_or_bad_seed_is_refused_clearly() -> None:
    graph = dropout_mlp()
    params, batch = params_for(graph), batch_for(graph, 8)
    with pytest.raises(gp.InputError, match=r"node 'dropped' \(dropout, built at .*models.py:\d+\) is random: "
                                            r"computing gradients needs a seed"):
        gp.local_gradients(graph, params, batch)
    with pytest.raises(gp.InputError, match="needs a seed"):
        graph.program().run(params, batch)
    for bad in (-1, 2**64, 1.5, True, "7"):
        with pytest.raises(gp.InputError, match=r"seed must be an integer in \[0, 2\^64\)"):
            gp.local_gradients(graph, params, batch, seed=bad)
    gp.local_gradients(graph, params, batch, seed=np.uint64(2**64 - 1))
    gp.local_forward(graph, params, batch, ["logits"])  # forward only needs none


@pytest.mark.parametrize("rate", [1.0, -0.1, float("nan")])
def test_a_rate_outside_0_1_is_refused_at_build_time(rate: float) -> None:
    g = gp.Graph()
    with pytest.raises(gp.GraphError, match=r"dropout rate must be in \[0, 1\)"):
        gp.dropout(g.input("x", (3,)), rate)


def test_offsets_outside_the_batch_are_refused() -> None:
    graph = integer_graph()
    params, batch = integer_data(10)
    with pytest.raises(gp.InputError, match="example offset 5 does not place this shard's 10 examples"):
        graph.program().run(params, batch, global_batch=12, seed=1, example_offset=5)
    with pytest.raises(gp.InputError, match="example offset -1"):
        graph.program().run(params, batch, seed=1, example_offset=-1)


def test_the_seed_is_on_the_wire_when_zero_and_absent_when_not_given() -> None:
    params, batch = integer_data(3)
    for seed in (None, 0, 2**64 - 1):
        body = wire.request_parts("g", params, batch, "r", seed=seed)[1]
        message = wire.with_graph_id("g", body).join()
        assert wire.read_request(message).seed == seed
        parsed = pb.GradientsRequest.FromString(message)
        assert parsed.HasField("seed") == (seed is not None) and parsed.seed == (seed or 0)
    header = pb.ShardRequest(graph_id="g", seed=0, example_offset=17)
    view = wire.read_shard_request(header.SerializeToString())
    assert (view.seed, view.example_offset) == (0, 17)
    assert wire.read_shard_request(pb.ShardRequest(graph_id="g").SerializeToString()).seed is None


# ------------------------------------------------------------------ training


def dropout_trainer(**options) -> Trainer:
    options.setdefault("batch_size", 16)
    options.setdefault("progress", False)
    return Trainer(dropout_mlp(), sgd_momentum, **options)


@pytest.mark.parametrize("stop_at", [6, 13])
def test_resuming_a_dropout_run_is_bitwise_identical(tmp_path: Path, stop_at: int) -> None:
    data = teacher_data(60)
    uninterrupted = dropout_trainer()
    uninterrupted.fit(data, epochs=4)
    first = dropout_trainer()
    first.fit(data, epochs=4, max_steps=stop_at)
    path = first.save_checkpoint(tmp_path / "run.npz")
    resumed = dropout_trainer(seed=123)  # the seed, too, must come from the checkpoint
    resumed.load_checkpoint(path)
    resumed.fit(data, epochs=4)
    assert_same_state(uninterrupted, resumed)


def test_each_step_draws_its_own_seed() -> None:
    seen: list[int] = []

    class Recording(LocalBackend):
        def gradients(self, graph, params, batch, *, seed=None):
            seen.append(seed)
            return super().gradients(graph, params, batch, seed=seed)

    dropout_trainer(backend=Recording(), seed=9).fit(teacher_data(40), epochs=1)
    assert seen == [step_seed(9, step) for step in (1, 2, 3)] and len(set(seen)) == 3


def test_held_out_metrics_of_a_dropout_graph_come_from_forward_only_runs() -> None:
    """Dropout makes the loss random (and is on in gradients runs), so no
    val_loss: the held-out figures are forward-only, with dropout off."""
    data = teacher_data(40)
    trainer = dropout_trainer()
    trainer.fit(data, epochs=1, eval_data=data)
    record = trainer.history.epochs[-1]
    assert "val_loss" not in record and 0 <= record["val_accuracy"] <= 1
    assert record["val_cross_entropy"] == pytest.approx(trainer.evaluate(data)["cross_entropy"])
    with pytest.raises(gp.InputError, match="dropout.*random.*evaluate"):
        trainer.loss_on(data)


# ------------------------------------------------------------------ the service


@pytest.fixture(scope="module")
def cluster():
    # --max-shard-mb 0.01: an inline batch of integer_data's rows (512 bytes)
    # comes as several pipelined shards per worker; the MLP's small rows do not.
    with gp.LocalCluster(workers=2, coordinator_args=["--max-shard-mb", "0.01"]) as running:
        yield running


@pytest.fixture(scope="module")
def service(cluster):
    with cluster.client(timeout=60) as client:
        yield client


def test_the_service_draws_the_same_masks_as_one_process(service) -> None:
    graph = integer_graph()
    params, batch = integer_data()
    loss, grads = gp.local_gradients(graph, params, batch, seed=SEED)
    inline = service.gradients(graph, params, batch, seed=SEED)
    assert len(inline.shards) > 2  # pipelined sub-shards, each keyed by its own start
    assert inline.loss == loss and np.array_equal(inline.grads["w"], grads["w"])
    ref = service.upload(batch)
    order = np.random.default_rng(0).permutation(len(batch["x"]))[:150]
    resident = service.gradients(graph, params, ref.take(order), seed=SEED)
    picked_loss, picked = gp.local_gradients(graph, params, {"x": batch["x"][order]}, seed=SEED)
    assert resident.loss == picked_loss and np.array_equal(resident.grads["w"], picked["w"])


def test_the_service_equals_local_shards_bitwise(service) -> None:
    graph = dropout_mlp()
    params, batch = params_for(graph), batch_for(graph, 37)
    result = service.gradients(graph, params, batch, seed=SEED)
    loss, grads = gp.local_gradients(graph, params, batch, shards=2, seed=SEED)
    assert len(result.shards) == 2
    assert result.loss == loss and all(np.array_equal(result.grads[k], grads[k]) for k in grads)
    ref = service.upload(batch)
    rows = np.arange(37)[::-1].copy()
    resident = service.gradients(graph, params, ref.take(rows), seed=SEED)
    loss, grads = gp.local_gradients(graph, params, {k: v[rows] for k, v in batch.items()}, shards=2, seed=SEED)
    assert resident.loss == loss and all(np.array_equal(resident.grads[k], grads[k]) for k in grads)
    forward = service.forward(graph, params, batch, ["dropped"])
    np.testing.assert_array_equal(forward.outputs["dropped"], gp.local_forward(graph, params, batch, ["dropped"])["dropped"])


def test_the_service_refuses_a_missing_seed(service) -> None:
    graph = dropout_mlp()
    params, batch = params_for(graph), batch_for(graph, 8)
    with pytest.raises(gp.InputError, match="node 'dropped' .* needs a seed"):
        service.gradients(graph, params, batch)
    service.register(graph)
    body = wire.request_parts("", params, batch, "no-seed")[1]  # past the SDK's own check
    with pytest.raises(gp.RemoteInputError, match="node 'dropped' .* needs a seed"):
        service._rpc.compute_gradients(wire.with_graph_id(graph.graph_id, body))
    assert service.gradients(graph, params, batch, seed=0).examples == 8  # and keeps serving


def test_remote_dropout_training_equals_local_training_with_as_many_shards(service) -> None:
    data = teacher_data(60)
    local = dropout_trainer(backend=LocalBackend(shards=2))
    local.fit(data, epochs=2)
    remote = dropout_trainer(backend=service)  # uploads the data: steps send dataset rows
    remote.fit(data, epochs=2)
    assert_same_state(local, remote)


class RefusingWorker(pb_grpc.WorkerServicer):
    """Records what each shard carries, then refuses it as a busy worker would."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []

    def LoadGraph(self, request, context):  # type: ignore[no-untyped-def]
        return pb.LoadGraphResponse()

    def RunShard(self, request, context):  # type: ignore[no-untyped-def]
        shard = wire.read_shard_request(request)
        self.seen.append((shard.seed, shard.example_offset, shard.inputs[0][1].shape[0]))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")


def test_a_shard_retried_on_another_worker_keeps_its_offset_and_seed() -> None:
    refuser = RefusingWorker()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_servicer(server, refuser, "Worker", raw=("RunShard", "RunShardStream"))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    graph = integer_graph()
    params, batch = integer_data()
    try:
        with gp.LocalCluster(workers=1) as running, running.client(timeout=60) as service, \
                grpc.insecure_channel(running.address) as channel:
            coordinator = pb_grpc.CoordinatorStub(channel)
            joined = coordinator.RegisterWorker(pb.RegisterWorkerRequest(
                address=f"127.0.0.1:{port}", capacity=1.0, worker_id="refuser"), timeout=10)
            coordinator.Heartbeat(pb.HeartbeatRequest(worker_id="refuser", lease_secret=joined.lease_secret),
                                  timeout=5)
            result = service.gradients(graph, params, batch, seed=SEED)
    finally:
        server.stop(None)
    assert len(result.shards) == 2 and any(s.attempts > 1 for s in result.shards)
    assert all(f"127.0.0.1:{port}" not in s.worker for s in result.shards)
    starts = {s.start: s.examples for s in result.shards}
    assert refuser.seen and all(seed == SEED and starts.get(offset) == rows for seed, offset, rows in refuser.seen)
    loss, grads = gp.local_gradients(graph, params, batch, seed=SEED)
    assert result.loss == loss and np.array_equal(result.grads["w"], grads["w"])
