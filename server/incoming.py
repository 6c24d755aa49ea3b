"""A streamed request read while it still arrives, so shards start before the batch is all in.

The SDK streams a large GradientsRequest or EvaluateRequest with every field
but `inputs` first and the largest input last, and says so on the first
Frame (`header_bytes`, see gradpool.proto). The coordinator then parses the
header as soon as it is in, reads each input's name, dtype and shape as they
come (never waiting for a tensor's data), plans the shards, and sends each
one to its worker as soon as all of its rows are in (`rows`): the client's
upload, the forwarding of the first shards and the workers' compute overlap.
The message is the same GradientsRequest any protobuf reader parses; only
the order of its fields is promised, and checked (a field other than an
input after the header is refused).
"""

from __future__ import annotations

from typing import Optional, Sequence

from gradpool.worker import wire
from gradpool.worker.engine.errors import InputError, quoted
from gradpool.worker.engine.signature import WireInput
from gradpool.worker.engine.tensors import MAX_RANK
from gradpool.worker.streams import ArrivingMessage, Region
from gradpool.worker.wire import FIXED32, FIXED64, LEN, VARINT

# The longest field key plus length: two varints of at most ten bytes.
FIELD_HEAD_BYTES = 20
INPUTS_FIELD = 3  # GradientsRequest.inputs and EvaluateRequest.inputs


class ArrivingRequest:
    """The request in an ArrivingMessage whose sender promised the order (header_bytes > 0)."""

    def __init__(self, message: ArrivingMessage, evaluate: bool = False):
        self.message = message
        self.evaluate = evaluate
        self.inputs: list[tuple[str, wire.TensorView]] = []
        self._position = message.header_bytes  # where the next input field starts

    def header(self) -> wire.RequestView:
        """Every field but the inputs, parsed once they are all in."""
        size = self.message.header_bytes
        self.message.wait(size)
        request = wire.read_request(self.message.view(0, size), self.evaluate)
        if request.inputs:
            raise InputError("a streamed request has inputs inside the header_bytes its first frame declares; "
                             "only the fields after them may be inputs")
        return request

    def read_inputs(self, wanted: Optional[set[str]] = None) -> list[tuple[str, wire.TensorView]]:
        """The inputs' names, dtypes and shapes, in stream order, read until
        every name in `wanted` has come (None: to the end of the message); their
        data is a Region of the message that fills as it arrives."""
        seen = {name for name, _ in self.inputs}
        while (wanted is None or not wanted <= seen) and self._position < self.message.total:
            name, tensor = self._next_input()
            wire._room(self.inputs, "inputs").append((name, tensor))
            seen.add(name)
        return list(self.inputs)

    def finish(self) -> list[tuple[str, wire.TensorView]]:
        """All the inputs, once the stream has ended as it declared."""
        inputs = self.read_inputs(None)
        self.message.finish()
        return inputs

    def rows(self, inputs: Sequence[WireInput], examples: int) -> int:
        """How many of the batch's first rows are in, for every input; the
        stream's error if it failed."""
        failure = self.message.error if self.message.done else None
        if failure is not None:
            raise failure
        ready = examples
        for item in inputs:
            if item.row_bytes and isinstance(item.data, Region):
                ready = min(ready, item.data.arrived() // item.row_bytes)
        return ready

    # ------------------------------------------------------------ parsing

    def _field(self, start: int, end: int) -> tuple[int, int, int, int, int]:
        """(number, wire type, value, payload start, field end) of the field at
        `start`, waiting only for its key and length; `value` is a VARINT's value."""
        head_end = min(start + FIELD_HEAD_BYTES, end)
        self.message.wait(head_end)
        head = self.message.view(start, head_end)
        tag, at = wire._read_varint(head, 0)
        number, wire_type = tag >> 3, tag & 7
        value = 0
        if wire_type == LEN:
            length, at = wire._read_varint(head, at)
            payload, field_end = start + at, start + at + length
        elif wire_type == VARINT:
            value, at = wire._read_varint(head, at)
            payload = field_end = start + at
        elif wire_type in (FIXED64, FIXED32):
            payload, field_end = start + at, start + at + (8 if wire_type == FIXED64 else 4)
        else:
            raise InputError(f"malformed message: wire type {wire_type}")
        if field_end > end:
            raise InputError("malformed message: a field runs past the end")
        return number, wire_type, value, payload, field_end

    def _bytes(self, start: int, end: int) -> memoryview:
        self.message.wait(end)
        return self.message.view(start, end)

    def _next_input(self) -> tuple[str, wire.TensorView]:
        number, wire_type, _, start, end = self._field(self._position, self.message.total)
        if number != INPUTS_FIELD or wire_type != LEN:
            raise InputError(f"a streamed request has field {number} after the header_bytes its first frame "
                             "declares; only inputs may follow them")
        name, proto_dtype, shape, data = "", 0, [], None
        position = start
        while position < end:  # NamedTensor
            number, wire_type, _, payload, field_end = self._field(position, end)
            if number == 1 and wire_type == LEN:
                name = bytes(self._bytes(payload, field_end)).decode("utf-8", "replace")
            elif number == 2 and wire_type == LEN:
                inner = payload
                while inner < field_end:  # Tensor: its data is never waited for
                    number, wire_type, value, payload, inner_end = self._field(inner, field_end)
                    if number == 1 and wire_type == VARINT:
                        proto_dtype = value
                    elif number == 2 and wire_type == LEN:
                        shape.extend(wire._packed_varints(self._bytes(payload, inner_end)))
                    elif number == 2 and wire_type == VARINT:
                        shape.append(wire.signed(value))
                    elif number == 3 and wire_type == LEN:
                        data = Region(self.message, payload, inner_end - payload)
                    if len(shape) > MAX_RANK:
                        raise InputError(f"input {quoted(name)}: invalid shape: more than {MAX_RANK} dims")
                    inner = inner_end
            position = field_end
        self._position = end
        what = f"input {quoted(name)}"
        return name, wire.tensor_view(proto_dtype, shape, data if data is not None else memoryview(b""), what)
