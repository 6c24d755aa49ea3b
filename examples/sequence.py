"""Adding 6-digit numbers with a recurrent net, trained through gradpool.

A small sequence model: the digits of a and b are read least significant
first, one pair per step, by a tanh recurrent cell unrolled over the 7 steps
(the last one reads zeros and emits the final carry); each step predicts one
digit of a + b. The carry has to travel through the hidden state, so the task
is solved only by a model that really uses the sequence. The whole unrolled
net is one graph: the same parameters appear at every step, and the engine
sums their adjoints, as the lecture's bar notation does for a value used
twice. Runs on a LocalCluster (a coordinator and two workers) unless
--coordinator names a running one.

After the default 8 epochs the held-out accuracy (whole sums right, all 7
digits) is above 99%.

    python examples/sequence.py [--coordinator HOST:PORT] [--epochs 8] [--local]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import gradpool as gp

DIGITS = 6
STEPS = DIGITS + 1  # a + b has one more digit than a and b


def digits_of(numbers: np.ndarray) -> np.ndarray:
    """(n,) integers -> (n, STEPS) decimal digits, least significant first."""
    return np.stack([(numbers // 10 ** i) % 10 for i in range(STEPS)], axis=1).astype(np.int64)


def make_data(examples: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 10 ** DIGITS, examples), rng.integers(0, 10 ** DIGITS, examples)
    return {"a": digits_of(a), "b": digits_of(b), "sum": digits_of(a + b)}


def build_graph(hidden: int = 32) -> gp.Graph:
    g = gp.Graph("add_rnn")
    a = g.input("a", (STEPS,), dtype="int64")
    b = g.input("b", (STEPS,), dtype="int64")
    total = g.input("sum", (STEPS,), dtype="int64")
    embed_a, embed_b = g.param("embed_a", (10, hidden)), g.param("embed_b", (10, hidden))
    recur, bias = g.param("recur", (hidden, hidden)), g.param("bias", (hidden,))
    out, out_bias = g.param("out", (hidden, 10)), g.param("out_bias", (10,))
    pairs = gp.embedding(embed_a, a) + gp.embedding(embed_b, b)  # (batch, STEPS, hidden)
    state, step_logits = None, []
    for t in range(STEPS):
        read = pairs[:, t:t + 1, :].reshape(hidden)
        state = gp.tanh(read + bias if state is None else read + state @ recur + bias)
        step_logits.append((state @ out + out_bias).reshape(1, 10))
    logits = gp.concat(step_logits, axis=1).named("logits")  # (batch, STEPS, 10)
    g.set_loss(gp.softmax_cross_entropy(logits, total).mean())
    return g


def sum_accuracy(trainer: gp.Trainer, data: dict[str, np.ndarray]) -> float:
    """Share of sums with every digit right."""
    predicted = trainer.predict(data).argmax(axis=-1)
    return float(np.mean(np.all(predicted == data["sum"], axis=1)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator", metavar="HOST:PORT", help="use a running coordinator")
    parser.add_argument("--local", action="store_true", help="no servers: compute in this process")
    parser.add_argument("--workers", type=int, default=2, help="workers of the local cluster")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()

    train, test = make_data(8000, seed=0), make_data(2000, seed=1)
    graph = build_graph()
    optimizer = gp.Adam(graph.init_params(seed=0), lr=0.01)
    try:
        with gp.gradient_service(args.coordinator, workers=args.workers, local=args.local) as service:
            trainer = gp.Trainer(graph, optimizer, backend=service, batch_size=64, seed=0, progress=False)
            for epoch in range(1, args.epochs + 1):
                trainer.fit(train, epochs=epoch)
                print(f"epoch {epoch:2d}  loss {trainer.history.epochs[-1]['loss']:.4f}  "
                      f"sums right {sum_accuracy(trainer, test):.1%}")
            accuracy = sum_accuracy(trainer, test)
    except gp.GradpoolError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"held-out sums right: {accuracy:.1%} of {len(test['sum'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
