"""Every kind of bad graph or bad data gets a gradpool error that says what and
where, never a numpy traceback from inside the engine."""

from __future__ import annotations

import numpy as np
import pytest

import gradpool as gp
from gradpool.protos import gradpool_pb2 as pb
from gradpool.worker.engine import Program, to_tensor
from gradpool.worker.engine.errors import GraphError, InputError

from models import batch_for, params_for, softmax_mlp


def valid_proto() -> pb.Graph:
    proto = pb.Graph()
    proto.CopyFrom(softmax_mlp().to_proto())
    return proto


def mutate(edit) -> pb.Graph:
    proto = valid_proto()
    edit(proto)
    return proto


@pytest.mark.parametrize("edit,message", [
    (lambda p: p.nodes[6].inputs.__setitem__(0, 9), "does not name an earlier node"),
    (lambda p: p.nodes[6].inputs.__setitem__(0, -1), "does not name an earlier node"),
    (lambda p: setattr(p.nodes[6], "op", "frobnicate"), "unknown op 'frobnicate'"),
    (lambda p: setattr(p.nodes[6], "name", p.nodes[0].name), "used twice"),
    (lambda p: setattr(p.nodes[6], "name", ""), "needs a name"),
    (lambda p: p.nodes[6].shape.append(7), "declares"),
    (lambda p: setattr(p.nodes[6], "dtype", pb.DTYPE_UNSPECIFIED), "dtype"),
    (lambda p: setattr(p, "loss", 999), "loss index 999"),
    (lambda p: setattr(p, "loss", 0), "must be a float scalar"),
    (lambda p: p.nodes[0].shape.__setitem__(0, 5), "batch axis"),
    (lambda p: p.nodes[2].shape.insert(0, -1), "no batch axis"),
    (lambda p: p.nodes[6].attrs["bogus"].CopyFrom(pb.AttrValue(i=1)), "unknown attribute"),
    (lambda p: p.nodes[1].inputs.append(0), "takes no inputs"),
    (lambda p: p.ClearField("nodes"), "no nodes"),
])
def test_invalid_graph_protos_are_refused(edit, message: str) -> None:
    with pytest.raises(GraphError, match=message):
        Program(mutate(edit))


def test_missing_required_attribute_and_bad_attribute_type() -> None:
    g = gp.Graph()
    x = g.param("x", (3,), dtype="float64")
    g.set_loss(gp.power(x, 2.0).sum())
    proto = pb.Graph()
    proto.CopyFrom(g.to_proto())
    pow_node = next(n for n in proto.nodes if n.op == "pow")
    pow_node.attrs["exponent"].CopyFrom(pb.AttrValue(s="two"))
    with pytest.raises(GraphError, match="exponent"):
        Program(proto)
    del pow_node.attrs["exponent"]
    with pytest.raises(GraphError, match="missing required attribute 'exponent'"):
        Program(proto)


def test_const_with_corrupt_bytes_is_refused() -> None:
    g = gp.Graph()
    x = g.param("x", (3,))
    g.set_loss((x * np.ones(3)).sum())
    proto = pb.Graph()
    proto.CopyFrom(g.to_proto())
    const = next(n for n in proto.nodes if n.op == "const")
    const.attrs["value"].tensor.data = b"\x00" * 5
    with pytest.raises(InputError, match="needs 12 bytes, got 5"):
        Program(proto)


def test_not_a_graph() -> None:
    with pytest.raises(GraphError, match="expected a gradpool Graph"):
        Program(b"\x00\x01")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def mlp() -> tuple[gp.Graph, dict, dict]:
    graph = softmax_mlp()
    return graph, params_for(graph), batch_for(graph, 6)


def test_missing_and_extra_params(mlp) -> None:
    graph, params, batch = mlp
    with pytest.raises(InputError, match=r"missing param\(s\) \['b2'\]"):
        gp.local_gradients(graph, {k: v for k, v in params.items() if k != "b2"}, batch)
    with pytest.raises(InputError, match=r"unknown param\(s\) \['W3'\]"):
        gp.local_gradients(graph, {**params, "W3": np.zeros(2)}, batch)


def test_missing_and_extra_inputs(mlp) -> None:
    graph, params, batch = mlp
    with pytest.raises(InputError, match=r"missing input\(s\) \['y'\]"):
        gp.local_gradients(graph, params, {"x": batch["x"]})
    with pytest.raises(InputError, match=r"unknown input\(s\) \['z'\]"):
        gp.local_gradients(graph, params, {**batch, "z": batch["x"]})


def test_wrong_shapes(mlp) -> None:
    graph, params, batch = mlp
    with pytest.raises(InputError, match=r"param 'W1' has shape \(8, 15\)"):
        gp.local_gradients(graph, {**params, "W1": np.zeros((8, 15))}, batch)
    with pytest.raises(InputError, match=r"input 'x' has shape \(6, 7\), but the graph declares \(batch, 8\)"):
        gp.local_gradients(graph, params, {**batch, "x": np.zeros((6, 7))})


def test_inconsistent_batch_sizes(mlp) -> None:
    graph, params, batch = mlp
    with pytest.raises(InputError, match="disagree on the batch size"):
        gp.local_gradients(graph, params, {**batch, "y": batch["y"][:4]})


def test_dtypes(mlp) -> None:
    graph, params, batch = mlp
    with pytest.raises(InputError, match="input 'y' is float64, but the graph declares int64"):
        gp.local_gradients(graph, params, {**batch, "y": batch["y"].astype(np.float64)})
    # The SDK casts within a kind (int32 labels, float32 data into a float64 model)...
    loss, _ = gp.local_gradients(graph, params, {"x": batch["x"].astype(np.float32), "y": batch["y"].astype(np.int32)})
    assert np.isfinite(loss)
    # ...the engine itself is strict.
    with pytest.raises(InputError, match="is float32, but the graph declares float64"):
        graph.program().run(params, {**batch, "x": batch["x"].astype(np.float32)})
    with pytest.raises(InputError, match="input 'x' is complex128, but the graph declares float64"):
        gp.local_gradients(graph, params, {**batch, "x": batch["x"].astype(np.complex128)})


def test_label_out_of_range_names_the_input_and_the_example(mlp) -> None:
    graph, params, batch = mlp
    bad = batch["y"].copy()
    bad[3] = 5
    # The SDK checks the signature's index limits before running anything...
    with pytest.raises(InputError, match=r"input 'y' \(class labels for 'logits'\) has 5 at example 3, "
                                         r"out of range \[0, 5\)"):
        gp.local_gradients(graph, params, {**batch, "y": bad})
    bad[3] = -1
    with pytest.raises(InputError, match="has -1 at example 3, out of range"):
        gp.local_gradients(graph, params, {**batch, "y": bad})
    # ...and the engine, which a raw gRPC client reaches, names the node.
    with pytest.raises(InputError, match=r"softmax_cross_entropy.*label -1 is out of range \[0, 5\)"):
        graph.program().run(params, {**batch, "y": bad})


def test_embedding_index_out_of_range() -> None:
    g = gp.Graph()
    ids = g.input("ids", (2,), dtype="int64")
    table = g.param("table", (4, 3))
    g.set_loss(gp.embedding(table, ids).sum())
    with pytest.raises(InputError, match=r"input .ids. \(row indices into .table.\) has 4 at example 0, out of range \[0, 4\)"):
        gp.local_gradients(g, g.init_params(), {"ids": np.array([[0, 4]])})


def test_non_array_values(mlp) -> None:
    graph, params, batch = mlp
    with pytest.raises(InputError, match="dict"):
        gp.local_gradients(graph, params, [batch["x"]])  # type: ignore[arg-type]
    with pytest.raises(InputError, match="shards must be a positive integer"):
        gp.local_gradients(graph, params, batch, shards=0)
    with pytest.raises(InputError, match="must be a numpy array"):
        graph.program().run({**params, "b1": [0.0] * 16}, batch)


def test_tensor_decoding_checks_before_reading() -> None:
    from gradpool.worker.engine import from_tensor
    good = to_tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    bad = pb.Tensor(dtype=good.dtype, shape=[1000, 1000], data=good.data)
    with pytest.raises(InputError, match="needs 4000000 bytes, got 24"):
        from_tensor(bad)
    with pytest.raises(InputError, match="invalid shape"):
        from_tensor(pb.Tensor(dtype=pb.FLOAT32, shape=[-1], data=b""))
    with pytest.raises(InputError, match="unknown dtype"):
        from_tensor(pb.Tensor(dtype=99, shape=[], data=b""))


def test_sdk_build_errors_name_the_op_shapes_and_line() -> None:
    g = gp.Graph()
    x = g.input("x", (3,))
    W = g.param("W", (4, 2))
    with pytest.raises(GraphError, match=r"matmul\(x \(batch, 3\) float32, W \(4, 2\) float32\) at "
                                         r"test_bad_input.py:\d+: .*do not align"):
        x @ W
    with pytest.raises(GraphError, match="must share one dtype"):
        x + g.param("d", (3,), dtype="float64")
    with pytest.raises(GraphError, match="float scalar"):
        g.set_loss(x.sum(axis=1))  # per-example, not a scalar
    with pytest.raises(GraphError, match="already used"):
        g.input("x", (3,))
    with pytest.raises(GraphError, match="another graph"):
        x + gp.Graph().param("q", (3,))
    with pytest.raises(GraphError, match="truth value"):
        bool(x)
    with pytest.raises(GraphError, match="unknown init"):
        g.param("p", (2,), init="magic")
    with pytest.raises(GraphError, match="sizes must be >= 0"):
        g.param("n", (-2,))
    with pytest.raises(GraphError, match="no loss yet"):
        g.to_proto()
    with pytest.raises(GraphError, match="unknown op"):
        g._add("nope", (x,))
