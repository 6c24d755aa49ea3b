"""A validated graph, ready to run forward and backward on one shard.

`Program(graph_proto)` decodes and checks every node once (references, ops,
attributes, shapes, dtypes), has the nodes classified for sharding
(`sharding.classify`), finds the param-to-loss path, and builds the graph's
`Signature` (what it takes). `run()` then does the lecture's two passes:
values in topological order, then adjoints in reverse order,
v_bar_i = sum over children j of v_bar_j * dv_j/dv_i.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Mapping, Optional, Sequence

import numpy as np

from gradpool.protos import gradpool_pb2 as pb

from .errors import Cancelled, CapacityError, GradpoolError, GraphError, InputError, ShardingError, quoted
from .limits import LIMITS, mib
from .ops import BATCH, FLOATS, Attrs, Call, Op, fmt, get_op, is_per_example
from .sharding import BATCH_INDEPENDENT, PER_EXAMPLE, SOURCES, classify
from .signature import IndexLimit, Signature, TensorSpec
from .tensors import PROTO_TO_DTYPE, from_tensor

MAX_NODES = LIMITS.max_nodes
MAX_RANK = LIMITS.max_rank
MAX_NAME_LENGTH = LIMITS.max_name_length
# Kinds of run whose Plan is kept (forward-only runs are keyed by the outputs
# a client asks for: without a bound, asking for ever new sets grows it).
MAX_PLANS = 16
# ... and at most this many Steps per node of the graph in all the kept Plans
# (a Plan holds one per node it runs: about 0.55 KB). Found by the fuzz:
# sixteen Plans of a 100k-node graph held 0.9 GB beyond its footprint, so the
# graph caches' byte bounds did not hold. Two cover a worker's two kinds of
# shard (with and without the batch-independent terms).
PLAN_STEPS_PER_NODE = 2
# What one checked node holds in Python objects (NodeInfo, its attrs, Call,
# tuples, the index entry, its share of the cached Plans): tracemalloc measured
# about 0.9 KB a node for a Program of a 100k-node chain and 1.4 KB with one
# Plan, so 2 KB with two; rounded up. With the consts' bytes, a Program's
# `footprint`, by which the graph caches are bounded.
NODE_BYTES = 2560


def graph_id(graph: pb.Graph) -> str:
    """Content hash naming a graph on the coordinator and on every worker.

    Each node's `origin` (the user's file:line) is left out: it only feeds
    messages, so the same computation built from another line keeps its id
    (and its checkpoints).
    """
    if any(node.origin for node in graph.nodes):
        graph = _without_origins(graph)
    return hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()


def _without_origins(graph: pb.Graph) -> pb.Graph:
    copy = pb.Graph()
    copy.CopyFrom(graph)
    for node in copy.nodes:
        node.ClearField("origin")
    return copy


@dataclass
class NodeInfo:
    index: int
    name: str
    op: str
    inputs: tuple[int, ...]
    attrs: Attrs  # declared attributes, defaults filled in
    shape: tuple[int, ...]
    dtype: np.dtype
    origin: str = ""
    kind: str = ""
    value: Optional[np.ndarray] = None  # consts
    # Why this node's value would differ between sharded and whole-batch runs
    # (empty when it would not). Only fatal for nodes the loss or a requested
    # output depends on.
    refusal: str = ""
    call: Optional[Call] = None  # what the op's rules see as `at`
    scratch: tuple[int, int] = (0, 0)  # (bytes, bytes per example) of the op's temporaries (Op.scratch)

    def where(self) -> str:
        built = f", built at {self.origin}" if self.origin else ""
        return f"node {quoted(self.name)} ({self.op}{built})"

    @property
    def nbytes(self) -> tuple[int, int]:
        """(bytes, bytes per example) of this node's value: a per-example value
        scales with the batch, any other does not."""
        cached = self.__dict__.get("_nbytes")
        if cached is None:
            size = math.prod(d for d in self.shape if d != BATCH) * self.dtype.itemsize
            cached = self.__dict__["_nbytes"] = (0, size) if is_per_example(self.shape) else (size, 0)
        return cached

    def bytes_for(self, examples: int) -> int:
        fixed, per_example = self.nbytes
        return fixed + per_example * examples


@dataclass(frozen=True)
class Step:
    """One node's share of a run, worked out once per plan (not per run)."""
    node: NodeInfo
    op: Optional[Op]  # None for sources
    cut_args: frozenset[int]  # argument positions fed zeros (cut edges)
    free: tuple[int, ...]  # values nothing later reads: dropped after this step
    grad_inputs: tuple[tuple[int, int], ...]  # (position, input) that take an adjoint from this node
    # The argument position whose buffer the op's forward_into writes into (a
    # dead temporary, see `Program._reusable`); -1: forward into a new array.
    reuse: int = -1
    vjp_inputs: bool = True  # the VJP reads the inputs' values (else it gets None for them)
    vjp_output: bool = True  # ... and the output's
    contextual: bool = False  # the op reads the run's context (needs_batch, needs_seed): see `Program._call`


@dataclass(frozen=True)
class Plan:
    """A run's nodes in order, forward and (the gradient path) backward."""
    forward: tuple[Step, ...]
    backward: tuple[Step, ...]
    # The run's memory as (bytes, bytes per example) at the moments that can be
    # its peak, whatever the batch (see `memory_peaks`).
    peaks: tuple[tuple[int, int], ...] = ()

    def memory(self, examples: int) -> int:
        """Static estimate of the bytes of values and adjoints alive at once, at the peak."""
        return max((fixed + per * examples for fixed, per in self.peaks), default=0)


@dataclass(frozen=True)
class RunContext:
    """What a run tells the ops that read it (`needs_batch`, `needs_seed`)."""
    batch: int
    seed: Optional[int] = None
    offset: int = 0
    training: bool = False


MAX_SEED = 2**64 - 1


def check_seed(seed: object) -> Optional[int]:
    """A request's seed as an int in [0, 2^64), or None; anything else is an InputError."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
        raise InputError(f"seed must be an integer in [0, 2^64), got {quoted(seed)}")
    return int(seed)


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
        if len(value.ints.values) > LIMITS.max_attr_ints:  # the servers refuse it on the wire: so does the SDK
            raise GraphError(f"{what}: {len(value.ints.values)} values; an int-list attribute holds at most "
                             f"{LIMITS.max_attr_ints}")
        return tuple(int(v) for v in value.ints.values)
    if kind is str and which == "s":
        return value.s
    kind_name = getattr(kind, "__name__", kind)
    raise GraphError(f"{what}: attribute must be {kind_name}, got {which or 'nothing'}")


class Program:
    """A graph checked and classified once, run many times (one per shard)."""

    # Whether a step may write its output into a dead temporary (Op.forward_into).
    # Tests turn it off, before the first run, to compare the numbers bitwise.
    reuse_buffers = True

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
        self.cuts = classify(self.nodes, self.loss)
        self._grad_set = self._gradient_path()
        for node in self.nodes:
            if node.op not in SOURCES:
                node.call = Call(node.attrs, per_example=node.call.per_example,  # type: ignore[union-attr]
                                 wants=tuple(i in self._grad_set for i in node.inputs), node=node.name)
        for j in self._grad_set:
            node = self.nodes[j]
            if node.op not in SOURCES and get_op(node.op).vjp is None:
                raise GraphError(f"op {node.op!r} has no gradient rule, but {node.where()} lies between a param "
                                 f"and the loss")
        self.signature = self._signature()
        self._live_cache: OrderedDict[tuple, tuple[int, ...]] = OrderedDict()
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()
        self._plans_lock = threading.Lock()
        # Random nodes (dropout) the loss depends on: a gradient run needs a seed for them.
        self.random_nodes = tuple(self.nodes[i] for i in self._live((self.loss,), frozenset())
                                  if self.nodes[i].op not in SOURCES and get_op(self.nodes[i].op).needs_seed)

    @property
    def footprint(self) -> int:
        """Estimated bytes this Program holds: its nodes and its consts' values."""
        return NODE_BYTES * len(self.nodes) + sum(n.value.nbytes for n in self.nodes if n.value is not None)

    def _signature(self) -> Signature:
        spec = lambda n: TensorSpec(n.name, n.op, n.shape, n.dtype)  # noqa: E731
        limits = []
        for node in self.nodes:
            indexes = get_op(node.op).indexes if node.op not in SOURCES else None
            if indexes is None:
                continue
            index_arg, into_arg, axis = indexes
            source, into = self.nodes[node.inputs[index_arg]], self.nodes[node.inputs[into_arg]]
            if source.op != "input":
                continue
            meaning = (f"class labels for {into.name!r}" if node.op == "softmax_cross_entropy"
                       else f"row indices into {into.name!r}" if axis == 0 else f"indices into axis {axis} of {into.name!r}")
            limits.append(IndexLimit(source.name, into.shape[axis], meaning))
        return Signature(map(spec, self.inputs.values()), map(spec, self.params.values()), limits)

    # ------------------------------------------------------------ checking

    def _check_node(self, i: int, node: pb.Node) -> NodeInfo:
        label = f"node {i} ({quoted(node.name)}, {node.op})" if node.name else f"node {i} ({node.op})"
        if node.origin:
            label += f", built at {node.origin}"
        if not node.name:
            raise GraphError(f"{label}: every node needs a name")
        if len(node.name) > MAX_NAME_LENGTH:
            raise GraphError(f"{label}: names are at most {MAX_NAME_LENGTH} characters")
        if node.name in self.index:
            raise GraphError(f"{label}: the name {quoted(node.name)} is used twice")
        for k in node.inputs:
            if not 0 <= k < i:
                raise GraphError(f"{label}: input index {k} does not name an earlier node "
                                 "(nodes must be in topological order)")
        if node.dtype not in PROTO_TO_DTYPE:
            raise GraphError(f"{label}: missing or unknown dtype")
        shape = tuple(int(d) for d in node.shape)
        if len(shape) > MAX_RANK or any(d < 0 and not (d == BATCH and a == 0) for a, d in enumerate(shape)):
            raise GraphError(f"{label}: invalid shape {fmt(shape)} (-1 marks the batch axis, only in front)")
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
        info.attrs = op.resolve_attrs({name: _attr_value(op.attrs[name][0], value, name) if name in op.attrs else value
                                       for name, value in node.attrs.items()})
        parents = [self.nodes[k] for k in info.inputs]
        info.call = Call(info.attrs, per_example=is_per_example(parents[0].shape))
        shape = tuple(op.shape(info.call, *(p.shape for p in parents)))
        dtype = op.dtype(info.call, *(p.dtype for p in parents))
        if shape != info.shape or dtype != info.dtype:
            raise GraphError(f"declares {fmt(info.shape)} of {info.dtype}, but its inputs "
                             f"{', '.join(fmt(p.shape) for p in parents)} give {fmt(shape)} of {dtype}")
        if op.scratch is not None:
            size = op.scratch(info.call, *(p.shape for p in parents)) * info.dtype.itemsize
            info.scratch = (0, size) if is_per_example(parents[0].shape) else (size, 0)

    def _gradient_path(self) -> frozenset[int]:
        """Nodes that depend on a param and lead to the loss: the only ones with adjoints.

        A gradient flows only through float values and ops that pass one: a
        comparison, a cast to int, one_hot or stop_gradient ends the path
        cleanly (what lies behind it takes no adjoint from there), instead of
        reaching a rule that has nothing to give."""
        carries = [node.op in SOURCES or (node.dtype in FLOATS and get_op(node.op).passes_gradient)
                   for node in self.nodes]
        from_param = [False] * len(self.nodes)
        for node in self.nodes:
            from_param[node.index] = node.op == "param" or (carries[node.index]
                                                            and any(from_param[i] for i in node.inputs))
        to_loss = [False] * len(self.nodes)
        to_loss[self.loss] = True
        for node in reversed(self.nodes):
            if to_loss[node.index] and carries[node.index]:
                for i in node.inputs:
                    to_loss[i] = True
        return frozenset(i for i in range(len(self.nodes)) if from_param[i] and to_loss[i])

    def _live(self, targets: tuple[int, ...], cut: frozenset[tuple[int, int]]) -> tuple[int, ...]:
        """Nodes that `targets` need, in topological order, not crossing `cut` edges."""
        key = (targets, cut)
        cached = self._live_cache.get(key)
        if cached is not None:
            return cached
        need = [False] * len(self.nodes)
        for t in targets:
            need[t] = True
        for node in reversed(self.nodes):
            if need[node.index]:
                for k, i in enumerate(node.inputs):
                    if (node.index, k) not in cut:
                        need[i] = True
        live = tuple(i for i, n in enumerate(need) if n)
        with self._plans_lock:
            self._live_cache[key] = live
            while len(self._live_cache) > 1 and (len(self._live_cache) > MAX_PLANS * 2 or sum(
                    map(len, self._live_cache.values())) > PLAN_STEPS_PER_NODE * len(self.nodes)):
                self._live_cache.popitem(last=False)
        return live

    # ------------------------------------------------------------ running

    def node(self, name: str) -> NodeInfo:
        if name not in self.index:
            raise InputError(f"graph has no node named {quoted(name)}")
        return self.nodes[self.index[name]]

    def sources_for(self, targets: Sequence[str]) -> tuple[set[str], set[str]]:
        """Names of the inputs and of the params the named nodes depend on."""
        live = self._live(tuple(self.node(name).index for name in targets), frozenset())
        names = {self.nodes[i].name for i in live}
        return set(self.inputs) & names, set(self.params) & names

    def check_outputs(self, outputs: Sequence[str]) -> None:
        """Forward-only outputs are per-example nodes: their rows concatenate across shards."""
        if not outputs:
            raise InputError("name at least one output to evaluate")
        if len(set(outputs)) != len(outputs):
            raise InputError(f"outputs named twice: {quoted(list(outputs))}")
        for name in outputs:
            node = self.node(name)
            if node.refusal:
                raise ShardingError(f"output {quoted(name)} cannot be computed shard by shard: {node.refusal}")
            if node.kind != PER_EXAMPLE:
                raise InputError(f"output {quoted(name)} is {node.kind}; only per-example nodes can be evaluated "
                                 "(their rows concatenate across shards)")

    def check_seed(self, seed: object) -> Optional[int]:
        """The seed of a gradient run, checked: a graph with random nodes
        (dropout) on the loss's path needs one, so that every shard and every
        rerun draws the same masks; refused, naming the node, without."""
        seed = check_seed(seed)
        if seed is None and self.random_nodes:
            raise InputError(f"{self.random_nodes[0].where()} is random: computing gradients needs a seed "
                             "(gradients(..., seed=N); the Trainer passes one per step), so that every shard "
                             "and every rerun draws the same mask")
        return seed

    def check_memory(self, examples: int, max_bytes: int, *, gradients: bool = True, outputs: Sequence[str] = (),
                     include_batch_independent: bool = True, what: str = "this request") -> None:
        """Refuse (CapacityError) a run of `examples` examples whose static memory
        estimate (values and adjoints alive at once, at the peak) exceeds `max_bytes`,
        naming the largest value, before anything is computed."""
        output_ids = tuple(self.node(name).index for name in outputs) if not gradients else ()
        cut = frozenset() if include_batch_independent else self.cuts
        skip_loss = not include_batch_independent and self.nodes[self.loss].kind == BATCH_INDEPENDENT
        self._check_plan_memory(self._plan(output_ids, cut, gradients and not skip_loss), examples, max_bytes,
                                what)

    def _check_plan_memory(self, plan: Plan, examples: int, max_bytes: int, what: str) -> None:
        needed = plan.memory(examples)
        if needed <= max_bytes:
            return
        scratch = lambda node: node.scratch[0] + node.scratch[1] * examples  # noqa: E731
        largest = max((step.node for step in plan.forward), key=lambda node: node.bytes_for(examples) + scratch(node))
        temporaries = f" plus {mib(scratch(largest))} of temporaries" if scratch(largest) else ""
        raise CapacityError(
            f"{what} needs about {mib(needed)} for its values and gradients with {examples} example(s) (a static "
            f"estimate), more than the {mib(max_bytes)} a request may use on this server "
            f"(--max-request-memory-mb); the largest value is {largest.where()}: {fmt(largest.shape)} of "
            f"{largest.dtype}, {mib(largest.bytes_for(examples))}{temporaries}. Send fewer examples per request")

    def check_fits(self, max_bytes: int) -> None:
        """At registration: refuse a graph that cannot run even one example within
        `max_bytes`: one value (a batch-independent one, or one example's) or the
        gradient run's peak too large."""
        for node in self.nodes:
            if node.bytes_for(1) > max_bytes:
                raise CapacityError(
                    f"{node.where()} is {fmt(node.shape)} of {node.dtype}: {mib(node.bytes_for(1))} "
                    f"{'per example' if is_per_example(node.shape) else 'for its value alone'}, more than the "
                    f"{mib(max_bytes)} a request may use on this server (--max-request-memory-mb)")
        self._check_plan_memory(self._plan((), frozenset(), True), 1, max_bytes, "this graph")

    def run(self, params: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray], *,
            global_batch: Optional[int] = None, include_batch_independent: bool = True,
            gradients: bool = True, outputs: Sequence[str] = (), stop: Optional[threading.Event] = None,
            seed: Optional[int] = None, example_offset: int = 0, max_memory: Optional[int] = None) -> RunResult:
        """Forward (and backward) on one shard. `global_batch` is the size of the
        whole minibatch the shard belongs to; it defaults to this shard's size.
        With `gradients=False`, only the per-example `outputs` are computed.
        `stop`, once set, ends the run between two nodes with `Cancelled`.
        `seed` keys random ops (required for gradients when the graph has
        one; forward-only runs turn dropout off) and `example_offset` is the
        global index of this shard's first example, which keys their masks.
        `max_memory` refuses the run (CapacityError) before it starts when its
        static memory estimate is larger."""
        seed = self.check_seed(seed) if gradients else check_seed(seed)
        if gradients:
            needed_inputs, needed_params = set(self.inputs), set(self.params)
        else:
            self.check_outputs(outputs)
            needed_inputs, needed_params = self.sources_for(outputs)
        if gradients and outputs:
            raise InputError("outputs are computed by forward-only runs (gradients=False)")
        examples = self.signature.check_arrays(inputs, "input", needed_inputs)
        self.signature.check_arrays(params, "param", needed_params)
        inputs, params = aligned(inputs), aligned(params)
        global_batch = examples if global_batch is None else int(global_batch)
        if global_batch < examples or (self.inputs and global_batch < 1):
            raise InputError(f"global batch size {global_batch} is smaller than this shard ({examples} examples)")
        if isinstance(example_offset, bool) or not isinstance(example_offset, (int, np.integer)) \
                or not 0 <= example_offset <= global_batch - examples:
            raise InputError(f"example offset {quoted(example_offset)} does not place this shard's {examples} "
                             f"examples inside the global batch of {global_batch}")
        context = RunContext(global_batch, seed, int(example_offset), gradients)
        output_ids = tuple(self.node(name).index for name in outputs) if not gradients else ()
        cut = frozenset() if include_batch_independent else self.cuts
        skip_loss = not include_batch_independent and self.nodes[self.loss].kind == BATCH_INDEPENDENT
        backward = gradients and not skip_loss
        plan = self._plan(output_ids, cut, backward)
        if max_memory is not None:
            self._check_plan_memory(plan, examples, max_memory, f"a shard of {examples} example(s)")
        values, shapes = self._forward(plan, params, inputs, context, stop)
        result_outputs = {name: np.array(values[self.index[name]]) for name in outputs} if not gradients else {}
        loss = float(values[self.loss]) if backward else 0.0
        grads: dict[str, np.ndarray] = {}
        if gradients:
            if backward:
                grads = self._backward(plan, values, shapes, context, stop)
            for name, value in params.items():
                if name not in grads:
                    grads[name] = np.zeros_like(value)
        return RunResult(loss, grads, result_outputs, examples)

    def _plan(self, output_ids: tuple[int, ...], cut: frozenset, backward: bool) -> Plan:
        """The bookkeeping of a run (which nodes, which values to keep or drop
        when, which edges take adjoints), done once per kind of run."""
        key = (output_ids, cut, backward)
        with self._plans_lock:
            plan = self._plans.get(key)
        if plan is not None:
            return plan
        live = self._live(output_ids + ((self.loss,) if backward else ()), cut)
        keep = set(output_ids) | {self.loss}
        if backward:  # values the backward pass will read: what each VJP says it reads (Op.vjp_reads)
            for j in live:
                node = self.nodes[j]
                if j in self._grad_set and node.op not in SOURCES:
                    reads = get_op(node.op).vjp_reads
                    if reads in ("all", "output"):
                        keep.add(j)
                    if reads in ("all", "inputs"):
                        keep.update(i for k, i in enumerate(node.inputs) if (j, k) not in cut)
        first_use: dict[int, int] = {}
        last_use: dict[int, int] = {}
        for j in live:
            for k, i in enumerate(self.nodes[j].inputs):
                if (j, k) not in cut:
                    first_use.setdefault(i, j)
                    last_use[i] = j
        steps = {}
        for j in live:
            node = self.nodes[j]
            op = None if node.op in SOURCES else get_op(node.op)
            reuse = -1
            if op is not None and op.forward_into is not None and self.reuse_buffers:
                reuse = next((k for k, i in enumerate(node.inputs) if (j, k) not in cut and i not in keep
                              and first_use[i] == last_use[i] == j and self._reusable(self.nodes[i], node)), -1)
            reads = op.vjp_reads if op is not None else "all"
            steps[j] = Step(node, op, frozenset(k for k in range(len(node.inputs)) if (j, k) in cut),
                            tuple(i for i in dict.fromkeys(node.inputs) if last_use.get(i) == j and i not in keep),
                            tuple((k, i) for k, i in enumerate(node.inputs)
                                  if i in self._grad_set and (j, k) not in cut), reuse,
                            reads in ("all", "inputs"), reads in ("all", "output"),
                            op is not None and (op.needs_batch or op.needs_seed))
        path = tuple(steps[j] for j in reversed(live) if j in self._grad_set) if backward else ()
        forward = tuple(steps[j] for j in live)
        plan = Plan(forward, path, memory_peaks(forward, path, self.nodes))
        with self._plans_lock:
            self._plans[key] = plan
            budget = PLAN_STEPS_PER_NODE * len(self.nodes)
            while len(self._plans) > 1 and (len(self._plans) > MAX_PLANS or
                                            sum(len(kept.forward) for kept in self._plans.values()) > budget):
                self._plans.popitem(last=False)
        return plan

    @staticmethod
    def _reusable(value: NodeInfo, into: NodeInfo) -> bool:
        """Whether `into`'s step may write its output into `value`'s buffer, given
        that nothing else reads `value` (the caller checks: no other step, not
        the backward pass, not a requested output). Only a `fresh` op's value
        qualifies (or one such a step wrote into, which is as exclusive): a
        source is the caller's or the program's, and another op's value may be
        a view of a value still alive."""
        return (value.op not in SOURCES and get_op(value.op).fresh and value.shape == into.shape
                and value.dtype == into.dtype)

    def _args(self, step: Step, values: list) -> list[np.ndarray]:
        inputs = step.node.inputs
        if not step.cut_args:
            return [values[i] for i in inputs]
        return [np.zeros(self.nodes[i].shape, self.nodes[i].dtype) if k in step.cut_args else values[i]
                for k, i in enumerate(inputs)]

    @staticmethod
    def _call(step: Step, context: RunContext) -> Call:
        call = step.node.call
        assert call is not None and step.op is not None
        if step.op.needs_batch:
            call = replace(call, batch=context.batch)
        if step.op.needs_seed:
            call = replace(call, seed=context.seed, offset=context.offset, training=context.training)
        return call

    def _forward(self, plan: Plan, params: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray],
                 context: RunContext, stop: Optional[threading.Event] = None) -> tuple[list, list]:
        """The values of the plan's nodes (those the plan keeps; the others
        dropped as the run goes) and the shapes of all, which the backward
        pass needs also for values it no longer holds."""
        values: list = [None] * len(self.nodes)
        shapes: list = [None] * len(self.nodes)
        # (This loop and _backward's run per node per shard: the checks and
        # calls that do not depend on the run are worked out in the Plan.)
        for step in plan.forward:
            node = step.node
            op = step.op
            if op is None:
                value = values[node.index] = (inputs[node.name] if node.op == "input" else
                                              params[node.name] if node.op == "param" else node.value)
                shapes[node.index] = value.shape
                continue
            if stop is not None and stop.is_set():
                raise Cancelled(f"stopped before {node.where()}: the caller gave up")
            args = self._args(step, values) if step.cut_args else [values[i] for i in node.inputs]
            call = self._call(step, context) if step.contextual else node.call
            try:
                if step.reuse >= 0:
                    out = op.forward_into(call, args[step.reuse], *args)
                else:
                    out = op.forward(call, *args)
            except GradpoolError as err:
                raise type(err)(f"{node.where()}: {err}") from None
            value = values[node.index] = np.asarray(out, dtype=node.dtype)
            shapes[node.index] = value.shape
            for i in step.free:
                values[i] = None
        return values, shapes

    def _backward(self, plan: Plan, values: list, shapes: list, context: RunContext,
                  stop: Optional[threading.Event] = None) -> dict[str, np.ndarray]:
        adjoints: dict[int, np.ndarray] = {self.loss: np.ones((), self.nodes[self.loss].dtype)}
        grads: dict[str, np.ndarray] = {}
        # Adjoints whose buffer this pass allocated itself (the sum of two
        # contributions), so only it holds them: those, and only those, take
        # further contributions in place. A VJP's result is never written to:
        # it may be `g` itself (add returns it for both inputs), a view of it,
        # a broadcast view, or a value another node still reads.
        owned: set[int] = set()
        for step in plan.backward:
            node = step.node
            j = node.index
            g = adjoints.pop(j, None)
            if g is None:
                continue
            if step.op is None:  # a param: its gradient
                grads[node.name] = g if g.shape == shapes[j] else np.broadcast_to(g, shapes[j]).copy()
                continue
            if stop is not None and stop.is_set():
                raise Cancelled(f"stopped at the gradient of {node.where()}: the caller gave up")
            # What the VJP does not read (Op.vjp_reads) the plan may have dropped: it gets None.
            inputs = node.inputs
            args = (self._args(step, values) if step.cut_args else [values[i] for i in inputs]) \
                if step.vjp_inputs else [None] * len(inputs)
            input_grads = step.op.vjp(self._call(step, context) if step.contextual else node.call, g,
                                      values[j] if step.vjp_output else None, *args)
            if len(input_grads) != len(inputs):
                raise GraphError(f"{node.where()}: gradient rule returned {len(input_grads)} values for "
                                 f"{len(inputs)} inputs")
            for k, i in step.grad_inputs:
                grad = input_grads[k]
                if grad is None:
                    continue
                grad = np.asarray(grad, dtype=self.nodes[i].dtype)
                if grad.shape != shapes[i]:
                    grad = unbroadcast(grad, shapes[i], node)
                if i not in adjoints:
                    adjoints[i] = grad
                elif i in owned:
                    adjoints[i] += grad
                else:  # second contribution: a fresh buffer, ours to add into from now on
                    adjoints[i] = adjoints[i] + grad
                    owned.add(i)
            values[j] = None
        return grads


def aligned(arrays: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """The arrays, each copied only if its data is not aligned to its dtype.

    Tensors read in place from a request (`frombuffer` on the wire bytes) sit
    wherever the encoding put them, and for misaligned data numpy and BLAS
    take other loops whose results differ in the last bit (the product of a
    strided float64 view at a 4-byte offset does in most trials): the worker would
    then break invariant 1's bitwise match with one process, so such arrays get
    an aligned copy here, for every caller alike.
    """
    if all(a.flags.aligned for a in arrays.values()):
        return arrays
    return {name: a if a.flags.aligned else np.require(a, requirements="A") for name, a in arrays.items()}


def memory_peaks(forward: Sequence[Step], backward: Sequence[Step],
                 nodes: Sequence[NodeInfo]) -> tuple[tuple[int, int], ...]:
    """The run's memory, as (bytes, bytes per example), at every moment that
    could be its peak, walking the plan as `_forward` and `_backward` run it:
    sources (held by the request or the program) throughout, each op's value
    from its step until the plan drops it (a step that writes into a dead
    input's buffer takes that buffer over), cut arguments' zeros while their
    step runs, and in the backward pass each adjoint until its node's step,
    the VJP's results (the broadcast shape at most) while they are summed in,
    and the params' gradients to the end. Only the moments no other one beats
    for every batch size are kept, so `Plan.memory` is a max over a few."""
    moments: list[tuple[int, int]] = []
    live = [0, 0]

    def add(target: list[int], pair: tuple[int, int], sign: int = 1) -> None:
        target[0] += sign * pair[0]
        target[1] += sign * pair[1]

    def bigger(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
        return (max(a[0], b[0]), max(a[1], b[1]))

    sources = {step.node.index for step in forward if step.op is None}
    held_values: set[int] = set()  # op values alive: the backward pass drops these
    for step in forward:
        reused = step.node.inputs[step.reuse] if step.reuse >= 0 else None
        if reused is None:
            add(live, step.node.nbytes)
        if step.op is None:
            continue
        held_values.add(step.node.index)
        moment = list(live)
        add(moment, step.node.scratch)
        for k in step.cut_args:
            add(moment, nodes[step.node.inputs[k]].nbytes)
        moments.append((moment[0], moment[1]))
        for i in step.free:
            if i not in sources:
                held_values.discard(i)
                if i != reused:
                    add(live, nodes[i].nbytes, -1)
    # The loss's adjoint first (backward starts at the loss), then each node's
    # until its step; params' gradients from their step to the end.
    adjoints: dict[int, tuple[int, int]] = {backward[0].node.index: backward[0].node.nbytes} if backward else {}
    held = [sum(p[0] for p in adjoints.values()), sum(p[1] for p in adjoints.values())]
    for step in backward:
        node = step.node
        g = adjoints.pop(node.index, None)
        if g is None or step.op is None:  # unreached; or a param, whose adjoint is its gradient, still held
            continue
        add(held, g, -1)
        moment = [live[0] + held[0] + g[0] + node.scratch[0], live[1] + held[1] + g[1] + node.scratch[1]]
        for k in step.cut_args:
            add(moment, nodes[node.inputs[k]].nbytes)
        for _, i in step.grad_inputs:
            add(moment, bigger(node.nbytes, nodes[i].nbytes))  # the VJP's result, at most in the broadcast shape
            if i not in adjoints:
                adjoints[i] = nodes[i].nbytes
                add(held, nodes[i].nbytes)
        moments.append((moment[0], moment[1]))
        if node.index in held_values:
            held_values.discard(node.index)
            add(live, node.nbytes, -1)
    return _frontier(moments)


def _frontier(moments: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """The moments not beaten by another for every batch size (both figures at most another's)."""
    kept: list[tuple[int, int]] = []
    best_fixed = -1
    for fixed, per in sorted(set(moments), key=lambda m: (-m[1], -m[0])):
        if fixed > best_fixed:
            kept.append((fixed, per))
            best_fixed = fixed
    return tuple(kept)


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
