"""Large messages as streams of Frames, so that no gRPC message is large.

A request or response above `STREAM_THRESHOLD_BYTES` travels as its
serialized bytes cut into `FRAME_BYTES` pieces (the `*Stream` RPCs; each
piece a serialized `Frame`, written by `wire.Parts.frames` straight from the
arrays' memory). The receiver learns the total from the first frame and
checks it against its limit; the buffer grows with the bytes that actually
come (never allocated at the claimed total), and a stream that ends short or
runs long is refused. The message limit of every channel
can then stay modest whatever the size of a model or a batch.
"""

from __future__ import annotations

import concurrent.futures
from typing import Callable, Iterator, Optional

import grpc

from gradpool.worker.engine.errors import CapacityError, InputError

from .wire import FIXED64, LEN, VARINT, Parts, fields

FRAME_BYTES = 1024 * 1024  # well under any message limit the servers accept (2 MB and up)
STREAM_THRESHOLD_BYTES = 32 * 1024 * 1024
# protobuf cannot parse one message of 2 GiB or more: past that, upload the
# data as a resident dataset (arrays of any size, assembled chunk by chunk).
PROTOBUF_LIMIT_BYTES = 2**31 - 1


def to_frames(message: "Parts | bytes") -> Iterator[bytes]:
    """The serialized Frames of one message (the first declares the total)."""
    parts = message if isinstance(message, Parts) else Parts().raw(message)
    return parts.frames(FRAME_BYTES)


def from_frames(frames: Iterator[bytes], max_bytes: int) -> bytearray:
    """One message's bytes from its serialized Frames, every claim checked before allocating."""
    buffer: Optional[bytearray] = None
    total = filled = 0
    for frame in frames:
        declared, data = None, memoryview(b"")
        for number, wire_type, value in fields(frame):
            if number == 1 and wire_type == VARINT:
                declared = int(value)  # type: ignore[arg-type]
            elif number == 2 and wire_type == LEN:
                data = value  # type: ignore[assignment]
            elif wire_type not in (VARINT, LEN, FIXED64):
                raise InputError("malformed frame")
        if buffer is None:
            total = declared or 0
            limit = min(max_bytes, PROTOBUF_LIMIT_BYTES)
            if total > limit:
                raise CapacityError(f"a streamed message of {total / 2**20:.1f} MB is larger than the "
                                    f"{limit / 2**20:.0f} MB this server takes; send the batch as a resident "
                                    "dataset (client.upload)")
            # Grown as the bytes arrive, not allocated at the declared total: a
            # first frame claiming 2 GB and nothing after it costs nothing.
            buffer = bytearray()
        elif declared:
            raise InputError("a frame stream declares its size once, in the first frame")
        if filled + len(data) > total:
            raise InputError(f"a frame stream carries more than the {total} bytes it declared")
        buffer += data
        filled += len(data)
    if buffer is None:
        raise InputError("an empty stream: the first frame declares the message size")
    if filled != total:
        raise InputError(f"a frame stream ended after {filled} of the {total} bytes it declared")
    return buffer


def call_streamed(method: grpc.StreamStreamMultiCallable, request: "Parts | bytes", max_bytes: int,
                  **call_options: object) -> bytearray:
    """One blocking call of a raw `*Stream` RPC: request frames out, the response's bytes back."""
    return from_frames(method(to_frames(request), **call_options), max_bytes)


class StreamedCall(concurrent.futures.Future):
    """A `*Stream` call run on a thread, shaped like the future of a unary call
    (`result()`, `add_done_callback`, `cancel()` that also ends the RPC)."""

    def __init__(self) -> None:
        super().__init__()
        self._call: Optional[grpc.Call] = None
        self._cancelled = False

    def cancel(self) -> bool:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()
        return super().cancel()

    @classmethod
    def start(cls, executor: concurrent.futures.Executor, method: grpc.StreamStreamMultiCallable,
              request: "Parts | bytes", parse_response: Callable[[bytearray], object], max_bytes: int,
              **call_options: object) -> "StreamedCall":
        future = cls()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future._call = method(to_frames(request), **call_options)
                if future._cancelled:
                    future._call.cancel()
                future.set_result(parse_response(from_frames(future._call, max_bytes)))  # type: ignore[arg-type]
            except BaseException as err:  # an RpcError, or a malformed response
                future.set_exception(err)

        executor.submit(run)
        return future
