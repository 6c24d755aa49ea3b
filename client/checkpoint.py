"""Checkpoints: everything needed to resume training, in one file, written atomically.

A checkpoint is a single ``.npz`` (a zip of ``.npy`` arrays) holding

* ``graph``: the graph's deterministic proto bytes, so a checkpoint names the
  exact computation it belongs to and can be used without the building code;
* ``param_<i>``: the parameters, in the order listed in the metadata;
* ``slot_<i>_<j>``: the optimizer's slot arrays (momentum, Adam moments);
* any extra arrays the caller adds (the trainer stores its shuffle order);
* ``meta``: UTF-8 JSON with names, the optimizer's plain-data state, and the
  caller's state (step, epoch, RNG state, history).

Only plain arrays and JSON: nothing in a checkpoint is executable, and it is
read with ``np.load(allow_pickle=False)``.

Writes go to a temporary file in the same directory, are fsynced, and then
``os.replace``d over the target, so a crash at any moment leaves either the
old checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Optional, Union

import numpy as np

from gradpool.protos import gradpool_pb2 as pb
from gradpool.worker.engine import graph_id as proto_graph_id
from gradpool.worker.engine.errors import GradpoolError

from .graph import Graph

__all__ = ["CheckpointError", "Checkpoint", "save_checkpoint", "load_checkpoint", "latest_checkpoint"]

FORMAT = "gradpool-checkpoint"
# Version 2 stores arrays under their names (`param/W1`, `slot/W1/m`), so
# `numpy.load(path)["param/W1"]` alone is useful; version 1 (`param_0`,
# `slot_0_0`) is still read.
VERSION = 2
READABLE_VERSIONS = (1, 2)
PathLike = Union[str, "os.PathLike[str]"]
_RESERVED = re.compile(r"^(meta|graph|param[/_].*|slot[/_].*)$")
_STEP_FILE = re.compile(r"^step-(\d+)\.npz$")


class CheckpointError(GradpoolError):
    """A checkpoint cannot be written, read, or does not belong to this model."""


def _param_key(version: int, index: int, name: str) -> str:
    return f"param/{name}" if version >= 2 else f"param_{index}"


def _slot_key(version: int, index: int, name: str, slot_index: int, slot: str) -> str:
    return f"slot/{name}/{slot}" if version >= 2 else f"slot_{index}_{slot_index}"


@dataclass(repr=False)
class Checkpoint:
    """The contents of one checkpoint file."""

    graph: Graph
    params: dict[str, np.ndarray]
    optimizer_state: Optional[dict[str, Any]]
    state: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def graph_id(self) -> str:
        return self.graph.graph_id

    def __repr__(self) -> str:
        where = self.path.name if self.path else "(not saved)"
        optimizer = (self.optimizer_state or {}).get("optimizer", "none")
        step = self.state.get("trainer", {}).get("step")
        return (f"<Checkpoint {where}: graph {self.graph.name!r} ({self.graph_id[:12]}), "
                f"{len(self.params)} params, optimizer {optimizer}" + (f", step {step}>" if step is not None else ">"))


# ------------------------------------------------------------------ writing


def _write_npz(file: BinaryIO, arrays: Mapping[str, np.ndarray]) -> None:
    """The serializer (a seam the tests use to simulate a crash mid-write)."""
    np.savez(file, **arrays)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (best effort: not every OS allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through `write(f)` so that readers see the old or the new file, whole.

    The temporary file lives next to the target (``os.replace`` is atomic only
    within one file system) and is removed if anything fails.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(target.parent)
    return target


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not plain data")


def save_checkpoint(path: PathLike, graph: Graph, params: Mapping[str, np.ndarray],
                    optimizer_state: Optional[Mapping[str, Any]] = None,
                    state: Optional[Mapping[str, Any]] = None,
                    arrays: Optional[Mapping[str, np.ndarray]] = None) -> Path:
    """Write graph, params, optimizer state (``opt.state_dict()``) and `state` to `path`.

    `state` must be JSON-able (the trainer's step, epoch, RNG state, history);
    `arrays` are extra named numpy arrays. Raises CheckpointError, leaving any
    existing file at `path` untouched, when the write fails.
    """
    target = Path(path)
    names = list(params)
    missing = sorted(set(graph.params) - set(names))
    if missing:
        raise CheckpointError(f"cannot checkpoint: no value for param(s) {missing}")
    out: dict[str, np.ndarray] = {}
    for i, name in enumerate(names):
        out[_param_key(VERSION, i, name)] = np.ascontiguousarray(params[name])
    optimizer_meta = None
    if optimizer_state is not None:
        slots = optimizer_state.get("slots", {})
        optimizer_meta = {key: value for key, value in optimizer_state.items() if key != "slots"}
        slot_names: dict[str, list[str]] = {}
        for i, name in enumerate(names):
            slot_names[name] = list(slots.get(name, {}))
            for j, slot in enumerate(slot_names[name]):
                out[_slot_key(VERSION, i, name, j, slot)] = np.ascontiguousarray(slots[name][slot])
        unknown = sorted(set(slots) - set(names))
        if unknown:
            raise CheckpointError(f"cannot checkpoint: optimizer state has slots for unknown param(s) {unknown}")
        optimizer_meta["slot_names"] = slot_names
    for key, value in (arrays or {}).items():
        if _RESERVED.match(key):
            raise CheckpointError(f"cannot checkpoint: array name {key!r} is reserved")
        value = np.asarray(value)
        if value.dtype.kind not in "biuf":
            raise CheckpointError(f"cannot checkpoint: array {key!r} is {value.dtype}, not a plain numeric array")
        out[key] = value
    proto = graph.to_proto()
    meta = {"format": FORMAT, "version": VERSION, "graph_id": proto_graph_id(proto), "graph_name": graph.name,
            "param_names": names, "optimizer": optimizer_meta, "state": dict(state or {})}
    try:
        meta_bytes = json.dumps(meta, default=_json_default, allow_nan=True).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot checkpoint: state is not plain data ({err})") from None
    out["meta"] = np.frombuffer(meta_bytes, dtype=np.uint8)
    out["graph"] = np.frombuffer(proto.SerializeToString(deterministic=True), dtype=np.uint8)
    try:
        return atomic_write(target, lambda f: _write_npz(f, out))
    except OSError as err:
        raise CheckpointError(f"could not write checkpoint {target}: {err.strerror or err}") from None


# ------------------------------------------------------------------ reading


def load_checkpoint(path: PathLike, graph: Optional[Graph] = None) -> Checkpoint:
    """Read a checkpoint; with `graph`, refuse one written for another graph.

    Every failure (missing file, damaged or foreign file, other graph) is one
    CheckpointError with a one-line message.
    """
    source = Path(path)
    try:
        with np.load(source, allow_pickle=False) as npz:
            stored = {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {source}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{source} is a directory; pass a checkpoint file (see latest_checkpoint)") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{source} is not a readable gradpool checkpoint ({_first_line(err)})") from None
    try:
        meta = json.loads(bytes(stored.pop("meta")).decode("utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError("it has no gradpool checkpoint header")
        version = meta.get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"format version {version!r}; this gradpool reads versions {READABLE_VERSIONS}")
        graph_bytes = bytes(stored.pop("graph"))
        proto = pb.Graph()
        proto.ParseFromString(graph_bytes)
        names = meta["param_names"]
        params = {name: stored.pop(_param_key(version, i, name)) for i, name in enumerate(names)}
        optimizer_state = None
        if meta["optimizer"] is not None:
            optimizer_state = dict(meta["optimizer"])
            slot_names = optimizer_state.pop("slot_names")
            optimizer_state["slots"] = {
                name: {slot: stored.pop(_slot_key(version, i, name, j, slot)) for j, slot in enumerate(slot_names[name])}
                for i, name in enumerate(names)}
            if "param_shapes" in optimizer_state:
                optimizer_state["param_shapes"] = {k: tuple(v) for k, v in optimizer_state["param_shapes"].items()}
            hyper = optimizer_state.get("hyperparams", {})
            optimizer_state["hyperparams"] = {k: tuple(v) if isinstance(v, list) else v for k, v in hyper.items()}
        saved_graph = Graph.from_proto(proto)
    except Exception as err:  # KeyError, ValueError, protobuf's DecodeError...: all mean "damaged"
        raise CheckpointError(f"{source} is not a readable gradpool checkpoint ({_first_line(err)})") from None
    checkpoint = Checkpoint(saved_graph, params, optimizer_state, meta.get("state") or {}, stored, source)
    if graph is not None and graph.graph_id != checkpoint.graph_id:
        raise CheckpointError(
            f"{source} was written for graph {saved_graph.name!r} (id {checkpoint.graph_id[:12]}), "
            f"not for this graph {graph.name!r} (id {graph.graph_id[:12]}); refusing to load it")
    return checkpoint


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ------------------------------------------------------------------ directories


def step_checkpoint_path(directory: PathLike, step: int) -> Path:
    """Where the trainer keeps the checkpoint of `step` (sortable by name)."""
    return Path(directory) / f"step-{step:08d}.npz"


def step_checkpoints(directory: PathLike) -> list[Path]:
    """The trainer's checkpoints in `directory`, oldest step first."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: PathLike) -> Optional[Path]:
    """The newest trainer checkpoint in `directory`, or None when there is none."""
    found = step_checkpoints(directory)
    return found[-1] if found else None
