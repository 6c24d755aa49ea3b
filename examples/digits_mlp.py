"""Handwritten digits with an MLP, trained through gradpool with the Trainer.

The whole workflow a user copies: data as numpy arrays, a graph built with the
SDK, an optimizer, a Trainer whose gradients come from the service, held-out
accuracy every epoch, a checkpoint to resume from. Runs on a LocalCluster (a
coordinator and two workers on this machine) unless --coordinator names a
running one. Needs scikit-learn for the (bundled, offline) digits data.

    python examples/digits_mlp.py [--coordinator HOST:PORT] [--epochs 10] [--steps N]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import gradpool as gp
from gradpool.checkpoint import latest_checkpoint
from gradpool.optim import Adam
from gradpool.training import Trainer


def load_data(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """8x8 digit images as 64 standardized float32 features, 3/4 for training."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.data, digits.target, test_size=0.25,
                                                        random_state=seed, stratify=digits.target)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-8
    as_batch = lambda x, y: {"x": ((x - mean) / std).astype(np.float32), "y": y.astype(np.int64)}  # noqa: E731
    return as_batch(x_train, y_train), as_batch(x_test, y_test)


def build_graph(hidden: int = 64) -> gp.Graph:
    g = gp.Graph("digits_mlp")
    x = g.input("x", (64,))
    y = g.input("y", (), dtype="int64")
    W1, b1 = g.param("W1", (64, hidden), init="he"), g.param("b1", (hidden,))
    W2, b2 = g.param("W2", (hidden, 10)), g.param("b2", (10,))
    logits = (gp.relu(x @ W1 + b1) @ W2 + b2).named("logits")  # named: trainer.evaluate finds it
    g.set_loss(gp.softmax_cross_entropy(logits, y).mean() + 1e-4 * ((W1 ** 2).sum() + (W2 ** 2).sum()))
    return g


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator", metavar="HOST:PORT", help="use a running coordinator")
    parser.add_argument("--local", action="store_true", help="no servers: compute in this process")
    parser.add_argument("--workers", type=int, default=2, help="workers of the local cluster")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (a quick run)")
    parser.add_argument("--checkpoints", metavar="DIR", default=None,
                        help="checkpoint every epoch into DIR, and resume from the newest one there")
    args = parser.parse_args()

    train, test = load_data()
    graph = build_graph()
    optimizer = Adam(graph.init_params(seed=0), lr=0.01)
    try:
        with gp.gradient_service(args.coordinator, workers=args.workers, local=args.local) as service:
            trainer = Trainer(graph, optimizer, backend=service, batch_size=64, seed=0, progress=False,
                              checkpoint_dir=args.checkpoints, checkpoint_every_epochs=1)
            if args.checkpoints and latest_checkpoint(args.checkpoints):
                trainer.load_checkpoint(latest_checkpoint(args.checkpoints))
                print(f"resumed from {trainer.last_checkpoint} (step {trainer.step})")
            # One fit call per epoch, only to print as we go; a single fit(..., epochs=N) does the same.
            for epoch in range(trainer.epoch + 1, args.epochs + 1):
                trainer.fit(train, epochs=epoch, max_steps=args.steps, eval_data=test)
                last = trainer.history.epochs[-1] if trainer.history.epochs else None
                if last is None or last["epoch"] != epoch:  # --steps stopped it mid-epoch
                    print(f"step {trainer.step:4d}  loss {trainer.history.losses[-1]:.4f}  (stopped by --steps)")
                    break
                print(f"epoch {epoch:2d}  loss {last['loss']:.4f}  test accuracy {last['val_accuracy']:.1%}  "
                      f"({last['examples_per_s']:,.0f} examples/s)")
            result = trainer.evaluate(test)
    except gp.GradpoolError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"test accuracy {result['accuracy']:.1%} ({result['correct']}/{result['examples']}), "
          f"{trainer.throughput['examples_per_s']:,.0f} examples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
