"""The lecture's two-layer network (section 3), trained through gradpool.

    z = W1 x + b1,   h = sigmoid(z),   y = W2 h + b2,   L = 1/2 ||t - y||^2

summed over a minibatch of row vectors. The targets come from a "teacher"
network of the same shape plus a little noise, so the student can fit them
and the loss visibly falls. Runs on a LocalCluster (a coordinator and two
workers on this machine) unless --coordinator names a running one.

    python examples/two_layer_net.py [--coordinator HOST:PORT] [--steps 300]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import gradpool as gp
from gradpool.optim import SGD
from gradpool.training import Trainer

D, H, K = 3, 4, 2  # inputs, hidden units, outputs: the lecture's sizes


def build_graph() -> gp.Graph:
    g = gp.Graph("two_layer_net", dtype="float64")  # inputs, params and constants float64
    x = g.input("x", (D,))
    t = g.input("t", (K,))
    W1 = g.param("W1", (H, D))
    b1 = g.param("b1", (H,), init="zeros")
    W2 = g.param("W2", (K, H))
    b2 = g.param("b2", (K,), init="zeros")
    h = gp.sigmoid(x @ W1.T + b1)  # rows are examples, so W x becomes x W^T
    y = (h @ W2.T + b2).named("y")
    g.set_loss(0.5 * ((y - t) ** 2).sum())
    return g


def make_data(n: int, seed: int) -> dict[str, np.ndarray]:
    """Targets of a random teacher network with the same architecture, plus noise."""
    rng = np.random.default_rng(seed)
    W1, b1 = rng.normal(size=(H, D)) * 2, rng.normal(size=H)
    W2, b2 = rng.normal(size=(K, H)) * 2, rng.normal(size=K)
    x = rng.normal(size=(n, D))
    h = 1 / (1 + np.exp(-(x @ W1.T + b1)))
    t = h @ W2.T + b2 + 0.05 * rng.normal(size=(n, K))
    return {"x": x, "t": t}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator", metavar="HOST:PORT", help="use a running coordinator")
    parser.add_argument("--local", action="store_true", help="no servers: compute in this process")
    parser.add_argument("--workers", type=int, default=2, help="workers of the local cluster")
    parser.add_argument("--steps", type=int, default=300, help="gradient steps (few for a quick run)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step")
    args = parser.parse_args()

    graph = build_graph()
    data = make_data(512, seed=0)
    params = graph.init_params(seed=1)
    # The loss is a sum over the batch, so the step size is per example: lr / batch size.
    optimizer = SGD(params, lr=0.1 / args.batch_size, momentum=0.9)
    report_every = max(1, args.steps // 10)
    try:
        with gp.gradient_service(args.coordinator, workers=args.workers, local=args.local) as service:
            trainer = Trainer(graph, optimizer, backend=service, batch_size=args.batch_size, progress=False)
            while trainer.step < args.steps:
                trainer.fit(data, epochs=args.steps, max_steps=min(trainer.step + report_every, args.steps))
                recent = trainer.history.losses[-report_every:]
                print(f"step {trainer.step:4d}  epoch {trainer.epoch + 1:3d}  "
                      f"loss per example {np.mean(recent) / args.batch_size:.5f}")
            predictions = trainer.predict({"x": data["x"]}, "y")
    except gp.GradpoolError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"mean squared error over all {len(predictions)} examples: {np.mean((predictions - data['t']) ** 2):.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
