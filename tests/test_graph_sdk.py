"""The graph-building SDK: operators, serialization, rendering, initialisation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gradpool as gp
from gradpool.protos import gradpool_pb2 as pb
from gradpool.worker.engine import from_tensor, to_tensor

from models import batch_for, params_for, softmax_mlp, two_layer_net

ROOT = Path(__file__).resolve().parent.parent


def test_generated_protobuf_code_is_fresh() -> None:
    """The committed *_pb2*.py files are exactly what scripts/gen_protos.py makes."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.arange(6, dtype=np.float64)[::2],             # not contiguous
    np.array(3.5),                                    # 0-d
    np.zeros((0, 5), dtype=np.int32),                 # empty
    np.array([[1, -2]], dtype=np.int64),
    np.array([True, False]),
    np.arange(4, dtype=">f8"),                        # big-endian in memory
])
def test_tensor_round_trip(array: np.ndarray) -> None:
    back = from_tensor(pb.Tensor.FromString(to_tensor(array).SerializeToString()))
    assert back.shape == array.shape and back.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(back, array)


def test_proto_round_trip_keeps_the_graph_and_its_id(tmp_path: Path) -> None:
    graph = softmax_mlp()
    again = gp.Graph.from_proto(graph.to_proto())
    assert again.graph_id == graph.graph_id
    path = tmp_path / "model.gpg"
    graph.save(path)
    loaded = gp.Graph.load(path)
    assert loaded.graph_id == graph.graph_id
    params, batch = params_for(graph), batch_for(graph, 5)
    assert gp.local_gradients(loaded, params, batch)[0] == gp.local_gradients(graph, params, batch)[0]


def test_load_refuses_garbage(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"\xff\xfe not a graph")
    with pytest.raises(gp.GraphError):
        gp.Graph.load(path)


def test_graph_id_changes_with_the_graph() -> None:
    assert softmax_mlp(h=16).graph_id != softmax_mlp(h=17).graph_id
    assert softmax_mlp().graph_id == softmax_mlp().graph_id


def test_to_dot_shows_every_node_and_edge() -> None:
    graph = two_layer_net()
    dot = graph.to_dot()
    assert dot.startswith('digraph "two_layer_net"')
    assert dot.count("->") == sum(len(n.inputs) for n in graph.to_proto().nodes)
    assert 'label="W1\\nparam (4, 3)"' in dot
    assert "fillcolor=orange" in dot and "fillcolor=lightblue" in dot and "fillcolor=lightgrey" in dot


def test_init_params_is_reproducible_and_typed() -> None:
    graph = softmax_mlp(dtype="float32")
    first, second, other = graph.init_params(1), graph.init_params(1), graph.init_params(2)
    assert set(first) == {"W1", "b1", "W2", "b2"}
    for name, value in first.items():
        assert value.dtype == np.float32 and value.shape == graph.params[name][0]
        np.testing.assert_array_equal(value, second[name])
    assert not np.array_equal(first["W1"], other["W1"])
    limit = np.sqrt(6 / (8 + 16))
    assert np.abs(first["W1"]).max() <= limit


def test_python_numbers_take_the_other_operands_dtype() -> None:
    g = gp.Graph()
    x = g.input("x", (3,))
    y = 2 * x + 1.5 - x / 3 + (1 - x) ** 3
    assert y.dtype == np.float32
    g.set_loss(y.mean())
    loss, grads = gp.local_gradients(g, {}, {"x": np.ones((2, 3), np.float32)})
    assert isinstance(loss, float) and grads == {}


def test_expression_helpers_match_numpy() -> None:
    g = gp.Graph()
    x = g.input("x", (2, 6), dtype="float64")
    t = x.T                                  # (batch, 6, 2)
    r = x.reshape(3, -1)                     # (batch, 3, 4)
    s = x[:, 1:5:2]                          # (batch, 1, 6): axis 0 is the batch
    e = x[..., -2:]
    m = gp.maximum(x, 0.5) - gp.minimum(0.5, x)
    assert t.shape == (None, 6, 2) and r.shape == (None, 3, 4) and s.shape == (None, 1, 6) and e.shape == (None, 2, 2)
    outputs = [t.named("t"), r.named("r"), s.named("s"), e.named("e"), m.named("m"), gp.abs(x).named("a")]
    g.set_loss(sum(o.sum() for o in outputs[1:]) + t.sum())
    data = np.random.default_rng(0).normal(size=(4, 2, 6))
    got = gp.local_forward(g, {}, {"x": data}, ["t", "r", "s", "e", "m", "a"])
    np.testing.assert_array_equal(got["t"], np.swapaxes(data, -1, -2))
    np.testing.assert_array_equal(got["r"], data.reshape(4, 3, 4))
    np.testing.assert_array_equal(got["s"], data[:, 1:5:2])
    np.testing.assert_array_equal(got["e"], data[..., -2:])
    np.testing.assert_array_equal(got["m"], np.maximum(data, 0.5) - np.minimum(0.5, data))
    np.testing.assert_array_equal(got["a"], np.abs(data))


def test_evaluate_needs_only_the_inputs_its_outputs_use() -> None:
    graph = softmax_mlp()
    params, batch = params_for(graph), batch_for(graph, 7)
    logits = gp.local_forward(graph, params, {"x": batch["x"]}, ["logits"])["logits"]
    W1, b1, W2, b2 = (params[k] for k in ("W1", "b1", "W2", "b2"))
    np.testing.assert_allclose(logits, np.tanh(batch["x"] @ W1 + b1) @ W2 + b2, rtol=1e-12)
    with pytest.raises(gp.InputError, match="only per-example nodes"):
        gp.local_forward(graph, params, batch, [graph.to_proto().nodes[2].name])
    with pytest.raises(gp.InputError, match="no node named 'nope'"):
        gp.local_forward(graph, params, batch, ["nope"])


def test_set_loss_failure_leaves_the_graph_usable() -> None:
    g = gp.Graph()
    x = g.input("x", (3,), dtype="float64")
    g.set_loss(x.sum())
    with pytest.raises(gp.ShardingError):
        g.set_loss(gp.log(x.sum()))
    assert g.loss is not None and g.loss.name.startswith("sum")
    assert gp.local_gradients(g, {}, {"x": np.ones((2, 3))})[0] == 6.0


# ---------------------------------------------------------------- numpy's answers to the SDK's old surprises

def _numeric_gradient(graph: gp.Graph, params: dict, batch: dict, name: str, eps: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(params[name])
    for idx in np.ndindex(params[name].shape):
        moved = {k: v.copy() for k, v in params.items()}
        moved[name][idx] += eps
        up = gp.local_gradients(graph, moved, batch)[0]
        moved[name][idx] -= 2 * eps
        grad[idx] = (up - gp.local_gradients(graph, moved, batch)[0]) / (2 * eps)
    return grad


def test_matmul_promotes_1d_operands_as_numpy_does() -> None:
    rng = np.random.default_rng(0)
    g = gp.Graph(dtype="float64")
    x, X = g.input("x", (4,)), g.input("X", (3, 4))
    w, v, W = g.param("w", (4,)), g.param("v", (3,)), g.param("W", (4, 5))
    outs = {"xw": x @ w, "vX": v @ X, "Xw": X @ w, "arr_w": np.ones((2, 4)) @ w, "wW": w @ W, "ww": gp.matmul(w, w)}
    assert {k: e.shape for k, e in outs.items()} == {"xw": (None,), "vX": (None, 4), "Xw": (None, 3),
                                                     "arr_w": (2,), "wW": (5,), "ww": ()}
    for name in ("xw", "vX", "Xw"):
        outs[name].named(name)
    c = {k: g.const(rng.normal(size=[d for d in e.shape if d is not None])) for k, e in outs.items()}
    g.set_loss(sum((e * c[k]).sum() for k, e in outs.items()))
    params = {"w": rng.normal(size=4), "v": rng.normal(size=3), "W": rng.normal(size=(4, 5))}
    batch = {"x": rng.normal(size=(6, 4)), "X": rng.normal(size=(6, 3, 4))}
    got = gp.local_forward(g, params, batch, ["xw", "vX", "Xw"])
    np.testing.assert_allclose(got["xw"], batch["x"] @ params["w"], rtol=1e-12)
    np.testing.assert_allclose(got["vX"], params["v"] @ batch["X"], rtol=1e-12)
    np.testing.assert_allclose(got["Xw"], batch["X"] @ params["w"], rtol=1e-12)
    _, grads = gp.local_gradients(g, params, batch)
    for name in params:
        np.testing.assert_allclose(grads[name], _numeric_gradient(g, params, batch, name), rtol=1e-6, atol=1e-8)


def test_matmul_never_contracts_the_batch_axis() -> None:
    g = gp.Graph()
    s, w = g.input("s", ()), g.param("w", (4,))
    with pytest.raises(gp.GraphError, match=r"test_graph_sdk.py:\d+: s has only the batch axis"):
        s @ w  # noqa: B018
    with pytest.raises(gp.GraphError, match=r"test_graph_sdk.py:\d+: .*contract over the batch axis"):
        w @ g.input("x", (4,))  # noqa: B018 - (4,) @ (batch, 4): 4 against the batch axis


def test_max_reduces_all_axes_like_sum_and_mean() -> None:
    g = gp.Graph(dtype="float64")
    P, x = g.param("P", (3, 4)), g.input("x", (3, 4))
    assert P.max().shape == P.sum().shape == P.mean().shape == ()
    assert gp.max(P, axis=0).shape == (4,) and P.max(axis=(0, 1), keepdims=True).shape == (1, 1)
    assert x.max(axis=-1).shape == (None, 3) and x.max(axis=(1, 2)).shape == (None,)
    with pytest.raises(gp.GraphError, match=r"max\(x .*test_graph_sdk.py:\d+.*batch axis.*axis=\(1, 2\)"):
        x.max()
    with pytest.raises(gp.GraphError, match=r"batch axis.*axis=1"):
        g.input("v", (5,)).max(keepdims=True)
    (x.max(axis=(1, 2)) + x.max(axis=-1).sum(axis=-1)).named("m")
    g.set_loss((P.max() * P.sum()) + x.sum())
    data = np.random.default_rng(1).normal(size=(5, 3, 4))
    got = gp.local_forward(g, {"P": np.ones((3, 4))}, {"x": data}, ["m"])["m"]
    np.testing.assert_allclose(got, data.max(axis=(1, 2)) + data.max(axis=-1).sum(axis=-1), rtol=1e-12)


def test_old_graphs_keep_their_meaning() -> None:
    """Graphs stored before: max with its one `axis` attribute, sum with no
    `axes` (all axes); both still load and compute what they did."""
    g = gp.Graph(dtype="float64")
    x = g.input("x", (3, 4))
    g.set_loss(x.max(axis=-1).sum(axis=(0, 1)) + x.sum())
    data = {"x": np.random.default_rng(2).normal(size=(5, 3, 4))}
    want = data["x"].max(axis=-1).sum() + data["x"].sum()
    proto = g.to_proto()
    max_node = next(n for n in proto.nodes if n.op == "max")
    del max_node.attrs["axes"]
    max_node.attrs["axis"].i = -1
    del proto.nodes[len(proto.nodes) - 2].attrs["axes"]  # the last sum: x.sum()
    assert proto.nodes[len(proto.nodes) - 2].op == "sum"
    old = gp.Graph.from_proto(proto)
    np.testing.assert_allclose(gp.local_gradients(old, {}, data)[0], want, rtol=1e-12)
    max_node.attrs["axes"].ints.values.append(2)
    with pytest.raises(gp.GraphError, match="not both"):
        gp.Graph.from_proto(proto)


def test_empty_axis_tuple_reduces_nothing_as_in_numpy() -> None:
    g = gp.Graph(dtype="float64")
    x = g.input("x", (3,))
    same = [x.sum(axis=()).named("s"), x.mean(axis=(), keepdims=True).named("m"), x.max(axis=()).named("mx")]
    assert all(e.shape == (None, 3) for e in same)
    g.set_loss(x.sum())
    data = np.random.default_rng(3).normal(size=(4, 3))
    got = gp.local_forward(g, {}, {"x": data}, ["s", "m", "mx"])
    for name in got:
        np.testing.assert_array_equal(got[name], data)


def test_a_graph_has_a_default_dtype() -> None:
    g = gp.Graph(dtype="float64")
    x, y = g.input("x", (3,)), g.input("y", (), dtype="int64")
    W, c, cl = g.param("W", (3, 2)), g.const(0.5), g.const([1.0, 2.0])
    assert {e.dtype for e in (x, W, c, cl, x * 2, 1.5 - x, gp.maximum(x, 0))} == {np.dtype(np.float64)}
    assert y.dtype == np.int64 and g.const([1, 2]).dtype == np.int64
    assert g.param("F", (2,), dtype="float32").dtype == np.float32
    g.set_loss(gp.softmax_cross_entropy(x @ W * c, y).mean())
    _, grads = gp.local_gradients(g, g.init_params(0), {"x": np.ones((2, 3)), "y": np.array([0, 1])})
    assert grads["W"].dtype == np.float64
    plain = gp.Graph()
    assert plain.input("x", (2,)).dtype == plain.param("W", ()).dtype == plain.const(0.5).dtype == np.float32
    with pytest.raises(gp.GraphError, match="float32 or float64"):
        gp.Graph(dtype="int64")


def test_integer_indexing_and_new_axes_match_numpy() -> None:
    g = gp.Graph(dtype="float64")
    x = g.input("x", (3, 4))
    P = g.param("P", (3, 4))
    picks = np.array([[0, 3], [3, 3]])
    cases = {"a": (x[:, 0], lambda d: d[:, 0]), "b": (x[:, -1, 1:3], lambda d: d[:, -1, 1:3]),
             "c": (x[:, None], lambda d: d[:, None]), "d": (x[..., None, 2], lambda d: d[..., None, 2]),
             "e": (x[:, [2, 0, 2]], lambda d: d[:, [2, 0, 2]]), "f": (x[:, :, picks], lambda d: d[:, :, picks]),
             "g": (x[:, 0, [1, 2]], lambda d: d[:, 0, [1, 2]]), "h": (x[:, np.int64(-2), ::2], lambda d: d[:, -2, ::2]),
             "i": (x.take([3, 1], axis=-1), lambda d: d.take([3, 1], axis=-1)),
             "j": (gp.take(x, 1, axis=1), lambda d: np.take(d, 1, axis=1))}
    for name, (expr, reference) in cases.items():
        expr.named(name)
    assert P[1].shape == (4,) and P[1, 2].shape == () and P[[0, 2, 0]].shape == (3, 4) and P.take([5, 0]).shape == (2,)
    g.set_loss(x.sum())
    data = np.random.default_rng(4).normal(size=(5, 3, 4))
    got = gp.local_forward(g, {}, {"x": data}, list(cases))
    for name, (expr, reference) in cases.items():
        want = reference(data)
        assert expr.shape == (None,) + want.shape[1:], name
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_take_gradient_accumulates_repeated_indices() -> None:
    g = gp.Graph(dtype="float64")
    P, x = g.param("P", (3, 4)), g.input("x", (4, 4))
    weights = np.arange(1.0, 17.0).reshape(4, 4)
    g.set_loss((P[[0, 2, 0, 0]] * weights).sum() + (x[:, :, [1, 1]] * P[1, :2]).sum())
    params, batch = {"P": np.random.default_rng(5).normal(size=(3, 4))}, {"x": np.ones((2, 4, 4))}
    _, grads = gp.local_gradients(g, params, batch)
    want = np.zeros((3, 4))
    want[0] = weights[0] + weights[2] + weights[3]
    want[2] = weights[1]
    want[1, :2] = 2 * 4  # two examples of four rows of ones: column 1 picked for each of the two
    np.testing.assert_allclose(grads["P"], want, rtol=1e-12)
    np.testing.assert_allclose(grads["P"], _numeric_gradient(g, params, batch, "P"), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("index,message", [
    ((0,), "batch axis"), ((slice(1, None),), "batch axis"), (([0, 1],), "batch axis"), ((None,), "batch axis"),
    ((slice(None), 3), "out of range"), ((slice(None), [0, 4]), "out of range"),
    ((slice(None), True), "cannot index with True"), ((slice(None), [0], [1]), "only one integer list"),
    ((slice(None), [0], slice(None), 0), "index in two steps"), ((slice(None), 0, 0, 0, 0), "too many indices"),
])
def test_indexing_refusals_name_the_users_line(index: tuple, message: str) -> None:
    g = gp.Graph()
    x = g.input("x", (3, 4, 2))
    with pytest.raises(gp.GraphError, match=message) as info:
        x[index]  # noqa: B018
    assert "test_graph_sdk.py:" in str(info.value), str(info.value)


def test_star_import_leaves_builtins_alone() -> None:
    import builtins
    namespace: dict = {}
    exec("from gradpool import *", namespace)  # noqa: S102 - the very thing under test
    for name in ("sum", "max", "min", "abs", "slice", "pow", "round"):
        assert name not in gp.__all__ and namespace.get(name, getattr(builtins, name)) is getattr(builtins, name)
    assert namespace["relu"] is gp.relu and namespace["Graph"] is gp.Graph
    assert gp.sum is gp.functional.sum and gp.max is gp.functional.max and gp.abs is gp.functional.abs


def _axis_functions() -> list[tuple[str, object]]:
    """Every SDK function and Expr method that takes `axis`."""
    import inspect
    found = []
    for name in sorted(gp.__all__ + ["sum", "max", "min", "abs", "slice", "pow", "round"]):
        value = getattr(gp, name, None)
        if inspect.isfunction(value) and "axis" in inspect.signature(value).parameters:
            found.append((f"gp.{name}", value))
    for name, value in sorted(vars(gp.Expr).items()):
        if inspect.isfunction(value) and not name.startswith("_") and "axis" in inspect.signature(value).parameters:
            found.append((f"Expr.{name}", value))
    return found


# Extra arguments some of them need (the rest are called as f(x, axis=k)).
AXIS_CALL_ARGS = {"slice": {"start": 1}, "take": {"indices": [2, 0, 2]}}
# Functions that need more than extra keywords: how to call them, and numpy's answer.
AXIS_ADAPTERS = {
    "split": (lambda f, x, axis: f(x, [1], axis=axis)[1], lambda data, axis: np.split(data, [1], axis=axis)[1]),
    "squeeze": (lambda f, x, axis: f(gp.expand_dims(x, axis), axis=axis), lambda data, axis: data),
    "take_along_axis": (lambda f, x, axis: f(x, x.graph.const(np.zeros((1, 1, 1, 1), np.int64)), axis=axis),
                        lambda data, axis: np.take_along_axis(data, np.zeros((1, 1, 1, 1), np.int64), axis=axis)),
}
AXIS_FUNCTIONS = _axis_functions()


@pytest.mark.parametrize("label,function", AXIS_FUNCTIONS, ids=[label for label, _ in AXIS_FUNCTIONS])
def test_negative_and_positive_axes_agree(label: str, function) -> None:
    """The axis convention: axes index the full array, the batch axis of a
    per-example value being axis 0, negative ones counting from the end. For
    every axis-taking function, axis=k and axis=k-rank give the same values (and,
    where numpy has the function, numpy's on the whole batch)."""
    import inspect
    data = np.random.default_rng(6).normal(size=(2, 3, 4, 5))
    short = label.split(".")[1]
    extra = AXIS_CALL_ARGS.get(short, {})
    first = next(iter(inspect.signature(function).parameters))

    adapter, adapted_reference = AXIS_ADAPTERS.get(short, (None, None))

    def call(x: gp.Expr, axis: int) -> gp.Expr:
        if adapter is not None:
            return adapter(function, x, axis)
        return function([x, x] if first == "xs" else x, axis=axis, **extra)

    for positive in range(1, data.ndim):
        g = gp.Graph(dtype="float64")
        x = g.input("x", data.shape[1:])
        a = call(x, positive).named("a")
        negative = positive - (a.ndim if a.ndim > x.ndim else x.ndim)
        b = call(x, negative).named("b")
        assert a.shape == b.shape, (positive, negative)
        g.set_loss(x.sum())
        got = gp.local_forward(g, {}, {"x": data}, ["a", "b"])
        np.testing.assert_array_equal(got["a"], got["b"], err_msg=f"axis {positive} vs {negative}")
        if adapted_reference is not None:
            np.testing.assert_allclose(got["a"], adapted_reference(data, positive), rtol=1e-12)
            continue
        reference = getattr(np, short, None)
        if callable(reference) and short not in ("abs", "round", "pow"):
            argument = [data, data] if first == "xs" else data
            np.testing.assert_allclose(got["a"], reference(argument, axis=positive, **extra), rtol=1e-12)


def test_the_sdk_and_the_servers_agree_on_int_list_attributes() -> None:
    """Indexing with a list becomes `take` with the indices as an attribute: a
    long one passes the servers' wire check as it passes the SDK, and one past
    the limit is refused by the SDK too, not only once it reaches a server."""
    from gradpool.protos import gradpool_pb2 as pb
    from gradpool.worker import wire
    from gradpool.worker.engine.limits import LIMITS

    g = gp.Graph(dtype="float64")
    x = g.input("x", (300,))
    picked = x[:, list(range(0, 300, 2))]  # 150 indices
    g.set_loss(picked.sum())
    wire.check_sizes(g.to_proto().SerializeToString(), pb.Graph.DESCRIPTOR)
    loss, _ = gp.local_gradients(g, {}, {"x": np.ones((2, 300))})
    assert loss == 300.0
    proto = g.to_proto()
    node = next(n for n in proto.nodes if n.op == "take")
    node.attrs["indices"].ints.values.extend([0] * LIMITS.max_attr_ints)
    with pytest.raises(gp.GraphError, match=f"at most {LIMITS.max_attr_ints}"):
        gp.Graph.from_proto(proto)
    with pytest.raises(gp.InputError, match=f"{LIMITS.max_attr_ints}"):
        wire.check_sizes(proto.SerializeToString(), pb.Graph.DESCRIPTOR)
