"""The compact wire (`wire_dtype="bfloat16" | "float16"`): the codec against
exact references, and the service end to end on a real LocalCluster, bitwise
against an in-process reference that rounds where the wire rounds.
"""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest

import gradpool as gp
from gradpool.cluster import LocalCluster
from gradpool.local import checked_arrays
from gradpool.protos import gradpool_pb2 as pb
from gradpool.protos import gradpool_pb2_grpc as pb_grpc
from gradpool.worker import wire
from gradpool.worker.engine import OrderedSum, graph_id, shard_bounds, to_named
from gradpool.worker.engine.tensors import (EXACT, WIRE_DTYPE_ENUMS, compact, expand, round_through, wire_dtype,
                                            wire_dtype_field)

from models import batch_for, params_for, softmax_mlp

BF16, F16 = pb.BFLOAT16, pb.FLOAT16

# ---------------------------------------------------------------- the codec


def f32_bits(values) -> np.ndarray:
    return np.asarray(values, np.float32).view(np.uint32)


def bf16_reference(bits32: np.ndarray) -> np.ndarray:
    """bfloat16 bits of finite float32 values given by their bits, by the
    definition: of the two bfloat16 neighbours (the truncation, and one up in
    magnitude) take the nearer, on a tie the even one. The gaps are exact in
    float64. One up from the largest finite is inf, at the distance 2^128 would be."""
    bits32 = np.asarray(bits32, np.uint32)
    low = bits32 >> 16
    high = low + 1
    magnitude = np.abs(bits32.view(np.float32).astype(np.float64))
    below = np.abs((low << 16).view(np.float32).astype(np.float64))
    above = np.abs((high << 16).view(np.float32).astype(np.float64))
    above = np.where(np.isinf(above), 2.0**128, above)
    up_gap, down_gap = above - magnitude, magnitude - below
    pick_up = (up_gap < down_gap) | ((up_gap == down_gap) & (low & 1 == 1))
    return np.where(pick_up, high, low).astype(np.uint16)


def f16_reference(value: float) -> int:
    """float16 bits by Python's own packer (round to nearest even from the exact double)."""
    try:
        return struct.unpack("<H", struct.pack("<e", value))[0]
    except OverflowError:  # past the largest half (after rounding): IEEE overflow gives inf
        return 0x7C00 if value > 0 else 0xFC00


def test_bfloat16_decodes_every_pattern_exactly():
    patterns = np.arange(2**16, dtype=np.uint16)
    decoded = expand(patterns, BF16, np.float32)
    expected = (patterns.astype(np.uint32) << 16).view(np.float32)
    assert decoded.dtype == np.float32
    assert decoded.view(np.uint32).tobytes() == expected.view(np.uint32).tobytes()  # NaNs too, bit for bit
    assert expand(patterns, BF16, np.float64)[~np.isnan(expected)].tolist() == \
        expected[~np.isnan(expected)].astype(np.float64).tolist()


def test_bfloat16_encodes_every_bfloat16_value_to_itself_and_keeps_nans_nan():
    patterns = np.arange(2**16, dtype=np.uint16)
    values = (patterns.astype(np.uint32) << 16).view(np.float32)
    encoded = compact(values, BF16)
    finite_or_inf = ~np.isnan(values)
    assert np.array_equal(encoded[finite_or_inf], patterns[finite_or_inf])
    nan_codes = encoded[~finite_or_inf]
    assert np.isnan(expand(nan_codes, BF16, np.float32)).all()
    assert np.array_equal(nan_codes >> 15, patterns[~finite_or_inf] >> 15)  # the sign kept


def test_bfloat16_rounds_random_float32_to_nearest_even():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=400_000, dtype=np.uint64).astype(np.uint32)
    # Ties and near-ties in every binade: low halves 0x7FFF, 0x8000, 0x8001.
    ties = (bits[:30_000] & 0xFFFF0000) | np.array([0x7FFF, 0x8000, 0x8001], np.uint32).repeat(10_000)
    bits = np.concatenate([bits, ties, np.array([0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7F8000], np.uint32)])
    values = bits.view(np.float32)
    keep = np.isfinite(values)  # inf and NaN: test_bfloat16_special_values
    assert np.array_equal(compact(values[keep], BF16), bf16_reference(bits[keep]))


@pytest.mark.parametrize("bits, expected", [
    (0x3F808000, 0x3F80),  # 1 + 2^-8: a tie, to the even 1.0
    (0x3F818000, 0x3F82),  # 1 + 3 * 2^-8: a tie, to the even 0x3F82
    (0x3F808001, 0x3F81),  # just past the tie: up
    (0xBF808000, 0xBF80),  # negative ties too
    (0x00000001, 0x0000),  # the smallest float32 subnormal: below half a bfloat16 ulp
    (0x00008000, 0x0000),  # subnormal tie, to even (zero)
    (0x00018000, 0x0002),  # subnormal tie, to even
    (0x0000C000, 0x0001),  # subnormal, above the tie
    (0x007FFFFF, 0x0080),  # the largest subnormal rounds up to the smallest normal
    (0x80000000, 0x8000),  # negative zero keeps its sign
    (0x7F800000, 0x7F80),  # inf
    (0xFF800000, 0xFF80),  # -inf
    (0x7F7F8000, 0x7F80),  # half an ulp past the largest finite: a tie to even, which is inf
    (0x7F7F7FFF, 0x7F7F),  # just below: the largest finite
    (0x7FC00000, 0x7FC0),  # quiet NaN
    (0x7F800001, 0x7FC0),  # a signalling NaN whose payload rounds away stays NaN
    (0xFFFFFFFF, 0xFFFF),  # a NaN that would wrap around stays NaN, sign kept
    (0x7FFFFFFF, 0x7FFF),
])
def test_bfloat16_special_values(bits, expected):
    encoded = compact(np.array([bits], np.uint32).view(np.float32), BF16)
    assert encoded.dtype == np.dtype("<u2") and int(encoded[0]) == expected


def test_float16_matches_pythons_packer_and_decodes_exactly():
    patterns = np.arange(2**16, dtype=np.uint16)
    decoded = expand(patterns.view("<f2"), F16, np.float64)
    expected = [struct.unpack("<e", struct.pack("<H", int(p)))[0] for p in patterns]
    assert np.array_equal(decoded, np.array(expected), equal_nan=True)
    rng = np.random.default_rng(1)
    values = np.concatenate([
        rng.standard_normal(20_000) * 10.0 ** rng.integers(-9, 6, 20_000),  # subnormal .. overflow
        np.array([65504, 65519.99, 65520, -65520, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2049, 2051, 1 + 2.0**-11])
    ]).astype(np.float32)
    encoded = compact(values, F16).view(np.uint16)
    assert encoded.tolist() == [f16_reference(float(v)) for v in values]
    assert compact(np.array([-0.0, np.inf, -np.inf, np.nan], np.float32), F16).view(np.uint16).tolist()[:3] == \
        [0x8000, 0x7C00, 0xFC00]
    assert np.isnan(expand(compact(np.array([np.nan], np.float32), F16), F16, np.float32)).all()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # 1e300 in the reference's own cast
@pytest.mark.parametrize("wire", [BF16, F16])
def test_float64_goes_through_float32(wire):
    # Just above a bfloat16 (and float16) tie by less than float32 resolves:
    # rounding float64 directly would go up; through float32 it is a tie, to even.
    value = np.array([1 + 2.0**-8 + 2.0**-30, 1 + 2.0**-11 + 2.0**-30, -3.3e-5, 1e300, 7.0], np.float64)
    assert np.array_equal(compact(value, wire), compact(value.astype(np.float32), wire))
    if wire == BF16:
        assert int(compact(value, wire)[0]) == 0x3F80
    else:
        assert float(expand(compact(value, wire), wire, np.float64)[1]) == 1.0
    through = round_through(value, wire)
    assert through.dtype == np.float64
    assert np.array_equal(through, expand(compact(value.astype(np.float32), wire), wire, np.float64))


@pytest.mark.parametrize("wire", [BF16, F16])
def test_codec_shapes_layouts_and_refusals(wire):
    scalar = compact(np.float32(1.5), wire)
    for dtype in (np.float32, np.float64):
        back = expand(scalar, wire, dtype)
        assert isinstance(back, np.ndarray) and back.shape == () and back.dtype == dtype and float(back) == 1.5
    big = np.random.default_rng(2).standard_normal(3 * 2**16 + 5).astype(np.float32)  # several encoder chunks
    big[[0, 2**16, 2**17 + 7]] = np.nan
    encoded = compact(big, wire)
    assert np.array_equal(expand(encoded, wire, np.float32), round_through(big, wire), equal_nan=True)
    assert np.isnan(expand(encoded, wire, np.float32)[[0, 2**16, 2**17 + 7]]).all()
    strided = np.arange(24, dtype=np.float64).reshape(4, 6).T[::2]  # not contiguous
    encoded = compact(strided, wire)
    assert encoded.shape == strided.shape and encoded.flags.c_contiguous
    assert np.array_equal(expand(encoded, wire, np.float64), strided)  # small integers are exact in both
    assert compact(np.zeros((0, 3), np.float32), wire).shape == (0, 3)
    with pytest.raises(gp.InputError, match="only float tensors"):
        compact(np.arange(3), wire)


def test_wire_dtype_names_and_fields():
    assert wire_dtype(None) == EXACT
    assert wire_dtype("bfloat16") == BF16 and wire_dtype("float16") == F16
    assert WIRE_DTYPE_ENUMS == {"float16": 6, "bfloat16": 7}
    for bad in ("fp8", "float32", "BFLOAT16", 7, True):
        with pytest.raises(gp.InputError, match="wire_dtype must be None"):
            wire_dtype(bad)
    assert [wire_dtype_field(v) for v in (0, 6, 7)] == [0, 6, 7]
    with pytest.raises(gp.InputError, match="wire_dtype FLOAT32 is not a compact encoding"):
        wire_dtype_field(pb.FLOAT32)
    with pytest.raises(gp.InputError, match="wire_dtype 99 is not a compact encoding"):
        wire_dtype_field(99)


def test_compact_messages_are_protobufs_wire_format():
    """What wire.py writes compact is what protobuf reads, and back."""
    params = {"W": np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float64)}
    inputs = {"x": np.full((2, 3), 0.1, np.float32)}
    header, body = wire.request_parts("g", params, inputs, "r1", wire_dtype=BF16)
    parsed = pb.GradientsRequest.FromString(header.extend(body).join())
    assert parsed.wire_dtype == BF16
    assert [(p.name, p.tensor.dtype, list(p.tensor.shape), len(p.tensor.data)) for p in parsed.params] == \
        [("W", BF16, [3, 4], 24), ("b", BF16, [4], 8)]
    assert parsed.inputs[0].tensor.dtype == pb.FLOAT32  # inputs stay exact
    view = wire.read_request(parsed.SerializeToString())
    assert view.wire_dtype == BF16
    (name, tensor), _ = view.params
    assert tensor.compact == BF16 and tensor.dtype_name == "bfloat16"
    assert np.array_equal(tensor.values(np.float32), round_through(params["W"], BF16))
    exact = wire.read_request(wire.with_graph_id("g", wire.request_parts("g", params, inputs, "r1")[1]).join())
    assert exact.wire_dtype == EXACT and exact.params[0][1].compact == EXACT
    response = wire.gradients_response(1.5, params, 2, [], 0.1, wire=F16).join()
    parsed_response = pb.GradientsResponse.FromString(response)
    assert [g.tensor.dtype for g in parsed_response.grads] == [F16, F16]
    shard = pb.ShardRequest(wire_dtype=BF16, global_batch=3)
    assert wire.read_shard_request(shard.SerializeToString()).wire_dtype == BF16


# ---------------------------------------------------------------- the service

@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(workers=3) as running:
        yield running


@pytest.fixture(scope="module")
def service(cluster):
    with cluster.client(timeout=60) as client:
        yield client


def compact_reference(graph: gp.Graph, params, batch, shards: int, wire_enum: int):
    """The service's arithmetic with a compact wire, in-process: params rounded
    through the encoding, each shard run as local_gradients(shards=k) runs it,
    each shard's gradient rounded through the encoding and summed in shard
    order (in the params' dtypes), and the sum rounded again for the reply."""
    program = graph.program()
    params, batch, examples = checked_arrays(graph, params, batch)
    params = {name: round_through(value, wire_enum) for name, value in params.items()}
    bounds = shard_bounds(examples, [1.0] * shards) or [(0, examples)]
    total = OrderedSum(len(bounds))
    for index, (start, stop) in enumerate(bounds):
        piece = {name: value[start:stop] for name, value in batch.items()}
        result = program.run(params, piece, global_batch=examples, include_batch_independent=index == 0)
        total.add(index, result.loss, {name: round_through(g, wire_enum) for name, g in result.grads.items()})
    assert total.grads is not None
    return total.loss, {name: round_through(g, wire_enum) for name, g in total.grads.items()}


@pytest.mark.parametrize("source", ["inline", "dataset"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_compact_gradients_equal_the_rounded_sharded_reference_bitwise(cluster, name, dtype, source):
    cluster.scale_to(3)
    graph = softmax_mlp(dtype=dtype)  # with an L2 term: cut edges, counted on the first shard only
    params, batch = params_for(graph, seed=3), batch_for(graph, 64, seed=3)
    loss, grads = compact_reference(graph, params, batch, 3, WIRE_DTYPE_ENUMS[name])
    with cluster.client(timeout=60, wire_dtype=name) as client:
        sent = client.upload(batch).take(np.arange(64)) if source == "dataset" else batch
        for _ in range(2):  # and reproducibly so
            result = client.gradients(graph, params, sent)
            assert result.loss == loss
            assert sorted(result.grads) == sorted(grads)
            for param, expected in grads.items():
                assert result.grads[param].dtype == np.dtype(dtype) and result.grads[param].flags.writeable
                assert result.grads[param].tobytes() == expected.tobytes(), param
    # It is not exact, and it is close: the compact encodings' precision.
    exact_loss, exact = gp.local_gradients(graph, params, batch, shards=3)
    tolerance = {"bfloat16": 2.0**-7, "float16": 2.0**-9}[name]
    assert loss != exact_loss
    for param, value in exact.items():
        scale = np.abs(value).max()
        np.testing.assert_allclose(result.grads[param], value, atol=4 * tolerance * scale, rtol=0)


def test_a_per_call_wire_dtype_overrides_the_clients_and_the_default_stays_exact(cluster, service):
    cluster.scale_to(3)
    graph = softmax_mlp(dtype="float32")
    params, batch = params_for(graph, seed=5), batch_for(graph, 48, seed=5)
    exact_loss, exact = gp.local_gradients(graph, params, batch, shards=3)
    compact_loss, compacted = compact_reference(graph, params, batch, 3, BF16)
    with cluster.client(timeout=60, wire_dtype="bfloat16") as compact_client:
        for result, (loss, grads) in [(service.gradients(graph, params, batch), (exact_loss, exact)),
                                      (compact_client.gradients(graph, params, batch, wire_dtype=None),
                                       (exact_loss, exact)),
                                      (service.gradients(graph, params, batch, wire_dtype="bfloat16"),
                                       (compact_loss, compacted)),
                                      (compact_client.gradients(graph, params, batch), (compact_loss, compacted))]:
            assert result.loss == loss
            assert all(result.grads[k].tobytes() == grads[k].tobytes() for k in grads)
        # forward ignores wire_dtype: exact values
        out = compact_client.forward(graph, params, batch, "logits")["logits"]
        assert out.tobytes() == gp.local_forward(graph, params, batch, "logits")["logits"].tobytes()


def big_params_model(megabytes: int = 4) -> gp.Graph:
    g = gp.Graph(f"wire_{megabytes}mb")
    x = g.input("x", (1,))
    W = g.param("W", (megabytes * 2**20 // 4,), init="zeros")
    g.set_loss(x.mean() + (W * W * 0.5).sum())
    return g


def test_the_compact_wire_halves_the_bytes_both_ways(cluster, service):
    """The serialized request and response, measured on the raw call the SDK makes."""
    cluster.scale_to(1)
    graph = big_params_model()
    service.register(graph)
    params = {"W": np.random.default_rng(0).standard_normal(2**20).astype(np.float32)}
    batch = {"x": np.ones((4, 1), np.float32)}
    call = grpc.insecure_channel(cluster.address, options=[("grpc.max_receive_message_length", 64 * 2**20),
                                                           ("grpc.max_send_message_length", 64 * 2**20)]).unary_unary(
        "/gradpool.v1.Coordinator/ComputeGradients", request_serializer=None, response_deserializer=None)
    sizes = {}
    for wire_enum in (EXACT, BF16, F16):
        header, body = wire.request_parts(graph.graph_id, params, batch, "r", wire_dtype=wire_enum)
        request = header.extend(body).join()
        response = call(request, timeout=60)
        sizes[wire_enum] = (len(request), len(response))
        grads = wire.read_gradients_response(response).grads
        assert grads[0][1].compact == wire_enum
        assert np.array_equal(grads[0][1].values(np.float32), round_through(round_through(params["W"], wire_enum),
                                                                            wire_enum))
    for wire_enum in (BF16, F16):
        for exact_bytes, compact_bytes in zip(sizes[EXACT], sizes[wire_enum]):
            assert exact_bytes > 4 * 2**20 and compact_bytes < exact_bytes / 2 + 256, sizes


def _raw_request(graph, **fields) -> pb.GradientsRequest:
    params, batch = params_for(graph), batch_for(graph, 6)
    return pb.GradientsRequest(graph_id=graph.graph_id, params=to_named(params), inputs=to_named(batch), **fields)


def test_bad_wire_dtypes_are_refused_clearly_and_the_servers_keep_serving(cluster, service):
    cluster.scale_to(1)
    graph = softmax_mlp(dtype="float32", h=29)
    params, batch = params_for(graph), batch_for(graph, 6)
    # The SDK: at construction, and per call.
    with pytest.raises(gp.InputError, match="wire_dtype must be None .* got 'fp8'"):
        gp.Client(cluster.address, wire_dtype="fp8")
    with pytest.raises(gp.InputError, match="got 'float32'"):
        service.gradients(graph, params, batch, wire_dtype="float32")
    service.register(graph)

    # The coordinator, through a raw stub.
    stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(cluster.address))
    cases = {
        "not compact": (_raw_request(graph, wire_dtype=pb.FLOAT32), "wire_dtype FLOAT32 is not a compact encoding"),
        "unknown": (_raw_request(graph, wire_dtype=42), "wire_dtype 42 is not a compact encoding"),
    }
    compact_input = _raw_request(graph)
    compact_input.inputs[0].tensor.CopyFrom(pb.Tensor(dtype=BF16, shape=[6, 8], data=bytes(96)))
    cases["compact input"] = (compact_input, "input 'x' is bfloat16, but the graph declares float32 (inputs travel")
    short = _raw_request(graph)
    short.params[0].tensor.CopyFrom(pb.Tensor(dtype=BF16, shape=list(short.params[0].tensor.shape), data=b"\0" * 6))
    cases["compact param, short"] = (short, "shape (8, 29) of bfloat16 needs 464 bytes, got 6")
    for case, (request, words) in cases.items():
        with pytest.raises(grpc.RpcError) as caught:
            stub.ComputeGradients(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert words in caught.value.details(), (case, caught.value.details())
    # A compact param the graph declares as float: fine, even with exact gradients asked for.
    request = _raw_request(graph)
    request.params[0].tensor.CopyFrom(pb.Tensor(dtype=BF16, shape=list(request.params[0].tensor.shape),
                                                data=compact(params[request.params[0].name], BF16).tobytes()))
    reply = stub.ComputeGradients(request, timeout=10)
    assert {g.tensor.dtype for g in reply.grads} == {pb.FLOAT32}

    # A worker, through a raw stub.
    worker = pb_grpc.WorkerStub(grpc.insecure_channel(cluster.worker_addresses[0]))
    proto = graph.to_proto()
    worker.LoadGraph(pb.LoadGraphRequest(graph_id=graph_id(proto), graph=proto), timeout=10)
    shard = pb.ShardRequest(graph_id=graph.graph_id, params=to_named(params), inputs=to_named(batch), global_batch=6,
                            include_batch_independent=True, wire_dtype=pb.INT64)
    with pytest.raises(grpc.RpcError) as caught:
        worker.RunShard(shard, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "wire_dtype INT64 is not a compact encoding" in caught.value.details()
    shard.wire_dtype = F16
    shard.params[0].tensor.CopyFrom(pb.Tensor(dtype=F16, shape=list(shard.params[0].tensor.shape),
                                              data=compact(params[shard.params[0].name], F16).tobytes()))
    response = worker.RunShard(shard, timeout=10)
    assert {g.tensor.dtype for g in response.grads} == {F16}

    # Both keep serving, compact or not.
    for name in (None, "bfloat16"):
        loss, grads = service.gradients(graph, params, batch, wire_dtype=name)
        expected = compact_reference(graph, params, batch, 1, wire_dtype(name)) if name else \
            gp.local_gradients(graph, params, batch)
        assert loss == expected[0] and all(grads[k].tobytes() == expected[1][k].tobytes() for k in grads)
