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


class Cancelled(GradpoolError):
    """The caller gave up (cancelled, or its deadline passed): the run stopped
    between two nodes rather than finish work nobody will read."""


class CapacityError(GradpoolError):
    """Something does not fit a server's configured capacity (a dataset larger
    than its cache): RESOURCE_EXHAUSTED on the wire, not the caller's typo."""


def quoted(value: object, limit: int = 120) -> str:
    """repr(value) for an error message, cut to `limit` characters.

    Messages travel back as gRPC status details (in metadata, a few KB at
    most): quoting a 100 KB name whole would replace the real error with
    RESOURCE_EXHAUSTED.
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"
