"""Sharding: which graphs can be split, how a batch is split, how shard
results are summed.

Shared by the engine, the in-process `local_gradients` and the coordinator,
so all of them compute the same sums in the same order and agree bit for bit.

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

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from .errors import InputError, ShardingError
from .ops import get_op, is_per_example

if TYPE_CHECKING:
    from .program import NodeInfo

SOURCES = ("input", "param", "const")
PER_EXAMPLE = "per-example"
BATCH_REDUCED = "batch-reduced"
BATCH_INDEPENDENT = "batch-independent"


def classify(nodes: Sequence["NodeInfo"], loss_index: int) -> frozenset[tuple[int, int]]:
    """Set every node's `kind` (and `refusal`), and return the edges that carry
    a batch-independent term into a batch-reduced sum (counted on one shard
    only). Raises ShardingError when the loss itself cannot be split."""
    cuts: set[tuple[int, int]] = set()
    for node in nodes:
        if node.op in SOURCES:
            node.kind = PER_EXAMPLE if node.op == "input" else BATCH_INDEPENDENT
            continue
        kinds = [nodes[i].kind for i in node.inputs]
        if is_per_example(node.shape):
            node.kind = PER_EXAMPLE
        elif all(k == BATCH_INDEPENDENT for k in kinds):
            node.kind = BATCH_INDEPENDENT
        else:
            node.kind = BATCH_REDUCED
        node.refusal = next((nodes[i].refusal for i in node.inputs if nodes[i].refusal), "")
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
                            f"{', '.join(repr(nodes[node.inputs[k]].name) for k in batchy)}; the loss "
                            "must be a sum over examples plus batch-independent terms, so a sum of shard "
                            "losses would not equal the whole-batch loss")
        elif op.linear_in == "all":
            cuts.update((node.index, k) for k, kind in enumerate(kinds) if kind == BATCH_INDEPENDENT)
    loss = nodes[loss_index]
    if loss.refusal:
        raise ShardingError(loss.refusal)
    return frozenset(cuts)


# The largest worker capacity the coordinator accepts. Capacities are
# relative speeds (cores, examples/s); the bound keeps the sum of a pool's
# capacities, and `examples * capacity`, far from overflowing a float.
MAX_CAPACITY = 1e6


def shard_bounds(examples: int, capacities: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous [start, stop) slices, sized in proportion to `capacities`.

    Largest-remainder rounding, so sizes add up exactly; shards that would be
    empty are dropped (fewer examples than workers uses fewer workers). The
    result depends only on its arguments: the same pool splits the same
    batch the same way every time.
    """
    if examples < 0:
        raise InputError(f"batch size must be >= 0, got {examples}")
    if not capacities or any(not 0 < c <= MAX_CAPACITY for c in capacities):
        raise InputError(f"capacities must be positive numbers up to {MAX_CAPACITY:g}, got {list(capacities)}")
    total = float(sum(capacities))
    exact = [examples * c / total for c in capacities]
    sizes = [int(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in by_remainder[: examples - sum(sizes)]:
        sizes[i] += 1
    bounds, start = [], 0
    for size in sizes:
        if size:
            bounds.append((start, start + size))
        start += size
    return bounds


class OrderedSum:
    """Sums shard results in shard order, whatever order they arrive in.

    Floating-point addition is not associative, so summing in arrival order
    would make gradients drift from run to run. An early arrival is held
    until its predecessors are in; everything up to the first gap is folded
    into the running total at once, so at most the out-of-order results are
    held, never all of them.
    """

    def __init__(self, shards: int):
        self.shards = shards
        self._next = 0
        self._held: dict[int, tuple[float, dict[str, np.ndarray]]] = {}
        self.loss = 0.0
        self.grads: Optional[dict[str, np.ndarray]] = None

    def add(self, shard: int, loss: float, grads: dict[str, np.ndarray]) -> None:
        if not 0 <= shard < self.shards or shard < self._next or shard in self._held:
            raise ValueError(f"shard {shard} reported twice or out of range")
        self._held[shard] = (loss, grads)
        while self._next in self._held:
            loss, grads = self._held.pop(self._next)
            self.loss += loss
            if self.grads is None:
                self.grads = {name: np.array(value, copy=True) for name, value in grads.items()}
            else:
                for name, value in grads.items():
                    self.grads[name] += value
            self._next += 1

    @property
    def complete(self) -> bool:
        return self._next == self.shards
