"""Building computation graphs that read like numpy.

Every expression becomes a node as soon as it is written, and the engine's
own shape rule checks it then, so a mistake is reported at the user's line
with the op and the shapes, not later on a worker. Shapes given by the user
exclude the batch axis of inputs; inside the graph it is the leading -1.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from gradpool.protos import gradpool_pb2 as pb
from gradpool.worker.engine import Program, graph_id, to_tensor
from gradpool.worker.engine.errors import GradpoolError, GraphError
from gradpool.worker.engine.ops import BATCH, FLOATS, Call, fmt, get_op, is_per_example
from gradpool.worker.engine.sharding import SOURCES
from gradpool.worker.engine.tensors import DTYPE_TO_PROTO, as_dtype

_SDK_DIR = os.path.dirname(os.path.abspath(__file__))
INITS = ("glorot", "he", "zeros", "ones", "normal")
Operand = Union["Expr", float, int, np.ndarray]


def _user_origin() -> str:
    """file:line of the first frame outside the SDK: where the user built the node."""
    frame = sys._getframe(1)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _SDK_DIR:
        frame = frame.f_back
    if frame is None:
        return ""
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


def _refused(subject: str, detail: str) -> GraphError:
    """A graph-build error the SDK finds itself, worded like the registry's and
    carrying the user's file:line as they do."""
    origin = _user_origin()
    return GraphError(f"{subject}{f' at {origin}' if origin else ''}: {detail}")


@dataclass
class _Node:
    name: str
    op: str
    inputs: tuple[int, ...]
    attrs: dict[str, Any]
    shape: tuple[int, ...]
    dtype: np.dtype
    origin: str = ""
    value: Optional[np.ndarray] = field(default=None, repr=False)


class Expr:
    """A node of a Graph, with numpy-like operators that add more nodes."""

    __array_priority__ = 1000  # numpy array (op) Expr defers to Expr

    def __init__(self, graph: "Graph", index: int):
        self.graph = graph
        self.index = index

    @property
    def _node(self) -> _Node:
        return self.graph._nodes[self.index]

    @property
    def name(self) -> str:
        return self._node.name

    @property
    def shape(self) -> tuple[Optional[int], ...]:
        """Static shape; None marks the batch axis."""
        return tuple(None if d == BATCH else d for d in self._node.shape)

    @property
    def dtype(self) -> np.dtype:
        return self._node.dtype

    @property
    def ndim(self) -> int:
        return len(self._node.shape)

    def named(self, name: str) -> "Expr":
        """Give this node a name (to ask for its value in `evaluate`)."""
        self.graph._rename(self.index, name)
        return self

    def __repr__(self) -> str:
        return f"<Expr {self.name!r} {self._node.op} {fmt(self._node.shape)} {self.dtype}>"

    def __bool__(self) -> bool:
        raise GraphError("an Expr has no truth value until the graph runs; use gp.where, gp.maximum or gp.minimum")

    def _binary(self, op: str, other: Operand, reverse: bool = False) -> "Expr":
        other_expr = self.graph._lift(other, self.dtype)
        args = (other_expr, self) if reverse else (self, other_expr)
        return self.graph._add(op, args)

    def __add__(self, o: Operand) -> "Expr": return self._binary("add", o)
    def __radd__(self, o: Operand) -> "Expr": return self._binary("add", o, True)
    def __sub__(self, o: Operand) -> "Expr": return self._binary("sub", o)
    def __rsub__(self, o: Operand) -> "Expr": return self._binary("sub", o, True)
    def __mul__(self, o: Operand) -> "Expr": return self._binary("mul", o)
    def __rmul__(self, o: Operand) -> "Expr": return self._binary("mul", o, True)
    def __truediv__(self, o: Operand) -> "Expr": return self._binary("div", o)
    def __rtruediv__(self, o: Operand) -> "Expr": return self._binary("div", o, True)
    def __matmul__(self, o: Operand) -> "Expr": return _matmul(self, self.graph._lift(o, self.dtype))
    def __rmatmul__(self, o: Operand) -> "Expr": return _matmul(self.graph._lift(o, self.dtype), self)
    def __neg__(self) -> "Expr": return self.graph._add("neg", (self,))

    def __pow__(self, exponent: Operand) -> "Expr":
        """x ** c with a constant number c (op pow); x ** y with y an Expr or an
        array is elementwise (op pow_tensor), with torch.pow's gradients."""
        if isinstance(exponent, (Expr, np.ndarray)):
            return self.graph._add("pow_tensor", (self, self.graph._lift(exponent, self.dtype)))
        if not np.isscalar(exponent) or isinstance(exponent, (str, bytes)):
            raise _error_here("x ** y", f"the exponent must be a number, an array or an Expr, got {type(exponent).__name__}")
        if exponent == 2:
            return self.graph._add("square", (self,))
        return self.graph._add("pow", (self,), exponent=float(exponent))

    def __rpow__(self, base: Union[float, np.ndarray]) -> "Expr":
        """base ** x for a positive constant base (2 ** x): base^x elementwise, whose
        gradient is base^x log(base). A base <= 0 has no real log and is refused."""
        array = np.asarray(base)
        if array.dtype.kind not in "iuf" or array.size == 0 or not np.all(np.isfinite(array)) or np.any(array <= 0):
            raise _error_here("base ** x", f"needs a finite positive constant base, got {_short(base)}; "
                              "for a negative base write it with abs, where or an integer power")
        return self.graph._add("pow_tensor", (self.graph._lift(array, self.dtype), self))

    def __abs__(self) -> "Expr": return self.graph._add("abs", (self,))

    # Comparisons build bool nodes (numpy's semantics), so == and != no longer
    # compare Exprs as objects: hashing stays by identity, and nothing in the
    # SDK keys dicts by, or looks up, Exprs with == (they index nodes by
    # position: Expr.index).
    __hash__ = object.__hash__

    def _compare(self, op: str, other: object) -> "Expr":
        return self.graph._add(op, (self, self.graph._lift_exact(other, self.dtype)))  # type: ignore[arg-type]

    def __lt__(self, o: Operand) -> "Expr": return self._compare("less", o)
    def __le__(self, o: Operand) -> "Expr": return self._compare("less_equal", o)
    def __gt__(self, o: Operand) -> "Expr": return self._compare("greater", o)
    def __ge__(self, o: Operand) -> "Expr": return self._compare("greater_equal", o)

    def __eq__(self, o: object) -> "Expr":  # type: ignore[override]
        if not _comparable(o):
            return NotImplemented
        return self._compare("equal", o)

    def __ne__(self, o: object) -> "Expr":  # type: ignore[override]
        if not _comparable(o):
            return NotImplemented
        return self._compare("not_equal", o)

    def astype(self, dtype: Any) -> "Expr":
        """This value in another dtype (op cast): float to float passes the
        gradient back, to or from integers and bool it takes none."""
        from gradpool.functional import cast
        return cast(self, dtype)

    def clip(self, lo: Optional[float] = None, hi: Optional[float] = None) -> "Expr":
        """Limited to [lo, hi]; gradient 1 inside, bounds included (torch.clamp)."""
        from gradpool.functional import clip
        return clip(self, lo, hi)

    @property
    def T(self) -> "Expr":
        """Swap the last two axes (matrix transpose), like numpy's .T on 2-D arrays."""
        if self.ndim < 2:
            return self
        perm = list(range(self.ndim))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        return self.graph._add("transpose", (self,), perm=tuple(perm))

    def sum(self, axis: Union[None, int, Sequence[int]] = None, keepdims: bool = False) -> "Expr":
        """Sum over `axis` as numpy's (None: all, the batch axis 0 included; (): none)."""
        return self.graph._add("sum", (self,), axes=_axes(axis, self.ndim), keepdims=keepdims)

    def mean(self, axis: Union[None, int, Sequence[int]] = None, keepdims: bool = False) -> "Expr":
        """Mean; over the batch axis it divides by the whole batch, however it is sharded."""
        return self.graph._add("mean", (self,), axes=_axes(axis, self.ndim), keepdims=keepdims)

    def max(self, axis: Union[None, int, Sequence[int]] = None, keepdims: bool = False) -> "Expr":
        """Max over `axis` as numpy's (None: all). Not over the batch axis, which
        would mix examples: of a per-example value give the other axes."""
        return self.graph._add("max", (self,), axes=_axes(axis, self.ndim), keepdims=keepdims)

    def take(self, indices: Any, axis: Optional[int] = None) -> "Expr":
        """np.take with constant integer indices: the entries at `indices` along `axis`."""
        return _take(self, indices, axis)

    # Reductions that are not sums over examples: over the batch axis (axis 0
    # of a per-example value) they are refused, so name the other axes.
    def min(self, axis: Union[None, int, Sequence[int]] = None, keepdims: bool = False) -> "Expr":
        """Min over `axis` (None: all); ties share the gradient."""
        return self.graph._add("min", (self,), axes=_axes(axis, self.ndim), keepdims=keepdims)

    def var(self, axis: Union[None, int, Sequence[int]] = None, keepdims: bool = False) -> "Expr":
        """Population variance (ddof=0, numpy's default)."""
        return self.graph._add("var", (self,), axes=_axes(axis, self.ndim), keepdims=keepdims)

    def std(self, axis: Union[None, int, Sequence[int]] = None, keepdims: bool = False) -> "Expr":
        """Population standard deviation; its gradient is 0 where it is 0 (as torch's)."""
        return self.graph._add("std", (self,), axes=_axes(axis, self.ndim), keepdims=keepdims)

    def argmax(self, axis: Optional[int] = None, keepdims: bool = False) -> "Expr":
        """int64 index of the max (the first on ties); forward only, as for an accuracy.
        axis=None (numpy's flattened index) only for values without the batch axis."""
        if axis is not None:
            return self.graph._add("argmax", (self,), axis=int(axis), keepdims=keepdims)
        if self._node.shape[:1] == (BATCH,):
            raise GraphError(f"argmax over all axes of {self!r} would include the batch axis (axis 0) and mix "
                             "examples; give axis=")
        if self.ndim <= 1:
            return self.graph._add("argmax", (self,), axis=0, keepdims=keepdims)
        flat = self.reshape(math.prod(self._node.shape))
        index = flat.graph._add("argmax", (flat,), axis=0, keepdims=False)
        return index.graph._add("expand_dims", (index,), axes=tuple(range(self.ndim))) if keepdims else index

    def squeeze(self, axis: Union[None, int, Sequence[int]] = None) -> "Expr":
        """Drop size-1 axes (None: all of them but the batch axis)."""
        if axis is None:
            return self.graph._add("squeeze", (self,), axes=())
        axes = _axes(axis, self.ndim)
        if not axes:
            return self  # numpy: squeeze(axis=()) removes nothing (the op reads no axes as all size-1 ones)
        return self.graph._add("squeeze", (self,), axes=axes)

    def reshape(self, *shape: Union[int, Sequence[int]]) -> "Expr":
        """New shape; for per-example values give the shape of one example."""
        dims = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else tuple(shape)
        per_example = self._node.shape[:1] == (BATCH,)
        size = math.prod(self._node.shape[1:] if per_example else self._node.shape)
        if dims.count(-1) == 1 and all(d > 0 for d in dims if d != -1):
            known = math.prod(d for d in dims if d != -1)
            dims = tuple(size // known if d == -1 else d for d in dims)
        return self.graph._add("reshape", (self,), shape=tuple(int(d) for d in dims))

    def __getitem__(self, index: Any) -> "Expr":
        """numpy indexing of the non-batch axes: slices, integers (which drop the
        axis), None (a new axis of size 1), ... and one integer list or array
        (np.take along its axis). A per-example value's batch axis takes only `:`."""
        return _index(self, index if isinstance(index, tuple) else (index,))


def _index(x: Expr, items: tuple) -> Expr:
    subject = f"{x.name}[{', '.join(map(_show_item, items))}]"
    shape = x._node.shape
    items = _expand_ellipsis(items, len(shape), subject)
    arrays = [k for k, item in enumerate(items) if _is_index_array(item)]
    if len(arrays) > 1:
        raise _refused(subject, "only one integer list or array per indexing; index in two steps")
    if arrays:
        advanced = [k for k, item in enumerate(items) if _is_index_array(item) or _is_int(item)]
        if advanced != list(range(advanced[0], advanced[-1] + 1)):
            raise _refused(subject, "an integer list and integers on axes apart from it: numpy would move "
                                    "the indexed axis to the front; index in two steps")
    per_example = is_per_example(shape)
    out, axis, dims = x, 0, []  # axis: where the next item applies in `out`; dims: the result's shape
    for item in items:
        whole = isinstance(item, slice) and item == slice(None)
        if per_example and axis == 0 and item is None:
            raise _refused(subject, "a new axis in front of the batch axis; the batch axis stays first")
        if per_example and axis == 0 and not whole:
            raise _refused(subject, "the batch axis (axis 0) of a per-example value takes only `:`; indexing "
                                    "it would pick examples, which differ from shard to shard")
        if item is None:
            dims.append(1)
            continue
        if axis >= len(shape):
            raise _refused(subject, f"too many indices for {fmt(shape)}")
        size = shape[axis]
        if isinstance(item, slice):
            if not whole:
                start, stop, step = item.start or 0, item.stop, item.step or 1
                if start < 0 or (stop is not None and stop < 0):
                    start, stop, _ = slice(start, stop, step).indices(size)
                attrs = {"axis": axis, "start": start, "step": step}
                if stop is not None:
                    attrs["stop"] = stop
                out = out.graph._add("slice", (out,), **attrs)
            dims.append(out._node.shape[axis])
        elif _is_int(item):
            position = int(item)
            if not -size <= position < size:
                raise _refused(subject, f"index {position} is out of range for axis {axis} of {fmt(shape)} "
                                        f"(size {size})")
            position %= size
            out = out.graph._add("slice", (out,), axis=axis, start=position, stop=position + 1, step=1)
        elif _is_index_array(item):
            picks = np.asarray(item)
            out = _take_flat(out, picks.reshape(-1), axis)
            dims.extend(picks.shape)
        else:
            raise _refused(subject, f"cannot index with {item!r} ({type(item).__name__}); use slices, "
                                    "integers, None, ... or one integer list or array")
        axis += 1
    dims.extend(shape[axis:])
    return _reshaped(out, tuple(dims))


def _is_int(item: Any) -> bool:
    return isinstance(item, (int, np.integer)) and not isinstance(item, (bool, np.bool_))


def _is_index_array(item: Any) -> bool:
    if isinstance(item, Expr):
        return False
    if isinstance(item, (list, np.ndarray)):
        array = np.asarray(item)
        return array.dtype.kind in "iu" or (array.size == 0 and array.dtype.kind == "f")
    return False


def _show_item(item: Any) -> str:
    if item is Ellipsis:
        return "..."
    if isinstance(item, slice):
        parts = ["" if v is None else str(v) for v in (item.start, item.stop, item.step)]
        return ":".join(parts[:2] if item.step is None else parts)
    if isinstance(item, np.ndarray):
        return f"array{item.tolist()!r}" if item.size <= 8 else f"array of shape {item.shape}"
    return repr(item)


def _expand_ellipsis(items: tuple, rank: int, subject: str) -> tuple:
    count = sum(1 for i in items if i is Ellipsis)
    if count > 1:
        raise _refused(subject, "an index can only have one ellipsis ('...')")
    if count == 0:
        return items
    at = items.index(Ellipsis)
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    return items[:at] + (slice(None),) * max(rank - used, 0) + items[at + 1:]


def _reshaped(x: Expr, dims: tuple[int, ...]) -> Expr:
    """x with the full shape `dims` (same size, batch axis kept), or x itself if it has it."""
    if dims == x._node.shape:
        return x
    target = dims[1:] if is_per_example(x._node.shape) else dims
    return x.graph._add("reshape", (x,), shape=tuple(int(d) for d in target))


def _take_flat(x: Expr, indices: np.ndarray, axis: int) -> Expr:
    if indices.dtype.kind not in "iu" and indices.size:
        raise _refused(f"take from {x.name}", f"indices must be integers, got {indices.dtype}")
    return x.graph._add("take", (x,), indices=tuple(int(i) for i in indices), axis=int(axis))


def _take(x: Expr, indices: Any, axis: Optional[int]) -> Expr:
    """np.take: the result's shape is x.shape[:axis] + indices.shape + x.shape[axis + 1:]."""
    if isinstance(indices, Expr):
        raise _refused(f"take from {x.name}", "indices must be constants known when the graph is built "
                                              "(a list or numpy array of integers), not an expression")
    picks = np.asarray(indices)
    shape = x._node.shape
    if axis is None:
        if is_per_example(shape):
            raise _refused(f"take from {x.name}", "axis=None flattens the value, batch axis included; give "
                                                  "axis= (the batch axis is axis 0 and cannot be indexed)")
        x, axis, shape = _reshaped(x, (math.prod(shape),)), 0, (math.prod(shape),)
    if not -len(shape) <= axis < len(shape):
        raise _refused(f"take from {x.name}", f"axis {axis} is out of range for rank {len(shape)}")
    axis %= len(shape)
    out = _take_flat(x, picks.reshape(-1), axis)
    return _reshaped(out, shape[:axis] + picks.shape + shape[axis + 1:])


def _matmul(a: Expr, b: Expr) -> Expr:
    """numpy's matmul, 1-D operands included: a 1-D operand becomes a matrix
    (a row on the left, a column on the right) and that axis leaves the result.
    The batch axis is never contracted."""
    if a.ndim >= 2 and b.ndim >= 2:
        return a.graph._add("matmul", (a, b))
    subject = f"matmul({a.name} {fmt(a._node.shape)}, {b.name} {fmt(b._node.shape)})"
    for operand in (a, b):
        if operand.ndim == 0:
            raise _refused(subject, "matmul does not take scalars; use *")
        if operand.ndim == 1 and is_per_example(operand._node.shape):
            raise _refused(subject, f"{operand.name} has only the batch axis, which matmul would contract "
                                    "(mixing examples); for a per-example dot product use (a * b).sum(axis=-1)")
    left = _reshaped(a, (1,) + a._node.shape) if a.ndim == 1 else a
    right = _reshaped(b, b._node.shape + (1,)) if b.ndim == 1 else b
    product = a.graph._add("matmul", (left, right))
    dims = product._node.shape
    if b.ndim == 1:
        dims = dims[:-1]
    if a.ndim == 1:
        dims = dims[:-2] + dims[-1:] if b.ndim != 1 else dims[:-1]
    return _reshaped(product, dims)


def _comparable(value: object) -> bool:
    """What == and != turn into a node: Exprs, numbers, arrays. Anything else
    (None, a string) compares unequal the ordinary way."""
    return isinstance(value, (Expr, np.ndarray)) or (np.isscalar(value) and not isinstance(value, (str, bytes)))


def _error_here(what: str, message: str) -> GraphError:
    """A build-time refusal raised outside Graph._add, with the user's file:line all the same."""
    origin = _user_origin()
    return GraphError(f"{what} at {origin}: {message}" if origin else f"{what}: {message}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _axes(axis: Union[None, int, Sequence[int]], rank: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(rank))
    return (int(axis),) if np.isscalar(axis) else tuple(int(a) for a in axis)  # type: ignore[arg-type]


class Graph:
    """A computation graph under construction; serializes to the wire proto."""

    def __init__(self, name: str = "graph", dtype: str = "float32"):
        """`dtype`: the float dtype float inputs, params and Python-number consts get
        unless told otherwise, so a float64 graph needs no dtype= on each of them."""
        self.name = name
        self.dtype = as_dtype(dtype)
        if self.dtype not in FLOATS:
            raise _refused(f"Graph({name!r})", f"the default dtype must be float32 or float64, got {self.dtype}")
        self._nodes: list[_Node] = []
        self._names: dict[str, int] = {}
        self._loss: Optional[int] = None
        self._program: Optional[Program] = None
        self._proto: Optional[pb.Graph] = None

    # ---------------------------------------------------------- sources

    def input(self, name: str, shape: Sequence[int] = (), dtype: Optional[str] = None) -> Expr:
        """Per-example data; `shape` is one example's, the batch axis is implicit.
        `dtype` defaults to the graph's (give "int64" for labels and indices)."""
        dims = _check_dims(shape, f"input {name!r}")
        dt = self.dtype if dtype is None else as_dtype(dtype)
        return self._append(_Node(name, "input", (), {}, (BATCH,) + dims, dt, _user_origin()))

    def param(self, name: str, shape: Sequence[int] = (), dtype: Optional[str] = None,
              init: str = "glorot") -> Expr:
        """A trainable tensor (no batch axis); `init` says how init_params fills it
        ("glorot" and "he" read a matrix as `(in, out)`, as `x @ W` uses it, and a
        rank-3+ weight as a convolution's `(out, in, *kernel)`)."""
        dims = _check_dims(shape, f"param {name!r}")
        if init not in INITS:
            raise GraphError(f"param {name!r}: unknown init {init!r}; choose one of {INITS}")
        dt = self.dtype if dtype is None else as_dtype(dtype)
        if dt not in FLOATS:
            raise GraphError(f"param {name!r} must be float32 or float64, got {dt}")
        return self._append(_Node(name, "param", (), {"init": init}, dims, dt, _user_origin()))

    def const(self, value: Any, dtype: Optional[str] = None, name: Optional[str] = None) -> Expr:
        """A literal tensor in the graph. Python numbers and float lists take the
        graph's dtype; numpy arrays keep theirs, integer lists stay integers."""
        if dtype is not None:
            array = np.asarray(value, dtype=as_dtype(dtype))
        elif isinstance(value, np.ndarray):
            array = value
        else:
            array = np.asarray(value)
            if array.dtype.kind == "f" or array.dtype.kind == "i" and array.ndim == 0:
                array = array.astype(self.dtype)
        array = np.array(array, dtype=as_dtype(array.dtype))
        node = _Node(name or self._fresh("const"), "const", (), {}, array.shape, array.dtype, _user_origin(), array)
        return self._append(node)

    def set_loss(self, expr: Expr) -> None:
        """Mark the scalar loss; checks at once that it can be sharded."""
        self._own(expr)
        previous, self._loss = self._loss, expr.index
        self._invalidate()
        try:
            self.program()  # raise now, at the user's line, if it cannot be sharded
        except GradpoolError:
            self._loss = previous
            self._invalidate()
            raise

    @property
    def loss(self) -> Optional[Expr]:
        return None if self._loss is None else Expr(self, self._loss)

    # ---------------------------------------------------------- building

    def _fresh(self, op: str) -> str:
        name = f"{op}_{len(self._nodes)}"
        while name in self._names:
            name += "_"
        return name

    def _append(self, node: _Node) -> Expr:
        if not node.name or not isinstance(node.name, str):
            raise GraphError(f"a node name must be a non-empty string, got {node.name!r}")
        if node.name in self._names:
            raise GraphError(f"the name {node.name!r} is already used in this graph")
        self._names[node.name] = len(self._nodes)
        self._nodes.append(node)
        self._invalidate()
        return Expr(self, len(self._nodes) - 1)

    def _rename(self, index: int, name: str) -> None:
        if name in self._names and self._names[name] != index:
            raise GraphError(f"the name {name!r} is already used in this graph")
        del self._names[self._nodes[index].name]
        self._nodes[index].name = name
        self._names[name] = index
        self._invalidate()

    def _invalidate(self) -> None:
        self._program = None
        self._proto = None

    def _own(self, expr: Any) -> Expr:
        if not isinstance(expr, Expr):
            raise GraphError(f"expected an expression of this graph, got {type(expr).__name__}")
        if expr.graph is not self:
            raise GraphError(f"{expr!r} belongs to another graph")
        return expr

    def _lift(self, value: Operand, dtype: np.dtype) -> Expr:
        """Python numbers and arrays become consts of the other operand's float dtype."""
        if isinstance(value, Expr):
            return self._own(value)
        array = np.asarray(value)
        if array.dtype.kind in "biuf" and dtype in FLOATS:
            array = array.astype(dtype)
        return self.const(array)

    def _lift_exact(self, value: Operand, dtype: np.dtype) -> Expr:
        """Numbers and arrays become consts of `dtype` whatever it is (labels == 3
        compares int64 with int64); a value that dtype cannot hold exactly (2.5
        against integers) is refused rather than rounded."""
        if isinstance(value, Expr):
            return self._own(value)
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise _error_here("operand", f"cannot use {_short(value)} as a {dtype} value")
        converted = array.astype(dtype)
        if dtype.kind in "biu" and not np.array_equal(converted, array):
            raise _error_here("operand", f"{_short(value)} is not exactly representable in {dtype}; compare "
                              "with an Expr of a float dtype instead (x.astype('float32'))")
        return self.const(converted)

    def _add(self, op_name: str, args: Sequence[Expr], name: Optional[str] = None, **attrs: Any) -> Expr:
        """Add an op node, checked by the registry's own shape and dtype rules."""
        op = get_op(op_name)
        args = [self._own(a) for a in args]
        origin = _user_origin()
        parents = [self._nodes[a.index] for a in args]
        try:
            call = Call(op.resolve_attrs(attrs), per_example=is_per_example(parents[0].shape))
            shape = tuple(op.shape(call, *(p.shape for p in parents)))
            dtype = op.dtype(call, *(p.dtype for p in parents))
        except GradpoolError as err:
            where = f" at {origin}" if origin else ""
            shapes = ", ".join(f"{p.name} {fmt(p.shape)} {p.dtype}" for p in parents)
            raise GraphError(f"{op_name}({shapes}){where}: {err}") from None
        kept = {k: v for k, v in attrs.items() if k in op.attrs}
        return self._append(_Node(name or self._fresh(op_name), op_name, tuple(a.index for a in args), kept,
                                  shape, dtype, origin))

    # ---------------------------------------------------------- queries

    def __getitem__(self, name: str) -> Expr:
        if name not in self._names:
            raise KeyError(f"graph has no node named {name!r}")
        return Expr(self, self._names[name])

    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def params(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {n.name: (n.shape, n.dtype) for n in self._nodes if n.op == "param"}

    @property
    def inputs(self) -> dict[str, tuple[tuple[Optional[int], ...], np.dtype]]:
        """Name -> (one example's shape, dtype)."""
        return {n.name: (n.shape[1:], n.dtype) for n in self._nodes if n.op == "input"}

    def init_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Fresh parameter values, reproducible from `seed`."""
        rng = np.random.default_rng(seed)
        out = {}
        for node in self._nodes:
            if node.op != "param":
                continue
            shape, init = node.shape, node.attrs.get("init", "glorot")
            fan_in, fan_out = _fans(shape)
            if init in ("glorot", "he") and len(shape) < 2:
                value = np.zeros(shape)  # biases and scalars start at zero
            elif init == "glorot":
                limit = math.sqrt(6.0 / (fan_in + fan_out))
                value = rng.uniform(-limit, limit, size=shape)
            elif init == "he":
                value = rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape)
            elif init == "normal":
                value = rng.normal(0.0, 0.01, size=shape)
            elif init == "ones":
                value = np.ones(shape)
            else:
                value = np.zeros(shape)
            out[node.name] = value.astype(node.dtype)
        return out

    # ---------------------------------------------------------- wire format

    def to_proto(self) -> pb.Graph:
        if self._loss is None:
            raise GraphError("the graph has no loss yet; call set_loss(expr)")
        if self._proto is None:
            nodes = []
            for n in self._nodes:
                node = pb.Node(name=n.name, op=n.op, inputs=n.inputs, shape=n.shape,
                               dtype=DTYPE_TO_PROTO[n.dtype], origin=n.origin)
                for key, value in n.attrs.items():
                    node.attrs[key].CopyFrom(_attr_to_proto(value))
                if n.value is not None:
                    node.attrs["value"].tensor.CopyFrom(to_tensor(n.value))
                nodes.append(node)
            self._proto = pb.Graph(name=self.name, nodes=nodes, loss=self._loss)
        return self._proto

    @property
    def graph_id(self) -> str:
        return graph_id(self.to_proto())

    def program(self) -> Program:
        """The engine's checked form of this graph (cached until it changes)."""
        if self._program is None:
            self._program = Program(self.to_proto())
        return self._program

    @classmethod
    def from_proto(cls, proto: pb.Graph) -> "Graph":
        program = Program(proto)  # validates everything first
        graph = cls(proto.name or "graph")
        for info, node in zip(program.nodes, proto.nodes):
            attrs = {k: v for k, v in info.attrs.items() if k in node.attrs and k != "value"}
            graph._append(_Node(info.name, info.op, info.inputs, attrs, info.shape, info.dtype, info.origin,
                                info.value if node.op == "const" else None))
        graph._loss = program.loss
        graph._program = program
        return graph

    def save(self, path: Union[str, os.PathLike]) -> None:
        Path(path).write_bytes(self.to_proto().SerializeToString(deterministic=True))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Graph":
        proto = pb.Graph()
        try:
            proto.ParseFromString(Path(path).read_bytes())
        except Exception as err:  # protobuf raises its own DecodeError
            raise GraphError(f"{path} is not a serialized gradpool graph: {err}") from None
        return cls.from_proto(proto)

    def to_dot(self) -> str:
        """Graphviz DOT, coloured by sharding class, like the lecture's figures."""
        colours = {"per-example": "lightblue", "batch-reduced": "orange", "batch-independent": "lightgrey"}
        kinds = [n.kind for n in self.program().nodes] if self._loss is not None else [""] * len(self._nodes)
        lines = [f'digraph "{self.name}" {{', "  rankdir=LR;", "  node [shape=box, style=filled];"]
        for i, (n, kind) in enumerate(zip(self._nodes, kinds)):
            label = f"{n.name}\\n{n.op} {fmt(n.shape)}"
            shape = "ellipse" if n.op in SOURCES else "box"
            pen = ", penwidth=3" if i == self._loss else ""
            lines.append(f'  n{i} [label="{label}", shape={shape}, fillcolor={colours.get(kind, "white")}{pen}];')
        for i, n in enumerate(self._nodes):
            for k in n.inputs:
                lines.append(f"  n{k} -> n{i};")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return f"<Graph {self.name!r}: {len(self._nodes)} nodes, params {list(self.params)}, inputs {list(self.inputs)}>"


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan in, fan out) of a weight: `(in, out)` for a matrix, as `x @ W` reads
    it; PyTorch's convolution layout `(out, in, *kernel)` from rank 3 on, each
    tap counting (so a (16, 3, 3, 3) kernel has fan in 27, as in torch)."""
    if len(shape) >= 3:
        taps = math.prod(shape[2:])
        return shape[1] * taps, shape[0] * taps
    if len(shape) == 2:
        return shape[0], shape[1]
    return (shape[0] if shape else 1), (shape[0] if shape else 1)


def _check_dims(shape: Sequence[int], what: str) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise GraphError(f"{what}: shape must be a sequence of sizes, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise GraphError(f"{what}: sizes must be >= 0, got {dims} (the batch axis is implicit)")
    return dims


def _attr_to_proto(value: Any) -> pb.AttrValue:
    if isinstance(value, bool):
        return pb.AttrValue(b=value)
    if isinstance(value, (int, np.integer)):
        return pb.AttrValue(i=int(value))
    if isinstance(value, (float, np.floating)):
        return pb.AttrValue(f=float(value))
    if isinstance(value, str):
        return pb.AttrValue(s=value)
    if isinstance(value, (tuple, list)):
        return pb.AttrValue(ints=pb.IntList(values=[int(v) for v in value]))
    raise GraphError(f"cannot store attribute value {value!r}")
