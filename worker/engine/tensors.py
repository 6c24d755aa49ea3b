"""numpy <-> protobuf Tensor, without per-element Python work.

Data travels as raw little-endian C-order bytes; decoding is one
`numpy.frombuffer` after the byte count has been checked against the shape,
so a malformed message never makes us allocate or read past its end.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from gradpool.protos import gradpool_pb2 as pb

from .errors import InputError, quoted
from .ops import fmt

DTYPE_TO_PROTO: dict[np.dtype, int] = {
    np.dtype(np.float32): pb.FLOAT32,
    np.dtype(np.float64): pb.FLOAT64,
    np.dtype(np.int32): pb.INT32,
    np.dtype(np.int64): pb.INT64,
    np.dtype(np.bool_): pb.BOOL,
}
PROTO_TO_DTYPE: dict[int, np.dtype] = {v: k for k, v in DTYPE_TO_PROTO.items()}
DTYPE_NAMES = {str(d): d for d in DTYPE_TO_PROTO}  # "float32" -> dtype
MAX_RANK = 8


def as_dtype(dtype: object) -> np.dtype:
    """A supported numpy dtype from a name, numpy dtype or proto enum value."""
    if isinstance(dtype, int) and not isinstance(dtype, bool) and dtype in PROTO_TO_DTYPE:
        return PROTO_TO_DTYPE[dtype]
    try:
        resolved = np.dtype(dtype).newbyteorder("=")  # type: ignore[call-overload]
    except TypeError:
        resolved = None
    if resolved not in DTYPE_TO_PROTO:
        supported = ", ".join(DTYPE_NAMES)
        raise InputError(f"unsupported dtype {quoted(dtype)}; supported: {supported}")
    return resolved


def fill_tensor(tensor: pb.Tensor, array: np.ndarray) -> pb.Tensor:
    """Encode `array` into an existing Tensor message: the one encoder.

    Writing into the message in place (`field.add().tensor`) copies the data
    once, where building a Tensor and then assigning it copies it again: for
    100 MB tensors every copy counts.
    """
    array = np.asarray(array)
    dtype = as_dtype(array.dtype)
    tensor.dtype = DTYPE_TO_PROTO[dtype]
    tensor.shape.extend(array.shape)
    tensor.data = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()
    return tensor


def to_tensor(array: np.ndarray) -> pb.Tensor:
    return fill_tensor(pb.Tensor(), array)


def add_named(field, arrays: Mapping[str, np.ndarray]) -> None:  # type: ignore[no-untyped-def]
    """Encode arrays straight into a repeated NamedTensor field of a message."""
    for name, array in arrays.items():
        fill_tensor(field.add(name=name).tensor, array)


def checked_bytes(tensor: pb.Tensor, what: str = "tensor") -> tuple[np.dtype, tuple[int, ...], bytes]:
    """dtype, shape and data of a wire tensor whose byte count fits its shape
    (checked without decoding, so the coordinator can slice the raw bytes)."""
    if tensor.dtype not in PROTO_TO_DTYPE:
        raise InputError(f"{what}: unknown dtype enum {tensor.dtype}")
    dtype = PROTO_TO_DTYPE[tensor.dtype]
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) > MAX_RANK or any(d < 0 for d in shape):
        raise InputError(f"{what}: invalid shape {fmt(shape)}")
    data = tensor.data  # each read of a bytes field copies it: read once
    needed = math.prod(shape) * dtype.itemsize
    if needed != len(data):
        raise InputError(f"{what}: shape {shape} of {dtype} needs {needed} bytes, got {len(data)}")
    return dtype, shape, data


def from_tensor(tensor: pb.Tensor, what: str = "tensor") -> np.ndarray:
    """Decode a Tensor (read-only view of the message bytes), checking it first."""
    dtype, shape, data = checked_bytes(tensor, what)
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).reshape(shape)


def to_named(arrays: Mapping[str, np.ndarray]) -> list[pb.NamedTensor]:
    holder = pb.GradientsRequest()
    add_named(holder.params, arrays)
    return list(holder.params)


def from_named(named: "list[pb.NamedTensor] | object", what: str) -> dict[str, np.ndarray]:
    """Decode repeated NamedTensor into a dict; a repeated name is an error."""
    out: dict[str, np.ndarray] = {}
    for item in named:  # type: ignore[attr-defined]
        if item.name in out:
            raise InputError(f"{what} {quoted(item.name)} given twice")
        out[item.name] = from_tensor(item.tensor, f"{what} {quoted(item.name)}")
    return out
