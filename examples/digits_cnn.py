"""Handwritten digits with a small CNN, trained through gradpool.

The 8x8 digit images stay images, (1, 8, 8) per example: two 3x3
convolutions with relu and 2x2 max pooling, then a dense layer. Gradients come
from a LocalCluster (a coordinator and two workers on this machine) unless
--coordinator names a running one, and are those of the whole batch, exactly.
Needs scikit-learn for the (bundled, offline) digits data.

    python examples/digits_cnn.py [--coordinator HOST:PORT] [--epochs 8] [--steps N]
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

import gradpool as gp
from gradpool.optim import Adam, CosineLR
from gradpool.training import Trainer

BATCH = 64


def load_data(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(1, 8, 8) float32 images scaled to about mean 0, variance 1; 3/4 for training, each
    training image also shifted by one pixel in the four directions (5x the images)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.images, digits.target, test_size=0.25,
                                                        random_state=seed, stratify=digits.target)
    framed = np.pad(x_train, ((0, 0), (1, 1), (1, 1)))
    shifted = [np.roll(framed, step, axis=axis)[:, 1:-1, 1:-1] for step in (-1, 1) for axis in (1, 2)]
    x_train, y_train = np.concatenate([x_train, *shifted]), np.tile(y_train, 1 + len(shifted))
    as_batch = lambda x, y: {"x": ((x[:, None] / 16.0 - 0.3) / 0.4).astype(np.float32),  # noqa: E731
                             "y": y.astype(np.int64)}
    return as_batch(x_train, y_train), as_batch(x_test, y_test)


def build_graph(c1: int = 16, c2: int = 32) -> gp.Graph:
    g = gp.Graph("digits_cnn")
    x = g.input("x", (1, 8, 8))
    y = g.input("y", (), dtype="int64")
    K1, b1 = g.param("K1", (c1, 1, 3, 3), init="he"), g.param("b1", (c1, 1, 1))   # conv weights (out, in, kh, kw)
    K2, b2 = g.param("K2", (c2, c1, 3, 3), init="he"), g.param("b2", (c2, 1, 1))  # biases broadcast over H, W
    W, b = g.param("W", (c2 * 2 * 2, 10)), g.param("b", (10,))
    h = gp.max_pool2d(gp.relu(gp.conv2d(x, K1, padding=1) + b1), 2)   # (c1, 4, 4)
    h = gp.max_pool2d(gp.relu(gp.conv2d(h, K2, padding=1) + b2), 2)   # (c2, 2, 2)
    logits = (h.reshape(c2 * 2 * 2) @ W + b).named("logits")          # named: trainer.evaluate finds it
    g.set_loss(gp.softmax_cross_entropy(logits, y).mean() + 1e-4 * ((K1 ** 2).sum() + (K2 ** 2).sum()))
    return g


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator", metavar="HOST:PORT", help="use a running coordinator")
    parser.add_argument("--local", action="store_true", help="no servers: compute in this process")
    parser.add_argument("--workers", type=int, default=2, help="workers of the local cluster")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.01, help="Adam's peak learning rate (cosine decay)")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (a quick run)")
    args = parser.parse_args()

    train, test = load_data()
    graph = build_graph()
    total_steps = args.epochs * math.ceil(len(train["y"]) / BATCH)
    optimizer = Adam(graph.init_params(seed=0), lr=CosineLR(args.lr, total_steps=total_steps, min_lr=args.lr / 20))
    try:
        with gp.gradient_service(args.coordinator, workers=args.workers, local=args.local) as service:
            trainer = Trainer(graph, optimizer, backend=service, batch_size=BATCH, seed=0, progress=False)
            for epoch in range(1, args.epochs + 1):
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
          f"{trainer.throughput['examples_per_s']:,.0f} examples/s, {trainer.throughput['seconds']:.1f} s of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
