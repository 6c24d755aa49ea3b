"""The service's lifecycle over real processes: token auth, health and
reflection, a coordinator restart the clients and workers ride out, and
LocalCluster leaving nothing behind."""

from __future__ import annotations

import os

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import gradpool as gp
from gradpool.cluster import ChildProcess, LocalCluster, child_env
from gradpool.remote import Client, RetryPolicy, ServiceError
from gradpool.protos import gradpool_pb2 as pb
from gradpool.protos import gradpool_pb2_grpc as pb_grpc
from gradpool.server.config import parse_args as coordinator_args
from gradpool.worker.server import parse_args as worker_args

from models import batch_for, params_for, softmax_mlp

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(workers=2, token=TOKEN) as running:
        yield running


def assert_matches_local(loss, grads, graph, params, batch):
    expected_loss, expected = gp.local_gradients(graph, params, batch)
    assert loss == pytest.approx(expected_loss, rel=1e-10)
    for name, value in expected.items():
        np.testing.assert_allclose(grads[name], value, rtol=1e-10, atol=1e-10 * np.abs(value).max())


def test_the_right_token_works_and_a_wrong_or_missing_one_is_refused(cluster):
    graph = softmax_mlp()
    params, batch = params_for(graph), batch_for(graph, 12)
    with cluster.client(timeout=30) as service:
        loss, grads = service.gradients(graph, params, batch)
    assert_matches_local(loss, grads, graph, params, batch)
    for token in (None, "wrong"):
        with Client(cluster.address, token=token, timeout=10) as intruder:
            with pytest.raises(ServiceError) as caught:
                intruder.status()
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "token" in str(caught.value)
            with pytest.raises(ServiceError) as caught:
                intruder.gradients(graph, params, batch)
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    # Workers take the token too: a caller without it cannot run shards there.
    with pytest.raises(grpc.RpcError) as raw:
        pb_grpc.WorkerStub(grpc.insecure_channel(cluster.worker_addresses[0])).GetWorkerStatus(
            pb.WorkerStatusRequest(), timeout=10)
    assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_token_and_reflection_lists_the_services(cluster):
    for address, service, token in [(cluster.address, "gradpool.v1.Coordinator", TOKEN),
                                    (cluster.worker_addresses[0], "gradpool.v1.Worker", cluster.worker_token)]:
        channel = grpc.insecure_channel(address)
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", service):
            answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                  metadata=(("authorization", f"Bearer {token}"),), timeout=10)
        names = {s.name for reply in replies for s in reply.list_services_response.service}
        assert {service, "grpc.health.v1.Health"} <= names


def test_a_restarted_coordinator_is_rejoined_by_workers_and_clients(cluster):
    graph = softmax_mlp()
    params, batch = params_for(graph), batch_for(graph, 40)
    with cluster.client(timeout=60) as service:
        service.gradients(graph, params, batch)
        old_port = cluster.coordinator.port
        cluster.restart_coordinator()  # waits until both workers registered again by themselves
        assert cluster.coordinator.port == old_port
        status = service.status()
        assert len(status.live_workers) == 2 and status.graphs_registered == 0
        # The same client: its graph is unknown to the new coordinator, which
        # answers NOT_FOUND; the client registers it again without being asked.
        loss, grads = service.gradients(graph, params, batch)
        assert_matches_local(loss, grads, graph, params, batch)
        assert service.status().graphs_registered == 1


def test_a_worker_waits_for_a_coordinator_that_starts_late(cluster):
    """Registration retries with backoff until the coordinator is up."""
    assert cluster.coordinator.stop() == 0  # SIGTERM: a graceful exit
    late = cluster.add_worker(wait=False)  # the coordinator is down while it starts
    cluster.restart_coordinator(wait=False)
    cluster.wait_for_workers(3)
    assert late.address in [w.address for w in cluster.status().live_workers]
    cluster.stop_worker(cluster.workers.index(late))


def test_local_cluster_stops_every_process_when_the_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with LocalCluster(workers=1) as doomed:
            processes = [doomed.coordinator, *doomed.workers]
            raise RuntimeError("boom")
    for process in processes:
        assert process.popen.returncode is not None  # exited and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(process.pid, 0)


def test_an_unreachable_coordinator_is_a_clear_service_unavailable():
    with Client("127.0.0.1:1", timeout=2, retry=RetryPolicy(attempts=2, initial_backoff=0.05)) as nowhere:
        with pytest.raises(gp.ServiceUnavailable) as caught:
            nowhere.status()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert str(caught.value).startswith("cannot reach the gradpool coordinator at 127.0.0.1:1")


def test_static_workers_listed_on_the_command_line():
    quiet = ["--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"]
    worker = ChildProcess("worker", quiet, child_env()).ready(30)  # no --coordinator: static only
    try:
        coordinator = ChildProcess("coordinator", [*quiet, "--workers", worker.address], child_env()).ready(30)
        try:
            with Client(coordinator.address, timeout=30) as service:
                [listed] = service.status().workers
                assert (listed.address, listed.static, listed.state) == (worker.address, True, "live")
                graph = softmax_mlp()
                params, batch = params_for(graph), batch_for(graph, 6)
                loss, grads = service.gradients(graph, params, batch)
                assert_matches_local(loss, grads, graph, params, batch)
                assert service.status().workers[0].shards_served == 1
        finally:
            assert coordinator.stop() == 0
    finally:
        assert worker.stop() == 0


def test_every_flag_has_an_environment_variable(monkeypatch):
    monkeypatch.setenv("GRADPOOL_PORT", "6001")
    monkeypatch.setenv("GRADPOOL_HOST", "127.0.0.2")
    monkeypatch.setenv("GRADPOOL_WORKERS", "a:1, b:2")
    monkeypatch.setenv("GRADPOOL_MAX_MESSAGE_MB", "300")
    monkeypatch.setenv("GRADPOOL_HEARTBEAT_SECONDS", "0.5")
    monkeypatch.setenv("GRADPOOL_LEASE_SECONDS", "4")
    monkeypatch.setenv("GRADPOOL_TOKEN", "t")
    monkeypatch.setenv("GRADPOOL_LOG_LEVEL", "debug")
    config = coordinator_args([])
    assert (config.port, config.host, config.workers, config.max_message_mb, config.heartbeat_seconds,
            config.lease_seconds, config.token, config.log_level) == (
        6001, "127.0.0.2", ["a:1", "b:2"], 300.0, 0.5, 4.0, "t", "DEBUG")
    assert coordinator_args(["--port", "7"]).port == 7  # a flag beats its variable
    monkeypatch.setenv("GRADPOOL_COORDINATOR", "c:9")
    monkeypatch.setenv("GRADPOOL_ADVERTISE", "me:5")
    monkeypatch.setenv("GRADPOOL_CAPACITY", "2.5")
    config = worker_args([])
    assert (config.coordinator, config.advertise, config.capacity, config.token) == ("c:9", "me:5", 2.5, "t")
    monkeypatch.setenv("GRADPOOL_LEASE_SECONDS", "0.1")
    with pytest.raises(SystemExit):
        coordinator_args([])  # a lease shorter than the heartbeat is refused


def test_a_call_cancelled_by_a_stopping_server_is_sent_again():
    """What a coordinator that is shutting down does to calls that reach it:
    gRPC ends them CANCELLED. A real gRPC server on localhost answers the first
    GetStatus that way; the SDK must retry it, not stop the training run."""
    from concurrent import futures

    class Stopping(pb_grpc.CoordinatorServicer):
        calls = 0

        def GetStatus(self, request, context):
            Stopping.calls += 1
            if Stopping.calls == 1:
                context.abort(grpc.StatusCode.CANCELLED, "server shutting down")
            return pb.StatusResponse(version="test")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CoordinatorServicer_to_server(Stopping(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=10) as client:
            assert client.status().version == "test"
        assert Stopping.calls == 2
        with Client(f"127.0.0.1:{port}", timeout=10, retry=RetryPolicy(attempts=1)) as client:
            Stopping.calls = 0
            with pytest.raises(ServiceError) as err:
                client.status()
            assert err.value.code == grpc.StatusCode.CANCELLED
    finally:
        server.stop(None)

