"""`gradpool demo`: train a digits classifier on a gradpool cluster and report how it went.

With no arguments it starts a LocalCluster (a coordinator and two worker
processes on localhost), builds a 64-64-10 MLP with the SDK (or, with
`--model cnn`, a small CNN on the 8x8 images), trains it with
Adam on scikit-learn's bundled 8x8 handwritten digits (no download), and
prints test accuracy and speed. A loss/accuracy plot, the metrics as JSON and
the trained model's checkpoint go to the output folder (`gradpool-out/`).

scikit-learn, matplotlib and tqdm are imported here only, inside functions:
the SDK itself needs none of them (`pip install 'gradpool[demo]'`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from gradpool.worker.engine.errors import GradpoolError
from gradpool.worker.rpc import add_client_tls_arguments, client_tls

from . import optim
from .checkpoint import atomic_write
from .graph import Graph
from .training import LocalBackend, Trainer

PROG = "gradpool demo"
DEMO_EXTRAS = "pip install 'gradpool[demo]'"


MODELS = ("mlp", "cnn")
CNN_CHANNELS = (16, 32)


class DemoError(GradpoolError):
    """The demo cannot run as asked (missing extras, unwritable output folder, low accuracy)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train an MLP (or --model cnn: a small CNN) on scikit-learn's handwritten digits through a "
                    "gradpool cluster: "
                    "a local one (coordinator + workers on this machine) unless --coordinator names one. "
                    "Reports test accuracy and speed; writes a plot, metrics JSON and the model checkpoint.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--coordinator", metavar="ADDR",
                       help="host:port of a running coordinator to use instead of starting a local cluster")
    where.add_argument("--local", action="store_true",
                       help="no servers at all: compute gradients in this process (same arithmetic)")
    parser.add_argument("--token", default=os.environ.get("GRADPOOL_TOKEN") or None,
                        help="token, if the coordinator requires one (env GRADPOOL_TOKEN)")
    add_client_tls_arguments(parser)
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="give up on a coordinator call after this long, retries included (default: no limit)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="worker processes of the local cluster (default 2)")
    parser.add_argument("--model", choices=MODELS, default="mlp",
                        help="mlp: 64-H-10 relu MLP on the pixels (default); cnn: two 3x3 convolutions with max "
                             "pooling on the 8x8 images, then a dense layer")
    parser.add_argument("--epochs", type=int, default=None,
                        help="passes over the training set (default 12; 6 for the CNN, whose training set "
                             "holds each image and four shifted copies)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="examples per step (default 64)")
    parser.add_argument("--lr", type=float, default=0.01,
                        help="Adam's peak learning rate, decayed by a cosine schedule (default 0.01)")
    parser.add_argument("--hidden", type=int, default=64, metavar="N",
                        help="hidden units per layer of the MLP (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the init and the shuffle (default 0)")
    parser.add_argument("--train-examples", type=int, default=None, metavar="N",
                        help="use only the first N training examples (quicker, less accurate)")
    parser.add_argument("--out", default="gradpool-out", metavar="DIR",
                        help="folder for curves.png, metrics.json and model.npz (default gradpool-out)")
    parser.add_argument("--min-accuracy", type=float, default=None, metavar="FRACTION",
                        help="exit with status 1 if the test accuracy ends below this (e.g. 0.95)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


# ------------------------------------------------------------------ data and model


def load_digits_split(seed: int, test_fraction: float = 0.25, train_examples: Optional[int] = None,
                      images: bool = False) -> tuple[dict, dict, dict]:
    """Digits as float32 features standardized with the training set's statistics, a stratified split.

    `images` (for the CNN): one mean and scale for all pixels, so a shifted image means the
    same thing, and every training image also shifted by a pixel in the four directions."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DemoError(f"the demo needs scikit-learn: {DEMO_EXTRAS}") from None
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target)
    if train_examples is not None:
        x_train, y_train = x_train[:train_examples], y_train[:train_examples]
    if images:
        side = int(round(digits.data.shape[1] ** 0.5))
        framed = np.pad(x_train.reshape(-1, side, side), ((0, 0), (1, 1), (1, 1)))
        shifted = [np.roll(framed, step, axis=axis)[:, 1:-1, 1:-1].reshape(len(x_train), -1)
                   for step in (-1, 1) for axis in (1, 2)]
        x_train, y_train = np.concatenate([x_train, *shifted]), np.tile(y_train, 1 + len(shifted))
        mean, std = np.full(x_train.shape[1], x_train.mean()), np.full(x_train.shape[1], x_train.std())
    else:
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
        std[std == 0] = 1.0  # pixels that are always blank in the training set
    standardize = lambda x: ((x - mean) / std).astype(np.float32)  # noqa: E731
    train = {"x": standardize(x_train), "y": y_train.astype(np.int64)}
    test = {"x": standardize(x_test), "y": y_test.astype(np.int64)}
    info = {"dataset": "sklearn.datasets.load_digits", "features": int(digits.data.shape[1]),
            "classes": int(len(digits.target_names)), "train_examples": int(len(y_train)),
            "test_examples": int(len(y_test))}
    return train, test, info


def build_mlp(features: int, hidden: int, classes: int, l2: float = 1e-4) -> Graph:
    """features-hidden-classes relu MLP: mean softmax cross-entropy plus a small L2 on the weights."""
    import gradpool as gp

    g = gp.Graph("digits_mlp")
    x = g.input("x", (features,))
    y = g.input("y", (), dtype="int64")
    W1, b1 = g.param("W1", (features, hidden), init="he"), g.param("b1", (hidden,))
    W2, b2 = g.param("W2", (hidden, classes)), g.param("b2", (classes,))
    logits = (gp.relu(x @ W1 + b1) @ W2 + b2).named("logits")
    g.set_loss(gp.softmax_cross_entropy(logits, y).mean() + l2 * ((W1 ** 2).sum() + (W2 ** 2).sum()))
    return g


def build_cnn(features: int, classes: int, channels: tuple[int, int] = CNN_CHANNELS, l2: float = 1e-4) -> Graph:
    """conv 3x3 -> relu -> max pool 2, twice, then dense: on the features seen as a square
    one-channel image (the same inputs as the MLP, so the same data and checkpoints work)."""
    import gradpool as gp

    side = int(round(features ** 0.5))
    if side * side != features or side % 4:
        raise DemoError(f"the CNN needs square images with a side divisible by 4, got {features} features")
    c1, c2 = channels
    g = gp.Graph("digits_cnn")
    x = g.input("x", (features,))
    y = g.input("y", (), dtype="int64")
    K1, b1 = g.param("K1", (c1, 1, 3, 3), init="he"), g.param("b1", (c1, 1, 1))
    K2, b2 = g.param("K2", (c2, c1, 3, 3), init="he"), g.param("b2", (c2, 1, 1))
    flat = c2 * (side // 4) ** 2
    W, b = g.param("W", (flat, classes)), g.param("b", (classes,))
    h = gp.max_pool2d(gp.relu(gp.conv2d(x.reshape(1, side, side), K1, padding=1) + b1), 2)
    h = gp.max_pool2d(gp.relu(gp.conv2d(h, K2, padding=1) + b2), 2)
    logits = (h.reshape(flat) @ W + b).named("logits")
    g.set_loss(gp.softmax_cross_entropy(logits, y).mean() + l2 * ((K1 ** 2).sum() + (K2 ** 2).sum()))
    return g


# ------------------------------------------------------------------ backends


@contextlib.contextmanager
def open_backend(args: argparse.Namespace) -> Iterator[tuple[Any, str, Optional[int]]]:
    """(gradient source, description, workers) for --local, --coordinator or a new LocalCluster."""
    if args.local:
        shards = args.workers or 1
        yield LocalBackend(shards=shards), f"in this process ({shards} simulated shard(s))", None
        return
    from .remote import Client

    if args.coordinator:
        with Client(args.coordinator, token=args.token, timeout=args.timeout, tls=client_tls(args)) as client:
            yield client, f"coordinator {args.coordinator}", live_workers(client)
        return
    from .cluster import LocalCluster

    workers = args.workers or 2
    threads = max(1, (os.cpu_count() or 1) // workers)  # each worker its share of the cores (BLAS threads)
    with LocalCluster(workers=workers, threads_per_worker=threads) as cluster, \
            Client(cluster.address, timeout=args.timeout) as client:
        yield client, f"LocalCluster at {cluster.address}", live_workers(client) or workers


def live_workers(client: Any) -> Optional[int]:
    """How many workers the coordinator reports live; also the first contact, so an
    unreachable coordinator fails here, before any data is loaded into it."""
    status = client.status()
    workers = status.get("workers") if isinstance(status, dict) else getattr(status, "workers", None)
    if workers is None:
        return None
    states = [w.get("state") if isinstance(w, dict) else getattr(w, "state", "live") for w in workers]
    return sum(1 for state in states if state in ("live", "suspect", None, ""))


# ------------------------------------------------------------------ outputs


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def plot_curves(path: Path, history: dict, title: str) -> None:
    """Training loss per step (and per epoch) and test accuracy per epoch, side by side."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DemoError(f"the demo needs matplotlib for its plot: {DEMO_EXTRAS}") from None
    steps, epochs = history["steps"], history["epochs"]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=0.8, alpha=0.6, label="per step")
    loss_axes.plot([e["step"] for e in epochs], [e["loss"] for e in epochs], "o-", label="epoch mean")
    loss_axes.set(xlabel="step", ylabel="training loss", yscale="log", title="loss")
    loss_axes.legend()
    accuracy_axes.plot([e["epoch"] for e in epochs], [100 * e.get("val_accuracy", np.nan) for e in epochs], "o-")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy (%)", title="held-out accuracy")
    accuracy_axes.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()

    def save(f: Any) -> None:
        figure.savefig(f, format="png", dpi=110)
    try:
        atomic_write(path, save)
    finally:
        plt.close(figure)


# ------------------------------------------------------------------ the run


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.epochs is None:
        args.epochs = 6 if args.model == "cnn" else 12
    for name in ("epochs", "batch_size", "hidden"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.workers is not None and args.coordinator:
        parser.error("--workers sizes the local cluster; with --coordinator the cluster has its own workers")
    if args.timeout is not None and not args.timeout > 0:
        parser.error(f"--timeout must be > 0 seconds, got {args.timeout}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.train_examples is not None and args.train_examples < 1:
        parser.error(f"--train-examples must be >= 1, got {args.train_examples}")


def prepare_out(folder: str) -> tuple[Path, list[Path]]:
    """Create the output folder and prove it writable (a file is created and removed),
    so that a path error costs nothing rather than the whole run: a folder can exist
    and still refuse this user (a Docker volume created by root, a read-only mount).
    Returns it and the folders this created (for `remove_if_empty`)."""
    out = Path(folder)
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DemoError(f"cannot create the output folder {out}: {err.strerror or err}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".gradpool-write-check.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        remove_if_empty(created)
        raise DemoError(f"cannot write to the output folder {out}: {err.strerror or err}") from None
    return out, created


def remove_if_empty(created: list[Path]) -> None:
    """A failed run leaves no empty folder behind (only those it created, deepest first)."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone: leave it
            return


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train and write the outputs; returns the report (also written as metrics.json)."""
    out, created = prepare_out(args.out)  # before training, so a bad --out costs nothing
    try:
        return _train_and_write(args, out)
    except BaseException:
        remove_if_empty(created)
        raise


def _train_and_write(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    train, test, data_info = load_digits_split(args.seed, train_examples=args.train_examples,
                                               images=args.model == "cnn")
    if args.model == "cnn":
        graph = build_cnn(data_info["features"], data_info["classes"])
        side = int(round(data_info["features"] ** 0.5))
        model = (f"CNN {side}x{side}x1: conv {CNN_CHANNELS[0]} 3x3, pool 2, conv {CNN_CHANNELS[1]} 3x3, pool 2, "
                 f"dense {data_info['classes']} (relu)")
    else:
        graph = build_mlp(data_info["features"], args.hidden, data_info["classes"])
        model = f"MLP {data_info['features']}-{args.hidden}-{data_info['classes']} (relu)"
    params = graph.init_params(args.seed)
    steps = args.epochs * -(-data_info["train_examples"] // args.batch_size)
    schedule = optim.CosineLR(args.lr, total_steps=steps, min_lr=args.lr / 20)
    optimizer = optim.Adam(params, lr=schedule)
    started = time.perf_counter()
    with open_backend(args) as (backend, where, workers):
        trainer = Trainer(graph, optimizer, backend=backend, batch_size=min(args.batch_size, len(train["y"])),
                          seed=args.seed, progress=not args.no_progress)
        trainer.fit(train, epochs=args.epochs, eval_data=test)
        final = trainer.evaluate(test)
    seconds = time.perf_counter() - started
    speed = trainer.throughput
    report = {
        "model": model,
        "backend": where, "workers": workers,
        "data": data_info,
        "config": {"model": args.model, "epochs": args.epochs, "batch_size": trainer.batch_size, "optimizer": "Adam",
                   "lr": args.lr, "schedule": schedule.config(), "seed": args.seed, "hidden": args.hidden},
        "test_accuracy": final["accuracy"], "test_correct": final["correct"],
        "test_cross_entropy": final["cross_entropy"],
        "final_train_loss": trainer.history.epochs[-1]["loss"],
        "steps": speed["steps"], "examples_per_s": speed["examples_per_s"],
        "seconds_per_step": speed["seconds_per_step"], "training_seconds": speed["seconds"],
        "total_seconds": seconds,
        "outputs": {"curves": str(out / "curves.png"), "metrics": str(out / "metrics.json"),
                    "model": str(out / "model.npz")},
    }
    trainer.save_checkpoint(out / "model.npz")
    plot_curves(out / "curves.png", trainer.history.to_dict(),
                f"gradpool demo: digits, {report['model']}, {where}")
    write_json(out / "metrics.json", {**report, "history": trainer.history.to_dict()})
    return report


def format_report(report: dict[str, Any]) -> str:
    data = report["data"]
    workers = f", {report['workers']} worker(s)" if report["workers"] else ""
    accuracy = report["test_accuracy"]
    outputs = report["outputs"]
    return "\n".join([
        f"{PROG}: {report['model']} on handwritten digits",
        f"  gradients   {report['backend']}{workers}",
        f"  data        {data['train_examples']} train / {data['test_examples']} test images "
        f"({data['features']} pixels, standardized), {data['classes']} classes",
        f"  training    {report['config']['epochs']} epochs, {report['steps']} steps of "
        f"{report['config']['batch_size']}, Adam lr {report['config']['lr']:g} (cosine), "
        f"{report['total_seconds']:.1f} s in all",
        f"  accuracy    {100 * accuracy:.1f}% on the test set ({report['test_correct']}/{data['test_examples']})",
        f"  speed       {report['examples_per_s']:,.0f} examples/s, "
        f"{1000 * report['seconds_per_step']:.1f} ms per step",
        f"  outputs     {outputs['curves']}, {outputs['metrics']}, {outputs['model']}",
    ])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `gradpool demo`; returns the exit status (errors: one line, no traceback)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        check_args(args, parser)
    except SystemExit as exit_:  # --help, or a usage error already printed by argparse
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    try:
        report = run(args)
    except GradpoolError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"{PROG}: error: {err.strerror or err}" + (f": {err.filename}" if err.filename else ""),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(format_report(report))
    if args.min_accuracy is not None and report["test_accuracy"] < args.min_accuracy:
        print(f"{PROG}: error: test accuracy {report['test_accuracy']:.3f} is below --min-accuracy "
              f"{args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
