"""Property tests: any split of any batch gives the whole-batch gradient."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gradpool.worker.engine import OrderedSum, shard_bounds

from models import batch_for, params_for, softmax_mlp

GRAPH = softmax_mlp()
PARAMS = params_for(GRAPH)


@settings(max_examples=40, deadline=None)
@given(examples=st.integers(0, 200), capacities=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=8))
def test_shard_bounds_partition_the_batch(examples: int, capacities: list[float]) -> None:
    bounds = shard_bounds(examples, capacities)
    sizes = [b - a for a, b in bounds]
    assert sum(sizes) == examples and all(s > 0 for s in sizes)
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))
    assert not bounds or bounds[0][0] == 0


@settings(max_examples=30, deadline=None)
@given(examples=st.integers(1, 40), capacities=st.lists(st.floats(0.1, 10.0), min_size=1, max_size=6),
       seed=st.integers(0, 2**16))
def test_any_capacity_split_sums_to_the_whole_batch_gradient(examples: int, capacities: list[float],
                                                              seed: int) -> None:
    batch = batch_for(GRAPH, examples, seed=seed)
    program = GRAPH.program()
    whole = program.run(PARAMS, batch)
    bounds = shard_bounds(examples, capacities)
    total = OrderedSum(len(bounds))
    for shard in reversed(range(len(bounds))):  # arrive in the worst order
        start, stop = bounds[shard]
        part = program.run(PARAMS, {k: v[start:stop] for k, v in batch.items()}, global_batch=examples,
                           include_batch_independent=shard == 0)
        total.add(shard, part.loss, part.grads)
    assert np.isclose(total.loss, whole.loss, rtol=1e-10, atol=1e-12)
    for name, grad in whole.grads.items():
        np.testing.assert_allclose(total.grads[name], grad, rtol=1e-10, atol=1e-12)
