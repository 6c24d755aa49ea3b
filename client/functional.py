"""One function per engine op, for the ops that are not Python operators."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from gradpool.worker.engine.errors import GraphError

from .graph import Expr, Operand


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


def power(x: Expr, exponent: Operand) -> Expr:
    """x ** exponent: a constant number (op pow) or an Expr or array (op pow_tensor)."""
    if isinstance(exponent, (Expr, np.ndarray)):
        return _expr(x) ** exponent
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


# ---------------------------------------------------------------- math, comparisons, selection (issue 13)

def sin(x: Expr) -> Expr:
    return _unary("sin", x)


def cos(x: Expr) -> Expr:
    return _unary("cos", x)


def erf(x: Expr) -> Expr:
    return _unary("erf", x)


def gelu(x: Expr, approximate: str = "none") -> Expr:
    """x Phi(x), exact via erf ("none") or torch's tanh form ("tanh"), as torch.nn.functional.gelu."""
    return _unary("gelu", x, approximate=str(approximate))


def silu(x: Expr) -> Expr:
    return _unary("silu", x)


def elu(x: Expr, alpha: float = 1.0) -> Expr:
    return _unary("elu", x, alpha=float(alpha))


def log1p(x: Expr) -> Expr:
    return _unary("log1p", x)


def expm1(x: Expr) -> Expr:
    return _unary("expm1", x)


def _compare(op: str, a: Operand, b: Operand) -> Expr:
    anchor = _expr(a, b)
    return anchor.graph._add(op, (anchor.graph._lift_exact(a, anchor.dtype), anchor.graph._lift_exact(b, anchor.dtype)))


def less(a: Operand, b: Operand) -> Expr:
    """a < b as a bool value: no gradient, use it as a `where` condition."""
    return _compare("less", a, b)


def less_equal(a: Operand, b: Operand) -> Expr:
    return _compare("less_equal", a, b)


def greater(a: Operand, b: Operand) -> Expr:
    return _compare("greater", a, b)


def greater_equal(a: Operand, b: Operand) -> Expr:
    return _compare("greater_equal", a, b)


def equal(a: Operand, b: Operand) -> Expr:
    return _compare("equal", a, b)


def not_equal(a: Operand, b: Operand) -> Expr:
    return _compare("not_equal", a, b)


def where(cond: Expr, a: Operand, b: Operand) -> Expr:
    """a where cond holds, else b (broadcasting); the gradient follows the branch taken.
    Numbers and arrays among a and b become consts of the other branch's dtype."""
    if not isinstance(cond, Expr) or cond.dtype != np.bool_:
        raise GraphError(f"where needs a bool expression as condition (a comparison such as x > 0), got {cond!r}")
    graph = cond.graph
    anchor = next((v for v in (a, b) if isinstance(v, Expr)), None)
    dtype = anchor.dtype if anchor is not None else np.dtype(np.float32)
    return graph._add("where", (cond, graph._lift_exact(a, dtype), graph._lift_exact(b, dtype)))


def clip(x: Expr, lo: Optional[float] = None, hi: Optional[float] = None) -> Expr:
    """x limited to [lo, hi] (constants; None leaves that side open), as numpy.clip;
    the gradient is 1 where lo <= x <= hi, bounds included, as torch.clamp."""
    attrs = {}
    if lo is not None:
        attrs["lo"] = float(lo)
    if hi is not None:
        attrs["hi"] = float(hi)
    return _unary("clip", x, **attrs)


def take_along_axis(x: Expr, indices: Expr, axis: int = -1) -> Expr:
    """numpy.take_along_axis (torch.gather): integer `indices` in [0, n) pick along
    `axis` (not the batch axis of x); repeated picks add up in the gradient."""
    return _expr(x).graph._add("take_along_axis", (x, indices), axis=int(axis))


def one_hot(labels: Expr, n: int, dtype: str = "float32") -> Expr:
    """Integer labels in [0, n) as one-hot rows (a new last axis of n); no gradient."""
    return _unary("one_hot", labels, n=int(n), dtype=_dtype_name(dtype))


def cast(x: Expr, dtype: str) -> Expr:
    """x in another dtype; float to float passes the gradient back, any other cast takes none."""
    return _unary("cast", x, dtype=_dtype_name(dtype))


def _dtype_name(dtype: object) -> str:
    """"float32" from np.float32, "float32" or np.dtype; anything else as given, for the op to refuse by name."""
    try:
        return str(np.dtype(dtype))  # type: ignore[call-overload]
    except TypeError:
        return str(dtype)


def stop_gradient(x: Expr) -> Expr:
    """x unchanged, treated as a constant by differentiation."""
    return _unary("stop_gradient", x)
