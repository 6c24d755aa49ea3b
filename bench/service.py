"""Step time through the service vs in-process, for an MLP 784-256-256-10.

    python bench/service.py [--batches 512,4096] [--workers 1,2] [--repeats 10] [--warmup 2]

For each batch size: the median time of `local_gradients` in this process
(the baseline, measured in the same run), then the median time of
`Client.gradients` through a LocalCluster (a coordinator and N worker
processes on this machine) for each worker count, as a table with
examples/s and the ratio to in-process. Every remote result is checked
against the in-process one first, so a fast wrong answer cannot pass.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradpool as gp  # noqa: E402
from gradpool.cluster import LocalCluster  # noqa: E402


def mlp(sizes: tuple[int, ...] = (784, 256, 256, 10)) -> gp.Graph:
    """relu MLP, softmax cross-entropy averaged over the batch, float32."""
    g = gp.Graph("mlp_" + "_".join(map(str, sizes)))
    x = g.input("x", (sizes[0],))
    y = g.input("y", (), dtype="int64")
    h = x
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        W = g.param(f"W{i}", (fan_in, fan_out), init="he")
        b = g.param(f"b{i}", (fan_out,))
        h = h @ W + b
        if i < len(sizes) - 2:
            h = gp.relu(h)
    g.set_loss(gp.softmax_cross_entropy(h, y).mean())
    return g


def batch_of(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 784)).astype(np.float32), "y": rng.integers(0, 10, size=n)}


def median_seconds(step: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def check_same(remote: tuple[float, dict], local: tuple[float, dict]) -> None:
    assert abs(remote[0] - local[0]) <= 1e-5 * max(1.0, abs(local[0])), (remote[0], local[0])
    for name, expected in local[1].items():
        np.testing.assert_allclose(remote[1][name], expected, rtol=1e-4, atol=1e-6, err_msg=name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="512,4096", help="batch sizes, comma separated (default %(default)s)")
    parser.add_argument("--workers", default="1,2", help="worker counts, comma separated (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per case (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default %(default)s)")
    parser.add_argument("--threads-per-worker", type=int, default=0,
                        help="BLAS threads per worker; 0: the machine's cores split evenly (default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    worker_counts = sorted(int(w) for w in args.workers.split(","))

    graph = mlp()
    params = graph.init_params(args.seed)
    data = {n: batch_of(n, args.seed + n) for n in batches}
    local = {n: gp.local_gradients(graph, params, data[n]) for n in batches}
    baseline = {n: median_seconds(lambda n=n: gp.local_gradients(graph, params, data[n]), args.repeats,
                                  args.warmup) for n in batches}
    remote: dict[tuple[int, int], float] = {}
    threads: dict[int, int] = {}
    for workers in worker_counts:  # a fresh cluster per size: thread caps are set at start
        threads[workers] = args.threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        with LocalCluster(workers=workers, threads_per_worker=threads[workers]) as cluster, \
                cluster.client(timeout=600) as service:
            for n in batches:
                check_same(service.gradients(graph, params, data[n]), local[n])
                remote[workers, n] = median_seconds(lambda n=n: service.gradients(graph, params, data[n]),
                                                    args.repeats, args.warmup)

    print(f"MLP 784-256-256-10 (relu, softmax cross-entropy mean, float32); {os.cpu_count()} CPU core(s); "
          f"median of {args.repeats} steps after {args.warmup} warm-up; worker rows go through a LocalCluster "
          f"(client, coordinator and workers as processes on this machine)")
    header = f"{'batch':>6}  {'where':<22}  {'median step':>12}  {'examples/s':>11}  {'time vs in-process':>18}"
    print(header)
    print("-" * len(header))
    for n in batches:
        rows = [("in-process", baseline[n])] + [(f"{w} worker{'s' if w > 1 else ''} x {threads[w]} thread"
                                                 f"{'s' if threads[w] > 1 else ''}", remote[w, n])
                                                for w in worker_counts]
        for where, seconds in rows:
            print(f"{n:>6}  {where:<22}  {seconds * 1e3:>9.1f} ms  {n / seconds:>11,.0f}  "
                  f"{seconds / baseline[n]:>17.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
