"""A real coordinator and real workers on this machine, for tests, demos and benchmarks.

    with gp.LocalCluster(workers=2) as cluster:
        with cluster.client() as service:
            loss, grads = service.gradients(graph, params, batch)

Each process is `python -m gradpool.server` / `python -m gradpool.worker` with `--port 0`; the
port is read from the "listening on" line it prints. Exiting the block (also
on an exception) stops every process: SIGTERM, then SIGKILL after a timeout,
and always a wait, so nothing is left running or unreaped. Children also
exit by themselves when this process dies (GRADPOOL_EXIT_WITH_PARENT).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import time
import weakref
from typing import Any, Iterator, Optional, Sequence

from gradpool.worker.engine.errors import GradpoolError
from gradpool.worker.rpc import PARENT_PID_ENV, TlsConfig

from .remote import Client, ClusterStatus, RetryPolicy, ServiceError

# `-P` (3.11+): the child does not put its working directory first on
# sys.path, so a user's own `gradpool/` or `client.py` there cannot shadow ours.
SAFE_PATH = ["-P"] if sys.version_info >= (3, 11) else []
LISTENING = re.compile(r"^gradpool (coordinator|worker) listening on (\S+)$")


class ClusterError(GradpoolError):
    """A LocalCluster process did not start, or the pool did not reach the expected size."""


class ChildProcess:
    """One started server process and the address it listens on."""

    def __init__(self, role: str, args: Sequence[str], env: dict[str, str]):
        """Launch; call `ready()` for the address (launch several, then wait for all)."""
        self.role = role
        self.args = list(args)
        self.address = ""
        module = "gradpool.server" if role == "coordinator" else "gradpool.worker"
        self.popen = subprocess.Popen([sys.executable, *SAFE_PATH, "-m", module, *args],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env,
                                      start_new_session=True)  # Ctrl-C reaches us; we stop them in order

    def ready(self, timeout: float) -> "ChildProcess":
        """Wait for the "listening on" line; stop the process if it never comes."""
        try:
            self.address = self._read_address(timeout)
        except BaseException:
            self.stop(timeout=2.0)
            raise
        return self

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def _read_address(self, timeout: float) -> str:
        """The address from the "listening on" line, or a clear error if the process dies first."""
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        buffer = b""
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClusterError(f"{self.role} did not report its port within {timeout:.0f}s")
            ready, _, _ = select.select([fd], [], [], min(remaining, 0.2))
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    code = self.popen.wait(timeout=5)
                    raise ClusterError(f"{self.role} exited with code {code} before listening "
                                       f"(its log is on stderr above)")
                buffer += chunk
        line = buffer.split(b"\n", 1)[0].decode(errors="replace").strip()
        match = LISTENING.match(line)
        if not match:
            raise ClusterError(f"{self.role} printed {line!r} instead of its address")
        return match.group(2)

    def stop(self, timeout: float = 10.0, kill: bool = False) -> Optional[int]:
        """SIGTERM (or SIGKILL), wait; SIGKILL if it outlives `timeout`. Returns the exit code."""
        if self.popen.poll() is None:
            if kill:
                self.popen.kill()
            else:
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return self.popen.returncode

    def __repr__(self) -> str:
        return f"<{self.role} pid {self.pid} at {getattr(self, 'address', '?')}>"


def child_env() -> dict[str, str]:
    """This process's environment without GRADPOOL_* settings (the flags say
    everything), and our pid to exit with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADPOOL_")}
    env[PARENT_PID_ENV] = str(os.getpid())
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stop_all(processes: list[ChildProcess]) -> None:
    """Last-resort cleanup (garbage collection or interpreter exit)."""
    for process in processes:
        if process.alive():
            process.popen.kill()
            process.popen.wait()


class LocalCluster:
    """A coordinator and `workers` worker processes on localhost.

    Short heartbeats and leases by default, so joins, leaves and restarts
    show up quickly. `capacity` is every worker's (equal capacities make the
    service's shards those of `local_gradients(..., shards=k)`).
    `threads_per_worker` caps each worker's BLAS/OpenMP threads: workers on
    one machine otherwise each start a thread per core and fight over them.

    Credentials (none by default: the open dev mode): `token` is the clients'
    token, `worker_token` the workers' (a random one is made when only
    `token` is given), `coordinator_token` what the coordinator calls workers
    with (default: the worker token); they reach the processes through their
    environment, not their command lines. `tls` is a folder made by
    `gradpool certs` (`gp.make_dev_certs`): every port serves TLS with its
    coordinator/worker certificates, and `client()` trusts its CA and presents
    client.pem; `mtls=True` makes every server require client certificates.
    """

    def __init__(self, workers: int = 2, *, capacity: float = 1.0, token: Optional[str] = None,
                 worker_token: Optional[str] = None, coordinator_token: Optional[str] = None,
                 tls: "Optional[str | os.PathLike[str]]" = None, mtls: bool = False,
                 host: str = "127.0.0.1", heartbeat_seconds: float = 0.25, lease_seconds: float = 3.0,
                 max_message_mb: Optional[float] = None, log_level: str = "WARNING",
                 coordinator_args: Sequence[str] = (), worker_args: Sequence[str] = (),
                 threads_per_worker: Optional[int] = None, startup_timeout: float = 60.0):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.initial_workers = workers
        self.capacity = capacity
        self.token = token
        if worker_token is None and (token or coordinator_token):
            worker_token = secrets.token_urlsafe(24)  # with a client token, workers need their own to join
        self.worker_token = worker_token
        self.coordinator_token = coordinator_token
        if mtls and not tls:
            raise ValueError("mtls=True needs tls=<a folder made by `gradpool certs`>")
        self.tls = None if tls is None else os.fspath(tls)
        self.mtls = mtls
        self.host = host
        self.heartbeat_seconds = heartbeat_seconds
        self.lease_seconds = lease_seconds
        self.max_message_mb = max_message_mb
        self.log_level = log_level
        self.coordinator_args = list(coordinator_args)
        self.worker_args = list(worker_args)
        self.threads_per_worker = threads_per_worker
        self.startup_timeout = startup_timeout
        self.coordinator: Optional[ChildProcess] = None
        self.workers: list[ChildProcess] = []
        self._all: list[ChildProcess] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._all)
        self._status_client: Optional[Client] = None

    # ------------------------------------------------------------ lifetime

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "LocalCluster":
        try:
            self._start_coordinator(port=0)
            launched = [self._spawn_worker(self.capacity, ()) for _ in range(self.initial_workers)]
            for process in launched:
                process.ready(self.startup_timeout)
            self.wait_for_workers(self.initial_workers)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Workers first (they deregister), then the coordinator; nothing left behind."""
        for process in self.workers:
            if process.alive():
                process.popen.send_signal(signal.SIGTERM)
        for process in self.workers:
            process.stop()
        self.workers.clear()
        if self._status_client is not None:
            self._status_client.close()
            self._status_client = None
        if self.coordinator is not None:
            self.coordinator.stop()
        _stop_all(self._all)
        self._all.clear()

    def _common_args(self, role: str) -> list[str]:
        args = ["--host", self.host, "--log-level", self.log_level]
        if self.max_message_mb:
            args += ["--max-message-mb", str(self.max_message_mb)]
        if self.tls:
            files = TlsConfig.from_dir(self.tls, role)
            args += ["--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", str(files.ca)]
            if self.mtls:
                args.append("--mtls")
        return args

    def _env(self, role: str) -> dict[str, str]:
        """The child's environment, with the tokens its role uses (kept off the command line)."""
        env = child_env()
        tokens = {"GRADPOOL_WORKER_TOKEN": self.worker_token, "GRADPOOL_COORDINATOR_TOKEN": self.coordinator_token}
        if role == "coordinator":
            tokens["GRADPOOL_TOKEN"] = self.token
        env.update({name: value for name, value in tokens.items() if value})
        return env

    @property
    def client_tls(self) -> Optional[TlsConfig]:
        """What a client of this cluster connects with (None: plaintext)."""
        return TlsConfig.from_dir(self.tls, "client") if self.tls else None

    def _start_coordinator(self, port: int) -> None:
        args = ["--port", str(port), "--heartbeat-seconds", str(self.heartbeat_seconds),
                "--lease-seconds", str(self.lease_seconds), *self._common_args("coordinator"),
                *self.coordinator_args]
        self.coordinator = ChildProcess("coordinator", args, self._env("coordinator"))
        self._all.append(self.coordinator)
        self.coordinator.ready(self.startup_timeout)

    def _spawn_worker(self, capacity: float, extra_args: Sequence[str]) -> ChildProcess:
        """Launch a worker (not yet ready: call `.ready()`)."""
        if self.coordinator is None:
            raise ClusterError("the cluster is not started")
        args = ["--coordinator", self.coordinator.address, "--port", "0", "--capacity", str(capacity),
                *self._common_args("worker"), *self.worker_args, *extra_args]
        env = self._env("worker")
        if self.threads_per_worker:
            for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                env[name] = str(self.threads_per_worker)
        process = ChildProcess("worker", args, env)
        self._all.append(process)
        self.workers.append(process)
        return process

    # ------------------------------------------------------------ the pool

    @property
    def address(self) -> str:
        if self.coordinator is None:
            raise ClusterError("the cluster is not started")
        return self.coordinator.address

    @property
    def worker_addresses(self) -> list[str]:
        return [w.address for w in self.workers]

    def client(self, timeout: Optional[float] = None, **kwargs: object) -> Client:
        """A Client for this cluster (with its client token and TLS files)."""
        kwargs.setdefault("tls", self.client_tls)
        return Client(self.address, token=self.token, timeout=timeout, **kwargs)  # type: ignore[arg-type]

    def status(self) -> ClusterStatus:
        if self._status_client is None:
            self._status_client = Client(self.address, token=self.token, tls=self.client_tls,
                                         retry=RetryPolicy(attempts=2, initial_backoff=0.05))
        return self._status_client.status(timeout=5.0)

    def wait_for_workers(self, count: Optional[int] = None, timeout: Optional[float] = None) -> ClusterStatus:
        """Block until the coordinator lists exactly the running workers, all live."""
        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        expected = sorted(self.worker_addresses)
        count = len(expected) if count is None else count
        status: Optional[ClusterStatus] = None
        while time.monotonic() < deadline:
            if self.coordinator is None or not self.coordinator.alive():
                raise ClusterError("the coordinator exited")
            dead = [w for w in self.workers if not w.alive()]
            if dead:
                raise ClusterError(f"worker(s) exited: {dead}")
            try:
                status = self.status()
            except ServiceError:
                status = None
            if status is not None:
                live = sorted(w.address for w in status.live_workers)
                if len(status.workers) == count and live == expected:
                    return status
            time.sleep(0.02)
        seen = [(w.address, w.state) for w in status.workers] if status else "no answer"
        raise ClusterError(f"expected {count} live worker(s) {expected} within {timeout:.0f}s, the coordinator "
                           f"lists {seen}")

    def add_worker(self, capacity: Optional[float] = None, args: Sequence[str] = (), *,
                   wait: bool = True) -> ChildProcess:
        """Start one more worker; with `wait`, block until the coordinator uses it
        (without, only until it listens)."""
        process = self._spawn_worker(self.capacity if capacity is None else capacity, args)
        try:
            process.ready(self.startup_timeout)
        except BaseException:
            self.workers.remove(process)
            raise
        if wait:
            self.wait_for_workers()
        return process

    def stop_worker(self, index: int = -1, *, kill: bool = False, wait: bool = True) -> ChildProcess:
        """Stop the index-th running worker: gracefully (it deregisters), or with
        SIGKILL (`kill=True`: the coordinator notices by the lapsed lease or a
        failed call). With `wait`, block until the coordinator no longer lists it."""
        process = self.workers.pop(index)
        process.stop(kill=kill)
        if wait:
            self.wait_for_workers(timeout=self.lease_seconds + 10.0)
        return process

    def scale_to(self, count: int) -> None:
        """Add or stop workers until exactly `count` run."""
        while len(self.workers) < count:
            self.add_worker()
        while len(self.workers) > count:
            self.stop_worker()

    def restart_coordinator(self, wait: bool = True, down_seconds: float = 0.0, kill: bool = False) -> None:
        """Stop the coordinator (SIGKILL with `kill`), wait `down_seconds`, and
        start a fresh one on the same port; it knows no graphs, datasets or
        workers until they are sent and register again."""
        if self.coordinator is None:
            raise ClusterError("the cluster is not started")
        port = self.coordinator.port
        self.coordinator.stop(kill=kill)
        if self._status_client is not None:
            self._status_client.close()
            self._status_client = None
        time.sleep(down_seconds)
        self._start_coordinator(port=port)
        if wait:
            self.wait_for_workers()

    def __repr__(self) -> str:
        where = self.coordinator.address if self.coordinator else "not started"
        return f"<LocalCluster {where}, {len(self.workers)} worker(s)>"


@contextlib.contextmanager
def gradient_service(coordinator: Optional[str] = None, *, workers: int = 2, local: bool = False,
                     token: Optional[str] = None, timeout: Optional[float] = None) -> Iterator[Any]:
    """Where a script's gradients come from, chosen by its flags: a `Client` of a
    running `coordinator`, of a fresh LocalCluster of `workers` processes, or
    (`local=True`) the in-process engine. All three answer `.gradients` and
    `.forward` the same way, so the rest of a script does not care."""
    if local:
        from .training import LocalBackend

        yield LocalBackend()
        return
    if coordinator:
        with Client(coordinator, token=token, timeout=timeout) as client:
            yield client
        return
    # The workers share this machine's cores: each gets its share of BLAS threads, or
    # their thread pools fight (a conv net's steps ran ~10x slower on two cores).
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    with LocalCluster(workers=workers, threads_per_worker=threads) as cluster, \
            Client(cluster.address, token=token, timeout=timeout) as client:
        yield client
