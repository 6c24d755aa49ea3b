"""Datasets that live on the service: upload once, then name examples by index.

    ref = client.upload({"x": X, "y": y})            # streamed in chunks, once
    loss, grads = client.gradients(graph, params, ref.take(indices))

A step that names rows of a resident dataset sends params and indices only;
each worker gathers its shard's rows from its own copy. `ref.take(...)`
works in-process too (`local_gradients` gathers the rows here), so code does
not change with the backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional

import numpy as np

from gradpool.protos import gradpool_pb2 as pb
from gradpool.worker.datasets import CHUNK_BYTES, dataset_header, little_endian, upload_chunks
from gradpool.worker.engine.errors import InputError


@dataclass(frozen=True, eq=False)
class DatasetRef:
    """A dataset by content id, with the arrays it was made from (kept here,
    not copied, so the SDK can upload it again if the service evicted it)."""
    dataset_id: str
    examples: int
    arrays: Mapping[str, np.ndarray]
    header: pb.DatasetHeader

    @classmethod
    def of(cls, arrays: Mapping[str, Any]) -> "DatasetRef":
        """Name `arrays` (input name -> array, examples first) by their content."""
        if not isinstance(arrays, Mapping):
            raise InputError(f"a dataset is a dict of name -> numpy array, got {type(arrays).__name__}")
        prepared = little_endian(arrays)
        header = dataset_header(prepared)
        return cls(header.dataset_id, int(next(iter(prepared.values())).shape[0]), prepared, header)

    def take(self, indices: Any) -> "DatasetRows":
        """Rows of this dataset, by index (a minibatch): pass it where a batch goes."""
        rows = np.asarray(indices)
        if rows.ndim != 1 or not (rows.dtype.kind in "iu" or rows.size == 0):
            raise InputError(f"row indices must be a 1-D integer array, got shape {rows.shape} of {rows.dtype}")
        rows = rows.astype(np.int64, copy=False)
        if rows.size and (rows.min() < 0 or rows.max() >= self.examples):
            bad = int(rows[(rows < 0) | (rows >= self.examples)][0])
            raise InputError(f"row index {bad} is out of range for dataset {self.dataset_id[:12]} "
                             f"({self.examples} examples)")
        return DatasetRows(self, rows)

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.DatasetChunk]:
        return upload_chunks(self.header, self.arrays.values(), chunk_bytes)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def __repr__(self) -> str:
        return (f"<DatasetRef {self.dataset_id[:12]}: {self.examples} examples, {sorted(self.arrays)}, "
                f"{self.nbytes / 2**20:.1f} MB>")


@dataclass(frozen=True, eq=False)
class DatasetRows:
    """Examples of a dataset named by index (from `DatasetRef.take`)."""
    dataset: DatasetRef
    indices: np.ndarray

    def gather(self, names: Optional[Iterable[str]] = None) -> dict[str, np.ndarray]:
        """The rows themselves, here (the in-process backends use this)."""
        keys = self.dataset.arrays.keys() if names is None else names
        return {name: self.dataset.arrays[name][self.indices] for name in keys}

    def __len__(self) -> int:
        return int(self.indices.size)

    def __repr__(self) -> str:
        return f"<DatasetRows {len(self)} of {self.dataset!r}>"
