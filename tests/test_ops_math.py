"""Issue 13's math, comparison, selection and cast ops: erf's accuracy, the
semantics at the edges (against PyTorch's values, written out by hand since
torch is not a dependency), the SDK operators, and sharding invariance on a
real cluster."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradpool as gp
from gradpool.worker.engine.ops import _erf64, _erfc64

from models import assert_service_is_local_shards, assert_shards_sum_to_whole


def ulps(got: np.ndarray, want: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """|got - want| in units of the last place of `want` in `dtype`."""
    spacing = np.spacing(np.abs(want.astype(dtype))).astype(np.float64)
    return np.abs(got.astype(np.float64) - want) / spacing


# ---------------------------------------------------------------- erf

def erf_grid() -> np.ndarray:
    """Dense on [-30, 30] (every region of the approximation and both tails),
    tiny and subnormal magnitudes, and the joins between regions."""
    joins = np.concatenate([np.linspace(j - 1e-3, j + 1e-3, 2001) for j in (0.25, 0.84375, 1.25, 1 / 0.35, 6.0)])
    tiny = np.geomspace(5e-324, 1e-3, 3000)
    grid = np.concatenate([np.linspace(-30, 30, 300_001), tiny, joins, [0.0, 1e4, 1e300]])
    return np.concatenate([grid, -grid])


def test_erf_is_within_one_ulp_of_math_erf_everywhere() -> None:
    x = erf_grid()
    want = np.array([math.erf(v) for v in x])
    got = _erf64(x)
    worst = ulps(got, want)
    assert worst.max() <= 1.0, f"erf({x[worst.argmax()]!r}) is {worst.max()} ulps off"
    assert np.array_equal(np.signbit(got[x == 0]), np.signbit(x[x == 0]))  # erf(-0.0) = -0.0


def test_erf_float32_is_math_erf_rounded_to_float32() -> None:
    x = np.linspace(-6, 6, 100_001).astype(np.float32)
    graph = gp.Graph()
    xs = graph.input("x", (), dtype="float32")
    gp.erf(xs).named("e")
    graph.set_loss(xs.sum())
    got = gp.local_forward(graph, {}, {"x": x}, ["e"])["e"]
    assert got.dtype == np.float32
    want = np.array([math.erf(float(v)) for v in x])
    assert ulps(got, want, np.float32).max() <= 0.5 + 1e-6  # correctly rounded: the float64 value is that close


def test_erfc_keeps_its_relative_accuracy_on_the_right_tail() -> None:
    """gelu's left tail is x erfc(-x / sqrt 2) / 2: 1 - erf would cancel to 0."""
    x = np.concatenate([np.linspace(-6, 27, 200_001), np.geomspace(1e-300, 1, 1000)])
    want = np.array([math.erfc(v) for v in x])
    normal = want > 1e-300  # below, erfc is subnormal and has fewer digits
    worst = ulps(_erfc64(x[normal]), want[normal])
    assert worst.max() <= 5.0, f"erfc({x[normal][worst.argmax()]!r}) is {worst.max()} ulps off"
    assert list(_erfc64(np.array([28.0, 1e4, np.inf, -np.inf, -30.0]))) == [0.0, 0.0, 0.0, 2.0, 2.0]
    assert np.isnan(_erf64(np.array([np.nan]))[0]) and np.isnan(_erfc64(np.array([np.nan]))[0])


# ---------------------------------------------------------------- values against closed forms

def forward(build, x: np.ndarray, dtype: str = "float64") -> np.ndarray:
    graph = gp.Graph()
    xs = graph.input("x", x.shape[1:], dtype=dtype)
    build(xs).named("out")
    graph.set_loss(xs.sum())
    return gp.local_forward(graph, {}, {"x": x.astype(dtype)}, ["out"])["out"]


def grad(build, x: np.ndarray, dtype: str = "float64") -> np.ndarray:
    """d sum(build(p)) / dp at p = x: each element's own derivative."""
    graph = gp.Graph()
    p = graph.param("p", x.shape, dtype=dtype)
    graph.set_loss(build(p).sum())
    return gp.local_gradients(graph, {"p": x.astype(dtype)}, {})[1]["p"]


def test_gelu_silu_elu_match_their_definitions() -> None:
    x = np.linspace(-8, 8, 1601)[:, None]
    # Phi(x) = erfc(-x / sqrt 2) / 2 with the argument rounded as gelu rounds it (x * sqrt(1/2), torch's
    # M_SQRT1_2): on the tail a rounding of the argument alone moves erfc by ~2 x^2 ulps.
    phi = np.array([0.5 * math.erfc(v * -math.sqrt(0.5)) for v in x[:, 0]])[:, None]
    np.testing.assert_allclose(forward(gp.gelu, x), x * phi, rtol=2e-15, atol=1e-300)
    tanh_form = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(forward(lambda v: gp.gelu(v, approximate="tanh"), x), tanh_form, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(forward(gp.silu, x), x / (1 + np.exp(-x)), rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(forward(lambda v: gp.elu(v, 0.7), x), np.where(x > 0, x, 0.7 * np.expm1(x)), rtol=1e-15)
    # The left tail keeps its digits: gelu(-30) = -30 Phi(-30), Phi(-30) = erfc(30 / sqrt 2) / 2 ~ 4.9e-198.
    assert forward(gp.gelu, np.array([[-30.0]]))[0, 0] == pytest.approx(-30 * 0.5 * math.erfc(30 * math.sqrt(0.5)), rel=1e-14)
    with pytest.raises(gp.GraphError, match="'none' or 'tanh'"):
        forward(lambda v: gp.gelu(v, approximate="fast"), x)


def test_gradients_at_kinks_follow_torch() -> None:
    """torch.nn.functional.elu'(0) = alpha (the x <= 0 branch), clamp'(bound) = 1
    (bounds included), abs'(0) = 0 (sign), relu'(0) = 0."""
    at = np.array([0.0, -1.0, 1.0])
    assert list(grad(lambda v: gp.elu(v, 0.5), at)) == [0.5, pytest.approx(0.5 * math.exp(-1)), 1.0]
    assert list(grad(lambda v: gp.clip(v, -1.0, 1.0), at)) == [1.0, 1.0, 1.0]
    assert list(grad(lambda v: gp.clip(v, -0.5, 0.5), at)) == [1.0, 0.0, 0.0]
    assert list(grad(lambda v: v.clip(lo=0.0), at)) == [1.0, 0.0, 1.0]
    assert list(grad(abs, at)) == [0.0, -1.0, 1.0]
    with pytest.raises(gp.GraphError, match="lo <= hi"):
        grad(lambda v: gp.clip(v, 1.0, -1.0), at)


# ---------------------------------------------------------------- pow at the edges (torch's values)

@pytest.mark.parametrize("exponent,x,value,derivative", [
    # torch.pow(torch.tensor(0., requires_grad=True), e).backward() gives:
    (0.0, 0.0, 1.0, 0.0),        # e = 0: 0 ** 0 = 1, gradient 0 (not 0 * 0^-1 = NaN)
    (0.0, 3.0, 1.0, 0.0),
    (1.0, 0.0, 0.0, 1.0),        # e = 1: 1 * 0^0 = 1
    (2.0, 0.0, 0.0, 0.0),        # e = 2 (gradpool writes square)
    (3.0, 0.0, 0.0, 0.0),
    (2.5, 0.0, 0.0, 0.0),        # 2.5 * 0^1.5 = 0
    (0.5, 0.0, 0.0, math.inf),   # 0.5 * 0^-0.5 = inf
    (-1.0, 0.0, math.inf, -math.inf),  # -1 * 0^-2 = -inf
    (3.0, -2.0, -8.0, 12.0),
])
def test_pow_with_a_constant_exponent_at_the_edges(exponent: float, x: float, value: float, derivative: float) -> None:
    with np.errstate(divide="ignore"):
        assert forward(lambda v: v ** exponent, np.array([[x]]))[0, 0] == value
        assert grad(lambda v: v ** exponent, np.array([x]))[0] == derivative


@pytest.mark.parametrize("x,y,value,dx,dy", [
    # torch.pow(x, y) with both tensors requiring grad, x.grad and y.grad after backward():
    (0.0, 0.0, 1.0, 0.0, 0.0),         # dx: 0 where y == 0; dy: 0 where x == 0 and y >= 0
    (0.0, 2.0, 0.0, 0.0, 0.0),
    (0.0, 1.0, 0.0, 1.0, 0.0),
    (0.0, -1.0, math.inf, -math.inf, -math.inf),  # dy = inf * log(0) = -inf
    (2.0, 3.0, 8.0, 12.0, 8 * math.log(2)),       # 5.545177444479562
    (4.0, 0.5, 2.0, 0.25, 2 * math.log(4)),       # 2.772588722239781
])
def test_pow_with_a_tensor_exponent_at_the_edges(x: float, y: float, value: float, dx: float, dy: float) -> None:
    graph = gp.Graph()
    px, py = graph.param("x", (), dtype="float64"), graph.param("y", (), dtype="float64")
    graph.set_loss(px ** py)
    with np.errstate(divide="ignore"):
        loss, grads = gp.local_gradients(graph, {"x": np.array(x), "y": np.array(y)}, {})
    assert loss == value
    assert grads["x"] == pytest.approx(dx, rel=1e-15) and grads["y"] == pytest.approx(dy, rel=1e-15)


def test_constant_base_to_a_power() -> None:
    """2 ** x = exp(x ln 2): value 2^x, derivative 2^x ln 2 (torch.pow(2, x))."""
    x = np.array([-3.0, 0.0, 0.5, 10.0])
    np.testing.assert_allclose(forward(lambda v: 2 ** v, x[:, None])[:, 0], 2.0 ** x, rtol=1e-15)
    np.testing.assert_allclose(grad(lambda v: 2 ** v, x), 2.0 ** x * math.log(2), rtol=1e-15)
    np.testing.assert_allclose(grad(lambda v: np.array([0.5, 3.0, 1.0, 7.0]) ** v, x),
                               np.array([0.5, 3.0, 1.0, 7.0]) ** x * np.log([0.5, 3.0, 1.0, 7.0]), rtol=1e-15)
    graph = gp.Graph()
    v = graph.param("v", (3,), dtype="float64")
    for base in (-2, 0, 0.0, float("inf"), float("nan"), np.array([1.0, -1.0, 2.0])):
        with pytest.raises(gp.GraphError, match="finite positive constant base") as info:
            base ** v
        assert "test_ops_math.py:" in str(info.value)
    with pytest.raises(gp.GraphError, match="exponent"):
        v ** "2"
    assert gp.power(v, v)._node.op == "pow_tensor" and gp.power(v, 3)._node.op == "pow"


# ---------------------------------------------------------------- comparisons and where

def test_comparison_operators_build_bool_nodes_like_numpy() -> None:
    graph = gp.Graph()
    x = graph.input("x", (4,), dtype="float64")
    y = graph.input("y", (4,), dtype="float64")
    labels = graph.input("labels", (4,), dtype="int64")
    built = {"lt": x < y, "le": x <= 0.5, "gt": 0.5 > x, "ge": np.float64(0.5) >= x, "eq": x == y,
             "ne": x != np.array([0.0, 1.0, 0.0, 1.0]), "label_is_3": labels == 3, "label_not_3": 3 != labels,
             "fn_lt": gp.less(x, y), "fn_ge": gp.greater_equal(x, y)}
    for name, expr in built.items():
        assert expr.dtype == np.bool_, name
        expr.named(name)
    graph.set_loss(x.sum())
    rng = np.random.default_rng(0)
    X = rng.integers(0, 3, size=(6, 4)) / 2.0
    Y = rng.integers(0, 3, size=(6, 4)) / 2.0
    L = rng.integers(0, 5, size=(6, 4))
    out = gp.local_forward(graph, {}, {"x": X, "y": Y, "labels": L}, list(built))
    expected = {"lt": X < Y, "le": X <= 0.5, "gt": 0.5 > X, "ge": 0.5 >= X, "eq": X == Y,
                "ne": X != np.array([0.0, 1.0, 0.0, 1.0]), "label_is_3": L == 3, "label_not_3": L != 3,
                "fn_lt": X < Y, "fn_ge": X >= Y}
    for name in built:
        assert out[name].dtype == np.bool_ and np.array_equal(out[name], expected[name]), name
    with pytest.raises(gp.GraphError, match="not exactly representable in int64"):
        labels == 2.5
    with pytest.raises(gp.GraphError, match="one dtype"):
        x < labels


def test_expr_equality_no_longer_compares_objects_but_hashing_is_by_identity() -> None:
    graph = gp.Graph()
    x = graph.input("x", (2,))
    same = graph["x"]
    assert isinstance(x == same, gp.Expr)  # a node, not True
    assert (x == None) is False and (x != "x") is True  # noqa: E711 - the ordinary fallback for non-operands
    assert len({x, same, x}) == 2 and {x: 1}[x] == 1  # keys by identity
    with pytest.raises(gp.GraphError, match="no truth value"):
        bool(x == same)


def test_where_routes_the_gradient_to_the_branch_taken() -> None:
    graph = gp.Graph()
    a = graph.param("a", (2, 3), dtype="float64")
    b = graph.param("b", (3,), dtype="float64")
    cond = graph.const(np.array([[True, False, True], [False, False, True]]))
    graph.set_loss((gp.where(cond, a, b) * graph.const(np.arange(1.0, 7.0).reshape(2, 3))).sum())
    _, grads = gp.local_gradients(graph, {"a": np.ones((2, 3)), "b": np.ones(3)}, {})
    np.testing.assert_array_equal(grads["a"], [[1, 0, 3], [0, 0, 6]])
    np.testing.assert_array_equal(grads["b"], [4, 2 + 5, 0])  # broadcast over the rows not taken by a


def test_the_double_where_recipe_keeps_gradients_finite() -> None:
    """As in torch and JAX, a NaN or inf computed in the branch not taken still
    poisons the gradient (0 * inf in that branch's own rule); the recipe is to
    make the branch safe first: log(where(x > 0, x, 1)). Its gradient is then
    1/x where x > 0 and exactly 0 elsewhere."""
    graph = gp.Graph()
    x = graph.param("x", (3,), dtype="float64")
    safe = gp.where(x > 0, x, 1.0)
    graph.set_loss(gp.where(x > 0, gp.log(safe), 0.0).sum())
    _, grads = gp.local_gradients(graph, {"x": np.array([2.0, 0.0, -1.0])}, {})
    assert list(grads["x"]) == [0.5, 0.0, 0.0]


def test_where_needs_a_bool_condition() -> None:
    graph = gp.Graph()
    x = graph.input("x", (2,))
    with pytest.raises(gp.GraphError, match="bool expression as condition"):
        gp.where(x, x, 0.0)
    assert gp.where(x > 0, 1.0, x).dtype == np.float32


# ---------------------------------------------------------------- gather, one_hot, casts, stop_gradient

def test_take_along_axis_accumulates_repeated_picks() -> None:
    graph = gp.Graph()
    x = graph.param("x", (2, 4), dtype="float64")
    idx = graph.const(np.array([[3, 3, 0], [1, 1, 1]]))
    graph.set_loss((gp.take_along_axis(x, idx, axis=1) * graph.const(np.array([1.0, 2.0, 4.0]))).sum())
    values = np.arange(8.0).reshape(2, 4)
    loss, grads = gp.local_gradients(graph, {"x": values}, {})
    assert loss == (3 + 2 * 3 + 4 * 0) + (5 + 2 * 5 + 4 * 5)
    np.testing.assert_array_equal(grads["x"], [[4, 0, 0, 3], [0, 7, 0, 0]])


def test_take_along_axis_from_a_param_table_per_example_and_its_refusals() -> None:
    graph = gp.Graph()
    table = graph.param("table", (5, 2), dtype="float64")
    rows = graph.input("rows", (2,), dtype="int64")
    picked = gp.take_along_axis(table, rows, axis=0)  # example i: table[rows[i, j], j]
    assert picked.shape == (None, 2)
    graph.set_loss(picked.sum())
    T = np.arange(10.0).reshape(5, 2)
    R = np.array([[0, 4], [4, 4], [2, 0]])
    loss, grads = gp.local_gradients(graph, {"table": T}, {"rows": R})
    assert loss == T[R, [0, 1]].sum()
    expected = np.zeros((5, 2))
    np.add.at(expected, (R, np.array([0, 1])), 1.0)
    np.testing.assert_array_equal(grads["table"], expected)
    for bad in (R + 1, R - 1):
        with pytest.raises(gp.InputError, match="index -?[0-9]+ is out of range \\[0, 5\\)"):
            gp.local_gradients(graph, {"table": T}, {"rows": bad})
    x = graph.input("x", (3,))
    with pytest.raises(gp.GraphError, match="batch axis"):
        gp.take_along_axis(x, rows, axis=0)
    with pytest.raises(gp.GraphError, match="same rank"):
        gp.take_along_axis(table, graph.input("flat", (), dtype="int64"), axis=1)


def test_one_hot_rows_and_out_of_range_labels() -> None:
    graph = gp.Graph()
    labels = graph.input("y", (), dtype="int64")
    logits = graph.input("logits", (3,), dtype="float64")
    hot = gp.one_hot(labels, 3, dtype="float64").named("hot")
    assert gp.one_hot(labels, 3).dtype == np.float32
    graph.set_loss(-(gp.log_softmax(logits) * hot).sum())
    L = np.array([2, 0, 1])
    Z = np.random.default_rng(1).normal(size=(3, 3))
    np.testing.assert_array_equal(gp.local_forward(graph, {}, {"y": L, "logits": Z}, ["hot"])["hot"], np.eye(3)[L])
    # the same loss as softmax_cross_entropy
    reference = gp.Graph()
    reference.set_loss(gp.softmax_cross_entropy(reference.input("logits", (3,), dtype="float64"),
                                                reference.input("y", (), dtype="int64")).sum())
    assert gp.local_gradients(graph, {}, {"y": L, "logits": Z})[0] == pytest.approx(
        gp.local_gradients(reference, {}, {"y": L, "logits": Z})[0], rel=1e-14)
    with pytest.raises(gp.InputError, match="label 3 is out of range \\[0, 3\\)"):
        gp.local_gradients(graph, {}, {"y": np.array([0, 3, 1]), "logits": Z})
    with pytest.raises(gp.GraphError, match="integer labels"):
        gp.one_hot(logits, 3)


def test_float_casts_pass_the_gradient_back_in_the_input_dtype() -> None:
    graph = gp.Graph()
    w = graph.param("w", (3,), dtype="float32")
    wide = w.astype("float64")
    assert wide.dtype == np.float64
    graph.set_loss((wide * wide).sum())
    w0 = np.array([0.1, -2.0, 3.0], dtype=np.float32)
    loss, grads = gp.local_gradients(graph, {"w": w0}, {})
    assert grads["w"].dtype == np.float32
    assert loss == float((w0.astype(np.float64) ** 2).sum())
    np.testing.assert_array_equal(grads["w"], (2 * w0.astype(np.float64)).astype(np.float32))
    narrow = gp.Graph()
    v = narrow.param("v", (2,), dtype="float64")
    narrow.set_loss(gp.cast(v * 3.0, np.float32).sum().astype("float64"))
    assert narrow.loss.dtype == np.float64
    assert list(gp.local_gradients(narrow, {"v": np.array([1.0, 2.0])}, {})[1]["v"]) == [3.0, 3.0]
    with pytest.raises(gp.GraphError, match="unknown dtype 'float16'"):
        v.astype("float16")


def test_casts_to_and_from_integers_carry_no_gradient_and_raise_nothing() -> None:
    """round-trip through int64: the values are truncated, the gradient path ends."""
    graph = gp.Graph()
    w = graph.param("w", (3,), dtype="float64")
    truncated = w.astype("int64").astype("float64")
    graph.set_loss((truncated * w).sum() + (w > 0).astype("float64").sum())
    loss, grads = gp.local_gradients(graph, {"w": np.array([1.5, -2.5, 3.0])}, {})
    assert loss == 1 * 1.5 + (-2) * (-2.5) + 3 * 3.0 + 2
    np.testing.assert_array_equal(grads["w"], [1.0, -2.0, 3.0])  # only the float factor's gradient


def test_stop_gradient_cuts_the_path_cleanly() -> None:
    graph = gp.Graph()
    w = graph.param("w", (2,), dtype="float64")
    graph.set_loss((gp.stop_gradient(w) * w).sum())
    _, grads = gp.local_gradients(graph, {"w": np.array([2.0, -3.0])}, {})
    assert list(grads["w"]) == [2.0, -3.0]  # w, not 2w
    only = gp.Graph()
    v = only.param("v", (2,), dtype="float64")
    only.set_loss(gp.stop_gradient(gp.exp(v)).sum())  # the loss depends on v only through stop_gradient
    loss, grads = gp.local_gradients(only, {"v": np.zeros(2)}, {})
    assert loss == 2.0 and list(grads["v"]) == [0.0, 0.0]


# ---------------------------------------------------------------- sharding invariance, on a real cluster

def issue13_model(dtype: str = "float64") -> gp.Graph:
    """Every new op on the loss path of a per-example model with a mean loss."""
    g = gp.Graph("issue13_ops")
    x = g.input("x", (4,), dtype=dtype)
    y = g.input("y", (), dtype="int64")
    pick = g.input("pick", (3,), dtype="int64")
    W = g.param("W", (4, 5), dtype=dtype)
    b = g.param("b", (5,), dtype=dtype)
    T = g.param("T", (5, 3), dtype=dtype)
    s = g.param("s", (), dtype=dtype)
    h = x @ W + b
    act = gp.where(h > 0, gp.gelu(h), gp.elu(h, 0.5)) + gp.silu(h) * gp.sin(h) + gp.erf(h) * gp.cos(h)
    act = act + gp.clip(h, -0.5, 0.7) + gp.log1p(gp.expm1(gp.clip(h, hi=2.0)) + 1.0) + gp.gelu(h, approximate="tanh")
    act = act + 2 ** (h * s) + abs(h) ** 1.5 + (1 + gp.sigmoid(h)) ** (s + 1) + gp.stop_gradient(h) * h
    onehot = gp.one_hot(y, 5, dtype=dtype)
    xent = -(gp.log_softmax(act) * onehot).sum(axis=-1)
    gathered = gp.take_along_axis(act, pick, axis=1)
    from_table = gp.take_along_axis(T, pick, axis=0)
    kept = act.astype("float32").astype(dtype) * (h <= 0.3).astype(dtype)
    g.set_loss(xent.mean() + (gathered * from_table).sum() / 10 + 0.01 * (W ** 2).sum() + kept.mean())
    return g


def issue13_data(graph: gp.Graph, examples: int, seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    params = {name: rng.normal(scale=0.5, size=shape).astype(dtype) for name, (shape, dtype) in graph.params.items()}
    batch = {"x": rng.normal(size=(examples, 4)), "y": rng.integers(0, 5, size=examples),
             "pick": rng.integers(0, 5, size=(examples, 3))}
    return params, batch


def test_new_ops_shard_exactly_on_a_real_cluster() -> None:
    graph = issue13_model()
    params, batch = issue13_data(graph, 37, seed=13)
    _, whole = gp.local_gradients(graph, params, batch)
    assert all(np.all(np.isfinite(v)) and np.any(v) for v in whole.values())
    assert_shards_sum_to_whole(graph, params, batch)
    with gp.LocalCluster(workers=1) as cluster, cluster.client(timeout=60) as service:
        for workers in range(1, 5):
            cluster.scale_to(workers)
            result = service.gradients(graph, params, batch)
            assert len(result.shards) == workers
            assert_service_is_local_shards(result, graph, params, batch, f"{workers} workers")
