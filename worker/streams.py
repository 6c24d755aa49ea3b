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

import bisect
import concurrent.futures
import threading
from typing import Callable, Iterator, Optional

import grpc

from gradpool.worker.engine.errors import CapacityError, GradpoolError, InputError

from .wire import FIXED64, LEN, VARINT, Parts, fields

FRAME_BYTES = 1024 * 1024  # well under any message limit the servers accept (2 MB and up)
STREAM_THRESHOLD_BYTES = 32 * 1024 * 1024
# A client's requests stream from a smaller size: the coordinator then starts
# shards while the rest of the batch still arrives (Frame.header_bytes), which
# hides the workers' compute behind a slow link; on one machine a 13 MB batch
# costs about the same either way.
REQUEST_STREAM_THRESHOLD_BYTES = 8 * 1024 * 1024
# protobuf cannot parse one message of 2 GiB or more: past that, upload the
# data as a resident dataset (arrays of any size, assembled chunk by chunk).
PROTOBUF_LIMIT_BYTES = 2**31 - 1


def to_frames(message: "Parts | bytes") -> Iterator[bytes]:
    """The serialized Frames of one message (the first declares the total)."""
    parts = message if isinstance(message, Parts) else Parts().raw(message)
    return parts.frames(FRAME_BYTES)


def _read_frame(frame: bytes) -> tuple[Optional[int], memoryview, int]:
    """(declared total or None, data, header_bytes) of one serialized Frame."""
    declared, data, header_bytes = None, memoryview(b""), 0
    for number, wire_type, value in fields(frame):
        if number == 1 and wire_type == VARINT:
            declared = int(value)  # type: ignore[arg-type]
        elif number == 2 and wire_type == LEN:
            data = value  # type: ignore[assignment]
        elif number == 3 and wire_type == VARINT:
            header_bytes = int(value)  # type: ignore[arg-type]
        elif wire_type not in (VARINT, LEN, FIXED64):
            raise InputError("malformed frame")
    return declared, data, header_bytes


class _Tally:
    """The checks on a stream of Frames, frame by frame: the first declares
    the total, checked against the limit before anything is kept; no frame
    declares it again, and the data never runs past it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.total: Optional[int] = None
        self.filled = 0
        self.header_bytes = 0

    def add(self, frame: bytes) -> memoryview:
        declared, data, header_bytes = _read_frame(frame)
        if self.total is None:
            self.total = declared or 0
            limit = min(self.max_bytes, PROTOBUF_LIMIT_BYTES)
            if self.total > limit:
                raise CapacityError(f"a streamed message of {self.total / 2**20:.1f} MB is larger than the "
                                    f"{limit / 2**20:.0f} MB this server takes; send the batch as a resident "
                                    "dataset (client.upload)")
            if not 0 <= header_bytes <= self.total:
                raise InputError(f"a frame stream declares a header of {header_bytes} bytes in a message of "
                                 f"{self.total}")
            self.header_bytes = header_bytes
        elif declared or header_bytes:
            raise InputError("a frame stream declares its size once, in the first frame")
        if self.filled + len(data) > self.total:
            raise InputError(f"a frame stream carries more than the {self.total} bytes it declared")
        self.filled += len(data)
        return data

    def end(self) -> None:
        if self.total is None:
            raise InputError("an empty stream: the first frame declares the message size")
        if self.filled != self.total:
            raise InputError(f"a frame stream ended after {self.filled} of the {self.total} bytes it declared")


def from_frames(frames: Iterator[bytes], max_bytes: int) -> bytearray:
    """One message's bytes from its serialized Frames, every claim checked before allocating."""
    tally = _Tally(max_bytes)
    # Grown as the bytes arrive, not allocated at the declared total: a first
    # frame claiming 2 GB and nothing after it costs nothing.
    buffer = bytearray()
    for frame in frames:
        buffer += tally.add(frame)
    tally.end()
    return buffer


class ArrivingMessage:
    """One streamed message, readable while the rest still arrives.

    A thread (`start`) reads the frames and keeps each one's data as it came
    (no reassembly); readers wait for the bytes they need (`wait`) and take
    them as views (`pieces`, `view`). A stream that breaks the Frame rules,
    or breaks off, fails every wait with its error. `on_progress` (settable
    at any time) is called from the reading thread after every frame and at
    the end, so a waiter elsewhere can be woken."""

    def __init__(self, frames: Iterator[bytes], max_bytes: int):
        self._frames = frames
        self._tally = _Tally(max_bytes)
        self._chunks: list[memoryview] = []
        self._starts: list[int] = []
        self._changed = threading.Condition()
        self.received = 0
        self.done = False
        # Why it failed, kept as (kind, message) and raised afresh where asked:
        # a stored exception's traceback would hold this message (and its
        # frames) in a reference cycle.
        self._failure: Optional[tuple[type, str]] = None
        self.on_progress: Callable[[], None] = lambda: None
        self._first = threading.Event()

    @classmethod
    def start(cls, frames: Iterator[bytes], max_bytes: int, executor: concurrent.futures.Executor) -> "ArrivingMessage":
        message = cls(frames, max_bytes)
        executor.submit(message._read)
        return message

    @property
    def total(self) -> int:
        self._wait_first()
        return self._tally.total or 0

    @property
    def header_bytes(self) -> int:
        """Frame.header_bytes: 0 when the sender made no promise of order."""
        self._wait_first()
        return self._tally.header_bytes

    def _read(self) -> None:
        try:
            for frame in self._frames:
                data = self._tally.add(frame)
                with self._changed:
                    if len(data):
                        self._starts.append(self.received)
                        self._chunks.append(data)
                        self.received += len(data)
                    self._changed.notify_all()
                self._first.set()
                self.on_progress()
            self._tally.end()
        except GradpoolError as err:  # a broken rule
            self._failure = (type(err), str(err))
        except BaseException as err:  # the RPC ended (cancelled) mid-stream
            self._failure = (InputError, f"the request stream broke off after {self.received} bytes "
                                         f"({type(err).__name__})")
        with self._changed:
            self.done = True
            self._changed.notify_all()
        self._first.set()
        self.on_progress()

    @property
    def error(self) -> Optional[GradpoolError]:
        """Why the stream failed (a new exception each time), or None."""
        return None if self._failure is None else self._failure[0](self._failure[1])

    def _wait_first(self) -> None:
        self._first.wait()
        if self._failure is not None and self._tally.total is None:
            raise self.error  # type: ignore[misc]

    def wait(self, end: int) -> None:
        """Block until bytes [0, end) are in; the stream's error if it fails first."""
        with self._changed:
            while self.received < end and not self.done:
                self._changed.wait()
        if self.received < end:
            raise self.error or InputError(f"a streamed message ended after {self.received} bytes, inside a field "
                                           f"that runs to byte {end}")

    def finish(self) -> None:
        """Block until the stream has ended well (all it declared, nothing more)."""
        with self._changed:
            while not self.done:
                self._changed.wait()
        if self._failure is not None:
            raise self.error  # type: ignore[misc]

    def pieces(self, start: int, stop: int) -> list[memoryview]:
        """Bytes [start, stop) (arrived) as views of the frames they came in."""
        if stop <= start:
            return []
        first = bisect.bisect_right(self._starts, start) - 1
        out = []
        for chunk_start, chunk in zip(self._starts[first:], self._chunks[first:]):
            if chunk_start >= stop:
                break
            out.append(chunk[max(0, start - chunk_start):stop - chunk_start])
        return out

    def view(self, start: int, stop: int) -> memoryview:
        """Bytes [start, stop) (arrived) in one piece: a view, or a copy when they span frames."""
        pieces = self.pieces(start, stop)
        return pieces[0] if len(pieces) == 1 else memoryview(b"".join(pieces))


class Region:
    """Bytes [start, start + length) of an ArrivingMessage: a tensor's data,
    cut into pieces once its rows are in (see wire.byte_pieces)."""

    def __init__(self, message: ArrivingMessage, start: int, length: int):
        self.message, self.start, self.length = message, start, length

    def __len__(self) -> int:
        return self.length

    def arrived(self) -> int:
        """How many of its bytes are in."""
        return min(self.length, max(0, self.message.received - self.start))

    def pieces(self, start: int, stop: int) -> list[memoryview]:
        return self.message.pieces(self.start + start, self.start + min(stop, self.length))


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
