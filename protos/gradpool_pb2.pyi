from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    BOOL: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
INT32: DType
INT64: DType
BOOL: DType
FLOAT16: DType
BFLOAT16: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "padding")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    padding: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., padding: _Optional[bytes] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("total_bytes", "data", "header_bytes")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    HEADER_BYTES_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    data: bytes
    header_bytes: int
    def __init__(self, total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ..., header_bytes: _Optional[int] = ...) -> None: ...

class IntList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[int]] = ...) -> None: ...

class AttrValue(_message.Message):
    __slots__ = ("i", "f", "s", "b", "ints", "tensor")
    I_FIELD_NUMBER: _ClassVar[int]
    F_FIELD_NUMBER: _ClassVar[int]
    S_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    INTS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    i: int
    f: float
    s: str
    b: bool
    ints: IntList
    tensor: Tensor
    def __init__(self, i: _Optional[int] = ..., f: _Optional[float] = ..., s: _Optional[str] = ..., b: _Optional[bool] = ..., ints: _Optional[_Union[IntList, _Mapping]] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("name", "op", "inputs", "attrs", "shape", "dtype", "origin")
    class AttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: AttrValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[AttrValue, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    op: str
    inputs: _containers.RepeatedScalarFieldContainer[int]
    attrs: _containers.MessageMap[str, AttrValue]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    origin: str
    def __init__(self, name: _Optional[str] = ..., op: _Optional[str] = ..., inputs: _Optional[_Iterable[int]] = ..., attrs: _Optional[_Mapping[str, AttrValue]] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., origin: _Optional[str] = ...) -> None: ...

class Graph(_message.Message):
    __slots__ = ("name", "nodes", "loss")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    name: str
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    loss: int
    def __init__(self, name: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ..., loss: _Optional[int] = ...) -> None: ...

class RegisterGraphRequest(_message.Message):
    __slots__ = ("graph",)
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    graph: Graph
    def __init__(self, graph: _Optional[_Union[Graph, _Mapping]] = ...) -> None: ...

class RegisterGraphResponse(_message.Message):
    __slots__ = ("graph_id",)
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    def __init__(self, graph_id: _Optional[str] = ...) -> None: ...

class GradientsRequest(_message.Message):
    __slots__ = ("graph_id", "params", "inputs", "request_id", "rows", "wire_dtype", "seed")
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    params: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    inputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    request_id: str
    rows: DatasetRows
    wire_dtype: DType
    seed: int
    def __init__(self, graph_id: _Optional[str] = ..., params: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., inputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., request_id: _Optional[str] = ..., rows: _Optional[_Union[DatasetRows, _Mapping]] = ..., wire_dtype: _Optional[_Union[DType, str]] = ..., seed: _Optional[int] = ...) -> None: ...

class ArraySpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class DatasetHeader(_message.Message):
    __slots__ = ("dataset_id", "arrays")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    arrays: _containers.RepeatedCompositeFieldContainer[ArraySpec]
    def __init__(self, dataset_id: _Optional[str] = ..., arrays: _Optional[_Iterable[_Union[ArraySpec, _Mapping]]] = ...) -> None: ...

class DatasetChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: DatasetHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[DatasetHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("dataset_id", "examples", "bytes", "arrays")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    examples: int
    bytes: int
    arrays: _containers.RepeatedCompositeFieldContainer[ArraySpec]
    def __init__(self, dataset_id: _Optional[str] = ..., examples: _Optional[int] = ..., bytes: _Optional[int] = ..., arrays: _Optional[_Iterable[_Union[ArraySpec, _Mapping]]] = ...) -> None: ...

class GetDatasetRequest(_message.Message):
    __slots__ = ("dataset_id",)
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    def __init__(self, dataset_id: _Optional[str] = ...) -> None: ...

class DatasetRows(_message.Message):
    __slots__ = ("dataset_id", "indices")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    indices: Tensor
    def __init__(self, dataset_id: _Optional[str] = ..., indices: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ShardStats(_message.Message):
    __slots__ = ("worker", "start", "examples", "seconds", "attempts")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    worker: str
    start: int
    examples: int
    seconds: float
    attempts: int
    def __init__(self, worker: _Optional[str] = ..., start: _Optional[int] = ..., examples: _Optional[int] = ..., seconds: _Optional[float] = ..., attempts: _Optional[int] = ...) -> None: ...

class GradientsResponse(_message.Message):
    __slots__ = ("loss", "grads", "examples", "shards", "seconds")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    loss: float
    grads: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    examples: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardStats]
    seconds: float
    def __init__(self, loss: _Optional[float] = ..., grads: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., examples: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardStats, _Mapping]]] = ..., seconds: _Optional[float] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("graph_id", "params", "inputs", "outputs", "request_id", "rows")
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    params: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    inputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    rows: DatasetRows
    def __init__(self, graph_id: _Optional[str] = ..., params: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., inputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., outputs: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., rows: _Optional[_Union[DatasetRows, _Mapping]] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("outputs", "examples", "shards", "seconds")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    examples: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardStats]
    seconds: float
    def __init__(self, outputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., examples: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardStats, _Mapping]]] = ..., seconds: _Optional[float] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "address", "capacity", "state", "seconds_since_heartbeat", "shards_served", "examples_served", "graphs_sent", "errors", "static")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    SHARDS_SERVED_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_SERVED_FIELD_NUMBER: _ClassVar[int]
    GRAPHS_SENT_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    STATIC_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    capacity: float
    state: str
    seconds_since_heartbeat: float
    shards_served: int
    examples_served: int
    graphs_sent: int
    errors: int
    static: bool
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., capacity: _Optional[float] = ..., state: _Optional[str] = ..., seconds_since_heartbeat: _Optional[float] = ..., shards_served: _Optional[int] = ..., examples_served: _Optional[int] = ..., graphs_sent: _Optional[int] = ..., errors: _Optional[int] = ..., static: _Optional[bool] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("workers", "requests_served", "examples_served", "graphs_registered", "uptime_seconds", "version", "requests_failed", "datasets_resident", "dataset_bytes")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_SERVED_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_SERVED_FIELD_NUMBER: _ClassVar[int]
    GRAPHS_REGISTERED_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    DATASETS_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    DATASET_BYTES_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    requests_served: int
    examples_served: int
    graphs_registered: int
    uptime_seconds: float
    version: str
    requests_failed: int
    datasets_resident: int
    dataset_bytes: int
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., requests_served: _Optional[int] = ..., examples_served: _Optional[int] = ..., graphs_registered: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., version: _Optional[str] = ..., requests_failed: _Optional[int] = ..., datasets_resident: _Optional[int] = ..., dataset_bytes: _Optional[int] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("address", "capacity", "worker_id", "lease_secret")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECRET_FIELD_NUMBER: _ClassVar[int]
    address: str
    capacity: float
    worker_id: str
    lease_secret: str
    def __init__(self, address: _Optional[str] = ..., capacity: _Optional[float] = ..., worker_id: _Optional[str] = ..., lease_secret: _Optional[str] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("worker_id", "heartbeat_seconds", "lease_seconds", "lease_secret")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECRET_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    heartbeat_seconds: float
    lease_seconds: float
    lease_secret: str
    def __init__(self, worker_id: _Optional[str] = ..., heartbeat_seconds: _Optional[float] = ..., lease_seconds: _Optional[float] = ..., lease_secret: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "lease_secret")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECRET_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    lease_secret: str
    def __init__(self, worker_id: _Optional[str] = ..., lease_secret: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class DeregisterWorkerRequest(_message.Message):
    __slots__ = ("worker_id", "lease_secret")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECRET_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    lease_secret: str
    def __init__(self, worker_id: _Optional[str] = ..., lease_secret: _Optional[str] = ...) -> None: ...

class DeregisterWorkerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadGraphRequest(_message.Message):
    __slots__ = ("graph_id", "graph")
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    graph: Graph
    def __init__(self, graph_id: _Optional[str] = ..., graph: _Optional[_Union[Graph, _Mapping]] = ...) -> None: ...

class LoadGraphResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardRequest(_message.Message):
    __slots__ = ("graph_id", "params", "inputs", "global_batch", "include_batch_independent", "mode", "outputs", "rows", "wire_dtype", "seed", "example_offset")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        GRADIENTS: _ClassVar[ShardRequest.Mode]
        FORWARD: _ClassVar[ShardRequest.Mode]
    GRADIENTS: ShardRequest.Mode
    FORWARD: ShardRequest.Mode
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BATCH_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_BATCH_INDEPENDENT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    params: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    inputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    global_batch: int
    include_batch_independent: bool
    mode: ShardRequest.Mode
    outputs: _containers.RepeatedScalarFieldContainer[str]
    rows: DatasetRows
    wire_dtype: DType
    seed: int
    example_offset: int
    def __init__(self, graph_id: _Optional[str] = ..., params: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., inputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., global_batch: _Optional[int] = ..., include_batch_independent: _Optional[bool] = ..., mode: _Optional[_Union[ShardRequest.Mode, str]] = ..., outputs: _Optional[_Iterable[str]] = ..., rows: _Optional[_Union[DatasetRows, _Mapping]] = ..., wire_dtype: _Optional[_Union[DType, str]] = ..., seed: _Optional[int] = ..., example_offset: _Optional[int] = ...) -> None: ...

class ShardResponse(_message.Message):
    __slots__ = ("loss", "grads", "outputs", "examples", "seconds")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    loss: float
    grads: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    outputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    examples: int
    seconds: float
    def __init__(self, loss: _Optional[float] = ..., grads: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., examples: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class WorkerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatusResponse(_message.Message):
    __slots__ = ("worker_id", "graphs_cached", "graphs_loaded", "shards_served", "examples_served", "datasets_cached", "dataset_bytes_cached")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    GRAPHS_CACHED_FIELD_NUMBER: _ClassVar[int]
    GRAPHS_LOADED_FIELD_NUMBER: _ClassVar[int]
    SHARDS_SERVED_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_SERVED_FIELD_NUMBER: _ClassVar[int]
    DATASETS_CACHED_FIELD_NUMBER: _ClassVar[int]
    DATASET_BYTES_CACHED_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    graphs_cached: int
    graphs_loaded: int
    shards_served: int
    examples_served: int
    datasets_cached: int
    dataset_bytes_cached: int
    def __init__(self, worker_id: _Optional[str] = ..., graphs_cached: _Optional[int] = ..., graphs_loaded: _Optional[int] = ..., shards_served: _Optional[int] = ..., examples_served: _Optional[int] = ..., datasets_cached: _Optional[int] = ..., dataset_bytes_cached: _Optional[int] = ...) -> None: ...
