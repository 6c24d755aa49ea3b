"""The heavy messages' protobuf wire format, read and written without copying tensor bytes.

GradientsRequest, ShardRequest, ShardResponse and GradientsResponse carry
megabytes of tensor data. Going through protobuf's Python objects costs a
full copy of every tensor at each step (assign, serialize, parse, read the
`bytes` field), several times per hop. These helpers speak the same wire
format (the .proto stays the contract; any protobuf implementation reads
what they write, and they read what any writes) but:

* write a message as a list of parts -- small encoded headers and
  memoryviews of the numpy arrays themselves -- joined once, or cut into
  frames, when it is sent;
* read a received buffer by walking its fields and handing out memoryviews
  of the tensor data, which `numpy.frombuffer` reads in place.

Only the fields below are understood; unknown fields are skipped, as
protobuf does.

Params and gradients may travel compact (`wire_dtype` FLOAT16 or BFLOAT16,
2 bytes an element; engine/tensors.py holds the codec): `read_tensor`
accepts those encodings and says so (`TensorView.compact`), whoever uses
the values decodes them (`TensorView.values`), and the writers encode
float arrays when asked (`wire=`).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from gradpool.protos import gradpool_pb2 as pb

from .engine.errors import InputError, quoted
from .engine.limits import LIMITS, Limits
from .engine.ops import fmt
from .engine.tensors import (DTYPE_TO_PROTO, EXACT, MAX_RANK, PROTO_TO_DTYPE, WIRE_DTYPES, WIRE_STORAGE, as_dtype,
                             compact, expand)

if TYPE_CHECKING:
    from .streams import Region
    from .engine.signature import Signature as SignatureLike
    from .engine.signature import WireInput as WireInputLike

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5
Buffer = Union[bytes, bytearray, memoryview]

# ---------------------------------------------------------------- low level


def varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 negatives: ten bytes, two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise InputError("malformed message: a varint runs past the end")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _view(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def walk(buf: Buffer) -> Iterator[tuple[int, int, Union[int, memoryview], memoryview]]:
    """(field number, wire type, value, the whole field): values are ints for
    varint/fixed fields and memoryviews for LEN fields."""
    view = _view(buf)
    for number, wire_type, value, start, end in _scan(view):
        yield number, wire_type, value, view[start:end]


def fields(buf: Buffer) -> Iterator[tuple[int, int, Union[int, memoryview]]]:
    """(field number, wire type, value) of every field, in order."""
    for number, wire_type, value, _, _ in _scan(_view(buf)):
        yield number, wire_type, value


def _scan(view: memoryview) -> Iterator[tuple[int, int, Union[int, memoryview], int, int]]:
    """(number, wire type, value, field start, field end) of every field; one-byte
    tags and lengths (most of them) are read inline: this runs for every
    tensor of every request and response."""
    pos, end = 0, len(view)
    while pos < end:
        start = pos
        tag = view[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _read_varint(view, pos)
        wire_type = tag & 7
        value: Union[int, memoryview]
        if wire_type == LEN:
            if pos < end and view[pos] < 0x80:
                length, pos = view[pos], pos + 1
            else:
                length, pos = _read_varint(view, pos)
            if pos + length > end:
                raise InputError("malformed message: a field runs past the end")
            value, pos = view[pos:pos + length], pos + length
        elif wire_type == VARINT:
            if pos < end and view[pos] < 0x80:
                value, pos = view[pos], pos + 1
            else:
                value, pos = _read_varint(view, pos)
        elif wire_type in (FIXED64, FIXED32):
            size = 8 if wire_type == FIXED64 else 4
            if pos + size > end:
                raise InputError("malformed message: a field runs past the end")
            value, pos = int.from_bytes(view[pos:pos + size], "little"), pos + size
        else:
            raise InputError(f"malformed message: wire type {wire_type}")
        yield tag >> 3, wire_type, value, start, pos


def as_double(bits: int) -> float:
    return struct.unpack("<d", bits.to_bytes(8, "little"))[0]


def signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _packed_varints(view: memoryview) -> list[int]:
    values, pos = [], 0
    while pos < len(view):
        value, pos = _read_varint(view, pos)
        values.append(signed(value))
        if len(values) > MAX_RANK:
            raise InputError(f"invalid shape: more than {MAX_RANK} dims")
    return values


# ---------------------------------------------------------------- tensors


@dataclass(frozen=True)
class TensorView:
    """A wire tensor whose byte count fits its shape; `data` is a view of the message."""
    dtype: np.dtype
    proto_dtype: int
    shape: tuple[int, ...]
    data: memoryview

    def array(self) -> np.ndarray:
        """A read-only numpy view of the message's bytes (a compact tensor's
        as their storage dtype: float16 or uint16)."""
        return np.frombuffer(self.data, dtype=self.dtype.newbyteorder("<")).reshape(self.shape)

    @property
    def compact(self) -> int:
        """The compact encoding (FLOAT16, BFLOAT16) the tensor came in; 0 (EXACT) for a tensor of its own dtype."""
        return self.proto_dtype if self.proto_dtype in WIRE_DTYPES else EXACT

    @property
    def dtype_name(self) -> str:
        return WIRE_DTYPES.get(self.proto_dtype) or str(self.dtype)

    def values(self, dtype: np.dtype) -> np.ndarray:
        """The values as an array of the float `dtype` they stand for: a read-only
        view of the message when the tensor is exact, decoded (a new array) when compact."""
        return expand(self.array(), self.compact, dtype) if self.compact else self.array()


def read_tensor(buf: memoryview, what: str) -> TensorView:
    proto_dtype, shape, data = 0, [], memoryview(b"")
    for number, wire_type, value in fields(buf):
        if number == 1 and wire_type == VARINT:
            proto_dtype = int(value)  # type: ignore[arg-type]
        elif number == 2 and wire_type == LEN:
            try:
                shape.extend(_packed_varints(value))  # type: ignore[arg-type]
            except InputError as err:
                raise InputError(f"{what}: {err}") from None
        elif number == 2 and wire_type == VARINT:
            shape.append(signed(int(value)))  # type: ignore[arg-type]
        elif number == 3 and wire_type == LEN:
            data = value  # type: ignore[assignment]
        if len(shape) > MAX_RANK:
            raise InputError(f"{what}: invalid shape: more than {MAX_RANK} dims")
    return tensor_view(proto_dtype, shape, data, what)


def tensor_view(proto_dtype: int, shape: Sequence[int], data: "memoryview | Region", what: str) -> TensorView:
    """A TensorView of checked dtype and shape, whose data has exactly the bytes they need."""
    if proto_dtype in PROTO_TO_DTYPE:
        dtype = PROTO_TO_DTYPE[proto_dtype]
    elif proto_dtype in WIRE_STORAGE:  # a compact float param or gradient; what may be compact is the reader's check
        dtype = WIRE_STORAGE[proto_dtype]
    else:
        raise InputError(f"{what}: unknown dtype enum {proto_dtype}")
    if any(d < 0 for d in shape):
        raise InputError(f"{what}: invalid shape {fmt(shape)}")
    needed = math.prod(shape) * dtype.itemsize
    if needed != len(data):
        name = WIRE_DTYPES.get(proto_dtype) or dtype
        raise InputError(f"{what}: shape {tuple(shape)} of {name} needs {needed} bytes, got {len(data)}")
    return TensorView(dtype, proto_dtype, tuple(shape), data)  # type: ignore[arg-type]


def read_named(buf: memoryview, what: str) -> tuple[str, TensorView]:
    name, tensor = "", None
    for number, wire_type, value in fields(buf):
        if number == 1 and wire_type == LEN:
            name = bytes(value).decode("utf-8", "replace")  # type: ignore[arg-type]
        elif number == 2 and wire_type == LEN:
            tensor = value
    where = f"{what} {quoted(name)}"
    return name, read_tensor(tensor if tensor is not None else memoryview(b""), where)


def named_map(items: Iterable[tuple[str, TensorView]], what: str) -> dict[str, TensorView]:
    out: dict[str, TensorView] = {}
    for name, tensor in items:
        if name in out:
            raise InputError(f"{what} {quoted(name)} given twice")
        out[name] = tensor
    return out


# ---------------------------------------------------------------- writing


class Parts:
    """A message being written: encoded pieces and array views, joined once when sent."""

    def __init__(self) -> None:
        self.parts: list[Buffer] = []
        self.size = 0
        # Bytes before the streamable tail (a request's inputs, written last
        # by `request_parts`), which a stream's first Frame declares as
        # `header_bytes`; None: no such promise.
        self.header_bytes: Optional[int] = None

    def raw(self, data: Buffer) -> "Parts":
        view = _view(data) if isinstance(data, memoryview) else data
        self.parts.append(view)
        self.size += len(view)
        return self

    def varint_field(self, number: int, value: int) -> "Parts":
        return self.raw(key(number, VARINT) + varint(int(value))) if value else self

    def double_field(self, number: int, value: float) -> "Parts":
        return self.raw(key(number, FIXED64) + struct.pack("<d", value)) if value else self

    def bytes_field(self, number: int, data: Buffer) -> "Parts":
        return self.raw(key(number, LEN) + varint(len(data))).raw(data)

    def message_field(self, number: int, message: "Parts") -> "Parts":
        self.raw(key(number, LEN) + varint(message.size))
        self.parts.extend(message.parts)
        self.size += message.size
        return self

    def named_tensor(self, number: int, name: str, tensor: "np.ndarray | TensorView", wire: int = EXACT) -> "Parts":
        """A NamedTensor field from an array (no copy when it is contiguous
        little-endian) or a received TensorView (as it came). With `wire`
        (FLOAT16, BFLOAT16) a float array is written in that encoding (a
        half-size copy); other arrays as they are."""
        if isinstance(tensor, TensorView):
            return self.named_raw(number, name, tensor.proto_dtype, tensor.shape, [tensor.data])
        dtype = as_dtype(tensor.dtype)
        shape = np.shape(tensor)  # before ascontiguousarray, which makes a scalar 1-D
        if wire != EXACT and dtype.kind == "f":
            return self.named_raw(number, name, wire, shape, [_view(memoryview(compact(tensor, wire).reshape(-1)))])
        flat = np.ascontiguousarray(tensor, dtype=dtype.newbyteorder("<")).reshape(-1)
        return self.named_raw(number, name, DTYPE_TO_PROTO[dtype], shape, [_view(memoryview(flat))])

    def named_raw(self, number: int, name: str, proto_dtype: int, shape: Sequence[int],
                  pieces: Sequence[Buffer], align: bool = False) -> "Parts":
        """A NamedTensor field whose data is `pieces` one after the other (rows
        of several shards, say). With `align`, the data starts at a multiple of
        DATA_ALIGNMENT bytes from the start of this message (Tensor.padding)."""
        header = key(1, VARINT) + varint(proto_dtype)
        if shape:
            packed = b"".join(varint(d) for d in shape)
            header += key(2, LEN) + varint(len(packed)) + packed
        name_field = key(1, LEN) + varint(len(name.encode())) + name.encode()
        size = sum(len(p) for p in pieces)
        data_key = key(3, LEN) + varint(size)
        if align:
            header += _padding(self.size + len(key(number, LEN)), name_field, header, data_key, size)
        tensor = Parts().raw(header).raw(data_key)
        for piece in pieces:
            tensor.raw(piece)
        return self.message_field(number, Parts().raw(name_field).message_field(2, tensor))

    def extend(self, other: "Parts") -> "Parts":
        if other.header_bytes is not None:
            self.header_bytes = self.size + other.header_bytes
        self.parts.extend(other.parts)
        self.size += other.size
        return self

    def join(self) -> bytes:
        return b"".join(self.parts)

    def frames(self, frame_bytes: int) -> Iterator[bytes]:
        """The message as serialized `Frame`s of at most `frame_bytes` data each,
        the first declaring the total (and `header_bytes`, when set); no copy
        of the whole message is made."""
        first, pending, pending_size = True, [], 0
        for part in self.parts:
            view = _view(part)
            while len(view):
                take = min(len(view), frame_bytes - pending_size)
                pending.append(view[:take])
                pending_size += take
                view = view[take:]
                if pending_size == frame_bytes:
                    yield _frame(pending, pending_size, self.size if first else None, self.header_bytes)
                    first, pending, pending_size = False, [], 0
        if pending or first:
            yield _frame(pending, pending_size, self.size if first else None, self.header_bytes)


# Where a shard's input data starts in its ShardRequest (Tensor.padding): the
# received buffer's own start is at least this aligned (malloc), so the
# worker's numpy views of it are aligned for every dtype.
DATA_ALIGNMENT = 16


def _padding(at: int, name_field: bytes, header: bytes, data_key: bytes, data_size: int) -> bytes:
    """The Tensor.padding field (or nothing) that puts the data of a NamedTensor
    whose field's length prefix starts at offset `at` on a multiple of DATA_ALIGNMENT."""
    for pad in [0, *range(2, 2 * DATA_ALIGNMENT + 2)]:  # a padding field is 2 bytes at least
        padding = key(4, LEN) + varint(pad - 2) + bytes(pad - 2) if pad else b""
        tensor_size = len(header) + len(padding) + len(data_key) + data_size
        inner = len(name_field) + len(key(2, LEN)) + len(varint(tensor_size)) + tensor_size
        offset = (at + len(varint(inner)) + len(name_field) + len(key(2, LEN)) + len(varint(tensor_size))
                  + len(header) + len(padding) + len(data_key))
        if offset % DATA_ALIGNMENT == 0:
            return padding
    raise AssertionError("no padding aligns the data")  # unreachable: offsets step by one from 2 bytes on


def _frame(pieces: Sequence[Buffer], size: int, total: Optional[int], header_bytes: Optional[int] = None) -> bytes:
    header = key(1, VARINT) + varint(total) if total else b""
    if total and header_bytes:
        header += key(3, VARINT) + varint(header_bytes)
    return b"".join([header, key(2, LEN), varint(size), *pieces])


def named_arrays(parts: Parts, number: int, arrays: Mapping[str, np.ndarray], wire: int = EXACT) -> Parts:
    for name, array in arrays.items():
        parts.named_tensor(number, name, array, wire)
    return parts


# ---------------------------------------------------------------- the four heavy messages


@dataclass
class RequestView:
    """A GradientsRequest or an EvaluateRequest, its tensors left in place."""
    graph_id: str = ""
    params: list[tuple[str, TensorView]] = field(default_factory=list)
    param_fields: list[memoryview] = field(default_factory=list)  # each whole field: forwarded as it came
    inputs: list[tuple[str, TensorView]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    request_id: str = ""
    rows: Optional[pb.DatasetRows] = None
    wire_dtype: int = EXACT  # GradientsRequest only: the gradients' encoding (unchecked: see tensors.wire_dtype_field)
    seed: Optional[int] = None  # GradientsRequest only: None when absent (presence, not 0, says "no seed")


# Field numbers (gradpool.proto): both requests share 1-3; then they differ.
GRADIENTS_REQUEST = {"request_id": 4, "rows": 5, "wire_dtype": 6, "seed": 7}
EVALUATE_REQUEST = {"outputs": 4, "request_id": 5, "rows": 6}


def _text(value: memoryview) -> str:
    return bytes(value).decode("utf-8", "replace")


def _room(items: list, what: str) -> list:
    """`items`, refused once a message carries more of them than LIMITS.max_tensors (before adding one)."""
    if len(items) >= LIMITS.max_tensors:
        raise InputError(f"more than {LIMITS.max_tensors} {what} in one message; the limit is {LIMITS.max_tensors}")
    return items


def read_request(buf: Buffer, evaluate: bool = False) -> RequestView:
    numbers = EVALUATE_REQUEST if evaluate else GRADIENTS_REQUEST
    request = RequestView()
    for number, wire_type, value, whole in walk(buf):
        if wire_type == VARINT and number == numbers.get("wire_dtype"):
            request.wire_dtype = int(value)  # type: ignore[arg-type]
        if wire_type == VARINT and number == numbers.get("seed"):
            request.seed = int(value)  # type: ignore[arg-type]
        if wire_type != LEN:
            continue
        if number == 1:
            request.graph_id = _text(value)  # type: ignore[arg-type]
        elif number == 2:
            _room(request.params, "params").append(read_named(value, "param"))  # type: ignore[arg-type]
            request.param_fields.append(whole)
        elif number == 3:
            _room(request.inputs, "inputs").append(read_named(value, "input"))  # type: ignore[arg-type]
        elif number == numbers["request_id"]:
            request.request_id = _text(value)  # type: ignore[arg-type]
        elif number == numbers["rows"]:
            request.rows = _parse(pb.DatasetRows, value)  # type: ignore[arg-type]
        elif number == numbers.get("outputs"):
            _room(request.outputs, "outputs").append(_text(value))  # type: ignore[arg-type]
    return request


def request_parts(graph_id: str, params: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray],
                  request_id: str, rows: Optional[pb.DatasetRows] = None,
                  outputs: Optional[Sequence[str]] = None, wire_dtype: int = EXACT,
                  seed: Optional[int] = None) -> tuple[Parts, Parts]:
    """A GradientsRequest (or, with `outputs`, an EvaluateRequest) as (header,
    body): the header holds the graph id, so a retry rebuilds only it. With
    `wire_dtype` (GradientsRequest only) float params are written in that
    encoding and the gradients asked for in it; inputs always as they are.
    `seed` (GradientsRequest only) is written whenever given, 0 included."""
    if outputs is not None and wire_dtype != EXACT:
        raise ValueError("an EvaluateRequest has no wire_dtype")
    if outputs is not None and seed is not None:
        raise ValueError("an EvaluateRequest has no seed (forward-only runs turn dropout off)")
    numbers = EVALUATE_REQUEST if outputs is not None else GRADIENTS_REQUEST
    body = Parts()
    named_arrays(body, 2, params, wire_dtype)
    for name in outputs or ():
        body.bytes_field(4, name.encode())
    body.bytes_field(numbers["request_id"], request_id.encode())
    if rows is not None:
        body.bytes_field(numbers["rows"], rows.SerializeToString())
    body.varint_field(GRADIENTS_REQUEST["wire_dtype"], wire_dtype)  # nothing when EXACT
    if seed is not None:  # an optional field: present even when 0
        body.raw(key(GRADIENTS_REQUEST["seed"], VARINT) + varint(seed))
    # The inputs last, the largest last of all (Frame.header_bytes): streamed,
    # every shard's rows of the small ones are in early, and the big one's
    # rows arrive in order, so the coordinator can start shards as they come.
    body.header_bytes = body.size
    named_arrays(body, 3, dict(sorted(inputs.items(), key=lambda item: np.asarray(item[1]).nbytes)))
    return Parts().bytes_field(1, graph_id.encode()), body


def with_graph_id(graph_id: str, body: Parts) -> Parts:
    """A request: its graph id (field 1), then the body `request_parts` wrote."""
    return Parts().bytes_field(1, graph_id.encode()).extend(body)


def shard_request(header: pb.ShardRequest, inputs: Sequence["WireInputLike"], rows: tuple[int, int],
                  param_fields: Sequence[memoryview]) -> Parts:
    """A ShardRequest: its small fields, each input's rows a:b as a view of the
    client's bytes, and the client's params fields forwarded as they came
    (ShardRequest.params has GradientsRequest.params' number and type)."""
    parts = Parts().raw(header.SerializeToString())
    start, stop = rows
    for item in inputs:
        parts.named_raw(3, item.name, item.dtype, (stop - start, *item.row_shape),
                        byte_pieces(item.data, start * item.row_bytes, stop * item.row_bytes), align=True)
    for whole in param_fields:
        parts.raw(whole)
    return parts


def byte_pieces(data: "memoryview | Region", start: int, stop: int) -> list:
    """Bytes [start, stop) of a received tensor: a view of the message, or the
    views of the frames they arrived in (a streamed request's Region)."""
    return [data[start:stop]] if isinstance(data, memoryview) else data.pieces(start, stop)


@dataclass
class ShardRequestView:
    graph_id: str = ""
    params: list[tuple[str, TensorView]] = field(default_factory=list)
    inputs: list[tuple[str, TensorView]] = field(default_factory=list)
    global_batch: int = 0
    include_batch_independent: bool = False
    mode: int = 0
    outputs: list[str] = field(default_factory=list)
    rows: Optional[pb.DatasetRows] = None
    wire_dtype: int = EXACT  # unchecked: see tensors.wire_dtype_field
    seed: Optional[int] = None  # None when absent
    example_offset: int = 0


def read_shard_request(buf: Buffer) -> ShardRequestView:
    request = ShardRequestView()
    for number, wire_type, value in fields(buf):
        if wire_type == LEN:
            if number == 1:
                request.graph_id = bytes(value).decode("utf-8", "replace")  # type: ignore[arg-type]
            elif number == 2:
                _room(request.params, "params").append(read_named(value, "param"))  # type: ignore[arg-type]
            elif number == 3:
                _room(request.inputs, "inputs").append(read_named(value, "input"))  # type: ignore[arg-type]
            elif number == 7:
                _room(request.outputs, "outputs").append(_text(value))  # type: ignore[arg-type]
            elif number == 8:
                request.rows = _parse(pb.DatasetRows, value)  # type: ignore[arg-type]
        elif wire_type == VARINT:
            if number == 4:
                request.global_batch = signed(int(value))  # type: ignore[arg-type]
            elif number == 5:
                request.include_batch_independent = bool(value)
            elif number == 6:
                request.mode = int(value)  # type: ignore[arg-type]
            elif number == 9:
                request.wire_dtype = int(value)  # type: ignore[arg-type]
            elif number == 10:
                request.seed = int(value)  # type: ignore[arg-type]
            elif number == 11:
                request.example_offset = signed(int(value))  # type: ignore[arg-type]
    return request


def param_arrays(params: Sequence[tuple[str, TensorView]], signature: "SignatureLike") -> dict[str, np.ndarray]:
    """Received params as arrays: views of the message, or, for a param sent
    compact, its values decoded to the dtype the graph declares (after the
    signature's check of that tensor: a compact int param is refused in its
    words). Names are left to the engine's own check."""
    out: dict[str, np.ndarray] = {}
    for name, tensor in named_map(params, "param").items():
        spec = signature.params.get(name)
        if tensor.compact and spec is not None:
            signature.check_tensor(spec, tensor.dtype, tensor.shape, tensor.compact)
            out[name] = tensor.values(spec.dtype)
        else:
            out[name] = tensor.array()
    return out


@dataclass
class ResultView:
    """A ShardResponse or GradientsResponse: loss, named tensors, counts, stats."""
    loss: float = 0.0
    grads: list[tuple[str, TensorView]] = field(default_factory=list)
    outputs: list[tuple[str, TensorView]] = field(default_factory=list)
    examples: int = 0
    seconds: float = 0.0
    shards: list[pb.ShardStats] = field(default_factory=list)


# Field numbers of the three results (gradpool.proto), for one reader.
SHARD_RESPONSE = {"loss": 1, "grads": 2, "outputs": 3, "examples": 4, "seconds": 5}
GRADIENTS_RESPONSE = {"loss": 1, "grads": 2, "examples": 3, "shards": 4, "seconds": 5}
EVALUATE_RESPONSE = {"outputs": 1, "examples": 2, "shards": 3, "seconds": 4}


def _read_result(buf: Buffer, numbers: Mapping[str, int]) -> ResultView:
    names = {number: name for name, number in numbers.items()}
    result = ResultView()
    for number, wire_type, value in fields(buf):
        name = names.get(number)
        if name in ("loss", "seconds") and wire_type == FIXED64:
            setattr(result, name, as_double(int(value)))  # type: ignore[arg-type]
        elif name == "grads" and wire_type == LEN:
            _room(result.grads, "gradients").append(read_named(value, "gradient"))  # type: ignore[arg-type]
        elif name == "outputs" and wire_type == LEN:
            _room(result.outputs, "outputs").append(read_named(value, "output"))  # type: ignore[arg-type]
        elif name == "examples" and wire_type == VARINT:
            result.examples = signed(int(value))  # type: ignore[arg-type]
        elif name == "shards" and wire_type == LEN:
            result.shards.append(_parse(pb.ShardStats, value))  # type: ignore[arg-type]
    return result


def read_shard_response(buf: Buffer) -> ResultView:
    return _read_result(buf, SHARD_RESPONSE)


def read_gradients_response(buf: Buffer) -> ResultView:
    return _read_result(buf, GRADIENTS_RESPONSE)


def _parse(message_type: type, data: memoryview):  # type: ignore[no-untyped-def]
    check_sizes(data, message_type.DESCRIPTOR)  # a Tensor's shape is a repeated field: bounded before parsing
    message = message_type()
    try:
        message.ParseFromString(data)
    except Exception:  # protobuf's DecodeError
        raise InputError(f"malformed {message_type.__name__}") from None
    return message


def gradients_response(loss: float, grads: Mapping[str, np.ndarray], examples: int,
                       shards: Sequence[pb.ShardStats], seconds: float, wire: int = EXACT) -> Parts:
    """A GradientsResponse; with `wire` (FLOAT16, BFLOAT16) the gradients in that encoding."""
    parts = Parts().double_field(1, loss)
    named_arrays(parts, 2, grads, wire)
    parts.varint_field(3, examples)
    for stats in shards:
        parts.bytes_field(4, stats.SerializeToString())
    return parts.double_field(5, seconds)


def shard_response(loss: float, grads: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                   examples: int, seconds: float, wire: int = EXACT) -> Parts:
    """A ShardResponse; with `wire` (FLOAT16, BFLOAT16) the gradients in that encoding (outputs never)."""
    parts = Parts().double_field(1, loss)
    named_arrays(parts, 2, grads, wire)
    named_arrays(parts, 3, outputs)
    return parts.varint_field(4, examples).double_field(5, seconds)


def evaluate_response(outputs: Sequence[tuple[str, int, tuple[int, ...], Sequence[memoryview]]], examples: int,
                      shards: Sequence[pb.ShardStats], seconds: float) -> Parts:
    """An EvaluateResponse whose outputs are the shards' rows, joined only when sent."""
    parts = Parts()
    for name, proto_dtype, shape, pieces in outputs:
        parts.named_raw(1, name, proto_dtype, shape, pieces)
    parts.varint_field(2, examples)
    for stats in shards:
        parts.bytes_field(3, stats.SerializeToString())
    return parts.double_field(4, seconds)


def read_evaluate_response(buf: Buffer) -> ResultView:
    return _read_result(buf, EVALUATE_RESPONSE)


def _check_field_numbers() -> None:
    """The numbers above are gradpool.proto's; a proto change that moves one must fail loudly, at import."""
    expected = {
        "GradientsRequest": {"graph_id": 1, "params": 2, "inputs": 3, "request_id": 4, "rows": 5, "wire_dtype": 6,
                             "seed": 7},
        "EvaluateRequest": {"graph_id": 1, "params": 2, "inputs": 3, "outputs": 4, "request_id": 5, "rows": 6},
        "ShardRequest": {"graph_id": 1, "params": 2, "inputs": 3, "global_batch": 4,
                         "include_batch_independent": 5, "mode": 6, "outputs": 7, "rows": 8, "wire_dtype": 9,
                         "seed": 10, "example_offset": 11},
        "ShardResponse": SHARD_RESPONSE,
        "GradientsResponse": GRADIENTS_RESPONSE,
        "EvaluateResponse": EVALUATE_RESPONSE,
        "NamedTensor": {"name": 1, "tensor": 2},
        "Tensor": {"dtype": 1, "shape": 2, "data": 3, "padding": 4},
        "Frame": {"total_bytes": 1, "data": 2, "header_bytes": 3},
    }
    for message, numbers in expected.items():
        actual = {f.name: f.number for f in getattr(pb, message).DESCRIPTOR.fields}
        if actual != numbers:
            raise ImportError(f"gradpool.proto's {message} fields are {actual}; worker/wire.py reads {numbers}")
    for message in ("GradientsRequest", "ShardRequest"):  # "no seed" is absence, which only an optional field keeps
        if not getattr(pb, message).DESCRIPTOR.fields_by_name["seed"].has_presence:
            raise ImportError(f"gradpool.proto's {message}.seed must be `optional`: worker/wire.py reads absence "
                              "as 'no seed' and 0 as a seed")
    compact_enums = {"FLOAT16": pb.FLOAT16, "BFLOAT16": pb.BFLOAT16}  # the wire's, like field numbers
    if compact_enums != {"FLOAT16": 6, "BFLOAT16": 7}:
        raise ImportError(f"gradpool.proto's compact DType values are {compact_enums}; the wire carries 6 and 7")


_check_field_numbers()


# ---------------------------------------------------------------- sizes, before protobuf parses a message
#
# protobuf turns every varint of a repeated field into 8 bytes (and the
# engine into a Python int of 28), so a 60 MB message of packed ints is
# gigabytes once parsed. `check_sizes` walks a message's wire bytes by its
# descriptor first and refuses, before anything is built, any repeated field,
# string or shape past the limits (engine/limits.py).

_PACKABLE = frozenset({FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
                       FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
                       FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_ENUM})
_HIGH_BYTES = bytes(range(128, 256))
_SHAPES = frozenset({"Node.shape", "Tensor.shape"})  # dims checked (a dataset's are bounded by its bytes)
_LONG_TEXT = frozenset({"Node.origin", "AttrValue.s"})
_WORDS = {"Graph.nodes": "nodes", "Node.inputs": "inputs", "Node.attrs": "attributes", "IntList.values": "values",
          "Node.shape": "dims", "Tensor.shape": "dims", "ArraySpec.shape": "dims",
          "DatasetHeader.arrays": "arrays"}


def _count_limits(limits: Limits) -> dict[str, int]:
    return {"Graph.nodes": limits.max_nodes, "Node.inputs": limits.max_node_inputs,
            "Node.attrs": limits.max_node_attrs, "IntList.values": limits.max_attr_ints,
            "Node.shape": limits.max_rank, "Tensor.shape": limits.max_rank, "ArraySpec.shape": limits.max_rank,
            "DatasetHeader.arrays": limits.max_dataset_arrays}


class _Budget:
    def __init__(self, limits: Limits, error: type):
        self.limits = limits
        self.counts = _count_limits(limits)
        self.error = error
        self.ints = 0

    def refuse(self, where: str, text: str) -> None:
        raise self.error(f"{where}: {text}" if where else text)


# Per message type: field number -> (field name, "Message.field", kind, repeated, message descriptor)
_MESSAGE, _STRING, _SCALAR, _OTHER = range(4)
_Table = dict[int, tuple[str, str, int, bool, Optional[Descriptor]]]
_TABLES: dict[str, tuple[_Table, list[tuple[int, str]]]] = {}


def _table(descriptor: Descriptor) -> tuple[_Table, list[tuple[int, str]]]:
    """The message's fields by number, and its repeated message fields (counted first)."""
    cached = _TABLES.get(descriptor.full_name)
    if cached is None:
        table: _Table = {}
        for fd in descriptor.fields:
            kind = (_MESSAGE if fd.type == FieldDescriptor.TYPE_MESSAGE else
                    _STRING if fd.type == FieldDescriptor.TYPE_STRING else
                    _SCALAR if fd.type in _PACKABLE else _OTHER)
            table[fd.number] = (fd.name, f"{descriptor.name}.{fd.name}", kind, _repeated(fd), fd.message_type)
        limited = [(number, name) for number, (_, name, kind, repeated, _) in table.items()
                   if kind == _MESSAGE and repeated]
        cached = _TABLES[descriptor.full_name] = (table, limited)
    return cached


def check_sizes(buf: Buffer, descriptor: Descriptor, limits: Limits = LIMITS,
                error: type = InputError) -> None:
    """Refuse (with `error`) a serialized message of type `descriptor` whose
    repeated fields, strings or shapes exceed `limits`, reading only its wire
    bytes: nothing is allocated in proportion to what the sender claims."""
    _check_message(_view(buf), descriptor, _Budget(limits, error), "")


def _check_message(view: memoryview, descriptor: Descriptor, budget: _Budget, where: str) -> None:
    table, limited = _table(descriptor)
    if limited:  # count repeated messages (nodes) first: a huge list is refused before any of it is read,
        # and as soon as the count passes the limit (10M nodes cost a scan of 100k, not 10M)
        limits = {number: (budget.counts.get(name, budget.limits.max_tensors), name) for number, name in limited}
        counts: dict[int, int] = {}
        for number, wire_type, _, _, _ in _scan(view):
            count = counts[number] = counts.get(number, 0) + 1
            if number in limits and count > limits[number][0]:
                limit, name = limits[number]
                budget.refuse(where, f"more than {limit} {_WORDS.get(name, table[number][0])}; the limit is {limit}")
    seen: dict[object, int] = {}  # field number -> values so far; ("elements", number) -> a shape's product
    for number, wire_type, value, _, _ in _scan(view):
        entry = table.get(number)
        if entry is None:
            continue  # unknown: protobuf keeps its bytes, nothing more
        field_name, name, kind, repeated, message = entry
        if kind == _MESSAGE:
            if wire_type == LEN:
                index = seen[number] = seen.get(number, 0) + 1
                label = f"{where}.{field_name}" if where else field_name
                _check_message(value, message, budget, f"{label}[{index - 1}]" if repeated else label)  # type: ignore[arg-type]
        elif kind == _STRING:
            if wire_type == LEN:
                limit = budget.limits.max_text_length if name in _LONG_TEXT else budget.limits.max_name_length
                if len(value) > limit:  # type: ignore[arg-type]
                    budget.refuse(f"{where}.{field_name}" if where else field_name,
                                  f"{len(value)} characters; the limit is {limit}")  # type: ignore[arg-type]
            if repeated:
                count = seen[number] = seen.get(number, 0) + 1
                if count > budget.limits.max_tensors:
                    budget.refuse(where, f"more than {budget.limits.max_tensors} {field_name}")
        elif repeated and kind == _SCALAR:
            _check_repeated_scalar(number, wire_type, value, name,  # type: ignore[arg-type]
                                   f"{where}.{field_name}" if where else field_name, seen, budget)
        elif repeated:
            count = seen[number] = seen.get(number, 0) + (len(value) // 4 if wire_type == LEN else 1)  # type: ignore[arg-type]
            if count > budget.limits.max_tensors:
                budget.refuse(where, f"more than {budget.limits.max_tensors} {field_name}")


def _check_repeated_scalar(number: int, wire_type: int, value: Union[int, memoryview], name: str, label: str,
                           seen: dict[object, int], budget: _Budget) -> None:
    limit = budget.counts.get(name, budget.limits.max_tensors)
    values: list[int] = []
    if wire_type == LEN:  # packed
        data = value
        assert isinstance(data, memoryview)
        if len(data) > 10 * limit:  # a varint takes at most ten bytes: more than `limit` values
            budget.refuse(label, f"more than {limit} {_WORDS.get(name, 'values')}; the limit is {limit}")
        raw = bytes(data)
        count = len(raw.translate(None, _HIGH_BYTES))  # one value ends at each byte < 128
        if name in _SHAPES and count <= limit:
            values = list(raw) if count == len(raw) else _packed_varints_unchecked(data)
    else:
        count = 1
        if name in _SHAPES:
            values = [signed(int(value))]  # type: ignore[arg-type]
    total = seen[number] = seen.get(number, 0) + count
    if total > limit:
        budget.refuse(label, f"more than {limit} {_WORDS.get(name, 'values')}; the limit is {limit}")
    budget.ints += count
    if budget.ints > budget.limits.max_graph_ints:
        budget.refuse("", f"more than {budget.limits.max_graph_ints} list values (inputs, dims, attribute ints) in "
                          f"one message; the limit is {budget.limits.max_graph_ints}")
    if values:
        elements = seen.get(("elements", number), 1)
        for dim in values:
            if dim > budget.limits.max_dim:
                budget.refuse(label, f"dim {dim} is larger than {budget.limits.max_dim}")
            elements *= max(dim, 1)
        seen[("elements", number)] = elements
        if elements > budget.limits.max_tensor_elements:
            budget.refuse(label, f"{elements} elements; one tensor holds at most "
                                 f"{budget.limits.max_tensor_elements}")


def _packed_varints_unchecked(view: memoryview) -> list[int]:
    values, pos = [], 0
    while pos < len(view):
        value, pos = _read_varint(view, pos)
        values.append(signed(value))
    return values


def parse_checked(message_type: type, data: Buffer, limits: Limits = LIMITS, error: type = InputError):  # type: ignore[no-untyped-def]
    """`message_type` parsed from `data` after `check_sizes` passed it."""
    check_sizes(data, message_type.DESCRIPTOR, limits, error)
    message = message_type()
    try:
        message.ParseFromString(bytes(data) if not isinstance(data, bytes) else data)
    except Exception:  # protobuf's DecodeError
        raise error(f"malformed {message_type.__name__}") from None
    return message


def _repeated(fd: FieldDescriptor) -> bool:
    is_repeated = getattr(fd, "is_repeated", None)  # protobuf >= 5.29; `label` is deprecated there
    return bool(is_repeated) if is_repeated is not None else fd.label == FieldDescriptor.LABEL_REPEATED
