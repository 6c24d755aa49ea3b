"""One function per engine op, for the ops that are not Python operators."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from gradpool.worker.engine.errors import GraphError

from .graph import Expr, Operand, _user_origin


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
    return _binary("matmul", a, b)


def transpose(x: Expr, perm: Optional[Sequence[int]] = None) -> Expr:
    return _unary("transpose", x, perm=tuple(perm) if perm is not None else ())


def reshape(x: Expr, shape: Sequence[int]) -> Expr:
    return x.reshape(tuple(shape))


def sum(x: Expr, axis: Union[None, int, Sequence[int]] = None, keepdims: bool = False) -> Expr:  # noqa: A001
    return x.sum(axis, keepdims)


def mean(x: Expr, axis: Union[None, int, Sequence[int]] = None, keepdims: bool = False) -> Expr:
    return x.mean(axis, keepdims)


def max(x: Expr, axis: int = -1, keepdims: bool = False) -> Expr:  # noqa: A001
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


# ---------------------------------------------------------------- convolution, pooling, layer norm

IntOrPair = Union[int, Sequence[int]]


def _ints(value: IntOrPair, n: int, what: str) -> tuple[int, ...]:
    """An int or a sequence of ints as a tuple (PyTorch's convention for stride, padding...);
    the op's shape rule checks the count, so its error carries the user's line."""
    is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)  # noqa: E731
    values = (value,) * n if is_int(value) else tuple(value) if isinstance(value, (tuple, list)) else None
    if values is None or not all(is_int(v) for v in values):
        origin = _user_origin()
        raise GraphError(f"{what} must be an int or {n} ints, got {value!r}" + (f" (at {origin})" if origin else ""))
    return tuple(int(v) for v in values)


def conv2d(x: Expr, w: Operand, stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1) -> Expr:
    """PyTorch's conv2d without bias: x per example (C, H, W), w (out, C, kh, kw) -> (out, OH, OW).
    Add a bias as a param of shape (out, 1, 1)."""
    graph = _expr(x, w).graph
    return graph._add("conv2d", (x, graph._lift(w, _expr(x, w).dtype)), stride=_ints(stride, 2, "stride"),
                      padding=_ints(padding, 2, "padding"), dilation=_ints(dilation, 2, "dilation"))


def conv1d(x: Expr, w: Operand, stride: int = 1, padding: int = 0, dilation: int = 1) -> Expr:
    """PyTorch's conv1d without bias: x per example (C, L), w (out, C, k) -> (out, OL).
    Add a bias as a param of shape (out, 1)."""
    graph = _expr(x, w).graph
    return graph._add("conv1d", (x, graph._lift(w, _expr(x, w).dtype)), stride=_ints(stride, 1, "stride"),
                      padding=_ints(padding, 1, "padding"), dilation=_ints(dilation, 1, "dilation"))


def max_pool2d(x: Expr, kernel: IntOrPair, stride: Optional[IntOrPair] = None, padding: IntOrPair = 0) -> Expr:
    """Max over windows of the last two axes; stride defaults to the kernel, padding is -inf.
    A window's gradient goes to its first maximal element, as in PyTorch."""
    return _unary("max_pool2d", x, kernel=_ints(kernel, 2, "kernel"),
                  stride=_ints(stride, 2, "stride") if stride is not None else (),
                  padding=_ints(padding, 2, "padding"))


def avg_pool2d(x: Expr, kernel: IntOrPair, stride: Optional[IntOrPair] = None, padding: IntOrPair = 0) -> Expr:
    """Mean over windows of the last two axes; zero padding counts in the mean (PyTorch's default)."""
    return _unary("avg_pool2d", x, kernel=_ints(kernel, 2, "kernel"),
                  stride=_ints(stride, 2, "stride") if stride is not None else (),
                  padding=_ints(padding, 2, "padding"))


def layer_norm(x: Expr, axes: Union[int, Sequence[int]] = -1, eps: float = 1e-5) -> Expr:
    """Normalize each example over `axes` (not the batch axis) to mean 0, variance 1; no affine:
    multiply by and add params for PyTorch's elementwise_affine."""
    return _unary("layer_norm", x, axes=_ints(axes, 1, "axes") if isinstance(axes, (int, np.integer))
                  else tuple(int(a) for a in axes), eps=float(eps))
