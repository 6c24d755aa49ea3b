"""Large messages as streams of frames: exact results with a small message
limit, and every malformed stream refused while the servers keep serving."""

from __future__ import annotations

from typing import Iterable

import time

import grpc
import numpy as np
import pytest

import gradpool as gp
from gradpool.protos import gradpool_pb2 as pb
from gradpool.protos import gradpool_pb2_grpc as pb_grpc
from gradpool.worker.engine import to_named
from gradpool.worker.engine.errors import CapacityError, InputError
from gradpool.worker.streams import from_frames, to_frames
from gradpool.worker.wire import Parts, read_request, request_parts, with_graph_id

MESSAGE_MB = 4  # far below the 8 MB of params below: only streams get through


def wide_model() -> gp.Graph:
    g = gp.Graph("wide")
    x = g.input("x", (1024,))
    y = g.input("y", (), dtype="int64")
    W = g.param("W", (1024, 2048))  # 8 MB of float32
    g.set_loss(gp.softmax_cross_entropy((x @ W).named("logits"), y).mean() + 1e-3 * (W ** 2).sum())
    return g


def frame(data: bytes = b"", total: int = 0) -> bytes:
    return pb.Frame(total_bytes=total, data=data).SerializeToString()


def test_frames_round_trip_and_refuse_lies() -> None:
    data = bytes(range(256)) * 1000
    frames = list(Parts().raw(data).frames(1000))
    assert len(frames) == 256 and pb.Frame.FromString(frames[0]).total_bytes == len(data)
    assert all(pb.Frame.FromString(f).data == data[i * 1000:(i + 1) * 1000] for i, f in enumerate(frames))
    assert bytes(from_frames(iter(frames), max_bytes=10**6)) == data
    with pytest.raises(InputError, match="ended after"):
        from_frames(iter(frames[:-1]), max_bytes=10**6)
    with pytest.raises(InputError, match="more than the"):
        from_frames(iter(frames + [frame(b"x")]), max_bytes=10**6)
    with pytest.raises(InputError, match="declares its size once"):
        from_frames(iter(frames[:1] + [frame(b"x", total=5)]), max_bytes=10**6)
    with pytest.raises(CapacityError, match="larger than"):
        from_frames(iter(frames), max_bytes=1000)
    with pytest.raises(InputError, match="empty stream"):
        from_frames(iter([]), max_bytes=1000)
    with pytest.raises(InputError, match="malformed"):
        from_frames(iter([b"\xff\xff"]), max_bytes=1000)
    assert bytes(from_frames(to_frames(b""), max_bytes=10)) == b""


def test_a_message_written_in_parts_is_what_protobuf_writes() -> None:
    """wire.py writes the .proto's format: protobuf reads it, and it reads protobuf's."""
    params = {"W": np.arange(12, dtype=np.float32).reshape(3, 4), "s": np.float64(2.5), "b": np.zeros(0)}
    inputs = {"x": np.arange(6, dtype=np.int64).reshape(3, 2)}
    message = with_graph_id("g1", request_parts("", params, inputs, "r1")[1]).join()
    parsed = pb.GradientsRequest.FromString(message)
    assert parsed.graph_id == "g1" and parsed.request_id == "r1"
    assert {p.name: tuple(p.tensor.shape) for p in parsed.params} == {"W": (3, 4), "s": (), "b": (0,)}
    assert parsed.inputs[0].tensor.data == inputs["x"].tobytes()
    back = read_request(parsed.SerializeToString())
    assert back.graph_id == "g1" and [n for n, _ in back.params] == ["W", "s", "b"]
    np.testing.assert_array_equal(back.params[0][1].array(), params["W"])
    assert back.params[1][1].array().shape == () and float(back.params[1][1].array()) == 2.5
    with pytest.raises(InputError, match="needs 48 bytes"):
        broken = pb.GradientsRequest()
        broken.CopyFrom(parsed)
        broken.params[0].tensor.data = b"short"
        read_request(broken.SerializeToString())


@pytest.fixture(scope="module")
def cluster():
    with gp.LocalCluster(workers=2, max_message_mb=MESSAGE_MB,
                         coordinator_args=["--stream-threshold-mb", "1", "--max-shard-mb", "1"]) as running:
        yield running


def over_bounds(graph: gp.Graph, params: dict, batch: dict, shards: Iterable[gp.ShardStat]) -> tuple[float, dict]:
    """In-process, the service's arithmetic over a result's own shard bounds."""
    bounds = [(s.start, s.start + s.examples) for s in shards]
    program, total = graph.program(), gp.worker.engine.OrderedSum(len(bounds))
    for index, (start, stop) in enumerate(bounds):
        part = program.run(params, {k: v[start:stop] for k, v in batch.items()}, global_batch=len(batch["y"]),
                           include_batch_independent=index == 0)
        total.add(index, part.loss, part.grads)
    return total.loss, total.grads


def test_messages_past_the_limit_travel_as_streams_and_stay_exact(cluster) -> None:
    """Streamed requests and shards, pipelined shards (--max-shard-mb 1: each
    worker's 1.2 MB share of the batch as two shards) and a resident dataset
    named by a streamed request: bitwise the in-process sums over the same bounds."""
    graph = wide_model()
    params = graph.init_params(0)
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(600, 1024)).astype(np.float32), "y": rng.integers(0, 2048, 600)}
    with gp.Client(cluster.address, timeout=120, max_message_mb=MESSAGE_MB, stream_threshold_mb=1) as service:
        result = service.gradients(graph, params, batch)
        assert len(result.shards) == 4 and len({s.worker for s in result.shards}) == 2  # pipelined
        loss, grads = over_bounds(graph, params, batch, result.shards)
        assert result.loss == loss and np.array_equal(result.grads["W"], grads["W"])
        logits = service.forward(graph, params, {"x": batch["x"]}, "logits")["logits"]
        np.testing.assert_array_equal(logits, gp.local_forward(graph, params, {"x": batch["x"]}, ["logits"])["logits"])
        ref = service.upload(batch)  # datasets travel in 4 MB chunks whatever their size
        rows = np.arange(0, 600, 2)
        result = service.gradients(graph, params, ref.take(rows))
        loss, grads = gp.local_gradients(graph, params, {k: v[rows] for k, v in batch.items()}, shards=2)
        assert result.loss == loss and np.array_equal(result.grads["W"], grads["W"])


def test_a_unary_message_past_the_limit_is_refused_and_a_bad_stream_too(cluster) -> None:
    graph = wide_model()
    params = graph.init_params(0)
    batch = {"x": np.zeros((2, 1024), np.float32), "y": np.zeros(2, np.int64)}
    with gp.Client(cluster.address, timeout=60, max_message_mb=MESSAGE_MB) as service:
        service.register(graph)
    request = pb.GradientsRequest(graph_id=graph.graph_id, params=to_named(params), inputs=to_named(batch))
    with grpc.insecure_channel(cluster.address, options=[("grpc.max_send_message_length", 64 * 2**20)]) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ComputeGradients(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        frames = [pb.Frame.FromString(f) for f in to_frames(request.SerializeToString())]
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ComputeGradientsStream(iter(frames[:-1]), timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ended after" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ComputeGradientsStream(iter([pb.Frame(total_bytes=100, data=b"\xff" * 100)]), timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in caught.value.details()
        answer = pb.GradientsResponse.FromString(b"".join(f.data for f in stub.ComputeGradientsStream(
            iter(frames), timeout=60)))
        loss, _ = gp.local_gradients(graph, params, batch)
        assert abs(answer.loss - loss) < 1e-6


def test_pipelined_shards_split_a_workers_share_and_stay_exact() -> None:
    """--max-shard-mb: each worker's share of an inline batch comes as several
    shards (the next transfers while one computes); the plan is fixed by the
    pool and the batch, so the sum is still bitwise reproducible."""
    g = gp.Graph("pipelined")
    x, y = g.input("x", (64,)), g.input("y", (), dtype="int64")
    g.set_loss(gp.softmax_cross_entropy(x @ g.param("W", (64, 10)), y).mean())
    params = g.init_params(0)
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(1000, 64)).astype(np.float32), "y": rng.integers(0, 10, 1000)}
    # 500 rows of 264 bytes per worker: pieces of at most 0.05 MB -> 3 shards each
    with gp.LocalCluster(workers=2, coordinator_args=["--max-shard-mb", "0.05"]) as running, \
            running.client(timeout=60) as service:
        first = service.gradients(g, params, batch)
        again = service.gradients(g, params, batch)
    assert len(first.shards) == 6 and len({s.worker for s in first.shards}) == 2
    assert [s.worker for s in first.shards[:3]] == [first.shards[0].worker] * 3
    loss, grads = gp.local_gradients(g, params, batch, shards=2)
    bounds = [(s.start, s.start + s.examples) for s in first.shards]
    program, total = g.program(), gp.worker.engine.OrderedSum(len(bounds))
    for index, (start, stop) in enumerate(bounds):
        part = program.run(params, {k: v[start:stop] for k, v in batch.items()}, global_batch=1000,
                           include_batch_independent=index == 0)
        total.add(index, part.loss, part.grads)
    assert first.loss == total.loss and np.array_equal(first.grads["W"], total.grads["W"])
    assert again.loss == first.loss and np.array_equal(again.grads["W"], first.grads["W"])
    np.testing.assert_allclose(first.grads["W"], grads["W"], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- requests read while they arrive

def streamed_request(graph: gp.Graph, params: dict, batch: dict, extra: "Parts | None" = None,
                     header_bytes: "int | None" = None) -> list[pb.Frame]:
    """A GradientsRequest's frames as the SDK writes them (header first, then the
    inputs, smallest first), optionally with more fields after and another header size."""
    _, body = request_parts("", params, batch, "r1")
    message = with_graph_id(graph.graph_id, body)
    if extra is not None:
        message.extend(extra)
    if header_bytes is not None:
        message.header_bytes = header_bytes
    return [pb.Frame.FromString(f) for f in message.frames(256 * 1024)]


def test_the_sdk_promises_the_order_and_puts_the_inputs_last_smallest_first() -> None:
    graph = wide_model()
    batch = {"x": np.ones((50, 1024), np.float32), "y": np.zeros(50, np.int64)}
    frames = streamed_request(graph, graph.init_params(0), batch)
    message = b"".join(f.data for f in frames)
    header = frames[0].header_bytes
    assert 0 < header < len(message) and frames[0].total_bytes == len(message)
    assert not any(f.header_bytes for f in frames[1:])
    head, rest = pb.GradientsRequest.FromString(message[:header]), pb.GradientsRequest.FromString(message[header:])
    assert head.graph_id == graph.graph_id and head.request_id == "r1" and len(head.params) == 1 and not head.inputs
    assert [i.name for i in rest.inputs] == ["y", "x"] and not rest.params and not rest.graph_id


def test_shards_start_while_the_rest_of_the_request_still_arrives(cluster) -> None:
    """The client stops sending before the last rows: the shards whose rows are
    in are computed meanwhile (a worker serves one), and the result is still
    bitwise the in-process sum over the same shard bounds."""
    import threading
    graph = wide_model()
    params = graph.init_params(0)
    rng = np.random.default_rng(1)
    batch = {"x": rng.normal(size=(600, 1024)).astype(np.float32), "y": rng.integers(0, 2048, 600)}
    with gp.Client(cluster.address, timeout=120, max_message_mb=MESSAGE_MB) as service:
        service.register(graph)
        served_before = sum(w.shards_served for w in service.status().workers)
        frames = streamed_request(graph, params, batch)
        resume, computed_while_paused = threading.Event(), []

        def client_stream():
            yield from frames[:-2]  # the last 0.5 MB of x held back: the first shards' rows are in
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not computed_while_paused:
                if sum(w.shards_served for w in service.status().workers) > served_before:
                    computed_while_paused.append(True)
                time.sleep(0.05)
            resume.wait(0)
            yield from frames[-2:]

        with grpc.insecure_channel(cluster.address, options=[("grpc.max_receive_message_length", 2**24)]) as channel:
            answer = pb.GradientsResponse.FromString(b"".join(
                f.data for f in pb_grpc.CoordinatorStub(channel).ComputeGradientsStream(client_stream(), timeout=60)))
    assert computed_while_paused, "no shard was computed before the whole request had arrived"
    loss, grads = over_bounds(graph, params, batch, [gp.ShardStat.from_proto(s) for s in answer.shards])
    grad = np.frombuffer(answer.grads[0].tensor.data, np.float32).reshape(1024, 2048)
    assert answer.loss == loss and np.array_equal(grad, grads["W"])


def test_a_request_that_breaks_its_promise_of_order_is_refused_and_the_coordinator_serves_on(cluster) -> None:
    graph = wide_model()
    params = graph.init_params(0)
    batch = {"x": np.ones((300, 1024), np.float32), "y": np.zeros(300, np.int64)}
    with gp.Client(cluster.address, timeout=60, max_message_mb=MESSAGE_MB) as service:
        service.register(graph)
    good = streamed_request(graph, params, batch)
    total = good[0].total_bytes
    cases = {
        "inputs inside the header_bytes": streamed_request(graph, params, batch, header_bytes=total),
        "field 4 after the header_bytes": streamed_request(graph, params, batch,
                                                           extra=Parts().bytes_field(4, b"late id")),
        "unknown input(s) ['z']": streamed_request(graph, params, batch, extra=Parts().named_tensor(
            3, "z", np.zeros(300, np.float32))),
        "input 'y' given twice": streamed_request(graph, params, batch, extra=Parts().named_tensor(
            3, "y", np.zeros(300, np.int64))),
        "ended after": good[:-1],  # cut off in the rows of x, after the first shards went out
        "declares a header of": [pb.Frame(total_bytes=total, header_bytes=total + 1, data=good[0].data),
                                 *good[1:]],
    }
    with grpc.insecure_channel(cluster.address, options=[("grpc.max_receive_message_length", 2**24)]) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        for expected, frames in cases.items():
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.ComputeGradientsStream(iter(frames), timeout=60))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (expected, caught.value.details())
            assert expected in caught.value.details(), (expected, caught.value.details())
        answer = pb.GradientsResponse.FromString(b"".join(
            f.data for f in stub.ComputeGradientsStream(iter(good), timeout=60)))
    loss, _ = gp.local_gradients(graph, params, batch)
    assert abs(answer.loss - loss) < 1e-6


def test_a_shards_input_data_starts_aligned_in_its_message() -> None:
    """The coordinator pads (Tensor.padding) so each input's rows start at a
    multiple of 16 bytes in the ShardRequest, which a worker then reads in
    place rather than copying; protobuf reads the message as ever."""
    from gradpool.worker.engine.signature import WireInput
    from gradpool.worker.wire import DATA_ALIGNMENT, read_shard_request, shard_request
    rng = np.random.default_rng(0)
    for n in (1, 3, 129, 4096):
        arrays = {"y": rng.integers(0, 9, n), "image": rng.normal(size=(n, 7, 3)).astype(np.float32),
                  "w": rng.normal(size=(n, 5))}
        inputs = [WireInput(name, to_named({name: a})[0].tensor.dtype, a.shape[1:], a[0].nbytes,
                            memoryview(a).cast("B")) for name, a in arrays.items()]
        for rows in ((0, n // 2), (n // 2, n)):
            header = pb.ShardRequest(graph_id="g" * 64, global_batch=n, example_offset=rows[0], seed=n)
            message = shard_request(header, inputs, rows, []).join()
            start = np.frombuffer(message, np.uint8).ctypes.data
            for name, tensor in read_shard_request(message).inputs:
                assert (tensor.array().ctypes.data - start) % DATA_ALIGNMENT == 0, (n, rows, name)
                np.testing.assert_array_equal(tensor.array(), arrays[name][rows[0]:rows[1]])
            parsed = pb.ShardRequest.FromString(message)
            assert [i.name for i in parsed.inputs] == list(arrays) and parsed.seed == n


class _EndedCall:
    """The servicer context of a call whose client already went away."""

    def __init__(self, active: bool) -> None:
        self.active, self.status = active, None

    def is_active(self) -> bool:
        return self.active

    def set_trailing_metadata(self, metadata) -> None:  # type: ignore[no-untyped-def]
        pass

    def abort(self, code, message) -> None:  # type: ignore[no-untyped-def]
        self.status = (code, message)


def test_a_request_stream_ending_under_its_handler_is_a_quiet_cancel(caplog: pytest.LogCaptureFixture) -> None:
    """A streamed shard the coordinator cancels (its client's stream broke off)
    makes the worker's request iterator raise: CANCELLED, and no error logged
    with a traceback; the same RpcError while the call is still live is a bug."""
    from gradpool.worker.rpc import translate_errors

    class Servicer:
        @translate_errors
        def RunShardStream(self, request_iterator, context):  # type: ignore[no-untyped-def]
            return from_frames(request_iterator, 2**20)

    def broken():
        yield frame(b"abc", total=10)
        raise grpc.RpcError()

    ended, live = _EndedCall(active=False), _EndedCall(active=True)
    with caplog.at_level("DEBUG", logger="gradpool.rpc"):
        Servicer().RunShardStream(broken(), ended)
    assert ended.status[0] == grpc.StatusCode.CANCELLED and "still arriving" in ended.status[1]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    with caplog.at_level("ERROR", logger="gradpool.rpc"):
        Servicer().RunShardStream(broken(), live)
    assert live.status[0] == grpc.StatusCode.INTERNAL and [r for r in caplog.records if r.levelname == "ERROR"]
