"""`make compose-test`: the docker-compose cluster, built and run on a real Docker engine.

Builds the images, brings the cluster up with 3 workers, waits for health, and
checks what README's Cluster section promises, each step with a clear failure
message and the logs of the containers involved:

  status      `gradpool status` lists 3 live workers at their container addresses
  host demo   the SDK on this host trains the digits demo through the published port to >= 95%
  demo        the `demo` profile writes model.npz, metrics.json, curves.png into its volume,
              readable afterwards; a root-owned --out is refused before any training
  kill        `docker kill` of a worker during training: training completes
  restart     restarting the coordinator container during training: training completes
  scale       scaling to 5 workers during training: the new workers get shards
  token       with GRADPOOL_TOKEN and GRADPOOL_WORKER_TOKEN set: the host without the client token is
              refused, with it it trains
  down        `down -v` leaves no container, network or volume of the project

The compose project gets its own name and a free host port, so a cluster the
user runs is left alone; `down -v` runs at the end whatever happened (also on
SIGTERM/SIGINT). Every command has a timeout. Host-side checks use the SDK
installed in the running Python (the project's .venv). Needs a Docker engine
and `docker compose` (v2) or `docker-compose` (v1.29); COMPOSE overrides which.

    .venv/bin/python scripts/compose_test.py [--keep-images] [--skip-build]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

import gradpool as gp
from gradpool.demo import build_mlp, load_digits_split

ROOT = Path(__file__).resolve().parent.parent
PROJECT = os.environ.get("GRADPOOL_COMPOSE_PROJECT", "gradpool-compose-test")
LABEL = f"com.docker.compose.project={PROJECT}"
WORKER_PORT = 50052
STARTED = time.monotonic()
# Generous retries: a coordinator restart takes seconds, and the SDK's retry
# (with the deadline of each call) is what carries training across it.
PATIENT = gp.RetryPolicy(initial_backoff=0.1, max_backoff=1.0, budget_seconds=40)


class CheckFailed(Exception):
    """A check did not hold; the message says what was expected and what happened."""


def log(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


# ------------------------------------------------------------------ commands


def run(argv: Sequence[str], *, timeout: float, check: bool = True, env: Optional[dict] = None,
        what: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run a command with a timeout; on failure (when `check`) raise CheckFailed with its output."""
    what = what or " ".join(shlex.quote(a) for a in argv)
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                                env=env or os.environ.copy(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"")[-3000:] if isinstance(err.stdout, bytes) else (err.stdout or "")[-3000:]
        raise CheckFailed(f"`{what}` did not finish within {timeout:.0f} s\n{out}") from None
    if check and result.returncode != 0:
        raise CheckFailed(f"`{what}` exited with status {result.returncode}\n"
                          f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result


def compose_command() -> list[str]:
    if os.environ.get("COMPOSE"):
        return shlex.split(os.environ["COMPOSE"])
    for candidate in (["docker", "compose"], ["docker-compose"]):
        try:
            if subprocess.run([*candidate, "version"], capture_output=True, timeout=30).returncode == 0:
                return candidate
        except (OSError, subprocess.TimeoutExpired):
            continue
    raise CheckFailed("neither `docker compose` nor `docker-compose` works here: install one (or set COMPOSE)")


class Cluster:
    """The compose project under test: commands, containers, logs."""

    def __init__(self, port: int):
        self.compose = compose_command()
        self.port = port
        self.address = f"localhost:{port}"
        self.token = ""
        self.worker_token = ""
        self.certs = ""  # a folder of `gradpool certs`: then TLS (docker-compose.tls.yml) on every port

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRADPOOL_") and k != "COMPOSE_FILE"}
        env.update(GRADPOOL_PUBLISH_PORT=str(self.port), GRADPOOL_TOKEN=self.token,
                   GRADPOOL_WORKER_TOKEN=self.worker_token, COMPOSE_PROJECT_NAME=PROJECT,
                   COMPOSE_FILE="docker-compose.yml")  # not a .env's TLS override
        if self.certs:
            env.update(COMPOSE_FILE=os.pathsep.join(["docker-compose.yml", "docker-compose.tls.yml"]),
                       GRADPOOL_CERTS_DIR=self.certs)
        return env

    def __call__(self, *args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        return run([*self.compose, "-p", PROJECT, *args], timeout=timeout, check=check, env=self.env(),
                   what=f"{' '.join(self.compose)} {' '.join(args)}")

    def containers(self, service: str, *, running: bool = True) -> list[str]:
        """Full ids of the service's containers (running ones, or all)."""
        result = run(["docker", "ps", "-q", "--no-trunc", *([] if running else ["-a"]),
                      "--filter", f"label={LABEL}",
                      "--filter", f"label=com.docker.compose.service={service}"], timeout=30)
        return result.stdout.split()

    def health(self, container: str) -> str:
        result = run(["docker", "inspect", "--format",
                      "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}", container],
                     timeout=30, check=False)
        return result.stdout.strip() or "gone"

    def logs(self, services: Sequence[str], tail: int = 60) -> str:
        try:
            return self("logs", "--no-color", f"--tail={tail}", *services, timeout=60, check=False).stdout
        except CheckFailed as err:
            return f"(no logs: {err})"

    def client(self, token: Optional[str] = None, retry: gp.RetryPolicy = PATIENT) -> gp.Client:
        return gp.Client(self.address, token=token, timeout=60, retry=retry)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gradpool_cli(*args: str, timeout: float, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """The `gradpool` command of the SDK installed here (the project's .venv)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GRADPOOL_")}
    return run([sys.executable, "-m", "gradpool.cli", *args], timeout=timeout, check=False,
               env={**base, **(env or {})}, what=f"gradpool {' '.join(args)}")


# ------------------------------------------------------------------ waiting


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.25) -> float:
    """Poll until `condition()` is truthy; returns the seconds it took, or raises CheckFailed
    with `what` and the last state the condition saw (its return value or exception)."""
    started = time.monotonic()
    last: object = None
    while time.monotonic() - started < timeout:
        try:
            last = condition()
            if last:
                return time.monotonic() - started
        except (gp.ServiceError, CheckFailed) as err:
            last = err
        time.sleep(interval)
    raise CheckFailed(f"{what}: not within {timeout:.0f} s (last seen: {last})")


def wait_healthy(cluster: Cluster, workers: int, timeout: float) -> float:
    def healthy() -> bool:
        states = {c[:12]: cluster.health(c) for c in cluster.containers("coordinator") + cluster.containers("worker")}
        healthy.last = states  # type: ignore[attr-defined]
        return (len(cluster.containers("worker")) == workers and len(cluster.containers("coordinator")) == 1
                and all(s == "running healthy" for s in states.values()))
    try:
        return wait_until(healthy, timeout, f"coordinator + {workers} workers healthy", interval=0.5)
    except CheckFailed as err:
        raise CheckFailed(f"{err}; container states: {getattr(healthy, 'last', '?')}") from None


def live_addresses(client: gp.Client) -> dict[str, str]:
    """worker id -> address of the live workers the coordinator reports."""
    return {w.worker_id: w.address for w in client.status(timeout=5).live_workers}


def wait_live(client: gp.Client, workers: int, timeout: float) -> float:
    return wait_until(lambda: len(live_addresses(client)) == workers, timeout,
                      f"{workers} live workers in the coordinator's status")


# ------------------------------------------------------------------ training through the cluster


DATA = {}


def digits() -> tuple[dict, dict]:
    if not DATA:
        DATA["train"], DATA["test"], _ = load_digits_split(seed=0)
    return DATA["train"], DATA["test"]


def accuracy(client: gp.Client, graph: gp.Graph, params: dict, test: dict) -> float:
    logits = client.forward(graph, params, {"x": test["x"]}, ["logits"])["logits"]
    return float(np.mean(np.argmax(logits, axis=1) == test["y"]))


def train_through(cluster: Cluster, client: gp.Client, action: Callable[[], str], what: str, *,
                  act_at_step: int = 15, steps_after: int = 40, max_seconds: float = 120,
                  until: Callable[[list], bool] = lambda steps: True) -> dict:
    """Train the digits MLP step by step through the cluster; at step `act_at_step` run
    `action` in a thread (it disrupts the cluster), and go on until it has finished, at
    least `steps_after` more steps have completed and `until(steps)` holds. Any step
    that fails (the SDK's retries exhausted) fails the check. Returns figures."""
    train, test = digits()
    graph = build_mlp(64, 64, 10)
    params = graph.init_params(0)
    optimizer = gp.Adam(params, lr=0.01)
    rng = np.random.default_rng(0)
    steps: list[dict] = []  # per step: seconds, shard workers
    outcome: dict = {}

    def act() -> None:
        try:
            outcome["note"] = action()
        except BaseException as err:  # reported by the training loop
            outcome["error"] = err
        outcome["done_at"] = len(steps)

    thread = threading.Thread(target=act, daemon=True)
    started = time.monotonic()
    while True:
        if time.monotonic() - started > max_seconds:
            raise CheckFailed(f"{what}: training did not get {steps_after} steps past the disruption within "
                              f"{max_seconds:.0f} s ({len(steps)} steps, action "
                              f"{'finished' if 'done_at' in outcome else 'still running'})")
        index = rng.choice(len(train["y"]), 64, replace=False)
        batch = {"x": train["x"][index], "y": train["y"][index]}
        t = time.perf_counter()
        try:
            result = client.gradients(graph, params, batch)
        except gp.ServiceError as err:
            raise CheckFailed(f"{what}: training step {len(steps) + 1} failed: {err}") from None
        # ShardStat.worker reads "<worker id> (<address>)"
        steps.append({"seconds": time.perf_counter() - t, "workers": [s.worker.split(" ")[0] for s in result.shards],
                      "loss": result.loss})
        optimizer.step(result.grads)
        if len(steps) == act_at_step:
            thread.start()
        if "error" in outcome:
            err = outcome["error"]
            raise CheckFailed(f"{what}: the disruption itself failed: {err}")
        if "done_at" in outcome and len(steps) >= outcome["done_at"] + steps_after and until(steps):
            break
    thread.join(timeout=5)
    final = accuracy(client, graph, params, test)
    slowest = max(steps, key=lambda s: s["seconds"])
    return {"steps": len(steps), "seconds": time.monotonic() - started, "test_accuracy": final,
            "slowest_step_s": slowest["seconds"], "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
            "note": outcome.get("note", "")}


# ------------------------------------------------------------------ the checks


class Checks:
    def __init__(self, cluster: Cluster, args: argparse.Namespace):
        self.cluster = cluster
        self.args = args
        self.results: list[tuple[str, float, str]] = []
        self.figures: dict = {}

    @contextmanager
    def check(self, name: str, logs_of: Sequence[str] = ("coordinator", "worker")) -> Iterator[list]:
        """One named check: its time and a one-line result, or the failure with the containers' logs."""
        log(f"--- {name}")
        started = time.monotonic()
        note: list = []
        try:
            yield note
        except CheckFailed as err:
            print(f"\nFAILED: {name}\n{err}\n", file=sys.stderr, flush=True)
            if logs_of:
                print(f"--- logs of {', '.join(logs_of)} (last lines) ---\n{self.cluster.logs(logs_of)}",
                      file=sys.stderr, flush=True)
            raise
        seconds = time.monotonic() - started
        self.results.append((name, seconds, "; ".join(note)))
        log(f"ok   {name} ({seconds:.1f} s){': ' + '; '.join(note) if note else ''}")

    # -- build and up

    def build(self) -> None:
        with self.check("build the images (gradpool, gradpool-demo)", logs_of=()) as note:
            if self.args.skip_build:
                note.append("skipped (--skip-build)")
                return
            t = time.monotonic()
            self.cluster("--profile", "demo", "build", timeout=900)
            self.figures["build_s"] = time.monotonic() - t
            size = run(["docker", "image", "inspect", "--format", "{{.Size}}", "gradpool:latest"], timeout=30)
            self.figures["image_mb"] = int(size.stdout.strip()) / 1e6
            note.append(f"{self.figures['build_s']:.0f} s, gradpool:latest {self.figures['image_mb']:.0f} MB")

    def up(self) -> None:
        with self.check("up -d --scale worker=3, healthy") as note:
            t = time.monotonic()
            self.cluster("up", "-d", "--scale", "worker=3", timeout=180)
            wait_healthy(self.cluster, 3, timeout=120)
            healthy = time.monotonic() - t
            with self.cluster.client() as client:
                wait_live(client, 3, timeout=30)
            self.figures["healthy_s"] = healthy
            self.figures["live_s"] = time.monotonic() - t
            note.append(f"healthy {healthy:.1f} s after `up`, 3 workers registered at "
                        f"{self.figures['live_s']:.1f} s")

    # -- the cluster as README describes it

    def status(self) -> None:
        with self.check("gradpool status: 3 live workers at container addresses") as note:
            result = gradpool_cli("status", "--coordinator", self.cluster.address, "--json", timeout=60)
            if result.returncode != 0:
                raise CheckFailed(f"`gradpool status` exited {result.returncode}: {result.stderr.strip()}")
            status = json.loads(result.stdout)
            live = sorted(w["address"] for w in status["workers"] if w["state"] == "live")
            want = sorted(f"{c[:12]}:{WORKER_PORT}" for c in self.cluster.containers("worker"))
            if live != want:
                raise CheckFailed(f"`gradpool status` lists live workers at {live}; the worker containers are "
                                  f"{want} (<container id>:{WORKER_PORT}, reached through Docker's DNS)")
            table = gradpool_cli("status", "--coordinator", self.cluster.address, timeout=60)
            if "3 live of 3 worker(s)" not in table.stdout:
                raise CheckFailed(f"the status table does not say 3 live workers:\n{table.stdout}{table.stderr}")
            ports = run(["docker", "ps", "--format", "{{.Ports}}", "--filter", f"label={LABEL}",
                         "--filter", "label=com.docker.compose.service=worker"], timeout=30).stdout.split("\n")
            wrong = [p for p in ports if p.strip() and p.strip() != f"{WORKER_PORT}/tcp"]
            if wrong:
                raise CheckFailed(f"worker containers should show only {WORKER_PORT}/tcp (the port they listen "
                                  f"on), docker ps shows {wrong}")
            note.append(", ".join(live))

    def host_demo(self) -> None:
        with self.check("host SDK trains the digits demo through the published port (>= 95%)") as note, \
                tempfile.TemporaryDirectory() as out:
            result = gradpool_cli("demo", "--coordinator", self.cluster.address, "--out", out, "--no-progress",
                                  "--timeout", "60", "--min-accuracy", "0.95", timeout=300)
            if result.returncode != 0:
                raise CheckFailed(f"`gradpool demo --coordinator {self.cluster.address}` exited "
                                  f"{result.returncode}:\n{result.stdout}{result.stderr}")
            metrics = json.loads((Path(out) / "metrics.json").read_text())
            if metrics["workers"] != 3:
                raise CheckFailed(f"the demo saw {metrics['workers']} workers, not 3")
            self.figures["host_demo"] = {k: metrics[k] for k in ("test_accuracy", "examples_per_s", "steps",
                                                                  "seconds_per_step", "training_seconds")}
            note.append(f"{100 * metrics['test_accuracy']:.1f}% test accuracy, {metrics['steps']} steps, "
                        f"{metrics['examples_per_s']:,.0f} examples/s, "
                        f"{1000 * metrics['seconds_per_step']:.1f} ms/step")

    def demo_profile(self) -> None:
        with self.check("demo profile writes model.npz, metrics.json, curves.png to its volume",
                        logs_of=("coordinator", "worker", "demo")) as note:
            t = time.monotonic()
            result = self.cluster("--profile", "demo", "run", "--rm", "-T", "demo", timeout=300, check=False)
            seconds = time.monotonic() - t
            if result.returncode != 0:
                raise CheckFailed(f"`--profile demo run --rm demo` exited {result.returncode}:\n"
                                  f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
            volumes = run(["docker", "volume", "ls", "-q", "--filter", f"label={LABEL}"], timeout=30).stdout.split()
            volume = next((v for v in volumes if v.endswith("demo-out")), None)
            if volume is None:
                raise CheckFailed(f"no demo-out volume of project {PROJECT}: volumes {volumes}")
            # Read it back as the image's user, from a fresh container: what a user would do.
            reader = ("import json, numpy as np, os, sys\n"
                      "d = '/out'; names = sorted(os.listdir(d))\n"
                      "m = json.load(open(f'{d}/metrics.json'))\n"
                      "z = np.load(f'{d}/model.npz', allow_pickle=False); keys = len(z.files)\n"
                      "png = open(f'{d}/curves.png', 'rb').read()\n"
                      "print(json.dumps({'names': names, 'accuracy': m['test_accuracy'], 'npz_keys': keys,\n"
                      "  'png': png[:8] == b'\\x89PNG\\r\\n\\x1a\\n', 'png_bytes': len(png),\n"
                      "  'owners': sorted({os.stat(f'{d}/{n}').st_uid for n in names}),\n"
                      "  'examples_per_s': m['examples_per_s']}))\n")
            read = run(["docker", "run", "--rm", "-v", f"{volume}:/out:ro", "--entrypoint", "python",
                        "gradpool:latest", "-c", reader], timeout=120, check=False)
            if read.returncode != 0:
                raise CheckFailed(f"the demo's outputs in volume {volume} could not be read back:\n{read.stderr}")
            found = json.loads(read.stdout.strip().splitlines()[-1])
            if not {"model.npz", "metrics.json", "curves.png"} <= set(found["names"]) or not found["png"] \
                    or found["npz_keys"] == 0:
                raise CheckFailed(f"the demo volume {volume} holds {found}")
            if found["accuracy"] < 0.95:
                raise CheckFailed(f"the demo profile's run reached {found['accuracy']:.3f}, below 0.95")
            self.figures["demo_profile"] = {"seconds": seconds, **found}
            note.append(f"{', '.join(found['names'])} (uid {found['owners']}), {100 * found['accuracy']:.1f}%, "
                        f"{found['examples_per_s']:,.0f} examples/s, run {seconds:.0f} s")

        with self.check("demo refuses an unwritable --out before training", logs_of=("demo",)) as note:
            # What Docker does with a volume at a path the image lacks: the folder is root's.
            t = time.monotonic()
            result = self.cluster("--profile", "demo", "run", "--rm", "-T", "-v", "/home/gradpool/elsewhere",
                                  "demo", "demo", "--coordinator", "coordinator:50051",
                                  "--out", "/home/gradpool/elsewhere", "--no-progress", timeout=120, check=False)
            seconds = time.monotonic() - t
            text = result.stdout + result.stderr
            if result.returncode != 1 or "cannot write to the output folder /home/gradpool/elsewhere" not in text:
                raise CheckFailed(f"expected exit 1 with 'cannot write to the output folder', got "
                                  f"{result.returncode}:\n{text[-3000:]}")
            if "accuracy" in text:
                raise CheckFailed(f"the demo trained before refusing its --out:\n{text[-3000:]}")
            message = next(line for line in text.splitlines() if "cannot write" in line)
            note.append(f"exit 1 in {seconds:.1f} s: {message.strip()}")

    # -- failures during training

    def kill_worker(self) -> None:
        with self.check("docker kill of a worker during training: training completes") as note, \
                self.cluster.client() as client:
            victim = self.cluster.containers("worker")[0]
            failed_before = client.status(timeout=5).requests_failed

            def kill() -> str:
                run(["docker", "kill", victim], timeout=60)
                return f"killed {victim[:12]}"
            figures = train_through(self.cluster, client, kill, "kill a worker")
            status = client.status(timeout=5)
            after = {w.worker_id: w.address for w in status.live_workers}
            if f"{victim[:12]}:{WORKER_PORT}" in after.values() and self.cluster.health(victim).startswith("exited"):
                raise CheckFailed(f"the killed worker {victim[:12]} is still listed live: {after}")
            # Shards are retried on another worker: no request may fail at the coordinator.
            retried = status.requests_failed - failed_before
            if retried:
                raise CheckFailed(f"{retried} request(s) failed at the coordinator when a worker was killed; "
                                  "the shard should have been retried on another worker")
            if figures["test_accuracy"] < 0.9:
                raise CheckFailed(f"training through the kill reached only {figures['test_accuracy']:.3f}")
            self.figures["kill"] = figures
            figures["requests_failed_and_retried"] = retried
            restarted = self.cluster.health(victim)
            note.append(f"{figures['note']}; {figures['steps']} steps, none failed, none retried by the SDK "
                        f"(the lost shard went to another worker), slowest step "
                        f"{figures['slowest_step_s']:.2f} s; {100 * figures['test_accuracy']:.1f}%; the killed "
                        f"container is now '{restarted}' (restart: unless-stopped)")
            # Back to 3 workers for what follows.
            self.cluster("up", "-d", "--no-recreate", "--scale", "worker=3", timeout=180)
            wait_healthy(self.cluster, 3, timeout=90)
            wait_live(client, 3, timeout=30)

    def restart_coordinator(self) -> None:
        with self.check("restart of the coordinator container during training: training completes") as note, \
                self.cluster.client() as client:
            coordinator = self.cluster.containers("coordinator")[0]
            before = client.status(timeout=5).uptime_seconds

            def restart() -> str:
                t = time.monotonic()
                run(["docker", "restart", "-t", "10", coordinator], timeout=90)
                restarted = time.monotonic() - t
                with self.cluster.client() as probe:
                    back = wait_live(probe, 3, timeout=60)
                return f"`docker restart` {restarted:.1f} s, 3 workers back {back:.1f} s after it"
            figures = train_through(self.cluster, client, restart, "restart the coordinator")
            uptime = client.status(timeout=5).uptime_seconds
            if uptime >= before + figures["seconds"]:
                raise CheckFailed(f"the coordinator's uptime ({uptime:.0f} s) says it never restarted")
            if figures["test_accuracy"] < 0.9:
                raise CheckFailed(f"training through the restart reached only {figures['test_accuracy']:.3f}")
            self.figures["restart"] = figures
            note.append(f"{figures['note']}; {figures['steps']} steps, none failed, slowest "
                        f"{figures['slowest_step_s']:.2f} s; {100 * figures['test_accuracy']:.1f}%")

    def scale_up(self) -> None:
        with self.check("scale to 5 workers during training: the new workers get shards") as note, \
                self.cluster.client() as client:
            old = set(live_addresses(client))

            def scale() -> str:
                self.cluster("up", "-d", "--no-recreate", "--scale", "worker=5", timeout=180)
                wait_healthy(self.cluster, 5, timeout=90)
                wait_live(client, 5, timeout=30)
                return "scaled to 5"

            def new_workers_served(steps: list) -> bool:
                return any(len(set(s["workers"])) == 5 and len(set(s["workers"]) - old) == 2 for s in steps[-5:])
            figures = train_through(self.cluster, client, scale, "scale to 5", steps_after=5,
                                    until=new_workers_served, max_seconds=90)
            status = client.status(timeout=5)
            new = [w for w in status.live_workers if w.worker_id not in old]
            if len(new) != 2 or not all(w.shards_served > 0 for w in new):
                raise CheckFailed(f"new workers and their shards: {[(w.address, w.shards_served) for w in new]}")
            # Exact, whatever the pool: the 5-worker gradient equals the in-process one.
            train, _ = digits()
            graph = build_mlp(64, 64, 10)
            params = graph.init_params(1)
            batch = {"x": train["x"][:250], "y": train["y"][:250]}
            result = client.gradients(graph, params, batch)
            loss, grads = result
            shards = len(result.shards)
            want_loss, want = gp.local_gradients(graph, params, batch, shards=shards)
            if shards != 5 or not np.isclose(loss, want_loss, rtol=1e-6) or \
                    not all(np.allclose(grads[k], want[k], rtol=1e-5, atol=1e-7) for k in want):
                raise CheckFailed(f"5-worker gradients ({shards} shards, loss {loss}) differ from "
                                  f"local_gradients (loss {want_loss})")
            bitwise = all(np.array_equal(grads[k], want[k]) for k in want)
            self.figures["scale"] = figures
            note.append(f"{figures['steps']} steps, new workers served "
                        f"{', '.join(str(w.shards_served) for w in new)} shards; 5-shard gradient "
                        f"{'bitwise equal to' if bitwise else 'matches'} local_gradients")

    def token(self) -> None:
        with self.check("GRADPOOL_TOKEN: without it refused, with it trains") as note:
            self.cluster.token = secrets.token_hex(16)
            self.cluster.worker_token = secrets.token_hex(16)  # workers join with their own token
            self.cluster("up", "-d", "--scale", "worker=3", timeout=240)  # the environment changed: recreated
            wait_healthy(self.cluster, 3, timeout=120)
            with self.cluster.client(token=self.cluster.token) as client:
                wait_live(client, 3, timeout=60)
            refused = gradpool_cli("status", "--coordinator", self.cluster.address, timeout=60)
            if refused.returncode == 0 or "refused the token" not in refused.stderr:
                raise CheckFailed(f"`gradpool status` without the token was not refused: exit {refused.returncode}"
                                  f"\n{refused.stdout}{refused.stderr}")
            for label, token in (("no token", None), ("a wrong token", "wrong-" + self.cluster.token)):
                with self.cluster.client(token=token, retry=gp.RetryPolicy(attempts=2)) as client:
                    graph = build_mlp(64, 64, 10)
                    train, _ = digits()
                    try:
                        client.gradients(graph, graph.init_params(0), {"x": train["x"][:8], "y": train["y"][:8]})
                    except gp.ServiceError as err:
                        if "UNAUTHENTICATED" not in str(err.code):
                            raise CheckFailed(f"with {label} the coordinator answered {err}, not UNAUTHENTICATED")
                    else:
                        raise CheckFailed(f"with {label} the coordinator computed gradients")
            result = gradpool_cli("demo", "--coordinator", self.cluster.address, "--epochs", "3", "--no-progress",
                                  "--timeout", "60", "--min-accuracy", "0.9", "--out",
                                  tempfile.mkdtemp(prefix="gradpool-token-"), timeout=300,
                                  env={"GRADPOOL_TOKEN": self.cluster.token})
            if result.returncode != 0:
                raise CheckFailed(f"with the token, `gradpool demo` exited {result.returncode}:\n"
                                  f"{result.stdout}{result.stderr}")
            accuracy_line = next((l for l in result.stdout.splitlines() if "accuracy" in l), "").strip()
            note.append(f"status and gradients refused without/with a wrong token (UNAUTHENTICATED); "
                        f"with it: {accuracy_line}")

    def tls(self) -> None:
        with self.check("TLS (mTLS) and tokens: no client certificate or plaintext refused, with them it trains") \
                as note:
            self.cluster.certs = tempfile.mkdtemp(prefix="gradpool-certs-")
            os.chmod(self.cluster.certs, 0o755)  # the containers' user (uid 10001) reads the files in it
            gp.make_dev_certs(self.cluster.certs, key_mode=0o644)
            self.cluster("up", "-d", "--scale", "worker=3", timeout=240)  # recreated with TLS on every port
            wait_healthy(self.cluster, 3, timeout=120)  # the healthchecks speak TLS too
            files = {name: os.path.join(self.cluster.certs, f"{name}.pem")
                     for name in ("ca", "client", "client-key")}
            trusted = gp.TlsConfig(ca=files["ca"], cert=files["client"], key=files["client-key"])
            graph = build_mlp(64, 64, 10)
            params = graph.init_params(0)
            train, _ = digits()
            batch = {"x": train["x"][:64], "y": train["y"][:64]}
            for label, tls in (("plaintext", None), ("TLS without a client certificate",
                                                     gp.TlsConfig(ca=files["ca"]))):
                with gp.Client(self.cluster.address, token=self.cluster.token, tls=tls, timeout=20,
                               retry=gp.RetryPolicy(attempts=1)) as client:
                    try:
                        client.gradients(graph, params, batch)
                    except gp.ServiceError:
                        continue
                    raise CheckFailed(f"{label}: the coordinator computed gradients")
            with gp.Client(self.cluster.address, token=self.cluster.token, tls=trusted, timeout=60,
                           retry=PATIENT) as client:
                wait_live(client, 3, timeout=60)
                result = client.gradients(graph, params, batch)
                want_loss, _ = gp.local_gradients(graph, params, batch, shards=len(result.shards))
                if not np.isclose(result.loss, want_loss, rtol=1e-6):
                    raise CheckFailed(f"over TLS the loss is {result.loss}, in-process {want_loss}")
                for _ in range(20):
                    client.gradients(graph, params, batch)
            note.append(f"plaintext and a client without a certificate refused; with the client certificate "
                        f"and the token, 21 steps over {len(result.shards)} workers, the loss as in-process")

    def down(self) -> None:
        with self.check("down -v leaves no container, network or volume", logs_of=()) as note:
            t = time.monotonic()
            self.cluster("--profile", "demo", "down", "-v", "--remove-orphans", "-t", "10", timeout=180)
            left = {kind: run(["docker", kind, "ls", "-q", *(["-a"] if kind == "container" else []),
                               "--filter", f"label={LABEL}"], timeout=30).stdout.split()
                    for kind in ("container", "network", "volume")}
            named = [n for n in run(["docker", "network", "ls", "--format", "{{.Name}}"], timeout=30).stdout.split()
                     + run(["docker", "volume", "ls", "--format", "{{.Name}}"], timeout=30).stdout.split()
                     if n.startswith(PROJECT)]
            if any(left.values()) or named:
                raise CheckFailed(f"left behind by `down -v`: {left}, by name: {named}")
            note.append(f"{time.monotonic() - t:.1f} s, nothing left")


def summary(checks: Checks, total: float) -> str:
    lines = ["", f"compose-test passed in {total:.0f} s ({PROJECT}, {' '.join(checks.cluster.compose)}):"]
    lines += [f"  {seconds:6.1f} s  {name}: {note}" for name, seconds, note in checks.results]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="the docker-compose cluster on a real Docker engine")
    parser.add_argument("--skip-build", action="store_true", help="use the images already built")
    parser.add_argument("--keep", action="store_true", help="leave the cluster up at the end (no `down -v`)")
    parser.add_argument("--figures", metavar="FILE", help="also write the measured figures as JSON here")
    args = parser.parse_args()

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, stop)

    try:
        run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=60)
        cluster = Cluster(free_port())
    except CheckFailed as err:
        print(f"compose-test: no usable Docker engine: {err}", file=sys.stderr)
        return 2
    checks = Checks(cluster, args)
    log(f"project {PROJECT}, coordinator published on {cluster.address}, {' '.join(cluster.compose)}")
    cleaned = False
    try:
        cluster("--profile", "demo", "down", "-v", "--remove-orphans", "-t", "5", timeout=180)  # a previous run's
        checks.build()
        checks.up()
        checks.status()
        checks.host_demo()
        checks.demo_profile()
        checks.kill_worker()
        checks.restart_coordinator()
        checks.scale_up()
        checks.token()
        checks.tls()
        if not args.keep:
            checks.down()
            cleaned = True
    except CheckFailed:
        return 1
    except KeyboardInterrupt as err:
        print(f"compose-test: interrupted ({err}); cleaning up", file=sys.stderr)
        return 130
    finally:
        if not cleaned and not args.keep:
            try:
                cluster("--profile", "demo", "down", "-v", "--remove-orphans", "-t", "5", timeout=180, check=False)
            except CheckFailed as err:
                print(f"compose-test: cleanup failed: {err}", file=sys.stderr)
    total = time.monotonic() - STARTED
    print(summary(checks, total))
    if args.figures:
        Path(args.figures).write_text(json.dumps({"total_s": total, **checks.figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
