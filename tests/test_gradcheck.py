"""Central-difference gradient checks for every op in the registry (float64)."""

from __future__ import annotations

import numpy as np
import pytest

import gradpool as gp
from gradpool.worker.engine import REGISTRY

from op_specs import SPECS, Case, sample

CASES = [(op, i, c) for op, cases in sorted(SPECS.items()) for i, c in enumerate(cases)]


def test_every_registered_op_has_a_gradcheck_spec() -> None:
    missing = sorted(set(REGISTRY) - set(SPECS))
    stale = sorted(set(SPECS) - set(REGISTRY))
    assert not missing, f"ops without a gradient-check spec in tests/op_specs.py: {missing}"
    assert not stale, f"specs for ops that are not registered: {stale}"


def build(op: str, spec: Case, seed: int, dtype: str = "float64") -> tuple[gp.Graph, dict[str, np.ndarray]]:
    """loss = sum(op(args...) * random weights); float args are params, so their
    gradients come back, integer args (labels, indices) are consts."""
    rng = np.random.default_rng(seed)
    graph = gp.Graph(op)
    args, params = [], {}
    for k, arg in enumerate(spec.args):
        value = sample(arg, rng)
        if value.dtype.kind in "ib":
            args.append(graph.const(value))
        else:
            args.append(graph.param(f"a{k}", arg.shape, dtype=dtype))
            params[f"a{k}"] = value.astype(dtype)
    out = graph._add(op, args, **spec.attrs)
    if out.dtype != dtype:  # bool, integer or other-float outputs: weighed as `dtype`
        out = gp.cast(out, dtype)
    weights = graph.const(rng.normal(size=tuple(out.shape)).astype(dtype))
    graph.set_loss((out * weights).sum())
    return graph, params


def numeric_gradient(graph: gp.Graph, params: dict[str, np.ndarray], name: str, eps: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(params[name])
    for idx in np.ndindex(params[name].shape):
        shifted = {k: v.copy() for k, v in params.items()}
        shifted[name][idx] += eps
        up, _ = gp.local_gradients(graph, shifted, {})
        shifted[name][idx] -= 2 * eps
        down, _ = gp.local_gradients(graph, shifted, {})
        grad[idx] = (up - down) / (2 * eps)
    return grad


@pytest.mark.parametrize("op,i,spec", CASES, ids=[f"{op}-{i}" for op, i, _ in CASES])
def test_vjp_matches_central_differences(op: str, i: int, spec: Case) -> None:
    graph, params = build(op, spec, seed=i)
    _, grads = gp.local_gradients(graph, params, {})
    assert set(grads) == set(params)
    for name in params:
        assert grads[name].shape == params[name].shape and grads[name].dtype == np.float64
        if not REGISTRY[op].passes_gradient:  # stop_gradient, comparisons: exactly none
            assert not np.any(grads[name]), f"{op} case {i}: a gradient reached argument {name}"
            continue
        np.testing.assert_allclose(grads[name], numeric_gradient(graph, params, name), rtol=1e-5, atol=1e-7,
                                   err_msg=f"{op} case {i}: gradient of argument {name}")


@pytest.mark.parametrize("op", ["sigmoid", "softplus", "tanh", "exp", "mul", "matmul", "softmax_cross_entropy",
                                "erf", "gelu", "silu", "elu", "where", "clip", "take_along_axis", "pow_tensor"])
def test_float32_stays_float32(op: str) -> None:
    graph, params = build(op, SPECS[op][0], seed=0, dtype="float32")
    loss, grads = gp.local_gradients(graph, params, {})
    assert isinstance(loss, float)
    assert all(g.dtype == np.float32 for g in grads.values())


def test_sigmoid_and_softplus_do_not_overflow() -> None:
    graph = gp.Graph()
    x = graph.param("x", (4,), dtype="float64")
    graph.set_loss((gp.sigmoid(x) + gp.softplus(x) + gp.binary_cross_entropy(x, 1.0)).sum())
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, grads = gp.local_gradients(graph, {"x": np.array([-1000.0, -30.0, 30.0, 1000.0])}, {})
    assert np.isfinite(loss) and np.all(np.isfinite(grads["x"]))
