"""gRPC plumbing shared by the worker, the coordinator and the SDK.

Message limits, roles and the role interceptor, TLS credentials, health and reflection, binding and
announcing, shutdown signals, and the translation of engine errors into
gRPC statuses. It lives in `worker` because `worker` may not import `server`
or `client`, while both of those may import `worker`.
"""

from __future__ import annotations

import errno
import functools
import hmac
import logging
import os
import signal
import socket
import threading
from collections import OrderedDict
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Optional, TypeVar

import grpc

from gradpool.protos import gradpool_pb2 as pb
from gradpool.worker.observability import Observed, configure_logging, serve_metrics, server_role
from gradpool.worker.malloc import DEFAULT_KEEP_FREED_MB, keep_freed_memory
from gradpool.worker.engine.errors import Cancelled, CapacityError, GradpoolError, quoted

log = logging.getLogger("gradpool.rpc")

def _installed_version() -> str:
    """The one version string: the installed distribution's (pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("gradpool")
    except PackageNotFoundError:  # running from an uninstalled tree
        return "0+unknown"


VERSION = _installed_version()

# ---------------------------------------------------------------- shared gRPC plumbing

# gRPC's default limit is 4 MB received per message. Messages above the
# stream threshold (32 MB) travel as streams of 4 MB frames and datasets as
# 4 MB chunks, so one message is never large: the limit is raised only to
# 64 MB, which every unary message the SDK sends fits. gRPC lengths are
# signed 32-bit, so 2 GiB - 1 byte is the hard cap.
DEFAULT_MAX_MESSAGE_MB = 64.0
GRPC_HARD_LIMIT_BYTES = 2**31 - 1
AUTH_HEADER = "authorization"
PARENT_PID_ENV = "GRADPOOL_EXIT_WITH_PARENT"


def message_limit_bytes(max_message_mb: float) -> int:
    """The message size limit in bytes, refusing values gRPC cannot honour."""
    if not max_message_mb >= 2:
        raise ValueError(f"max message size must be at least 2 MB (streams send 1 MB frames), got {max_message_mb} MB")
    limit = int(max_message_mb * 1024 * 1024)
    if limit > GRPC_HARD_LIMIT_BYTES:
        raise ValueError(f"max message size {max_message_mb} MB exceeds gRPC's hard cap of 2047 MB")
    return limit


# gRPC reconnects a dropped channel with exponential backoff up to 120 s: a
# coordinator back after 15 s was reached only after 28. Capped at 1 s, a
# client or worker is back within about a second of its peer.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]


# Keepalive pings every 10 s on idle connections too: a peer that died
# silently (a machine gone, a NAT dropping the flow) is noticed in about 15 s
# instead of at the next call's deadline. Servers accept pings that often.
KEEPALIVE_OPTIONS = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                     ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]
SERVER_KEEPALIVE_OPTIONS = [("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
                            ("grpc.keepalive_permit_without_calls", 1)]


def channel_options(max_message_mb: float = DEFAULT_MAX_MESSAGE_MB) -> list[tuple[str, int]]:
    """Options for every channel: raised send/receive limits, quick reconnects, keepalive."""
    limit = message_limit_bytes(max_message_mb)
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit), *RECONNECT_OPTIONS,
            *KEEPALIVE_OPTIONS]


def server_options(max_message_mb: float = DEFAULT_MAX_MESSAGE_MB) -> list[tuple[str, int]]:
    # No SO_REUSEPORT: a second server on a taken port must fail, not share it.
    limit = message_limit_bytes(max_message_mb)
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
            *SERVER_KEEPALIVE_OPTIONS, ("grpc.so_reuseport", 0)]


def auth_metadata(token: Optional[str]) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a bearer token, or nothing without one."""
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


# ---------------------------------------------------------------- roles

# Who may call what. A credential (a bearer token) proves one role:
#   client       GRADPOOL_TOKEN         submits work to the coordinator
#   worker       GRADPOOL_WORKER_TOKEN  joins the coordinator's pool
#   coordinator  GRADPOOL_COORDINATOR_TOKEN (default: the worker token)
#                                       calls workers (graphs, datasets, shards)
# A server with no token configured for any role is open (the local/dev
# mode). With any token configured, a call needs a token of a role the
# method allows: a missing or unknown token is UNAUTHENTICATED, a valid token
# of another role PERMISSION_DENIED, and a role without a configured token
# cannot be assumed by anyone.
CLIENT, WORKER, COORDINATOR = "client", "worker", "coordinator"
ROLES = (CLIENT, WORKER, COORDINATOR)
WORKER_METHODS = ("RegisterWorker", "Heartbeat", "DeregisterWorker")


def _method_roles() -> dict[str, frozenset[str]]:
    """The one table of method -> roles allowed to call it, over every RPC of gradpool.proto."""
    table: dict[str, frozenset[str]] = {}
    for method in pb.DESCRIPTOR.services_by_name["Coordinator"].methods:
        table[method_path("Coordinator", method.name)] = frozenset(
            {WORKER} if method.name in WORKER_METHODS else {CLIENT})
    for method in pb.DESCRIPTOR.services_by_name["Worker"].methods:
        table[method_path("Worker", method.name)] = frozenset({COORDINATOR})
    return table


def method_path(service: str, method: str) -> str:
    return f"/{pb.DESCRIPTOR.services_by_name[service].full_name}/{method}"


METHOD_ROLES = _method_roles()
# Liveness probes (docker, grpc_health_probe) need no credential; they learn nothing.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
# Reflection lists the (public) proto's services: any valid credential may ask.
ANY_ROLE_PREFIXES = ("/grpc.reflection.",)


class RoleInterceptor(grpc.ServerInterceptor):
    """Checks every RPC's bearer token against the tokens of the roles this
    server accepts and the method's roles in METHOD_ROLES (constant-time
    comparisons, each configured token compared every time)."""

    def __init__(self, tokens: "dict[str, Optional[str]]"):
        unknown = set(tokens) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown role(s) {sorted(unknown)}: roles are {ROLES}")
        self._expected = [(role, f"Bearer {token}".encode()) for role, token in tokens.items() if token]

    @property
    def open(self) -> bool:
        return not self._expected

    def roles_of(self, metadata: Iterable[tuple[str, Any]]) -> set[str]:
        given = dict(metadata or ()).get(AUTH_HEADER, "")
        given_bytes = given if isinstance(given, bytes) else str(given).encode()
        roles = set()
        for role, expected in self._expected:  # no early exit: the time does not say which matched
            if hmac.compare_digest(given_bytes, expected):
                roles.add(role)
        return roles

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        method = handler_call_details.method
        if self.open or method.startswith(OPEN_PREFIXES):
            return continuation(handler_call_details)
        roles = self.roles_of(handler_call_details.invocation_metadata)
        if not roles:
            return _rejecting_handler(continuation(handler_call_details), grpc.StatusCode.UNAUTHENTICATED,
                                      "missing or wrong token: send metadata 'authorization: Bearer <token>' "
                                      "with a token of a role that may call " + method)
        allowed = METHOD_ROLES.get(method)
        if method.startswith(ANY_ROLE_PREFIXES) or (allowed is not None and roles & allowed):
            return continuation(handler_call_details)
        needed = " or ".join(sorted(allowed)) if allowed else "no"
        return _rejecting_handler(continuation(handler_call_details), grpc.StatusCode.PERMISSION_DENIED,
                                  f"a {' and '.join(sorted(roles))} token may not call {method}: "
                                  f"it takes a {needed} token")


def _rejecting_handler(handler: Optional[grpc.RpcMethodHandler], code: grpc.StatusCode,
                       message: str) -> Optional[grpc.RpcMethodHandler]:
    """A handler of the same streaming shape as `handler` that answers `code`."""
    if handler is None:
        return None

    def reject(request_or_iterator, context):  # type: ignore[no-untyped-def]
        context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject)
    return grpc.unary_unary_rpc_method_handler(reject)


def interceptors(tokens: "dict[str, Optional[str]]") -> list[grpc.ServerInterceptor]:
    """The role interceptor for a server accepting `tokens` (role -> token), none when all are unset."""
    interceptor = RoleInterceptor(tokens)
    return [] if interceptor.open else [interceptor]


# grpc's own wording for a full server, which the SDK knows to retry with backoff.
BUSY_DETAILS = "Concurrent RPC limit exceeded"
# Never counted by admission control: probes and reflection.
NEVER_REFUSED_PREFIXES = OPEN_PREFIXES + ANY_ROLE_PREFIXES
# Threads kept beyond the admitted work, for what is never refused: worker
# heartbeats and registration, health probes, reflection.
RESERVED_THREADS = 8


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Admits at most `limit` work RPCs at once; past that, RESOURCE_EXHAUSTED
    at once (the SDK retries it, the coordinator moves a refused shard).

    grpc.server(maximum_concurrent_rpcs=...) counts every RPC alike, so a
    coordinator full of long requests refused its own workers' heartbeats,
    their leases lapsed and their shards were cancelled; and a busy worker
    failed its health probe. Here the methods under `exempt` prefixes are
    never counted, and `server_threads` sizes the pool so that admitted work
    cannot take the threads they need.
    """

    def __init__(self, limit: int, exempt: tuple[str, ...]):
        if limit < 1:
            raise ValueError(f"the admission limit must be at least 1, got {limit}")
        self._slots = threading.BoundedSemaphore(limit)
        self._exempt = exempt

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._exempt):
            return handler
        return _admitted(handler, self._slots)


def _admitted(handler: grpc.RpcMethodHandler, slots: threading.BoundedSemaphore) -> grpc.RpcMethodHandler:
    """`handler`, run only while holding one of `slots` (to the end of its response stream)."""
    def enter(context: grpc.ServicerContext) -> None:
        if not slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, BUSY_DETAILS)

    if handler.response_streaming:
        streaming = handler.unary_stream or handler.stream_stream

        def behaviour(request, context):  # type: ignore[no-untyped-def]
            enter(context)
            try:
                yield from streaming(request, context)
            finally:
                slots.release()
    else:
        unary = handler.unary_unary or handler.stream_unary

        def behaviour(request, context):  # type: ignore[no-untyped-def]
            enter(context)
            try:
                return unary(request, context)
            finally:
                slots.release()

    make = {(False, False): grpc.unary_unary_rpc_method_handler, (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[(handler.request_streaming, handler.response_streaming)](
        behaviour, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def server_threads(threads: int, admitted: int) -> int:
    """Pool size: every admitted work RPC gets a thread, and RESERVED_THREADS stay for the exempt ones."""
    return max(threads, admitted) + RESERVED_THREADS


def warn_about_tokens(tokens: "dict[str, Optional[str]]", logger: logging.Logger) -> None:
    """Say at startup what a token configuration means, where it is probably a mistake."""
    set_tokens = {role: token for role, token in tokens.items() if token}
    if not set_tokens:
        return
    for role in tokens:
        if role not in set_tokens:
            logger.warning("no %s token configured: no one can call the %s methods here", role, role)
    values = list(set_tokens.values())
    if len(set(values)) < len(values):
        logger.warning("two roles share one token: whoever holds it has both roles")


# ---------------------------------------------------------------- TLS

@dataclass(frozen=True)
class TlsConfig:
    """TLS for a server and its outgoing channels, or for an SDK channel (PEM files).

    Server side: `cert`/`key` are served; `ca`, with `require_client_cert`
    (mTLS), verifies callers' certificates. Channel side: `ca` verifies the
    server (the system roots when unset); `cert`/`key`, when set, are
    presented as the client certificate (a coordinator or worker presents its
    own, so `gradpool certs` gives those both serverAuth and clientAuth);
    `server_name` is the name checked in the server's certificate instead of
    the address's host (the coordinator checks workers against one name).
    """

    ca: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None
    require_client_cert: bool = False
    server_name: Optional[str] = None

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("TLS: give both a certificate and its key, or neither")
        if self.require_client_cert and not self.ca:
            raise ValueError("TLS: requiring client certificates (mTLS) needs the CA that signs them")

    @classmethod
    def from_dir(cls, directory: "str | os.PathLike[str]", name: str, **kwargs: Any) -> "TlsConfig":
        """The files `gradpool certs DIR` writes: DIR/ca.pem, DIR/NAME.pem, DIR/NAME-key.pem."""
        return cls(ca=os.path.join(directory, "ca.pem"), cert=os.path.join(directory, f"{name}.pem"),
                   key=os.path.join(directory, f"{name}-key.pem"), **kwargs)

    @staticmethod
    def _read(path: Optional[str], what: str) -> Optional[bytes]:
        if not path:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as err:
            raise OSError(f"TLS: cannot read the {what} {path}: {err.strerror}") from None

    def server_credentials(self) -> grpc.ServerCredentials:
        if not self.cert:
            raise ValueError("TLS: a server needs a certificate and key")
        pair = (self._read(self.key, "private key"), self._read(self.cert, "certificate"))
        return grpc.ssl_server_credentials([pair], root_certificates=self._read(self.ca, "CA certificate"),
                                           require_client_auth=self.require_client_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self._read(self.ca, "CA certificate"),
                                            private_key=self._read(self.key, "private key"),
                                            certificate_chain=self._read(self.cert, "certificate"))


class ServerTls:
    """TLS from a server config's `tls_cert`, `tls_key`, `tls_ca` and `mtls`
    fields (the coordinator's and the workers' alike)."""
    tls_cert: Optional[str]
    tls_key: Optional[str]
    tls_ca: Optional[str]
    mtls: bool

    @property
    def tls(self) -> Optional[TlsConfig]:
        """The server's TLS (None: plaintext)."""
        if not self.tls_cert:
            return None
        return TlsConfig(ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key, require_client_cert=self.mtls)

    def peer_tls(self, server_name: Optional[str] = None) -> Optional[TlsConfig]:
        """TLS of the channels to peers: the CA verifies them, our certificate is our client certificate."""
        if not self.tls_cert:
            return None
        return TlsConfig(ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key, server_name=server_name)


def open_channel(address: str, tls: Optional[TlsConfig], options: Iterable[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to `address`: TLS with `tls`, plaintext without."""
    options = list(options)
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, tls.channel_credentials(), options=options)


def add_server_tls_arguments(parser: Any) -> None:
    """The TLS flags of both servers (each with its environment variable)."""
    add = parser.add_argument
    add("--tls-cert", default=os.environ.get("GRADPOOL_TLS_CERT") or None, metavar="PEM",
        help="serve TLS with this certificate (also presented as the client certificate on outgoing calls) "
             "(env GRADPOOL_TLS_CERT)")
    add("--tls-key", default=os.environ.get("GRADPOOL_TLS_KEY") or None, metavar="PEM",
        help="the certificate's private key (env GRADPOOL_TLS_KEY)")
    add("--tls-ca", default=os.environ.get("GRADPOOL_TLS_CA") or None, metavar="PEM",
        help="CA that verifies the peers this server calls and, with --mtls, its callers (env GRADPOOL_TLS_CA)")
    add("--mtls", action="store_true", default=env_flag("GRADPOOL_MTLS"),
        help="require a client certificate signed by --tls-ca from every caller (env GRADPOOL_MTLS=1)")


def server_tls(cert: Optional[str], key: Optional[str], ca: Optional[str], mtls: bool,
               error: Callable[[str], Any]) -> Optional[TlsConfig]:
    """The TLS of a server's flags (None: plaintext); `error` reports a bad combination."""
    if not (cert or key or ca or mtls):
        return None
    if not (cert and key):
        error("TLS needs --tls-cert and --tls-key (env GRADPOOL_TLS_CERT, GRADPOOL_TLS_KEY)")
    try:
        return TlsConfig(ca=ca, cert=cert, key=key, require_client_cert=mtls)
    except ValueError as err:
        error(str(err))
    return None


def add_client_tls_arguments(parser: Any) -> None:
    """The TLS flags of the SDK's commands (status, health, demo)."""
    add = parser.add_argument
    add("--tls", action="store_true", default=env_flag("GRADPOOL_TLS"),
        help="connect with TLS (implied by --tls-ca or --tls-cert; env GRADPOOL_TLS=1)")
    add("--tls-ca", default=os.environ.get("GRADPOOL_TLS_CA") or None, metavar="PEM",
        help="CA that verifies the server (default: the system's; env GRADPOOL_TLS_CA)")
    add("--tls-cert", default=os.environ.get("GRADPOOL_TLS_CERT") or None, metavar="PEM",
        help="client certificate, for servers that require one (mTLS) (env GRADPOOL_TLS_CERT)")
    add("--tls-key", default=os.environ.get("GRADPOOL_TLS_KEY") or None, metavar="PEM",
        help="the client certificate's key (env GRADPOOL_TLS_KEY)")
    add("--tls-server-name", default=os.environ.get("GRADPOOL_TLS_SERVER_NAME") or None, metavar="NAME",
        help="name to check in the server's certificate instead of the address's host "
             "(env GRADPOOL_TLS_SERVER_NAME)")


def client_tls(args: Any) -> Optional[TlsConfig]:
    """The TlsConfig of `add_client_tls_arguments` flags (None: plaintext)."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return TlsConfig(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name)


def env_flag(name: str) -> bool:
    """A boolean environment variable: 1/true/yes/on."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def add_servicer(server: grpc.Server, servicer: object, service: str, raw: Iterable[str] = ()) -> None:
    """Register `servicer` for `service` (a service of gradpool.proto) as the
    generated `add_*_to_server` does, except that the `raw` methods take and
    return serialized bytes: they read and write the wire format themselves,
    without protobuf copying their tensors (see wire.py)."""
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    raw = set(raw)
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (True, False): grpc.stream_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    handlers = {}
    for method in descriptor.methods:
        request_type, response_type = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        handlers[method.name] = kinds[method.client_streaming, method.server_streaming](
            getattr(servicer, method.name),
            request_deserializer=None if method.name in raw else request_type.FromString,
            response_serializer=None if method.name in raw else response_type.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))


def add_health_and_reflection(server: grpc.Server, service_names: Iterable[str]):  # type: ignore[no-untyped-def]
    """Standard health (SERVING) and reflection services, so grpcurl and probes work."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    names = list(service_names)
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="health"))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in names + [health.OVERALL_HEALTH]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return health_servicer


def format_address(host: str, port: int) -> str:
    """host:port, with brackets around an IPv6 literal."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


DEFAULT_COORDINATOR_PORT = 50051


def with_port(address: str, default_port: int = DEFAULT_COORDINATOR_PORT) -> str:
    """`address` with a port: a bare host (`localhost`, `[::1]`) gets the
    default one, rather than gRPC's silent guess of 443."""
    address = address.strip()
    if not address:
        raise ValueError("empty address: give HOST:PORT")
    if "://" in address or address.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return address  # a gRPC target URI says what it means
    if address.startswith("["):  # [v6] or [v6]:port
        return address if "]:" in address else f"{address}:{default_port}"
    if address.count(":") > 1:  # a bare IPv6 literal
        return f"[{address}]:{default_port}"
    return address if ":" in address else f"{address}:{default_port}"


def bind(server: grpc.Server, host: str, port: int, tls: Optional[TlsConfig] = None) -> int:
    """Bind a port (TLS with `tls`, else plaintext) and return the real one (`port` 0 picks a free one).

    A taken port or a foreign host is found by a plain socket first, so the
    user reads one clear line instead of gRPC's C-core log.
    """
    if port:
        _probe_listen(host, port)
    try:
        if tls is None:
            bound = server.add_insecure_port(format_address(host, port))
        else:
            bound = server.add_secure_port(format_address(host, port), tls.server_credentials())
    except RuntimeError as err:  # gRPC raises when it cannot bind
        raise OSError(f"cannot listen on {format_address(host, port)}: {err}") from None
    if bound == 0:
        raise OSError(f"cannot listen on {format_address(host, port)} (port taken or host not local?)")
    return bound


def _probe_listen(host: str, port: int) -> None:
    where = format_address(host, port)
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise OSError(f"cannot listen on {where}: cannot resolve {host!r} ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise OSError(f"cannot listen on {where}: port {port} is already in use "
                              f"(another gradpool server? pick another with --port)") from None
            raise OSError(f"cannot listen on {where}: {err.strerror}") from None


def announce(role: str, host: str, port: int) -> None:
    """The one stdout line launchers (LocalCluster) read to learn the real port."""
    print(f"gradpool {role} listening on {format_address(host, port)}", flush=True)


def env_default(name: str, fallback: object) -> str:
    """A flag's default: the environment variable if set, else `fallback` (as text for argparse)."""
    value = os.environ.get(name)
    return value if value not in (None, "") else str(fallback)




def wait_for_shutdown(stop: Optional[threading.Event] = None) -> str:
    """Block until SIGTERM/SIGINT (or `stop`), and say why.

    Also returns when the process named by GRADPOOL_EXIT_WITH_PARENT exits,
    so that children of a LocalCluster whose parent was killed do not linger.
    """
    stop = stop or threading.Event()
    reason = ["stop requested"]

    def on_signal(signum, frame):  # type: ignore[no-untyped-def]
        reason[0] = signal.Signals(signum).name
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    parent = os.environ.get(PARENT_PID_ENV, "")
    parent_pid = int(parent) if parent.isdigit() else None
    while not stop.wait(0.5):
        if parent_pid is not None and os.getppid() != parent_pid:
            reason[0] = f"parent process {parent_pid} exited"
            break
    return reason[0]


# Trailing metadata naming the engine error class behind an INVALID_ARGUMENT,
# so that the SDK raises the same class (InputError, GraphError,
# ShardingError) whether the mistake was found in-process or on a server.
ERROR_KIND_KEY = "gradpool-error"
ERROR_KINDS = ("InputError", "GraphError", "ShardingError")
# With NOT_FOUND, the same key says what is missing, so the caller knows what to send.
MISSING_GRAPH = "graph"
MISSING_DATASET = "dataset"


def error_kind(err: BaseException) -> str:
    """The most specific of ERROR_KINDS that `err` is an instance of ("" if none)."""
    for cls in type(err).__mro__:
        if cls.__name__ in ERROR_KINDS and issubclass(cls, GradpoolError):
            return cls.__name__
    return ""


def rpc_error_kind(err: grpc.RpcError) -> str:
    """The error kind a server attached to a failed call ("" if none)."""
    trailing = err.trailing_metadata() if callable(getattr(err, "trailing_metadata", None)) else None
    kind = dict(trailing or ()).get(ERROR_KIND_KEY, "")
    return kind if kind in ERROR_KINDS + (MISSING_GRAPH, MISSING_DATASET) else ""


class RpcFailure(Exception):
    """Raised inside a servicer method to end the RPC with `code` and a message
    (and, for INVALID_ARGUMENT, the kind of engine error behind it)."""

    def __init__(self, code: grpc.StatusCode, message: str, kind: str = ""):
        super().__init__(message)
        self.code = code
        self.kind = kind


def translate_errors(method: Callable) -> Callable:
    """Servicer method decorator: RpcFailure -> its status, GradpoolError ->
    INVALID_ARGUMENT with its kind, anything else -> INTERNAL (logged), never a crash."""

    @functools.wraps(method)
    def wrapper(self, request, context):  # type: ignore[no-untyped-def]
        kind = ""
        observed = Observed(server_role(self), method.__name__)
        try:
            result = method(self, request, context)
            observed.done("OK")
            return result
        except RpcFailure as err:
            code, message, kind = err.code, str(err), err.kind
        except CapacityError as err:
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)
        except Cancelled as err:
            code, message = grpc.StatusCode.CANCELLED, str(err)
        except GradpoolError as err:
            code, message, kind = grpc.StatusCode.INVALID_ARGUMENT, str(err), error_kind(err)
        except grpc.RpcError as err:
            if context.is_active():  # an outgoing call's failure nobody handled: a bug
                log.exception("%s failed", method.__name__)
                code, message = grpc.StatusCode.INTERNAL, f"{method.__name__} failed: {type(err).__name__}"
            else:  # its request stream ended under it: the caller cancelled, or the deadline passed
                log.debug("%s: the call ended while its request was still arriving", method.__name__)
                code, message = grpc.StatusCode.CANCELLED, "the call ended while its request was still arriving"
        except MemoryError as err:  # past the static estimate (numpy's own temporaries): too big for us, not a bug
            log.warning("%s ran out of memory: %s", method.__name__, err)
            code, message = (grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"{method.__name__} ran out of memory on this server: {quoted(str(err), 200)}")
        except Exception as err:  # a bug; keep serving and say what happened
            log.exception("%s failed", method.__name__)
            code, message = grpc.StatusCode.INTERNAL, f"{method.__name__} failed: {type(err).__name__}: {err}"
        observed.done(code.name)
        if kind:
            context.set_trailing_metadata(((ERROR_KIND_KEY, kind),))
        context.abort(code, message)

    return wrapper


def serve_until_signalled(running: Any, grace_seconds: float, logger: logging.Logger) -> None:
    """Block until SIGTERM/SIGINT, then let in-flight RPCs finish for `grace_seconds`."""
    reason = wait_for_shutdown()
    logger.info("shutting down (%s)", reason)
    running.stop(grace_seconds)


def add_observability_flags(add: Callable[..., Any]) -> None:
    """--log-level, --log-format and --metrics-port: the same on both servers."""
    add("--log-level", default=env_default("GRADPOOL_LOG_LEVEL", "INFO"), type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity on stderr (env GRADPOOL_LOG_LEVEL, default %(default)s)")
    add("--log-format", default=env_default("GRADPOOL_LOG_FORMAT", "text"), choices=["text", "json"],
        help="json: one object a line with time, level, logger, message and the request id, graph id and "
             "worker where they apply (env GRADPOOL_LOG_FORMAT, default %(default)s)")
    add("--metrics-port", type=int, default=env_default("GRADPOOL_METRICS_PORT", 0),
        help="serve Prometheus metrics over HTTP on this port, 0 for none (env GRADPOOL_METRICS_PORT, "
             "default %(default)s)")


def add_memory_flags(add: Callable[..., Any]) -> None:
    """--graph-cache-mb and --max-request-memory-mb: the same on both servers (engine/limits.py)."""
    from gradpool.worker.engine.limits import LIMITS, MB
    add("--graph-cache-mb", type=float, default=env_default("GRADPOOL_GRAPH_CACHE_MB", LIMITS.graph_cache_bytes // MB),
        help="memory for checked graphs, in MB, by their estimated size (LRU besides --max-graphs; a graph larger "
             "than this is refused) (env GRADPOOL_GRAPH_CACHE_MB, default %(default)s)")
    add("--max-request-memory-mb", type=float,
        default=env_default("GRADPOOL_MAX_REQUEST_MEMORY_MB", LIMITS.max_request_memory_bytes // MB),
        help="a request whose values and gradients need more memory than this (a static estimate: the graph's "
             "shapes times the batch) is refused with RESOURCE_EXHAUSTED before anything runs, naming the largest "
             "value; so is a graph that cannot run one example within it (env GRADPOOL_MAX_REQUEST_MEMORY_MB, "
             "default %(default)s)")
    add("--keep-freed-mb", type=float, default=env_default("GRADPOOL_KEEP_FREED_MB", DEFAULT_KEEP_FREED_MB),
        help="freed memory each malloc heap keeps for reuse, in MB (glibc: message-sized buffers then reuse warm "
             "pages instead of page-faulting fresh ones, about 4x faster to fill, and resident size stays near its "
             "peak; see worker/malloc.py); 0 leaves malloc's own policy (env GRADPOOL_KEEP_FREED_MB, default "
             "%(default)s)")


def run_main(serve: Callable[[Any], None], config: Any, logger: logging.Logger) -> int:
    """A server's `main`: logging set up, freed memory kept for reuse, exit 1
    with one log line if it cannot bind."""
    configure_logging(config.log_level, getattr(config, "log_format", "text"))
    keep_freed_memory(int(getattr(config, "keep_freed_mb", 0) * 2**20))
    try:
        serve_metrics(getattr(config, "metrics_port", 0), getattr(config, "metrics_host", "0.0.0.0"))
        serve(config)
    except OSError as err:
        logger.error("%s", err)
        return 1
    return 0


V = TypeVar("V")


class LruCache(Generic[V]):
    """Thread-safe map bounded by entries and by bytes, that forgets the least
    recently used entry (graphs on the coordinator and on every worker). An
    entry's bytes are its owner's estimate of what it holds in memory; one
    larger than the whole cache is refused (CapacityError)."""

    def __init__(self, capacity: int, what: str = "entry", max_bytes: Optional[int] = None):
        if capacity < 1:
            raise ValueError(f"{what} cache size must be >= 1, got {capacity}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"{what} cache bytes must be >= 1, got {max_bytes}")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.what = what
        self._entries: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> Optional[V]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def fits(self, nbytes: int) -> None:
        """Refuse an entry of `nbytes` that could never be kept (before building it, where the size is known)."""
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise CapacityError(f"a {self.what} of {nbytes / 2**20:.1f} MB is larger than the "
                                f"{self.max_bytes / 2**20:.0f} MB this server keeps for {self.what}s")

    def put(self, key: str, value: V, nbytes: int = 0) -> None:
        self.fits(nbytes)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes
            while len(self._entries) > self.capacity or (self.max_bytes is not None and self._bytes > self.max_bytes):
                evicted, (_, size) = self._entries.popitem(last=False)
                self._bytes -= size
                log.info("evicted %s %s from the cache", self.what, evicted[:12])

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
