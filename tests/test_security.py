"""The security issue's attacks, each against real processes: who may join the
pool (roles), worker identity (lease secrets), capacity bounds, and TLS/mTLS
on every port. Each of these succeeded (or could not even be configured)
before roles, lease secrets, the capacity bound and TLS existed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradpool as gp
from gradpool.cluster import LocalCluster
from gradpool.protos import gradpool_pb2 as pb
from gradpool.protos import gradpool_pb2_grpc as pb_grpc
from gradpool.remote import Client, RetryPolicy, ServiceError
from gradpool.worker.rpc import COORDINATOR, METHOD_ROLES, CLIENT, WORKER, TlsConfig, method_path

from models import batch_for, params_for, softmax_mlp

CLIENT_TOKEN = "client-secret"
WORKER_TOKEN = "worker-secret"
ONCE = RetryPolicy(attempts=1)


def bearer(token):
    return (("authorization", f"Bearer {token}"),) if token else ()


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=10, **kwargs)
    return caught.value.code()


def assert_matches_local(result, graph, params, batch):
    loss, grads = result
    want_loss, want = gp.local_gradients(graph, params, batch)
    assert loss == pytest.approx(want_loss, rel=1e-10)
    for name in want:
        np.testing.assert_allclose(grads[name], want[name], rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    gp.make_dev_certs(directory)
    return directory


# ------------------------------------------------------------------ roles


@pytest.fixture(scope="module")
def tokens_cluster():
    with LocalCluster(workers=1, token=CLIENT_TOKEN, worker_token=WORKER_TOKEN) as running:
        yield running


def fake_registration(capacity=1e300, worker_id="fake", address="127.0.0.1:1"):
    return pb.RegisterWorkerRequest(address=address, capacity=capacity, worker_id=worker_id)


def test_a_fake_worker_needs_the_worker_token_to_join(tokens_cluster):
    """The attack: a fake worker registered with capacity 1e300 got another client's batch."""
    stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(tokens_cluster.address))
    assert code_of(stub.RegisterWorker, fake_registration()) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(stub.RegisterWorker, fake_registration(), metadata=bearer("guess")) == \
        grpc.StatusCode.UNAUTHENTICATED
    # The client token lets a client submit work, not join the pool.
    assert code_of(stub.RegisterWorker, fake_registration(), metadata=bearer(CLIENT_TOKEN)) == \
        grpc.StatusCode.PERMISSION_DENIED
    for call, request in ((stub.Heartbeat, pb.HeartbeatRequest(worker_id="fake")),
                          (stub.DeregisterWorker, pb.DeregisterWorkerRequest(worker_id="fake"))):
        assert code_of(call, request, metadata=bearer(CLIENT_TOKEN)) == grpc.StatusCode.PERMISSION_DENIED
    # So the batch goes to the real worker only, and the gradients are exact.
    graph = softmax_mlp()
    params, batch = params_for(graph), batch_for(graph, 64)
    with tokens_cluster.client(timeout=30) as service:
        result = service.gradients(graph, params, batch)
        assert [w.address for w in service.status().workers] == tokens_cluster.worker_addresses
    assert [s.examples for s in result.shards] == [64]
    assert_matches_local(result, graph, params, batch)


def test_a_worker_token_cannot_submit_work(tokens_cluster):
    graph = softmax_mlp()
    with Client(tokens_cluster.address, token=WORKER_TOKEN, timeout=10, retry=ONCE) as impostor:
        for call in (impostor.status, lambda: impostor.gradients(graph, params_for(graph), batch_for(graph, 4))):
            with pytest.raises(ServiceError) as caught:
                call()
            assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_clients_cannot_call_workers_directly(tokens_cluster):
    """The attack: RunShard and LoadGraph straight to a worker, bypassing the coordinator."""
    channel = grpc.insecure_channel(tokens_cluster.worker_addresses[0])
    run_shard = channel.unary_unary(method_path("Worker", "RunShard"), request_serializer=None,
                                    response_deserializer=None)
    stub = pb_grpc.WorkerStub(channel)
    graph = softmax_mlp()
    load = pb.LoadGraphRequest(graph_id=graph.graph_id, graph=graph.to_proto())
    shard = pb.ShardRequest(graph_id="x").SerializeToString()
    for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), (CLIENT_TOKEN, grpc.StatusCode.UNAUTHENTICATED)):
        assert code_of(run_shard, shard, metadata=bearer(token)) == code
        assert code_of(stub.LoadGraph, load, metadata=bearer(token)) == code
        assert code_of(stub.GetWorkerStatus, pb.WorkerStatusRequest(), metadata=bearer(token)) == code
    # The coordinator's credential (the worker token unless a dedicated one is set) is let through.
    assert stub.GetWorkerStatus(pb.WorkerStatusRequest(), timeout=10, metadata=bearer(WORKER_TOKEN)).worker_id


def test_a_dedicated_coordinator_token_keeps_workers_from_calling_each_other():
    with LocalCluster(workers=1, token=CLIENT_TOKEN, worker_token=WORKER_TOKEN,
                      coordinator_token="coordinator-secret") as cluster:
        stub = pb_grpc.WorkerStub(grpc.insecure_channel(cluster.worker_addresses[0]))
        assert code_of(stub.GetWorkerStatus, pb.WorkerStatusRequest(), metadata=bearer(WORKER_TOKEN)) == \
            grpc.StatusCode.UNAUTHENTICATED
        graph = softmax_mlp()
        params, batch = params_for(graph), batch_for(graph, 8)
        with cluster.client(timeout=30) as service:
            assert_matches_local(service.gradients(graph, params, batch), graph, params, batch)


def test_every_rpc_has_its_roles():
    for service, role in (("Coordinator", None), ("Worker", {COORDINATOR})):
        for method in pb.DESCRIPTOR.services_by_name[service].methods:
            roles = METHOD_ROLES[method_path(service, method.name)]
            if role:
                assert roles == role
            else:
                expected = {WORKER} if method.name in ("RegisterWorker", "Heartbeat", "DeregisterWorker") else {CLIENT}
                assert roles == expected, method.name


# ------------------------------------------------------------------ worker identity and capacity


@pytest.fixture(scope="module")
def open_cluster():
    """The default dev mode (no tokens): lease secrets and capacity bounds still apply."""
    with LocalCluster(workers=1) as running:
        yield running


def victim(cluster):
    [worker] = cluster.status().workers
    return worker


def test_registering_under_a_live_workers_id_is_refused(open_cluster):
    """The attack: RegisterWorker with a live worker's id replaced it for good."""
    before = victim(open_cluster)
    stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(open_cluster.address))
    for secret in ("", "guessed"):
        request = pb.RegisterWorkerRequest(address="127.0.0.1:1", capacity=1.0, worker_id=before.worker_id,
                                           lease_secret=secret)
        assert code_of(stub.RegisterWorker, request) == grpc.StatusCode.PERMISSION_DENIED
    # Nor can a new id take the live worker's address.
    taken = pb.RegisterWorkerRequest(address=before.address, capacity=1.0, worker_id="squatter")
    assert code_of(stub.RegisterWorker, taken) == grpc.StatusCode.PERMISSION_DENIED
    after = victim(open_cluster)
    assert (after.worker_id, after.address, after.state) == (before.worker_id, before.address, "live")


def test_a_foreign_deregistration_or_heartbeat_is_refused(open_cluster):
    """The attack: repeated DeregisterWorker calls for live workers made client calls fail."""
    target = victim(open_cluster).worker_id
    stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(open_cluster.address))
    for _ in range(5):
        assert code_of(stub.DeregisterWorker, pb.DeregisterWorkerRequest(worker_id=target)) == \
            grpc.StatusCode.PERMISSION_DENIED
    assert code_of(stub.Heartbeat, pb.HeartbeatRequest(worker_id=target, lease_secret="x")) == \
        grpc.StatusCode.PERMISSION_DENIED
    graph = softmax_mlp()
    params, batch = params_for(graph), batch_for(graph, 16)
    with open_cluster.client(timeout=30, retry=ONCE) as service:
        for _ in range(7):
            assert_matches_local(service.gradients(graph, params, batch), graph, params, batch)
    assert victim(open_cluster).state == "live"


def test_a_registration_is_renewed_and_ended_with_its_own_lease_secret(open_cluster):
    stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(open_cluster.address))
    # An address nothing listens on: the coordinator never gets to use it.
    joined = stub.RegisterWorker(pb.RegisterWorkerRequest(address="127.0.0.1:9", capacity=1.0, worker_id="mine"),
                                 timeout=10)
    assert len(joined.lease_secret) >= 32
    try:
        assert stub.Heartbeat(pb.HeartbeatRequest(worker_id="mine", lease_secret=joined.lease_secret),
                              timeout=10).known
        again = stub.RegisterWorker(pb.RegisterWorkerRequest(address="127.0.0.1:9", capacity=2.0, worker_id="mine",
                                                             lease_secret=joined.lease_secret), timeout=10)
        assert again.lease_secret == joined.lease_secret
    finally:
        stub.DeregisterWorker(pb.DeregisterWorkerRequest(worker_id="mine", lease_secret=joined.lease_secret),
                              timeout=10)
    assert not stub.Heartbeat(pb.HeartbeatRequest(worker_id="mine", lease_secret=joined.lease_secret),
                              timeout=10).known


@pytest.mark.parametrize("capacity", [1e308, 1e300, float("inf"), float("nan"), 0.0, -1.0, 1e6 * 1.5])
def test_a_capacity_out_of_bounds_is_refused_at_registration(open_cluster, capacity):
    """The attack: capacity 1e308 made every client call fail with INTERNAL (OverflowError)."""
    stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(open_cluster.address))
    request = pb.RegisterWorkerRequest(address="127.0.0.1:9", capacity=capacity, worker_id=f"big-{capacity}")
    assert code_of(stub.RegisterWorker, request) == grpc.StatusCode.INVALID_ARGUMENT
    graph = softmax_mlp()
    params, batch = params_for(graph), batch_for(graph, 8)
    with open_cluster.client(timeout=30, retry=ONCE) as service:
        assert_matches_local(service.gradients(graph, params, batch), graph, params, batch)


# ------------------------------------------------------------------ TLS


def cli(*args, env=None):
    base = {k: v for k, v in os.environ.items() if not k.startswith("GRADPOOL_")}
    return subprocess.run([sys.executable, "-m", "gradpool.cli", *args], capture_output=True, text=True,
                          timeout=60, env={**base, **(env or {})})


def test_tls_on_every_port_and_plaintext_is_refused(certs):
    graph = softmax_mlp()
    params, batch = params_for(graph), batch_for(graph, 24)
    with LocalCluster(workers=2, tls=certs, token=CLIENT_TOKEN) as cluster:
        with cluster.client(timeout=30) as service:
            result = service.gradients(graph, params, batch)
            assert len(result.shards) == 2
            assert_matches_local(result, graph, params, batch)
        with Client(cluster.address, token=CLIENT_TOKEN, tls=certs, timeout=30) as from_folder:
            assert len(from_folder.status().live_workers) == 2
        # Plaintext against a TLS port: no answer, on the coordinator's and the workers' ports.
        with Client(cluster.address, token=CLIENT_TOKEN, timeout=5, retry=ONCE) as plain:
            with pytest.raises(gp.ServiceUnavailable):
                plain.status()
        for address in (cluster.address, *cluster.worker_addresses):
            health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
            assert code_of(health.Check, health_pb2.HealthCheckRequest()) == grpc.StatusCode.UNAVAILABLE
        # A CA that did not sign the server's certificate is refused too.
        with Client(cluster.address, token=CLIENT_TOKEN, timeout=5, retry=ONCE, tls=True) as wrong_ca:
            with pytest.raises(gp.ServiceUnavailable):
                wrong_ca.status()
        # Health checks keep working under TLS, with the CA.
        for address in (cluster.address, *cluster.worker_addresses):
            probe = cli("health", address, "--tls-ca", str(certs / "ca.pem"))
            assert probe.returncode == 0 and "SERVING" in probe.stdout, probe.stderr
        status = cli("status", "--coordinator", cluster.address, "--json",
                     env={"GRADPOOL_TLS_CA": str(certs / "ca.pem"), "GRADPOOL_TOKEN": CLIENT_TOKEN})
        assert status.returncode == 0, status.stderr


def test_mtls_refuses_a_connection_without_a_client_certificate(certs):
    graph = softmax_mlp()
    params, batch = params_for(graph), batch_for(graph, 12)
    with LocalCluster(workers=1, tls=certs, mtls=True) as cluster:
        with cluster.client(timeout=30) as service:
            assert_matches_local(service.gradients(graph, params, batch), graph, params, batch)
        no_cert = TlsConfig(ca=str(certs / "ca.pem"))
        with Client(cluster.address, timeout=5, retry=ONCE, tls=no_cert) as anonymous:
            with pytest.raises(gp.ServiceUnavailable):
                anonymous.status()
        for address in (cluster.address, *cluster.worker_addresses):
            health = health_pb2_grpc.HealthStub(grpc.secure_channel(address, no_cert.channel_credentials()))
            assert code_of(health.Check, health_pb2.HealthCheckRequest()) == grpc.StatusCode.UNAVAILABLE
            files = ["--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(certs / "client.pem"),
                     "--tls-key", str(certs / "client-key.pem")]
            assert cli("health", address, *files).returncode == 0
            assert cli("health", address, "--tls-ca", str(certs / "ca.pem")).returncode == 1


def test_gradpool_certs_writes_a_ca_and_certificates(tmp_path):
    result = cli("certs", str(tmp_path / "certs"), "--host", "gp.example.org")
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "certs").iterdir())
    assert names == sorted(f"{n}{s}.pem" for n in ("ca", "coordinator", "worker", "client") for s in ("", "-key"))
    for name in ("ca-key", "coordinator-key", "worker-key", "client-key"):
        assert stat.S_IMODE((tmp_path / "certs" / f"{name}.pem").stat().st_mode) == 0o600
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "worker.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "coordinator", "worker", "gp.example.org"} <= set(names.get_values_for_type(x509.DNSName))
