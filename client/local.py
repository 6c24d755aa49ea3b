"""The service's computation, in this process: the reference the service must match."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from gradpool.worker.engine import OrderedSum, Program, shard_bounds
from gradpool.worker.engine.errors import InputError

from .data import DatasetRows
from .graph import Graph

Arrays = Mapping[str, np.ndarray]


def prepare_arrays(graph: Graph, arrays: Mapping[str, object], what: str) -> dict[str, np.ndarray]:
    """Arrays in the graph's declared dtypes, where that cast loses no kind.

    float64 data into a float32 model is cast; float labels into an integer
    input are refused (that is almost always a bug in the caller).
    """
    declared = graph.params if what == "param" else graph.inputs
    if not isinstance(arrays, Mapping):
        raise InputError(f"{what}s must be a dict of name -> numpy array, got {type(arrays).__name__}")
    out = {}
    for name, value in arrays.items():
        array = np.asarray(value)
        if name in declared:
            target = declared[name][1]
            if array.dtype != target:
                if not np.can_cast(array.dtype, target, casting="same_kind"):
                    raise InputError(f"{what} {name!r} is {array.dtype}, but the graph declares {target}")
                array = array.astype(target)
        out[name] = array
    return out


def check_rows(graph: Graph, rows: DatasetRows, required: Optional[set[str]] = None) -> int:
    """Rows of a dataset fit the graph: its arrays hold what the graph takes
    (names, dtypes, row shapes), and the chosen rows' labels and indices are
    in range. The same check, and words, for every backend; returns the
    number of examples."""
    signature = graph.program().signature
    arrays = rows.dataset.arrays
    signature.check_dataset({name: (a.dtype.newbyteorder("="), a.shape) for name, a in arrays.items()},
                            rows.dataset.dataset_id[:12], required)
    if not len(rows):
        raise InputError("the batch is empty: send at least one example")
    signature.check_index_ranges(rows.gather({limit.input for limit in signature.index_limits} & set(arrays)))
    return len(rows)


def checked_arrays(graph: Graph, params: Mapping[str, object], batch: "Mapping[str, object] | DatasetRows",
                   outputs: Optional[Sequence[str]] = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Params and batch cast to the graph's dtypes and checked against its
    signature, before anything runs or is sent: every backend raises the
    same `InputError` with the same message for the same mistake.

    With `outputs` (forward only), just the params and inputs they need. A
    batch given as `DatasetRows` is gathered here.
    """
    program = graph.program()
    needed_inputs: Optional[set[str]] = None
    needed_params: Optional[set[str]] = None
    if outputs is not None:
        program.check_outputs(outputs)
        needed_inputs, needed_params = program.sources_for(outputs)
    if isinstance(batch, DatasetRows):
        check_rows(graph, batch, needed_inputs)
        batch = batch.gather(set(program.inputs if needed_inputs is None else needed_inputs))
    params, batch = prepare_arrays(graph, params, "param"), prepare_arrays(graph, batch, "input")
    examples = program.signature.check_arrays(batch, "input", needed_inputs)
    program.signature.check_arrays(params, "param", needed_params)
    program.signature.check_index_ranges(batch)
    return params, batch, examples


def local_gradients(graph: Graph, params: Arrays, batch: "Arrays | DatasetRows",
                    shards: int = 1, *, seed: Optional[int] = None) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and parameter gradients of the whole batch, computed as the workers do.

    With `shards` > 1 the batch is cut into that many contiguous pieces (empty
    ones skipped), each run with the global batch size, its first example's
    global index and the batch-independent terms on the first piece only,
    and the results summed in shard order: the same arithmetic as the
    service. `seed` (an int in [0, 2^64)) keys random ops such as dropout;
    a graph with one needs it.
    """
    if not isinstance(shards, int) or shards < 1:
        raise InputError(f"shards must be a positive integer, got {shards!r}")
    program: Program = graph.program()
    seed = program.check_seed(seed)
    params, batch, examples = checked_arrays(graph, params, batch)
    bounds = shard_bounds(examples, [1.0] * shards) or [(0, examples)]
    total = OrderedSum(len(bounds))
    for shard, (start, stop) in enumerate(bounds):
        piece = {name: value[start:stop] for name, value in batch.items()}
        result = program.run(params, piece, global_batch=examples, include_batch_independent=shard == 0,
                             seed=seed, example_offset=start)
        total.add(shard, result.loss, result.grads)
    assert total.grads is not None
    return total.loss, total.grads


def local_forward(graph: Graph, params: Arrays, batch: "Arrays | DatasetRows",
                  outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """Values of per-example nodes (predictions) for a batch, forward only
    (dropout passes its input through)."""
    outputs = [outputs] if isinstance(outputs, str) else list(outputs)
    params, batch, _ = checked_arrays(graph, params, batch, outputs)
    return graph.program().run(params, batch, gradients=False, outputs=outputs).outputs
