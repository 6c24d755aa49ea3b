"""Step time through the service vs in-process, for an MLP 784-256-256-10.

    python bench/service.py [--batches 512,4096,16384] [--workers 1,2] [--repeats 10] [--warmup 2]

The baseline is `local_gradients` in this process, measured in the same run
and interleaved with the service's steps (one of each per repeat), so that
the shared machine's noise falls on both alike. For each worker count a
LocalCluster (a coordinator and N worker processes on this machine) runs the
same minibatch two ways:

* inline   -- the batch travels with every request (`client.gradients(g, p, batch)`);
* resident -- the data was uploaded once (`ref = client.upload(data)`) and each
  step names its rows (`client.gradients(g, p, ref.take(indices))`).

Every remote result is checked against the in-process one first, so a fast
wrong answer cannot pass. Each step starts after an untimed 0.1 s pause, so
that BLAS threads still spinning from the previous case do not bill it. Prints min/median/max per case, the median ratio
to in-process, and the coordinator's CPU time per step (from /proc): the
ceiling on how many steps, and so workers, one coordinator can feed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Optional

import numpy as np

import gradpool as gp
from gradpool.cluster import LocalCluster


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


def dataset(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 784)).astype(np.float32), "y": rng.integers(0, 10, size=n)}


# Untimed pause before each step: BLAS threads spin for a while after a call,
# and on a machine with few cores the last case's spinning threads (in this
# process or a worker's) would otherwise bill the next case.
SETTLE_SECONDS = 0.1


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def interleaved(steps: dict[str, Callable[[], object]], repeats: int, warmup: int,
                coordinator_pid: Optional[int] = None) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per step for each case, one step of each per repeat; and the
    coordinator's CPU seconds per step for each case."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, float] = {name: 0.0 for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            time.sleep(SETTLE_SECONDS)
            before = cpu_seconds(coordinator_pid) if coordinator_pid else 0.0
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
            if coordinator_pid:
                cpu[name] += cpu_seconds(coordinator_pid) - before
    return times, {name: total / repeats for name, total in cpu.items()}


def check_same(remote: gp.GradientsResult, local: tuple[float, dict]) -> None:
    loss, grads = remote
    assert abs(loss - local[0]) <= 1e-5 * max(1.0, abs(local[0])), (loss, local[0])
    for name, expected in local[1].items():
        np.testing.assert_allclose(grads[name], expected, rtol=1e-4, atol=1e-6, err_msg=name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="512,4096,16384", help="batch sizes (default %(default)s)")
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
    data = dataset(2 * max(batches), args.seed)
    rng = np.random.default_rng(args.seed)
    rows = {n: np.sort(rng.choice(len(data["y"]), size=n, replace=False)) for n in batches}
    inline = {n: {k: v[rows[n]] for k, v in data.items()} for n in batches}
    results: dict[tuple[int, int], tuple[dict[str, list[float]], dict[str, float]]] = {}
    threads: dict[int, int] = {}
    for workers in worker_counts:  # a fresh cluster per size: thread caps are set at start
        threads[workers] = args.threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        with LocalCluster(workers=workers, threads_per_worker=threads[workers]) as cluster, \
                cluster.client(timeout=600) as service:
            ref = service.upload(data)
            pid = cluster.coordinator.pid if cluster.coordinator else None
            for n in batches:
                local = gp.local_gradients(graph, params, inline[n])
                check_same(service.gradients(graph, params, inline[n]), local)
                check_same(service.gradients(graph, params, ref.take(rows[n])), local)
                results[workers, n] = interleaved({
                    "in-process": lambda n=n: gp.local_gradients(graph, params, inline[n]),
                    "inline": lambda n=n: service.gradients(graph, params, inline[n]),
                    "resident": lambda n=n: service.gradients(graph, params, ref.take(rows[n])),
                }, args.repeats, args.warmup, pid)

    print(f"MLP 784-256-256-10 (relu, softmax cross-entropy mean, float32); {os.cpu_count()} CPU core(s); "
          f"{args.repeats} interleaved steps per case after {args.warmup} warm-up; the service rows go through "
          "a LocalCluster (client, coordinator and workers as processes on this machine)")
    header = (f"{'batch':>6}  {'workers':<17}  {'path':<10}  {'min ms':>8}  {'median ms':>9}  {'max ms':>8}  "
              f"{'examples/s':>10}  {'vs in-process':>13}  {'coord. CPU/step':>15}")
    print(header)
    print("-" * len(header))
    for n in batches:
        for workers in worker_counts:
            times, cpu = results[workers, n]
            base = statistics.median(times["in-process"])
            label = f"{workers} x {threads[workers]} thread{'s' if threads[workers] > 1 else ''}"
            for path in ("in-process", "inline", "resident"):
                t = times[path]
                median = statistics.median(t)
                coordinator = f"{cpu[path] * 1e3:>12.1f} ms" if path != "in-process" else f"{'-':>15}"
                print(f"{n:>6}  {label:<17}  {path:<10}  {min(t) * 1e3:>8.1f}  {median * 1e3:>9.1f}  "
                      f"{max(t) * 1e3:>8.1f}  {n / median:>10,.0f}  {median / base:>12.2f}x  {coordinator}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
