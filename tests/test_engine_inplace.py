"""The engine's buffer reuse: values freed once no VJP reads them, and ops
writing their output into a dead temporary (Op.forward_into). Neither may
change a bit of any result, nor ever write into a caller's array or a const."""

from __future__ import annotations

import numpy as np
import pytest

import gradpool as gp
from gradpool.worker.engine import REGISTRY
from gradpool.worker.engine.ops import VJP_READS
from gradpool.worker.engine.program import Program

from op_specs import SPECS, Case, sample
from models import op_graph

SEED = 20240607
CASES = [(op, i, c) for op, cases in sorted(SPECS.items()) for i, c in enumerate(cases) if REGISTRY[op].vjp is not None]


def frozen(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copies that refuse writes, so an engine that wrote into a caller's array would raise."""
    out = {}
    for name, value in arrays.items():
        value = np.array(value)
        value.flags.writeable = False
        out[name] = value
    return out


def run(graph: gp.Graph, params: dict[str, np.ndarray], batch: dict[str, np.ndarray], reuse: bool,
        **kwargs) -> tuple[Program, gp.worker.engine.program.RunResult]:
    program = Program(graph.to_proto())
    program.reuse_buffers = reuse
    consts = {node.name: node.value.copy() for node in program.nodes if node.value is not None}
    result = program.run(frozen(params), frozen(batch), **kwargs)
    for node in program.nodes:  # consts belong to the program and serve every run
        if node.value is not None:
            assert node.value.tobytes() == consts[node.name].tobytes(), f"const {node.name} was written to"
    return program, result


def same_bits(a: gp.worker.engine.program.RunResult, b: gp.worker.engine.program.RunResult) -> None:
    assert np.float64(a.loss).tobytes() == np.float64(b.loss).tobytes()
    assert a.grads.keys() == b.grads.keys()
    for name in a.grads:
        assert a.grads[name].dtype == b.grads[name].dtype
        assert a.grads[name].tobytes() == b.grads[name].tobytes(), name
    for name in a.outputs:
        assert a.outputs[name].tobytes() == b.outputs[name].tobytes(), name


def test_every_op_declares_what_its_vjp_reads() -> None:
    for op in REGISTRY.values():
        assert op.vjp_reads in VJP_READS
        assert op.forward_into is None or op.fresh, op.name


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op,index,spec", CASES, ids=[f"{op}-{i}" for op, i, _ in CASES])
def test_reusing_buffers_changes_no_bit_and_writes_no_callers_array(op: str, index: int, spec: Case,
                                                                      dtype: str) -> None:
    """Every op of the registry, its arguments engine temporaries: the run that writes into
    them (and into the op's output) gives bitwise the run into new arrays, the params
    (read-only here) untouched. Ops that say their VJP reads less get None for the rest,
    so a rule that read more would fail here."""
    graph, params = op_graph(op, spec, seed=index, dtype=dtype, temporaries=True)
    program, reused = run(graph, params, {}, reuse=True, seed=SEED)
    _, fresh = run(graph, params, {}, reuse=False, seed=SEED)
    same_bits(reused, fresh)
    node = next(n for n in program.nodes if n.op == op)
    step = next(s for s in program._plan((), frozenset(), True).forward if s.node is node)
    temporaries = [k for k, i in enumerate(node.inputs) if program.nodes[i].op == "mul"
                   and program.nodes[i].shape == node.shape and program.nodes[i].dtype == node.dtype]
    # A gradient run keeps what the op's VJP reads: then its inputs are not dead.
    if REGISTRY[op].forward_into is not None and REGISTRY[op].vjp_reads in ("output", "none") and temporaries:
        assert step.reuse in temporaries, "the op had a dead temporary of its output's shape to write into"
    else:
        assert step.reuse == -1


IN_PLACE = [(op, i, c) for op, cases in sorted(SPECS.items()) for i, c in enumerate(cases)
            if REGISTRY[op].forward_into is not None and len({a.shape for a in c.args}) == 1]


def test_every_op_that_writes_in_place_is_checked_forward() -> None:
    assert {op for op, _, _ in IN_PLACE} == {op.name for op in REGISTRY.values() if op.forward_into is not None}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op,index,spec", IN_PLACE, ids=[f"{op}-{i}" for op, i, _ in IN_PLACE])
def test_forward_into_gives_the_forwards_bits(op: str, index: int, spec: Case, dtype: str) -> None:
    """A forward-only run keeps nothing for a backward pass, so every op with forward_into
    writes into its temporary argument: bitwise what its forward gives, on 1000 rows of
    each argument (long enough for numpy's SIMD loops and their tails), inputs untouched."""
    rng = np.random.default_rng(index)
    graph = gp.Graph(op)
    args, batch = [], {}
    for k, arg in enumerate(spec.args):
        x = graph.input(f"x{k}", arg.shape, dtype=dtype)
        batch[f"x{k}"] = np.stack([sample(arg, rng) for _ in range(1000)]).astype(dtype)
        args.append(x * graph.const(np.ones(arg.shape, dtype)))
    out = graph._add(op, args, **spec.attrs)
    graph.set_loss(out.sum())
    program, reused = run(graph, {}, batch, reuse=True, gradients=False, outputs=[out.name])
    _, fresh = run(graph, {}, batch, reuse=False, gradients=False, outputs=[out.name])
    assert reused.outputs[out.name].tobytes() == fresh.outputs[out.name].tobytes()
    step = next(s for s in program._plan((out.index,), frozenset(), False).forward if s.node.name == out.name)
    assert step.reuse == 0


def mlp(activation: str, sizes: tuple[int, ...] = (12, 16, 16, 5)) -> gp.Graph:
    g = gp.Graph(f"{activation}_mlp")
    x = g.input("x", (sizes[0],))
    y = g.input("y", (), dtype="int64")
    h = x
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        h = h @ g.param(f"W{i}", (fan_in, fan_out)) + g.param(f"b{i}", (fan_out,))
        if i < len(sizes) - 2:
            h = getattr(gp, activation)(h)
    g.set_loss(gp.softmax_cross_entropy(h, y).sum())
    return g


def mlp_data(examples: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(examples, 12)).astype(np.float32)
    x[::3, ::2] = 0  # relu at its kink and -0 on the way
    return {"x": x, "y": rng.integers(0, 5, size=examples)}


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_an_mlp_runs_in_place_with_the_same_bits(activation: str) -> None:
    """The bias add and the activation write into the matmul's output, as hand-written
    numpy does; loss and gradients bitwise as into new arrays, sharded or not."""
    graph = mlp(activation)
    params, batch = graph.init_params(3), mlp_data(37)
    program, reused = run(graph, params, batch, reuse=True)
    _, fresh = run(graph, params, batch, reuse=False)
    same_bits(reused, fresh)
    plan = program._plan((), frozenset(), True)
    in_place = [s.node.op for s in plan.forward if s.reuse >= 0]
    assert in_place == ["add", activation, "add", activation, "add"]
    loss, grads = gp.local_gradients(graph, frozen(params), frozen(batch), shards=3)
    want_loss, want = gp.local_gradients(graph, params, batch, shards=3)
    assert loss == want_loss and all(grads[k].tobytes() == want[k].tobytes() for k in want)


def test_the_plan_keeps_only_what_a_vjp_reads() -> None:
    """matmul's VJP reads its inputs, add's nothing, relu's its output: so the matmul's and
    the add's values are dropped in the forward pass (and written over), the relu's kept."""
    graph = mlp("relu")
    program = Program(graph.to_proto())
    plan = program._plan((), frozenset(), True)
    freed = {i for s in plan.forward for i in s.free}
    ops = {n.index: n.op for n in program.nodes}
    assert {ops[i] for i in freed if ops[i] not in ("input", "param")} == {"matmul", "add"}
    assert not any(ops[i] == "relu" for i in freed)


def test_forward_only_outputs_are_not_written_over() -> None:
    """A requested output is read after the run: no later step may take its buffer."""
    g = gp.Graph("outputs")
    x = g.input("x", (4,))
    w = g.param("w", (4,))
    z = x * w
    h = gp.relu(z)  # would write into z, were z not an output
    g.set_loss(h.sum())
    program = Program(g.to_proto())
    batch = {"x": np.arange(-6, 6, dtype=np.float32).reshape(3, 4)}
    params = {"w": np.ones(4, np.float32)}
    result = program.run(frozen(params), frozen(batch), gradients=False, outputs=[z.name, h.name])
    np.testing.assert_array_equal(result.outputs[z.name], batch["x"])
    np.testing.assert_array_equal(result.outputs[h.name], np.maximum(batch["x"], 0))
    _, alone = run(g, params, batch, reuse=True, gradients=False, outputs=[h.name])
    assert alone.outputs[h.name].tobytes() == result.outputs[h.name].tobytes()


def test_a_value_read_twice_is_not_written_over() -> None:
    """t feeds both relu and the later add: relu may not write into t."""
    g = gp.Graph("twice")
    x = g.input("x", (4,))
    w = g.param("w", (4,))
    t = x * w
    g.set_loss((gp.relu(t) + t).sum())
    program = Program(g.to_proto())
    assert all(s.reuse == -1 or s.node.op == "add" for s in program._plan((), frozenset(), True).forward)
    batch = {"x": np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)}
    params = {"w": np.full(4, 1.5, np.float32)}
    result = program.run(frozen(params), frozen(batch))
    t_value = batch["x"] * params["w"]
    assert result.loss == pytest.approx(float((np.maximum(t_value, 0) + t_value).sum()), rel=1e-6)


def test_the_memory_estimate_bounds_what_a_run_allocates() -> None:
    """tracemalloc sees numpy's buffers: the run's peak stays within the plan's static
    estimate (which also counts the inputs and params, allocated before)."""
    import tracemalloc
    graph = mlp("relu", sizes=(64, 256, 256, 10))
    program = Program(graph.to_proto())
    params = graph.init_params(0)
    rng = np.random.default_rng(1)
    examples = 512
    batch = {"x": rng.normal(size=(examples, 64)).astype(np.float32), "y": rng.integers(0, 10, size=examples)}
    program.run(params, batch)  # plans and caches made outside the measurement
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        program.run(params, batch)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    estimate = program._plan((), frozenset(), True).memory(examples)
    assert peak <= estimate, (peak, estimate)
