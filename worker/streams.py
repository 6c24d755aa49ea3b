"""Large messages as streams of Frames, so that no gRPC message is large.

A request or response above `STREAM_THRESHOLD_BYTES` travels as its
serialized bytes cut into `FRAME_BYTES` pieces (the `*Stream` RPCs). The
receiver learns the total from the first frame and checks it against its
limit before allocating one buffer for it; a stream that ends short or runs
long is refused. The message limit of every channel can then stay modest
whatever the size of a model or a batch.
"""

from __future__ import annotations

import concurrent.futures
from typing import Callable, Iterator, Optional, TypeVar

import grpc

from gradpool.protos import gradpool_pb2 as pb
from gradpool.worker.engine.errors import CapacityError, InputError

FRAME_BYTES = 1024 * 1024  # well under any message limit the servers accept (2 MB and up)
STREAM_THRESHOLD_BYTES = 32 * 1024 * 1024
# protobuf cannot parse one message of 2 GiB or more: past that, upload the
# data as a resident dataset (arrays of any size, assembled chunk by chunk).
PROTOBUF_LIMIT_BYTES = 2**31 - 1

M = TypeVar("M")


def to_frames(data: "bytes | memoryview", frame_bytes: int = FRAME_BYTES) -> Iterator[pb.Frame]:
    """The frames of one serialized message (the first declares the total)."""
    view = memoryview(data)
    total = len(view)
    yield pb.Frame(total_bytes=total, data=view[:frame_bytes].tobytes())
    for start in range(frame_bytes, total, frame_bytes):
        yield pb.Frame(data=view[start:start + frame_bytes].tobytes())


def from_frames(frames: Iterator[pb.Frame], max_bytes: int) -> bytearray:
    """One message's bytes from its frames, every claim checked before allocating."""
    first = next(frames, None)
    if first is None:
        raise InputError("an empty stream: the first frame declares the message size")
    total = first.total_bytes
    if total < 0:
        raise InputError(f"a frame stream declares {total} bytes")
    limit = min(max_bytes, PROTOBUF_LIMIT_BYTES)
    if total > limit:
        raise CapacityError(f"a streamed message of {total / 2**20:.1f} MB is larger than the {limit / 2**20:.0f} MB "
                            "this server takes; send the batch as a resident dataset (client.upload)")
    buffer = bytearray(total)
    filled = 0
    for frame in _chain(first, frames):
        if frame is not first and frame.total_bytes:
            raise InputError("a frame stream declares its size once, in the first frame")
        data = frame.data
        if filled + len(data) > total:
            raise InputError(f"a frame stream carries more than the {total} bytes it declared")
        buffer[filled:filled + len(data)] = data
        filled += len(data)
    if filled != total:
        raise InputError(f"a frame stream ended after {filled} of the {total} bytes it declared")
    return buffer


def _chain(first: pb.Frame, rest: Iterator[pb.Frame]) -> Iterator[pb.Frame]:
    yield first
    yield from rest


def parse(message_type: type, data: "bytes | bytearray") -> M:  # type: ignore[type-var]
    message = message_type()
    try:
        message.ParseFromString(data)
    except Exception:  # protobuf's DecodeError: the bytes are not that message
        raise InputError(f"the streamed bytes are not a valid {message_type.__name__}") from None
    return message  # type: ignore[return-value]


def call_streamed(method: grpc.StreamStreamMultiCallable, request: bytes, response_type: type,
                  max_bytes: int, **call_options: object) -> M:  # type: ignore[type-var]
    """One blocking call of a `*Stream` RPC: request frames out, the response joined."""
    responses = method(to_frames(request), **call_options)
    return parse(response_type, from_frames(responses, max_bytes))


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
              request: bytes, parse_response: Callable[[bytearray], object], max_bytes: int,
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
