"""Per-op gradient-check specs, in the spirit of JAX's LAX_GRAD_OPS.

Every entry of the engine's op registry must have a spec here: the gradient
check walks the registry, so an op added without one fails the suite. Each
case lists its arguments (shape and input domain) and attributes; shapes
exercise numpy broadcasting wherever the op broadcasts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Arg:
    shape: tuple[int, ...]
    # real: N(0, 1); positive: [0.5, 2]; nonzero: |x| in [0.3, 2] (away from kinks);
    # unit: (0.1, 0.9); labels/indices: integers in [0, n) (no gradient).
    domain: str = "real"
    n: int = 0


@dataclass(frozen=True)
class Case:
    args: tuple[Arg, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


def case(*args: Any, **attrs: Any) -> Case:
    return Case(tuple(a if isinstance(a, Arg) else Arg(a) for a in args), attrs)


R, P, NZ, U = "real", "positive", "nonzero", "unit"
BINARY_SHAPES = [case((3, 4), (3, 4)), case((3, 1), (4,)), case((), (2, 3)), case((2, 1, 3), (4, 1))]

SPECS: dict[str, list[Case]] = {
    "add": BINARY_SHAPES,
    "sub": BINARY_SHAPES,
    "mul": BINARY_SHAPES,
    "div": [case((3, 4), Arg((3, 4), NZ)), case((3, 1), Arg((4,), NZ)), case((), Arg((2, 3), NZ))],
    "maximum": BINARY_SHAPES,
    "minimum": BINARY_SHAPES,
    "neg": [case((3, 4)), case(())],
    "pow": [case(Arg((3, 4), P), exponent=2.5), case(Arg((5,), P), exponent=-1.5), case((2, 3), exponent=3.0)],
    "exp": [case((3, 4))],
    "log": [case(Arg((3, 4), P))],
    "sqrt": [case(Arg((3, 4), P))],
    "square": [case((3, 4))],
    "abs": [case(Arg((3, 4), NZ))],
    "sigmoid": [case((3, 4))],
    "tanh": [case((3, 4))],
    "relu": [case(Arg((3, 4), NZ))],
    "leaky_relu": [case(Arg((3, 4), NZ)), case(Arg((5,), NZ), alpha=0.2)],
    "softplus": [case((3, 4))],
    "matmul": [case((3, 4), (4, 2)), case((2, 3, 4), (4, 5)), case((2, 3, 4), (2, 4, 5)),
               case((1, 3, 4), (2, 4, 2)), case((3, 4), (2, 4, 2))],
    "transpose": [case((2, 3, 4)), case((2, 3, 4), perm=(1, 0, 2)), case((3, 5), perm=(1, 0))],
    "reshape": [case((2, 6), shape=(3, 4)), case((2, 3, 2), shape=(12,)), case((4,), shape=(2, 1, 2))],
    "sum": [case((3, 4), axes=(0,)), case((3, 4), axes=(1,), keepdims=True), case((2, 3, 4)),
            case((2, 3, 4), axes=(0, 2))],
    "mean": [case((3, 4), axes=(0,)), case((3, 4), axes=(-1,), keepdims=True), case((2, 3, 4)),
             case((2, 3, 4), axes=(1, 2))],
    "max": [case((3, 4), axis=1), case((3, 4), axis=0, keepdims=True), case((2, 3, 4), axis=-1)],
    "softmax": [case((3, 4)), case((3, 4), axis=0), case((2, 3, 4), axis=1)],
    "log_softmax": [case((3, 4)), case((2, 3, 4), axis=1)],
    "softmax_cross_entropy": [case((4, 5), Arg((4,), "labels", 5)), case((2, 3, 4), Arg((2, 3), "labels", 4))],
    "binary_cross_entropy": [case((3, 4), Arg((3, 4), U)), case((3, 4), Arg((4,), U))],
    "concat": [case((2, 3), (2, 1), (2, 2), axis=1), case((1, 3), (2, 3), axis=0), case((4,))],
    "slice": [case((4, 6), axis=1, start=1, stop=5, step=2), case((5, 3), axis=0, start=2), case((2, 7), axis=-1, stop=3)],
    "embedding": [case((6, 3), Arg((4,), "indices", 6)), case((5, 2), Arg((2, 3), "indices", 5))],
}

# Convolution, pooling, layer norm (worker/engine/ops_nn.py): stride 2, padding, dilation, non-square
# kernels, one and several channels; pools with overlapping windows and padding.
SPECS.update({
    "conv2d": [case((2, 1, 5, 5), (3, 1, 3, 3)),
               case((2, 2, 6, 5), (3, 2, 2, 3), stride=(2,), padding=(1,)),
               case((1, 3, 7, 6), (2, 3, 3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
               case((2, 2, 4, 4), (1, 2, 1, 1))],
    "conv1d": [case((2, 1, 7), (3, 1, 3)),
               case((2, 3, 9), (2, 3, 2), stride=(2,), padding=(1,), dilation=(2,))],
    "max_pool2d": [case((2, 2, 4, 4), kernel=(2,)),
                   case((1, 2, 5, 6), kernel=(3, 2), stride=(2, 1), padding=(1, 1)),
                   case((2, 5, 5), kernel=(3,), stride=(1,))],
    "avg_pool2d": [case((2, 2, 4, 4), kernel=(2,)),
                   case((1, 2, 5, 6), kernel=(3, 2), stride=(2, 1), padding=(1, 1)),
                   case((2, 5, 5), kernel=(3,), stride=(1,))],
    "layer_norm": [case((3, 4)), case((2, 3, 4), axes=(1, 2)), case((2, 3, 4), axes=(-2,), eps=0.1)],
})


def sample(arg: Arg, rng: np.random.Generator) -> np.ndarray:
    if arg.domain in ("labels", "indices"):
        return rng.integers(0, arg.n, size=arg.shape).astype(np.int64)
    if arg.domain == P:
        return rng.uniform(0.5, 2.0, size=arg.shape)
    if arg.domain == NZ:
        return rng.uniform(0.3, 2.0, size=arg.shape) * rng.choice([-1.0, 1.0], size=arg.shape)
    if arg.domain == U:
        return rng.uniform(0.1, 0.9, size=arg.shape)
    return rng.normal(size=arg.shape)
