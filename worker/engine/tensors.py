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


# ---------------------------------------------------------------- compact wire encodings
#
# Params and gradients may travel as 16-bit floats (`Client(wire_dtype=)`):
# half the bytes, not exact. These are encodings of the wire only: a graph,
# an input or a dataset never has them, so they are not in DTYPE_TO_PROTO.
# Every value goes through float32 first (numpy's cast, round to nearest
# even), then to 16 bits (round to nearest even again); decoding is exact,
# since every float16 and bfloat16 value is a float32.

WIRE_DTYPES: dict[int, str] = {pb.FLOAT16: "float16", pb.BFLOAT16: "bfloat16"}
WIRE_DTYPE_ENUMS: dict[str, int] = {name: enum for enum, name in WIRE_DTYPES.items()}
# How a compact tensor's bytes are read in place: two bytes an element, little-endian.
WIRE_STORAGE: dict[int, np.dtype] = {pb.FLOAT16: np.dtype("<f2"), pb.BFLOAT16: np.dtype("<u2")}
EXACT = pb.DTYPE_UNSPECIFIED
BFLOAT16_CHUNK = 1 << 16  # elements the bfloat16 encoder rounds at a time (256 KB of uint32 work space)


def wire_dtype(value: object) -> int:
    """The SDK's `wire_dtype=` as a proto enum: None -> EXACT (0), "float16" or "bfloat16"."""
    if value is None:
        return EXACT
    if isinstance(value, str) and value in WIRE_DTYPE_ENUMS:
        return WIRE_DTYPE_ENUMS[value]
    raise InputError(f"wire_dtype must be None (exact), 'float16' or 'bfloat16', got {quoted(value)}")


def wire_dtype_field(value: int) -> int:
    """A request's `wire_dtype` field, checked: EXACT, FLOAT16 or BFLOAT16."""
    if value == EXACT or value in WIRE_DTYPES:
        return value
    name = pb.DType.Name(value) if value in pb.DType.values() else str(value)
    raise InputError(f"wire_dtype {name} is not a compact encoding: send FLOAT16, BFLOAT16 or leave it unset "
                     "(DTYPE_UNSPECIFIED: exact)")


def wire_dtype_name(value: int) -> str:
    """"bfloat16" for BFLOAT16, ...; "exact" for DTYPE_UNSPECIFIED."""
    return WIRE_DTYPES.get(value, "exact")


def compact(array: np.ndarray, wire: int) -> np.ndarray:
    """A float array in the compact encoding `wire` (FLOAT16 or BFLOAT16): a
    new C-contiguous array of `WIRE_STORAGE[wire]` whose bytes are the wire
    data. Rounds to nearest even through float32; inf stays inf, NaN stays
    NaN (bfloat16: a quiet NaN of the same sign), a float16 overflows to inf
    beyond 65504 and flushes to zero below about 6e-8."""
    array = np.asarray(array)
    if array.dtype.kind != "f":
        raise InputError(f"only float tensors travel as {wire_dtype_name(wire)}, got {array.dtype}")
    with np.errstate(over="ignore"):  # overflowing to inf is the encoding's defined behaviour, not news
        single = np.asarray(array, dtype=np.float32).reshape(-1)  # float64 -> float32: rounds to nearest even
        if wire == pb.FLOAT16:
            return single.astype(WIRE_STORAGE[wire]).reshape(array.shape)
    if wire != pb.BFLOAT16:
        raise InputError(f"unknown compact encoding {wire}")
    bits = np.ascontiguousarray(single).view(np.uint32)
    out = np.empty(bits.size, WIRE_STORAGE[wire])
    # Round to nearest even on the 16 bits dropped: add 0x7FFF plus the
    # lowest kept bit, then truncate. In cache-sized chunks: the five passes
    # then run in cache, about twice as fast on large tensors as whole-array ones.
    work = np.empty(min(bits.size, BFLOAT16_CHUNK), np.uint32)
    for start in range(0, bits.size, BFLOAT16_CHUNK):
        chunk = bits[start:start + BFLOAT16_CHUNK]
        kept = work[:chunk.size]
        np.right_shift(chunk, 16, out=kept)
        kept &= 1
        kept += 0x7FFF
        kept += chunk  # wraps around only for NaNs (repaired below); values past the largest finite carry into inf
        kept >>= 16
        out[start:start + chunk.size] = kept
    nan = np.isnan(single)
    if nan.any():  # a NaN's payload may round away (to inf, or wrap): keep the sign, set the quiet bit
        out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return out.reshape(array.shape)


def expand(stored: np.ndarray, wire: int, dtype: object) -> np.ndarray:
    """Compact wire data (read as `WIRE_STORAGE[wire]`) as a new array of the
    float `dtype`: exact, every float16 and bfloat16 value being a float32."""
    target = np.dtype(dtype)  # type: ignore[call-overload]
    if wire == pb.FLOAT16:
        return np.asarray(stored).astype(target)
    if wire != pb.BFLOAT16:
        raise InputError(f"unknown compact encoding {wire}")
    single = np.asarray(np.left_shift(np.asarray(stored), 16, dtype=np.uint32)).view(np.float32)  # 0-d stays an array
    if target == np.float32:
        return single
    with np.errstate(invalid="ignore"):  # a signalling NaN quietens, as any float cast does
        return single.astype(target)


def round_through(array: np.ndarray, wire: int) -> np.ndarray:
    """What `array` becomes after a trip through the encoding `wire`, in its own dtype."""
    array = np.asarray(array)
    return expand(compact(array, wire), wire, array.dtype) if wire != EXACT else array
