"""A streamed batch over a slow link: shards started as their rows arrive vs after the whole request.

    python bench/overlap.py [--link-mb-per-s 50,200] [--batch 4096] [--workers 2] [--max-shard-mb 2]
                            [--repeats 8] [--warmup 1]

On one machine client, coordinator and workers share the CPUs, so a
faster upload only moves work around; overlap pays where the client's link
is the bottleneck (a laptop training on a remote cluster). This emulates
such a link: the client writes the request's 1 MB frames no faster than
`--link-mb-per-s`. The same request (MLP 784-256-256-10, float32, inline
batch) goes two ways, interleaved within each repeat:

* whole-first -- Frame.header_bytes left out: the coordinator reads the whole
                 request before it plans and sends shards (what it does for a
                 sender that makes no promise of order);
* as-arriving -- as the SDK sends it: the coordinator starts each shard once
                 its rows are in, while the rest still arrives.

`upload` is the paced stream alone (the link's floor for this request,
measured in the same run); `--max-shard-mb` cuts each worker's share into
shards of at most that size (pipelining), so a worker's first shard starts
early. Both ways' results are checked bitwise equal first. Prints
min/median/max per way and the as-arriving / whole-first median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradpool as gp  # noqa: E402
from gradpool.cluster import LocalCluster  # noqa: E402
from gradpool.protos import gradpool_pb2 as pb  # noqa: E402
from gradpool.protos import gradpool_pb2_grpc as pb_grpc  # noqa: E402
from gradpool.worker.streams import FRAME_BYTES  # noqa: E402
from gradpool.worker.wire import request_parts, with_graph_id  # noqa: E402
from service import dataset, mlp  # noqa: E402


def frames_of(graph: gp.Graph, params: dict, batch: dict, promise: bool) -> list[pb.Frame]:
    _, body = request_parts("", params, batch, "bench")
    message = with_graph_id(graph.graph_id, body)
    if not promise:
        message.header_bytes = None
    return [pb.Frame.FromString(f) for f in message.frames(FRAME_BYTES)]


def paced(frames: list[pb.Frame], bytes_per_second: float) -> Iterator[pb.Frame]:
    """The frames, no faster than the link."""
    started, sent = time.perf_counter(), 0
    for frame in frames:
        sent += len(frame.data)
        ahead = sent / bytes_per_second - (time.perf_counter() - started)
        if ahead > 0:
            time.sleep(ahead)
        yield frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--link-mb-per-s", default="50,200", help="emulated client links (default %(default)s)")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-shard-mb", type=float, default=2.0,
                        help="the coordinator's --max-shard-mb (0: one shard per worker; default %(default)s)")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)

    graph = mlp()
    params = graph.init_params(0)
    batch = dataset(args.batch, 0)
    ways = {"whole-first": frames_of(graph, params, batch, promise=False),
            "as-arriving": frames_of(graph, params, batch, promise=True)}
    size = sum(len(f.data) for f in ways["as-arriving"])
    rows: list[tuple[float, dict[str, list[float]]]] = []
    with LocalCluster(workers=args.workers, threads_per_worker=1,
                      coordinator_args=["--max-shard-mb", str(args.max_shard_mb)]) as cluster, \
            cluster.client(timeout=600) as service, \
            grpc.insecure_channel(cluster.address, options=[("grpc.max_receive_message_length", 2**30)]) as channel:
        service.register(graph)
        stub = pb_grpc.CoordinatorStub(channel)

        def step(frames: list[pb.Frame], rate: float) -> bytes:
            return b"".join(f.data for f in stub.ComputeGradientsStream(paced(frames, rate), timeout=600))

        first, second = (pb.GradientsResponse.FromString(step(frames, 1e12)) for frames in ways.values())
        assert first.loss == second.loss and first.grads == second.grads, "the two ways disagree"
        for rate_mb in [float(r) for r in args.link_mb_per_s.split(",")]:
            rate = rate_mb * 2**20
            times: dict[str, list[float]] = {"upload": [], **{name: [] for name in ways}}
            for repeat in range(args.warmup + args.repeats):
                started = time.perf_counter()
                for _ in paced(ways["as-arriving"], rate):
                    pass
                elapsed = {"upload": time.perf_counter() - started}
                for name, frames in ways.items():
                    started = time.perf_counter()
                    step(frames, rate)
                    elapsed[name] = time.perf_counter() - started
                if repeat >= args.warmup:
                    for name, seconds in elapsed.items():
                        times[name].append(seconds)
            rows.append((rate_mb, times))

    print(f"MLP 784-256-256-10, batch {args.batch} inline ({size / 2**20:.1f} MB request), {args.workers} workers x 1 "
          f"thread, --max-shard-mb {args.max_shard_mb:g}; {args.repeats} interleaved repeats after {args.warmup} "
          "warm-up")
    header = f"{'link MB/s':>9}  {'way':<12}  {'min ms':>8}  {'median ms':>9}  {'max ms':>8}  {'vs whole-first':>14}"
    print(header)
    print("-" * len(header))
    for rate_mb, times in rows:
        base = statistics.median(times["whole-first"])
        for name in ("upload", "whole-first", "as-arriving"):
            t = times[name]
            ratio = f"{statistics.median(t) / base:>13.2f}x" if name != "upload" else f"{'-':>14}"
            print(f"{rate_mb:>9g}  {name:<12}  {min(t) * 1e3:>8.1f}  {statistics.median(t) * 1e3:>9.1f}  "
                  f"{max(t) * 1e3:>8.1f}  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
