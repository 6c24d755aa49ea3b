"""The lecture's regularized logistic regression, trained through gradpool.

    z = w x + b,   y = sigmoid(z),   L = sum over examples of (y - t)^2 / 2,
    L_reg = L + lambda w^2 / 2

w reaches the loss twice (through z and the regularizer); the service adds
both contributions, and counts the regularizer once however many workers
share the batch. Runs on a LocalCluster (a coordinator and two workers on
this machine) unless --coordinator names a running one.

    python examples/logistic_regression.py [--coordinator HOST:PORT] [--steps 100]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import gradpool as gp
from gradpool.optim import SGD
from gradpool.training import Trainer


def build_graph(lam: float) -> gp.Graph:
    g = gp.Graph("logistic_regression", dtype="float64")
    x = g.input("x")  # one number per example
    t = g.input("t")  # its 0/1 target
    w = g.param("w")
    b = g.param("b")
    y = gp.sigmoid(w * x + b).named("y")
    loss = (0.5 * (y - t) ** 2).sum()
    g.set_loss(loss + lam * 0.5 * w ** 2)
    return g


def make_data(n: int, seed: int) -> dict[str, np.ndarray]:
    """t = 1 mostly when x > 0.5: a threshold the sigmoid can learn."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    t = (x + 0.3 * rng.normal(size=n) > 0.5).astype(np.float64)
    return {"x": x, "t": t}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator", metavar="HOST:PORT", help="use a running coordinator")
    parser.add_argument("--local", action="store_true", help="no servers: compute in this process")
    parser.add_argument("--workers", type=int, default=2, help="workers of the local cluster")
    parser.add_argument("--steps", type=int, default=100, help="gradient steps (few for a quick run)")
    parser.add_argument("--lam", type=float, default=0.1, help="the regularizer's weight lambda")
    args = parser.parse_args()

    graph = build_graph(args.lam)
    data = make_data(200, seed=0)
    params = {"w": np.array(0.0), "b": np.array(0.0)}
    report_every = max(1, args.steps // 10)
    try:
        with gp.gradient_service(args.coordinator, workers=args.workers, local=args.local) as service:
            # Full batch: every step sees all 200 examples, so the loss falls smoothly.
            trainer = Trainer(graph, SGD(params, lr=0.01), backend=service, batch_size=200, progress=False)
            while trainer.step < args.steps:
                trainer.fit(data, epochs=args.steps, max_steps=min(trainer.step + report_every, args.steps))
                print(f"step {trainer.step:4d}  loss {trainer.history.losses[-1]:9.4f}  "
                      f"w {float(params['w']):+.3f}  b {float(params['b']):+.3f}")
    except gp.GradpoolError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    y = 1 / (1 + np.exp(-(params["w"] * data["x"] + params["b"])))
    print(f"accuracy on the training data: {np.mean((y > 0.5) == (data['t'] > 0.5)):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
