"""Edge of the domain: one saturated example (|x| = 1e4, and +-inf where the
op has a limit there) in a batch of ordinary ones must not turn the batch's
summed gradient into NaN, must give that example the limit of the derivative,
and must leave the other examples' gradients as they were. float32 and float64.

`one_hot` is not here: its only input is integer labels, which do not
saturate (out-of-range labels are an InputError, see test_ops_math.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

import gradpool as gp

INF = math.inf


@dataclass(frozen=True)
class Edge:
    build: Callable[[gp.Graph, gp.Expr], gp.Expr]  # per-example (batch, n) -> per-example, summed into the loss
    saturated: tuple[float, ...]  # one example's n values
    derivative: tuple[float, ...]  # d loss / d x at those values: the limits
    normal: str = "real"  # how the ordinary examples are drawn: real N(0, 1), positive [0.5, 2]


def elementwise(fn: Callable[[gp.Expr], gp.Expr], limits: dict[float, float], normal: str = "real") -> Edge:
    return Edge(lambda g, x: fn(x), tuple(limits), tuple(limits.values()), normal)


SATURATING = {-1e4: 0.0, 1e4: 0.0, -INF: 0.0, INF: 0.0}  # derivative -> 0 on both sides
STEP = {-1e4: 0.0, 1e4: 1.0, -INF: 0.0, INF: 1.0}  # derivative -> 0 on the left, 1 on the right

EDGES: dict[str, Edge] = {
    # this task's ops
    "sin": elementwise(gp.sin, {1e4: math.cos(1e4), -1e4: math.cos(1e4)}),
    "cos": elementwise(gp.cos, {1e4: -math.sin(1e4), -1e4: math.sin(1e4)}),
    "erf": elementwise(gp.erf, SATURATING),
    "gelu": elementwise(gp.gelu, STEP),
    "gelu_tanh": elementwise(lambda x: gp.gelu(x, approximate="tanh"), STEP),
    "silu": elementwise(gp.silu, STEP),
    "elu": elementwise(lambda x: gp.elu(x, 0.5), STEP),
    "log1p": elementwise(gp.log1p, {1e4: 1 / (1 + 1e4), INF: 0.0}, normal="positive"),
    "expm1": elementwise(gp.expm1, {-1e4: 0.0, -INF: 0.0}),
    "clip": elementwise(lambda x: gp.clip(x, -1.0, 1.0), SATURATING),
    # every comparison as a where condition: x > 0 picks x (1) or 0.1 x (0.1), x <= 0 picks x or 3x, ...
    "where_and_comparisons": elementwise(
        lambda x: gp.where(x > 0, x, 0.1 * x) + gp.where(x <= 0, x, 3 * x) + gp.where(x != 1, x, 0 * x)
        + gp.where(x >= 0, 2 * x, 0.5 * x) + gp.where(x < 0, x, x) + gp.where(x == x, x, 0.5 * x),
        {1e4: 1 + 3 + 1 + 2 + 1 + 1, -1e4: 0.1 + 1 + 1 + 0.5 + 1 + 1, INF: 9.0}),  # (-inf too would make inf - inf)
    "take_along_axis": Edge(lambda g, x: gp.take_along_axis(x, g.const(np.array([[3, 2, 1, 0, 0]])), axis=1),
                            (1e4, -1e4, INF, 5.0), (2.0, 1.0, 1.0, 1.0)),
    "cast": elementwise(lambda x: x.astype("float64" if x.dtype == np.float32 else "float32").astype(x.dtype)
                        + x.astype("int32").astype(x.dtype), {1e4: 1.0, -1e4: 1.0}),
    "stop_gradient": elementwise(lambda x: x + gp.stop_gradient(gp.exp(x)), {1e4: 1.0, -1e4: 1.0}),
    "pow": elementwise(lambda x: x ** 2.5, {1e4: 2.5 * 1e6, 0.0: 0.0}, normal="positive"),
    "pow_zero": elementwise(lambda x: x ** 0, {0.0: 0.0, 1e4: 0.0}),
    "pow_tensor": elementwise(lambda x: 2 ** x, {-1e4: 0.0, -INF: 0.0}),
    "abs": elementwise(abs, {1e4: 1.0, -1e4: -1.0, INF: 1.0, -INF: -1.0}),
    # the existing ops the issue names
    "sigmoid": elementwise(gp.sigmoid, SATURATING),
    "softplus": elementwise(gp.softplus, STEP),
    "tanh": elementwise(gp.tanh, SATURATING),
    # rows: sum(log_softmax) has gradient 1 - n softmax; softmax of (1e4, -1e4, -inf, 0) is (1, 0, 0, 0)
    "log_softmax": Edge(lambda g, x: gp.log_softmax(x), (1e4, -1e4, -INF, 0.0), (-3.0, 1.0, 1.0, 1.0)),
    # label 1 (below): gradient softmax - onehot = (1, -1, 0, 0)
    "softmax_cross_entropy": Edge(lambda g, x: gp.softmax_cross_entropy(x, g["labels"]),
                                  (1e4, -1e4, -INF, 0.0), (1.0, -1.0, 0.0, 0.0)),
    # sigmoid(x) - t, t = 0.25
    "binary_cross_entropy": elementwise(lambda x: gp.binary_cross_entropy(x, 0.25),
                                        {1e4: 0.75, -1e4: -0.25, 0.0: 0.25}),
}


def build(name: str, dtype: str) -> gp.Graph:
    """loss = sum over the batch of op(x + b): d loss / d b sums the examples'
    derivatives, and a second param, `p`, holds one example of its own."""
    edge = EDGES[name]
    width = len(edge.saturated)
    graph = gp.Graph(name)
    x = graph.input("x", (width,), dtype=dtype)
    graph.input("labels", (), dtype="int64")
    b = graph.param("b", (width,), dtype=dtype, init="zeros")
    graph.set_loss(edge.build(graph, x + b).sum())
    return graph


def batch(name: str, dtype: str, with_saturated: bool, seed: int = 0) -> dict[str, np.ndarray]:
    edge = EDGES[name]
    rng = np.random.default_rng(seed)
    shape = (5, len(edge.saturated))
    x = rng.normal(size=shape) if edge.normal == "real" else rng.uniform(0.5, 2.0, size=shape)
    if with_saturated:
        x = np.concatenate([x[:2], [edge.saturated], x[2:]])
    labels = np.ones(len(x), dtype=np.int64)  # softmax_cross_entropy's labels
    return {"x": x.astype(dtype), "labels": labels}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(EDGES))
def test_a_saturated_example_does_not_poison_the_batch(name: str, dtype: str) -> None:
    edge = EDGES[name]
    graph = build(name, dtype)
    params = {"b": np.zeros(len(edge.saturated), dtype=dtype)}
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        loss, grads = gp.local_gradients(graph, params, batch(name, dtype, True))
        _, ordinary = gp.local_gradients(graph, params, batch(name, dtype, False))
        alone = {"x": np.array([edge.saturated], dtype=dtype), "labels": np.ones(1, np.int64)}
        _, saturated = gp.local_gradients(graph, params, alone)
    assert not math.isnan(loss)
    summed = grads["b"]
    assert summed.dtype == np.dtype(dtype)
    assert not np.any(np.isnan(summed)), f"{name}: the summed gradient is {summed}"
    assert np.all(np.isfinite(ordinary["b"]))
    rtol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(saturated["b"], edge.derivative, rtol=rtol, atol=rtol,
                               err_msg=f"{name}: the saturated example's derivative is not the limit")
    np.testing.assert_allclose(summed, ordinary["b"] + saturated["b"], rtol=rtol, atol=rtol * 10,
                               err_msg=f"{name}: the ordinary examples' gradients changed")
