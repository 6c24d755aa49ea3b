"""What a dead, hung or restarting part of the cluster costs a step.

    python bench/recovery.py [--repeats 3] [--restarts 0,5,15]

On a LocalCluster of 4 workers, a step of a deep tanh MLP cut into 4
shards of about a second each is timed:

* undisturbed -- the baseline, measured in the same run before each case;
* SIGKILL     -- one worker killed 0.3 s into the step (its shard is retried
                 on a survivor);
* SIGSTOP     -- one worker frozen 0.3 s into the step (its shard is hedged
                 once its siblings are done and a worker is free);

and prints min/median/max of each, and the median ratio to undisturbed.
Then a training loop runs while the coordinator is SIGKILLed and restarted
after each of --restarts seconds, and the errors surfaced to the loop and the
longest step are printed.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time

import numpy as np

import gradpool as gp


def deep_model(layers: int = 24) -> gp.Graph:
    g = gp.Graph("deep")
    x, y = g.input("x", (256,)), g.input("y", (), dtype="int64")
    h = x
    for i in range(layers):
        h = gp.tanh(h @ g.param(f"W{i}", (256, 256)))
    g.set_loss(gp.softmax_cross_entropy(h @ g.param("out", (256, 10)), y).mean())
    return g


def timed_step(service: gp.Client, graph: gp.Graph, params: dict, rows: gp.DatasetRows,
               disturb: "callable | None" = None) -> float:
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(r=service.gradients(graph, params, rows)), daemon=True)
    started = time.perf_counter()
    thread.start()
    if disturb is not None:
        time.sleep(0.3)
        disturb()
    thread.join(300)
    assert "r" in box, "the step did not return"
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case (default %(default)s)")
    parser.add_argument("--restarts", default="0,5,15", help="coordinator down times in s (default %(default)s)")
    args = parser.parse_args(argv)
    graph = deep_model()
    params = graph.init_params(0)
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(6000, 256)).astype(np.float32), "y": rng.integers(0, 10, 6000)}
    times: dict[str, list[float]] = {"undisturbed": [], "SIGKILL": [], "SIGSTOP": []}
    ratios: dict[str, list[float]] = {"SIGKILL": [], "SIGSTOP": []}
    with gp.LocalCluster(workers=4) as cluster, cluster.client(timeout=300) as service:
        ref = service.upload(data)
        rows = ref.take(np.arange(4500))  # 3 shards of 1500 when a spare is idle
        for _ in range(args.repeats):
            for case in ("SIGKILL", "SIGSTOP"):
                cluster.scale_to(3)
                service.gradients(graph, params, rows)
                cluster.add_worker()  # a fresh fourth worker each run (the last run's victim is gone or frozen)
                base = timed_step(service, graph, params, rows)
                victim = cluster.workers[1]
                if case == "SIGKILL":
                    took = timed_step(service, graph, params, rows, victim.popen.kill)
                    cluster.workers.remove(victim)
                else:
                    took = timed_step(service, graph, params, rows, lambda: os.kill(victim.pid, signal.SIGSTOP))
                    os.kill(victim.pid, signal.SIGCONT)
                times["undisturbed"].append(base)
                times[case].append(took)
                ratios[case].append(took / base)
    print("a step of 4 shards (~1 s each) on a LocalCluster of 4 workers; one worker disturbed 0.3 s in; "
          f"{args.repeats} runs; ratio = the run's step / its own undisturbed step just before")
    print(f"{'case':<12}  {'min s':>6}  {'median s':>8}  {'max s':>6}  {'median ratio':>12}")
    for case, t in times.items():
        ratio = f"{statistics.median(ratios[case]):>11.2f}x" if case in ratios else f"{'1.00x':>12}"
        print(f"{case:<12}  {min(t):>6.2f}  {statistics.median(t):>8.2f}  {max(t):>6.2f}  {ratio}")

    small = gp.Graph("small")
    x, y = small.input("x", (32,)), small.input("y", (), dtype="int64")
    small.set_loss(gp.softmax_cross_entropy(x @ small.param("W", (32, 10)), y).mean())
    small_params = small.init_params(0)
    batch = {"x": rng.normal(size=(2000, 32)).astype(np.float32), "y": rng.integers(0, 10, 2000)}
    print("\ncoordinator SIGKILLed and restarted on the same port during a training loop (2 workers)")
    print(f"{'down s':>6}  {'steps':>6}  {'errors':>6}  {'longest step s':>14}")
    for down in [float(d) for d in args.restarts.split(",")]:
        with gp.LocalCluster(workers=2) as cluster, cluster.client(timeout=300) as service:
            ref = service.upload(batch)
            errors, durations, stop = [], [], threading.Event()

            def loop() -> None:
                while not stop.is_set():
                    started = time.perf_counter()
                    try:
                        service.gradients(small, small_params, ref.take(rng.integers(0, 2000, 128)))
                    except gp.GradpoolError as err:
                        errors.append(err)
                    durations.append(time.perf_counter() - started)

            thread = threading.Thread(target=loop, daemon=True)
            thread.start()
            time.sleep(1.0)
            cluster.restart_coordinator(down_seconds=down, kill=True)
            time.sleep(2.0)
            stop.set()
            thread.join(120)
            print(f"{down:>6.0f}  {len(durations):>6}  {len(errors):>6}  {max(durations):>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
