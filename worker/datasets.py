"""Resident datasets: uploaded once in chunks, named by content, cached by bytes.

A dataset is a set of named arrays with one row per example. It travels as a
stream of `DatasetChunk`s: a header (names, dtypes, shapes and the content
hash that names it) and then the arrays' raw little-endian bytes. The SDK
builds the stream, the coordinator assembles and keeps it, and sends it on to
each worker the same way. A step then sends only indices, and every worker
gathers its shard's rows from its own copy: per-step traffic is params plus
indices, whatever the batch.

Everything a sender claims is checked before memory is allocated or kept:
the declared size against the cache's capacity, every chunk against the
declared size, the total at the end, and the content hash.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Optional

import numpy as np

from gradpool.protos import gradpool_pb2 as pb
from gradpool.worker.engine.errors import CapacityError, InputError, quoted
from gradpool.worker.engine.limits import LIMITS
from gradpool.worker.engine.tensors import DTYPE_TO_PROTO, PROTO_TO_DTYPE, as_dtype, checked_bytes
from gradpool.worker.wire import parse_checked

CHUNK_BYTES = 1024 * 1024  # well under any message limit the servers accept (2 MB and up)
DEFAULT_DATASET_CACHE_BYTES = LIMITS.dataset_cache_bytes
MAX_ARRAYS = LIMITS.max_dataset_arrays
MAX_RANK = LIMITS.max_rank


def _spec(name: str, array: np.ndarray) -> pb.ArraySpec:
    return pb.ArraySpec(name=name, dtype=DTYPE_TO_PROTO[as_dtype(array.dtype)], shape=array.shape)


def _header_digest(header: pb.DatasetHeader) -> "hashlib._Hash":
    unnamed = pb.DatasetHeader()
    unnamed.CopyFrom(header)
    unnamed.dataset_id = ""
    return hashlib.sha256(unnamed.SerializeToString(deterministic=True))


def little_endian(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays as contiguous little-endian C-order arrays (no copy when they already are)."""
    out = {}
    for name, array in arrays.items():
        array = np.asarray(array)
        out[name] = np.ascontiguousarray(array, dtype=as_dtype(array.dtype).newbyteorder("<"))
    return out


def dataset_header(arrays: Mapping[str, np.ndarray]) -> pb.DatasetHeader:
    """The header of `arrays` (contiguous little-endian, see `little_endian`), id included."""
    if not arrays:
        raise InputError("a dataset needs at least one array")
    lengths = {name: (a.shape[0] if a.ndim else 0) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise InputError(f"dataset arrays disagree on the number of examples: {quoted(lengths)}")
    if not next(iter(lengths.values())):
        raise InputError("a dataset needs at least one example (arrays with rows first)")
    header = pb.DatasetHeader(arrays=[_spec(name, a) for name, a in arrays.items()])
    digest = _header_digest(header)
    for array in arrays.values():
        digest.update(memoryview(array).cast("B"))
    header.dataset_id = digest.hexdigest()
    return header


def upload_chunks(header: pb.DatasetHeader, arrays: Iterable[np.ndarray],
                  chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.DatasetChunk]:
    """The stream that carries a dataset: the header, then the bytes in slices of memoryviews."""
    yield pb.DatasetChunk(header=header)
    for array in arrays:
        view = memoryview(array).cast("B")
        for start in range(0, len(view), chunk_bytes):
            yield pb.DatasetChunk(data=view[start:start + chunk_bytes].tobytes())


@dataclass
class Dataset:
    """An assembled dataset: one buffer, and each array a read-only view of it."""
    dataset_id: str
    header: pb.DatasetHeader
    arrays: dict[str, np.ndarray]
    examples: int
    nbytes: int

    def info(self) -> pb.DatasetInfo:
        return pb.DatasetInfo(dataset_id=self.dataset_id, examples=self.examples, bytes=self.nbytes,
                              arrays=self.header.arrays)

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.DatasetChunk]:
        return upload_chunks(self.header, self.arrays.values(), chunk_bytes)

    def rows(self, indices: np.ndarray, names: Iterable[str]) -> dict[str, np.ndarray]:
        """The named arrays' rows at `indices` (checked to be in range first)."""
        check_indices(indices, self.examples, self.dataset_id)
        return {name: self.arrays[name][indices] for name in names}


def check_indices(indices: np.ndarray, examples: int, dataset_id: str) -> None:
    if indices.ndim != 1 or indices.dtype != np.int64:
        raise InputError(f"row indices must be a 1-D int64 array, got shape {indices.shape} of {indices.dtype}")
    if indices.size and (indices.min() < 0 or indices.max() >= examples):
        bad = int(indices[(indices < 0) | (indices >= examples)][0])
        raise InputError(f"row index {bad} is out of range for dataset {dataset_id[:12]} "
                         f"({examples} examples)")


def indices_from(rows: pb.DatasetRows) -> np.ndarray:
    """The row indices of a DatasetRows message (a read-only view)."""
    dtype, shape, data = checked_bytes(rows.indices, "row indices")
    if dtype != np.int64 or len(shape) != 1:
        raise InputError(f"row indices must be a 1-D INT64 tensor, got shape {shape} of {dtype}")
    return np.frombuffer(data, dtype="<i8")


def header_size(header: pb.DatasetHeader) -> tuple[int, int]:
    """(examples, total bytes) a header declares, after checking it is well formed."""
    if len(header.dataset_id) != 64 or any(c not in "0123456789abcdef" for c in header.dataset_id):
        raise InputError(f"dataset id {quoted(header.dataset_id, 80)} is not a hex SHA-256")
    if not 0 < len(header.arrays) <= MAX_ARRAYS:
        raise InputError(f"a dataset has 1 to {MAX_ARRAYS} arrays, this one declares {len(header.arrays)}")
    total, examples, names = 0, None, set()
    for spec in header.arrays:
        if not spec.name or spec.name in names or len(spec.name) > 256:
            raise InputError(f"dataset array name {quoted(spec.name, 80)} is empty, too long or repeated")
        names.add(spec.name)
        if spec.dtype not in PROTO_TO_DTYPE:
            raise InputError(f"dataset array {spec.name!r}: unknown dtype enum {spec.dtype}")
        if not 1 <= len(spec.shape) <= MAX_RANK or any(d < 0 for d in spec.shape):
            raise InputError(f"dataset array {spec.name!r}: shape must have 1 to {MAX_RANK} non-negative dims "
                             "(examples first)")
        if examples is None:
            examples = spec.shape[0]
        elif spec.shape[0] != examples:
            raise InputError(f"dataset array {spec.name!r} has {spec.shape[0]} examples, the first has {examples}")
        total += math.prod(spec.shape) * PROTO_TO_DTYPE[spec.dtype].itemsize
    if not examples:
        raise InputError("a dataset needs at least one example")
    return int(examples), total


def parsed_chunks(frames: Iterable[bytes]) -> Iterator[pb.DatasetChunk]:
    """An upload's raw chunks as messages, each one's header sizes (arrays,
    dims, names) checked on its wire bytes before protobuf parses it."""
    for data in frames:
        yield parse_checked(pb.DatasetChunk, data)


def assemble(chunks: Iterator[pb.DatasetChunk], max_bytes: int) -> Dataset:
    """Read an upload stream into one buffer, checking every claim first.

    The size the header declares is checked against `max_bytes` first, and
    the buffer grows only with the bytes that come; a chunk past that size, a stream that ends short,
    or bytes that do not hash to the declared id are refused.
    """
    first = next(chunks, None)
    if first is None or not first.HasField("header"):
        raise InputError("a dataset upload starts with a chunk carrying the header")
    header = first.header
    examples, total = header_size(header)
    if total > max_bytes:
        raise CapacityError(f"dataset {header.dataset_id[:12]} has {total / 2**20:.1f} MB, more than the "
                            f"{max_bytes / 2**20:.0f} MB this server keeps for datasets")
    # Grown as chunks arrive, never allocated at the declared size: a header
    # claiming gigabytes with nothing after it costs nothing.
    buffer = bytearray()
    digest = _header_digest(header)
    filled = 0
    for index, chunk in enumerate(itertools.chain([first], chunks)):
        if index and chunk.HasField("header"):
            raise InputError("a dataset upload carries its header once, in the first chunk")
        data = chunk.data
        if filled + len(data) > total:
            raise InputError(f"dataset upload sends more than the {total} bytes its header declares")
        buffer += data
        filled += len(data)
    if filled != total:
        raise InputError(f"dataset upload ended after {filled} of the {total} bytes its header declares")
    digest.update(buffer)
    if digest.hexdigest() != header.dataset_id:
        raise InputError(f"dataset upload does not match its id {header.dataset_id[:12]} (content hash differs)")
    arrays, offset = {}, 0
    for spec in header.arrays:
        dtype = PROTO_TO_DTYPE[spec.dtype].newbyteorder("<")
        size = math.prod(spec.shape) * dtype.itemsize
        array = np.frombuffer(buffer, dtype=dtype, count=math.prod(spec.shape), offset=offset)
        array.flags.writeable = False
        arrays[spec.name] = array.reshape(tuple(spec.shape))
        offset += size
    return Dataset(header.dataset_id, header, arrays, examples, total)


class DatasetStore:
    """Datasets by id, bounded by bytes: the least recently used go first, and
    one larger than the whole capacity is refused (CapacityError)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"dataset cache size must be positive, got {max_bytes} bytes")
        self.max_bytes = max_bytes
        self._datasets: OrderedDict[str, Dataset] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, dataset_id: str) -> Optional[Dataset]:
        with self._lock:
            dataset = self._datasets.get(dataset_id)
            if dataset is not None:
                self._datasets.move_to_end(dataset_id)
            return dataset

    def put(self, dataset: Dataset) -> list[str]:
        """Keep `dataset`; returns the ids evicted to make room."""
        if dataset.nbytes > self.max_bytes:
            raise CapacityError(f"dataset {dataset.dataset_id[:12]} has {dataset.nbytes / 2**20:.1f} MB, more "
                                f"than the {self.max_bytes / 2**20:.0f} MB this server keeps for datasets")
        evicted = []
        with self._lock:
            if dataset.dataset_id in self._datasets:
                self._datasets.move_to_end(dataset.dataset_id)
                return []
            self._datasets[dataset.dataset_id] = dataset
            self._bytes += dataset.nbytes
            while self._bytes > self.max_bytes:
                key, old = self._datasets.popitem(last=False)
                self._bytes -= old.nbytes
                evicted.append(key)
        return evicted

    def stats(self) -> tuple[int, int]:
        """(datasets, bytes) held."""
        with self._lock:
            return len(self._datasets), self._bytes
