"""gradpool SDK: build graphs, get exact gradients of whole minibatches.

    import gradpool as gp
    g = gp.Graph()
    x = g.input("x", (784,)); y = g.input("y", (), dtype="int64")
    W = g.param("W", (784, 10)); b = g.param("b", (10,))
    g.set_loss(gp.softmax_cross_entropy(x @ W + b, y).mean())
    loss, grads = gp.local_gradients(g, g.init_params(0), {"x": X, "y": Y})

The names below load on first use (PEP 562), so that `gradpool.worker` and
`gradpool.server` processes, which live in this package, import the engine
and the wire contract without the SDK: dependencies point one way at run
time too.
"""

from __future__ import annotations

import builtins
import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {}
for _module, _names in {
    "gradpool.worker.engine.errors": "GradpoolError GraphError InputError ShardingError",
    "gradpool.functional": "abs binary_cross_entropy concat dropout embedding exp leaky_relu log log_softmax matmul max "
                           "maximum mean minimum power relu reshape sigmoid slice softmax softmax_cross_entropy "
                           "softplus sqrt square sum take tanh transpose "
                           "argmax broadcast_to einsum expand_dims flip logsumexp min pad split squeeze stack std "
                           "tile var "
                           "avg_pool2d conv1d conv2d layer_norm max_pool2d",
    "gradpool.graph": "Expr Graph",
    "gradpool.data": "DatasetRef DatasetRows",
    "gradpool.local": "local_forward local_gradients",
    "gradpool.checkpoint": "Checkpoint CheckpointError latest_checkpoint load_checkpoint save_checkpoint",
    "gradpool.cluster": "ClusterError LocalCluster gradient_service",
    "gradpool.optim": "SGD Adam AdamW ConstantLR CosineLR Optimizer Schedule StepLR",
    "gradpool.remote": "Client ClusterStatus ForwardResult GradientsResult RemoteGraphError RemoteInputError "
                       "RemoteShardingError RetryPolicy ServiceError ServiceUnavailable ShardStat WorkerStatus",
    "gradpool.training": "GradientSource History LocalBackend Trainer TrainingError fit",
    "gradpool.callbacks": "BestCheckpoint CSVLogger Callback EarlyStopping TensorBoardLogger",
    "gradpool.worker.rpc": "TlsConfig",
    "gradpool.certs": "make_dev_certs",
}.items():
    _EXPORTS.update(dict.fromkeys(_names.split(), _module))
# issue 13's math, comparison and selection ops
_EXPORTS.update(dict.fromkeys("cast clip cos elu equal erf expm1 gelu greater greater_equal less less_equal log1p "
                              "not_equal one_hot silu sin stop_gradient take_along_axis where".split(),
                              "gradpool.functional"))

# `from gradpool import *` must not shadow Python's builtins (sum, max, abs,
# slice, ...): those stay reachable as gp.sum etc., but out of the star import.
__all__ = sorted(name for name in _EXPORTS if not hasattr(builtins, name)) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from gradpool.worker.rpc import VERSION  # one version (importlib.metadata) for every side
        return VERSION
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradpool' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, eagerly
    from gradpool.certs import make_dev_certs
    from gradpool.checkpoint import Checkpoint, CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
    from gradpool.cluster import ClusterError, LocalCluster, gradient_service
    from gradpool.functional import (abs, binary_cross_entropy, concat, dropout, embedding, exp, leaky_relu, log,
                                     log_softmax, matmul, max, maximum, mean, minimum, power, relu, reshape,
                                     sigmoid, slice, softmax, softmax_cross_entropy, softplus, sqrt, square, sum,
                                     take, tanh, transpose)
    from gradpool.functional import (argmax, broadcast_to, einsum, expand_dims, flip, logsumexp, min, pad, split,
                                     squeeze, stack, std, tile, var)
    from gradpool.functional import (cast, clip, cos, elu, equal, erf, expm1, gelu, greater, greater_equal, less,
                                     less_equal, log1p, not_equal, one_hot, silu, sin, stop_gradient,
                                     take_along_axis, where)
    from gradpool.functional import avg_pool2d, conv1d, conv2d, layer_norm, max_pool2d
    from gradpool.data import DatasetRef, DatasetRows
    from gradpool.graph import Expr, Graph
    from gradpool.local import local_forward, local_gradients
    from gradpool.optim import SGD, Adam, AdamW, ConstantLR, CosineLR, Optimizer, Schedule, StepLR
    from gradpool.remote import (Client, ClusterStatus, ForwardResult, GradientsResult, RemoteGraphError,
                                 RemoteInputError, RemoteShardingError, RetryPolicy, ServiceError,
                                 ServiceUnavailable, ShardStat, WorkerStatus)
    from gradpool.training import GradientSource, History, LocalBackend, Trainer, TrainingError, fit
    from gradpool.callbacks import BestCheckpoint, CSVLogger, Callback, EarlyStopping, TensorBoardLogger
    from gradpool.worker.engine.errors import GradpoolError, GraphError, InputError, ShardingError
    from gradpool.worker.rpc import TlsConfig
