"""Every size limit a server enforces, with its default, in one place.

A limit is checked before the structure it bounds is built: a graph's wire
bytes are scanned (`wire.check_sizes`) before protobuf parses them, a
stream's declared total before its buffer is allocated, a dataset header's
total before its buffer, and a request's static memory estimate
(`Program.memory`) before anything runs. docs/ARCHITECTURE.md ("Where each
limit is checked") lists them with where each is checked.

Refusals are `GraphError`/`InputError` (INVALID_ARGUMENT: the request is
malformed or absurd whatever the server) or `CapacityError`
(RESOURCE_EXHAUSTED: it does not fit this server's configured capacity).
"""

from __future__ import annotations

from dataclasses import dataclass

MB = 2**20


@dataclass(frozen=True)
class Limits:
    # ---- a graph's structure, checked on its wire bytes before protobuf parses it
    max_nodes: int = 100_000
    max_node_inputs: int = 1_024  # inputs of one node (concat, add_n)
    max_node_attrs: int = 32  # attributes of one node
    max_attr_ints: int = 65_536  # values of one int-list attribute (axes, perm, shape targets, take's indices)
    max_rank: int = 8  # dims of any shape: nodes, consts, wire tensors, dataset arrays
    max_dim: int = 2**31 - 1  # one dim of a declared shape
    max_tensor_elements: int = 2**31  # elements of one declared shape (per example) or const
    max_graph_ints: int = 4_000_000  # node inputs + shape dims + attribute ints of a whole graph
    max_name_length: int = 256  # node, op, attribute, graph and tensor names
    max_text_length: int = 4_096  # a node's origin (file:line), a string attribute
    # ---- requests
    max_tensors: int = 100_000  # named tensors (params, inputs, outputs) and output names in one message
    max_dataset_arrays: int = 256
    # ---- memory (server defaults; each has a flag and an environment variable)
    max_request_memory_bytes: int = 4096 * MB  # static estimate of one request's values and adjoints
    graph_cache_bytes: int = 1024 * MB  # graphs kept, by their estimated size in memory (LRU)
    dataset_cache_bytes: int = 4096 * MB  # resident datasets kept (LRU)


LIMITS = Limits()


def mib(nbytes: float) -> str:
    """A byte count for messages: '3.8 GiB', '190.0 KiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"
