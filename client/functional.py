"""One function per engine op, for the ops that are not Python operators."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np

from gradpool.worker.engine.errors import GraphError

from .graph import Expr, Operand, _matmul, _take, _user_origin


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


def dropout(x: Expr, rate: float) -> Expr:
    """Inverted dropout, as torch's: while computing gradients each element is
    zeroed with probability `rate` (in [0, 1)) and the others scaled by
    1 / (1 - rate); forward-only evaluation passes `x` through. The mask is
    keyed by the request's seed, this node's name and each example's index in
    the whole batch, so gradients need a seed (`seed=` on local_gradients and
    Client.gradients; the Trainer derives one per step) and every sharding
    gives the same bits."""
    return _unary("dropout", x, rate=float(rate))


# ---------------------------------------------------------------- reductions: min, logsumexp, var, std, argmax
# Axes index the full array: axis 0 of a per-example value is the batch axis,
# over which none of these is separable (they are refused there).

def min(x: Expr, axis: Union[None, int, Sequence[int]] = None, keepdims: bool = False) -> Expr:  # noqa: A001
    return x.min(axis, keepdims)


def logsumexp(x: Expr, axis: Union[None, int, Sequence[int]] = None, keepdims: bool = False) -> Expr:
    """log(sum(exp(x))) computed without overflow; its gradient is softmax(x)."""
    return _unary("logsumexp", x, axes=_reduce_axes(x, axis), keepdims=keepdims)


def var(x: Expr, axis: Union[None, int, Sequence[int]] = None, keepdims: bool = False) -> Expr:
    return x.var(axis, keepdims)


def std(x: Expr, axis: Union[None, int, Sequence[int]] = None, keepdims: bool = False) -> Expr:
    return x.std(axis, keepdims)


def argmax(x: Expr, axis: Optional[int] = None, keepdims: bool = False) -> Expr:
    return x.argmax(axis, keepdims)


def _reduce_axes(x: Expr, axis: Union[None, int, Sequence[int]]) -> tuple[int, ...]:
    from .graph import _axes
    return _axes(axis, x.ndim)


# ---------------------------------------------------------------- shape ops
# Axes count the batch axis as axis 0; sizes (reps, target shapes, pad widths)
# describe one example of a per-example value, the batch axis implicit.

def stack(xs: Sequence[Expr], axis: int) -> Expr:
    """Join equal shapes along a new axis; for per-example values axis >= 1 (axis 0 is the batch axis)."""
    if not xs:
        raise _refused("stack([])", "stack needs at least one expression")
    return _expr(*xs).graph._add("stack", tuple(xs), axis=int(axis))


def expand_dims(x: Expr, axis: Union[int, Sequence[int]]) -> Expr:
    return _unary("expand_dims", x, axes=_int_tuple(axis))


def squeeze(x: Expr, axis: Union[None, int, Sequence[int]] = None) -> Expr:
    return x.squeeze(axis)


def pad(x: Expr, pad_width: Union[int, Sequence[int], Sequence[Sequence[int]]], value: Operand = 0.0) -> Expr:
    """Constant padding, numpy's pad_width forms (n, (before, after), or one pair per axis) over the axes
    of one example: the batch axis is never padded. `value` may be a number or a scalar expression."""
    graph = _expr(x).graph
    inner = x.ndim - 1 if x.shape[:1] == (None,) else x.ndim
    try:
        pairs = np.broadcast_to(np.asarray(pad_width, dtype=np.int64), (inner, 2))
    except ValueError:
        raise _refused(f"pad({x!r})", f"pad_width {pad_width!r} does not give a (before, after) pair for each "
                                      f"of the {inner} axes of one example") from None
    return graph._add("pad", (x, graph._lift(value, x.dtype)), pad_width=tuple(int(w) for w in pairs.reshape(-1)))


def split(x: Expr, indices_or_sections: Union[int, Sequence[int]], axis: int) -> list[Expr]:
    """numpy's split into a list of slices: a number of equal sections, or the indices to cut at."""
    if not -x.ndim <= int(axis) < x.ndim:
        raise _refused(f"split({x!r})", f"axis {axis} is out of range for rank {x.ndim}")
    size = x.shape[int(axis)]
    if size is None:
        raise _refused(f"split({x!r})", f"split along the batch axis (axis {axis}) would mix examples, so it "
                                        "cannot be split across workers")
    if np.isscalar(indices_or_sections):
        sections = int(indices_or_sections)  # type: ignore[arg-type]
        if sections < 1 or size % sections:
            raise _refused(f"split({x!r})", f"axis {axis} of size {size} does not divide into {sections} "
                                            "equal sections")
        cuts = [size // sections * i for i in range(1, sections)]
    else:
        cuts = [int(i) for i in indices_or_sections]  # type: ignore[union-attr]
    bounds = [0] + cuts + [None]
    return [slice(x, int(axis), start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]


def flip(x: Expr, axis: Union[None, int, Sequence[int]] = None) -> Expr:
    """Reverse along `axis` (None: every axis, which for a per-example value includes the refused batch axis)."""
    return _unary("flip", x, axes=tuple(range(x.ndim)) if axis is None else _int_tuple(axis))


def tile(x: Expr, reps: Union[int, Sequence[int]]) -> Expr:
    """np.tile of each example: `reps` describe one example."""
    return _unary("tile", x, reps=_int_tuple(reps))


def broadcast_to(x: Expr, shape: Union[int, Sequence[int]]) -> Expr:
    """numpy broadcasting to `shape`, one example's shape for a per-example value (the batch axis implicit)."""
    return _unary("broadcast_to", x, shape=_int_tuple(shape))


def einsum(subscripts: str, *operands: Expr) -> Expr:
    """np.einsum over letters ('bi,ij->bj'; implicit output as numpy: the letters used once, sorted).

    A per-example operand's first letter is its batch axis: it stays first in
    the output, or is summed over; summing it over several per-example
    operands keeps it in the einsum and sums the result over the batch."""
    from gradpool.worker.engine.ops import BATCH, einsum_batch_letter, parse_einsum
    if not operands:
        raise _refused(f"einsum({subscripts!r})", "einsum needs at least one operand")
    graph = _expr(*operands).graph
    text = subscripts.replace(" ", "")
    if "->" not in text:
        letters = text.replace(",", "")
        text += "->" + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    try:
        ins, out = parse_einsum(text, len(operands))
    except GraphError as err:
        raise _refused(f"einsum({subscripts!r})", str(err)) from None
    shapes = tuple(graph._own(o)._node.shape for o in operands)
    try:
        batch = einsum_batch_letter(ins, shapes) if all(len(t) == len(s) for t, s in zip(ins, shapes)) else ""
    except GraphError:
        batch = ""  # let the op's own rule refuse it, at the user's line
    per_example = [term for term, shape in zip(ins, shapes) if shape[:1] == (BATCH,)]
    if batch and batch not in out and len(per_example) > 1:
        joint = graph._add("einsum", operands, subscripts=f"{','.join(ins)}->{batch}{out}")
        return joint.sum(axis=0)
    return graph._add("einsum", operands, subscripts=f"{','.join(ins)}->{out}")


def _refused(call: str, message: str) -> GraphError:
    """An error found by the SDK itself, worded and placed (the user's line) as Graph._add words them."""
    from .graph import _user_origin
    origin = _user_origin()
    return GraphError(f"{call}{f' at {origin}' if origin else ''}: {message}")


def _int_tuple(value: Union[int, Sequence[int]]) -> tuple[int, ...]:
    return (int(value),) if np.isscalar(value) else tuple(int(v) for v in value)  # type: ignore[union-attr, arg-type]
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
def take(x: Expr, indices: Any, axis: Optional[int] = None) -> Expr:
    """np.take with constant integer indices (a list or array, any shape; negative
    ones count from the end, repeats allowed) along an axis other than the batch axis."""
    return _take(x, indices, axis)
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
