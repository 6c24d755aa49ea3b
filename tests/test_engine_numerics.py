"""Edge cases of the engine's fast elementwise rules and of its in-place
accumulation of adjoints: stable at large |x|, float32 stays float32, and
no array a rule or the caller still holds is ever written to."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import gradpool as gp
from gradpool.worker.engine import REGISTRY
from gradpool.worker.engine.ops import Call

from op_specs import SPECS, sample

EDGES = [-1000.0, -100.0, -88.8, -50.0, -30.0, -17.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 17.0, 30.0, 50.0, 100.0, 1000.0]
# references in extended precision (x86 long double: 64-bit mantissa), so that
# they are more accurate than the float64 results they check
LD = np.longdouble
REFERENCE = {
    "sigmoid": lambda x: 1 / (1 + np.exp(-x.astype(LD))),
    "softplus": lambda x: np.log1p(np.exp(x.astype(LD))),
}
DERIVATIVE = {
    "sigmoid": lambda x: REFERENCE["sigmoid"](x) * REFERENCE["sigmoid"](-x),  # s(1 - s)
    "softplus": REFERENCE["sigmoid"],
}


def strict():
    """Any floating-point warning (overflow, invalid, divide) is an error."""
    catcher = warnings.catch_warnings()
    catcher.__enter__()
    warnings.simplefilter("error")
    errstate = np.errstate(over="raise", invalid="raise", divide="raise")
    errstate.__enter__()
    return catcher, errstate


def run_strict(graph: gp.Graph, params: dict) -> tuple[float, dict]:
    catcher, errstate = strict()
    try:
        return gp.local_gradients(graph, params, {})
    finally:
        errstate.__exit__(None, None, None)
        catcher.__exit__(None, None, None)


def close(got: np.ndarray, want: np.ndarray, dtype: type, scale: np.ndarray | float = 0.0) -> None:
    """Within a few ulps of the float64 reference, relative to the value (or to
    `scale` where the true result comes from a cancellation); values below the
    smallest normal number may flush to 0."""
    eps, tiny = np.finfo(dtype).eps, np.finfo(dtype).tiny
    err = np.abs(got.astype(LD) - want)
    bound = 8 * eps * np.maximum(np.abs(want), scale) + tiny
    assert np.all(err <= bound), f"worst error {np.max(err / bound)} bounds: got {got}, want {want}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", ["sigmoid", "softplus"])
def test_sigmoid_softplus_at_the_edges(op: str, dtype: type) -> None:
    x = np.array(EDGES, dtype)
    graph = gp.Graph()
    p = graph.param("x", x.shape, dtype=np.dtype(dtype).name)
    value = getattr(gp, op)(p)
    graph.set_loss(value.sum())
    loss, grads = run_strict(graph, {"x": x})
    assert np.isfinite(loss) and grads["x"].dtype == dtype and np.all(np.isfinite(grads["x"]))
    x64 = x.astype(np.float64)
    # sigmoid' = s(1 - s) from the output (as torch does): 1 - s is exact, but s
    # itself is rounded near 1, so the error is a few ulps of 1, not of the value
    close(grads["x"], DERIVATIVE[op](x64), dtype, scale=1.0 if op == "sigmoid" else 0.0)
    forward = REGISTRY[op].forward({}, x)
    assert forward.dtype == dtype
    close(forward, REFERENCE[op](x64), dtype)
    assert REGISTRY[op].forward({}, np.array(dtype(-3))).shape == ()  # 0-d in, 0-d out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_saturates_exactly(dtype: type) -> None:
    s = REGISTRY["sigmoid"].forward({}, np.array([-1000, -750, 750, 1000], dtype))
    assert s.dtype == dtype and list(s) == [0, 0, 1, 1]
    s32 = REGISTRY["sigmoid"].forward({}, np.array([-20.0], np.float32))
    assert 0 < s32[0] < 3e-9  # not rounded to 0 on the left tail (log(sigmoid) stays finite)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("target", [0.0, 0.3, 1.0])
def test_binary_cross_entropy_at_the_edges(target: float, dtype: type) -> None:
    x = np.array(EDGES, dtype)
    graph = gp.Graph()
    p = graph.param("x", x.shape, dtype=np.dtype(dtype).name)
    graph.set_loss(gp.binary_cross_entropy(p, target).sum())
    loss, grads = run_strict(graph, {"x": x})
    assert grads["x"].dtype == dtype and np.isfinite(loss) and np.all(np.isfinite(grads["x"]))
    x64, t = x.astype(np.float64), dtype(target).astype(np.float64)
    forward = REGISTRY["binary_cross_entropy"].forward({}, x, np.full_like(x, target))
    assert forward.dtype == dtype
    # softplus(x) - x t cancels for large x and t = 1: error relative to the terms
    close(forward, REFERENCE["softplus"](x64) - x64 * t, dtype, scale=np.abs(x64))
    close(grads["x"], REFERENCE["sigmoid"](x64) - t, dtype, scale=1.0)


CASES = [(op, i, spec) for op, specs in sorted(SPECS.items()) for i, spec in enumerate(specs)]


@pytest.mark.parametrize("op,i,spec", CASES, ids=[f"{op}-{i}" for op, i, _ in CASES])
def test_rules_keep_float32(op: str, i: int, spec) -> None:
    """Each rule's own results (before the engine casts anything) are float32
    for float32 operands: no float64 temporaries from Python or numpy scalars."""
    rng = np.random.default_rng(i)
    args = [sample(arg, rng) for arg in spec.args]
    args = [a if a.dtype.kind in "ib" else a.astype(np.float32) for a in args]
    entry = REGISTRY[op]
    at = Call(entry.resolve_attrs(dict(spec.attrs)), per_example=False,
              wants=tuple(a.dtype.kind == "f" for a in args), batch=1)
    out = np.asarray(entry.forward(at, *args))
    # float32 for float32 operands; bool for comparisons, a cast's or one_hot's target dtype
    declared = entry.dtype(at, *(a.dtype for a in args))
    assert out.dtype == declared, f"{op} forward gives {out.dtype}, its dtype rule says {declared}"
    if entry.vjp is None:  # forward-only (argmax)
        return
    grads = entry.vjp(at, np.ones_like(out), out, *args)
    for k, grad in enumerate(grads):
        if grad is not None:
            assert np.asarray(grad).dtype == np.float32, f"{op} gradient {k} is {np.asarray(grad).dtype}"


def test_accumulation_never_writes_to_a_shared_adjoint() -> None:
    """x1 feeds an add (whose rule hands the *same* array g to both inputs)
    and, earlier in the graph, a mul and a sum (whose rule hands a read-only
    broadcast view). Reverse order gives x1 the shared g first; adding its
    other contributions in place would change x2's gradient too (or fail on
    the read-only view). The engine copies on the second contribution."""
    graph = gp.Graph()
    x1 = graph.param("x1", (3,), dtype="float64")
    x2 = graph.param("x2", (3,), dtype="float64")
    c = graph.const(np.array([2.0, 3.0, 4.0]))
    w = graph.const(np.array([5.0, 7.0, 11.0]))
    first = (x1 * c).sum()          # x1: c
    second = x1.sum()               # x1: 1 (read-only broadcast view)
    y = (x1 + x2) * w               # x1, x2: w (one array for both)
    graph.set_loss(first + second + y.sum() + (x1 * 0.5).sum())  # x1: 0.5 (a third, in place)
    params = {"x1": np.array([1.0, -2.0, 3.0]), "x2": np.array([0.5, 0.25, -1.0])}
    before = {k: v.copy() for k, v in params.items()}
    _, grads = gp.local_gradients(graph, params, {})
    np.testing.assert_array_equal(grads["x2"], [5.0, 7.0, 11.0])
    np.testing.assert_array_equal(grads["x1"], [5.0 + 2.0 + 1.0 + 0.5, 7.0 + 3.0 + 1.0 + 0.5, 11.0 + 4.0 + 1.0 + 0.5])
    for k in params:  # inputs and params are never written to
        np.testing.assert_array_equal(params[k], before[k])


def test_accumulation_over_many_uses() -> None:
    """A value used ten times (five sigmoid paths, five direct): one fresh sum,
    then in-place additions, give the analytic gradient."""
    graph = gp.Graph()
    x = graph.param("x", (4, 5), dtype="float32")
    total = None
    for k in range(5):
        term = (gp.sigmoid(x * float(k + 1)) * x).sum()
        total = term if total is None else total + term
    graph.set_loss(total)
    params = {"x": np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)}
    before = params["x"].copy()
    _, grads = gp.local_gradients(graph, params, {})
    x64 = before.astype(np.float64)
    want = sum(REFERENCE["sigmoid"](k * x64) + k * x64 * DERIVATIVE["sigmoid"](k * x64) for k in range(1, 6))
    assert grads["x"].dtype == np.float32
    np.testing.assert_allclose(grads["x"], want, rtol=1e-5)
    np.testing.assert_array_equal(params["x"], before)


def _at_byte_offset(array: np.ndarray, offset: int) -> np.ndarray:
    """A copy of `array` whose data starts `offset` bytes past a 64-byte boundary,
    as a tensor read in place from a request's bytes may."""
    buffer = np.empty(array.nbytes + 128, np.uint8)
    start = (-buffer.ctypes.data) % 64 + offset
    view = buffer[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    view[...] = array
    return view


def test_misaligned_tensors_give_the_same_bits_as_aligned_ones() -> None:
    """numpy's loops for misaligned float64 data round differently (a (2, 2)
    product of a strided view of them does in most trials): the engine aligns
    what it is given, so a worker reading tensors in place matches one process
    bitwise."""
    g = gp.Graph()
    x = g.input("x", (2, 2), dtype="float64")
    W = g.param("W", (2, 7), dtype="float64")
    g.set_loss(gp.tanh(x[:, :, :1] @ W[:1, :]).sum())
    rng = np.random.default_rng(0)
    program = g.program()
    for _ in range(20):
        inputs = {"x": rng.normal(size=(8, 2, 2))}
        params = {"W": rng.normal(size=(2, 7))}
        reference = program.run(params, inputs)
        shifted = program.run({"W": _at_byte_offset(params["W"], 4)}, {"x": _at_byte_offset(inputs["x"], 4)})
        assert reference.loss == shifted.loss
        assert np.array_equal(reference.grads["W"], shifted.grads["W"])
