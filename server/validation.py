"""Checks a request against its graph before any worker sees it.

Everything is checked on the wire messages themselves: names, dtype enums,
shapes and byte lengths, the way `from_tensor` checks them, but without
decoding: each tensor's bytes are read once (with upb every read of a bytes
field is a copy), and the inputs' bytes are handed on for slicing.
Value-level checks (label ranges) stay with the engine on the workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence


from gradpool.protos import gradpool_pb2 as pb
from gradpool.worker.engine import Program
from gradpool.worker.engine.errors import InputError
from gradpool.worker.engine.ops import fmt
from gradpool.worker.engine.program import PER_EXAMPLE
from gradpool.worker.engine.tensors import checked_bytes


@dataclass(frozen=True)
class CheckedInput:
    """An input's raw bytes and what it takes to cut them into row ranges."""
    name: str
    dtype: int  # proto enum
    row_shape: tuple[int, ...]
    row_bytes: int
    data: bytes


def _check_names(given: Sequence[str], declared: Iterable[str], required: set[str], what: str) -> None:
    declared = set(declared)
    seen: set[str] = set()
    for name in given:
        if name in seen:
            raise InputError(f"{what} {name!r} given twice")
        seen.add(name)
    unknown = sorted(seen - declared)
    if unknown:
        raise InputError(f"unknown {what}(s) {unknown}; the graph's {what}s are {sorted(declared)}")
    missing = sorted(required - seen)
    if missing:
        raise InputError(f"missing {what}(s) {missing}")


def check_params(program: Program, params: Sequence[pb.NamedTensor], required: Optional[set[str]] = None) -> None:
    """Params of the graph (all of them unless `required` says which), once each,
    in their declared dtype and shape."""
    required = set(program.params) if required is None else required
    _check_names([p.name for p in params], program.params, required, "param")
    for item in params:
        node = program.params[item.name]
        dtype, shape, _ = checked_bytes(item.tensor, f"param {item.name!r}")
        if dtype != node.dtype:
            raise InputError(f"param {item.name!r} is {dtype}, but the graph declares {node.dtype}")
        if shape != node.shape:
            raise InputError(f"param {item.name!r} has shape {shape}, but the graph declares {fmt(node.shape)}")


def check_inputs(program: Program, inputs: Sequence[pb.NamedTensor],
                 required: set[str]) -> tuple[int, list[CheckedInput]]:
    """The inputs fit the graph and agree on the batch size; returns that size
    and each input's bytes, ready to slice."""
    _check_names([i.name for i in inputs], program.inputs, required, "input")
    sizes: dict[str, int] = {}
    checked = []
    for item in inputs:
        node = program.inputs[item.name]
        dtype, shape, data = checked_bytes(item.tensor, f"input {item.name!r}")
        if dtype != node.dtype:
            raise InputError(f"input {item.name!r} is {dtype}, but the graph declares {node.dtype}")
        if len(shape) == 0 or shape[1:] != node.shape[1:]:
            raise InputError(f"input {item.name!r} has shape {shape}, but the graph declares "
                             f"{fmt(node.shape)} (the batch axis first)")
        sizes[item.name] = shape[0]
        checked.append(CheckedInput(item.name, item.tensor.dtype, shape[1:],
                                    dtype.itemsize * math.prod(shape[1:]), data))
    if len(set(sizes.values())) > 1:
        raise InputError(f"inputs disagree on the batch size: {sizes}")
    examples = next(iter(sizes.values()), 0)
    if examples == 0 and program.inputs:
        raise InputError("the batch is empty: send at least one example")
    return examples, checked


def sources_needed_for(program: Program, outputs: Sequence[str]) -> tuple[set[str], set[str]]:
    """Names of the inputs and of the params the given nodes depend on."""
    need = [False] * len(program.nodes)
    for name in outputs:
        need[program.node(name).index] = True
    for node in reversed(program.nodes):
        if need[node.index]:
            for i in node.inputs:
                need[i] = True
    return ({name for name, node in program.inputs.items() if need[node.index]},
            {name for name, node in program.params.items() if need[node.index]})


def check_outputs(program: Program, outputs: Sequence[str]) -> None:
    """Evaluate returns per-example nodes only: they concatenate across shards."""
    if not outputs:
        raise InputError("name at least one output to evaluate")
    if len(set(outputs)) != len(outputs):
        raise InputError(f"outputs named twice: {list(outputs)}")
    for name in outputs:
        node = program.node(name)
        if node.refusal:
            raise InputError(f"output {name!r} cannot be computed shard by shard: {node.refusal}")
        if node.kind != PER_EXAMPLE:
            raise InputError(f"output {name!r} is {node.kind}; Evaluate returns per-example nodes only "
                             "(their rows concatenate across shards)")
