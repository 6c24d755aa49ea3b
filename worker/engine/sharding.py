"""How a batch is split into shards and how shard results are summed.

Shared by the in-process `local_gradients` and by the coordinator, so the
two compute the same sums in the same order and agree bit for bit.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .errors import InputError


def shard_bounds(examples: int, capacities: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous [start, stop) slices, sized in proportion to `capacities`.

    Largest-remainder rounding, so sizes add up exactly; shards that would be
    empty are dropped (fewer examples than workers uses fewer workers). The
    result depends only on its arguments: the same pool splits the same
    batch the same way every time.
    """
    if examples < 0:
        raise InputError(f"batch size must be >= 0, got {examples}")
    if not capacities or any(not np.isfinite(c) or c <= 0 for c in capacities):
        raise InputError(f"capacities must be positive numbers, got {list(capacities)}")
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
