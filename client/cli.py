"""The `gradpool` command: run a coordinator or a worker, look at a cluster, run the demo.

    gradpool coordinator --port 50051
    gradpool worker --coordinator localhost:50051 --port 0
    gradpool status --coordinator localhost:50051
    gradpool health localhost:50051
    gradpool demo [demo options]

The server commands are imported only when used, so `gradpool status` stays
light. Errors print one line (no traceback) and exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import asdict
from typing import Callable, Optional, Sequence

from gradpool.worker.engine.errors import GradpoolError
from gradpool.worker.rpc import VERSION, with_port

PROG = "gradpool"


def _run_coordinator(argv: Sequence[str]) -> int:
    from gradpool.server.coordinator import main
    return main(argv, prog=f"{PROG} coordinator")


def _run_worker(argv: Sequence[str]) -> int:
    from gradpool.worker.server import main
    return main(argv, prog=f"{PROG} worker")


def _run_demo(argv: Sequence[str]) -> int:
    try:
        demo = importlib.import_module("gradpool.demo")
    except ModuleNotFoundError as err:
        if err.name == "gradpool.demo":
            raise GradpoolError("the demo is not part of this installation (client/demo.py is missing)") from None
        raise GradpoolError(f"the demo needs the module {err.name!r}: pip install 'gradpool[demo]'") from None
    result = demo.main(list(argv))
    return int(result or 0)


# Commands that own their whole argument list (and their own --help).
DELEGATED: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "coordinator": (_run_coordinator, "run the coordinator (see `gradpool coordinator --help`)"),
    "worker": (_run_worker, "run a worker (see `gradpool worker --help`)"),
    "demo": (_run_demo, "train a small model on a local cluster (see `gradpool demo --help`)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="gradpool: exact gradients of whole minibatches, computed on a pool of workers.")
    parser.add_argument("--version", action="version", version=f"{PROG} {VERSION}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    status = commands.add_parser("status", help="show a coordinator's workers and totals",
                                 description="Show a coordinator's workers (capacity, health, work done) "
                                             "and the requests it has served.")
    status.add_argument("--coordinator", default=os.environ.get("GRADPOOL_COORDINATOR", "localhost:50051"),
                        help="coordinator HOST:PORT (env GRADPOOL_COORDINATOR, default %(default)s)")
    status.add_argument("--token", default=os.environ.get("GRADPOOL_TOKEN") or None,
                        help="token, if the coordinator requires one (env GRADPOOL_TOKEN)")
    status.add_argument("--timeout", type=float, default=5.0,
                        help="seconds to wait for an answer, retries included (default %(default)s)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    health = commands.add_parser("health", help="probe a server with the standard gRPC health check",
                                 description="Exit 0 if the coordinator or worker at ADDRESS answers the standard "
                                             "gRPC health check with SERVING, 1 otherwise (a container healthcheck).")
    health.add_argument("address", nargs="?", default="localhost:50051",
                        help="server HOST:PORT (default %(default)s)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default %(default)s)")
    return parser


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(with_port(args.address)) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
        except grpc.RpcError as err:
            raise GradpoolError(f"{args.address} is not healthy: {err.code().name}: {err.details()}") from None
    state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {state}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _status(args: argparse.Namespace) -> int:
    from .remote import Client, RetryPolicy

    with Client(args.coordinator, token=args.token, retry=RetryPolicy(attempts=3)) as service:
        status = service.status(timeout=args.timeout)
    if args.json:
        print(json.dumps(asdict(status), indent=2))
    else:
        print(f"coordinator {args.coordinator}")
        print(status.table())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in DELEGATED:
            return DELEGATED[argv[0]][0](argv[1:])
        args = build_parser().parse_args(argv)
        if args.command == "status":
            return _status(args)
        if args.command == "health":
            return _health(args)
        build_parser().print_help()
        return 2
    except GradpoolError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gradpool status --json | head -1`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141


if __name__ == "__main__":
    sys.exit(main())
