"""A validated graph, ready to run forward and backward on one shard.

`Program(graph_proto)` checks everything once (references, ops, attributes,
shapes, dtypes), classifies every node for sharding, and then `run()` does
the lecture's two passes: values in topological order, then adjoints in
reverse order, v_bar_i = sum over children j of v_bar_j * dv_j/dv_i.

Sharding. The loss over a batch must equal the sum of the losses over any
split of it. Every node is one of:

* batch-independent -- computed from params and consts only (a regularizer);
* per-example       -- has the batch axis in front; row i depends on example i;
* batch-reduced     -- a sum or mean over the batch axis of per-example
                       values, or an op that is linear in such values.

The loss must be batch-reduced or batch-independent. A batch-independent term
*added* into a batch-reduced value (lambda * R in L + lambda * R) would be
counted once per shard, so such edges are "cut" on every shard but one
(`include_batch_independent=False`): the term is replaced by zeros and not
computed, and the sum over shards counts it exactly once. A graph that mixes
per-example values with batch statistics, or applies a nonlinear op to a
batch-reduced value, is rejected with a `ShardingError` naming the node.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from gradpool.protos import gradpool_pb2 as pb

from .errors import GradpoolError, GraphError, InputError, ShardingError
from .ops import BATCH, FLOATS, REQUIRED, Attrs, fmt, get_op, is_per_example
from .tensors import PROTO_TO_DTYPE, from_tensor

SOURCES = ("input", "param", "const")
PER_EXAMPLE = "per-example"
BATCH_REDUCED = "batch-reduced"
BATCH_INDEPENDENT = "batch-independent"
MAX_NODES = 100_000
MAX_RANK = 8


def graph_id(graph: pb.Graph) -> str:
    """Content hash naming a graph on the coordinator and on every worker."""
    return hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()


@dataclass
class NodeInfo:
    index: int
    name: str
    op: str
    inputs: tuple[int, ...]
    attrs: Attrs
    shape: tuple[int, ...]
    dtype: np.dtype
    origin: str = ""
    kind: str = ""
    value: Optional[np.ndarray] = None  # consts
    # Why this node's value would differ between sharded and whole-batch runs
    # (empty when it would not). Only fatal for nodes the loss or a requested
    # output depends on.
    refusal: str = ""

    def where(self) -> str:
        built = f", built at {self.origin}" if self.origin else ""
        return f"node {self.name!r} ({self.op}{built})"


@dataclass
class RunResult:
    loss: float
    grads: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    examples: int


def _attr_value(kind: object, value: pb.AttrValue, what: str) -> object:
    which = value.WhichOneof("value")
    if kind is int and which == "i":
        return int(value.i)
    if kind is float and which in ("f", "i"):
        return float(value.f if which == "f" else value.i)
    if kind is bool and which == "b":
        return bool(value.b)
    if kind == "ints" and which == "ints":
        return tuple(int(v) for v in value.ints.values)
    if kind is str and which == "s":
        return value.s
    kind_name = getattr(kind, "__name__", kind)
    raise GraphError(f"{what}: attribute must be {kind_name}, got {which or 'nothing'}")


class Program:
    """A graph checked and classified once, run many times (one per shard)."""

    def __init__(self, graph: pb.Graph):
        if not isinstance(graph, pb.Graph):
            raise GraphError(f"expected a gradpool Graph message, got {type(graph).__name__}")
        if not graph.nodes:
            raise GraphError("graph has no nodes")
        if len(graph.nodes) > MAX_NODES:
            raise GraphError(f"graph has {len(graph.nodes)} nodes; the limit is {MAX_NODES}")
        self.name = graph.name
        self.nodes: list[NodeInfo] = []
        self.index: dict[str, int] = {}
        for i, node in enumerate(graph.nodes):
            info = self._check_node(i, node)
            self.index[info.name] = i
            self.nodes.append(info)
        if not 0 <= graph.loss < len(self.nodes):
            raise GraphError(f"loss index {graph.loss} does not name a node (graph has {len(self.nodes)})")
        self.loss = graph.loss
        loss = self.nodes[self.loss]
        if loss.shape != () or loss.dtype not in FLOATS:
            raise GraphError(f"the loss {loss.where()} must be a float scalar, got shape {fmt(loss.shape)} "
                             f"of {loss.dtype}; reduce it with .sum() or .mean()")
        self.inputs = {n.name: n for n in self.nodes if n.op == "input"}
        self.params = {n.name: n for n in self.nodes if n.op == "param"}
        self.cuts = self._classify()
        self._grad_set = self._gradient_path()
        for node in self.nodes:
            node.attrs["wants"] = tuple(i in self._grad_set for i in node.inputs)
        for j in self._grad_set:
            node = self.nodes[j]
            if node.op not in SOURCES and get_op(node.op).vjp is None:
                raise GraphError(f"op {node.op!r} has no gradient rule, but {node.where()} lies between a param "
                                 f"and the loss")
        self._live_cache: dict[tuple, tuple[int, ...]] = {}

    # ------------------------------------------------------------ checking

    def _check_node(self, i: int, node: pb.Node) -> NodeInfo:
        label = f"node {i} ({node.name!r}, {node.op})" if node.name else f"node {i} ({node.op})"
        if node.origin:
            label += f", built at {node.origin}"
        if not node.name:
            raise GraphError(f"{label}: every node needs a name")
        if node.name in self.index:
            raise GraphError(f"{label}: the name {node.name!r} is used twice")
        for k in node.inputs:
            if not 0 <= k < i:
                raise GraphError(f"{label}: input index {k} does not name an earlier node "
                                 "(nodes must be in topological order)")
        if node.dtype not in PROTO_TO_DTYPE:
            raise GraphError(f"{label}: missing or unknown dtype")
        shape = tuple(int(d) for d in node.shape)
        if len(shape) > MAX_RANK or any(d < 0 and not (d == BATCH and a == 0) for a, d in enumerate(shape)):
            raise GraphError(f"{label}: invalid shape {tuple(shape)} (-1 marks the batch axis, only in front)")
        info = NodeInfo(i, node.name, node.op, tuple(node.inputs), Attrs(), shape,
                        PROTO_TO_DTYPE[node.dtype], node.origin)
        try:
            if node.op in SOURCES:
                self._check_source(info, node)
            else:
                self._check_op(info, node)
        except GradpoolError as err:
            raise type(err)(f"{label}: {err}") from None
        return info

    def _check_source(self, info: NodeInfo, node: pb.Node) -> None:
        if node.inputs:
            raise GraphError("a source node takes no inputs")
        if info.op == "input":
            if not is_per_example(info.shape):
                raise GraphError(f"an input is per-example: its shape must start with the batch axis (-1), "
                                 f"got {info.shape}")
            allowed: set[str] = set()
        elif info.op == "param":
            if BATCH in info.shape:
                raise GraphError("a param has no batch axis")
            if info.dtype not in FLOATS:
                raise GraphError(f"a param must be float32 or float64, got {info.dtype}")
            allowed = {"init"}
        else:
            if "value" not in node.attrs or node.attrs["value"].WhichOneof("value") != "tensor":
                raise GraphError("a const needs its value as the tensor attribute 'value'")
            info.value = from_tensor(node.attrs["value"].tensor, "const value")
            if info.value.shape != info.shape or info.value.dtype != info.dtype:
                raise GraphError(f"const value is {info.value.shape} of {info.value.dtype}, "
                                 f"but the node declares {info.shape} of {info.dtype}")
            allowed = {"value"}
        extra = set(node.attrs) - allowed
        if extra:
            raise GraphError(f"unknown attribute(s) {sorted(extra)}")
        if "init" in node.attrs:
            info.attrs["init"] = _attr_value(str, node.attrs["init"], "init")

    def _check_op(self, info: NodeInfo, node: pb.Node) -> None:
        op = get_op(info.op)
        if (op.arity is None and not info.inputs) or (op.arity is not None and len(info.inputs) != op.arity):
            raise GraphError(f"takes {op.arity or 'one or more'} inputs, got {len(info.inputs)}")
        extra = set(node.attrs) - set(op.attrs)
        if extra:
            raise GraphError(f"unknown attribute(s) {sorted(extra)}; {info.op} takes {sorted(op.attrs) or 'none'}")
        for name, (kind, default) in op.attrs.items():
            if name in node.attrs:
                info.attrs[name] = _attr_value(kind, node.attrs[name], name)
            elif default is REQUIRED:
                raise GraphError(f"missing required attribute {name!r}")
            else:
                info.attrs[name] = default
        parents = [self.nodes[k] for k in info.inputs]
        info.attrs["per_example"] = is_per_example(parents[0].shape)
        shape = tuple(op.shape(info.attrs, *(p.shape for p in parents)))
        dtype = op.dtype(info.attrs, *(p.dtype for p in parents))
        if shape != info.shape or dtype != info.dtype:
            raise GraphError(f"declares {fmt(info.shape)} of {info.dtype}, but its inputs "
                             f"{', '.join(fmt(p.shape) for p in parents)} give {fmt(shape)} of {dtype}")

    def _classify(self) -> frozenset[tuple[int, int]]:
        """Kind of every node, and the edges that carry a batch-independent term
        into a batch-reduced sum (counted on one shard only)."""
        cuts: set[tuple[int, int]] = set()
        for node in self.nodes:
            if node.op in SOURCES:
                node.kind = PER_EXAMPLE if node.op == "input" else BATCH_INDEPENDENT
                continue
            kinds = [self.nodes[i].kind for i in node.inputs]
            if is_per_example(node.shape):
                node.kind = PER_EXAMPLE
            elif all(k == BATCH_INDEPENDENT for k in kinds):
                node.kind = BATCH_INDEPENDENT
            else:
                node.kind = BATCH_REDUCED
            node.refusal = next((self.nodes[i].refusal for i in node.inputs if self.nodes[i].refusal), "")
            if node.refusal:
                continue
            if BATCH_REDUCED in kinds and PER_EXAMPLE in kinds:
                node.refusal = (f"{node.where()} combines per-example values with a statistic of the whole "
                                "batch (as batch norm does); each shard sees only its own examples, so it "
                                "cannot be split across workers")
                continue
            if node.kind != BATCH_REDUCED:
                continue
            op = get_op(node.op)
            batchy = [k for k, kind in enumerate(kinds) if kind != BATCH_INDEPENDENT]
            linear = (op.linear_in == "all"
                      or (op.linear_in == "each" and len(batchy) == 1)
                      or (op.linear_in == "first" and batchy == [0]))
            if not linear:
                node.refusal = (f"{node.where()} is not linear in the batch-reduced value(s) "
                                f"{', '.join(repr(self.nodes[node.inputs[k]].name) for k in batchy)}; the loss "
                                "must be a sum over examples plus batch-independent terms, so a sum of shard "
                                "losses would not equal the whole-batch loss")
            elif op.linear_in == "all":
                cuts.update((node.index, k) for k, kind in enumerate(kinds) if kind == BATCH_INDEPENDENT)
        loss = self.nodes[self.loss]
        if loss.refusal:
            raise ShardingError(loss.refusal)
        return frozenset(cuts)

    def _gradient_path(self) -> frozenset[int]:
        """Nodes that depend on a param and lead to the loss: the only ones with adjoints."""
        from_param = [False] * len(self.nodes)
        for node in self.nodes:
            from_param[node.index] = node.op == "param" or any(from_param[i] for i in node.inputs)
        to_loss = [False] * len(self.nodes)
        to_loss[self.loss] = True
        for node in reversed(self.nodes):
            if to_loss[node.index]:
                for i in node.inputs:
                    to_loss[i] = True
        return frozenset(i for i in range(len(self.nodes)) if from_param[i] and to_loss[i])

    def _live(self, targets: tuple[int, ...], cut: frozenset[tuple[int, int]]) -> tuple[int, ...]:
        """Nodes that `targets` need, in topological order, not crossing `cut` edges."""
        key = (targets, cut)
        if key not in self._live_cache:
            need = [False] * len(self.nodes)
            for t in targets:
                need[t] = True
            for node in reversed(self.nodes):
                if need[node.index]:
                    for k, i in enumerate(node.inputs):
                        if (node.index, k) not in cut:
                            need[i] = True
            self._live_cache[key] = tuple(i for i, n in enumerate(need) if n)
        return self._live_cache[key]

    # ------------------------------------------------------------ running

    def node(self, name: str) -> NodeInfo:
        if name not in self.index:
            raise InputError(f"graph has no node named {name!r}")
        return self.nodes[self.index[name]]

    def _check_arrays(self, given: Mapping[str, np.ndarray], declared: Mapping[str, NodeInfo],
                      required: set[str], what: str) -> dict[str, np.ndarray]:
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise InputError(f"unknown {what}(s) {unknown}; the graph's {what}s are {sorted(declared)}")
        missing = sorted(required - set(given))
        if missing:
            raise InputError(f"missing {what}(s) {missing}")
        checked = {}
        for name, value in given.items():
            node = declared[name]
            if not isinstance(value, np.ndarray):
                raise InputError(f"{what} {name!r} must be a numpy array, got {type(value).__name__}")
            if value.dtype != node.dtype:
                raise InputError(f"{what} {name!r} is {value.dtype}, but the graph declares {node.dtype}")
            declared_shape = node.shape[1:] if what == "input" else node.shape
            actual = value.shape[1:] if what == "input" else value.shape
            if what == "input" and value.ndim == 0 or actual != declared_shape:
                want = fmt(node.shape)
                raise InputError(f"{what} {name!r} has shape {value.shape}, but the graph declares {want}")
            checked[name] = value
        return checked

    def run(self, params: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray], *,
            global_batch: Optional[int] = None, include_batch_independent: bool = True,
            gradients: bool = True, outputs: Sequence[str] = ()) -> RunResult:
        """Forward (and backward) on one shard. `global_batch` is the size of the
        whole minibatch the shard belongs to; it defaults to this shard's size."""
        output_ids = tuple(self.node(name).index for name in outputs)
        cut = frozenset() if include_batch_independent else self.cuts
        skip_loss = not include_batch_independent and self.nodes[self.loss].kind == BATCH_INDEPENDENT
        targets = output_ids + ((self.loss,) if gradients and not skip_loss else ())
        live = self._live(targets, cut)
        live_set = set(live)
        needed_inputs = {n.name for n in self.inputs.values() if n.index in live_set}
        needed_params = {n.name for n in self.params.values() if n.index in live_set}
        if gradients:
            needed_inputs, needed_params = set(self.inputs), set(self.params)
        inputs = self._check_arrays(inputs, self.inputs, needed_inputs, "input")
        params = self._check_arrays(params, self.params, needed_params, "param")
        sizes = {name: value.shape[0] for name, value in inputs.items()}
        if len(set(sizes.values())) > 1:
            raise InputError(f"inputs disagree on the batch size: {sizes}")
        examples = next(iter(sizes.values()), 0)
        global_batch = examples if global_batch is None else int(global_batch)
        if global_batch < examples or (self.inputs and global_batch < 1):
            raise InputError(f"global batch size {global_batch} is smaller than this shard ({examples} examples)")
        for name in outputs:
            node = self.node(name)
            if node.refusal:
                raise ShardingError(f"output {name!r} cannot be computed shard by shard: {node.refusal}")
            if node.kind != PER_EXAMPLE and node.index != self.loss:
                raise InputError(f"output {name!r} is {node.kind}; only per-example nodes and the "
                                 "loss can be returned")

        values = self._forward(live, cut, params, inputs, global_batch, keep=set(output_ids) | {self.loss},
                               backward=gradients and not skip_loss)
        result_outputs = {name: np.array(values[self.index[name]]) for name in outputs}
        loss = 0.0 if skip_loss or not gradients else float(values[self.loss])
        grads: dict[str, np.ndarray] = {}
        if gradients:
            if not skip_loss:
                grads = self._backward(live, cut, values, global_batch)
            for name, value in params.items():
                if name not in grads:
                    grads[name] = np.zeros_like(value)
        return RunResult(loss, grads, result_outputs, examples)

    def _args(self, node: NodeInfo, values: list, cut: frozenset) -> list[np.ndarray]:
        return [np.zeros(self.nodes[i].shape, self.nodes[i].dtype) if (node.index, k) in cut else values[i]
                for k, i in enumerate(node.inputs)]

    def _attrs(self, node: NodeInfo, global_batch: int) -> Attrs:
        return Attrs(node.attrs, batch=global_batch) if get_op(node.op).needs_batch else node.attrs

    def _forward(self, live: tuple[int, ...], cut: frozenset, params: Mapping[str, np.ndarray],
                 inputs: Mapping[str, np.ndarray], global_batch: int, keep: set[int], backward: bool) -> list:
        keep = set(keep)
        if backward:  # values the backward pass will read: its nodes and their inputs
            for j in live:
                if j in self._grad_set and self.nodes[j].op not in SOURCES:
                    keep.add(j)
                    keep.update(self.nodes[j].inputs)
        last_use: dict[int, int] = {}
        for j in live:
            for k, i in enumerate(self.nodes[j].inputs):
                if (j, k) not in cut:
                    last_use[i] = j
        values: list = [None] * len(self.nodes)
        for j in live:
            node = self.nodes[j]
            if node.op == "input":
                values[j] = inputs[node.name]
            elif node.op == "param":
                values[j] = params[node.name]
            elif node.op == "const":
                values[j] = node.value
            else:
                try:
                    out = get_op(node.op).forward(self._attrs(node, global_batch), *self._args(node, values, cut))
                except GradpoolError as err:
                    raise type(err)(f"{node.where()}: {err}") from None
                values[j] = np.asarray(out, dtype=node.dtype)
                for i in node.inputs:
                    if last_use.get(i) == j and i not in keep:
                        values[i] = None
        return values

    def _backward(self, live: tuple[int, ...], cut: frozenset, values: list, global_batch: int
                  ) -> dict[str, np.ndarray]:
        grad_set = self._grad_set
        adjoints: dict[int, np.ndarray] = {self.loss: np.ones((), self.nodes[self.loss].dtype)}
        grads: dict[str, np.ndarray] = {}
        for j in reversed(live):
            g = adjoints.pop(j, None)
            node = self.nodes[j]
            if g is None or j not in grad_set:
                continue
            if node.op == "param":
                grads[node.name] = g if g.shape == values[j].shape else np.broadcast_to(g, values[j].shape).copy()
                continue
            args = self._args(node, values, cut)
            input_grads = get_op(node.op).vjp(self._attrs(node, global_batch), g, values[j], *args)
            if len(input_grads) != len(node.inputs):
                raise GraphError(f"{node.where()}: gradient rule returned {len(input_grads)} values for "
                                 f"{len(node.inputs)} inputs")
            for k, (i, grad) in enumerate(zip(node.inputs, input_grads)):
                if grad is None or i not in grad_set or (j, k) in cut:
                    continue
                grad = unbroadcast(np.asarray(grad, dtype=args[k].dtype), args[k].shape, node)
                adjoints[i] = adjoints[i] + grad if i in adjoints else grad
            values[j] = None
        return grads


def unbroadcast(grad: np.ndarray, shape: tuple[int, ...], node: NodeInfo) -> np.ndarray:
    """Sum a gradient over the axes that broadcasting stretched, back to `shape`."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(a for a, d in enumerate(shape) if d == 1 and grad.shape[a] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    if grad.shape != shape:
        raise GraphError(f"{node.where()}: gradient rule gave shape {grad.shape} for an input of shape {shape}")
    return grad
