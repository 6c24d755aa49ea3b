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
declared context of the call (`at.per_example`, `at.wants`, `at.batch`, and
for random ops `at.node`, `at.seed`, `at.offset`, `at.training`).
"""

from __future__ import annotations

import functools
import hashlib
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
                       batch, not by a shard's share of it;
    * `node`        -- the node's name (keys a random op's stream);
    * `seed`, `offset`, `training` -- set per run for `needs_seed` ops: the
                       request's seed (None: none given), the global index
                       of this shard's first example, and whether the run
                       takes gradients (forward-only runs turn dropout off).
    """
    attrs: Attrs
    per_example: bool = False
    wants: tuple[bool, ...] = ()
    batch: int = 0
    node: str = ""
    seed: Optional[int] = None
    offset: int = 0
    training: bool = False

    def __getattr__(self, name: str) -> Any:  # only reached for names that are not fields
        try:
            return self.attrs[name]
        except KeyError:
            raise AttributeError(name) from None


CONTEXT_NAMES = frozenset(("attrs", "per_example", "wants", "batch", "node", "seed", "offset", "training"))


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
    # True when forward/vjp read `at.seed`, `at.offset`, `at.training` (random
    # ops: a gradient run of a graph with one needs a seed).
    needs_seed: bool = False
    # (index input, indexed input, axis): input k holds integers that index
    # that axis of another input (labels into logits, rows of a table). The
    # SDK and the trainer check such inputs' ranges before sending them.
    indexes: Optional[tuple[int, int, int]] = None
    # False: the output carries no gradient back to the inputs (stop_gradient,
    # comparisons, one_hot), so the gradient path ends here. A node whose
    # value is not float never carries one either, whatever this says.
    passes_gradient: bool = True
    # Temporaries forward or VJP allocate beyond the values the plan holds (conv's
    # padded image and im2col columns, pooling's padded input), in elements of the
    # node's dtype, per example when the first input is per-example:
    # scratch(at, *input_shapes). The memory estimate adds them while the node's
    # step runs; None: nothing beyond a few values of the node's own size.
    scratch: Optional[Callable[..., int]] = None
    # What the VJP reads besides g: "all" (inputs and output), "inputs", "output"
    # or "none". The engine keeps a value for the backward pass only if some VJP
    # reads it, frees the others once the forward pass is done with them, and
    # passes None for what the op says it does not read.
    vjp_reads: str = "all"
    # True: forward always returns a new array that shares memory with nothing
    # else (not an input, not a view, not a cached array), so the engine may let
    # a later step overwrite it once nothing else reads it.
    fresh: bool = False
    # forward_into(at, out, *xs): forward written into `out`, a buffer of the
    # output's shape and dtype that may be one of xs (a dead temporary the
    # engine hands over); it must give bitwise what forward gives (the same
    # ufuncs), and such an op must be `fresh`.
    forward_into: Optional[Callable[..., np.ndarray]] = None

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
VJP_READS = ("all", "inputs", "output", "none")


def register(op: Op) -> Op:
    if op.name in REGISTRY:
        raise ValueError(f"op {quoted(op.name)} registered twice")
    if CONTEXT_NAMES & set(op.attrs):
        raise ValueError(f"op {op.name!r}: attribute names {sorted(CONTEXT_NAMES)} are the call's context")
    if op.dtype is None:
        object.__setattr__(op, "dtype", same_float_dtype)
    if op.vjp_reads not in VJP_READS:
        raise ValueError(f"op {op.name!r}: vjp_reads must be one of {VJP_READS}, got {op.vjp_reads!r}")
    if op.forward_into is not None and not op.fresh:
        raise ValueError(f"op {op.name!r}: an op with forward_into must be fresh (its forward returns a new array)")
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


def unary(name: str, forward: Callable, vjp: Optional[Callable], doc: str, linear: bool = False, *,
          vjp_reads: str = "all", into: Optional[Callable] = None, fresh: bool = False, **attrs) -> Op:
    """An elementwise op of one input; `into` is its forward_into (which makes it fresh)."""
    return register(Op(name, 1, elementwise_shape, forward, vjp,
                       linear_in="all" if linear else "none", attrs=attrs, doc=doc, vjp_reads=vjp_reads,
                       fresh=fresh or into is not None, forward_into=into))


def binary(name: str, forward: Callable, vjp: Callable, doc: str, linear_in: str = "none", *,
           vjp_reads: str = "all", into: Optional[Callable] = None) -> Op:
    return register(Op(name, 2, elementwise_shape, forward, vjp, linear_in=linear_in, doc=doc,
                       vjp_reads=vjp_reads, fresh=into is not None, forward_into=into))


# ---------------------------------------------------------------- elementwise

binary("add", lambda at, a, b: a + b, lambda at, g, out, a, b: (g, g), "a + b", "all",
       vjp_reads="none", into=lambda at, out, a, b: np.add(a, b, out=out))
binary("sub", lambda at, a, b: a - b,
       lambda at, g, out, a, b: (g, -g if at.wants[1] else None), "a - b", "all",
       vjp_reads="none", into=lambda at, out, a, b: np.subtract(a, b, out=out))
binary("mul", lambda at, a, b: a * b,
       lambda at, g, out, a, b: (g * b if at.wants[0] else None, g * a if at.wants[1] else None), "a * b", "each",
       vjp_reads="inputs", into=lambda at, out, a, b: np.multiply(a, b, out=out))


def _div_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple:
    """d/da = g / b; d/db = -g a / b^2 = -(g / b) * out, sharing g / b."""
    g_over_b = g / b
    if not at.wants[1]:
        return g_over_b, None
    grad_b = np.asarray(g_over_b * out)  # 0-d operands give a scalar
    np.negative(grad_b, out=grad_b)
    return (g_over_b if at.wants[0] else None), grad_b


binary("div", lambda at, a, b: a / b, _div_vjp, "a / b", "first",
       into=lambda at, out, a, b: np.divide(a, b, out=out))


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


unary("neg", lambda at, x: -x, lambda at, g, out, x: (-g,), "-x", linear=True,
      vjp_reads="none", into=lambda at, out, x: np.negative(x, out=out))
def _pow_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """exponent * x^(exponent - 1); for exponent 0 the gradient is 0 everywhere,
    x = 0 included (not 0 * 0^-1 = NaN), as torch.pow gives."""
    if at.exponent == 0:
        return (np.zeros(np.broadcast_shapes(np.shape(g), x.shape), x.dtype),)
    return (_scaled(g, np.multiply(x ** x.dtype.type(at.exponent - 1), x.dtype.type(at.exponent))),)


unary("pow", lambda at, x: x ** x.dtype.type(at.exponent), _pow_vjp,
      "x ** exponent (a constant); at x = 0 the gradient is exponent * 0^(exponent - 1) "
      "(0 for exponent 0 or above 1, 1 for exponent 1, infinite otherwise), as torch.pow", exponent=(float, REQUIRED))
unary("exp", lambda at, x: np.exp(x), lambda at, g, out, x: (g * out,), "e ** x",
      vjp_reads="output", into=lambda at, out, x: np.exp(x, out=out))
unary("log", lambda at, x: np.log(x), lambda at, g, out, x: (g / x,), "natural log",
      vjp_reads="inputs", into=lambda at, out, x: np.log(x, out=out))
unary("sqrt", lambda at, x: np.sqrt(x), lambda at, g, out, x: (g * out.dtype.type(0.5) / out,), "square root",
      vjp_reads="output", into=lambda at, out, x: np.sqrt(x, out=out))
unary("square", lambda at, x: np.square(x), _square_vjp, "x ** 2",
      vjp_reads="inputs", into=lambda at, out, x: np.square(x, out=out))
unary("abs", lambda at, x: np.abs(x), lambda at, g, out, x: (g * np.sign(x),), "|x|")


# sigmoid, softplus and BCE: the stable forms below cost a few SIMD passes
# each; np.logaddexp, which they used to go through, is a scalar loop about
# 20x slower than np.exp.

def _sigmoid(x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """1 / (1 + e^-x) in a fresh array (or in `out`, which may be x), accurate
    to a few ulps on both tails.

    For x below about -88 (float32) or -709 (float64) e^-x overflows to inf
    and the result is 0, which is the true value rounded (it is below the
    smallest normal number); that overflow is expected, so it is silenced.
    0.5 tanh(x / 2) + 0.5 is a little faster but rounds sigmoid(x) to 0 from
    x = -17 (float32) on, which would make log(sigmoid(x)) -inf there.
    """
    t = np.negative(x, out=np.empty_like(x) if out is None else out)
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
      "logistic function; its derivative reuses the output: s(1 - s)",
      vjp_reads="output", into=lambda at, out, x: _sigmoid(x, out))
unary("tanh", lambda at, x: np.tanh(x), _tanh_vjp, "tanh; derivative 1 - tanh^2",
      vjp_reads="output", into=lambda at, out, x: np.tanh(x, out=out))
# relu's VJP reads its output: out > 0 exactly where x > 0, NaN and -0 alike.
# (The mask is cast to floats first: numpy's float-times-bool loop casts in
# buffered chunks and is half again slower than the cast and a float multiply.)
unary("relu", lambda at, x: np.maximum(x, 0), lambda at, g, out, x: (_scaled(g, (out > 0).astype(out.dtype)),),
      "max(x, 0); gradient 0 at x = 0", vjp_reads="output", into=lambda at, out, x: np.maximum(x, 0, out=out))
unary("leaky_relu", lambda at, x: np.where(x > 0, x, x * x.dtype.type(at.alpha)),
      lambda at, g, out, x: (g * np.where(x > 0, x.dtype.type(1), x.dtype.type(at.alpha)),),
      "x if x > 0 else alpha * x", alpha=(float, 0.01))
unary("softplus", lambda at, x: _softplus(x), _softplus_vjp,
      "log(1 + e^x); derivative sigmoid(x) = 1 - e^-out", vjp_reads="output", fresh=True)


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
            linear_in="each", doc="matrix product, 2-D or batched (leading axes broadcast)",
            vjp_reads="inputs", fresh=True))


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
    """The reduced axes: all of them when `axes` is absent (None), none when it
    is given empty (numpy's axis=()), so an SDK's `axis=()` is the identity.
    (Graphs built before this distinction stored `axis=()` as an empty list,
    which then meant all axes; the SDK always wrote axis=None out in full.)"""
    return _normalized_axes(at.axes, rank)


@functools.lru_cache(maxsize=1024)
def _normalized_axes(axes: Optional[tuple[int, ...]], rank: int) -> tuple[int, ...]:
    """Worked out once per (axes, rank): reductions ask for them per run, forward and backward."""
    if axes is None:
        return tuple(range(rank))
    return tuple(sorted({norm_axis(a, rank, "reduction") for a in axes}))


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


_REDUCE_ATTRS = {"axes": ("ints", None), "keepdims": (bool, False)}
# np.add.reduce is what np.sum calls for an array, without its Python wrapper (a few us a call).
register(Op("sum", 1, _reduce_shape, lambda at, x: np.add.reduce(x, axis=_axes(at, x.ndim), keepdims=at.keepdims),
            lambda at, g, out, x: (_reduce_vjp_grad(at, g, x),),
            linear_in="all", attrs=_REDUCE_ATTRS, doc="sum over `axes` (all when absent, none when empty)",
            vjp_reads="inputs", fresh=True))
register(Op("mean", 1, _reduce_shape,
            lambda at, x: np.sum(x, axis=_axes(at, x.ndim), keepdims=at.keepdims) / x.dtype.type(_mean_count(at, x)),
            lambda at, g, out, x: (_reduce_vjp_grad(at, g / x.dtype.type(_mean_count(at, x)), x),),
            linear_in="all", attrs=_REDUCE_ATTRS, needs_batch=True,
            doc="mean over `axes`; over the batch axis it divides by the global batch size",
            vjp_reads="inputs", fresh=True))


def _axis_shape(name: str) -> Callable[[Attrs, Shape], Shape]:
    def rule(at: Attrs, x: Shape) -> Shape:
        axis = norm_axis(at.axis, len(x), name)
        refuse_batch_axis(x, axis, name)
        return x
    return rule


def _max_axes(at: Attrs, rank: int) -> tuple[int, ...]:
    """`axes` as sum's; `axis` (one int) is how graphs stored max before it took several."""
    if at.axis is None:
        return _axes(at, rank)
    if at.axes is not None:
        raise GraphError("max takes `axes` or the older `axis`, not both")
    return (norm_axis(at.axis, rank, "max"),)


def _max_shape(at: Attrs, x: Shape) -> Shape:
    axes = _max_axes(at, len(x))
    if 0 in axes and is_per_example(x):
        others = tuple(range(1, len(x)))
        hint = (f"; reduce the other axes with axis={others[0] if len(others) == 1 else others} "
                f"(the batch axis is axis 0)" if others else "")
        raise GraphError(f"max over the batch axis of {fmt(x)} would mix examples, so it cannot be split "
                         f"across workers{hint}")
    if at.keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(x))
    return tuple(d for i, d in enumerate(x) if i not in axes)


def _max_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    axes = _max_axes(at, x.ndim)
    if not at.keepdims:
        kept = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
        g, out = np.reshape(g, kept), np.reshape(out, kept)
    winners = (x == out)
    return (g * winners / winners.sum(axis=axes, keepdims=True).astype(x.dtype),)


register(Op("max", 1, _max_shape, lambda at, x: np.max(x, axis=_max_axes(at, x.ndim), keepdims=at.keepdims),
            _max_vjp, attrs={"axes": ("ints", None), "axis": (int, None), "keepdims": (bool, False)},
            doc="max over `axes` as sum's (all when absent, none when empty; `axis`, one int, is the "
                "older form); the maximal entries share the gradient equally"))


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
            vjp_reads="inputs", fresh=True,
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


# ---------------------------------------------------------------- randomness

# Dropout's mask is a pure function of (request seed, node name, global
# example index, element index within the example): a counter-based hash,
# not a generator with state. So a shard computes exactly its examples' rows
# of the mask the whole batch would get, whatever the split, the worker, the
# retry or the order, and backward recomputes the mask instead of keeping it.
_U64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment: 2^64 / golden ratio, odd
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64's finalizer multipliers
# A value without the batch axis (a param, a batch-reduced value) is one
# "example" with this index, so every shard draws the same mask for it.
NOT_PER_EXAMPLE = _U64


def _mix_int(z: int) -> int:
    """splitmix64's finalizer on one Python int: a bijection of 64-bit values
    whose every output bit depends on every input bit."""
    z = ((z ^ (z >> 30)) * _MIX1) & _U64
    z = ((z ^ (z >> 27)) * _MIX2) & _U64
    return z ^ (z >> 31)


def _mix(z: np.ndarray) -> np.ndarray:
    """The same finalizer on a uint64 array, in place (uint64 arrays wrap silently)."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(_MIX1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(_MIX2)
    z ^= z >> np.uint64(31)
    return z


def node_key(name: str) -> int:
    """A node's 64-bit stream key: stable across processes (Python's hash() is not)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def uniform_bits(seed: int, node: str, examples: np.ndarray, per_example: int) -> np.ndarray:
    """(len(examples), per_example) uint64 hashes, uniform over 64 bits: element
    j of example e is splitmix64's output j of the stream keyed by
    mix(key(seed, node) + (e + 1) * golden). Vectorized: no loop over examples
    or elements."""
    base = _mix_int((seed ^ _mix_int(node_key(node))) & _U64)
    stream = (examples.astype(np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN)
    stream += np.uint64(base)
    _mix(stream)
    counters = np.arange(1, per_example + 1, dtype=np.uint64)
    counters *= np.uint64(_GOLDEN)
    bits = np.add.outer(stream, counters)
    return _mix(bits)


def dropout_keep(at: "Call", shape: tuple[int, ...]) -> np.ndarray:
    """The keep mask (bool, `shape`) for this node, seed and shard: an element
    is kept when the top 53 bits of its hash, read as a fraction, are >= rate,
    so each is kept with probability 1 - rate."""
    if at.seed is None:
        raise InputError("dropout needs a seed when it runs for gradients: pass seed=... "
                         "(the Trainer derives one per step)")
    if at.per_example and len(shape) > 0:
        examples = np.arange(at.offset, at.offset + shape[0], dtype=np.uint64)
        per = math.prod(shape[1:])
    else:
        examples = np.array([NOT_PER_EXAMPLE], dtype=np.uint64)
        per = math.prod(shape)
    bits = uniform_bits(at.seed, at.node, examples, per)
    bits >>= np.uint64(11)
    return (bits >= np.uint64(math.ceil(at.rate * 2.0**53))).reshape(shape)


def _dropout_factor(at: "Call", x: np.ndarray) -> np.ndarray:
    """mask / (1 - rate) in x's dtype: 0 where dropped, the scale where kept (torch's noise tensor)."""
    scale = x.dtype.type(1) / x.dtype.type(1.0 - at.rate)
    return np.multiply(dropout_keep(at, x.shape), scale, dtype=x.dtype)


def _dropout_shape(at: Attrs, x: Shape) -> Shape:
    if not 0.0 <= at.rate < 1.0:
        raise GraphError(f"dropout rate must be in [0, 1), got {at.rate}")
    return x


def _dropout_forward(at: "Call", x: np.ndarray) -> np.ndarray:
    if not at.training or at.rate == 0.0:
        return x
    return np.multiply(x, _dropout_factor(at, x), dtype=x.dtype)


def _dropout_vjp(at: "Call", g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """g * mask / (1 - rate), the mask recomputed from the seed: reading it off
    the output (out != 0) would be wrong wherever x itself is 0."""
    if not at.training or at.rate == 0.0:
        return (g,)
    return (_scaled(g, _dropout_factor(at, x)),)


register(Op("dropout", 1, _dropout_shape, _dropout_forward, _dropout_vjp, linear_in="all", needs_seed=True,
            attrs={"rate": (float, REQUIRED)},
            doc="inverted dropout, as torch: in gradient runs each element is zeroed with probability `rate` "
                "and the kept ones scaled by 1 / (1 - rate); forward-only runs pass x through. The mask is a "
                "hash of (seed, node name, global example index, element index), so every split of the batch "
                "draws the same mask"))
# ---------------------------------------------------------------- reductions: min, logsumexp, var, std, argmax
#
# Like sum/mean they take `axes` (empty: all of them) and `keepdims`. Unlike
# sum/mean none of them is a sum over examples, so over the batch axis of a
# per-example value they are refused: a shard only sees its own examples.

def _keep_shape(axes: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if a in axes else d for a, d in enumerate(shape))


def _kept(at: Attrs, x: np.ndarray, *values: np.ndarray) -> tuple[np.ndarray, ...]:
    """Reduced values (g, out) reshaped to keep the reduced axes as size 1, so they broadcast against x."""
    if at.keepdims:
        return values
    shape = _keep_shape(_axes(at, x.ndim), x.shape)
    return tuple(np.reshape(v, shape) for v in values)


def _non_batch_reduction(name: str, why: str, nonempty: bool = False) -> Callable[[Attrs, Shape], Shape]:
    def rule(at: Attrs, x: Shape) -> Shape:
        axes = _axes(at, len(x))
        if is_per_example(x) and 0 in axes:
            raise GraphError(f"{name} over the batch axis (axis 0 of a per-example value) {why}, so it cannot "
                             "be split across workers; reduce the other axes (axis=1, ...)")
        if nonempty and any(x[a] == 0 for a in axes):
            raise GraphError(f"{name} over an axis of size 0 of {fmt(x)} has no value")
        return _reduce_shape(at, x)
    return rule


_MIXES = "would mix examples"


def _min_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """Ties share the gradient equally (torch.amin's rule; max does the same)."""
    g, out = _kept(at, x, g, out)
    winners = (x == out).astype(x.dtype)
    winners /= winners.sum(axis=_axes(at, x.ndim), keepdims=True)
    return (_scaled(g, winners),)


register(Op("min", 1, _non_batch_reduction("min", _MIXES, nonempty=True),
            lambda at, x: np.min(x, axis=_axes(at, x.ndim), keepdims=at.keepdims), _min_vjp,
            attrs=_REDUCE_ATTRS, doc="min over `axes` (all when absent, none when empty), not the batch axis; ties share the gradient"))


def _logsumexp(at: Attrs, x: np.ndarray) -> np.ndarray:
    """m + log(sum(exp(x - m))), m the max; an infinite m is not subtracted
    (torch's rule), so all -inf gives -inf and any +inf gives +inf."""
    axes = _axes(at, x.ndim)
    shift = np.max(x, axis=axes, keepdims=True)
    shift = np.where(np.isfinite(shift), shift, x.dtype.type(0))
    e = np.subtract(x, shift)
    np.exp(e, out=e)
    with np.errstate(divide="ignore"):  # log(0) = -inf: every value -inf
        result = np.log(np.sum(e, axis=axes, keepdims=True))
    result += shift
    return result if at.keepdims else np.reshape(result, _reduce_shape(at, x.shape))


def _logsumexp_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """g * softmax(x) = g * exp(x - out)."""
    g, out = _kept(at, x, g, out)
    t = np.subtract(x, out)
    np.exp(t, out=t)
    return (_scaled(g, t),)


register(Op("logsumexp", 1, _non_batch_reduction("logsumexp", _MIXES, nonempty=True), _logsumexp, _logsumexp_vjp,
            attrs=_REDUCE_ATTRS, doc="log(sum(exp(x))) over `axes`, stably (not the batch axis); "
                                     "gradient softmax(x)"))


def _count(at: Attrs, x: np.ndarray) -> int:
    return math.prod(x.shape[a] for a in _axes(at, x.ndim))


def _centered(at: Attrs, x: np.ndarray) -> np.ndarray:
    """x - mean(x) over the reduced axes, in a fresh array (two passes: no cancellation of E[x^2] - E[x]^2)."""
    return np.subtract(x, np.mean(x, axis=_axes(at, x.ndim), keepdims=True))


def _var(at: Attrs, x: np.ndarray) -> np.ndarray:
    d = _centered(at, x)
    np.multiply(d, d, out=d)
    return np.mean(d, axis=_axes(at, x.ndim), keepdims=at.keepdims)


def _var_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """2 (x - mean) / n * g (the mean's own gradient sums to zero)."""
    (g,) = _kept(at, x, g)
    d = _centered(at, x)
    d *= x.dtype.type(2.0 / _count(at, x)) if _count(at, x) else x.dtype.type(0)
    return (_scaled(g, d),)


def _std_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """(x - mean) / (n std) * g; where std is 0 (all values equal) the
    gradient is 0, as torch defines it, instead of 0/0."""
    g, out = _kept(at, x, g, out)
    scale = np.zeros(np.broadcast_shapes(np.shape(g), np.shape(out)), x.dtype)
    np.divide(g, out * x.dtype.type(max(_count(at, x), 1)), out=scale, where=out != 0)
    d = _centered(at, x)
    d *= scale
    return (d,)


_NOT_SEPARABLE = ("is a statistic of the whole batch (as batch norm's is), not a sum over examples: the variances "
                  "of the shards do not add up to the batch's")
register(Op("var", 1, _non_batch_reduction("var", _NOT_SEPARABLE), _var, _var_vjp, attrs=_REDUCE_ATTRS,
            doc="population variance (ddof=0, numpy's default) over `axes`, not the batch axis"))
register(Op("std", 1, _non_batch_reduction("std", _NOT_SEPARABLE), lambda at, x: np.sqrt(_var(at, x)), _std_vjp,
            attrs=_REDUCE_ATTRS, doc="population standard deviation over `axes`, not the batch axis; "
                                     "gradient 0 where it is 0 (torch's choice)"))


def _argmax_shape(at: Attrs, x: Shape) -> Shape:
    if not x:
        raise GraphError("argmax needs a value of rank 1 or more")
    axis = norm_axis(at.axis, len(x), "argmax")
    refuse_batch_axis(x, axis, "argmax")
    if x[axis] == 0:
        raise GraphError(f"argmax over an axis of size 0 of {fmt(x)} has no value")
    return tuple(1 if i == axis else d for i, d in enumerate(x)) if at.keepdims else x[:axis] + x[axis + 1:]


def _argmax_dtype(at: Attrs, x: np.dtype) -> np.dtype:
    if x not in FLOATS + INTS:
        raise GraphError(f"argmax needs a float or integer operand, got {x}")
    return np.dtype(np.int64)


register(Op("argmax", 1, _argmax_shape, lambda at, x: np.argmax(x, axis=at.axis, keepdims=at.keepdims), None,
            dtype=_argmax_dtype, attrs={"axis": (int, -1), "keepdims": (bool, False)},
            doc="int64 index of the max along one axis (the first on ties, as numpy and torch); "
                "forward only: no gradient"))


# ---------------------------------------------------------------- shape ops
#
# Axes count the batch axis of a per-example value as axis 0; sizes the user
# gives (tile reps, broadcast_to targets, pad widths) describe one example.
# All are linear ("all"): on batch-reduced values they act on each shard's
# partial sum, and the partial results add up to the whole batch's.

STATIC_RANK_LIMIT = 8  # program.MAX_RANK (program imports this module)
STATIC_ELEMENTS_LIMIT = 2 ** 28  # per example: refused before anything is allocated


def _sized(shape: Shape, what: str) -> Shape:
    """Results whose size comes from attributes (tile reps, pad widths, targets) are bounded up front."""
    if len(shape) > STATIC_RANK_LIMIT:
        raise GraphError(f"{what} would have rank {len(shape)}; the limit is {STATIC_RANK_LIMIT}")
    elements = math.prod(d for d in shape if d != BATCH)
    if elements > STATIC_ELEMENTS_LIMIT:
        raise GraphError(f"{what} would have {elements} elements per example; the limit is {STATIC_ELEMENTS_LIMIT}")
    return shape


def same_dtype(at: Attrs, *dtypes: np.dtype) -> np.dtype:
    """Moving values around works for any dtype (stacking argmax indices, say); gradients only reach floats."""
    if len(set(dtypes)) > 1:
        raise GraphError(f"operands must share one dtype, got {' and '.join(map(str, dtypes))}")
    return dtypes[0]


def _lead(shape: Shape, per_example: bool) -> tuple[Shape, Shape]:
    """(batch part, one example's part) of a shape."""
    return (shape[:1], shape[1:]) if per_example else ((), shape)


def _stack_shape(at: Attrs, *shapes: Shape) -> Shape:
    first = shapes[0]
    if any(s != first for s in shapes):
        raise GraphError("stack needs equal shapes, got " + ", ".join(map(fmt, shapes)))
    axis = norm_axis(at.axis, len(first) + 1, "stack")
    if axis == 0 and is_per_example(first):
        raise GraphError(f"stack at axis 0 would put the new axis before the batch axis of {fmt(first)} (axis 0 "
                         "of a per-example value is the batch axis); stack at axis 1 or later")
    return _sized(first[:axis] + (len(shapes),) + first[axis:], "stack")


register(Op("stack", None, _stack_shape, lambda at, *xs: np.stack(xs, axis=at.axis),
            lambda at, g, out, *xs: tuple(np.moveaxis(g, at.axis % out.ndim, 0)),
            dtype=same_dtype, linear_in="all", attrs={"axis": (int, REQUIRED)},
            doc="join equal shapes along a new axis (not before the batch axis)"))


def _expand_axes(at: Attrs, rank: int) -> tuple[int, ...]:
    out_rank = rank + len(at.axes)
    axes = tuple(sorted(norm_axis(a, out_rank, "expand_dims") for a in at.axes))
    if len(set(axes)) != len(axes):
        raise GraphError(f"expand_dims axes {tuple(at.axes)} name one axis twice")
    return axes


def _expand_dims_shape(at: Attrs, x: Shape) -> Shape:
    axes = _expand_axes(at, len(x))
    if 0 in axes and is_per_example(x):
        raise GraphError(f"expand_dims at axis 0 would put a new axis before the batch axis of {fmt(x)}")
    dims = iter(x)
    return _sized(tuple(1 if a in axes else next(dims) for a in range(len(x) + len(axes))), "expand_dims")


register(Op("expand_dims", 1, _expand_dims_shape, lambda at, x: np.expand_dims(x, _expand_axes(at, x.ndim)),
            lambda at, g, out, x: (np.reshape(g, x.shape),), dtype=same_dtype, linear_in="all",
            attrs={"axes": ("ints", REQUIRED)},
            doc="insert size-1 axes at `axes` of the result (not before the batch axis)"))


def _squeeze_axes(at: Attrs, shape: Shape, per_example: bool) -> tuple[int, ...]:
    """The named axes, or (none named) every size-1 axis but the batch axis, whose size is not static."""
    if not at.axes:
        return tuple(a for a, d in enumerate(shape) if d == 1 and not (a == 0 and per_example))
    return tuple(sorted({norm_axis(a, len(shape), "squeeze") for a in at.axes}))


def _squeeze_shape(at: Attrs, x: Shape) -> Shape:
    axes = _squeeze_axes(at, x, is_per_example(x))
    if 0 in axes and is_per_example(x):
        raise GraphError(f"squeeze cannot remove the batch axis of {fmt(x)}")
    wide = [a for a in axes if x[a] != 1]
    if wide:
        raise GraphError(f"squeeze: axis {wide[0]} of {fmt(x)} has size {x[wide[0]]}, not 1")
    return tuple(d for a, d in enumerate(x) if a not in axes)


register(Op("squeeze", 1, _squeeze_shape, lambda at, x: np.squeeze(x, _squeeze_axes(at, x.shape, at.per_example)),
            lambda at, g, out, x: (np.reshape(g, x.shape),), dtype=same_dtype, linear_in="all",
            attrs={"axes": ("ints", ())},
            doc="remove size-1 `axes` (none named: all size-1 axes but the batch axis)"))


def _pad_pairs(at: Attrs, rank: int, per_example: bool) -> list[tuple[int, int]]:
    widths = list(at.pad_width)
    inner = rank - 1 if per_example else rank
    if len(widths) != 2 * inner:
        raise GraphError(f"pad_width needs {inner} (before, after) pair(s), one per axis of "
                         f"{'one example' if per_example else 'the value'}; got {len(widths)} number(s)")
    if any(w < 0 for w in widths):
        raise GraphError(f"pad widths must be >= 0, got {tuple(widths)}")
    return [(0, 0)] * (rank - inner) + list(zip(widths[0::2], widths[1::2]))


def _pad_shape(at: Attrs, x: Shape, value: Shape) -> Shape:
    if value != ():
        raise GraphError(f"pad's fill value must be a scalar, got shape {fmt(value)}")
    pairs = _pad_pairs(at, len(x), is_per_example(x))
    return _sized(tuple(d if d == BATCH else d + lo + hi for d, (lo, hi) in zip(x, pairs)), "pad")


def _pad_inner(at: Attrs, x: np.ndarray, per_example: bool) -> tuple:
    """The index of the original values inside the padded result."""
    return tuple(slice(lo, lo + d) for d, (lo, _) in zip(x.shape, _pad_pairs(at, x.ndim, per_example)))


def _pad_forward(at: Attrs, x: np.ndarray, value: np.ndarray) -> np.ndarray:
    pairs = _pad_pairs(at, x.ndim, at.per_example)
    out = np.full(tuple(d + lo + hi for d, (lo, hi) in zip(x.shape, pairs)), value, dtype=x.dtype)
    out[_pad_inner(at, x, at.per_example)] = x
    return out


def _pad_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray, value: np.ndarray) -> tuple:
    inner = _pad_inner(at, x, at.per_example)
    grad_value = None
    if at.wants[1]:
        border = np.array(g, copy=True)
        border[inner] = 0
        grad_value = border.sum()
    return g[inner], grad_value


register(Op("pad", 2, _pad_shape, _pad_forward, _pad_vjp, linear_in="all",
            attrs={"pad_width": ("ints", REQUIRED)},
            doc="constant padding: (before, after) per axis of one example (the batch axis is never padded); "
                "the fill value is a scalar input, so pad is linear in (x, value) jointly: on a batch-reduced x "
                "the value counts once, however many shards"))


def _flip_axes(at: Attrs, rank: int) -> tuple[int, ...]:
    return tuple(sorted({norm_axis(a, rank, "flip") for a in at.axes}))


def _flip_shape(at: Attrs, x: Shape) -> Shape:
    if 0 in _flip_axes(at, len(x)) and is_per_example(x):
        raise GraphError(f"flip along the batch axis (axis 0 of {fmt(x)}) would mix examples; "
                         "name the other axes (axis=1, ...)")
    return x


register(Op("flip", 1, _flip_shape, lambda at, x: np.flip(x, _flip_axes(at, x.ndim)),
            lambda at, g, out, x: (np.flip(g, _flip_axes(at, x.ndim)),), dtype=same_dtype, linear_in="all",
            attrs={"axes": ("ints", REQUIRED)}, doc="reverse the order along `axes` (not the batch axis)"))


def _tile_layout(at: Attrs, shape: Shape, per_example: bool) -> tuple[Shape, Shape, Shape]:
    """(batch part, one example's shape and the reps, both padded with 1s to one length), as np.tile aligns them."""
    lead, example = _lead(shape, per_example)
    reps = tuple(int(r) for r in at.reps)
    if any(r < 1 for r in reps):
        raise GraphError(f"tile reps must be >= 1, got {reps}")
    rank = max(len(example), len(reps))
    return lead, (1,) * (rank - len(example)) + example, (1,) * (rank - len(reps)) + reps


def _tile_shape(at: Attrs, x: Shape) -> Shape:
    lead, example, reps = _tile_layout(at, x, is_per_example(x))
    return _sized(lead + tuple(e * r for e, r in zip(example, reps)), "tile")


def _tile_forward(at: Attrs, x: np.ndarray) -> np.ndarray:
    lead, example, reps = _tile_layout(at, x.shape, at.per_example)
    return np.tile(np.reshape(x, lead + example), (1,) * len(lead) + reps)


def _tile_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """Each copy's gradient summed: g viewed as (batch, r0, e0, r1, e1, ...), summed over the r axes."""
    lead, example, reps = _tile_layout(at, x.shape, at.per_example)
    split = lead + tuple(d for pair in zip(reps, example) for d in pair)
    rep_axes = tuple(len(lead) + 2 * i for i in range(len(reps)))
    return (np.reshape(np.sum(np.reshape(g, split), axis=rep_axes), x.shape),)


register(Op("tile", 1, _tile_shape, _tile_forward, _tile_vjp, dtype=same_dtype, linear_in="all",
            attrs={"reps": ("ints", REQUIRED)},
            doc="np.tile of each example (reps describe one example; the batch axis is never repeated)"))


def _broadcast_layout(at: Attrs, shape: Shape, per_example: bool) -> tuple[Shape, Shape, Shape]:
    """(batch part, one example's shape padded with 1s to the target's rank, the target)."""
    lead, example = _lead(shape, per_example)
    target = tuple(int(d) for d in at.shape)
    if len(target) < len(example):
        raise GraphError(f"broadcast_to target {target} has fewer axes than {fmt(shape)} "
                         f"({'one example has ' if per_example else ''}{len(example)})")
    padded = (1,) * (len(target) - len(example)) + example
    if any(d < 0 for d in target) or any(e not in (1, t) for e, t in zip(padded, target)):
        raise GraphError(f"cannot broadcast {fmt(shape)} to {fmt(lead + target)}"
                         + (" (the target is one example's shape; the batch axis is implicit)" if per_example else ""))
    return lead, padded, target


def _broadcast_to_shape(at: Attrs, x: Shape) -> Shape:
    lead, _, target = _broadcast_layout(at, x, is_per_example(x))
    return _sized(lead + target, "broadcast_to")


def _broadcast_to_forward(at: Attrs, x: np.ndarray) -> np.ndarray:
    """A read-only view, as np.broadcast_to gives: nothing is copied."""
    lead, padded, target = _broadcast_layout(at, x.shape, at.per_example)
    return np.broadcast_to(np.reshape(x, lead + padded), lead + target)


def _broadcast_to_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """g summed over the axes broadcasting added or stretched, here: the engine's
    unbroadcast would take a new leading axis for the batch axis."""
    lead, padded, target = _broadcast_layout(at, x.shape, at.per_example)
    stretched = tuple(len(lead) + a for a, (e, t) in enumerate(zip(padded, target)) if e != t)
    return (np.reshape(np.sum(g, axis=stretched) if stretched else g, x.shape),)


register(Op("broadcast_to", 1, _broadcast_to_shape, _broadcast_to_forward, _broadcast_to_vjp,
            dtype=same_dtype, linear_in="all",
            attrs={"shape": ("ints", REQUIRED)},
            doc="numpy broadcasting to `shape`, one example's shape for per-example values (batch axis implicit)"))


# ---------------------------------------------------------------- einsum

_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def parse_einsum(subscripts: str, operands: int) -> tuple[list[str], str]:
    """Explicit `ij,jk->ik` subscripts: one letter per axis, none repeated within an operand."""
    text = subscripts.replace(" ", "")
    if "..." in text:
        raise GraphError("einsum: '...' is not supported; name every axis with a letter")
    if text.count("->") != 1:
        raise GraphError(f"einsum subscripts {subscripts!r} need one '->' and the output's letters")
    left, out = text.split("->")
    ins = left.split(",")
    if len(ins) != operands:
        raise GraphError(f"einsum subscripts {subscripts!r} name {len(ins)} operand(s), {operands} given")
    for term in ins + [out]:
        if not set(term) <= _LETTERS:
            raise GraphError(f"einsum subscripts {subscripts!r}: use letters a-z, A-Z only")
        if len(set(term)) != len(term):
            raise GraphError(f"einsum subscripts {subscripts!r}: {term!r} repeats a letter (diagonals are "
                             "not supported)")
    if not set(out) <= set("".join(ins)):
        raise GraphError(f"einsum subscripts {subscripts!r}: output letters that no operand has")
    return ins, out


def einsum_batch_letter(ins: list[str], shapes: tuple[Shape, ...]) -> str:
    """The letter of the per-example operands' batch axis ('' when none is per-example)."""
    letters = {term[0] for term, shape in zip(ins, shapes) if is_per_example(shape) and term}
    if len(letters) > 1:
        raise GraphError(f"einsum names the batch axes of its per-example operands with different letters "
                         f"({', '.join(sorted(letters))}): that would pair every example with every other")
    return letters.pop() if letters else ""


def _einsum_shape(at: Attrs, *shapes: Shape) -> Shape:
    ins, out = parse_einsum(at.subscripts, len(shapes))
    sizes: dict[str, int] = {}
    for term, shape in zip(ins, shapes):
        if len(term) != len(shape):
            raise GraphError(f"einsum: {term!r} names {len(term)} axes, the operand {fmt(shape)} has {len(shape)}")
        for letter, d in zip(term, shape):
            known = sizes.setdefault(letter, d)
            if known != d:
                raise GraphError(f"einsum: axis {letter!r} is " + (
                    "the batch axis in one operand and a fixed-size axis in another" if BATCH in (known, d)
                    else f"{known} in one operand and {d} in another"))
    batch = einsum_batch_letter(ins, shapes)
    if batch and batch in out and out[0] != batch:
        raise GraphError(f"einsum output {out!r} would move the batch axis {batch!r} away from the front")
    if batch and batch not in out and sum(is_per_example(s) for s in shapes) > 1:
        raise GraphError(f"einsum contracts the batch axis {batch!r} of several per-example operands; keep it in "
                         f"the output and sum over it (gp.einsum does this)")
    return tuple(sizes[letter] for letter in out)


def _einsum_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, *xs: np.ndarray) -> tuple:
    """Operand k's gradient is the einsum of g with the other operands into k's
    letters; letters only k has (summed within k alone) are broadcast back."""
    ins, out_term = parse_einsum(at.subscripts, len(xs))
    grads: list = []
    for k, (term, x) in enumerate(zip(ins, xs)):
        if not at.wants[k]:
            grads.append(None)
            continue
        others = [(t, y) for j, (t, y) in enumerate(zip(ins, xs)) if j != k]
        elsewhere = set(out_term).union(*(t for t, _ in others))
        kept = "".join(letter for letter in term if letter in elsewhere)
        spec = ",".join([out_term] + [t for t, _ in others]) + "->" + kept
        grad = np.einsum(spec, g, *(y for _, y in others), optimize=True)
        if kept != term:
            grad = np.broadcast_to(np.reshape(grad, tuple(d if letter in elsewhere else 1
                                                          for letter, d in zip(term, x.shape))), x.shape)
        grads.append(grad)
    return tuple(grads)


register(Op("einsum", None, _einsum_shape, lambda at, *xs: np.einsum(at.subscripts, *xs, optimize=True), _einsum_vjp,
            linear_in="each", attrs={"subscripts": (str, REQUIRED)},
            doc="np.einsum with explicit subscripts ('ij,jk->ik'); a per-example operand's first letter is its "
                "batch axis: leading in the output, or summed over when only that operand has it"))
# ---------------------------------------------------------------- math: sin ... expm1, erf, gelu (issue 13)

# erf and erfc: numpy has neither and scipy is no runtime dependency. These
# are the rational approximations of Sun's fdlibm (s_erf.c: "Copyright (C)
# 1993 by Sun Microsystems, Inc. ... Permission to use, copy, modify, and
# distribute this software is freely granted, provided that this notice is
# preserved"), published with an error under 1 ulp, evaluated here in float64
# region by region over masks of the argument (no loop over elements).
# tests/test_ops_math.py checks them against math.erf and math.erfc.
_ERX = 8.45062911510467529297e-01  # erf(1) rounded to 24 bits, so 1 - _ERX is exact
_ERF_PP = (1.28379167095512558561e-01, -3.25042107247001499370e-01, -2.84817495755985104766e-02,
           -5.77027029648944159157e-03, -2.37630166566501626084e-05)
_ERF_QQ = (1.0, 3.97917223959155352819e-01, 6.50222499887672944485e-02, 5.08130628187576562776e-03,
           1.32494738004321644526e-04, -3.96022827877536812320e-06)
_ERF_PA = (-2.36211856075265944077e-03, 4.14856118683748331666e-01, -3.72207876035701323847e-01,
           3.18346619901161753674e-01, -1.10894694282396677476e-01, 3.54783043256182359371e-02,
           -2.16637559486879084300e-03)
_ERF_QA = (1.0, 1.06420880400844228286e-01, 5.40397917702171048937e-01, 7.18286544141962662868e-02,
           1.26171219808761642112e-01, 1.36370839120290507362e-02, 1.19844998467991074170e-02)
_ERFC_RA = (-9.86494403484714822705e-03, -6.93858572707181764372e-01, -1.05586262253232909814e+01,
            -6.23753324503260060396e+01, -1.62396669462573470355e+02, -1.84605092906711035994e+02,
            -8.12874355063065934246e+01, -9.81432934416914548592e+00)
_ERFC_SA = (1.0, 1.96512716674392571292e+01, 1.37657754143519042600e+02, 4.34565877475229228821e+02,
            6.45387271733267880336e+02, 4.29008140027567833386e+02, 1.08635005541779435134e+02,
            6.57024977031928170135e+00, -6.04244152148580987438e-02)
_ERFC_RB = (-9.86494292470009928597e-03, -7.99283237680523006574e-01, -1.77579549177547519889e+01,
            -1.60636384855821916062e+02, -6.37566443368389627722e+02, -1.02509513161107724954e+03,
            -4.83519191608651397019e+02)
_ERFC_SB = (1.0, 3.03380607434824582924e+01, 3.25792512996573918826e+02, 1.53672958608443695994e+03,
            3.19985821950859553908e+03, 2.55305040643316442583e+03, 4.74528541206955367215e+02,
            -2.24409524465858183362e+01)


def _poly(z: np.ndarray, coeffs: tuple[float, ...]) -> np.ndarray:
    """c0 + z (c1 + z (c2 + ...)), Horner's rule over whole arrays."""
    acc = np.full_like(z, coeffs[-1])
    for c in coeffs[-2::-1]:
        acc *= z
        acc += c
    return acc


def _erf_core(x: np.ndarray) -> np.ndarray:
    """x P(x^2) / Q(x^2), |x| < 0.84375: erf(x) = x + this."""
    z = x * x
    return x * (_poly(z, _ERF_PP) / _poly(z, _ERF_QQ))


def _erf_mid(a: np.ndarray) -> np.ndarray:
    """P(a - 1) / Q(a - 1), 0.84375 <= a < 1.25: erf(a) = _ERX + this."""
    s = a - 1
    return _poly(s, _ERF_PA) / _poly(s, _ERF_QA)


def _erfc_tail(a: np.ndarray) -> np.ndarray:
    """erfc(a) for 1.25 <= a < 28: exp(-a^2 - 0.5625 + R(1/a^2) / S(1/a^2)) / a, with
    a^2 split as z^2 + (a - z)(a + z), z = a with its low 32 bits cleared, so
    that z^2 is exact and the large exponent carries no rounding error."""
    s = 1 / (a * a)
    near = a < 1 / 0.35
    ratio = np.empty_like(a)
    ratio[near] = _poly(s[near], _ERFC_RA) / _poly(s[near], _ERFC_SA)
    far = ~near
    ratio[far] = _poly(s[far], _ERFC_RB) / _poly(s[far], _ERFC_SB)
    z = (a.view(np.uint64) & np.uint64(0xFFFFFFFF00000000)).view(np.float64)
    r = np.exp(-z * z - 0.5625)
    r *= np.exp((z - a) * (z + a) + ratio)
    return r / a


def _erf64(x: np.ndarray) -> np.ndarray:
    """erf in float64 for any array (NaN stays NaN, erf(+-inf) = +-1)."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    a = np.abs(flat)
    out = flat.copy()  # NaN falls in no region below and stays NaN
    small = a < 0.84375
    out[small] = flat[small] + _erf_core(flat[small])
    mid = (a >= 0.84375) & (a < 1.25)
    out[mid] = np.copysign(_ERX + _erf_mid(a[mid]), flat[mid])
    tail = (a >= 1.25) & (a < 6)
    out[tail] = np.copysign(1 - _erfc_tail(a[tail]), flat[tail])
    far = a >= 6  # erf is 1 to within half an ulp from here on
    out[far] = np.copysign(1.0, flat[far])
    return out.reshape(np.shape(x))


def _erfc64(x: np.ndarray) -> np.ndarray:
    """erfc = 1 - erf in float64, accurate relative to erfc itself on the
    right tail (where 1 - erf(x) would cancel to 0)."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    a = np.abs(flat)
    out = flat.copy()
    small = a < 0.84375
    xs = flat[small]
    xy = _erf_core(xs)
    out[small] = np.where(xs < 0.25, 1 - (xs + xy), 0.5 - (xy + (xs - 0.5)))
    mid = (a >= 0.84375) & (a < 1.25)
    pq = _erf_mid(a[mid])
    out[mid] = np.where(flat[mid] > 0, (1 - _ERX) - pq, 1 + (_ERX + pq))
    tail = (a >= 1.25) & (a < 28)
    r = _erfc_tail(a[tail])
    out[tail] = np.where(flat[tail] > 0, r, 2 - r)
    far = a >= 28  # erfc underflows to 0 (or is 2 to the last bit)
    out[far] = np.where(flat[far] > 0, 0.0, 2.0)
    return out.reshape(np.shape(x))


_TWO_OVER_SQRT_PI = 2 / math.sqrt(math.pi)
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_GELU_TANH_BETA = math.sqrt(2 / math.pi)
_GELU_TANH_KAPPA = 0.044715
# |x| beyond this only multiplies something that is exactly 0 (x Phi(x) at
# -inf, x (1 - sigmoid(x)) at +inf): x is capped there so that those products
# are the limit, 0, rather than inf * 0 = NaN. 1e10 cubed still fits float32.
_CAP = 1e10


def _capped(x: np.ndarray) -> np.ndarray:
    return np.clip(x, x.dtype.type(-_CAP), x.dtype.type(_CAP))


def _erf_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """2/sqrt(pi) e^(-x^2): 0 at +-inf and for huge |x|."""
    t = np.square(x)
    np.negative(t, out=t)
    np.exp(t, out=t)
    t *= x.dtype.type(_TWO_OVER_SQRT_PI)
    return (_scaled(g, t),)


def _normal_cdf64(x: np.ndarray) -> np.ndarray:
    """Phi(x) = erfc(-x / sqrt 2) / 2 in float64: accurate relative to Phi on the
    left tail too, where (1 + erf(x / sqrt 2)) / 2 cancels to 0 (torch's form)."""
    return 0.5 * _erfc64(np.multiply(x, -_SQRT_HALF, dtype=np.float64))


def _gelu_forward(at: Attrs, x: np.ndarray) -> np.ndarray:
    if at.approximate == "tanh":
        xc = _capped(x)
        t = np.tanh(x.dtype.type(_GELU_TANH_BETA) * (xc + x.dtype.type(_GELU_TANH_KAPPA) * xc * xc * xc))
        t += 1
        t *= np.maximum(x, x.dtype.type(-_CAP))
        t *= x.dtype.type(0.5)
        return t
    cdf = _normal_cdf64(x)
    cdf *= np.maximum(x, -_CAP, dtype=np.float64)
    return cdf.astype(x.dtype, copy=False)


def _gelu_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """exact: Phi(x) + x phi(x); tanh form: d/dx of 0.5 x (1 + tanh(u)), as torch
    writes it. Both go to 0 at -inf and 1 at +inf (never inf * 0)."""
    if at.approximate == "tanh":
        xc = _capped(x)
        beta, kappa = x.dtype.type(_GELU_TANH_BETA), x.dtype.type(_GELU_TANH_KAPPA)
        x2 = xc * xc
        t = np.tanh(beta * (xc + kappa * x2 * xc))
        slope = (1 - t * t) * (beta * (1 + x.dtype.type(3) * kappa * x2))
        slope *= xc
        t += 1
        t += slope
        t *= x.dtype.type(0.5)
        return (_scaled(g, t),)
    xc = _capped(x.astype(np.float64))
    d = np.exp(-0.5 * xc * xc)
    d *= xc
    d *= _INV_SQRT_2PI
    d += _normal_cdf64(x)
    return (_scaled(g, d.astype(x.dtype, copy=False)),)


def _gelu_shape(at: Attrs, x: Shape) -> Shape:
    if at.approximate not in ("none", "tanh"):
        raise GraphError(f"gelu approximate must be 'none' or 'tanh', got {quoted(at.approximate)}")
    return x


def _silu_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """s (1 + x (1 - s)), s = sigmoid(x), as torch; x capped so the ends give 0 and 1."""
    s = _sigmoid(x)
    t = np.subtract(1, s)
    t *= _capped(x)
    t += 1
    t *= s
    return (_scaled(g, t),)


def _elu_forward(at: Attrs, x: np.ndarray) -> np.ndarray:
    negative = np.expm1(np.minimum(x, 0))  # never overflows
    negative *= x.dtype.type(at.alpha)
    return np.where(x > 0, x, negative)


def _elu_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """1 for x > 0, alpha e^x for x <= 0 (alpha at 0, as torch)."""
    t = np.exp(np.minimum(x, 0))
    t *= x.dtype.type(at.alpha)
    t[x > 0] = 1
    return (_scaled(g, t),)


unary("sin", lambda at, x: np.sin(x), lambda at, g, out, x: (_scaled(g, np.cos(x)),), "sine; derivative cos")
unary("cos", lambda at, x: np.cos(x), lambda at, g, out, x: (_scaled(g, np.negative(np.sin(x))),),
      "cosine; derivative -sin")
unary("erf", lambda at, x: _erf64(x).astype(x.dtype, copy=False), _erf_vjp,
      "error function (fdlibm's approximation in float64, under 1 ulp); derivative 2/sqrt(pi) e^(-x^2)")
register(Op("gelu", 1, _gelu_shape, _gelu_forward, _gelu_vjp, attrs={"approximate": (str, "none")},
            doc="x Phi(x) (approximate 'none', via erf) or torch's tanh form (approximate 'tanh'); "
                "gelu(-inf) = 0 and its gradient 0 (the limits, where torch's formula gives NaN)"))
unary("silu", lambda at, x: np.multiply(np.maximum(x, x.dtype.type(-_CAP)), _sigmoid(x)), _silu_vjp,
      "x sigmoid(x) (swish); silu(-inf) = 0, gradients 0 at -inf and 1 at +inf (the limits)")
unary("elu", _elu_forward, _elu_vjp, "x if x > 0 else alpha (e^x - 1); gradient alpha at 0, as torch",
      alpha=(float, 1.0))
unary("log1p", lambda at, x: np.log1p(x), lambda at, g, out, x: (g / (x + x.dtype.type(1)),),
      "log(1 + x), accurate for small x; derivative 1 / (1 + x)")
unary("expm1", lambda at, x: np.expm1(x), lambda at, g, out, x: (_scaled(g, out + out.dtype.type(1)),),
      "e^x - 1, accurate for small x; derivative e^x = out + 1")


# ---------------------------------------------------------------- comparisons, where, clip, casts (issue 13)

DTYPES_BY_NAME = {str(np.dtype(d)): np.dtype(d) for d in (np.float32, np.float64, np.int32, np.int64, np.bool_)}
VALUE_DTYPES = tuple(DTYPES_BY_NAME.values())


def _named_dtype(name: str, what: str) -> np.dtype:
    if name not in DTYPES_BY_NAME:
        raise GraphError(f"{what}: unknown dtype {quoted(name)}; choose one of {', '.join(DTYPES_BY_NAME)}")
    return DTYPES_BY_NAME[name]


def _no_gradient(at: Attrs, g: np.ndarray, out: np.ndarray, *xs: np.ndarray) -> tuple:
    return (None,) * len(xs)


def _compare_dtype(at: Attrs, a: np.dtype, b: np.dtype) -> np.dtype:
    if a != b or a not in VALUE_DTYPES:
        raise GraphError(f"a comparison needs operands of one dtype, got {a} and {b}")
    return np.dtype(np.bool_)


for _name, _ufunc, _symbol in (("less", np.less, "<"), ("less_equal", np.less_equal, "<="),
                               ("greater", np.greater, ">"), ("greater_equal", np.greater_equal, ">="),
                               ("equal", np.equal, "=="), ("not_equal", np.not_equal, "!=")):
    register(Op(_name, 2, elementwise_shape, (lambda f: lambda at, a, b: f(a, b))(_ufunc), _no_gradient,
                dtype=_compare_dtype, passes_gradient=False,
                doc=f"a {_symbol} b elementwise, as bool; takes no gradient (use it as a `where` condition)"))
del _name, _ufunc, _symbol


def _where_dtype(at: Attrs, cond: np.dtype, a: np.dtype, b: np.dtype) -> np.dtype:
    if cond != np.dtype(np.bool_):
        raise GraphError(f"where needs a bool condition (a comparison), got {cond}")
    if a != b or a not in VALUE_DTYPES:
        raise GraphError(f"where needs both branches of one dtype, got {a} and {b}")
    return a


def _where_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, cond: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple:
    """g where cond holds to a, elsewhere to b (0 to the branch not taken, even
    where that branch is inf or NaN)."""
    zero = np.asarray(g).dtype.type(0)
    return (None, np.where(cond, g, zero) if at.wants[1] else None,
            np.where(cond, zero, g) if at.wants[2] else None)


register(Op("where", 3, elementwise_shape, lambda at, cond, a, b: np.where(cond, a, b), _where_vjp,
            dtype=_where_dtype,
            doc="a where cond else b (broadcasting); the gradient follows the branch taken. As in torch, an inf "
                "or NaN inside the branch not taken still reaches the gradient through that branch's own rule "
                "(0 * inf): make it safe first, log(where(x > 0, x, 1))"))


def _clip_bounds(at: Attrs, dtype: np.dtype) -> tuple:
    return dtype.type(at.lo), dtype.type(at.hi)


def _clip_shape(at: Attrs, x: Shape) -> Shape:
    if math.isnan(at.lo) or math.isnan(at.hi) or at.lo > at.hi:
        raise GraphError(f"clip needs lo <= hi, got lo={at.lo} and hi={at.hi}")
    return x


def _clip_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """1 where lo <= x <= hi, bounds included (as torch.clamp), else 0."""
    lo, hi = _clip_bounds(at, x.dtype)
    inside = np.greater_equal(x, lo)
    inside &= np.less_equal(x, hi)
    return (_scaled(g, inside.astype(x.dtype)),)


register(Op("clip", 1, _clip_shape, lambda at, x: np.clip(x, *_clip_bounds(at, x.dtype)), _clip_vjp,
            attrs={"lo": (float, -math.inf), "hi": (float, math.inf)},
            doc="x limited to [lo, hi] (constants; +-inf leave a side open); gradient 1 inside, bounds included"))


def _take_along_shape(at: Attrs, x: Shape, idx: Shape) -> Shape:
    if len(x) != len(idx) or not x:
        raise GraphError(f"take_along_axis needs indices of the same rank as the values, got {fmt(x)} and {fmt(idx)}")
    axis = norm_axis(at.axis, len(x), "take_along_axis")
    refuse_batch_axis(x, axis, "take_along_axis")
    others = broadcast(x[:axis] + (1,) + x[axis + 1:], idx[:axis] + (1,) + idx[axis + 1:])
    return check_batch_leading(others[:axis] + (idx[axis],) + others[axis + 1:], "take_along_axis")


def _take_along_dtype(at: Attrs, x: np.dtype, idx: np.dtype) -> np.dtype:
    if x not in FLOATS or idx not in INTS:
        raise GraphError(f"take_along_axis needs float values and integer indices, got {x} and {idx}")
    return x


def _take_along_forward(at: Attrs, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    axis = at.axis % x.ndim
    _check_range(idx, x.shape[axis], "index")
    return np.take_along_axis(x, idx, axis=axis)


def _take_along_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray, idx: np.ndarray) -> tuple:
    """g scattered back to the positions read, duplicates adding up (np.add.at),
    in the broadcast shape (the engine sums it down to x's)."""
    axis = at.axis % x.ndim
    full = out.shape[:axis] + (x.shape[axis],) + out.shape[axis + 1:]
    grad = np.zeros(full, x.dtype)
    where = tuple(np.broadcast_to(idx, out.shape) if d == axis else
                  np.arange(out.shape[d]).reshape([-1 if e == d else 1 for e in range(x.ndim)])
                  for d in range(x.ndim))
    np.add.at(grad, where, g)
    return grad, None


register(Op("take_along_axis", 2, _take_along_shape, _take_along_forward, _take_along_vjp, dtype=_take_along_dtype, linear_in="first",
            attrs={"axis": (int, -1)},
            doc="numpy's take_along_axis (torch.gather): indices in [0, n) along an axis other than the batch "
                "axis of the values; the gradient scatters back, repeated indices accumulating"))


def _one_hot_shape(at: Attrs, labels: Shape) -> Shape:
    if at.n < 1:
        raise GraphError(f"one_hot needs n >= 1 classes, got {at.n}")
    return tuple(labels) + (at.n,)


def _one_hot_dtype(at: Attrs, labels: np.dtype) -> np.dtype:
    if labels not in INTS:
        raise GraphError(f"one_hot needs integer labels, got {labels}")
    return _named_dtype(at.dtype, "one_hot")


def _one_hot_forward(at: Attrs, labels: np.ndarray) -> np.ndarray:
    _check_range(labels, at.n, "label")
    hot = np.equal(labels[..., None], np.arange(at.n, dtype=labels.dtype))
    return hot.astype(_named_dtype(at.dtype, "one_hot"), copy=False)


register(Op("one_hot", 1, _one_hot_shape, _one_hot_forward, _no_gradient, dtype=_one_hot_dtype,
            passes_gradient=False, attrs={"n": (int, REQUIRED), "dtype": (str, "float32")},
            doc="integer labels in [0, n) as one-hot rows of n (a new last axis); out-of-range labels are an "
                "InputError"))


def _cast_dtype(at: Attrs, x: np.dtype) -> np.dtype:
    if x not in VALUE_DTYPES:
        raise GraphError(f"cannot cast {x}")
    return _named_dtype(at.dtype, "cast")


def _cast_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """float to float: the gradient cast back to the input's dtype. Casts to or
    from integers and bool carry none (the engine's gradient path stops there)."""
    return (np.asarray(g).astype(x.dtype) if x.dtype in FLOATS and out.dtype in FLOATS else None,)


register(Op("cast", 1, elementwise_shape, lambda at, x: x.astype(_named_dtype(at.dtype, "cast"), copy=False),
            _cast_vjp, dtype=_cast_dtype, attrs={"dtype": (str, REQUIRED)},
            doc="x in another dtype (numpy's astype: float to int truncates toward 0); a float-to-float cast "
                "passes the gradient back in the input's dtype, any other takes none"))

register(Op("stop_gradient", 1, elementwise_shape, lambda at, x: x, _no_gradient, linear_in="all",
            dtype=lambda at, x: x, passes_gradient=False,
            doc="x unchanged, but no gradient flows back through it (a constant to differentiation)"))


def _pow_tensor_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple:
    """As torch.pow with a tensor exponent: d/dx = y x^(y - 1), 0 where y = 0;
    d/dy = x^y log x, 0 where x = 0 and y >= 0 (NaN for x < 0, as there)."""
    grad_x = grad_y = None
    with np.errstate(divide="ignore", invalid="ignore"):
        if at.wants[0]:
            d = x ** (y - y.dtype.type(1))
            d *= y
            grad_x = np.where(y == 0, x.dtype.type(0), d * g)
        if at.wants[1]:
            d = out * np.log(x)
            grad_y = np.where((x == 0) & (y >= 0), y.dtype.type(0), d * g)
    return grad_x, grad_y


binary("pow_tensor", lambda at, x, y: np.power(x, y), _pow_tensor_vjp,
       "x ** y elementwise, y a tensor (`x ** y` with y an Expr, `2 ** x`); gradients as torch.pow")
# ---------------------------------------------------------------- take (integer indexing of one axis)

def _take_shape(at: Attrs, x: Shape) -> Shape:
    axis = norm_axis(at.axis, len(x), "take")
    if axis == 0 and is_per_example(x):
        raise GraphError(f"take along the batch axis of {fmt(x)} would mix examples, so it cannot be split "
                         "across workers; index the other axes (the batch axis is axis 0)")
    if not at.indices:
        raise GraphError("take needs at least one index")
    size, indices = x[axis], np.asarray(at.indices, dtype=np.int64)
    outside = (indices < -size) | (indices >= size)
    if outside.any():
        raise GraphError(f"index {indices[outside][0]} is out of range for axis {axis} of {fmt(x)} (size {size})")
    return x[:axis] + (len(at.indices),) + x[axis + 1:]


def _take_vjp(at: Attrs, g: np.ndarray, out: np.ndarray, x: np.ndarray) -> tuple:
    """Scatter-add: an index taken twice gets both contributions (np.add.at
    accumulates repeats; plain fancy assignment would keep only the last)."""
    grad = np.zeros_like(x)
    np.add.at(grad, (slice(None),) * (at.axis % x.ndim) + (np.asarray(at.indices, dtype=np.intp),), g)
    return (grad,)


register(Op("take", 1, _take_shape, lambda at, x: np.take(x, np.asarray(at.indices, dtype=np.intp), axis=at.axis),
            _take_vjp, linear_in="all",
            attrs={"indices": ("ints", REQUIRED), "axis": (int, REQUIRED)},
            doc="entries at constant integer `indices` (negative count from the end, repeats allowed) along "
                "one axis other than the batch axis, as np.take; the gradient scatter-adds, so repeats accumulate"))
# ---------------------------------------------------------------- more ops, same registry

# Convolution, pooling and layer norm live in ops_nn.py, which registers into
# REGISTRY above; importing it here (last, once every name it uses exists)
# means whoever imports the registry sees them.
from . import ops_nn  # noqa: E402,F401
