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
W, B = "wide", "bool"  # wide: uniform in [-5, 5] (erf's every region); bool: a random mask (no gradient)
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
            case((2, 3, 4), axes=(0, 2)), case((3, 4), axes=())],
    "mean": [case((3, 4), axes=(0,)), case((3, 4), axes=(-1,), keepdims=True), case((2, 3, 4)),
             case((2, 3, 4), axes=(1, 2)), case((3, 4), axes=(), keepdims=True)],
    "max": [case((3, 4), axes=(1,)), case((3, 4), axes=(0,), keepdims=True), case((2, 3, 4), axes=(-1,)),
            case((2, 3, 4), axes=(0, 2)), case((2, 3)), case((3, 4), axes=()), case((2, 3, 4), axis=-2)],
    "softmax": [case((3, 4)), case((3, 4), axis=0), case((2, 3, 4), axis=1)],
    "log_softmax": [case((3, 4)), case((2, 3, 4), axis=1)],
    "softmax_cross_entropy": [case((4, 5), Arg((4,), "labels", 5)), case((2, 3, 4), Arg((2, 3), "labels", 4))],
    "binary_cross_entropy": [case((3, 4), Arg((3, 4), U)), case((3, 4), Arg((4,), U))],
    "concat": [case((2, 3), (2, 1), (2, 2), axis=1), case((1, 3), (2, 3), axis=0), case((4,))],
    "slice": [case((4, 6), axis=1, start=1, stop=5, step=2), case((5, 3), axis=0, start=2), case((2, 7), axis=-1, stop=3)],
    "embedding": [case((6, 3), Arg((4,), "indices", 6)), case((5, 2), Arg((2, 3), "indices", 5))],
    # checked with the harness's fixed seed (the mask is then a constant): some elements kept, some dropped
    "dropout": [case((4, 5), rate=0.5), case((2, 3, 4), rate=0.2), case((6,), rate=0.0)],
    # reductions that are not sums over examples (issue 13)
    "min": [case((3, 4), axes=(1,)), case((3, 4), axes=(0,), keepdims=True), case((2, 3, 4)),
            case((2, 3, 4), axes=(0, 2))],
    "logsumexp": [case((3, 4), axes=(1,)), case((3, 4), axes=(-1,), keepdims=True), case((2, 3, 4)),
                  case((2, 3, 4), axes=(0, 2))],
    "var": [case((3, 4), axes=(1,)), case((3, 4), axes=(0,), keepdims=True), case((2, 3, 4)),
            case((2, 3, 4), axes=(1, 2))],
    "std": [case((3, 4), axes=(1,)), case((3, 4), axes=(0,), keepdims=True), case((2, 3, 4)),
            case((2, 3, 4), axes=(0, 2))],
    "argmax": [case((3, 4), axis=1), case((2, 3, 4), axis=0, keepdims=True)],  # forward only: no gradient
    # shape ops (issue 13)
    "stack": [case((2, 3), (2, 3), (2, 3), axis=1), case((3,), (3,), axis=0), case((2, 3), (2, 3), axis=-1)],
    "expand_dims": [case((2, 3), axes=(1,)), case((2, 3), axes=(0, -1))],
    "squeeze": [case((2, 1, 3, 1)), case((2, 1, 3, 1), axes=(1,)), case((1, 3), axes=(0,))],
    "pad": [case((2, 3), (), pad_width=(1, 2, 0, 1)), case((4,), (), pad_width=(0, 3))],
    "flip": [case((2, 3, 4), axes=(1,)), case((2, 3), axes=(0, 1))],
    "tile": [case((2, 3), reps=(2, 1)), case((3,), reps=(2, 2)), case((2, 3), reps=(3,))],
    "broadcast_to": [case((3, 1), shape=(2, 3, 4)), case((4,), shape=(3, 4)), case((), shape=(2,))],
    "einsum": [case((3, 4), (4, 5), subscripts="ij,jk->ik"), case((2, 3), (2, 3), subscripts="ij,ij->i"),
               case((2, 3, 4), (4,), (2,), subscripts="bij,j,b->bi"), case((3, 4), (5,), subscripts="ij,k->k"),
               case((3, 4), subscripts="ij->ji")],
    "take": [case((4, 5), axis=1, indices=(3, 0, 3, -1)), case((5, 3), axis=0, indices=(2,)),
             case((2, 3, 4), axis=-1, indices=(1, 1, 1))],
}

# issue 13: math, comparisons, selection, casts. Ops that pass no gradient
# (comparisons, one_hot, stop_gradient) are checked to give exactly zero.
COMPARE_SHAPES = [case((3, 4), (3, 4)), case((3, 1), (4,)), case((), (2, 3))]
SPECS.update({
    "sin": [case((3, 4))],
    "cos": [case((3, 4))],
    "erf": [case((3, 4)), case(Arg((4, 5), W))],
    "gelu": [case((3, 4)), case(Arg((4, 5), W)), case(Arg((4, 5), W), approximate="tanh")],
    "silu": [case((3, 4)), case(Arg((4, 5), W))],
    "elu": [case(Arg((3, 4), NZ)), case(Arg((5,), NZ), alpha=0.5)],
    "log1p": [case(Arg((3, 4), P)), case(Arg((3, 4), U))],
    "expm1": [case((3, 4))],
    "less": COMPARE_SHAPES,
    "less_equal": COMPARE_SHAPES,
    "greater": COMPARE_SHAPES,
    "greater_equal": COMPARE_SHAPES,
    "equal": COMPARE_SHAPES,
    "not_equal": COMPARE_SHAPES,
    "where": [case(Arg((3, 4), B), (3, 4), (3, 4)), case(Arg((3, 1), B), (4,), (3, 4)),
              case(Arg((4,), B), (), (3, 4))],
    "clip": [case((3, 4), lo=-0.5, hi=0.5), case((3, 4), lo=0.0), case((3, 4), hi=0.3)],
    "take_along_axis": [case((3, 5), Arg((3, 4), "indices", 5), axis=1),
                        case((1, 5), Arg((3, 7), "indices", 5), axis=-1),
                        case((4, 3), Arg((6, 3), "indices", 4), axis=0),
                        case((2, 1, 4), Arg((2, 3, 6), "indices", 4), axis=2)],
    "one_hot": [case(Arg((3,), "labels", 4), n=4), case(Arg((2, 3), "labels", 5), n=5, dtype="float64")],
    "cast": [case((3, 4), dtype="float64"), case((3, 4), dtype="int64"), case((3, 4), dtype="bool")],
    "stop_gradient": [case((3, 4))],
    "pow_tensor": [case(Arg((3, 4), P), (3, 4)), case(Arg((3, 1), P), (4,)), case(Arg((), P), (2, 3))],
})

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
    if arg.domain == W:
        return rng.uniform(-5.0, 5.0, size=arg.shape)
    if arg.domain == B:
        return rng.random(size=arg.shape) < 0.5
    return rng.normal(size=arg.shape)
