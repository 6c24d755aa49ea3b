"""Resident datasets over real processes: exact, uploaded once, re-sent when
evicted, and every bad upload or index refused with a clear status while the
servers keep serving."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest

import gradpool as gp
from gradpool.protos import gradpool_pb2 as pb
from gradpool.protos import gradpool_pb2_grpc as pb_grpc
from gradpool.worker.datasets import assemble, dataset_header, little_endian, upload_chunks
from gradpool.worker.engine import to_named
from gradpool.worker.engine.errors import CapacityError, InputError

from models import batch_for, params_for, softmax_mlp


def equal_grads(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def cluster():
    with gp.LocalCluster(workers=3) as running:
        yield running


@pytest.fixture()
def service(cluster):
    with cluster.client(timeout=60) as client:
        yield client


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_rows_of_a_resident_dataset_give_the_gradient_bitwise(cluster, service, workers: int) -> None:
    cluster.scale_to(workers)
    graph = softmax_mlp(dtype="float32")
    params, data = params_for(graph), batch_for(graph, 500)
    ref = service.upload(data)
    rng = np.random.default_rng(workers)
    for size in (1, 7, 64):
        indices = rng.integers(0, 500, size)  # repeats allowed: an example may be drawn twice
        result = service.gradients(graph, params, ref.take(indices))
        loss, grads = gp.local_gradients(graph, params, {k: v[indices] for k, v in data.items()},
                                         shards=len(result.shards))
        assert result.loss == loss and equal_grads(result.grads, grads)
        assert [s.examples for s in result.shards] == [b - a for a, b in
                                                        gp.worker.engine.shard_bounds(size, [1.0] * workers)]
    forward = service.forward(graph, params, ref.take([3, 1, 4]), "logits")
    expected = gp.local_forward(graph, params, {"x": data["x"][[3, 1, 4]]}, ["logits"])
    np.testing.assert_array_equal(forward["logits"], expected["logits"])


def test_a_dataset_is_sent_once_to_the_coordinator_and_to_each_worker(cluster, service) -> None:
    cluster.scale_to(2)
    graph = softmax_mlp()
    params, data = params_for(graph), batch_for(graph, 300)
    ref = service.upload(data)
    assert service.upload(dict(data)).dataset_id == ref.dataset_id  # same content, same id: nothing sent
    with cluster.client(timeout=30) as other:
        assert other.upload(data).dataset_id == ref.dataset_id  # another connection finds it resident
    for step in range(5):
        service.gradients(graph, params, ref.take(np.arange(step * 10, step * 10 + 40)))
    status = cluster.status()
    assert status.datasets_resident >= 1 and status.dataset_bytes >= ref.nbytes
    for address in cluster.worker_addresses:
        with grpc.insecure_channel(address) as channel:
            worker = pb_grpc.WorkerStub(channel).GetWorkerStatus(pb.WorkerStatusRequest(), timeout=10)
        assert worker.datasets_cached >= 1


def test_an_evicted_dataset_is_sent_again_transparently() -> None:
    """A coordinator and workers with room for one dataset: training on two
    in turn evicts each, and every step still returns the exact result."""
    graph = softmax_mlp()
    params = params_for(graph)
    first, second = batch_for(graph, 4000, seed=1), batch_for(graph, 4000, seed=2)
    megabytes = first["x"].nbytes * 1.5 / 2**20
    with gp.LocalCluster(workers=2, coordinator_args=["--dataset-cache-mb", str(megabytes)],
                         worker_args=["--dataset-cache-mb", str(megabytes)]) as cluster, \
            cluster.client(timeout=60) as service:
        refs = [service.upload(first), service.upload(second)]  # the second evicts the first
        for step in range(4):
            ref, data = (refs[0], first) if step % 2 == 0 else (refs[1], second)
            indices = np.arange(step, 4000, 37)
            result = service.gradients(graph, params, ref.take(indices))
            loss, grads = gp.local_gradients(graph, params, {k: v[indices] for k, v in data.items()}, shards=2)
            assert result.loss == loss and equal_grads(result.grads, grads)
        assert cluster.status().datasets_resident == 1


def test_the_trainer_uploads_its_data_once_on_a_remote_backend(cluster) -> None:
    cluster.scale_to(2)
    graph = softmax_mlp()
    data = batch_for(graph, 200)
    params = params_for(graph)
    remote = gp.Trainer(graph, gp.SGD(params, lr=0.1), params=params, backend=cluster.client(timeout=60),
                        batch_size=32, seed=0, progress=False)
    remote.fit(data, epochs=2)
    params_local = params_for(graph)
    local = gp.Trainer(graph, gp.SGD(params_local, lr=0.1), params=params_local, backend=gp.LocalBackend(shards=2),
                       batch_size=32, seed=0, progress=False)
    local.fit(data, epochs=2)
    assert equal_grads(remote.params, local.params)
    with cluster.client(timeout=10) as probe:  # the training data is resident: the steps sent indices
        assert probe._rpc.get_dataset(gp.DatasetRef.of(data).dataset_id).examples == 200


# ------------------------------------------------------------------ refusals

def test_sdk_refusals_are_input_errors(service) -> None:
    graph = softmax_mlp()
    data = batch_for(graph, 10)
    ref = gp.DatasetRef.of(data)
    with pytest.raises(InputError, match="row index 10 is out of range"):
        ref.take([0, 10])
    with pytest.raises(InputError, match="1-D integer array"):
        ref.take([[0, 1]])
    no_labels = gp.DatasetRef.of({"x": data["x"]})
    with pytest.raises(InputError, match=r"has no array for input\(s\) \['y'\]"):
        gp.local_gradients(graph, params_for(graph), no_labels.take([0]))
    with pytest.raises(InputError, match=r"has no array for input\(s\) \['y'\]"):
        service.gradients(graph, params_for(graph), no_labels.take([0]))
    bad_label = gp.DatasetRef.of({**data, "y": np.full(10, 9)})
    local = pytest.raises(InputError, match="has 9 at example 0")
    with local:
        gp.local_gradients(graph, params_for(graph), bad_label.take([2]))
    with pytest.raises(InputError, match="has 9 at example 0"):
        service.gradients(graph, params_for(graph), bad_label.take([2]))


def raw_upload(stub: pb_grpc.CoordinatorStub, chunks: list) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.UploadDataset(iter(chunks), timeout=20)
    return caught.value


def test_bad_uploads_and_rows_are_refused_and_the_servers_keep_serving(cluster, service) -> None:
    cluster.scale_to(1)
    graph = softmax_mlp()
    data = little_endian(batch_for(graph, 50))
    header = dataset_header(data)
    chunks = list(upload_chunks(header, data.values(), chunk_bytes=1000))
    with grpc.insecure_channel(cluster.address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        cases = {
            "cut off": (chunks[:-1], grpc.StatusCode.INVALID_ARGUMENT, "ended after"),
            "more than declared": (chunks + [pb.DatasetChunk(data=b"x")], grpc.StatusCode.INVALID_ARGUMENT,
                                   "more than the"),
            "content differs": (chunks[:1] + [pb.DatasetChunk(data=bytes(len(c.data))) for c in chunks[1:]],
                                grpc.StatusCode.INVALID_ARGUMENT, "does not match its id"),
            "no header": (chunks[1:], grpc.StatusCode.INVALID_ARGUMENT, "starts with a chunk carrying the header"),
            "two headers": (chunks[:1] + chunks, grpc.StatusCode.INVALID_ARGUMENT, "header once"),
            "empty stream": ([], grpc.StatusCode.INVALID_ARGUMENT, "header"),
        }
        for what, (sent, code, words) in cases.items():
            err = raw_upload(stub, sent)
            assert err.code() == code and words in err.details(), (what, err.details())
        # A declared size beyond the cache is refused before anything is allocated.
        huge = pb.DatasetHeader(dataset_id="0" * 64, arrays=[pb.ArraySpec(name="x", dtype=pb.FLOAT64,
                                                                           shape=[2**40, 1024])])
        err = raw_upload(stub, [pb.DatasetChunk(header=huge)])
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "more than the" in err.details()
        # Unknown dataset, rows out of range, rows and inputs together.
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetDataset(pb.GetDatasetRequest(dataset_id="f" * 64), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        service.register(graph)
        ref = service.upload(batch_for(graph, 50))
        request = pb.GradientsRequest(graph_id=graph.graph_id, params=to_named(params_for(graph)))
        request.rows.dataset_id = "f" * 64
        request.rows.indices.CopyFrom(gp.worker.engine.to_tensor(np.arange(3, dtype=np.int64)))
        with pytest.raises(grpc.RpcError) as caught:
            stub.ComputeGradients(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "not resident" in caught.value.details()
        request.rows.dataset_id = ref.dataset_id
        request.rows.indices.CopyFrom(gp.worker.engine.to_tensor(np.array([0, 50], dtype=np.int64)))
        with pytest.raises(grpc.RpcError) as caught:
            stub.ComputeGradients(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "row index 50 is out of range" in caught.value.details()
        request.rows.indices.CopyFrom(gp.worker.engine.to_tensor(np.array([0.5])))
        with pytest.raises(grpc.RpcError) as caught:
            stub.ComputeGradients(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "INT64" in caught.value.details()
    # Still serving, exactly.
    indices = np.arange(0, 50, 3)
    result = service.gradients(graph, params_for(graph), ref.take(indices))
    loss, grads = gp.local_gradients(graph, params_for(graph), {k: v[indices] for k, v in
                                                               batch_for(graph, 50).items()})
    assert math.isclose(result.loss, loss, rel_tol=1e-12)


def test_assemble_checks_before_allocating() -> None:
    data = little_endian({"x": np.arange(12.0).reshape(6, 2)})
    header = dataset_header(data)
    dataset = assemble(upload_chunks(header, data.values(), chunk_bytes=7), max_bytes=1000)
    np.testing.assert_array_equal(dataset.arrays["x"], data["x"])
    assert not dataset.arrays["x"].flags.writeable
    with pytest.raises(CapacityError):
        assemble(upload_chunks(header, data.values()), max_bytes=10)
    with pytest.raises(InputError, match="disagree on the number of examples"):
        dataset_header(little_endian({"x": np.zeros((3, 1)), "y": np.zeros(4)}))
