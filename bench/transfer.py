"""Params round trip through the service vs the raw gRPC floor.

    python bench/transfer.py [--sizes-mb 64,512] [--repeats 5] [--warmup 1] [--wire-dtypes bfloat16]

A step whose params are SIZE MB and whose compute is trivial moves the
params four times: client -> coordinator -> worker, and the gradient back
worker -> coordinator -> client. The floor, measured in the same run and
interleaved with it, is four raw Python gRPC unary transfers of the same
bytes on loopback (a generic echo-nothing server in this process, limits
raised to fit) plus the step's in-process compute (`local_gradients`).
Prints min/median/max per case and the service's throughput as a share of
the floor's. Each `--wire-dtypes` entry adds a row: the same step with
`wire_dtype=` that encoding (params and gradients as 16-bit floats, half the
bytes, encode and decode included), against the same exact floor, so above
100% means the compact wire beats moving the full bytes at raw gRPC speed.
MB/s moved counts the params' own size for every row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent import futures

import grpc
import numpy as np

import gradpool as gp
from gradpool.cluster import LocalCluster
from gradpool.worker.engine.tensors import round_through, wire_dtype


def model(megabytes: int) -> gp.Graph:
    """One float32 param of `megabytes` MB; a trivial loss over it and the batch."""
    g = gp.Graph(f"params_{megabytes}mb")
    x = g.input("x", (1,))
    W = g.param("W", (megabytes * 2**20 // 4,), init="zeros")
    g.set_loss(x.mean() + (W * 0.5).sum())
    return g


class Sink(grpc.GenericRpcHandler):
    """Accepts any bytes, answers one byte: a transfer and nothing else."""

    def service(self, handler_call_details):  # type: ignore[no-untyped-def]
        return grpc.unary_unary_rpc_method_handler(lambda request, context: b"k")


def raw_floor(size: int) -> tuple[callable, callable]:
    limit = [("grpc.max_send_message_length", size + 2**20), ("grpc.max_receive_message_length", size + 2**20)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=limit, handlers=[Sink()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=limit)
    send = channel.unary_unary("/sink/Put", request_serializer=None, response_deserializer=None)
    payload = np.ones(size, np.uint8).tobytes()

    def four_transfers() -> None:
        for _ in range(4):
            send(payload, timeout=600)

    def close() -> None:
        channel.close()
        server.stop(None)
    return four_transfers, close


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", default="64,512", help="param sizes in MB (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed round trips per case (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed round trips first (default %(default)s)")
    parser.add_argument("--wire-dtypes", default="bfloat16",
                        help="compact encodings to time too, comma-separated, '' for none (default %(default)s)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    compacts = [name for name in args.wire_dtypes.split(",") if name]
    for name in compacts:
        wire_dtype(name)  # a bad name fails now, with the SDK's message
    batch = {"x": np.ones((4, 1), np.float32)}
    rows = []
    with LocalCluster(workers=1) as cluster, cluster.client(timeout=600) as service:
        for megabytes in sizes:
            graph = model(megabytes)
            params = graph.init_params(0)
            expected = gp.local_gradients(graph, params, batch)
            result = service.gradients(graph, params, batch)
            assert result.loss == expected[0] and np.array_equal(result.grads["W"], expected[1]["W"])
            for name in compacts:  # W = 0: the gradient, 0.5, is exact in 16 bits too
                result = service.gradients(graph, params, batch, wire_dtype=name)
                assert np.array_equal(result.grads["W"], round_through(expected[1]["W"], wire_dtype(name)))
            transfers, close = raw_floor(megabytes * 2**20)
            cases = {"service": lambda: service.gradients(graph, params, batch),
                     **{name: (lambda name=name: service.gradients(graph, params, batch, wire_dtype=name))
                        for name in compacts},
                     "raw x4": transfers,
                     "compute": lambda: gp.local_gradients(graph, params, batch)}
            times: dict[str, list[float]] = {name: [] for name in cases}
            try:
                for repeat in range(args.warmup + args.repeats):
                    for name, step in cases.items():
                        started = time.perf_counter()
                        step()
                        if repeat >= args.warmup:
                            times[name].append(time.perf_counter() - started)
            finally:
                close()
            floor = [a + b for a, b in zip(times["raw x4"], times["compute"])]
            rows.append((megabytes, floor, [(name, times[name]) for name in ("service", *compacts)]))
    print(f"params round trip (client -> coordinator -> 1 worker -> back), {args.repeats} interleaved repeats "
          f"after {args.warmup} warm-up; floor = 4 raw gRPC unary transfers of the same bytes + the in-process "
          "compute, same run")
    header = (f"{'params':>7}  {'case':<8}  {'min s':>7}  {'median s':>8}  {'max s':>7}  {'MB/s moved':>10}  "
              f"{'share of floor':>14}")
    print(header)
    print("-" * len(header))
    for megabytes, floor, services in rows:
        base = statistics.median(floor)
        for name, t in (("floor", floor), *services):
            median = statistics.median(t)
            print(f"{megabytes:>5}MB  {name:<8}  {min(t):>7.3f}  {median:>8.3f}  {max(t):>7.3f}  "
                  f"{4 * megabytes / median:>10,.0f}  {base / median:>13.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
