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
