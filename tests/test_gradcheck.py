"""Central-difference gradient checks for every op in the registry (float64)."""

from __future__ import annotations

import numpy as np
import pytest

import gradpool as gp
from gradpool.worker.engine import REGISTRY

from models import op_graph
from op_specs import SPECS, Case

SEED = 20240607  # fixes random ops' masks (dropout), so each case is a deterministic function
# Forward-only ops (argmax) have no gradient to check; their specs are exercised by
# test_forward_only_ops_are_refused_on_the_gradient_path.
CASES = [(op, i, c) for op, cases in sorted(SPECS.items()) for i, c in enumerate(cases) if REGISTRY[op].vjp is not None]
FORWARD_ONLY = [(op, i, c) for op, cases in sorted(SPECS.items()) for i, c in enumerate(cases)
                if op in REGISTRY and REGISTRY[op].vjp is None]


def test_every_registered_op_has_a_gradcheck_spec() -> None:
    missing = sorted(set(REGISTRY) - set(SPECS))
    stale = sorted(set(SPECS) - set(REGISTRY))
    assert not missing, f"ops without a gradient-check spec in tests/op_specs.py: {missing}"
    assert not stale, f"specs for ops that are not registered: {stale}"


def numeric_gradient(graph: gp.Graph, params: dict[str, np.ndarray], name: str, eps: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(params[name])
    for idx in np.ndindex(params[name].shape):
        shifted = {k: v.copy() for k, v in params.items()}
        shifted[name][idx] += eps
        up, _ = gp.local_gradients(graph, shifted, {}, seed=SEED)
        shifted[name][idx] -= 2 * eps
        down, _ = gp.local_gradients(graph, shifted, {}, seed=SEED)
        grad[idx] = (up - down) / (2 * eps)
    return grad


@pytest.mark.parametrize("op,i,spec", CASES, ids=[f"{op}-{i}" for op, i, _ in CASES])
def test_vjp_matches_central_differences(op: str, i: int, spec: Case) -> None:
    graph, params = op_graph(op, spec, seed=i)
    _, grads = gp.local_gradients(graph, params, {}, seed=SEED)
    assert set(grads) == set(params)
    for name in params:
        assert grads[name].shape == params[name].shape and grads[name].dtype == np.float64
        if not REGISTRY[op].passes_gradient:  # stop_gradient, comparisons: exactly none
            assert not np.any(grads[name]), f"{op} case {i}: a gradient reached argument {name}"
            continue
        np.testing.assert_allclose(grads[name], numeric_gradient(graph, params, name), rtol=1e-5, atol=1e-7,
                                   err_msg=f"{op} case {i}: gradient of argument {name}")


@pytest.mark.parametrize("op", ["sigmoid", "softplus", "tanh", "exp", "mul", "matmul", "softmax_cross_entropy",
                                "erf", "gelu", "silu", "elu", "where", "clip", "take_along_axis", "pow_tensor", "dropout"])
def test_float32_stays_float32(op: str) -> None:
    graph, params = op_graph(op, SPECS[op][0], seed=0, dtype="float32")
    loss, grads = gp.local_gradients(graph, params, {}, seed=SEED)
    assert isinstance(loss, float)
    assert all(g.dtype == np.float32 for g in grads.values())


def test_sigmoid_and_softplus_do_not_overflow() -> None:
    graph = gp.Graph()
    x = graph.param("x", (4,), dtype="float64")
    graph.set_loss((gp.sigmoid(x) + gp.softplus(x) + gp.binary_cross_entropy(x, 1.0)).sum())
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, grads = gp.local_gradients(graph, {"x": np.array([-1000.0, -30.0, 30.0, 1000.0])}, {})
    assert np.isfinite(loss) and np.all(np.isfinite(grads["x"]))


@pytest.mark.parametrize("op,i,spec", FORWARD_ONLY, ids=[f"{op}-{i}" for op, i, _ in FORWARD_ONLY])
def test_forward_only_ops_end_the_gradient_path(op: str, i: int, spec: Case) -> None:
    """argmax is piecewise constant and its result is an integer: a param that
    reaches the loss only through it gets a zero gradient (as in torch), not an error."""
    graph = gp.Graph(op)
    args = [graph.param(f"a{k}", arg.shape, dtype="float64") for k, arg in enumerate(spec.args)]
    indices = graph._add(op, args, **spec.attrs)  # integer results (argmax) pick rows of a const table
    table = graph.const(np.ones((max(max(arg.shape) for arg in spec.args), 2)))
    graph.set_loss(gp.embedding(table, indices).sum())
    rng = np.random.default_rng(i)
    params = {f"a{k}": rng.normal(size=arg.shape) for k, arg in enumerate(spec.args)}
    _, grads = gp.local_gradients(graph, params, {})
    assert all(not np.any(g) for g in grads.values())


def test_a_float_op_without_a_gradient_rule_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """An op registered with no VJP that lies between a param and the loss:
    the graph is refused when the loss is set, naming the op and the node."""
    from gradpool.worker.engine.ops import Op, elementwise_shape
    monkeypatch.setitem(REGISTRY, "rule_less", Op("rule_less", 1, elementwise_shape, lambda at, x: x, None,
                                                  dtype=lambda at, d: d))
    graph = gp.Graph()
    w = graph.param("w", (3,), dtype="float64")
    with pytest.raises(gp.GraphError, match="op 'rule_less' has no gradient rule.*rule_less_1"):
        graph.set_loss(graph._add("rule_less", [w]).sum())
