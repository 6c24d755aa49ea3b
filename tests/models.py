"""The models the tests (and the service tests) share: the lecture's running
examples and a softmax MLP, each with data made from a seed."""

from __future__ import annotations

import numpy as np
import pytest

import gradpool as gp

from op_specs import Case, sample

LAMBDA = 0.1


def logistic_regression(dtype: str = "float64", lam: float = LAMBDA) -> gp.Graph:
    """Lecture section 2: z = wx + b, y = sigma(z), L = (y - t)^2 / 2, R = w^2 / 2,
    L_reg = L + lambda R, summed over the batch (w reaches the loss twice)."""
    g = gp.Graph("logistic_regression")
    x = g.input("x", dtype=dtype)
    t = g.input("t", dtype=dtype)
    w = g.param("w", dtype=dtype)
    b = g.param("b", dtype=dtype)
    z = (w * x + b).named("z")
    y = gp.sigmoid(z).named("y")
    loss = (0.5 * (y - t) ** 2).sum().named("L")
    reg = (0.5 * w ** 2).named("R")
    g.set_loss((loss + lam * reg).named("L_reg"))
    return g


def two_layer_net(d: int = 3, h: int = 4, k: int = 2, dtype: str = "float64") -> gp.Graph:
    """Lecture section 3: z = W1 x + b1, h = sigma(z), y = W2 h + b2,
    L = 1/2 ||t - y||^2, written for a batch of row vectors."""
    g = gp.Graph("two_layer_net")
    x = g.input("x", (d,), dtype=dtype)
    t = g.input("t", (k,), dtype=dtype)
    W1 = g.param("W1", (h, d), dtype=dtype)
    b1 = g.param("b1", (h,), dtype=dtype, init="normal")
    W2 = g.param("W2", (k, h), dtype=dtype)
    b2 = g.param("b2", (k,), dtype=dtype, init="normal")
    hidden = gp.sigmoid(x @ W1.T + b1).named("h")
    y = (hidden @ W2.T + b2).named("y")
    g.set_loss((0.5 * ((y - t) ** 2).sum()).named("L"))
    return g


def softmax_mlp(d: int = 8, h: int = 16, classes: int = 5, dtype: str = "float64", l2: float = 1e-2) -> gp.Graph:
    """Softmax cross-entropy MLP with a mean loss and an L2 term."""
    g = gp.Graph("softmax_mlp")
    x = g.input("x", (d,), dtype=dtype)
    y = g.input("y", (), dtype="int64")
    W1 = g.param("W1", (d, h), dtype=dtype)
    b1 = g.param("b1", (h,), dtype=dtype, init="normal")
    W2 = g.param("W2", (h, classes), dtype=dtype)
    b2 = g.param("b2", (classes,), dtype=dtype, init="normal")
    logits = (gp.tanh(x @ W1 + b1) @ W2 + b2).named("logits")
    data_loss = gp.softmax_cross_entropy(logits, y).mean()
    g.set_loss(data_loss + l2 * ((W1 ** 2).sum() + (W2 ** 2).sum()))
    return g


def batch_for(graph: gp.Graph, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random data for every input of `graph`: floats N(0, 1), integer inputs
    as class labels in range of the logits they index."""
    rng = np.random.default_rng(seed)
    batch = {}
    for name, (shape, dtype) in graph.inputs.items():
        if dtype.kind == "i":
            classes = int(graph["logits"].shape[-1]) if "logits" in graph._names else 2
            batch[name] = rng.integers(0, classes, size=(n, *shape)).astype(dtype)
        else:
            batch[name] = rng.normal(size=(n, *shape)).astype(dtype)
    return batch


def params_for(graph: gp.Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Like init_params, but with no zero biases, so every gradient term shows."""
    rng = np.random.default_rng(seed + 1000)
    return {name: rng.normal(scale=0.5, size=shape).astype(dtype) for name, (shape, dtype) in graph.params.items()}


def dropout_mlp(d: int = 8, h: int = 16, classes: int = 5, rate: float = 0.3, dtype: str = "float64",
                l2: float = 1e-2) -> gp.Graph:
    """softmax_mlp with dropout on its hidden layer: gradients need a seed."""
    g = gp.Graph("dropout_mlp")
    x = g.input("x", (d,), dtype=dtype)
    y = g.input("y", (), dtype="int64")
    W1 = g.param("W1", (d, h), dtype=dtype)
    b1 = g.param("b1", (h,), dtype=dtype, init="normal")
    W2 = g.param("W2", (h, classes), dtype=dtype)
    b2 = g.param("b2", (classes,), dtype=dtype, init="normal")
    hidden = gp.dropout(gp.tanh(x @ W1 + b1), rate).named("dropped")
    logits = (hidden @ W2 + b2).named("logits")
    data_loss = gp.softmax_cross_entropy(logits, y).mean()
    g.set_loss(data_loss + l2 * ((W1 ** 2).sum() + (W2 ** 2).sum()))
    return g


# ------------------------------------------------------------------ checks shared by the sharding tests

def assert_shards_sum_to_whole(graph: gp.Graph, params: dict, batch: dict, shards=range(1, 5),
                               rtol: float = 1e-12, atol: float = 1e-12, what: str = "") -> None:
    """Invariant 1 in one process: for every split, the shards' summed gradient
    equals the whole batch's (to rounding: the sums run in another order)."""
    whole_loss, whole = gp.local_gradients(graph, params, batch)
    for k in shards:
        loss, grads = gp.local_gradients(graph, params, batch, shards=k)
        assert loss == pytest.approx(whole_loss, rel=rtol, abs=atol), f"{what} {k} shards: loss"
        for name in params:
            np.testing.assert_allclose(grads[name], whole[name], rtol=rtol, atol=atol,
                                       err_msg=f"{what} {k} shards, param {name}")


def assert_service_is_local_shards(result: gp.GradientsResult, graph: gp.Graph, params: dict, batch: dict,
                                   what: str = "") -> None:
    """The service's answer is bitwise `local_gradients(shards=k)` over as many
    (equal-capacity) shards: the same split, summed in the same order."""
    loss, grads = gp.local_gradients(graph, params, batch, shards=len(result.shards))
    assert result.loss == loss, f"{what}: loss"
    for name in grads:
        assert result.grads[name].dtype == grads[name].dtype, f"{what}: {name}"
        assert result.grads[name].tobytes() == grads[name].tobytes(), f"{what}: {name}, {len(result.shards)} shards"


def op_graph(op: str, spec: Case, seed: int, dtype: str = "float64",
          temporaries: bool = False) -> tuple[gp.Graph, dict[str, np.ndarray]]:
    """loss = sum(op(args...) * random weights); float args are params, so their
    gradients come back, integer args (labels, indices) are consts. With
    `temporaries`, each float arg is `param * 1` (exact): a value of the
    engine's own that only this op reads, which it may write into."""
    rng = np.random.default_rng(seed)
    graph = gp.Graph(op)
    args, params = [], {}
    for k, arg in enumerate(spec.args):
        value = sample(arg, rng)
        if value.dtype.kind in "ib":
            args.append(graph.const(value))
        else:
            param = graph.param(f"a{k}", arg.shape, dtype=dtype)
            args.append(param * graph.const(np.ones(arg.shape, dtype)) if temporaries else param)
            params[f"a{k}"] = value.astype(dtype)
    out = graph._add(op, args, **spec.attrs)
    if out.dtype != dtype:  # bool, integer or other-float outputs: weighed as `dtype`
        out = gp.cast(out, dtype)
    weights = graph.const(rng.normal(size=tuple(out.shape)).astype(dtype))
    graph.set_loss((out * weights).sum())
    return graph, params
