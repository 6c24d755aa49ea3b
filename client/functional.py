"""One function per engine op, for the ops that are not Python operators."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from gradpool.worker.engine.errors import GraphError

from .graph import Expr, Operand, _matmul, _take


def _expr(x: Operand, *others: Operand) -> Expr:
    for candidate in (x, *others):
        if isinstance(candidate, Expr):
            return candidate
    raise GraphError("at least one argument must be a graph expression")


def _unary(op: str, x: Expr, **attrs) -> Expr:
    return _expr(x).graph._add(op, (x,), **attrs)


def sigmoid(x: Expr) -> Expr:
    return _unary("sigmoid", x)


def tanh(x: Expr) -> Expr:
    return _unary("tanh", x)


def relu(x: Expr) -> Expr:
    return _unary("relu", x)


def leaky_relu(x: Expr, alpha: float = 0.01) -> Expr:
    return _unary("leaky_relu", x, alpha=float(alpha))


def softplus(x: Expr) -> Expr:
    return _unary("softplus", x)


def exp(x: Expr) -> Expr:
    return _unary("exp", x)


def log(x: Expr) -> Expr:
    return _unary("log", x)


def sqrt(x: Expr) -> Expr:
    return _unary("sqrt", x)


def square(x: Expr) -> Expr:
    return _unary("square", x)


def abs(x: Expr) -> Expr:  # noqa: A001 - mirrors numpy's name
    return _unary("abs", x)


def power(x: Expr, exponent: float) -> Expr:
    return _unary("pow", x, exponent=float(exponent))


def _binary(op: str, a: Operand, b: Operand) -> Expr:
    anchor = _expr(a, b)
    return anchor.graph._add(op, (anchor.graph._lift(a, anchor.dtype), anchor.graph._lift(b, anchor.dtype)))


def maximum(a: Operand, b: Operand) -> Expr:
    return _binary("maximum", a, b)


def minimum(a: Operand, b: Operand) -> Expr:
    return _binary("minimum", a, b)


def matmul(a: Operand, b: Operand) -> Expr:
    """numpy's matmul, 1-D operands included (the batch axis is never contracted)."""
    anchor = _expr(a, b)
    return _matmul(anchor.graph._lift(a, anchor.dtype), anchor.graph._lift(b, anchor.dtype))


def transpose(x: Expr, perm: Optional[Sequence[int]] = None) -> Expr:
    return _unary("transpose", x, perm=tuple(perm) if perm is not None else ())


def reshape(x: Expr, shape: Sequence[int]) -> Expr:
    return x.reshape(tuple(shape))


def sum(x: Expr, axis: Union[None, int, Sequence[int]] = None, keepdims: bool = False) -> Expr:  # noqa: A001
    return x.sum(axis, keepdims)


def mean(x: Expr, axis: Union[None, int, Sequence[int]] = None, keepdims: bool = False) -> Expr:
    return x.mean(axis, keepdims)


def max(x: Expr, axis: Union[None, int, Sequence[int]] = None, keepdims: bool = False) -> Expr:  # noqa: A001
    return x.max(axis, keepdims)


def softmax(x: Expr, axis: int = -1) -> Expr:
    return _unary("softmax", x, axis=axis)


def log_softmax(x: Expr, axis: int = -1) -> Expr:
    return _unary("log_softmax", x, axis=axis)


def softmax_cross_entropy(logits: Expr, labels: Expr) -> Expr:
    """Per-example -log softmax(logits)[label]; average it with .mean() for the loss."""
    return _expr(logits).graph._add("softmax_cross_entropy", (logits, labels))


def binary_cross_entropy(logits: Expr, targets: Operand) -> Expr:
    """Elementwise BCE from logits (stable), targets in [0, 1]."""
    graph = _expr(logits).graph
    return graph._add("binary_cross_entropy", (logits, graph._lift(targets, logits.dtype)))


def concat(xs: Sequence[Expr], axis: int = -1) -> Expr:
    if not xs:
        raise GraphError("concat needs at least one expression")
    return _expr(*xs).graph._add("concat", tuple(xs), axis=axis)


def slice(x: Expr, axis: int, start: int = 0, stop: Optional[int] = None, step: int = 1) -> Expr:  # noqa: A001
    attrs = {"axis": axis, "start": start, "step": step}
    if stop is not None:
        attrs["stop"] = stop
    return _unary("slice", x, **attrs)


def embedding(table: Expr, indices: Expr) -> Expr:
    """Rows of `table` (a param) picked by integer `indices` (an input)."""
    return _expr(table).graph._add("embedding", (table, indices))


def take(x: Expr, indices: Any, axis: Optional[int] = None) -> Expr:
    """np.take with constant integer indices (a list or array, any shape; negative
    ones count from the end, repeats allowed) along an axis other than the batch axis."""
    return _take(x, indices, axis)
