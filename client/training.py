"""Training loops over numpy data, with gradients from the service or in-process.

    trainer = gp.Trainer(graph, gp.Adam(graph.init_params(0), lr=1e-3),
                         backend=gp.Client("localhost:50051"),   # or None: in-process
                         batch_size=64, checkpoint_dir="ckpt", checkpoint_every=100)
    trainer.fit({"x": X, "y": Y}, epochs=10, eval_data={"x": Xt, "y": Yt})
    trainer.evaluate({"x": Xt, "y": Yt})      # {"accuracy": ..., ...}
    trainer.fit(batches, epochs=3)            # or any iterable of batches (a DataLoader, a generator)

The loop is the same whichever "gradient source" computes the gradients: a
remote `Client` and the in-process `LocalBackend` both offer
`.gradients(graph, params, batch)` and `.forward(graph, params, batch, outputs)`.
Everything that decides the result (params, optimizer state, shuffle order,
position in the epoch, RNG state) is checkpointed, so a resumed run repeats
an uninterrupted one bit for bit.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np

from gradpool.worker.engine.errors import GradpoolError, InputError
from gradpool.worker.engine.signature import IndexLimit, check_index_range

from . import optim
from .callbacks import Callback
from .checkpoint import (Checkpoint, CheckpointError, PathLike, load_checkpoint, save_checkpoint,
                         step_checkpoint_path, step_checkpoints)
from .data import DatasetRef, DatasetRows
from .graph import Graph
from .local import local_forward, local_gradients, prepare_arrays

__all__ = ["GradientSource", "LocalBackend", "TrainingError", "History", "Trainer", "fit"]

Arrays = Mapping[str, np.ndarray]
# A batch from an iterable: input name -> array, or one array per graph input in declaration order;
# arrays may be anything with `.numpy()` or `__array__` (torch tensors, lists).
Batches = Iterable[Any]
OptimizerSpec = Union[optim.Optimizer, Callable[[dict[str, np.ndarray]], optim.Optimizer], None]


class TrainingError(GradpoolError):
    """Training cannot go on as configured (the loss diverged, a bad setting)."""


@runtime_checkable
class GradientSource(Protocol):
    """Whatever computes loss, gradients and forward values: a remote Client or LocalBackend.

    For a graph with random ops (dropout) the Trainer calls
    `gradients(graph, params, batch, seed=N)`, with one seed per step; for
    other graphs it passes no seed, so sources written without one still work.
    """

    def gradients(self, graph: Graph, params: Arrays, batch: Arrays) -> tuple[float, dict[str, np.ndarray]]: ...

    def forward(self, graph: Graph, params: Arrays, batch: Arrays,
                outputs: list[str]) -> Mapping[str, np.ndarray]: ...


class LocalBackend:
    """Gradients in this process, with the service's arithmetic (no server needed).

    `shards` > 1 splits each batch as that many workers would, which gives the
    same sums in the same order as a service with that many equal workers.
    """

    def __init__(self, shards: int = 1):
        self.shards = shards

    def gradients(self, graph: Graph, params: Arrays, batch: Arrays, *,
                  seed: Optional[int] = None) -> tuple[float, dict[str, np.ndarray]]:
        return local_gradients(graph, params, batch, shards=self.shards, seed=seed)

    def forward(self, graph: Graph, params: Arrays, batch: Arrays, outputs: list[str]) -> dict[str, np.ndarray]:
        return local_forward(graph, params, batch, outputs)

    def __repr__(self) -> str:
        return f"LocalBackend(shards={self.shards})"


@dataclass
class History:
    """Metrics as training goes: one record per step and one per epoch.

    Step records: step, epoch, loss, lr, grad_norm (before clipping),
    examples, seconds, examples_per_s. Epoch records: epoch, steps, loss
    (batch losses averaged with batch-size weights), examples, seconds,
    examples_per_s, plus the evaluation's metrics.
    """

    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        """The training loss of every step, in order."""
        return [record["loss"] for record in self.steps]

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        return {"steps": [dict(r) for r in self.steps], "epochs": [dict(r) for r in self.epochs]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "History":
        return cls([dict(r) for r in data.get("steps", [])], [dict(r) for r in data.get("epochs", [])])


# ------------------------------------------------------------------ data checks


def _positive_int(name: str, value: Any, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def prepare_data(graph: Graph, data: Arrays, what: str = "training data",
                 needed: Optional[set[str]] = None) -> tuple[dict[str, np.ndarray], int]:
    """Check a dataset (input name -> array with one row per example) against the graph.

    Returns the arrays in the graph's dtypes and the number of examples, or
    raises one InputError naming the array at fault. The checks and their
    wording are the graph's `Signature`, the same every backend applies to
    each batch; here they run once per dataset, before any step.
    """
    if not isinstance(data, Mapping) or not data:
        raise InputError(f"{what} must be a non-empty dict of input name -> numpy array, "
                         f"got {type(data).__name__ if not isinstance(data, Mapping) else 'an empty dict'}")
    signature = graph.program().signature
    try:
        arrays = prepare_arrays(graph, data, "input")
        examples = signature.check_arrays(arrays, "input", needed)
        signature.check_index_ranges(arrays)
    except InputError as err:
        raise InputError(f"{what}: {err}") from None
    return arrays, examples


def _classifier_labels(graph: Graph, logits: str) -> Optional[str]:
    """The input holding the labels of softmax_cross_entropy(logits, labels), if any."""
    program = graph.program()
    if logits not in program.index:
        return None
    at = program.index[logits]
    for node in program.nodes:
        if node.op == "softmax_cross_entropy" and node.inputs[0] == at:
            labels = program.nodes[node.inputs[1]]
            if labels.op == "input":
                return labels.name
    return None


def _progress_bar(enabled: bool, total: int, initial: int, desc: str) -> Any:
    """A tqdm bar, or None when disabled or tqdm is not installed (it is optional)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


def _short_metrics(metrics: Mapping[str, float]) -> dict[str, str]:
    """Metrics as short progress-bar fields: val_accuracy=0.9689 -> val_acc=0.969."""
    short = {"accuracy": "acc", "cross_entropy": "xent"}
    out = {}
    for key, value in metrics.items():
        for long, abbreviation in short.items():
            key = key.replace(long, abbreviation)
        out[key] = f"{value:.3g}"
    return out


def _check_callbacks(callbacks: Optional[Sequence[Callback]]) -> list[Callback]:
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback) or not isinstance(callbacks, (list, tuple)):
        raise InputError(f"callbacks must be a list of gp.Callback, got {type(callbacks).__name__}")
    for callback in callbacks:
        if not isinstance(callback, Callback):
            raise InputError(f"callbacks must be gp.Callback instances, got {type(callback).__name__}")
    return list(callbacks)


def _as_numpy(value: Any) -> np.ndarray:
    """An array from whatever a data pipeline yields, torch tensors included, without importing torch."""
    if isinstance(value, np.ndarray):
        return value
    to_numpy = getattr(value, "numpy", None)
    if callable(to_numpy) and not isinstance(value, np.generic):
        for move in ("detach", "cpu"):  # a torch tensor that requires grad, or sits on a GPU, needs these first
            method = getattr(value, move, None)
            if callable(method):
                value = method()
        return np.asarray(value.numpy())
    return np.asarray(value)


_OPTIMIZERS = {"SGD": optim.SGD, "Adam": optim.Adam, "AdamW": optim.AdamW}


def step_seed(seed: int, step: int) -> int:
    """The seed of training step `step` (1-based) of a trainer seeded with `seed`:
    a hash of both, so each step draws fresh dropout masks, and a run resumed
    from a checkpoint (which holds the step) draws the same ones as an
    uninterrupted run."""
    digest = hashlib.blake2b(f"gradpool-step-seed:{int(seed)}:{int(step)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _optimizer_from_state(params: dict[str, np.ndarray], state: Optional[Mapping[str, Any]]) -> optim.Optimizer:
    """Rebuild a built-in optimizer from its state dict (hyperparameters come from the state)."""
    kind = state.get("optimizer") if state else None
    if kind not in _OPTIMIZERS:
        raise CheckpointError(f"cannot rebuild optimizer {kind!r} from a checkpoint; "
                              f"build it yourself and use Trainer(...).load_checkpoint(path)")
    optimizer = _OPTIMIZERS[kind](params, lr=1.0)
    try:
        optimizer.load_state_dict(state)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"the checkpoint's {kind} state is damaged: {err}") from None
    return optimizer


# ------------------------------------------------------------------ where batches come from


def _rows_of(batch: "Arrays | DatasetRows") -> int:
    if isinstance(batch, DatasetRows):
        return len(batch)
    return len(next(iter(batch.values())))


class _Feed:
    """The batches of one `fit` call. `next_batch()` gives the next one, or
    None when an iterable ends (which ends the epoch); `epoch_done()`, asked
    after each step, says whether that step ended the epoch."""

    steps_per_epoch: Optional[int] = None  # for the progress bar; None when unknown
    exhausted = False  # a one-shot iterator ran dry: nothing more will come

    def next_batch(self) -> "Optional[Arrays | DatasetRows]":
        raise NotImplementedError

    def advance(self) -> None:
        """The batch from next_batch made a step: move past it (a failed step leaves the position)."""

    def epoch_done(self) -> bool:
        raise NotImplementedError


class _ArrayFeed(_Feed):
    """In-memory arrays: shuffled with the trainer's RNG, cut into batch_size
    batches; on a Client, uploaded once and named by rows."""

    def __init__(self, trainer: "Trainer", data: Arrays):
        arrays, examples = prepare_data(trainer.graph, data, "training data")
        if trainer.batch_size > examples:
            raise InputError(f"batch_size {trainer.batch_size} is larger than the training data "
                             f"({examples} examples)")
        if trainer._order is not None and len(trainer._order) != examples:
            raise InputError(f"training stopped mid-epoch over {len(trainer._order)} examples, but this training "
                             f"data has {examples}; resume with the same data")
        if trainer._order is None and trainer._epoch_totals["steps"]:
            raise InputError(f"training stopped mid-epoch over an iterable of batches "
                             f"({trainer._epoch_totals['steps']} batches in); resume with the same data")
        self.trainer, self.examples = trainer, examples
        self.source = trainer._resident(arrays)
        self.steps_per_epoch = trainer.steps_per_epoch(examples)

    def next_batch(self) -> "Arrays | DatasetRows":
        trainer, examples = self.trainer, self.examples
        if trainer._order is None:  # a new epoch; kept at once, since drawing it advanced the RNG
            trainer._order = trainer._rng.permutation(examples) if trainer.shuffle else np.arange(examples)
            trainer._position = 0
        stop = min(trainer._position + trainer.batch_size, examples)
        rows = trainer._order[trainer._position:stop]
        self._next_position = stop
        source = self.source
        return source.take(rows) if isinstance(source, DatasetRef) else {k: a[rows] for k, a in source.items()}

    def advance(self) -> None:
        self.trainer._position = self._next_position

    def epoch_done(self) -> bool:
        remaining = self.examples - self.trainer._position
        return remaining == 0 or (self.trainer.drop_last and remaining < self.trainer.batch_size)


class _IterableFeed(_Feed):
    """Batches from an iterable, converted to the graph's arrays and checked one by one."""

    def __init__(self, trainer: "Trainer", data: Batches, steps_per_epoch: Optional[int], epochs: int):
        if trainer._order is not None:
            raise InputError(f"training stopped mid-epoch over {len(trainer._order)} in-memory examples; "
                             f"resume with the same data")
        self.trainer, self.data, self.per_epoch = trainer, data, steps_per_epoch
        self.one_shot = iter(data) is data  # an iterator (a generator) is read once; a list or DataLoader restarts
        if self.one_shot and steps_per_epoch is None and epochs - trainer.epoch > 1:
            raise InputError(f"a one-shot iterator ({type(data).__name__}) is one epoch, but {epochs - trainer.epoch} "
                             f"more epochs are asked for; pass steps_per_epoch=N to cut it into epochs, "
                             f"or a re-iterable (a list of batches, a DataLoader)")
        try:
            length = None if self.one_shot else len(data)  # type: ignore[arg-type]
        except TypeError:
            length = None
        if length == 0:
            raise InputError("the training data has no batches")
        self.steps_per_epoch = steps_per_epoch or length
        self.iterator: Optional[Iterator[Any]] = iter(data) if self.one_shot else None
        self.names = list(trainer.graph.inputs)
        self.count = 0  # batches read in this fit, for messages

    def next_batch(self) -> "Optional[Arrays]":
        trainer = self.trainer
        done = trainer._epoch_totals["steps"]
        if self.iterator is None:  # a re-iterable starts over; skip what the (resumed) epoch has used
            self.iterator = iter(self.data)
            for skipped in range(done):
                if next(self.iterator, _END) is _END:
                    raise InputError(f"the training data has {skipped} batches, but the epoch being resumed "
                                     f"already used {done}; resume with the same data")
        item = next(self.iterator, _END)
        if item is _END:
            if self.one_shot:
                self.exhausted = True  # and the epoch, if it has begun, ends short
            else:
                self.iterator = None  # the next epoch starts over
            if done == 0 and not (self.one_shot and self.count):
                raise InputError("the training data yielded no batches")
            return None
        self.count += 1
        return self._arrays(item, self.count)

    def epoch_done(self) -> bool:
        return self.per_epoch is not None and self.trainer._epoch_totals["steps"] >= self.per_epoch

    def _arrays(self, item: Any, n: int) -> dict[str, np.ndarray]:
        what = f"training batch {n}"
        if isinstance(item, Mapping):
            pairs = list(item.items())
        elif isinstance(item, (tuple, list)):
            if len(item) != len(self.names):
                raise InputError(f"{what} has {len(item)} arrays, but the graph has {len(self.names)} inputs "
                                 f"{self.names}; yield one array per input in that order, or a dict")
            pairs = list(zip(self.names, item))
        else:
            raise InputError(f"{what} must be a non-empty dict of input name -> array, or a tuple of arrays in "
                             f"the graph's input order {self.names}, got {type(item).__name__}")
        arrays: dict[str, np.ndarray] = {}
        for name, value in pairs:
            try:
                arrays[name] = _as_numpy(value)
            except Exception as err:  # whatever the pipeline's tensor type raises
                raise InputError(f"{what}: input {name!r} ({type(value).__name__}) cannot be turned into a "
                                 f"numpy array: {err}") from None
        prepared, _ = prepare_data(self.trainer.graph, arrays, what)
        return prepared


_END = object()


# ------------------------------------------------------------------ trainer


class Trainer:
    """Minibatch training of a graph's params with an optimizer from client.optim.

    `optimizer` is an Optimizer built over the params (its arrays are updated
    in place and become `trainer.params`), or a function params -> Optimizer
    applied to `params` (default: `graph.init_params(seed)`), or None for
    Adam(lr=1e-3). `backend` is a Client, an address string ("host:port", a
    Client is made and closed with the trainer), any GradientSource, or None
    to compute in this process.

    Epochs shuffle with a generator seeded by `seed`; batches are taken in
    that order, the last one smaller unless `drop_last`. With
    `checkpoint_dir`, a checkpoint (`step-NNNNNNNN.npz`) is written every
    `checkpoint_every` steps and/or `checkpoint_every_epochs` epochs, at the
    end of `fit`, and when a step fails with a GradpoolError; the newest
    `keep_checkpoints` are kept. `callbacks` (gp.Callback) run in every
    `fit`, before the ones given to that fit.
    """

    def __init__(self, graph: Graph, optimizer: OptimizerSpec = None, *,
                 params: Optional[Arrays] = None, backend: Union[GradientSource, str, None] = None,
                 batch_size: int = 32, shuffle: bool = True, drop_last: bool = False, seed: int = 0,
                 progress: bool = True, checkpoint_dir: Optional[PathLike] = None,
                 checkpoint_every: Optional[int] = None, checkpoint_every_epochs: Optional[int] = None,
                 keep_checkpoints: Optional[int] = 3, eval_batch_size: int = 1024,
                 callbacks: Optional[Sequence[Callback]] = None):
        if not isinstance(graph, Graph):
            raise InputError(f"Trainer needs a gp.Graph, got {type(graph).__name__}")
        if graph.loss is None:
            raise InputError("the graph has no loss yet; call graph.set_loss(expr) before training")
        self.graph = graph
        self.batch_size = _positive_int("batch_size", batch_size)
        self.eval_batch_size = _positive_int("eval_batch_size", eval_batch_size)
        self.checkpoint_every = _positive_int("checkpoint_every", checkpoint_every, allow_none=True)
        self.checkpoint_every_epochs = _positive_int("checkpoint_every_epochs", checkpoint_every_epochs,
                                                     allow_none=True)
        self.keep_checkpoints = _positive_int("keep_checkpoints", keep_checkpoints, allow_none=True)
        self.shuffle, self.drop_last, self.progress = bool(shuffle), bool(drop_last), bool(progress)
        self.seed = int(seed)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.optimizer = self._make_optimizer(optimizer, params)
        self.params: dict[str, np.ndarray] = dict(self.optimizer.params)
        self._owns_backend = False
        self.backend = self._make_backend(backend)

        self.history = History()
        self.step = 0  # steps taken in total
        self.epoch = 0  # epochs completed in total
        self._rng = np.random.default_rng(self.seed)
        self._order: Optional[np.ndarray] = None  # this epoch's example order, once drawn
        self._position = 0  # examples of `_order` already used
        self._epoch_totals = {"loss_sum": 0.0, "examples": 0, "seconds": 0.0, "steps": 0}
        self._session = {"steps": 0, "examples": 0, "seconds": 0.0}
        self._saved_step: Optional[int] = None
        self.last_checkpoint: Optional[Path] = None
        self.callbacks = _check_callbacks(callbacks)
        self._active: list[Callback] = []  # the callbacks of the fit in progress
        self.stop_reason: Optional[str] = None  # why the last fit stopped early (request_stop), if it did

    # -------------------------------------------------------------- construction

    def _make_optimizer(self, optimizer: OptimizerSpec, params: Optional[Arrays]) -> optim.Optimizer:
        declared = self.graph.params
        if isinstance(optimizer, optim.Optimizer):
            live = dict(optimizer.params)
            if params is not None and (set(params) != set(live) or any(params[k] is not live[k] for k in live)):
                raise InputError("params are not the arrays the optimizer updates; pass only the optimizer "
                                 "(it was built over the params)")
            self._check_params(live, exact_dtype=True)
            return optimizer
        if params is None:
            values = self.graph.init_params(self.seed)
        else:
            self._check_params(params, exact_dtype=False)
            values = {name: np.array(params[name], dtype=declared[name][1]) for name in declared}
        if optimizer is None:
            built = optim.Adam(values, lr=1e-3)
        elif callable(optimizer):
            built = optimizer(values)
        else:
            raise InputError(f"optimizer must be a client.optim Optimizer or a function params -> Optimizer, "
                             f"got {type(optimizer).__name__}")
        if not isinstance(built, optim.Optimizer) or any(built.params.get(k) is not v for k, v in values.items()):
            raise InputError("the optimizer function must return an Optimizer built over the params it is given")
        return built

    def _check_params(self, params: Arrays, exact_dtype: bool) -> None:
        declared = self.graph.params
        if set(params) != set(declared):
            missing, extra = sorted(set(declared) - set(params)), sorted(set(params) - set(declared))
            raise InputError(f"params do not match the graph: missing {missing}, unknown {extra}")
        for name, (shape, dtype) in declared.items():
            value = np.asarray(params[name])
            if value.shape != tuple(shape):
                raise InputError(f"param {name!r} has shape {value.shape}, but the graph declares {tuple(shape)}")
            if exact_dtype and value.dtype != dtype:
                raise InputError(f"param {name!r} is {value.dtype}, but the graph declares {dtype}; "
                                 f"build the optimizer over graph.init_params() or cast the arrays")

    def _make_backend(self, backend: Union[GradientSource, str, None]) -> GradientSource:
        if backend is None:
            return LocalBackend()
        if isinstance(backend, str):
            from .remote import Client  # only needed for remote training
            self._owns_backend = True
            return Client(backend)
        if not (callable(getattr(backend, "gradients", None)) and callable(getattr(backend, "forward", None))):
            raise InputError(f"backend must be a Client, an address or an object with .gradients and .forward, "
                             f"got {type(backend).__name__}")
        return backend

    def close(self) -> None:
        """Close the backend if this trainer opened it (from an address)."""
        if self._owns_backend:
            closer = getattr(self.backend, "close", None)
            if callable(closer):
                closer()
            self._owns_backend = False

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -------------------------------------------------------------- training

    def steps_per_epoch(self, examples: int) -> int:
        return examples // self.batch_size if self.drop_last else -(-examples // self.batch_size)

    @property
    def throughput(self) -> dict[str, float]:
        """This session's speed: steps, examples, seconds in steps, examples/s, seconds per step."""
        steps, examples, seconds = self._session["steps"], self._session["examples"], self._session["seconds"]
        return {"steps": steps, "examples": examples, "seconds": seconds,
                "examples_per_s": examples / seconds if seconds else 0.0,
                "seconds_per_step": seconds / steps if steps else 0.0}

    def fit(self, data: Union[Arrays, Batches], epochs: int = 1, *, max_steps: Optional[int] = None,
            eval_data: Optional[Arrays] = None, eval_every: int = 1,
            eval_fn: Optional[Callable[["Trainer"], Mapping[str, float]]] = None,
            steps_per_epoch: Optional[int] = None, callbacks: Optional[Sequence[Callback]] = None) -> History:
        """Train until `epochs` epochs (counted since the start, resumed runs included) are done.

        `data` is a dict of arrays (one row per example: shuffled with the
        trainer's seed and cut into `batch_size` batches, all checked before
        the first step), or any iterable of batches, each a dict input name ->
        array or a tuple with one array per graph input in declaration order
        (torch tensors and anything with `__array__` are converted; each batch
        is checked before its step; batch_size, shuffle and drop_last are the
        iterable's business). An epoch of an iterable is one pass over it,
        restarted every epoch (a list, a DataLoader), or `steps_per_epoch`
        batches. A one-shot iterator (a generator) is read once: without
        `steps_per_epoch` it is one epoch; with it, epochs take that many
        batches each from the same stream, and the stream running dry ends
        the epoch and the fit. A resumed run skips the batches its
        interrupted epoch already used when the iterable restarts, and
        continues a one-shot iterator where the caller left it.

        `max_steps` stops earlier, after that many steps in total, possibly
        mid-epoch; a later `fit` (or a resumed trainer) continues from there.
        Every `eval_every` epochs and at the end, `eval_fn(trainer)` (or, with
        `eval_data`, `trainer.evaluate(eval_data)` and the loss on it,
        `val_loss`) adds metrics to the epoch record. `callbacks` join the
        trainer's for this call; one may end it early with `request_stop`.
        """
        epochs = _positive_int("epochs", epochs)
        max_steps = _positive_int("max_steps", max_steps, allow_none=True)
        eval_every = _positive_int("eval_every", eval_every)
        steps_per_epoch = _positive_int("steps_per_epoch", steps_per_epoch, allow_none=True)
        active = self.callbacks + _check_callbacks(callbacks)
        if isinstance(data, Mapping):
            if steps_per_epoch is not None:
                raise InputError("steps_per_epoch is for iterables of batches; an epoch of in-memory arrays "
                                 "is all their examples (use max_steps to stop earlier)")
            feed: "_Feed" = _ArrayFeed(self, data)
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, np.ndarray)):
            feed = _IterableFeed(self, data, steps_per_epoch, epochs)
        else:
            raise InputError(f"training data must be a non-empty dict of input name -> numpy array or an "
                             f"iterable of batches, got {type(data).__name__}")
        evaluate = self._evaluator(eval_data, eval_fn)
        per_epoch = feed.steps_per_epoch
        total: Optional[int] = None
        if per_epoch is not None:
            total = epochs * per_epoch if max_steps is None else min(epochs * per_epoch, max_steps)
        elif max_steps is not None:
            total = max_steps
        shown: dict[str, str] = {}  # the last evaluation, on the progress bar
        bar = _progress_bar(self.progress and (total is None or self.step < total), total,
                            self.step if total is None else min(self.step, total), "training")
        self.stop_reason = None
        self._active = active
        try:
            self._dispatch("on_fit_start")
            while (self.epoch < epochs and (max_steps is None or self.step < max_steps)
                   and self.stop_reason is None):
                batch = feed.next_batch()
                if batch is None:  # an iterable ran out: the epoch ends here (a one-shot one, maybe at a boundary)
                    if self._epoch_totals["steps"]:
                        due = self.epoch + 1 == epochs or (self.epoch + 1) % eval_every == 0
                        shown.update(_short_metrics(self._end_epoch(evaluate if due else None)))
                    if feed.exhausted and self.stop_reason is None and self.epoch < epochs:
                        self.request_stop("the training data is exhausted")
                    continue
                record = self._train_step(batch)
                feed.advance()
                self._dispatch("on_step", record)
                loss, epoch = record["loss"], record["epoch"]
                if feed.epoch_done():
                    due = self.epoch + 1 == epochs or (self.epoch + 1) % eval_every == 0
                    shown.update(_short_metrics(self._end_epoch(evaluate if due else None)))
                if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self._autosave()
                if bar is not None:
                    speed = self.throughput["examples_per_s"]
                    bar.set_postfix(epoch=epoch, loss=f"{loss:.4g}", ex_s=f"{speed:,.0f}", **shown, refresh=False)
                    bar.update(1)
            if self.step:
                self._autosave()
        except GradpoolError:
            # The failed step changed nothing, so the state is the last good step's: keep it.
            try:
                self._autosave()
            except GradpoolError:
                pass
            raise
        finally:
            if bar is not None:
                bar.close()
            try:
                self._dispatch("on_fit_end")
            finally:
                self._active = []
        return self.history

    def request_stop(self, reason: str = "stop requested") -> None:
        """End the running `fit` after the current step, cleanly (checkpoint, on_fit_end); for callbacks."""
        self.stop_reason = str(reason)

    def _dispatch(self, hook: str, *args: Any) -> None:
        for callback in self._active:
            getattr(callback, hook)(self, *args)

    def _resident(self, arrays: dict[str, np.ndarray]) -> "dict[str, np.ndarray] | DatasetRef":
        """On a backend that keeps datasets (a Client), upload the data once;
        each step then sends indices, not examples. Elsewhere the arrays."""
        upload = getattr(self.backend, "upload", None)
        return upload(arrays) if callable(upload) else arrays

    def _train_step(self, batch: "Arrays | DatasetRows") -> dict[str, Any]:
        """One optimizer step on `batch`; the state changes only if it succeeds."""
        started = time.perf_counter()
        size = _rows_of(batch)
        random = {"seed": step_seed(self.seed, self.step + 1)} if self.graph.program().random_nodes else {}
        loss, grads = self.backend.gradients(self.graph, self.params, batch, **random)
        loss = float(loss)
        if not math.isfinite(loss):
            raise TrainingError(f"the loss is {loss} at step {self.step + 1}; lower the learning rate "
                                f"(the params are left at step {self.step})")
        lr = self.optimizer.lr
        try:
            self.optimizer.step(grads)
        except ValueError as err:  # a non-finite gradient norm with clipping, or gradients that do not fit
            raise TrainingError(f"step {self.step + 1}: {err} (the params are left at step {self.step})") from None
        seconds = time.perf_counter() - started
        self.step += 1
        norm = self.optimizer.last_grad_norm
        record = {"step": self.step, "epoch": self.epoch + 1, "loss": loss, "lr": lr,
                  "grad_norm": norm, "examples": size, "seconds": seconds,
                  "examples_per_s": size / seconds if seconds else 0.0}
        self.history.steps.append(record)
        totals = self._epoch_totals
        totals["loss_sum"] += loss * size
        totals["examples"] += size
        totals["seconds"] += seconds
        totals["steps"] += 1
        self._session["steps"] += 1
        self._session["examples"] += size
        self._session["seconds"] += seconds
        return record

    def _end_epoch(self, evaluate: Optional[Callable[[], Mapping[str, float]]]) -> dict[str, float]:
        metrics = self._finish_epoch(evaluate)
        if self.checkpoint_every_epochs and self.epoch % self.checkpoint_every_epochs == 0:
            self._autosave()
        return metrics

    def _finish_epoch(self, evaluate: Optional[Callable[[], Mapping[str, float]]]) -> dict[str, float]:
        totals = self._epoch_totals
        self.epoch += 1
        self._order, self._position = None, 0
        record: dict[str, Any] = {
            "epoch": self.epoch, "step": self.step, "steps": totals["steps"],
            "loss": totals["loss_sum"] / totals["examples"], "examples": totals["examples"],
            "seconds": totals["seconds"],
            "examples_per_s": totals["examples"] / totals["seconds"] if totals["seconds"] else 0.0}
        self._epoch_totals = {"loss_sum": 0.0, "examples": 0, "seconds": 0.0, "steps": 0}
        metrics = {k: float(v) for k, v in (evaluate() if evaluate else {}).items()}
        if evaluate is not None:
            self._dispatch("on_eval", metrics)
        record.update(metrics)
        self.history.epochs.append(record)
        self._dispatch("on_epoch", record)
        return metrics

    def _evaluator(self, eval_data: Optional[Arrays],
                   eval_fn: Optional[Callable[["Trainer"], Mapping[str, float]]]
                   ) -> Optional[Callable[[], Mapping[str, float]]]:
        """The end-of-epoch evaluation, checked now so a bad setting fails before training."""
        if eval_fn is not None:
            if not callable(eval_fn):
                raise InputError(f"eval_fn must be a function trainer -> dict of metrics, got {type(eval_fn).__name__}")
            return lambda: eval_fn(self)
        if eval_data is None:
            return None
        labels = self._labels_for("logits")
        prepared, _ = prepare_data(self.graph, eval_data, "evaluation data")
        if labels not in prepared:
            raise InputError(f"evaluation data is missing the labels {labels!r}")

        def held_out() -> dict[str, float]:
            result = self.evaluate(prepared, labels=labels)
            metrics = {"val_accuracy": result["accuracy"], "val_cross_entropy": result["cross_entropy"]}
            if not self.graph.program().random_nodes:  # with dropout the loss itself is random: no val_loss
                metrics["val_loss"] = self.loss_on(prepared)
            return metrics
        return held_out

    def loss_on(self, data: Arrays, *, batch_size: Optional[int] = None) -> float:
        """The graph's loss on `data` with the current params, in batches of `eval_batch_size`
        averaged with batch-size weights (as an epoch's training loss is).

        Computed by the backend's `gradients` (the service has no loss-only
        call), so it costs a backward pass per batch. A graph with dropout is
        refused: its loss is random (and dropout is on in a gradients run), so
        held-out metrics come from `evaluate`, which runs forward only.
        """
        random = self.graph.program().random_nodes
        if random:
            raise InputError(f"the loss of a graph with dropout ({random[0].where()}) is random; "
                             "use evaluate()'s cross_entropy for held-out data")
        size = _positive_int("batch_size", batch_size or self.eval_batch_size)
        arrays, examples = prepare_data(self.graph, data, "evaluation data")
        source = self._resident(arrays) if examples > size else arrays
        total = 0.0
        for start in range(0, examples, size):
            rows = np.arange(start, min(start + size, examples))
            chunk = (source.take(rows) if isinstance(source, DatasetRef)
                     else {key: array[start:start + size] for key, array in source.items()})
            loss, _ = self.backend.gradients(self.graph, self.params, chunk)
            total += float(loss) * len(rows)
        return total / examples

    # -------------------------------------------------------------- forward only

    def predict(self, data: Arrays, output: Union[str, Sequence[str]] = "logits", *,
                batch_size: Optional[int] = None) -> Union[np.ndarray, dict[str, np.ndarray]]:
        """Values of per-example node(s) for every example, forward only, in batches.

        Computed by the backend (remotely with a Client). Returns one array for
        one name, a dict for a list of names.
        """
        names = [output] if isinstance(output, str) else list(output)
        for name in names:
            if name not in self.graph.program().index:
                raise InputError(f"the graph has no node named {name!r}; name it with expr.named({name!r})")
        size = _positive_int("batch_size", batch_size or self.eval_batch_size)
        arrays, examples = prepare_data(self.graph, data, "prediction data", needed=set())
        source = self._resident(arrays) if examples > size else arrays  # one request: send it inline
        pieces: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for start in range(0, examples, size):
            chunk = (source.take(np.arange(start, min(start + size, examples))) if isinstance(source, DatasetRef)
                     else {key: array[start:start + size] for key, array in source.items()})
            values = self.backend.forward(self.graph, self.params, chunk, names)
            for name in names:
                pieces[name].append(np.asarray(values[name]))
        result = {name: np.concatenate(parts) for name, parts in pieces.items()}
        return result[output] if isinstance(output, str) else result

    def _labels_for(self, logits: str) -> str:
        labels = _classifier_labels(self.graph, logits)
        if labels is None:
            raise InputError(f"cannot measure accuracy: no softmax_cross_entropy of a node named {logits!r} "
                             f"with an input as labels; name the logits with .named({logits!r}), "
                             f"pass labels=..., or give eval_fn")
        return labels

    def evaluate(self, data: Arrays, *, logits: str = "logits", labels: Optional[str] = None,
                 batch_size: Optional[int] = None) -> dict[str, float]:
        """Classification metrics on held-out data: accuracy, mean cross-entropy, counts.

        The logits come from the backend (`predict`); `labels` defaults to the
        input the graph's softmax_cross_entropy of `logits` uses.
        """
        labels = labels or self._labels_for(logits)
        arrays, examples = prepare_data(self.graph, data, "evaluation data", needed={labels})
        truth = arrays[labels]
        features = {name: array for name, array in arrays.items() if name != labels}
        scores = np.asarray(self.predict(features, logits, batch_size=batch_size), dtype=np.float64)
        if scores.ndim != 2 or truth.ndim != 1:
            raise InputError(f"accuracy needs logits of shape (examples, classes) and one label per example, "
                             f"got {scores.shape} and {truth.shape}")
        try:
            check_index_range(truth, IndexLimit(labels, scores.shape[1], f"class labels for {logits!r}"))
        except InputError as err:
            raise InputError(f"evaluation data: {err}") from None
        correct = int(np.count_nonzero(scores.argmax(axis=1) == truth))
        shifted = scores - scores.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        cross_entropy = float(-log_probs[np.arange(examples), truth].mean())
        return {"accuracy": correct / examples, "cross_entropy": cross_entropy,
                "correct": correct, "examples": examples}

    # -------------------------------------------------------------- checkpoints

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The trainer's own resumable state as (JSON-able dict, arrays)."""
        state = {"trainer": {"step": self.step, "epoch": self.epoch, "position": self._position,
                             "batch_size": self.batch_size, "shuffle": self.shuffle, "drop_last": self.drop_last,
                             "seed": self.seed, "rng": self._rng.bit_generator.state,
                             "epoch_totals": dict(self._epoch_totals)},
                 "history": self.history.to_dict()}
        arrays = {} if self._order is None else {"order": self._order}
        return state, arrays

    def save_checkpoint(self, path: Optional[PathLike] = None) -> Path:
        """Write a checkpoint atomically to `path` (default: checkpoint_dir/step-N.npz)."""
        if path is None:
            if self.checkpoint_dir is None:
                raise CheckpointError("no checkpoint path given and the trainer has no checkpoint_dir")
            path = step_checkpoint_path(self.checkpoint_dir, self.step)
        state, arrays = self.state_dict()
        written = save_checkpoint(path, self.graph, self.params, self.optimizer.state_dict(), state, arrays)
        self.last_checkpoint = written
        return written

    def _autosave(self) -> None:
        """Checkpoint into checkpoint_dir (once per step) and prune the oldest."""
        if self.checkpoint_dir is None or self._saved_step == self.step or self.step == 0:
            return
        self.save_checkpoint()
        self._saved_step = self.step
        if self.keep_checkpoints:
            for old in step_checkpoints(self.checkpoint_dir)[:-self.keep_checkpoints]:
                old.unlink(missing_ok=True)

    def load_checkpoint(self, path: PathLike) -> "Trainer":
        """Continue from a checkpoint of this graph: params (in place), optimizer, position, RNG, seed, history.

        Everything is checked before anything changes: a checkpoint of another
        graph, or one that does not fit, raises CheckpointError and leaves the
        trainer as it was.
        """
        self._restore(load_checkpoint(path, graph=self.graph))
        return self

    def _restore(self, checkpoint: Checkpoint) -> None:
        where = checkpoint.path
        try:
            saved = checkpoint.state["trainer"]
            rng = np.random.default_rng()
            rng.bit_generator.state = saved["rng"]
            step, epoch, position = int(saved["step"]), int(saved["epoch"]), int(saved["position"])
            seed = int(saved.get("seed", self.seed))  # keys the per-step seeds (dropout) from here on
            totals = {key: saved["epoch_totals"][key] for key in self._epoch_totals}
            history = History.from_dict(checkpoint.state.get("history", {}))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{where} has no usable trainer state ({err})") from None
        order = checkpoint.arrays.get("order")
        if order is not None and (order.ndim != 1 or not 0 <= position < len(order)):
            raise CheckpointError(f"{where} has an inconsistent shuffle position")
        declared = self.graph.params
        if set(checkpoint.params) != set(declared):
            raise CheckpointError(f"{where} has params {sorted(checkpoint.params)}, the graph {sorted(declared)}")
        for name, value in checkpoint.params.items():
            if value.shape != self.params[name].shape:
                raise CheckpointError(f"{where} has {name!r} of shape {value.shape}, "
                                      f"the graph declares {self.params[name].shape}")
        if checkpoint.optimizer_state is not None:
            try:
                self.optimizer.load_state_dict(checkpoint.optimizer_state)
            except (TypeError, ValueError) as err:
                raise CheckpointError(f"{where}: its optimizer state does not fit this trainer's "
                                      f"{type(self.optimizer).__name__}: {err}") from None
        for name, value in checkpoint.params.items():
            np.copyto(self.params[name], value, casting="same_kind")  # in place: the optimizer holds them
        self.step, self.epoch, self._position = step, epoch, position
        self.seed = seed
        self._order = None if order is None else order.astype(np.int64)
        self._rng = rng
        self._epoch_totals = totals
        self.history = history
        self._saved_step = step
        self.last_checkpoint = where

    @classmethod
    def from_checkpoint(cls, path: PathLike, *, backend: Union[GradientSource, str, None] = None,
                        **options: Any) -> "Trainer":
        """A trainer rebuilt from a checkpoint alone: its graph, params and built-in optimizer.

        For predictions, or to resume without the code that built the model.
        Other Trainer options (batch_size, ...) default to the checkpoint's.
        """
        checkpoint = load_checkpoint(path)
        graph = checkpoint.graph
        params = {name: np.array(value) for name, value in checkpoint.params.items()}
        optimizer = _optimizer_from_state(params, checkpoint.optimizer_state)
        saved = checkpoint.state.get("trainer", {})
        for key in ("batch_size", "shuffle", "drop_last", "seed"):
            if key in saved:
                options.setdefault(key, saved[key])
        trainer = cls(graph, optimizer, backend=backend, **options)
        trainer._restore(checkpoint)
        return trainer


def fit(graph: Graph, data: Union[Arrays, Batches], *, epochs: int = 1, batch_size: int = 32,
        optimizer: OptimizerSpec = None, params: Optional[Arrays] = None,
        backend: Union[GradientSource, str, None] = None, seed: int = 0, eval_data: Optional[Arrays] = None,
        max_steps: Optional[int] = None, steps_per_epoch: Optional[int] = None, progress: bool = True,
        **trainer_options: Any) -> Trainer:
    """Train in one call; returns the Trainer (params, history, evaluate, predict).

    `data` is arrays or an iterable of batches, as for `Trainer.fit`;
    `callbacks=[...]` and the other options go to the Trainer.
    """
    trainer = Trainer(graph, optimizer, params=params, backend=backend, batch_size=batch_size, seed=seed,
                      progress=progress, **trainer_options)
    trainer.fit(data, epochs=epochs, eval_data=eval_data, max_steps=max_steps, steps_per_epoch=steps_per_epoch)
    return trainer
