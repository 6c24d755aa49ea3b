"""The op registry: every op is one `Op` entry, defined once.

An entry says everything the engine and the SDK need to know:

* `shape(at, *shapes)` -- static shape rule. Shapes are tuples; a leading -1
  is the batch axis of a per-example value. Raising `GraphError` here is how
  an op refuses a batch axis it cannot handle (softmax over the batch, say).
* `forward(at, *xs)` -- numpy, vectorized over the batch.
* `vjp(at, g, out, *xs)` -- the lecture's backward step for this node: given
  g = v_bar (the adjoint of this node's output) returns one adjoint per input,
  `None` for inputs that take none (labels, indices). The engine sums these
  over a node's children and unbroadcasts them, once, so rules may return
  gradients in the broadcast shape.
* `linear_in` -- how the op may touch batch-reduced values (see program.py):
  "all" (jointly linear: add, sum, reshape...), "each" (linear in each
  argument with the others fixed: mul, matmul), "first" (div) or "none".

`at` is a `Call`: the node's attributes, read as `at.axis`, plus the
declared context of the call (`at.per_example`, `at.wants`, `at.batch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from .errors import GraphError, InputError, quoted

BATCH = -1  # marks the batch axis in static shapes
FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
INTS = (np.dtype(np.int32), np.dtype(np.int64))

Shape = tuple[int, ...]


class Attrs(dict):
    """A node's declared attributes (defaults filled in), readable as `at.axis`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class Call:
    """What a rule sees as `at`: the node's declared attributes (`at.axis`)
    and the context of the call, which are not attributes and never travel:

    * `per_example` -- the first input has the batch axis;
    * `wants[k]`    -- input k takes a gradient (a rule may skip costly work
                       for it and return None);
    * `batch`       -- the global batch size (set per run for `needs_batch`
                       ops), so `mean` over the batch divides by the whole
                       batch, not by a shard's share of it.
    """
    attrs: Attrs
    per_example: bool = False
    wants: tuple[bool, ...] = ()
    batch: int = 0

    def __getattr__(self, name: str) -> Any:  # only reached for names that are not fields
        try:
            return self.attrs[name]
        except KeyError:
            raise AttributeError(name) from None


CONTEXT_NAMES = frozenset(("attrs", "per_example", "wants", "batch"))


@dataclass(frozen=True)
class Op:
    name: str
    arity: Optional[int]  # None: any number >= 1 (concat)
    shape: Callable[..., Shape]
    forward: Callable[..., np.ndarray]
    vjp: Optional[Callable[..., tuple]]
    linear_in: str = "none"
    dtype: Callable[..., np.dtype] = field(default=None)  # type: ignore[assignment]
    # attribute name -> (kind, default); kind in int, float, bool, ints, str.
    # A default of REQUIRED means the attribute must be given.
    attrs: dict = field(default_factory=dict)
    doc: str = ""
    # True when forward/vjp read `at.batch` (the global batch size).
    needs_batch: bool = False
    # (index input, indexed input, axis): input k holds integers that index
    # that axis of another input (labels into logits, rows of a table). The
    # SDK and the trainer check such inputs' ranges before sending them.
    indexes: Optional[tuple[int, int, int]] = None

    def resolve_attrs(self, given: dict) -> Attrs:
        """The node's attributes with defaults filled in; unknown or missing ones refused."""
        extra = set(given) - set(self.attrs)
        if extra:
            raise GraphError(f"unknown attribute(s) {quoted(sorted(extra))}; {self.name} takes "
                             f"{sorted(self.attrs) or 'none'}")
        resolved = Attrs()
        for name, (kind, default) in self.attrs.items():
            if name in given:
                resolved[name] = given[name]
            elif default is REQUIRED:
                raise GraphError(f"missing required attribute {name!r}")
            else:
                resolved[name] = default
        return resolved


REQUIRED = object()
REGISTRY: dict[str, Op] = {}


def register(op: Op) -> Op:
    if op.name in REGISTRY:
        raise ValueError(f"op {quoted(op.name)} registered twice")
    if CONTEXT_NAMES & set(op.attrs):
        raise ValueError(f"op {op.name!r}: attribute names {sorted(CONTEXT_NAMES)} are the call's context")
    if op.dtype is None:
        object.__setattr__(op, "dtype", same_float_dtype)
    REGISTRY[op.name] = op
    return op


def get_op(name: str) -> Op:
    try:
        return REGISTRY[name]
    except KeyError:
        raise GraphError(f"unknown op {quoted(name)}; known ops: {', '.join(sorted(REGISTRY))}") from None


# ---------------------------------------------------------------- shape helpers

def fmt(shape: Shape) -> str:
    """A shape for messages: (batch, 784); one with absurdly many dims is cut short."""
    shape = tuple(shape)
    dims = ["batch" if d == BATCH else str(d) for d in shape[:8]]
    if len(shape) > 8:
        return f"({', '.join(dims)}, ... {len(shape)} dims)"
    return "(" + ", ".join(dims) + ("," if len(shape) == 1 else "") + ")"


def is_per_example(shape: Shape) -> bool:
    return len(shape) > 0 and shape[0] == BATCH


def check_batch_leading(shape: Shape, what: str) -> Shape:
    if BATCH in shape[1:]:
        raise GraphError(f"{what} would move the batch axis away from the front (result {fmt(shape)})")
    return shape


def broadcast(*shapes: Shape) -> Shape:
    """numpy broadcasting where the batch axis only meets itself or 1."""
    rank = max(len(s) for s in shapes)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    out = []
    for dims in zip(*padded):
        sizes = set(dims) - {1}
        if not sizes:
            out.append(1)
        elif len(sizes) == 1:
            out.append(sizes.pop())
        elif BATCH in sizes:
            raise GraphError("shapes " + " and ".join(fmt(s) for s in shapes)
                             + " do not broadcast: a fixed-size axis lines up with the batch axis")
        else:
            raise GraphError("shapes " + " and ".join(fmt(s) for s in shapes) + " do not broadcast")
    return check_batch_leading(tuple(out), "broadcasting " + " and ".join(fmt(s) for s in shapes))


def norm_axis(axis: int, rank: int, what: str) -> int:
    if not -rank <= axis < rank:
        raise GraphError(f"{what}: axis {axis} is out of range for rank {rank}")
    return axis % rank


def refuse_batch_axis(shape: Shape, axis: int, what: str) -> None:
    if axis == 0 and is_per_example(shape):
        raise GraphError(f"{what} along the batch axis would mix examples, so it cannot be split across workers")


def same_float_dtype(at: Attrs, *dtypes: np.dtype) -> np.dtype:
    first = dtypes[0]
    for d in dtypes:
        if d not in FLOATS:
            raise GraphError(f"needs float32 or float64 operands, got {d}")
        if d != first:
            raise GraphError(f"operands must share one dtype, got {' and '.join(map(str, dtypes))}")
    return first


def elementwise_shape(at: Attrs, *shapes: Shape) -> Shape:
    return broadcast(*shapes) if len(shapes) > 1 else shapes[0]


def unary(name: str, forward: Callable, vjp: Optional[Callable], doc: str, linear: bool = False, **attrs) -> Op:
    return register(Op(name, 1, elementwise_shape, forward, vjp,
                       linear_in="all" if linear else "none", attrs=attrs, doc=doc))


def binary(name: str, forward: Callable, vjp: Callable, doc: str, linear_in: str = "none") -> Op:
    return register(Op(name, 2, elementwise_shape, forward, vjp, linear_in=linear_in, doc=doc))


# ---------------------------------------------------------------- elementwise

binary("add", lambda at, a, b: a + b, lambda at, g, out, a, b: (g, g), "a + b", "all")
binary("sub", lambda at, a, b: a - b,
       lambda at, g, out, a, b: (g, -g if at.wants[1] else None), "a - b", "all")
binary("mul", lambda at, a, b: a * b,
       lambda at, g, out, a, b: (g * b if at.wants[0] else None, g * a if at.wants[1] else None), "a * b", "each")


def _div_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple:
    """d/da = g / b; d/db = -g a / b^2 = -(g / b) * out, sharing g / b."""
    g_over_b = g / b
    if not at.wants[1]:
        return g_over_b, None
    grad_b = np.asarray(g_over_b * out)  # 0-d operands give a scalar
    np.negative(grad_b, out=grad_b)
    return (g_over_b if at.wants[0] else None), grad_b


binary("div", lambda at, a, b: a / b, _div_vjp, "a / b", "first")


def _pick(a: np.ndarray, b: np.ndarray, first: bool) -> np.ndarray:
    """Subgradient share of `a` in maximum(a, b): 1 where it wins, 1/2 on ties
    (in a's dtype from the start: no float64 temporaries for float32 data)."""
    wins = (a > b) if first else (a < b)
    share = np.multiply(a == b, a.dtype.type(0.5), dtype=a.dtype)
    share += wins
    return share


binary("maximum", lambda at, a, b: np.maximum(a, b),
       lambda at, g, out, a, b: (g * _pick(a, b, True), g * _pick(b, a, True)), "elementwise max; ties split the gradient")
binary("minimum", lambda at, a, b: np.minimum(a, b),
       lambda at, g, out, a, b: (g * _pick(a, b, False), g * _pick(b, a, False)), "elementwise min; ties split the gradient")


def _scaled(g: np.ndarray, t: np.ndarray) -> np.ndarray:
    """g * t, written into t (a temporary the caller owns) when the shapes allow.
    (0-d operands give numpy scalars, which cannot be written to.)"""
    if isinstance(t, np.ndarray) and (t.shape == np.shape(g) or t.shape == np.broadcast_shapes(t.shape, np.shape(g))):
        return np.multiply(t, g, out=t)
    return t * g


def _square_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    return (_scaled(g, np.multiply(x, x.dtype.type(2))),)


def _tanh_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    t = np.multiply(out, out, out=np.empty_like(out))
    np.subtract(1, t, out=t)
    return (_scaled(g, t),)


unary("neg", lambda at, x: -x, lambda at, g, out, x: (-g,), "-x", linear=True)
unary("pow", lambda at, x: x ** x.dtype.type(at.exponent),
      lambda at, g, out, x: (_scaled(g, np.multiply(x ** x.dtype.type(at.exponent - 1), x.dtype.type(at.exponent))),),
      "x ** exponent (a constant)", exponent=(float, REQUIRED))
unary("exp", lambda at, x: np.exp(x), lambda at, g, out, x: (g * out,), "e ** x")
unary("log", lambda at, x: np.log(x), lambda at, g, out, x: (g / x,), "natural log")
unary("sqrt", lambda at, x: np.sqrt(x), lambda at, g, out, x: (g * out.dtype.type(0.5) / out,), "square root")
unary("square", lambda at, x: np.square(x), _square_vjp, "x ** 2")
unary("abs", lambda at, x: np.abs(x), lambda at, g, out, x: (g * np.sign(x),), "|x|")


# sigmoid, softplus and BCE: the stable forms below cost a few SIMD passes
# each; np.logaddexp, which they used to go through, is a scalar loop about
# 20x slower than np.exp.

def _sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x) in a fresh array, accurate to a few ulps on both tails.

    For x below about -88 (float32) or -709 (float64) e^-x overflows to inf
    and the result is 0, which is the true value rounded (it is below the
    smallest normal number); that overflow is expected, so it is silenced.
    0.5 tanh(x / 2) + 0.5 is a little faster but rounds sigmoid(x) to 0 from
    x = -17 (float32) on, which would make log(sigmoid(x)) -inf there.
    """
    t = np.negative(x, out=np.empty_like(x))
    with np.errstate(over="ignore"):
        np.exp(t, out=t)
    t += 1
    return np.reciprocal(t, out=t)


def _sigmoid_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    t = np.subtract(1, out)
    t *= out
    return (_scaled(g, t),)


def _softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), in a fresh array.

    np.log1p is a scalar loop (~15x slower than np.log), so log1p(u) for u in
    (0, 1] is log(w) + (u - (w - 1)) with w = 1 + u rounded: the second term
    is the rounding error of 1 + u (w - 1 is exact), which keeps the result
    accurate to an ulp even where u is below the float epsilon (softplus of
    a very negative x is e^x, not 0).
    """
    u = np.abs(x, out=np.empty_like(x))
    np.negative(u, out=u)
    np.exp(u, out=u)  # e^-|x| in (0, 1]: never overflows
    w = np.add(u, 1, out=np.empty_like(u))
    result = np.log(w, out=np.empty_like(w))
    w -= 1
    u -= w
    result += u
    result += np.maximum(x, 0, out=w)
    return result


def _softplus_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """sigmoid(x) = 1 - e^-softplus(x), from the output: one expm1 pass."""
    t = np.negative(out, out=np.empty_like(out))
    np.expm1(t, out=t)
    np.negative(t, out=t)
    return (_scaled(g, t),)


unary("sigmoid", lambda at, x: _sigmoid(x), _sigmoid_vjp,
      "logistic function; its derivative reuses the output: s(1 - s)")
unary("tanh", lambda at, x: np.tanh(x), _tanh_vjp, "tanh; derivative 1 - tanh^2")
unary("relu", lambda at, x: np.maximum(x, 0), lambda at, g, out, x: (_scaled(g, (x > 0).astype(x.dtype)),),
      "max(x, 0)")
unary("leaky_relu", lambda at, x: np.where(x > 0, x, x * x.dtype.type(at.alpha)),
      lambda at, g, out, x: (g * np.where(x > 0, x.dtype.type(1), x.dtype.type(at.alpha)),),
      "x if x > 0 else alpha * x", alpha=(float, 0.01))
unary("softplus", lambda at, x: _softplus(x), _softplus_vjp,
      "log(1 + e^x); derivative sigmoid(x) = 1 - e^-out")


# ---------------------------------------------------------------- linear algebra

def _matmul_shape(at: Attrs, a: Shape, b: Shape) -> Shape:
    if len(a) < 2 or len(b) < 2:
        raise GraphError(f"matmul needs operands of rank 2 or more, got {fmt(a)} and {fmt(b)}")
    if a[-1] != b[-2] or BATCH in (a[-1], b[-2]):
        raise GraphError(f"matmul shapes {fmt(a)} and {fmt(b)} do not align ({a[-1]} vs {b[-2]})"
                         if BATCH not in (a[-1], b[-2]) else
                         f"matmul of {fmt(a)} and {fmt(b)} would contract over the batch axis")
    batch_dims = broadcast(a[:-2], b[:-2]) if (a[:-2] or b[:-2]) else ()
    return check_batch_leading(batch_dims + (a[-2], b[-1]), f"matmul of {fmt(a)} and {fmt(b)}")


def _matmul_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple:
    """Skips the product for an operand that takes no gradient (the data in
    `x @ W`): it is the costliest product of the backward pass."""
    grad_a = np.matmul(g, b.swapaxes(-1, -2)) if at.wants[0] else None
    grad_b = np.matmul(a.swapaxes(-1, -2), g) if at.wants[1] else None
    return grad_a, grad_b


register(Op("matmul", 2, _matmul_shape, lambda at, a, b: np.matmul(a, b), _matmul_vjp,
            linear_in="each", doc="matrix product, 2-D or batched (leading axes broadcast)"))


def _perm(at: Attrs, rank: int) -> tuple[int, ...]:
    perm = tuple(at.perm) if at.perm else tuple(range(rank))[::-1]
    if sorted(perm) != list(range(rank)):
        raise GraphError(f"transpose perm {perm} is not a permutation of the {rank} axes")
    return perm


def _transpose_shape(at: Attrs, x: Shape) -> Shape:
    perm = _perm(at, len(x))
    if is_per_example(x) and perm[0] != 0:
        raise GraphError(f"transpose {perm} of {fmt(x)} would move the batch axis")
    return tuple(x[p] for p in perm)


register(Op("transpose", 1, _transpose_shape, lambda at, x: np.transpose(x, _perm(at, x.ndim)),
            lambda at, g, out, x: (np.transpose(g, np.argsort(_perm(at, x.ndim))),),
            linear_in="all", attrs={"perm": ("ints", ())}, doc="permute axes (default: reverse them)"))


def _reshape_shape(at: Attrs, x: Shape) -> Shape:
    target = tuple(int(d) for d in at.shape)
    if any(d < 0 for d in target):
        raise GraphError(f"reshape target {target} has a negative size (give every size; the batch axis is implicit)")
    source = x[1:] if is_per_example(x) else x
    if math.prod(source) != math.prod(target):
        raise GraphError(f"cannot reshape {fmt(x)} to {fmt(((BATCH,) if is_per_example(x) else ()) + target)}:"
                         f" {math.prod(source)} vs {math.prod(target)} elements per example")
    return ((BATCH,) + target) if is_per_example(x) else target


register(Op("reshape", 1, _reshape_shape,
            lambda at, x: x.reshape(x.shape[:1] + tuple(at.shape)) if at.per_example else x.reshape(tuple(at.shape)),
            lambda at, g, out, x: (g.reshape(x.shape),),
            linear_in="all", attrs={"shape": ("ints", REQUIRED)},
            doc="new shape; for per-example values `shape` excludes the batch axis, which is kept"))


# ---------------------------------------------------------------- reductions

def _axes(at: Attrs, rank: int) -> tuple[int, ...]:
    axes = tuple(sorted({norm_axis(a, rank, "reduction") for a in at.axes})) if at.axes else tuple(range(rank))
    return axes


def _reduce_shape(at: Attrs, x: Shape) -> Shape:
    axes = _axes(at, len(x))
    if at.keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(x))
    return tuple(d for i, d in enumerate(x) if i not in axes)


def _reduce_vjp_grad(at: Attrs, g: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A read-only broadcast view of g over the reduced axes: no copy."""
    if not at.keepdims:
        axes = _axes(at, x.ndim)
        g = np.reshape(g, tuple(1 if a in axes else d for a, d in enumerate(x.shape)))
    return np.broadcast_to(g, x.shape)


def _mean_count(at: Attrs, x: np.ndarray) -> int:
    """Elements averaged over: the batch axis counts the *global* batch."""
    count = 1
    for a in _axes(at, x.ndim):
        count *= at.batch if (a == 0 and at.per_example) else x.shape[a]
    return count


_REDUCE_ATTRS = {"axes": ("ints", ()), "keepdims": (bool, False)}
register(Op("sum", 1, _reduce_shape, lambda at, x: np.sum(x, axis=_axes(at, x.ndim), keepdims=at.keepdims),
            lambda at, g, out, x: (_reduce_vjp_grad(at, g, x),),
            linear_in="all", attrs=_REDUCE_ATTRS, doc="sum over `axes` (all when empty)"))
register(Op("mean", 1, _reduce_shape,
            lambda at, x: np.sum(x, axis=_axes(at, x.ndim), keepdims=at.keepdims) / x.dtype.type(_mean_count(at, x)),
            lambda at, g, out, x: (_reduce_vjp_grad(at, g / x.dtype.type(_mean_count(at, x)), x),),
            linear_in="all", attrs=_REDUCE_ATTRS, needs_batch=True,
            doc="mean over `axes`; over the batch axis it divides by the global batch size"))


def _axis_shape(name: str) -> Callable[[Attrs, Shape], Shape]:
    def rule(at: Attrs, x: Shape) -> Shape:
        axis = norm_axis(at.axis, len(x), name)
        refuse_batch_axis(x, axis, name)
        return x
    return rule


def _max_shape(at: Attrs, x: Shape) -> Shape:
    axis = norm_axis(at.axis, len(x), "max")
    refuse_batch_axis(x, axis, "max")
    return tuple(1 if i == axis else d for i, d in enumerate(x)) if at.keepdims else x[:axis] + x[axis + 1:]


def _max_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    axis = at.axis % x.ndim
    if not at.keepdims:
        g, out = np.expand_dims(g, axis), np.expand_dims(out, axis)
    winners = (x == out)
    return (g * winners / winners.sum(axis=axis, keepdims=True).astype(x.dtype),)


register(Op("max", 1, _max_shape, lambda at, x: np.max(x, axis=at.axis, keepdims=at.keepdims), _max_vjp,
            attrs={"axis": (int, -1), "keepdims": (bool, False)}, doc="max along one axis; ties share the gradient"))


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - np.max(x, axis=axis, keepdims=True)
    shifted -= np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))
    return shifted


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    """exp(x - max) / sum, in place in one fresh array (no log, no second exp)."""
    e = x - np.max(x, axis=axis, keepdims=True)
    np.exp(e, out=e)
    e /= np.sum(e, axis=axis, keepdims=True)
    return e


def _softmax_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """out * (g - sum(g * out)), in one temporary."""
    t = g * out
    s = np.sum(t, axis=at.axis, keepdims=True)
    np.subtract(g, s, out=t)
    t *= out
    return (t,)


def _log_softmax_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """g - softmax * sum(g), in one temporary."""
    t = np.exp(out)
    t *= np.sum(g, axis=at.axis, keepdims=True)
    np.subtract(g, t, out=t)
    return (t,)


register(Op("softmax", 1, _axis_shape("softmax"), lambda at, x: _softmax(x, at.axis), _softmax_vjp,
            attrs={"axis": (int, -1)}, doc="softmax along `axis` (not the batch axis)"))
register(Op("log_softmax", 1, _axis_shape("log_softmax"), lambda at, x: _log_softmax(x, at.axis), _log_softmax_vjp,
            attrs={"axis": (int, -1)}, doc="log of softmax along `axis`, computed stably"))


# ---------------------------------------------------------------- losses

def _xent_shape(at: Attrs, logits: Shape, labels: Shape) -> Shape:
    if len(logits) < 1 or logits[:-1] != labels:
        raise GraphError(f"softmax_cross_entropy needs labels of shape logits.shape[:-1]; "
                         f"got logits {fmt(logits)} and labels {fmt(labels)}")
    return labels


def _xent_dtype(at: Attrs, logits: np.dtype, labels: np.dtype) -> np.dtype:
    if logits not in FLOATS or labels not in INTS:
        raise GraphError(f"softmax_cross_entropy needs float logits and integer labels, got {logits} and {labels}")
    return logits


def _check_range(values: np.ndarray, size: int, what: str) -> None:
    if values.size and (values.min() < 0 or values.max() >= size):
        bad = values[(values < 0) | (values >= size)].flat[0]
        raise InputError(f"{what} {bad} is out of range [0, {size})")


def _over_classes(ufunc: np.ufunc, rows: np.ndarray) -> np.ndarray:
    """ufunc.reduce of (examples, classes) along the classes. numpy's reduction
    runs one inner loop per row, which for ten classes costs more than the
    exp of the whole array (0.4 ms for 4096 x 10); a loop over the columns,
    each a vectorized pass over all rows, is ~10x faster while classes are few."""
    if rows.shape[1] > 32 or rows.shape[1] == 0:
        return ufunc.reduce(rows, axis=1)
    acc = rows[:, 0].copy()
    for c in range(1, rows.shape[1]):
        ufunc(acc, rows[:, c], out=acc)
    return acc


def _shifted_rows(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """logits - row max, as a fresh (examples, classes) array, and each example's label index."""
    flat = logits.reshape(-1, logits.shape[-1])
    shifted = flat - _over_classes(np.maximum, flat)[:, None]
    return shifted, (np.arange(flat.shape[0]), labels.reshape(-1))


def _xent_forward(at: Attrs, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """logsumexp(logits) - logits[label], without materializing log-softmax:
    log(sum(exp(logits - m))) - (logits[label] - m), m the row max."""
    _check_range(labels, logits.shape[-1], "label")
    shifted, at_label = _shifted_rows(logits, labels)
    picked = shifted[at_label]
    np.exp(shifted, out=shifted)
    loss = np.log(_over_classes(np.add, shifted))
    loss -= picked
    return loss.reshape(labels.shape)


def _xent_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> tuple:
    """g * (softmax(logits) - onehot(label)).

    The forward output is only the per-example loss, so softmax is recomputed
    (max, exp, sum over ten classes: cheap), in one array: exp(logits - max)
    scaled row by row by g / sum (a per-row vector, not a second full-size
    pass), then g subtracted at each label.
    """
    probs, at_label = _shifted_rows(logits, labels)
    np.exp(probs, out=probs)
    g = np.reshape(g, -1)
    scale = g / _over_classes(np.add, probs)
    probs *= scale[:, None]
    probs[at_label] -= g
    return probs.reshape(logits.shape), None


register(Op("softmax_cross_entropy", 2, _xent_shape, _xent_forward, _xent_vjp, dtype=_xent_dtype, indexes=(1, 0, -1),
            doc="per-example -log softmax(logits)[label], from logits and integer labels"))


def _bce_forward(at: Attrs, logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """softplus(x) - x t: stable for any x (see _softplus)."""
    xt = np.asarray(logits * targets)  # 0-d operands give a scalar
    return np.subtract(_softplus(logits), xt, out=xt)


def _bce_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray, t: np.ndarray) -> tuple:
    grad_x = None
    if at.wants[0]:
        s = _sigmoid(x)
        grad_x = np.subtract(s, t, out=s) if s.shape == g.shape else s - t
        grad_x *= g
    return grad_x, (-g * x if at.wants[1] else None)


register(Op("binary_cross_entropy", 2, elementwise_shape, _bce_forward, _bce_vjp,
            doc="elementwise BCE from logits and float targets in [0, 1], computed stably"))


# ---------------------------------------------------------------- structure

def _concat_shape(at: Attrs, *shapes: Shape) -> Shape:
    rank = len(shapes[0])
    axis = norm_axis(at.axis, rank, "concat")
    for s in shapes:
        if len(s) != rank or any(d != e for i, (d, e) in enumerate(zip(s, shapes[0])) if i != axis):
            raise GraphError("concat needs equal shapes off the joined axis, got " + ", ".join(map(fmt, shapes)))
        refuse_batch_axis(s, axis, "concat")
    return tuple(sum(s[axis] for s in shapes) if i == axis else d for i, d in enumerate(shapes[0]))


def _concat_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, *xs: np.ndarray) -> tuple:
    cuts = np.cumsum([x.shape[at.axis] for x in xs])[:-1]
    return tuple(np.split(g, cuts, axis=at.axis))


register(Op("concat", None, _concat_shape, lambda at, *xs: np.concatenate(xs, axis=at.axis), _concat_vjp,
            linear_in="all", attrs={"axis": (int, -1)}, doc="join along an axis other than the batch axis"))


def _slice_index(at: Attrs, rank: int) -> tuple:
    axis = at.axis % rank
    return (slice(None),) * axis + (slice(at.start, at.stop, at.step),)


def _slice_shape(at: Attrs, x: Shape) -> Shape:
    axis = norm_axis(at.axis, len(x), "slice")
    refuse_batch_axis(x, axis, "slice")
    if at.step < 1:
        raise GraphError(f"slice step must be >= 1, got {at.step}")
    length = len(range(*slice(at.start, at.stop, at.step).indices(x[axis])))
    if length == 0:
        raise GraphError(f"slice [{at.start}:{at.stop}:{at.step}] of axis {axis} of {fmt(x)} is empty")
    return x[:axis] + (length,) + x[axis + 1:]


def _slice_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    grad = np.zeros_like(x)
    grad[_slice_index(at, x.ndim)] = g
    return (grad,)


register(Op("slice", 1, _slice_shape, lambda at, x: x[_slice_index(at, x.ndim)], _slice_vjp, linear_in="all",
            attrs={"axis": (int, REQUIRED), "start": (int, 0), "stop": (int, 2**62), "step": (int, 1)},
            doc="x[start:stop:step] along one axis other than the batch axis"))


def _embedding_shape(at: Attrs, table: Shape, indices: Shape) -> Shape:
    if len(table) != 2 or is_per_example(table):
        raise GraphError(f"embedding needs a (rows, width) table that is not per-example, got {fmt(table)}")
    return indices + (table[1],)


def _embedding_dtype(at: Attrs, table: np.dtype, indices: np.dtype) -> np.dtype:
    if table not in FLOATS or indices not in INTS:
        raise GraphError(f"embedding needs a float table and integer indices, got {table} and {indices}")
    return table


def _embedding_forward(at: Attrs, table: np.ndarray, indices: np.ndarray) -> np.ndarray:
    _check_range(indices, table.shape[0], "index")
    return table[indices]


def _embedding_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, table: np.ndarray, indices: np.ndarray) -> tuple:
    grad = np.zeros_like(table)
    np.add.at(grad, indices.reshape(-1), g.reshape(-1, table.shape[1]))
    return grad, None


register(Op("embedding", 2, _embedding_shape, _embedding_forward, _embedding_vjp, dtype=_embedding_dtype,
            indexes=(1, 0, 0),
            linear_in="first", doc="rows of a table gathered by integer indices"))


# ---------------------------------------------------------------- more ops, same registry

# Convolution, pooling and layer norm live in ops_nn.py, which registers into
# REGISTRY above; importing it here (last, once every name it uses exists)
# means whoever imports the registry sees them.
from . import ops_nn  # noqa: E402,F401
