"""Sharding invariance: summed shard gradients equal the whole-batch ones, and
graphs for which that cannot hold are refused, naming the node."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import gradpool as gp
from gradpool.worker.engine import OrderedSum, shard_bounds
from gradpool.worker.engine import BATCH_INDEPENDENT, BATCH_REDUCED, PER_EXAMPLE

from models import assert_shards_sum_to_whole, batch_for, logistic_regression, params_for, softmax_mlp, two_layer_net


def regularized_mean_everything() -> gp.Graph:
    """Mean over batch and feature axes at once, a regularizer used twice, a
    batch-reduced value scaled by a param, and a concat of reduced and
    batch-independent pieces: every linear form the classifier accepts."""
    g = gp.Graph("mixed")
    x = g.input("x", (3, 4), dtype="float64")
    W = g.param("W", (4, 2), dtype="float64")
    s = g.param("s", (), dtype="float64")
    per_example = gp.softplus(x @ W)                     # (batch, 3, 2)
    data = per_example.mean(axis=(0, 1))                  # (2,) batch-reduced
    reg = (W ** 2).sum()                                  # batch-independent
    pieces = gp.concat([data, reg.reshape(1)], axis=0)    # (3,) reduced + independent
    loss = pieces.sum() * gp.exp(s) + 0.5 * reg - s / 3 + per_example.sum() / 10
    g.set_loss(loss)
    return g


def regularizer_only() -> gp.Graph:
    g = gp.Graph("no_data")
    g.input("x", (2,), dtype="float64")
    w = g.param("w", (2,), dtype="float64")
    g.set_loss((w ** 2).sum())
    return g


def indexed_and_promoted() -> gp.Graph:
    """Integer and list indexing (take, with a repeated index), max over
    non-batch axes and 1-D matmul operands, on per-example and param values."""
    g = gp.Graph("indexed", dtype="float64")
    x = g.input("x", (3, 4))
    W, v = g.param("W", (4, 3)), g.param("v", (3,))
    h = gp.tanh(x[:, [2, 0, 2]] @ W[:, 1])             # (batch, 3)
    scores = h @ v + x[:, -1, None].max(axis=(1, 2))     # (batch,)
    g.set_loss(scores.mean() + 0.1 * (W[[0, 0, 3]] ** 2).sum())
    return g


MODELS = {
    "indexed": indexed_and_promoted,
    "logistic_regression": logistic_regression,
    "two_layer_net": two_layer_net,
    "softmax_mlp": softmax_mlp,
    "mixed": regularized_mean_everything,
    "regularizer_only": regularizer_only,
}


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_sum_over_shards_equals_whole_batch(model: str, n: int) -> None:
    graph = MODELS[model]()
    params, batch = params_for(graph), batch_for(graph, n, seed=n)
    assert_shards_sum_to_whole(graph, params, batch, shards=range(1, 6), rtol=1e-10, what=f"{model}, batch {n},")


def test_regularizer_counts_once_and_mean_uses_the_global_batch() -> None:
    """Closed forms: d/dw of mean_i(w x_i) + w^2/2 is mean(x) + w for any split."""
    g = gp.Graph()
    x = g.input("x", dtype="float64")
    w = g.param("w", dtype="float64")
    g.set_loss((w * x).mean() + 0.5 * w ** 2)
    data = {"x": np.arange(10.0)}
    for shards in (1, 3, 4, 10, 13):
        loss, grads = gp.local_gradients(g, {"w": np.array(2.0)}, data, shards=shards)
        assert grads["w"] == pytest.approx(4.5 + 2.0, rel=1e-14)
        assert loss == pytest.approx(2.0 * 4.5 + 2.0, rel=1e-14)


def test_node_classification() -> None:
    program = logistic_regression().program()
    kinds = {n.name: n.kind for n in program.nodes}
    assert kinds["x"] == kinds["z"] == kinds["y"] == PER_EXAMPLE
    assert kinds["w"] == kinds["R"] == BATCH_INDEPENDENT
    assert kinds["L"] == kinds["L_reg"] == BATCH_REDUCED
    assert len(program.cuts) == 1  # the edge carrying lambda * R into L_reg


def test_shard_results_reduce_in_shard_order_whatever_the_arrival_order() -> None:
    rng = np.random.default_rng(0)
    parts = [(float(rng.normal()), {"g": rng.normal(size=50).astype(np.float32) * np.float32(10.0) ** rng.integers(-3, 4)})
             for _ in range(5)]
    totals = []
    for order in itertools.permutations(range(5)):
        total = OrderedSum(5)
        for shard in order:
            total.add(shard, *parts[shard])
        assert total.complete
        totals.append((total.loss, total.grads["g"].tobytes()))
    assert len(set(totals)) == 1


def test_ordered_sum_refuses_duplicates() -> None:
    total = OrderedSum(2)
    total.add(0, 1.0, {"g": np.ones(2)})
    with pytest.raises(ValueError, match="twice"):
        total.add(0, 1.0, {"g": np.ones(2)})


def test_repeated_runs_are_bitwise_identical() -> None:
    graph = softmax_mlp(dtype="float32")
    params, batch = params_for(graph), batch_for(graph, 64)
    runs = [gp.local_gradients(graph, params, batch, shards=3) for _ in range(3)]
    for loss, grads in runs[1:]:
        assert loss == runs[0][0]
        assert all(grads[k].tobytes() == runs[0][1][k].tobytes() for k in grads)


@pytest.mark.parametrize("n,caps", [(10, [1, 1, 1]), (7, [2, 1]), (2, [1, 1, 1, 1]), (1000, [3, 1, 0.5]), (0, [1])])
def test_shard_bounds_cover_every_example_once(n: int, caps: list[float]) -> None:
    bounds = shard_bounds(n, caps)
    covered = np.concatenate([np.arange(a, b) for a, b in bounds]) if bounds else np.array([], int)
    np.testing.assert_array_equal(covered, np.arange(n))
    assert all(b > a for a, b in bounds)
    assert len(bounds) == min(n, len(caps))


def build_refused(kind: str) -> None:
    g = gp.Graph()
    x = g.input("x", (3,))
    W = g.param("W", (3, 3))
    if kind == "batch_norm":
        g.set_loss(((x - x.mean(axis=0)) ** 2).sum())
    elif kind == "nonlinear_of_reduced":
        g.set_loss(gp.log(gp.exp(x @ W).sum()))
    elif kind == "square_of_mean":
        g.set_loss((x.mean() ** 2))
    elif kind == "product_of_reduced":
        g.set_loss(x.sum() * (x @ W).sum())
    elif kind == "divide_by_reduced":
        g.set_loss(1.0 / x.sum())
    elif kind == "max_over_batch":
        g.set_loss(x.max(axis=0).sum())
    elif kind == "softmax_over_batch":
        g.set_loss(gp.softmax(x, axis=0).sum())
    elif kind == "transpose_batch":
        g.set_loss(gp.transpose(x, (1, 0)).sum())
    elif kind == "concat_batch":
        g.set_loss(gp.concat([x, x], axis=0).sum())
    elif kind == "slice_batch":
        g.set_loss(gp.slice(x, axis=0, start=1).sum())
    elif kind == "contract_over_batch":
        g.set_loss((W @ x).sum())
    elif kind == "fixed_size_batch_axis":
        g.set_loss((x + g.param("P", (5, 3))).sum())


@pytest.mark.parametrize("kind,message", [
    ("batch_norm", "statistic of the whole batch"),
    ("nonlinear_of_reduced", "not linear"),
    ("square_of_mean", "not linear"),
    ("product_of_reduced", "not linear"),
    ("divide_by_reduced", "not linear"),
    ("max_over_batch", "batch axis"),
    ("softmax_over_batch", "batch axis"),
    ("transpose_batch", "batch axis"),
    ("concat_batch", "batch axis"),
    ("slice_batch", "batch axis"),
    ("contract_over_batch", "batch axis"),
    ("fixed_size_batch_axis", "batch axis"),
])
def test_unshardable_graphs_are_refused_naming_the_node(kind: str, message: str) -> None:
    with pytest.raises(gp.GraphError, match=message) as info:
        build_refused(kind)
    assert "test_sharding.py:" in str(info.value), "the error points at the user's line"


def test_sharding_error_is_a_distinct_type() -> None:
    with pytest.raises(gp.ShardingError, match=r"node '\w+' \(\w+, built at test_sharding.py:\d+\)"):
        build_refused("batch_norm")


def test_unshardable_nodes_off_the_loss_path_are_refused_only_when_asked_for() -> None:
    g = gp.Graph()
    x = g.input("x", (3,), dtype="float64")
    (x - x.mean(axis=0)).named("centered")
    g.set_loss(x.sum())
    assert gp.local_gradients(g, {}, {"x": np.ones((2, 3))})[0] == 6.0
    with pytest.raises(gp.ShardingError, match="output 'centered' cannot be computed shard by shard"):
        gp.local_forward(g, {}, {"x": np.ones((2, 3))}, ["centered"])
