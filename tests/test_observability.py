"""Prometheus metrics scraped from live servers, and JSON logs that carry one
request's id from the coordinator to the worker."""

from __future__ import annotations

import json
import re
import socket
import urllib.request

import numpy as np

import gradpool as gp

from models import batch_for, params_for, softmax_mlp


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """`name{labels}` -> value, from a /metrics page."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(gradpool_[a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def test_metrics_move_as_requests_are_served_and_logs_carry_the_request_id(capfd) -> None:
    coordinator_port, worker_port = free_port(), free_port()
    common = ["--log-format", "json", "--log-level", "DEBUG"]
    graph = softmax_mlp()
    params, batch = params_for(graph), batch_for(graph, 30)
    with gp.LocalCluster(workers=1, coordinator_args=["--metrics-port", str(coordinator_port), *common],
                         worker_args=["--metrics-port", str(worker_port), *common]) as cluster, \
            cluster.client(timeout=60) as service:
        service.gradients(graph, params, batch)
        before_c, before_w = scrape(coordinator_port), scrape(worker_port)
        for _ in range(3):
            service.gradients(graph, params, batch)
        ref = service.upload(batch)
        service.gradients(graph, params, ref.take(np.arange(10)))
        after_c, after_w = scrape(coordinator_port), scrape(worker_port)

    ok = 'gradpool_rpcs_total{code="OK",method="ComputeGradients",server="coordinator"}'
    assert after_c[ok] - before_c[ok] == 4
    shards = 'gradpool_rpcs_total{code="OK",method="RunShard",server="worker"}'
    assert after_w[shards] - before_w[shards] == 4
    examples = 'gradpool_examples_total{server="worker"}'
    assert after_w[examples] - before_w[examples] == 3 * 30 + 10
    assert after_c['gradpool_examples_total{server="coordinator"}'] >= 4 * 30 + 10
    assert after_c['gradpool_received_bytes_total{server="coordinator"}'] > \
        before_c['gradpool_received_bytes_total{server="coordinator"}'] + 3 * batch["x"].nbytes
    assert after_c['gradpool_datasets_cached{server="coordinator"}'] == 1
    assert after_w['gradpool_graphs_cached{server="worker"}'] == 1
    assert after_c['gradpool_rpc_seconds_count{method="ComputeGradients",server="coordinator"}'] >= 5
    assert after_c['gradpool_shard_seconds_count'] >= 5
    assert after_c['gradpool_workers{state="live"}'] == 1, {k: v for k, v in after_c.items() if "workers" in k}

    records = []
    for line in capfd.readouterr().err.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    planned = [r for r in records if r["logger"] == "gradpool.coordinator" and "shard(s)" in r["message"]]
    assert planned and all(r.get("request_id") and r.get("graph_id") for r in planned)
    served = [r for r in records if r["logger"] == "gradpool.worker" and "computed" in r["message"]]
    assert {r["request_id"] for r in planned} == {r.get("request_id") for r in served}
    assert all(r.get("worker") for r in served)


def test_no_metrics_port_serves_none() -> None:
    port = free_port()
    with gp.LocalCluster(workers=1) as cluster:
        assert cluster.status().live_workers
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
        except OSError:
            return
    raise AssertionError("something served metrics without --metrics-port")
