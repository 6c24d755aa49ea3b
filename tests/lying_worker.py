"""A worker built to lie, for the shard-audit tests (never installed, never imported by gradpool).

It is a real `gradpool worker` process whose servicer returns every shard's
gradients (and outputs) scaled by 1 + LIE_SCALE (env GRADPOOL_TEST_LIE_SCALE,
default 1e-3): a faulty or malicious worker that answers well-formed, plausible
numbers. The production worker has no such switch: the lie lives only in this
subclass, which this script serves in place of `WorkerServicer`.

    python tests/lying_worker.py --coordinator HOST:PORT --port 0 ...   (the worker's own flags)
"""

from __future__ import annotations

import os
import sys

import grpc
import numpy as np

from gradpool.worker import server, wire
from gradpool.worker.engine.tensors import wire_dtype_field

LIE_SCALE = float(os.environ.get("GRADPOOL_TEST_LIE_SCALE", "1e-3"))


class LyingWorkerServicer(server.WorkerServicer):
    """Computes the shard honestly, then answers it perturbed."""

    def _run_shard(self, request: wire.ShardRequestView, context: grpc.ServicerContext) -> wire.Parts:
        honest = wire.read_shard_response(super()._run_shard(request, context).join())
        # Exact gradients keep their dtype; compact ones are rescaled as float32 and encoded again.
        grads = {name: (lambda g: (g * (1 + LIE_SCALE)).astype(g.dtype))(tensor.values(np.dtype(np.float32)))
                 for name, tensor in honest.grads}
        outputs = {name: (tensor.array() * (1 + LIE_SCALE)).astype(tensor.dtype) for name, tensor in honest.outputs}
        return wire.shard_response(honest.loss, grads, outputs, honest.examples, honest.seconds,
                                   wire_dtype_field(request.wire_dtype))


if __name__ == "__main__":
    server.WorkerServicer = LyingWorkerServicer  # type: ignore[misc]  # what `start` builds, in this process only
    sys.exit(server.main(sys.argv[1:], prog="lying worker"))
