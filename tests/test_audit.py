"""Shard audit (`--audit-fraction`): a worker that returns wrong gradients is
caught and quarantined, the client gets the verified gradients, honest workers
never are. Real processes: the liar is tests/lying_worker.py, a real worker
process whose servicer scales every gradient by 1 + 1e-3."""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

import gradpool as gp
from gradpool.cluster import ChildProcess, LocalCluster, child_env
from gradpool.remote import RetryPolicy, ServiceError
from gradpool.server.config import parse_args
from gradpool.server.coordinator import result_difference
from gradpool.server.registry import QUARANTINED, WorkerRegistry
from gradpool.worker import wire
from gradpool.worker.observability import JsonFormatter

from models import batch_for, params_for, softmax_mlp

LIAR = str(Path(__file__).with_name("lying_worker.py"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


class ScriptWorker(ChildProcess):
    """A worker process run from a script (the liar) instead of `-m gradpool.worker`."""

    def __init__(self, script: str, args: list[str], env: dict[str, str]):
        self.role, self.args, self.address = "worker", list(args), ""
        self.popen = subprocess.Popen([sys.executable, script, *args], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, env=env, start_new_session=True)


def add_liar(cluster: LocalCluster, worker_id: str = "liar", scale: str = "1e-3") -> ScriptWorker:
    env = child_env()
    env["GRADPOOL_TEST_LIE_SCALE"] = scale
    env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = "1"
    liar = ScriptWorker(LIAR, ["--coordinator", cluster.address, "--port", "0", "--capacity", "1",
                               "--host", "127.0.0.1", "--log-level", "WARNING", "--worker-id", worker_id], env)
    cluster.workers.append(liar)  # stopped with the cluster
    liar.ready(60)
    cluster.wait_for_workers()
    return liar


def audited_cluster(workers: int, metrics_port: int = 0, *extra: str) -> LocalCluster:
    args = ["--audit-fraction", "1", *extra]
    if metrics_port:
        args += ["--metrics-port", str(metrics_port)]
    return LocalCluster(workers=workers, coordinator_args=args, threads_per_worker=1)


def assert_bitwise(result, graph, params, batch, shards: int) -> None:
    loss, grads = result
    want_loss, want = gp.local_gradients(graph, params, batch, shards=shards)
    assert loss == want_loss
    for name in want:
        assert grads[name].tobytes() == want[name].tobytes(), name


def states(status) -> dict[str, str]:
    return {w.worker_id: w.state for w in status.workers}


def test_an_audit_catches_a_lying_worker_and_quarantines_it():
    graph = softmax_mlp()
    params, batch = params_for(graph), batch_for(graph, 60)
    port = free_port()
    with audited_cluster(2, port) as cluster:
        add_liar(cluster)
        with cluster.client(timeout=60) as service:
            result = service.gradients(graph, params, batch)
            # Planned over three workers; the liar's shard (or its audit of another) was outvoted.
            assert len(result.shards) == 3 and not any(s.worker.startswith("liar") for s in result.shards)
            assert_bitwise(result, graph, params, batch, shards=3)
            status = service.status()
            assert states(status)["liar"] == QUARANTINED
            assert sorted(states(status).values()) == ["live", "live", QUARANTINED]
            assert "quarantined" in status.table()
            served = {w.worker_id: w.shards_served for w in status.workers}
            # Quarantined: no more shards, and the next requests split over the two honest workers.
            for _ in range(3):
                again = service.gradients(graph, params, batch)
                assert len(again.shards) == 2
                assert_bitwise(again, graph, params, batch, shards=2)
            later = service.status()
            assert states(later)["liar"] == QUARANTINED
            assert {w.worker_id: w.shards_served for w in later.workers}["liar"] == served["liar"]
        time.sleep(1.0)  # heartbeats do not lift the quarantine
        assert states(cluster.status())["liar"] == QUARANTINED
        metrics = scrape(port)
        assert metrics["gradpool_workers_quarantined_total"] == 1
        assert metrics['gradpool_workers{state="quarantined"}'] == 1
        assert metrics['gradpool_workers{state="live"}'] == 2
        assert metrics['gradpool_shards_audited_total{outcome="disagreed"}'] >= 1
        assert metrics['gradpool_shards_audited_total{outcome="agreed"}'] >= 6


def test_honest_workers_are_never_quarantined():
    """Audit fraction 1 over many requests: identical workers agree bitwise, every time."""
    graph = softmax_mlp()
    port = free_port()
    rng = np.random.default_rng(7)
    requests = 12
    with audited_cluster(2, port) as cluster, cluster.client(timeout=60) as service:
        for i in range(requests):
            params = {name: value + rng.normal(size=value.shape).astype(value.dtype)
                      for name, value in params_for(graph).items()}
            batch = batch_for(graph, int(rng.integers(2, 50)), seed=i)
            assert_bitwise(service.gradients(graph, params, batch), graph, params, batch, shards=2)
        forward = service.forward(graph, params, batch, "logits")  # Evaluate is audited too
        np.testing.assert_allclose(forward["logits"], gp.local_forward(graph, params, batch, "logits")["logits"],
                                   rtol=1e-12)
        status = service.status()
        assert sorted(states(status).values()) == ["live", "live"]
        assert all(w.errors == 0 for w in status.workers)
        metrics = scrape(port)
    assert metrics['gradpool_shards_audited_total{outcome="agreed"}'] >= 2 * requests + 2
    assert metrics.get('gradpool_shards_audited_total{outcome="disagreed"}', 0) == 0
    assert metrics.get("gradpool_workers_quarantined_total", 0) == 0


def test_two_workers_that_disagree_fail_the_request_rather_than_guess():
    """One honest worker and one liar: no third to break the tie, so no gradient (DATA_LOSS), and no
    one is quarantined (there is no telling which one lies)."""
    graph = softmax_mlp()
    params, batch = params_for(graph), batch_for(graph, 16)
    with audited_cluster(1) as cluster:
        add_liar(cluster)
        with cluster.client(timeout=60, retry=RetryPolicy(attempts=1)) as service:
            with pytest.raises(ServiceError) as caught:
                service.gradients(graph, params, batch)
            assert caught.value.code == grpc.StatusCode.DATA_LOSS
            assert "audit" in str(caught.value) and "liar" in str(caught.value)
            assert sorted(states(service.status()).values()) == ["live", "live"]


def test_a_tolerance_lets_near_results_agree():
    """--audit-tolerance: a worker off by 1e-9 (another BLAS, say) agrees within 1e-6; 1e-3 would not."""
    graph = softmax_mlp()
    params, batch = params_for(graph), batch_for(graph, 16)
    with audited_cluster(1, 0, "--audit-tolerance", "1e-6") as cluster:
        add_liar(cluster, scale="1e-9")
        with cluster.client(timeout=60, retry=RetryPolicy(attempts=1)) as service:
            loss, grads = service.gradients(graph, params, batch)
            want_loss, want = gp.local_gradients(graph, params, batch, shards=2)
            for name in want:
                np.testing.assert_allclose(grads[name], want[name], rtol=1e-6)
            assert sorted(states(service.status()).values()) == ["live", "live"]


def result(grads: dict, loss: float = 1.0) -> wire.ResultView:
    return wire.read_shard_response(wire.shard_response(loss, grads, {}, 3, 0.0).join())


def test_result_difference_bitwise_and_within_tolerance():
    a = result({"w": np.array([1.0, 2.0], np.float32)})
    near = result({"w": np.array([1.0, np.nextafter(np.float32(2), np.float32(3))], np.float32)})
    nan = result({"w": np.array([1.0, np.nan], np.float32)})
    bitwise, loose = result_difference(), result_difference(1e-6)
    assert bitwise(a, a) == "" and bitwise(nan, nan) == ""
    assert "1 of 8 bytes differ" in bitwise(a, near)
    assert loose(a, near) == "" and loose(nan, nan) == ""
    assert "1 of 2 elements" in loose(a, nan)
    assert "loss" in bitwise(a, result({"w": np.array([1.0, 2.0], np.float32)}, loss=1.0 + 2**-40))
    assert "gradient" in bitwise(a, result({"v": np.array([1.0, 2.0], np.float32)}))


def test_audit_settings_are_checked():
    assert parse_args(["--audit-fraction", "0.25", "--audit-tolerance", "1e-5"]).audit_fraction == 0.25
    assert parse_args([]).audit_fraction == 0 and parse_args([]).audit_tolerance == 0
    for bad in (["--audit-fraction", "1.5"], ["--audit-fraction", "nan"], ["--audit-tolerance", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_a_quarantine_is_one_json_log_line_and_outlives_heartbeats():
    registry = WorkerRegistry(lease_seconds=60, channel_options=[])
    entry = registry.register("127.0.0.1:1", 1.0, "w1")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("gradpool.coordinator")
    logger.addHandler(handler)
    try:
        registry.quarantine(entry, "its result for shard 0 differs")
        registry.quarantine(entry, "again")  # once
    finally:
        logger.removeHandler(handler)
        registry.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 1
    assert lines[0]["event"] == "quarantine" and lines[0]["worker"] == "w1" and lines[0]["level"] == "ERROR"
    assert registry.pool() == []
    registry2 = WorkerRegistry(lease_seconds=60, channel_options=[])
    entry = registry2.register("127.0.0.1:1", 1.0, "w1")
    registry2.quarantine(entry, "wrong")
    assert registry2.heartbeat("w1", entry.secret)
    assert registry2.register("127.0.0.1:1", 1.0, "w1", entry.secret).state == QUARANTINED
    assert registry2.pool() == []
    # A new id at its address is refused while it heartbeats; leaving the pool (a restart) clears it.
    with pytest.raises(Exception):
        registry2.register("127.0.0.1:1", 1.0, "w2")
    assert registry2.deregister("w1", entry.secret)
    assert registry2.register("127.0.0.1:1", 1.0, "w1").state == "live"
    registry2.close()
