"""Hooks into the training loop: early stopping, best checkpoints, CSV and TensorBoard logs.

    trainer.fit(data, epochs=50, eval_data=held_out, callbacks=[
        gp.EarlyStopping(monitor="val_loss", patience=3),
        gp.BestCheckpoint("best.npz", monitor="val_accuracy", mode="max"),
        gp.CSVLogger("train.csv"), gp.TensorBoardLogger("runs/mlp")])

A callback sees the trainer and the records the loop appends to its
History: `on_step(trainer, record)` after every optimizer step,
`on_eval(trainer, metrics)` after an evaluation, `on_epoch(trainer, record)`
after every epoch (its record holds the evaluation's metrics), and
`on_fit_start` / `on_fit_end` around each `fit` (the end also when fit
raises, so logs are flushed). `trainer.request_stop(reason)` ends fit
cleanly after the current step, as an uninterrupted run's end does.

Callbacks keep no state of their own in checkpoints: the monitoring ones
rebuild theirs from `trainer.history` (which checkpoints hold) when a fit
starts, so a resumed run stops where an uninterrupted one does.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from gradpool.worker.engine.errors import InputError

from .checkpoint import PathLike, atomic_write

if TYPE_CHECKING:
    from .training import Trainer

__all__ = ["Callback", "EarlyStopping", "BestCheckpoint", "CSVLogger", "TensorBoardLogger"]


class Callback:
    """Base class: override the hooks you need; each does nothing by default."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        """Before the first step of a `fit` (also of a resumed one)."""

    def on_step(self, trainer: "Trainer", record: Mapping[str, Any]) -> None:
        """After each step; `record` is the step's History record (loss, lr, grad_norm, ...)."""

    def on_eval(self, trainer: "Trainer", metrics: Mapping[str, float]) -> None:
        """After each end-of-epoch evaluation, with its metrics (val_loss, val_accuracy, ...)."""

    def on_epoch(self, trainer: "Trainer", record: Mapping[str, Any]) -> None:
        """After each epoch; `record` is the epoch's History record, evaluation metrics included."""

    def on_fit_end(self, trainer: "Trainer") -> None:
        """When `fit` returns or raises."""


class _Monitor(Callback):
    """Tracks the best value of one epoch metric; shared by EarlyStopping and BestCheckpoint."""

    def __init__(self, monitor: str, mode: str, min_delta: float):
        if not isinstance(monitor, str) or not monitor:
            raise InputError(f"monitor must be the name of an epoch metric such as 'val_loss', got {monitor!r}")
        if mode not in ("min", "max"):
            raise InputError(f"mode must be 'min' or 'max', got {mode!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not min_delta >= 0:
            raise InputError(f"min_delta must be a number >= 0, got {min_delta!r}")
        self.monitor, self.mode, self.min_delta = monitor, mode, float(min_delta)
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.wait = 0  # epochs with the metric since the last improvement
        self._evaluated = False
        self._seen = False

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def _observe(self, epoch: int, value: float) -> bool:
        """Account one epoch's value; True when it is a new best."""
        if self._improves(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            return True
        self.wait += 1
        return False

    def on_fit_start(self, trainer: "Trainer") -> None:
        # The history (restored with a checkpoint) says where the monitoring stood.
        self.best, self.best_epoch, self.wait, self._seen = None, None, 0, False
        for record in trainer.history.epochs:
            if self.monitor in record:
                self._observe(int(record["epoch"]), float(record[self.monitor]))

    def on_eval(self, trainer: "Trainer", metrics: Mapping[str, float]) -> None:
        self._evaluated = True

    def _value(self, record: Mapping[str, Any]) -> Optional[float]:
        evaluated, self._evaluated = self._evaluated, False
        if self.monitor in record:
            self._seen = True
            return float(record[self.monitor])
        if evaluated:
            self._seen = True  # this error says it: no warning at the end as well
            known = sorted(k for k in record if isinstance(record[k], (int, float)))
            raise InputError(f"{type(self).__name__} monitors {self.monitor!r}, which the epoch records do not "
                             f"have; they have {known}")
        return None  # no evaluation was due this epoch

    def on_fit_end(self, trainer: "Trainer") -> None:
        if not self._seen and not any(self.monitor in r for r in trainer.history.epochs) and trainer.history.epochs:
            warnings.warn(f"{type(self).__name__} never saw {self.monitor!r}: give fit eval_data "
                          f"(or an eval_fn returning it)", stacklevel=2)


class EarlyStopping(_Monitor):
    """Stop fit when `monitor` has not improved by more than `min_delta` for `patience` epochs.

    `mode="min"` for losses, `"max"` for accuracies. Epochs without the
    metric (evaluation not due, `eval_every`) do not count. `stopped_epoch`
    is the epoch after which it stopped training, or None.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 3, min_delta: float = 0.0, mode: str = "min"):
        super().__init__(monitor, mode, min_delta)
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise InputError(f"patience must be an integer >= 0, got {patience!r}")
        self.patience = patience
        self.stopped_epoch: Optional[int] = None

    def on_fit_start(self, trainer: "Trainer") -> None:
        super().on_fit_start(trainer)
        self.stopped_epoch = None

    def on_epoch(self, trainer: "Trainer", record: Mapping[str, Any]) -> None:
        value = self._value(record)
        if value is None:
            return
        self._observe(int(record["epoch"]), value)
        if self.wait > self.patience:
            self.stopped_epoch = int(record["epoch"])
            trainer.request_stop(f"early stopping: {self.monitor} has not improved for {self.wait} epochs "
                                 f"(best {self.best:.6g} at epoch {self.best_epoch})")


class BestCheckpoint(_Monitor):
    """Keep the checkpoint of the epoch with the best `monitor` at `path` (atomically replaced).

    Writes through the trainer's checkpoint writer, so the file always holds
    a whole checkpoint to resume or predict from (`Trainer.from_checkpoint`).
    """

    def __init__(self, path: PathLike, monitor: str = "val_loss", mode: str = "min", min_delta: float = 0.0):
        super().__init__(monitor, mode, min_delta)
        self.path = Path(path)
        self.saved_epoch: Optional[int] = None

    def on_epoch(self, trainer: "Trainer", record: Mapping[str, Any]) -> None:
        value = self._value(record)
        if value is not None and self._observe(int(record["epoch"]), value):
            trainer.save_checkpoint(self.path)
            self.saved_epoch = int(record["epoch"])


# ------------------------------------------------------------------ logs

_STEP_SCALARS = ("loss", "lr", "grad_norm", "examples_per_s")


def _scalars(record: Mapping[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


class CSVLogger(Callback):
    """One CSV row per step and per epoch (`kind` says which): loss, lr, examples/s, metrics.

    Columns are the union of the records' keys; when a new one appears (the
    first evaluation's metrics) the file is rewritten with the wider header.
    A resumed run drops the rows after its checkpoint's step, which it redoes,
    so the file reads like an uninterrupted run's. Rows are appended; the
    rewrites are atomic. `steps=False` logs epochs only.
    """

    def __init__(self, path: PathLike, *, steps: bool = True):
        self.path = Path(path)
        self.steps = bool(steps)
        self._rows: list[dict[str, Any]] = []
        self._columns: list[str] = []

    def on_fit_start(self, trainer: "Trainer") -> None:
        self._rows, self._columns = [], ["kind", "step", "epoch"]
        if self.path.exists():
            with open(self.path, newline="") as f:
                for row in csv.DictReader(f):
                    if row.get("step") and int(row["step"]) <= trainer.step and (
                            row.get("kind") != "epoch" or int(row["epoch"]) <= trainer.epoch):
                        self._add({k: v for k, v in row.items() if v != ""})
        self._write()

    def _add(self, row: Mapping[str, Any]) -> bool:
        widened = False
        for key in row:
            if key not in self._columns:
                self._columns.append(key)
                widened = True
        self._rows.append(dict(row))
        return widened

    def _write(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self._columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self._rows)
        data = text.getvalue().encode("utf-8")
        atomic_write(self.path, lambda f: f.write(data))

    def _log(self, kind: str, record: Mapping[str, Any]) -> None:
        row = {"kind": kind, **{k: v for k, v in record.items() if isinstance(v, (int, float, str))}}
        if self._add(row):
            self._write()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._columns, lineterminator="\n").writerow(row)

    def on_step(self, trainer: "Trainer", record: Mapping[str, Any]) -> None:
        if self.steps:
            self._log("step", record)

    def on_epoch(self, trainer: "Trainer", record: Mapping[str, Any]) -> None:
        self._log("epoch", record)


class TensorBoardLogger(Callback):
    """TensorBoard scalars: `train/loss`, `train/lr`, `train/grad_norm`, `train/examples_per_s`
    at each step, `epoch/<name>` for the epoch records' loss and metrics; the x axis is
    the step throughout (an epoch's scalars at the step that ended it).

    Needs tensorboardX (`pip install 'gradpool[tensorboard]'`); view with
    `tensorboard --logdir LOGDIR`. `every` logs one step in that many.
    """

    def __init__(self, logdir: PathLike, *, every: int = 1):
        try:
            import tensorboardX  # noqa: F401  (only checked here; the writer opens at fit start)
        except ImportError:
            raise ImportError("TensorBoardLogger needs tensorboardX: pip install 'gradpool[tensorboard]'") from None
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InputError(f"every must be a positive integer, got {every!r}")
        self.logdir = Path(logdir)
        self.every = every
        self._writer: Any = None

    def on_fit_start(self, trainer: "Trainer") -> None:
        from tensorboardX import SummaryWriter

        # purge_step: a resumed run hides the events after its checkpoint, which it redoes.
        self._writer = SummaryWriter(str(self.logdir), purge_step=trainer.step + 1 if trainer.step else None)

    def on_step(self, trainer: "Trainer", record: Mapping[str, Any]) -> None:
        if self._writer is None or int(record["step"]) % self.every:
            return
        for key in _STEP_SCALARS:
            if isinstance(record.get(key), (int, float)):
                self._writer.add_scalar(f"train/{key}", float(record[key]), int(record["step"]))

    def on_epoch(self, trainer: "Trainer", record: Mapping[str, Any]) -> None:
        if self._writer is None:
            return
        for key, value in _scalars(record, skip=("step", "steps")).items():
            self._writer.add_scalar(f"epoch/{key}", value, int(record["step"]))
        self._writer.flush()

    def on_fit_end(self, trainer: "Trainer") -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
