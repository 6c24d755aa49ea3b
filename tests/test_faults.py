"""A dead, hung, leaving or cancelled worker costs a shard, never a step.

Real processes on localhost: workers are SIGKILLed, SIGSTOPped and
SIGTERMed in the middle of a shard, and every answer must still be the exact
gradient of the whole batch, bitwise equal to `local_gradients` over the
same shard bounds.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest

import gradpool as gp
from gradpool.protos import gradpool_pb2 as pb
from gradpool.protos import gradpool_pb2_grpc as pb_grpc
from gradpool.worker.engine import to_named

EXAMPLES = 6000  # three shards of ~1 s each on a 2-core machine


def deep_model(layers: int = 24) -> gp.Graph:
    g = gp.Graph("deep")
    x = g.input("x", (256,))
    y = g.input("y", (), dtype="int64")
    h = x
    for i in range(layers):
        h = gp.tanh(h @ g.param(f"W{i}", (256, 256)))
    g.set_loss(gp.softmax_cross_entropy(h @ g.param("out", (256, 10)), y).mean()
               + 1e-4 * (g["W0"] ** 2).sum())
    return g


def data(n: int = EXAMPLES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, 256)).astype(np.float32), "y": rng.integers(0, 10, n)}


def exact(result: gp.GradientsResult, graph: gp.Graph, params: dict, batch: dict) -> bool:
    """Bitwise equal to local_gradients over the same (equal) shard bounds."""
    bounds = [(s.start, s.start + s.examples) for s in result.shards]
    assert bounds == gp.worker.engine.shard_bounds(len(batch["y"]), [1.0] * len(bounds))
    loss, grads = gp.local_gradients(graph, params, batch, shards=len(bounds))
    return result.loss == loss and all(np.array_equal(result.grads[k], grads[k]) for k in grads)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cluster(workers: int = 3, **kwargs) -> gp.LocalCluster:
    """Workers with this process's BLAS threads: a matmul split over another
    number of threads rounds differently, and the comparisons are bitwise."""
    return gp.LocalCluster(workers=workers, **kwargs)


def in_background(call):  # type: ignore[no-untyped-def]
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=call()), daemon=True)
    thread.start()
    return thread, box


@pytest.mark.parametrize("client", ["sdk", "raw stub"])
def test_a_worker_killed_mid_shard_costs_a_shard_not_the_step(client: str) -> None:
    graph, batch = deep_model(), data()
    params = graph.init_params(0)
    with cluster() as running, running.client(timeout=120) as service:
        ref = service.upload(batch)
        service.gradients(graph, params, ref.take(np.arange(30)))  # graph and dataset on every worker
        victim = running.workers[1]
        if client == "sdk":
            thread, box = in_background(lambda: service.gradients(graph, params, batch))
        else:
            request = pb.GradientsRequest(graph_id=graph.graph_id, params=to_named(params), inputs=to_named(batch))
            channel = grpc.insecure_channel(running.address, options=[("grpc.max_send_message_length", 2**30),
                                                                       ("grpc.max_receive_message_length", 2**30)])
            stub = pb_grpc.CoordinatorStub(channel)
            thread, box = in_background(lambda: stub.ComputeGradients(request, timeout=120))
        time.sleep(0.3)  # the shards are computing
        victim.popen.kill()
        thread.join(120)
        assert "result" in box, "the call did not return"
        if client == "sdk":
            result = box["result"]
        else:
            channel.close()
            reply = box["result"]
            result = gp.GradientsResult(reply.loss, {g.name: gp.worker.engine.from_tensor(g.tensor) for g in
                                                     reply.grads}, reply.examples,
                                        [gp.ShardStat.from_proto(s) for s in reply.shards], reply.seconds)
        assert exact(result, graph, params, batch)
        assert sum(s.attempts for s in result.shards) > len(result.shards), "no shard was retried"
        assert all(victim.address not in s.worker for s in result.shards), "the dead worker served a shard"


def test_a_hung_worker_is_hedged_and_rejoins_when_it_wakes() -> None:
    graph, batch = deep_model(), data()
    params = graph.init_params(0)
    with cluster(workers=4) as running, running.client(timeout=120) as service:
        ref = service.upload(batch)
        rows = ref.take(np.arange(EXAMPLES * 3 // 4))  # three busy workers, one idle to hedge on
        running.stop_worker(-1)
        service.gradients(graph, params, rows)
        running.add_worker()
        started = time.perf_counter()
        undisturbed = service.gradients(graph, params, rows)
        step = time.perf_counter() - started
        sleeper = running.workers[0]
        thread, box = in_background(lambda: service.gradients(graph, params, rows))
        time.sleep(min(0.5, step / 3))
        os.kill(sleeper.pid, signal.SIGSTOP)
        started = time.perf_counter()
        try:
            thread.join(120)
            took = time.perf_counter() - started
        finally:
            os.kill(sleeper.pid, signal.SIGCONT)
        result = box["result"]
        assert result.loss == undisturbed.loss and all(np.array_equal(result.grads[k], undisturbed.grads[k])
                                                       for k in params)
        assert took < 3 * step + 2.0, f"the hedge took {took:.1f}s, the undisturbed step {step:.1f}s"
        assert any(s.attempts > 1 for s in result.shards)
        suspects = [w.address for w in running.status().workers if w.state == "suspect"]
        assert sleeper.address in suspects or not suspects  # its lease may have lapsed: then it registered anew
        deadline = time.monotonic() + 30
        while not any(sleeper.address in s.worker for s in service.gradients(graph, params, rows).shards):
            assert time.monotonic() < deadline, "the woken worker never served again"
            time.sleep(0.2)
        states = {w.address: w.state for w in running.status().workers}
        assert states[sleeper.address] == "live"  # no longer suspect


def test_a_cancelled_call_stops_the_engine_on_the_worker() -> None:
    graph, batch = deep_model(layers=60), data(4000)
    params = graph.init_params(0)
    with cluster(workers=1) as running, running.client(timeout=120) as service:
        ref = service.upload(batch)
        service.gradients(graph, params, ref.take(np.arange(10)))
        worker = running.workers[0]
        with pytest.raises(gp.ServiceError) as caught:
            service.gradients(graph, params, ref.take(np.arange(4000)), timeout=0.7)  # needs several seconds
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.3)  # the engine finishes the op it is in
        before = cpu_seconds(worker.pid)
        time.sleep(1.0)
        burnt = cpu_seconds(worker.pid) - before
        assert burnt < 0.3, f"the worker kept computing for the caller that left ({burnt:.2f}s of CPU in 1s)"
        result = service.gradients(graph, params, ref.take(np.arange(10)))  # and serves the next call
        assert np.isfinite(result.loss)


def test_a_worker_drained_past_its_grace_period_hands_its_shard_to_another() -> None:
    graph, batch = deep_model(), data()
    params = graph.init_params(0)
    with cluster(worker_args=["--grace-seconds", "0.3"]) as running, running.client(timeout=120) as service:
        ref = service.upload(batch)
        rows = ref.take(np.arange(EXAMPLES))
        service.gradients(graph, params, rows.dataset.take(np.arange(30)))
        leaving = running.workers[1]
        thread, box = in_background(lambda: service.gradients(graph, params, rows))
        time.sleep(0.3)
        leaving.popen.send_signal(signal.SIGTERM)
        started = time.perf_counter()
        leaving.popen.wait(30)
        exited_after = time.perf_counter() - started
        thread.join(120)
        result = box["result"]
        assert exact(result, graph, params, {k: v for k, v in batch.items()})
        assert exited_after < 3.0, f"the worker took {exited_after:.1f}s to exit after SIGTERM"
        assert any(s.attempts > 1 for s in result.shards)


# ------------------------------------------------------------------ restarts and chaos

def sharded_reference(graph: gp.Graph, params: dict, batch: dict, bounds: list[tuple[int, int]]
                      ) -> tuple[float, dict]:
    """The service's arithmetic in this process for any shard bounds: each
    shard with the global batch size, batch-independent terms on the first,
    summed in shard order."""
    program, total = graph.program(), gp.worker.engine.OrderedSum(len(bounds))
    for index, (start, stop) in enumerate(bounds):
        piece = {name: value[start:stop] for name, value in batch.items()}
        result = program.run(params, piece, global_batch=len(batch["y"]), include_batch_independent=index == 0)
        total.add(index, result.loss, result.grads)
    return total.loss, total.grads


def small_model() -> gp.Graph:
    g = gp.Graph("small")
    x, y = g.input("x", (32,)), g.input("y", (), dtype="int64")
    W1, W2 = g.param("W1", (32, 64)), g.param("W2", (64, 10))
    g.set_loss(gp.softmax_cross_entropy(gp.tanh(x @ W1) @ W2, y).mean() + 1e-3 * (W1 ** 2).sum())
    return g


@pytest.mark.parametrize("down_seconds", [0.0, 5.0])
def test_a_training_loop_rides_out_a_coordinator_restart_with_no_error(down_seconds: float) -> None:
    graph = small_model()
    rng = np.random.default_rng(1)
    batch = {"x": rng.normal(size=(2000, 32)).astype(np.float32), "y": rng.integers(0, 10, 2000)}
    with cluster(workers=2) as running, running.client(timeout=120) as service:
        ref = service.upload(batch)
        params, errors, steps = graph.init_params(0), [], []
        stop = threading.Event()

        def train() -> None:
            while not stop.is_set():
                rows = np.sort(rng.choice(2000, 128, replace=False))
                try:
                    result = service.gradients(graph, params, ref.take(rows))
                except gp.GradpoolError as err:  # what a training loop would see
                    errors.append(err)
                    continue
                steps.append((rows, result))

        thread = threading.Thread(target=train, daemon=True)
        thread.start()
        time.sleep(1.0)
        before = len(steps)
        running.restart_coordinator(down_seconds=down_seconds, kill=True)
        time.sleep(1.5)
        stop.set()
        thread.join(60)
        assert not errors, errors
        assert len(steps) > before, "no step completed after the restart"
        for rows, result in steps[-3:]:
            bounds = [(s.start, s.start + s.examples) for s in result.shards]
            loss, grads = sharded_reference(graph, params, {k: v[rows] for k, v in batch.items()}, bounds)
            assert result.loss == loss and all(np.array_equal(result.grads[k], grads[k]) for k in grads)


def test_chaos_every_step_is_exact_while_workers_die_hang_and_return() -> None:
    """A training loop while a background thread kills, freezes and replaces
    workers and restarts the coordinator once: every step completes, covers
    every example exactly once, and equals the in-process sum over that
    step's shard bounds; the final params equal a replay of those plans."""
    graph = small_model()
    rng = np.random.default_rng(2)
    batch = {"x": rng.normal(size=(3000, 32)).astype(np.float32), "y": rng.integers(0, 10, 3000)}
    lr = np.float32(0.2)
    with cluster(workers=3) as running, running.client(timeout=120) as service:
        ref = service.upload(batch)
        params = graph.init_params(0)
        plans: list[tuple[np.ndarray, list[tuple[int, int]]]] = []
        stop = threading.Event()
        chaos_rng = np.random.default_rng(3)
        actions: list[str] = []

        script = ["kill", "stop", "add", "restart coordinator", "kill", "stop"]  # victims drawn at random

        def chaos() -> None:
            for action in script:
                if stop.wait(0.4):
                    return
                live = [w for w in running.workers if w.alive()]
                victim = live[chaos_rng.integers(len(live))]
                if action == "kill":
                    victim.popen.kill()
                    running.workers.remove(victim)
                    running.add_worker(wait=False)
                elif action == "stop":  # a hung machine, for longer than a hedge takes
                    os.kill(victim.pid, signal.SIGSTOP)
                    stop.wait(1.5)
                    os.kill(victim.pid, signal.SIGCONT)
                elif action == "add":
                    running.add_worker(wait=False)
                else:
                    running.restart_coordinator(wait=False, kill=True)
                actions.append(action)

        thread = threading.Thread(target=chaos, daemon=True)
        thread.start()
        try:
            step, give_up = 0, time.monotonic() + 60
            while len(actions) < len(script):
                assert time.monotonic() < give_up, f"the chaos stalled: {actions}"
                step += 1
                rows = np.sort(rng.choice(3000, 256, replace=False))
                result = service.gradients(graph, params, ref.take(rows))
                bounds = [(s.start, s.start + s.examples) for s in result.shards]
                assert bounds[0][0] == 0 and bounds[-1][1] == len(rows), "examples lost"
                assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])), "examples lost or counted twice"
                loss, grads = sharded_reference(graph, params, {k: v[rows] for k, v in batch.items()}, bounds)
                assert result.loss == loss and all(np.array_equal(result.grads[k], grads[k]) for k in grads), step
                plans.append((rows, bounds))
                for name in params:
                    params[name] = params[name] - lr * result.grads[name]
        finally:
            stop.set()
            thread.join(30)
        assert actions == script
        replay = graph.init_params(0)
        for rows, bounds in plans:
            _, grads = sharded_reference(graph, replay, {k: v[rows] for k, v in batch.items()}, bounds)
            for name in replay:
                replay[name] = replay[name] - lr * grads[name]
        assert all(np.array_equal(params[k], replay[k]) for k in params)


def test_a_worker_drained_within_its_grace_period_finishes_its_shard() -> None:
    graph, batch = deep_model(), data()
    params = graph.init_params(0)
    with cluster(worker_args=["--grace-seconds", "30"]) as running, running.client(timeout=120) as service:
        ref = service.upload(batch)
        rows = ref.take(np.arange(EXAMPLES))
        service.gradients(graph, params, ref.take(np.arange(30)))
        leaving = running.workers[1]
        thread, box = in_background(lambda: service.gradients(graph, params, rows))
        time.sleep(0.3)
        leaving.popen.send_signal(signal.SIGTERM)
        thread.join(120)
        leaving.popen.wait(30)  # it exits once its shard is done
        result = box["result"]
        assert exact(result, graph, params, batch)
        assert all(s.attempts == 1 for s in result.shards), "a shard was moved although the grace period sufficed"
        assert any(leaving.address in s.worker for s in result.shards)
        assert leaving.popen.returncode == 0  # a clean exit, after its shard
        assert leaving.address not in [w.address for w in running.status().workers]  # it left the pool


def test_a_busy_coordinator_refuses_fast_and_the_sdk_retries() -> None:
    """Admission control refuses client work past the limit, but never what
    keeps the pool alive: while the slow request holds the only slot, health
    probes and worker registration are served (counted with the work, a
    worker's heartbeats were refused until its lease lapsed and its shard was
    lost), and the worker stays in the pool throughout."""
    graph, batch = deep_model(), data(12000)  # about 1 s of work: well past the 0.3 s below
    params = graph.init_params(0)
    with cluster(workers=1, coordinator_args=["--max-concurrent-requests", "1", "--lease-seconds", "1",
                                              "--heartbeat-seconds", "0.2"]) as running, \
            running.client(timeout=120) as service:
        ref = service.upload(batch)
        service.gradients(graph, params, ref.take(np.arange(10)))
        thread, box = in_background(lambda: service.gradients(graph, params, ref.take(np.arange(12000))))
        time.sleep(0.3)  # the slow request holds the one slot
        with grpc.insecure_channel(running.address) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.CoordinatorStub(channel).GetStatus(pb.StatusRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Concurrent RPC limit exceeded" in caught.value.details()
        with grpc.insecure_channel(running.address) as channel:  # while the slot is still held:
            from grpc_health.v1 import health_pb2, health_pb2_grpc
            probe = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert probe.status == health_pb2.HealthCheckResponse.SERVING
            coordinator = pb_grpc.CoordinatorStub(channel)
            joined = coordinator.RegisterWorker(pb.RegisterWorkerRequest(address="127.0.0.1:9", capacity=1),
                                                timeout=10)
            coordinator.DeregisterWorker(pb.DeregisterWorkerRequest(worker_id=joined.worker_id,
                                                                   lease_secret=joined.lease_secret), timeout=10)
        status = service.status()  # the SDK backs off and retries until the slot is free
        thread.join(120)
        assert "result" in box and status.requests_served >= 1
        assert exact(box["result"], graph, params, batch)
        assert [s.attempts for s in box["result"].shards] == [1]  # never dropped, so never rerun
        assert [w.state for w in service.status().workers] == ["live"]


class LyingWorker(pb_grpc.WorkerServicer):
    """Answers every shard with gradients of the wrong shape."""

    def LoadGraph(self, request, context):  # type: ignore[no-untyped-def]
        return pb.LoadGraphResponse()

    def RunShard(self, request, context):  # type: ignore[no-untyped-def]
        shard = pb.ShardRequest.FromString(request)
        return pb.ShardResponse(loss=1.0, examples=shard.global_batch and len(shard.inputs[0].tensor.shape) and
                                shard.inputs[0].tensor.shape[0], grads=to_named({"W1": np.zeros(3)})
                                ).SerializeToString()


def test_a_wrong_answer_counts_as_its_workers_failure_and_the_shard_moves() -> None:
    from concurrent import futures
    from gradpool.worker.rpc import add_servicer

    liar = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_servicer(liar, LyingWorker(), "Worker", raw=("RunShard", "RunShardStream"))
    port = liar.add_insecure_port("127.0.0.1:0")
    liar.start()
    graph = small_model()
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(64, 32)).astype(np.float32), "y": rng.integers(0, 10, 64)}
    params = graph.init_params(0)
    try:
        with cluster(workers=1) as running, running.client(timeout=60) as service, \
                grpc.insecure_channel(running.address) as channel:
            coordinator = pb_grpc.CoordinatorStub(channel)
            joined = coordinator.RegisterWorker(pb.RegisterWorkerRequest(
                address=f"127.0.0.1:{port}", capacity=1.0, worker_id="liar"), timeout=10)
            stop = threading.Event()

            def heartbeat() -> None:  # keep the liar's lease for the test's duration
                while not stop.wait(0.2):
                    coordinator.Heartbeat(pb.HeartbeatRequest(worker_id="liar", lease_secret=joined.lease_secret),
                                          timeout=5)
            beating = threading.Thread(target=heartbeat, daemon=True)
            beating.start()
            try:
                result = service.gradients(graph, params, batch)
            finally:
                stop.set()
                beating.join(10)
            assert len(result.shards) == 2 and any(s.attempts > 1 for s in result.shards)
            assert all(f"127.0.0.1:{port}" not in s.worker for s in result.shards)
            assert exact(result, graph, params, batch)
            liar_status = next(w for w in running.status().workers if w.worker_id == "liar")
            assert liar_status.errors >= 1
    finally:
        liar.stop(None)
