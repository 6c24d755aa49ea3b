"""gradpool SDK: build graphs, get exact gradients of whole minibatches.

    import gradpool as gp
    g = gp.Graph()
    x = g.input("x", (784,)); y = g.input("y", (), dtype="int64")
    W = g.param("W", (784, 10)); b = g.param("b", (10,))
    g.set_loss(gp.softmax_cross_entropy(x @ W + b, y).mean())
    loss, grads = gp.local_gradients(g, g.init_params(0), {"x": X, "y": Y})
"""

from gradpool.worker.engine.errors import GradpoolError, GraphError, InputError, ShardingError

from .functional import (abs, binary_cross_entropy, concat, embedding, exp, leaky_relu, log, log_softmax,
                         matmul, max, maximum, mean, minimum, power, relu, reshape, sigmoid, slice, softmax,
                         softmax_cross_entropy, softplus, sqrt, square, sum, tanh, transpose)
from .graph import Expr, Graph
from .local import local_evaluate, local_gradients
from .checkpoint import Checkpoint, CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .cluster import ClusterError, LocalCluster, gradient_service
from .optim import SGD, Adam, AdamW, ConstantLR, CosineLR, Optimizer, Schedule, StepLR
from .remote import (Client, ClusterStatus, EvaluateResult, GradientsResult, RetryPolicy, ServiceError,
                     ServiceUnavailable, ShardStat, WorkerStatus)
from .training import GradientSource, History, LocalBackend, Trainer, TrainingError, fit

from gradpool.worker.rpc import VERSION as __version__  # one version (importlib.metadata) for every side

__all__ = [
    "GradpoolError", "GraphError", "InputError", "ShardingError", "Expr", "Graph", "local_gradients",
    "local_evaluate", "abs", "binary_cross_entropy", "concat", "embedding", "exp", "leaky_relu", "log",
    "log_softmax", "matmul", "max", "maximum", "mean", "minimum", "power", "relu", "reshape", "sigmoid",
    "slice", "softmax", "softmax_cross_entropy", "softplus", "sqrt", "square", "sum", "tanh", "transpose",
    "SGD", "Adam", "AdamW", "ConstantLR", "CosineLR", "Optimizer", "Schedule", "StepLR", "Checkpoint",
    "CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint", "ClusterError",
    "LocalCluster", "gradient_service", "Client", "ClusterStatus", "GradientsResult", "RetryPolicy",
    "ServiceError", "ServiceUnavailable", "EvaluateResult", "ShardStat", "WorkerStatus", "GradientSource",
    "History", "LocalBackend", "Trainer", "TrainingError", "fit",
]
