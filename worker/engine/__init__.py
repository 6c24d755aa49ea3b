"""The reverse-mode autodiff engine every worker runs (and the SDK, in-process)."""

from .errors import GradpoolError, GraphError, InputError, ShardingError
from .ops import REGISTRY, Op, get_op
from .program import Program, RunResult, graph_id
from .sharding import BATCH_INDEPENDENT, BATCH_REDUCED, PER_EXAMPLE, OrderedSum, classify, shard_bounds
from .signature import IndexLimit, Signature, TensorSpec, WireInput
from .tensors import as_dtype, from_named, from_tensor, to_named, to_tensor

__all__ = [
    "GradpoolError", "GraphError", "InputError", "ShardingError", "REGISTRY", "Op", "get_op",
    "BATCH_INDEPENDENT", "BATCH_REDUCED", "PER_EXAMPLE", "Program", "RunResult", "graph_id",
    "OrderedSum", "classify", "shard_bounds", "IndexLimit", "Signature", "TensorSpec", "WireInput", "as_dtype", "from_named", "from_tensor", "to_named", "to_tensor",
]
