"""What a graph takes and gives, and the one checker every layer uses.

A `Signature` lists a program's inputs and params (name, shape, dtype) and
the integer inputs that index something (class labels, table rows). The SDK
checks numpy arrays with it before running or sending anything, the
coordinator checks wire tensors with it without decoding them, and the
engine checks what it is handed with it: one set of rules, one wording of
every message, whatever the backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Optional, Sequence

import numpy as np

from .errors import InputError, quoted
from .ops import fmt
from .tensors import WIRE_DTYPES

if TYPE_CHECKING:  # the wire reader lives above the engine; signatures only read its fields
    from gradpool.worker.wire import TensorView


@dataclass(frozen=True)
class TensorSpec:
    """One input (shape with the batch axis first) or param of a graph."""
    name: str
    kind: str  # "input" or "param"
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def row_shape(self) -> tuple[int, ...]:
        """One example's shape (inputs); the whole shape (params)."""
        return self.shape[1:] if self.kind == "input" else self.shape


@dataclass(frozen=True)
class IndexLimit:
    """An integer input whose values index an axis of `bound` entries."""
    input: str
    bound: int
    meaning: str  # "class labels for 'logits'", "rows of 'table'"


@dataclass(frozen=True)
class WireInput:
    """An input's raw little-endian bytes (a view of the received message) and
    what it takes to cut them into rows."""
    name: str
    dtype: int  # proto enum
    row_shape: tuple[int, ...]
    row_bytes: int
    data: memoryview


class Signature:
    """A program's inputs, params and index limits, with the checks on them."""

    def __init__(self, inputs: Iterable[TensorSpec], params: Iterable[TensorSpec],
                 index_limits: Iterable[IndexLimit] = ()):
        self.inputs = {spec.name: spec for spec in inputs}
        self.params = {spec.name: spec for spec in params}
        self.index_limits = tuple(index_limits)

    def declared(self, kind: str) -> dict[str, TensorSpec]:
        return self.inputs if kind == "input" else self.params

    # ------------------------------------------------------------ names

    def check_names(self, given: Sequence[str], kind: str, required: Optional[Iterable[str]] = None) -> None:
        """Each name once, known, and every required one there (all by default)."""
        declared = self.declared(kind)
        seen: set[str] = set()
        for name in given:
            if name in seen:
                raise InputError(f"{kind} {quoted(name)} given twice")
            seen.add(name)
        unknown = sorted(seen - set(declared))
        if unknown:
            raise InputError(f"unknown {kind}(s) {quoted(unknown)}; the graph's {kind}s are {quoted(sorted(declared))}")
        missing = sorted(set(declared if required is None else required) - seen)
        if missing:
            raise InputError(f"missing {kind}(s) {quoted(missing)}; the graph's {kind}s are "
                             f"{quoted(sorted(declared))}")

    # ------------------------------------------------------------ one tensor

    def check_tensor(self, spec: TensorSpec, dtype: np.dtype, shape: tuple[int, ...], wire: int = 0) -> None:
        """The same message for a numpy array and a wire tensor. `wire` is a
        wire tensor's compact encoding (FLOAT16, BFLOAT16; `dtype` is then how
        its bytes are read): allowed for float params only."""
        if not wire and dtype == spec.dtype and (tuple(shape) == spec.shape if spec.kind != "input"
                                                 else len(shape) > 0 and tuple(shape[1:]) == spec.shape[1:]):
            return  # the common case, before any message is formatted (this runs per tensor per run)
        what = f"{spec.kind} {quoted(spec.name)}"
        if wire:
            if spec.kind != "param" or spec.dtype.kind != "f":
                hint = " (inputs travel in their own dtypes; only float params and gradients are compacted)" \
                    if spec.kind == "input" else ""
                raise InputError(f"{what} is {WIRE_DTYPES[wire]}, but the graph declares {spec.dtype}{hint}")
        elif dtype != spec.dtype:
            raise InputError(f"{what} is {dtype}, but the graph declares {spec.dtype}")
        if spec.kind == "input":
            if len(shape) == 0 or tuple(shape[1:]) != spec.row_shape:
                hint = " (the batch axis first)" if tuple(shape) == spec.row_shape else ""
                raise InputError(f"{what} has shape {fmt(shape)}, but the graph declares "
                                 f"{fmt(spec.shape)}{hint}")
        elif tuple(shape) != spec.shape:
            raise InputError(f"{what} has shape {fmt(shape)}, but the graph declares {fmt(spec.shape)}")

    @staticmethod
    def batch_size(sizes: Mapping[str, int], has_inputs: bool) -> int:
        if len(set(sizes.values())) > 1:
            raise InputError(f"inputs disagree on the batch size: {quoted(dict(sizes))}")
        examples = next(iter(sizes.values()), 0)
        if examples == 0 and has_inputs and sizes:
            raise InputError("the batch is empty: send at least one example")
        return examples

    # ------------------------------------------------------------ numpy

    def check_arrays(self, arrays: Mapping[str, np.ndarray], kind: str,
                     required: Optional[Iterable[str]] = None) -> int:
        """numpy arrays of one kind; returns the batch size (inputs) or 0."""
        self.check_names(list(arrays), kind, required)
        declared = self.declared(kind)
        for name, array in arrays.items():
            if not isinstance(array, np.ndarray):
                raise InputError(f"{kind} {quoted(name)} must be a numpy array, got {type(array).__name__}")
            self.check_tensor(declared[name], array.dtype, array.shape)
        if kind != "input":
            return 0
        return self.batch_size({name: array.shape[0] for name, array in arrays.items()}, bool(self.inputs))

    def check_index_ranges(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Labels and row indices within their bounds (the engine checks again as it runs)."""
        for limit in self.index_limits:
            if limit.input in inputs:
                check_index_range(inputs[limit.input], limit)

    def check_dataset(self, columns: Mapping[str, tuple[np.dtype, tuple[int, ...]]], dataset: str,
                      required: Optional[Iterable[str]] = None) -> None:
        """A resident dataset's arrays (name -> dtype, shape with examples first)
        hold every required input; arrays the graph does not take are ignored."""
        missing = sorted(set(self.inputs if required is None else required) - set(columns))
        if missing:
            raise InputError(f"dataset {dataset} has no array for input(s) {quoted(missing)}; it holds "
                             f"{quoted(sorted(columns))}")
        for name in set(columns) & set(self.inputs):
            dtype, shape = columns[name]
            self.check_tensor(self.inputs[name], dtype, shape)

    # ------------------------------------------------------------ wire

    def check_wire_params(self, params: "Sequence[tuple[str, TensorView]]",
                          required: Optional[Iterable[str]] = None) -> None:
        """Wire params (read by `wire.read_named`, byte counts already checked), not
        decoded; a float param may come in a compact encoding (`wire_dtype`)."""
        self.check_names([name for name, _ in params], "param", required)
        for name, tensor in params:
            self.check_tensor(self.params[name], tensor.dtype, tensor.shape, tensor.compact)

    def check_wire_inputs(self, inputs: "Sequence[tuple[str, TensorView]]",
                          required: Optional[Iterable[str]] = None) -> tuple[int, list[WireInput]]:
        """Wire inputs, not decoded; returns the batch size and each input's
        bytes, ready to cut into row ranges."""
        self.check_names([name for name, _ in inputs], "input", required)
        sizes: dict[str, int] = {}
        checked = []
        for name, tensor in inputs:
            spec = self.inputs[name]
            self.check_tensor(spec, tensor.dtype, tensor.shape, tensor.compact)
            sizes[name] = tensor.shape[0]
            checked.append(WireInput(name, tensor.proto_dtype, spec.row_shape,
                                     tensor.dtype.itemsize * math.prod(spec.row_shape), tensor.data))
        return self.batch_size(sizes, bool(self.inputs)), checked


def check_index_range(values: np.ndarray, limit: IndexLimit) -> None:
    """One message for an integer input out of its range: which input, what
    it indexes, the value and the example it is in."""
    if values.size == 0:
        return
    low, high = values.min(), values.max()
    if low < 0 or high >= limit.bound:
        bad = low if low < 0 else high
        row = int(np.argwhere((values < 0) | (values >= limit.bound))[0][0])
        raise InputError(f"input {limit.input!r} ({limit.meaning}) has {bad} at example {row}, "
                         f"out of range [0, {limit.bound})")
