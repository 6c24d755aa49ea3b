"""Convolution, pooling and layer norm: values against direct formulas in
float64, PyTorch's semantics at the edges (ties, NaN, padding), dtypes,
refusals, and sharding invariance of a small CNN (in process and through a
real cluster). The gradients themselves are checked by central differences
in test_gradcheck.py (specs in op_specs.py)."""

from __future__ import annotations

import numpy as np
import pytest

import gradpool as gp
from gradpool.cluster import LocalCluster

from op_specs import SPECS

from models import assert_service_is_local_shards, assert_shards_sum_to_whole, op_graph

NN_OPS = ("conv2d", "conv1d", "max_pool2d", "avg_pool2d", "layer_norm")


# ---------------------------------------------------------------- direct reference formulas

def conv2d_reference(x: np.ndarray, w: np.ndarray, stride=(1, 1), padding=(0, 0), dilation=(1, 1)) -> np.ndarray:
    """out[n, o, p, q] = sum_{c, i, j} w[o, c, i, j] x_pad[n, c, p s + i d, q s + j d], term by term."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.zeros((n, c, h + 2 * padding[0], wd + 2 * padding[1]))
    xp[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + wd] = x
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, o, oh, ow))
    for p in range(oh):
        for q in range(ow):
            for i in range(kh):
                for j in range(kw):
                    pixel = xp[:, :, p * stride[0] + i * dilation[0], q * stride[1] + j * dilation[1]]  # (n, c)
                    out[:, :, p, q] += pixel @ w[:, :, i, j].T
    return out


def pool_reference(x: np.ndarray, kernel, stride, padding, kind: str) -> np.ndarray:
    h, wd = x.shape[-2:]
    fill = -np.inf if kind == "max" else 0.0
    xp = np.full(x.shape[:-2] + (h + 2 * padding[0], wd + 2 * padding[1]), fill)
    xp[..., padding[0]:padding[0] + h, padding[1]:padding[1] + wd] = x
    oh = (h + 2 * padding[0] - kernel[0]) // stride[0] + 1
    ow = (wd + 2 * padding[1] - kernel[1]) // stride[1] + 1
    out = np.zeros(x.shape[:-2] + (oh, ow))
    for p in range(oh):
        for q in range(ow):
            window = xp[..., p * stride[0]:p * stride[0] + kernel[0], q * stride[1]:q * stride[1] + kernel[1]]
            out[..., p, q] = window.max(axis=(-2, -1)) if kind == "max" else window.sum(axis=(-2, -1)) / (
                kernel[0] * kernel[1])
    return out


def forward(op: str, x: np.ndarray, *rest: np.ndarray, **attrs) -> np.ndarray:
    """The op's value through the SDK and the engine, x as a per-example input."""
    g = gp.Graph()
    xin = g.input("x", x.shape[1:], dtype=str(x.dtype))
    args = [g.const(r) for r in rest]
    out = getattr(gp, op)(xin, *args, **attrs).named("out")
    g.set_loss(out.sum())
    return gp.local_forward(g, {}, {"x": x}, outputs=["out"])["out"]


RNG = np.random.default_rng(0)


@pytest.mark.parametrize("stride, padding, dilation, kernel, channels", [
    (1, 0, 1, (3, 3), (1, 1)),
    (2, 1, 1, (3, 3), (3, 4)),
    ((2, 1), (1, 2), (2, 1), (3, 2), (2, 3)),
    (1, 0, 1, (1, 1), (3, 2)),
    (3, 2, 2, (2, 4), (2, 5)),
])
def test_conv2d_matches_the_direct_formula(stride, padding, dilation, kernel, channels) -> None:
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    x = RNG.normal(size=(3, channels[0], 9, 8))
    w = RNG.normal(size=(channels[1], channels[0], *kernel))
    got = forward("conv2d", x, w, stride=stride, padding=padding, dilation=dilation)
    want = conv2d_reference(x, w, pair(stride), pair(padding), pair(dilation))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_conv1d_is_conv2d_over_a_row() -> None:
    x = RNG.normal(size=(4, 3, 11))
    w = RNG.normal(size=(5, 3, 3))
    got = forward("conv1d", x, w, stride=2, padding=1, dilation=2)
    want = conv2d_reference(x[:, :, None, :], w[:, :, None, :], (1, 2), (0, 1), (1, 2))[:, :, 0, :]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("kernel, stride, padding", [((2, 2), None, (0, 0)), ((3, 3), (2, 2), (1, 1)),
                                                     ((3, 2), (1, 2), (1, 0)), ((2, 3), (1, 1), (0, 1))])
def test_pools_match_the_direct_formula(kind: str, kernel, stride, padding) -> None:
    x = RNG.normal(size=(2, 3, 7, 6))
    got = forward(f"{kind}_pool2d", x, kernel=kernel, stride=stride, padding=padding)
    np.testing.assert_allclose(got, pool_reference(x, kernel, stride or kernel, padding, kind), rtol=1e-13)


def test_layer_norm_matches_the_formula() -> None:
    x = RNG.normal(loc=3.0, scale=2.0, size=(4, 3, 5))
    for axes in (-1, (1, 2)):
        got = forward("layer_norm", x, axes=axes, eps=1e-3)
        ax = (axes,) if isinstance(axes, int) else axes
        mean = x.mean(axis=ax, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=ax, keepdims=True)
        np.testing.assert_allclose(got, (x - mean) / np.sqrt(var + 1e-3), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- PyTorch's semantics at the edges

def pool_gradient(kind: str, x: np.ndarray, **attrs) -> np.ndarray:
    g = gp.Graph()
    p = g.param("x", x.shape, dtype="float64")
    g.set_loss(getattr(gp, f"{kind}_pool2d")(p, **attrs).sum())
    return gp.local_gradients(g, {"x": x}, {})[1]["x"]


def test_max_pool_gives_a_tied_window_gradient_to_its_first_maximum() -> None:
    x = np.array([[[[1.0, 3.0], [3.0, 3.0]]]])
    assert pool_gradient("max", x, kernel=2).tolist() == [[[[0.0, 1.0], [0.0, 0.0]]]]
    # Overlapping windows (stride 1): each window's winner gets one, and they add up.
    x = np.zeros((1, 1, 3, 3))
    assert pool_gradient("max", x, kernel=2, stride=1)[0, 0].tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 0]]


def test_max_pool_propagates_nan_and_never_picks_padding() -> None:
    x = np.array([[[[1.0, np.nan], [5.0, 2.0]]]])
    assert np.isnan(forward("max_pool2d", x, kernel=2)).all()
    assert pool_gradient("max", x, kernel=2).tolist() == [[[[0.0, 1.0], [0.0, 0.0]]]]
    # A window of -inf padded with -inf: the real element takes the gradient, as in PyTorch.
    x = np.full((1, 1, 2, 2), -np.inf)
    grad = pool_gradient("max", x, kernel=2, padding=1)
    assert grad[0, 0].tolist() == [[1, 1], [1, 1]]


def test_avg_pool_counts_the_padding() -> None:
    x = np.ones((1, 1, 2, 2))
    out = forward("avg_pool2d", x, kernel=2, padding=1)
    assert out[0, 0].tolist() == [[0.25, 0.25], [0.25, 0.25]]  # one real element per 2x2 window: 1/4, not 1
    assert pool_gradient("avg", x, kernel=2, padding=1).tolist() == [[[[0.25, 0.25], [0.25, 0.25]]]]


def test_layer_norm_of_a_constant_example_is_zero_with_a_finite_gradient() -> None:
    g = gp.Graph()
    p = g.param("x", (2, 4), dtype="float64")
    g.set_loss((gp.layer_norm(p) * np.arange(4.0)).sum())
    x = np.array([[2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    with np.errstate(all="raise"):
        loss, grads = gp.local_gradients(g, {"x": x}, {})
    assert np.isfinite(grads["x"]).all()
    # With a constant row, y = 0 and dy/dx = rstd (I - 1/n): rstd = 1/sqrt(eps).
    np.testing.assert_allclose(grads["x"][0], (np.arange(4.0) - 1.5) / np.sqrt(1e-5), rtol=1e-9)


@pytest.mark.parametrize("op", NN_OPS)
def test_float32_stays_float32(op: str) -> None:
    for i, spec in enumerate(SPECS[op]):
        graph, params = op_graph(op, spec, seed=i, dtype="float32")
        out = graph.program().nodes[-4]  # the op's node: then weights const, mul, sum
        assert out.op == op and out.dtype == np.float32
        loss, grads = gp.local_gradients(graph, params, {})
        assert all(g.dtype == np.float32 and g.shape == params[k].shape for k, g in grads.items())
        loss64, grads64 = gp.local_gradients(graph, {k: v.astype(np.float64) for k, v in params.items()}, {})
        for k in grads:
            np.testing.assert_allclose(grads[k], grads64[k], rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("build_bad, fragment", [
    (lambda g, x: gp.conv2d(x, g.param("w", (4, 2, 3, 3))), "x has 1 channels but the weights"),
    (lambda g, x: gp.conv2d(x, g.param("w", (4, 1, 9, 3))), "does not fit"),
    (lambda g, x: gp.conv2d(x, g.param("w", (4, 1, 3, 3)), stride=0), "stride values must be >= 1"),
    (lambda g, x: gp.conv2d(x, g.param("w", (4, 1, 3, 3)), padding=(1, 2, 3)), "padding takes 1 or 2 values"),
    (lambda g, x: gp.conv2d(x, g.param("w", (4, 1, 3, 3)), stride=1.5), "stride must be an int or 2 ints"),
    (lambda g, x: gp.conv1d(x, g.param("w", (4, 1, 3))), "conv1d needs x of rank 3"),
    (lambda g, x: gp.conv2d(x, x), "not per-example"),
    (lambda g, x: gp.max_pool2d(x, 2, padding=2), "at most half the kernel"),
    (lambda g, x: gp.avg_pool2d(x, 9), "does not fit"),
    (lambda g, x: gp.max_pool2d(x.reshape(64), 2), "must not be the batch axis"),
    (lambda g, x: gp.layer_norm(x, axes=0), "would mix examples"),
])
def test_bad_conv_graphs_are_refused_at_the_users_line(build_bad, fragment: str) -> None:
    g = gp.Graph()
    x = g.input("x", (1, 8, 8))
    with pytest.raises(gp.GraphError, match=fragment) as caught:
        build_bad(g, x)
    assert "test_ops_nn.py:" in str(caught.value)


# ---------------------------------------------------------------- sharding invariance

def small_cnn(dtype: str = "float64") -> gp.Graph:
    """Every op of ops_nn.py in one per-example model, plus a regularizer on the conv weights."""
    g = gp.Graph("small_cnn")
    x = g.input("x", (1, 8, 8), dtype=dtype)
    y = g.input("y", (), dtype="int64")
    k1, b1 = g.param("k1", (4, 1, 3, 3), dtype=dtype), g.param("b1", (4, 1, 1), dtype=dtype)
    k2 = g.param("k2", (6, 4, 2, 2), dtype=dtype)
    k3 = g.param("k3", (2, 8, 3), dtype=dtype)
    W = g.param("W", (6 * 4 + 2 * 3, 3), dtype=dtype)
    h = gp.max_pool2d(gp.relu(gp.conv2d(x, k1, padding=1) + b1), 2)          # (4, 4, 4)
    h = gp.layer_norm(gp.conv2d(h, k2, stride=2, dilation=1), axes=(1, 2, 3))  # (6, 2, 2)
    h = gp.avg_pool2d(h, 2, stride=1, padding=1)                               # (6, 3, 3)
    h = gp.max_pool2d(h, (2, 3), stride=(1, 2), padding=(1, 1))                # (6, 4, 2)... cut below
    rows = gp.tanh(gp.conv1d(x.reshape(8, 8), k3, stride=2, dilation=2))     # (2, 2) per example
    flat = gp.concat([h[:, :, :2, :].reshape(24), gp.avg_pool2d(rows.reshape(1, 2, 2), 1).reshape(4),
                      rows.reshape(4)[:, :2]], axis=1)
    logits = (flat @ W).named("logits")
    g.set_loss(gp.softmax_cross_entropy(logits, y).mean() + 1e-2 * (k1 ** 2).sum())
    return g


def cnn_data(graph: gp.Graph, n: int, seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(scale=0.5, size=s).astype(d) for k, (s, d) in graph.params.items()}
    dtype = graph.inputs["x"][1]
    batch = {"x": rng.normal(size=(n, 1, 8, 8)).astype(dtype), "y": rng.integers(0, 3, size=n)}
    return params, batch


@pytest.mark.parametrize("n", [1, 5, 33])
def test_the_cnn_sums_over_shards_to_the_whole_batch(n: int) -> None:
    graph = small_cnn()
    params, batch = cnn_data(graph, n, seed=n)
    _, whole = gp.local_gradients(graph, params, batch)
    assert all(np.abs(g).max() > 0 for g in whole.values())
    assert_shards_sum_to_whole(graph, params, batch, what=f"batch {n},")


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(workers=1) as running:
        yield running


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_cnn_through_the_service_is_bitwise_the_sharded_reference(cluster, dtype: str) -> None:
    graph = small_cnn(dtype)
    params, batch = cnn_data(graph, 37, seed=1)
    with cluster.client(timeout=60) as service:
        for workers in range(1, 5):
            cluster.scale_to(workers)
            result = service.gradients(graph, params, batch)
            assert len(result.shards) == workers
            assert all(g.dtype == np.dtype(dtype) for g in result.grads.values())
            assert_service_is_local_shards(result, graph, params, batch, f"{workers} workers")


# ---------------------------------------------------------------- the two conv paths (dense matrix, im2col)

def conv_call(op: str, wants=(True, True), **attrs):
    from gradpool.worker.engine.ops import Attrs, Call
    full = {"stride": (1,), "padding": (0,), "dilation": (1,)}
    full.update({k: tuple(v) if isinstance(v, (tuple, list)) else (v,) for k, v in attrs.items()})
    return REGISTRY[op], Call(Attrs(full), per_example=True, wants=wants)


def both_paths(monkeypatch, op: str, x: np.ndarray, w: np.ndarray, g_scale=None, **attrs):
    """forward, dx and dw of the conv by the dense path and by im2col."""
    from gradpool.worker.engine import ops_nn
    rule, call = conv_call(op, **attrs)
    results = []
    for limit in (ops_nn.DENSE_MAX_ELEMENTS, 0):
        monkeypatch.setattr(ops_nn, "DENSE_MAX_ELEMENTS", limit)
        out = rule.forward(call, x, w)
        g = np.cos(np.arange(out.size, dtype=x.dtype)).reshape(out.shape) if g_scale is None else g_scale(out)
        results.append((out, *rule.vjp(call, g, out, x, w)))
    return results


from gradpool.worker.engine import REGISTRY  # noqa: E402


@pytest.mark.parametrize("op, x_shape, w_shape, attrs", [
    ("conv2d", (5, 1, 8, 8), (16, 1, 3, 3), {"padding": 1}),  # the digits CNN's layers
    ("conv2d", (5, 16, 4, 4), (32, 16, 3, 3), {"padding": 1}),
    ("conv2d", (3, 2, 6, 5), (3, 2, 2, 3), {"stride": 2, "padding": 1}),
    ("conv2d", (2, 3, 7, 6), (2, 3, 3, 2), {"stride": (2, 1), "padding": (1, 2), "dilation": (2, 1)}),
    ("conv2d", (2, 2, 1, 1), (3, 2, 3, 3), {"padding": 1}),  # taps that only read padding
    ("conv1d", (3, 3, 9), (2, 3, 2), {"stride": 2, "padding": 1, "dilation": 2}),
])
def test_conv_dense_path_agrees_with_im2col(monkeypatch, op, x_shape, w_shape, attrs) -> None:
    from gradpool.worker.engine import ops_nn
    x, w = RNG.normal(size=x_shape), RNG.normal(size=w_shape)
    rule, call = conv_call(op, **attrs)
    x2, w2 = (x, w) if op == "conv2d" else (x[:, :, None], w[:, :, None])
    geometry = ops_nn._Conv(call, 2 if op == "conv2d" else 1)
    assert ops_nn._Dense.fits(geometry, x2.shape, w2.shape)  # so the comparison below compares two paths
    dense, im2col = both_paths(monkeypatch, op, x, w, **attrs)
    for a, b in zip(dense, im2col):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    want = conv2d_reference(x2, w2, geometry.stride, geometry.padding, geometry.dilation)
    np.testing.assert_allclose(dense[0], want if op == "conv2d" else want[:, :, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")  # im2col: 0 * inf
def test_conv_with_infinite_values_stays_local_as_in_pytorch(monkeypatch) -> None:
    """An inf pixel makes only the outputs that read it non-finite (the dense
    matrix's zeros must never meet it), and an inf adjoint only the inputs
    under its window; float32 stays float32."""
    x = RNG.normal(size=(2, 2, 8, 8)).astype(np.float32)
    x[0, 1, 0, 0] = np.inf
    w = RNG.normal(size=(4, 2, 3, 3)).astype(np.float32)

    def adjoint(out: np.ndarray) -> np.ndarray:
        g = np.ones_like(out)
        g[1, 2, 7, 7] = np.inf
        return g

    dense, im2col = both_paths(monkeypatch, "conv2d", x, w, g_scale=adjoint, padding=1)
    out, dx, dw = dense
    assert out.dtype == dx.dtype == dw.dtype == np.float32
    assert np.isfinite(out[1]).all() and np.isfinite(out[0, :, 2:, :]).all()
    assert not np.isfinite(out[0, :, :2, :2]).any()
    assert np.isfinite(dx[0]).all() and np.isfinite(dx[1, :, :6, :]).all()
    assert not np.isfinite(dx[1, :, 6:, 6:]).any()
    for a, b in zip(dense, im2col):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # dw alone takes the dense path whatever x holds: it reads only the connected entries of g.T @ x.
    from gradpool.worker.engine import ops_nn
    rule, call = conv_call("conv2d", wants=(False, True), padding=1)
    g = np.ones_like(out)
    dws = []
    for limit in (ops_nn.DENSE_MAX_ELEMENTS, 0):
        monkeypatch.setattr(ops_nn, "DENSE_MAX_ELEMENTS", limit)
        dws.append(rule.vjp(call, g, out, x, w)[1])
    np.testing.assert_allclose(dws[0], dws[1], rtol=1e-5, atol=1e-5)
    assert np.isinf(dws[0]).sum() == 4 * 4  # the taps that read the inf pixel (two of three rows and columns)
