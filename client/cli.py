"""The `gradpool` command: run a coordinator or a worker, look at a cluster, run the demo.

    gradpool coordinator --port 50051
    gradpool worker --coordinator localhost:50051 --port 0
    gradpool status --coordinator localhost:50051
    gradpool health localhost:50051
    gradpool certs certs/          a development CA and TLS certificates
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
from gradpool.worker.rpc import VERSION, add_client_tls_arguments, client_tls, open_channel, with_port

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
                        help="client token, if the coordinator requires one (env GRADPOOL_TOKEN)")
    add_client_tls_arguments(status)
    status.add_argument("--timeout", type=float, default=5.0,
                        help="seconds to wait for an answer, retries included (default %(default)s)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    health = commands.add_parser("health", help="probe a server with the standard gRPC health check",
                                 description="Exit 0 if the coordinator or worker at ADDRESS answers the standard "
                                             "gRPC health check with SERVING, 1 otherwise (a container healthcheck).")
    health.add_argument("address", nargs="?", default="localhost:50051",
                        help="server HOST:PORT (default %(default)s)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default %(default)s)")
    add_client_tls_arguments(health)
    certs = commands.add_parser(
        "certs", help="write a development CA and coordinator, worker and client certificates",
        description="Write a development CA (ca.pem, ca-key.pem) and certificates signed by it into DIR: "
                    "coordinator.pem and worker.pem (serverAuth and clientAuth, for localhost, 127.0.0.1, ::1 "
                    "and the compose service names coordinator and worker, plus each --host) and client.pem "
                    "(clientAuth), each with NAME-key.pem. Needs the cryptography package.")
    certs.add_argument("directory", metavar="DIR", help="folder to write into (created if missing)")
    certs.add_argument("--host", action="append", default=[], metavar="NAME",
                       help="another DNS name or IP address for the server certificates (repeatable)")
    certs.add_argument("--days", type=int, default=365, help="validity in days (default %(default)s)")
    certs.add_argument("--compose", action="store_true",
                       help="for docker-compose: also write .env next to docker-compose.yml (in the current "
                            "folder) with fresh client and worker tokens and COMPOSE_FILE including "
                            "docker-compose.tls.yml, and make the keys readable by the containers' user")
    return parser


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with open_channel(with_port(args.address), client_tls(args)) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
        except grpc.RpcError as err:
            raise GradpoolError(f"{args.address} is not healthy: {err.code().name}: {err.details()}") from None
    state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {state}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _status(args: argparse.Namespace) -> int:
    from .remote import Client, RetryPolicy

    with Client(args.coordinator, token=args.token, retry=RetryPolicy(attempts=3), tls=client_tls(args)) as service:
        status = service.status(timeout=args.timeout)
    if args.json:
        print(json.dumps(asdict(status), indent=2))
    else:
        print(f"coordinator {args.coordinator}")
        print(status.table())
    return 0


COMPOSE_ENV = ".env"


def _certs(args: argparse.Namespace) -> int:
    import secrets
    from pathlib import Path

    from .certs import make_dev_certs

    # In containers the keys are read by uid 10001, not by their owner here.
    written = make_dev_certs(args.directory, args.host, args.days, key_mode=0o644 if args.compose else 0o600)
    print(f"wrote {', '.join(sorted(p.name for p in written.values()))} into {args.directory}")
    if args.compose:
        env = Path(COMPOSE_ENV)
        if env.exists():
            raise GradpoolError(f"{env} exists: remove it to write fresh tokens (the certificates are written)")
        directory = Path(args.directory).resolve()
        lines = [
            "# Written by `gradpool certs --compose`: docker compose reads it from this folder.",
            "COMPOSE_FILE=docker-compose.yml:docker-compose.tls.yml",
            f"GRADPOOL_CERTS_DIR={directory}",
            f"GRADPOOL_TOKEN={secrets.token_urlsafe(24)}",
            f"GRADPOOL_WORKER_TOKEN={secrets.token_urlsafe(24)}",
            f"GRADPOOL_COORDINATOR_TOKEN={secrets.token_urlsafe(24)}",
        ]
        fd = os.open(env, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {env}: `docker compose up -d` now runs with TLS, mTLS and tokens; from this host: "
              f"set -a; . ./{env}; set +a; gradpool status --tls-ca {directory}/ca.pem "
              f"--tls-cert {directory}/client.pem --tls-key {directory}/client-key.pem")
    else:
        print("keys are readable by you only; ca-key.pem is needed only to issue more certificates")
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
        if args.command == "certs":
            return _certs(args)
        build_parser().print_help()
        return 2
    except (GradpoolError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gradpool status --json | head -1`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except OSError as err:  # a TLS file that cannot be read, a folder that cannot be written
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
