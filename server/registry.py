"""The coordinator's view of the worker pool.

Workers register (address, capacity, stable id) and heartbeat; one silent
for longer than its lease is dropped. Static workers (`--workers`) never
expire. A worker that fails a call with UNAVAILABLE is marked unreachable
and left out of new requests until it heartbeats again (static ones until a
probe answers). Every request takes `pool()` as it is at that moment, so
workers join and leave at any time.

A worker that a shard audit found wrong (fanout.py) is quarantined: it
stays listed (state "quarantined") but gets no shards. Its heartbeats and
its registering again under the same id do not lift that, so a faulty
process cannot clear itself; the entry goes only when the worker leaves
(deregisters: a restart, which is how an operator clears it) or its lease
lapses, and a static worker's stays until the coordinator restarts.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import grpc

from gradpool.protos import gradpool_pb2 as pb
from gradpool.protos import gradpool_pb2_grpc as pb_grpc
from gradpool.worker.observability import WORKERS, WORKERS_QUARANTINED
from gradpool.worker.rpc import RpcFailure, TlsConfig, method_path, open_channel

log = logging.getLogger("gradpool.coordinator")

LIVE = "live"
UNREACHABLE = "unreachable"
SUSPECT = "suspect"  # live, but a shard of its straggled (shown in status; still planned)
QUARANTINED = "quarantined"  # an audit found its result wrong: no shards until it restarts


@dataclass(eq=False)
class WorkerEntry:
    """One worker: its channel, what it has been sent, and what it has served."""

    worker_id: str
    address: str
    capacity: float
    static: bool
    channel: grpc.Channel
    stub: pb_grpc.WorkerStub
    # RunShard and RunShardStream on raw bytes: requests are written and
    # responses read by wire.py, never as protobuf objects (no tensor copies).
    run_shard: grpc.UnaryUnaryMultiCallable
    run_shard_stream: grpc.StreamStreamMultiCallable
    last_contact: float = field(default_factory=time.monotonic)
    state: str = LIVE
    graphs: set[str] = field(default_factory=set)
    datasets: set[str] = field(default_factory=set)
    shards_served: int = 0
    examples_served: int = 0
    graphs_sent: int = 0
    errors: int = 0
    in_flight: int = 0
    retired: bool = False
    # A shard of its ran far longer than its siblings and was hedged: not
    # picked for retries and hedges until it finishes a shard again.
    suspect: bool = False
    # Dropped for missed heartbeats (hung or dead), as opposed to leaving:
    # a draining worker finishes its shards, a lapsed one may never answer.
    lapsed: bool = False
    # The lease secret its registration returned: heartbeats, deregistration
    # and re-registration under its id must carry it ("" until one registered).
    secret: str = field(default="", repr=False)
    # Why it was quarantined (state QUARANTINED), for the log and status.
    quarantine_reason: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Held while sending a graph, so concurrent requests send it once.
    load_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def describe(self) -> str:
        return f"{self.worker_id} ({self.address})" if self.worker_id != self.address else self.address

    def acquire(self) -> None:
        """Count a call in flight, so that `retire` closes the channel only after it."""
        with self.lock:
            self.in_flight += 1

    def release(self) -> None:
        with self.lock:
            self.in_flight -= 1
            close = self.retired and self.in_flight == 0
        if close:
            self.channel.close()

    def retire(self) -> None:
        """Close the channel once no call is using it."""
        with self.lock:
            self.retired = True
            close = self.in_flight == 0
        if close:
            self.channel.close()

    def has_graph(self, graph_id: str) -> bool:
        with self.lock:
            return graph_id in self.graphs

    def graph_sent(self, graph_id: str) -> None:
        with self.lock:
            self.graphs.add(graph_id)
            self.graphs_sent += 1

    def forget_graph(self, graph_id: str) -> None:
        """The worker answered NOT_FOUND: it restarted or evicted the graph."""
        with self.lock:
            self.graphs.discard(graph_id)

    def has_dataset(self, dataset_id: str) -> bool:
        with self.lock:
            return dataset_id in self.datasets

    def dataset_sent(self, dataset_id: str) -> None:
        with self.lock:
            self.datasets.add(dataset_id)

    def forget_dataset(self, dataset_id: str) -> None:
        with self.lock:
            self.datasets.discard(dataset_id)

    def served(self, examples: int) -> None:
        with self.lock:
            self.shards_served += 1
            self.examples_served += examples
            self.suspect = False
            if self.static:  # no heartbeats: a served shard is the sign of life
                self.last_contact = time.monotonic()

    def failed(self) -> None:
        with self.lock:
            self.errors += 1

    def mark_suspect(self) -> None:
        with self.lock:
            was, self.suspect = self.suspect, True
        if not was:
            log.warning("worker %s is suspect: a shard of its straggled and was hedged", self.describe())

    def info(self, now: float) -> pb.WorkerInfo:
        with self.lock:
            return pb.WorkerInfo(worker_id=self.worker_id, address=self.address, capacity=self.capacity,
                                 state=SUSPECT if self.suspect and self.state == LIVE else self.state,
                                 seconds_since_heartbeat=max(0.0, now - self.last_contact),
                                 shards_served=self.shards_served, examples_served=self.examples_served,
                                 graphs_sent=self.graphs_sent, errors=self.errors, static=self.static)


def _same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison; an entry without a secret matches nothing."""
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def _refuse(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.PERMISSION_DENIED, message)


class WorkerRegistry:
    """Thread-safe set of workers, keyed by worker id.

    Each registration gets a random lease secret; the worker's heartbeats,
    its deregistration and its registering again under the same id while the
    entry is known must carry it, so no one else can take over, renew or
    remove its entry. A new worker at the address of a live one is refused
    until that one deregisters or its lease lapses.
    """

    def __init__(self, lease_seconds: float, channel_options: Sequence[tuple[str, int]],
                 tls: Optional[TlsConfig] = None):
        self.lease_seconds = lease_seconds
        self._options = list(channel_options)
        self._tls = tls
        self._workers: dict[str, WorkerEntry] = {}
        self._lock = threading.Lock()

    def _connect(self, worker_id: str, address: str, capacity: float, static: bool) -> WorkerEntry:
        channel = open_channel(address, self._tls, self._options)
        run_shard = channel.unary_unary(method_path("Worker", "RunShard"), request_serializer=None,
                                        response_deserializer=None)
        run_shard_stream = channel.stream_stream(method_path("Worker", "RunShardStream"), request_serializer=None,
                                                 response_deserializer=None)
        stub = pb_grpc.WorkerStub(channel)
        # LoadGraph on raw bytes too: a graph's LoadGraph message is built once, as
        # bytes, when it is registered (GraphStore), and never kept as protobuf objects.
        stub.LoadGraph = channel.unary_unary(method_path("Worker", "LoadGraph"), request_serializer=None,
                                             response_deserializer=pb.LoadGraphResponse.FromString)
        return WorkerEntry(worker_id, address, capacity, static, channel, stub, run_shard,
                           run_shard_stream,
                           last_contact=time.monotonic())

    def add_static(self, address: str, capacity: float = 1.0) -> None:
        with self._lock:
            self._workers[address] = self._connect(address, address, capacity, static=True)
        log.info("static worker %s", address)

    def _live(self, entry: WorkerEntry, now: float) -> bool:
        """Holding its address: live, or quarantined and still heartbeating."""
        with entry.lock:
            return entry.state in (LIVE, QUARANTINED) and (entry.static or now - entry.last_contact <= self.lease_seconds)

    def register(self, address: str, capacity: float, worker_id: str, secret: str = "") -> WorkerEntry:
        """Add or refresh a worker; the entry's `secret` is its lease secret.

        Registering under a known id needs that entry's secret (PERMISSION_DENIED
        otherwise). A registration at a static worker's address refreshes that
        entry (the first one sets its secret). A new id at the address of a live
        worker is refused; at that of a lapsed or unreachable one it replaces it.
        """
        retired = []
        now = time.monotonic()
        with self._lock:
            entry = self._workers.get(worker_id)
            if entry is not None and not entry.static and not _same_secret(secret, entry.secret):
                raise _refuse(f"worker id {worker_id!r} is taken by a registered worker: registering under it "
                              "needs that registration's lease secret")
            if entry is not None and entry.address == address:
                with entry.lock:
                    entry.capacity, entry.last_contact = capacity, now
                    entry.state = QUARANTINED if entry.state == QUARANTINED else LIVE
                return entry
            static = next((w for w in self._workers.values() if w.static and w.address == address), None)
            if static is not None:
                if static.secret and not _same_secret(secret, static.secret):
                    raise _refuse(f"the static worker at {address} is registered: registering it again needs "
                                  "that registration's lease secret")
                with static.lock:
                    static.capacity, static.last_contact = capacity, now
                    static.state = QUARANTINED if static.state == QUARANTINED else LIVE
                    static.secret = static.secret or secrets.token_urlsafe(32)
                return static
            for other_id, other in self._workers.items():
                if other_id != worker_id and other.address == address and self._live(other, now):
                    raise _refuse(f"{address} is the address of live worker {other_id!r}: a new worker there is "
                                  "taken only once it deregisters or its lease lapses")
            for other_id, other in list(self._workers.items()):
                if other_id == worker_id or other.address == address:
                    retired.append(self._workers.pop(other_id))
            entry = self._connect(worker_id, address, capacity, static=False)
            entry.secret = secrets.token_urlsafe(32)
            self._workers[worker_id] = entry
        for old in retired:
            log.info("worker %s replaced by %s", old.describe(), entry.describe())
            old.retire()
        log.info("worker %s joined (capacity %g)", entry.describe(), capacity)
        self.publish()
        return entry

    def heartbeat(self, worker_id: str, secret: str = "") -> bool:
        """Renew a lease; False when the worker is unknown (it must register).
        A wrong lease secret is PERMISSION_DENIED."""
        with self._lock:
            entry = self._workers.get(worker_id)
        if entry is None:
            return False
        if not _same_secret(secret, entry.secret):
            raise _refuse(f"wrong lease secret for worker {worker_id!r}")
        with entry.lock:
            entry.last_contact = time.monotonic()
            if entry.state == UNREACHABLE:
                log.info("worker %s is reachable again", entry.describe())
                entry.state = LIVE
        return True

    def deregister(self, worker_id: str, secret: str = "") -> bool:
        """Remove a registered worker (static ones stay); a wrong lease secret is PERMISSION_DENIED."""
        with self._lock:
            entry = self._workers.get(worker_id)
            if entry is None:
                return False
            if not _same_secret(secret, entry.secret):
                raise _refuse(f"wrong lease secret for worker {worker_id!r}")
            if entry.static:
                return True
            del self._workers[worker_id]
        log.info("worker %s left", entry.describe())
        entry.retire()
        self.publish()
        return True

    def mark_unreachable(self, entry: WorkerEntry, why: str) -> None:
        with entry.lock:
            was = entry.state
            if was == QUARANTINED:
                return
            entry.state = UNREACHABLE
        if was != UNREACHABLE:
            log.warning("worker %s unreachable: %s", entry.describe(), why)

    def mark_reachable(self, entry: WorkerEntry) -> None:
        with entry.lock:
            if entry.state == UNREACHABLE:
                entry.state = LIVE
            entry.last_contact = time.monotonic()

    def quarantine(self, entry: WorkerEntry, why: str) -> None:
        """Take a worker an audit found wrong out of the pool (see the module
        docstring for what lifts it); one ERROR line, JSON field event=quarantine."""
        with entry.lock:
            was = entry.state
            entry.state, entry.quarantine_reason = QUARANTINED, why
        if was != QUARANTINED:
            WORKERS_QUARANTINED.inc()
            log.error("worker %s quarantined: %s", entry.describe(), why,
                      extra={"event": "quarantine", "worker": entry.worker_id})
            self.publish()

    def expire(self) -> list[WorkerEntry]:
        """Drop registered workers whose lease lapsed; return them."""
        now = time.monotonic()
        with self._lock:
            lapsed = [w for w in self._workers.values()
                      if not w.static and now - w.last_contact > self.lease_seconds]
            for entry in lapsed:
                del self._workers[entry.worker_id]
                entry.lapsed = True
        for entry in lapsed:
            log.warning("worker %s dropped: no heartbeat for %.1fs (lease %.1fs)", entry.describe(),
                        now - entry.last_contact, self.lease_seconds)
            entry.retire()
        return lapsed

    def publish(self) -> None:
        """The workers by state, for the `gradpool_workers` gauge."""
        counts = {LIVE: 0, UNREACHABLE: 0, SUSPECT: 0, QUARANTINED: 0}
        with self._lock:
            entries = list(self._workers.values())
        for entry in entries:
            counts[SUSPECT if entry.suspect and entry.state == LIVE else entry.state] += 1
        for state, count in counts.items():
            WORKERS.labels(state).set(count)

    def pool(self) -> list[WorkerEntry]:
        """Live workers in a stable order (by id), so that the same worker set
        splits the same batch the same way every time."""
        self.expire()
        with self._lock:
            entries = list(self._workers.values())
        return sorted((w for w in entries if w.state == LIVE), key=lambda w: w.worker_id)

    def all(self) -> list[WorkerEntry]:
        self.expire()
        with self._lock:
            return sorted(self._workers.values(), key=lambda w: w.worker_id)

    def unreachable_static(self) -> list[WorkerEntry]:
        with self._lock:
            return [w for w in self._workers.values() if w.static and w.state == UNREACHABLE]

    def close(self) -> None:
        with self._lock:
            entries = list(self._workers.values())
            self._workers.clear()
        for entry in entries:
            entry.retire()
