"""The errors gradpool raises on purpose; anything else is a bug."""


class GradpoolError(Exception):
    """Base of every error gradpool raises on purpose."""


class GraphError(GradpoolError, ValueError):
    """The graph itself is invalid: unknown op, bad shapes, bad references."""


class ShardingError(GraphError):
    """The loss is not a sum over examples plus batch-independent terms, so
    summing per-shard gradients would not give the whole-batch gradient."""


class InputError(GradpoolError, ValueError):
    """Parameters or batch do not fit the graph (names, dtypes, shapes, ranges)."""
