"""The reductions (min, logsumexp, var, std, argmax) and shape ops (stack,
expand_dims, squeeze, pad, split, flip, tile, broadcast_to, einsum) of issue
13: values against numpy, the documented edges, the batch-axis refusals, and
sharding invariance, with the linear ops carrying batch-reduced values."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

import gradpool as gp
from gradpool.cluster import LocalCluster
from gradpool.worker.engine import BATCH_REDUCED, Program

from models import assert_service_is_local_shards, assert_shards_sum_to_whole

RNG = np.random.default_rng(13)
X = RNG.normal(size=(5, 3, 4))


def forward(build: Callable[[gp.Expr], gp.Expr], x: np.ndarray = X) -> np.ndarray:
    """The per-example value build(x) of a float64 input x, computed by the engine."""
    g = gp.Graph()
    inp = g.input("x", x.shape[1:], dtype="float64")
    build(inp).named("out")
    g.set_loss(inp.sum())
    return gp.local_forward(g, {}, {"x": x}, "out")["out"]


# ---------------------------------------------------------------- values against numpy

VALUES = {
    "min": (lambda x: x.min(axis=2), lambda a: a.min(axis=2)),
    "min_keepdims": (lambda x: gp.min(x, axis=(1, 2), keepdims=True), lambda a: a.min(axis=(1, 2), keepdims=True)),
    "logsumexp": (lambda x: gp.logsumexp(x, axis=2),
                  lambda a: np.log(np.exp(a).sum(axis=2))),
    "var": (lambda x: x.var(axis=(1, 2)), lambda a: a.var(axis=(1, 2))),
    "std": (lambda x: gp.std(x, axis=1, keepdims=True), lambda a: a.std(axis=1, keepdims=True)),
    "stack": (lambda x: gp.stack([x, 2 * x], axis=2), lambda a: np.stack([a, 2 * a], axis=2)),
    "stack_last": (lambda x: gp.stack([x, -x, x], axis=-1), lambda a: np.stack([a, -a, a], axis=-1)),
    "expand_dims": (lambda x: gp.expand_dims(x, (1, -1)), lambda a: np.expand_dims(a, (1, -1))),
    "squeeze": (lambda x: gp.squeeze(gp.expand_dims(x, 2)), lambda a: a),
    "squeeze_axis": (lambda x: gp.expand_dims(x, 3).squeeze(3), lambda a: a),
    "pad": (lambda x: gp.pad(x, ((1, 0), (2, 3)), value=-1.5),
            lambda a: np.pad(a, ((0, 0), (1, 0), (2, 3)), constant_values=-1.5)),
    "pad_int": (lambda x: gp.pad(x, 1), lambda a: np.pad(a, ((0, 0), (1, 1), (1, 1)))),
    "split": (lambda x: gp.concat(gp.split(x, [1, 3], axis=2)[::-1], axis=2),
              lambda a: np.concatenate(np.split(a, [1, 3], axis=2)[::-1], axis=2)),
    "flip": (lambda x: gp.flip(x, -1), lambda a: np.flip(a, -1)),
    "flip_both": (lambda x: gp.flip(x, (1, 2)), lambda a: a[:, ::-1, ::-1]),
    "tile": (lambda x: gp.tile(x, (2, 1, 3)), lambda a: np.stack([np.tile(e, (2, 1, 3)) for e in a])),
    "broadcast_to": (lambda x: gp.broadcast_to(x.max(axis=-1, keepdims=True), (2, 3, 5)),
                     lambda a: np.broadcast_to(a.max(axis=-1, keepdims=True)[:, None], (5, 2, 3, 5))),
    "einsum": (lambda x: gp.einsum("bij,bkj->bik", x, 2 * x), lambda a: np.einsum("bij,bkj->bik", a, 2 * a)),
    "einsum_implicit": (lambda x: gp.einsum("bij,jk", x, x.graph.const(np.arange(8.0).reshape(4, 2))),
                        lambda a: np.einsum("bij,jk", a, np.arange(8.0).reshape(4, 2))),
}


@pytest.mark.parametrize("name", sorted(VALUES))
def test_forward_matches_numpy(name: str) -> None:
    build, reference = VALUES[name]
    np.testing.assert_allclose(forward(build), reference(X), rtol=1e-13, atol=1e-13)


def test_argmax_is_a_forward_only_int64_value_and_first_on_ties() -> None:
    x = X.copy()
    x[0, 1, :] = 7.0  # a tie over a whole row: the first index, as numpy and torch
    out = forward(lambda v: v.argmax(axis=2), x)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, np.argmax(x, axis=2))
    assert out[0, 1] == 0
    np.testing.assert_array_equal(forward(lambda v: gp.argmax(v, axis=1, keepdims=True), x),
                                  np.argmax(x, axis=1, keepdims=True))


def test_argmax_without_axis_flattens_values_that_have_no_batch_axis() -> None:
    g = gp.Graph()
    w = g.param("w", (3, 4), dtype="float64")
    g.input("x", dtype="float64")
    assert w.argmax().shape == () and w.argmax(keepdims=True).shape == (1, 1)
    with pytest.raises(gp.GraphError, match="include the batch axis"):
        g["x"].argmax()


def test_argmax_feeds_an_accuracy_next_to_a_trainable_loss() -> None:
    """argmax off the param->loss path is forward-only use: predictions for an accuracy."""
    g = gp.Graph()
    x = g.input("x", (4,), dtype="float64")
    y = g.input("y", (), dtype="int64")
    W = g.param("W", (4, 3), dtype="float64")
    logits = x @ W
    predicted = logits.argmax(axis=1).named("predicted")
    g.set_loss(gp.softmax_cross_entropy(logits, y).mean())
    params = {"W": RNG.normal(size=(4, 3))}
    batch = {"x": RNG.normal(size=(6, 4)), "y": np.arange(6) % 3}
    out = gp.local_forward(g, params, batch, "predicted")["predicted"]
    np.testing.assert_array_equal(out, np.argmax(batch["x"] @ params["W"], axis=1))
    assert predicted.dtype == np.int64
    gp.local_gradients(g, params, batch)  # the loss's gradient is unaffected


# ---------------------------------------------------------------- edges

def gradient(build: Callable[[gp.Expr], gp.Expr], w: np.ndarray) -> tuple[float, np.ndarray]:
    g = gp.Graph()
    p = g.param("w", w.shape, dtype=str(w.dtype))
    g.set_loss(build(p))
    loss, grads = gp.local_gradients(g, {"w": w}, {})
    return loss, grads["w"]


def test_std_gradient_is_zero_where_the_values_are_equal_not_nan() -> None:
    """torch's choice: d std / dx = 0 at std = 0; the other rows keep their gradient."""
    w = np.array([[2.0, 2.0, 2.0], [1.0, 2.0, 4.0]])
    loss, grad = gradient(lambda p: p.std(axis=1).sum(), w)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[0], 0.0)
    row = w[1]
    np.testing.assert_allclose(grad[1], (row - row.mean()) / (row.size * row.std()), rtol=1e-14)
    assert loss == pytest.approx(w[1].std(), rel=1e-14)


def test_var_of_equal_values_has_zero_gradient() -> None:
    _, grad = gradient(lambda p: p.var(axis=-1).sum(), np.full((2, 3), 0.1))
    np.testing.assert_allclose(grad, 0.0, atol=1e-15)


def test_logsumexp_is_stable_and_follows_torch_at_infinities() -> None:
    big = np.array([[1000.0, 1000.0], [-1000.0, -1000.0]])
    with np.errstate(over="raise", under="ignore"):
        loss, grad = gradient(lambda p: gp.logsumexp(p, axis=1).sum(), big)
    assert loss == pytest.approx(np.log(2.0) * 2, rel=1e-12)
    np.testing.assert_allclose(grad, 0.5, rtol=1e-12)  # exp(x - out): out carries 1000 + log 2 to an ulp
    values = forward(lambda x: gp.logsumexp(x, axis=1), np.array([[-np.inf, -np.inf], [np.inf, 0.0], [0.0, 0.0]]))
    assert values[0] == -np.inf and values[1] == np.inf and values[2] == pytest.approx(np.log(2.0))


def test_min_ties_share_the_gradient_like_max() -> None:
    w = np.array([[1.0, 3.0, 1.0, 5.0]])
    _, grad = gradient(lambda p: p.min(axis=1).sum(), w)
    np.testing.assert_array_equal(grad, [[0.5, 0.0, 0.5, 0.0]])
    _, grad_max = gradient(lambda p: (-p).max(axis=1).sum(), w)
    np.testing.assert_array_equal(grad, -grad_max)


def test_pad_value_can_be_a_param_and_takes_the_border_gradient() -> None:
    g = gp.Graph()
    w = g.param("w", (2, 3), dtype="float64")
    v = g.param("v", (), dtype="float64")
    g.set_loss(gp.pad(w, ((1, 1), (0, 2)), value=v).sum())
    _, grads = gp.local_gradients(g, {"w": np.ones((2, 3)), "v": np.array(0.0)}, {})
    assert grads["v"] == 4 * 5 - 2 * 3
    np.testing.assert_array_equal(grads["w"], 1.0)


@pytest.mark.parametrize("op", ["min", "logsumexp", "var", "std", "stack", "expand_dims", "squeeze", "pad", "flip",
                                "tile", "broadcast_to", "einsum"])
def test_float32_stays_float32(op: str) -> None:
    builds = {
        "min": lambda p: p.min(axis=1), "logsumexp": lambda p: gp.logsumexp(p, axis=0),
        "var": lambda p: p.var(axis=1), "std": lambda p: p.std(), "stack": lambda p: gp.stack([p, p], axis=1),
        "expand_dims": lambda p: gp.expand_dims(p, 0), "squeeze": lambda p: gp.squeeze(p[:, :1]),
        "pad": lambda p: gp.pad(p, 1, 2.0), "flip": lambda p: gp.flip(p), "tile": lambda p: gp.tile(p, 2),
        "broadcast_to": lambda p: gp.broadcast_to(p, (2, 3, 4)), "einsum": lambda p: gp.einsum("ij,kj->ik", p, p),
    }
    g = gp.Graph()
    p = g.param("p", (3, 4))
    out = builds[op](p)
    assert out.dtype == np.float32
    g.set_loss((out * out).sum())
    _, grads = gp.local_gradients(g, {"p": RNG.normal(size=(3, 4)).astype(np.float32)}, {})
    assert grads["p"].dtype == np.float32 and np.all(np.isfinite(grads["p"]))


# ---------------------------------------------------------------- refusals at build time

def per_example() -> gp.Expr:
    return gp.Graph().input("x", (3, 4), dtype="float64")


REFUSED = {
    "min": (lambda x: x.min(), "min over the batch axis"),
    "min_axis0": (lambda x: x.min(axis=0), "would mix examples"),
    "logsumexp": (lambda x: gp.logsumexp(x, axis=(0, 1)), "logsumexp over the batch axis"),
    "var": (lambda x: x.var(axis=0), "var over the batch axis .* not a sum over examples"),
    "std": (lambda x: x.std(), "std over the batch axis .*as batch norm"),
    "argmax": (lambda x: x.argmax(axis=0), "argmax along the batch axis would mix examples"),
    "stack": (lambda x: gp.stack([x, x], axis=0), "before the batch axis"),
    "stack_negative": (lambda x: gp.stack([x, x], axis=-4), "before the batch axis"),
    "expand_dims": (lambda x: gp.expand_dims(x, 0), "before the batch axis"),
    "squeeze": (lambda x: x.squeeze(0), "cannot remove the batch axis"),
    "squeeze_wide": (lambda x: x.squeeze(1), "axis 1 of .* has size 3, not 1"),
    "pad": (lambda x: gp.pad(x, ((1, 1), (1, 1), (1, 1))), "does not give a .* pair for each of the 2 axes"),
    "split": (lambda x: gp.split(x, 2, axis=0), "split along the batch axis"),
    "split_uneven": (lambda x: gp.split(x, 2, axis=1), "does not divide into 2 equal sections"),
    "flip": (lambda x: gp.flip(x), "flip along the batch axis"),
    "tile": (lambda x: gp.tile(x, (2, 0)), "reps must be >= 1"),
    "broadcast_to": (lambda x: gp.broadcast_to(x, (5, 4)), r"cannot broadcast \(batch, 3, 4\) to \(batch, 5, 4\)"),
    "broadcast_to_huge": (lambda x: gp.broadcast_to(x, (10 ** 6, 10 ** 4, 3, 4)), "elements per example"),
    "einsum_moves_batch": (lambda x: gp.einsum("bij->ibj", x), "away from the front"),
    "einsum_pairs_examples": (lambda x: gp.einsum("bij,cij->bc", x, x), "pair every example with every other"),
    "einsum_batch_vs_fixed": (lambda x: gp.einsum("bij,bj->i", x, x.graph.param("w", (5, 4))),
                              "the batch axis in one operand and a fixed-size axis in another"),
    "einsum_ellipsis": (lambda x: gp.einsum("...j,jk->...k", x, x.graph.param("w", (4, 2))), r"'\.\.\.'"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_moving_or_mixing_the_batch_axis_is_refused_at_the_users_line(name: str) -> None:
    build, message = REFUSED[name]
    with pytest.raises(gp.GraphError, match=message) as err:
        build(per_example())
    assert "test_reductions_and_shape_ops.py:" in str(err.value)


@pytest.mark.parametrize("op", ["min", "logsumexp", "var", "std"])
def test_a_sent_graph_reducing_over_the_batch_axis_is_refused_naming_the_node(op: str) -> None:
    """What a client other than the SDK could send: the engine's own rule refuses it, naming the node."""
    g = gp.Graph()
    x = g.input("x", (3,), dtype="float64")
    w = g.param("w", (3,), dtype="float64")
    g._add(op, ((x * w),), name="batch_stat", axes=(1,))
    g.set_loss(g["batch_stat"].sum())
    proto = g.to_proto()
    node = next(n for n in proto.nodes if n.name == "batch_stat")
    node.attrs["axes"].ints.values[:] = [0]
    del node.shape[:]
    node.shape.extend([3])
    with pytest.raises(gp.GraphError, match=f"'batch_stat', {op}.*{op} over the batch axis"):
        Program(proto)


def test_a_nonlinear_new_reduction_of_a_batch_reduced_value_is_refused_naming_the_node() -> None:
    g = gp.Graph()
    x = g.input("x", (3,), dtype="float64")
    w = g.param("w", (3,), dtype="float64")
    batch_sum = (x * w).sum(axis=0)
    with pytest.raises(gp.ShardingError, match="'spread'.*not linear in the batch-reduced"):
        g.set_loss(batch_sum.var().named("spread"))


def test_einsum_over_the_batch_of_two_per_example_operands_sums_a_kept_batch_axis() -> None:
    """sum_b x_b (x_b)^T is separable: gp.einsum keeps b in the op and sums it, which the classifier accepts."""
    x = per_example()
    gram = gp.einsum("bij,bik->jk", x, x)
    assert gram._node.op == "sum" and gram.shape == (4, 4)
    with pytest.raises(gp.GraphError, match="contracts the batch axis"):
        x.graph._add("einsum", (x, x), subscripts="bij,bik->jk")


# ---------------------------------------------------------------- sharding invariance

def graph_with(op: str) -> gp.Graph:
    """A loss that uses `op` on per-example values and, for the linear ops, on
    batch-reduced ones too, mixed with batch-independent terms (cut edges)."""
    g = gp.Graph(op)
    x = g.input("x", (3, 4), dtype="float64")
    W = g.param("W", (4, 4), dtype="float64")
    c = g.param("c", (3, 4), dtype="float64")
    h = gp.tanh(x @ W + c)                                     # (batch, 3, 4) per-example
    reduced = h.sum(axis=0)                                    # (3, 4) batch-reduced
    reg = (c ** 2)                                             # (3, 4) batch-independent
    weights = g.const(RNG.normal(size=(3, 4)))
    if op == "min":
        loss = h.min(axis=(1, 2)).mean() + h.min(axis=2).sum()
    elif op == "logsumexp":
        loss = gp.logsumexp(h, axis=(1, 2)).mean() + gp.logsumexp(h, axis=1, keepdims=True).sum()
    elif op == "var":
        loss = h.var(axis=2).mean() + 0.1 * reg.var()
    elif op == "std":
        loss = h.std(axis=(1, 2)).sum() + gp.std(h, axis=1).mean()
    elif op == "stack":
        both = gp.stack([reduced, reg, reduced * weights], axis=1)              # reduced with a cut edge
        loss = (gp.stack([h, h * h], axis=-1).mean(axis=(0, 3)) * weights).sum() + (both * 0.5).sum()
    elif op == "expand_dims":
        loss = (gp.expand_dims(h, (1, 3)).mean() + (gp.expand_dims(reduced + reg, 0) * weights).sum())
    elif op == "squeeze":
        col = h[:, :, 1:2]                                                     # (batch, 3, 1)
        loss = ((gp.squeeze(col) ** 2).sum()
                + (gp.squeeze(col.sum(axis=0) + reg[:, :1], 1) * gp.squeeze(weights[:, :1])).sum())
    elif op == "pad":
        s = g.param("s", (), dtype="float64")
        loss = (gp.pad(h, 1, value=0.25) ** 2).mean() + (gp.pad(reduced, ((0, 2), (1, 0)), value=s) * 3.0).sum()
    elif op == "flip":
        loss = (gp.flip(h, 2) * weights).sum() + (gp.flip(reduced + reg, (0, 1)) * weights).sum()
    elif op == "tile":
        loss = (gp.tile(h, (2, 1)) ** 2).mean() + (gp.tile(reduced, 2) * gp.tile(weights, 2)).sum()
    elif op == "broadcast_to":
        loss = ((gp.broadcast_to(h[:, :1, :], (2, 3, 4)) ** 2).sum()
                + (gp.broadcast_to(reduced, (2, 3, 4)) * weights).sum())
    elif op == "split":
        first, second = gp.split(h, 2, axis=2)
        left, right = gp.split(reduced + reg, [1], axis=0)
        loss = (first * second).mean() + (left * 2.0).sum() - right.sum()
    elif op == "einsum":
        loss = (gp.einsum("bij,jk->bik", h, W) ** 2).mean() \
            + (gp.einsum("bij,bik->jk", h, h) * W).sum() \
            + gp.einsum("bij,ij->", h, weights) \
            + (gp.einsum("ij,jk->ik", reduced + reg, W) * weights).sum()
    else:
        raise AssertionError(op)
    g.set_loss(loss)
    return g


SHARDED_OPS = ["min", "logsumexp", "var", "std", "stack", "expand_dims", "squeeze", "pad", "flip", "tile",
               "broadcast_to", "split", "einsum"]
LINEAR_OPS = ["stack", "expand_dims", "squeeze", "pad", "flip", "tile", "broadcast_to", "split", "einsum"]


def params_and_batch(graph: gp.Graph, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(n)
    params = {name: rng.normal(size=shape) for name, (shape, _) in graph.params.items()}
    batch = {"x": rng.normal(size=(n, 3, 4))}
    return params, batch


@pytest.mark.parametrize("op", LINEAR_OPS)
def test_linear_ops_carry_batch_reduced_values(op: str) -> None:
    kinds = {n.op: n.kind for n in graph_with(op).program().nodes if n.kind == BATCH_REDUCED}
    assert (op if op != "split" else "slice") in kinds, f"{op} is not applied to a batch-reduced value"


@pytest.mark.parametrize("op", SHARDED_OPS)
@pytest.mark.parametrize("n", [1, 5, 8])
def test_shard_sums_equal_the_whole_batch(op: str, n: int) -> None:
    graph = graph_with(op)
    params, batch = params_and_batch(graph, n)
    assert_shards_sum_to_whole(graph, params, batch, shards=range(2, 5), what=f"{op}, batch {n},")


def test_pad_value_on_a_batch_reduced_value_counts_once() -> None:
    """pad is linear in (x, value) jointly: the value's edge is cut, so sum(pad(sum_b x_b, value=s)) is
    sum(x) + s * border for any split, not s * border once per shard."""
    g = gp.Graph()
    x = g.input("x", (2,), dtype="float64")
    s = g.param("s", (), dtype="float64")
    g.set_loss(gp.pad(x.sum(axis=0), (1, 2), value=s).sum())
    data = {"x": np.arange(14.0).reshape(7, 2)}
    for shards in (1, 2, 3, 4):
        loss, grads = gp.local_gradients(g, {"s": np.array(0.5)}, data, shards=shards)
        assert loss == data["x"].sum() + 3 * 0.5
        assert grads["s"] == 3.0


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(workers=1) as running:
        yield running


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_the_service_is_bitwise_the_sharded_reference(cluster, workers: int) -> None:
    cluster.scale_to(workers)
    with cluster.client(timeout=60) as client:
        for op in SHARDED_OPS:
            graph = graph_with(op)
            params, batch = params_and_batch(graph, 7)
            result = client.gradients(graph, params, batch)
            assert len(result.shards) == workers
            assert_service_is_local_shards(result, graph, params, batch, f"{op}, {workers} workers")
