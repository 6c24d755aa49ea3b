"""docker-compose.yml, checked without a Docker engine; `make compose-test`
(scripts/compose_test.py) runs the real thing where there is one.

Here the test reads the compose file, checks its structure, and starts
each service's exact `command` and `environment` as local processes of the
image's entrypoint (`gradpool`). Only two things
change: service names resolve to 127.0.0.1, and the container ports (50051,
50052) map to free local ports, since two "containers" share one host here.
Then a gradient request goes through them and each healthcheck command runs:
a wrong command, variable or probe in the compose file fails this test.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import gradpool as gp
from gradpool.cluster import LISTENING

from models import batch_for, params_for, softmax_mlp

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
TLS_OVERRIDE = yaml.safe_load((ROOT / "docker-compose.tls.yml").read_text())["services"]
CONTAINER_PORTS = ("50051", "50052")


def test_compose_structure() -> None:
    assert {"coordinator", "worker", "demo"} <= set(SERVICES)
    coordinator, worker, demo = SERVICES["coordinator"], SERVICES["worker"], SERVICES["demo"]
    assert any(str(p).endswith(":50051") for p in coordinator["ports"]), "the coordinator publishes its gRPC port"
    assert "ports" not in worker and "container_name" not in worker, "workers must scale (--scale worker=N)"
    assert worker["depends_on"]["coordinator"]["condition"] == "service_healthy"
    for name in ("coordinator", "worker"):
        service = SERVICES[name]
        assert service["restart"] in ("unless-stopped", "always", "on-failure")
        assert service["healthcheck"]["test"][:3] == ["CMD", "gradpool", "health"]
        assert service["image"] == "gradpool:latest"
    assert worker["expose"] == ["50052"] and worker["environment"]["GRADPOOL_WORKER_PORT"] == "50052", \
        "workers declare the port they listen on"
    assert demo["healthcheck"] == {"disable": True}, "a one-off job does not inherit the servers' healthcheck"
    assert demo["profiles"] == ["demo"] and demo["build"]["args"]["EXTRAS"] == "demo"
    assert demo["command"][0] == "demo" and "coordinator:50051" in demo["command"]


def test_dockerfile_is_small_and_unprivileged() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-slim\s*$", dockerfile, re.M), "slim final stage"
    assert re.search(r"^USER 10001$", dockerfile, re.M), "runs as a non-root user, numeric (hadolint DL3066)"
    assert re.search(r"install -d -o 10001 -g 10001 /home/gradpool/gradpool-out", dockerfile), \
        "the demo's output folder exists and is the user's, so its named volume is writable"
    assert SERVICES["demo"]["volumes"] == ["demo-out:/home/gradpool/gradpool-out"]
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD gradpool health", dockerfile, re.M)
    build_stage = dockerfile.rsplit("FROM ", 1)[0]
    assert build_stage.index("requirements.txt") < build_stage.index("COPY client"), \
        "dependencies are installed in a layer before the sources are copied"
    assert "--no-deps" in build_stage
    assert 'ENTRYPOINT ["gradpool"]' in dockerfile
    final_stage = dockerfile.rsplit("FROM ", 1)[1]
    assert "COPY tests" not in dockerfile and "pip install" not in final_stage, "no tests or build steps in it"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"tests", ".venv", ".git"} <= set(ignored)


def test_the_image_dependency_layer_installs_what_pyproject_declares() -> None:
    """The Dockerfile installs the dependencies from scripts/requirements.py before the
    sources: it must list exactly pyproject's, with the extra's, or the image breaks."""
    try:
        import tomllib
    except ImportError:  # Python 3.10, as scripts/requirements.py does
        from pip._vendor import tomli as tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for extras, want in (("", project["dependencies"]),
                         ("demo", project["dependencies"] + project["optional-dependencies"]["demo"])):
        result = subprocess.run([sys.executable, "scripts/requirements.py", "--extras", extras], cwd=ROOT,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split("\n")[:-1] == want


def stop_all(processes: list[subprocess.Popen]) -> None:
    """Terminate the services in reverse start order; kill any that linger."""
    for proc in reversed(processes):
        proc.terminate()
    for proc in processes:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def substitute(value: str, ports: dict[str, str]) -> str:
    """${VAR:-default} as compose does (from this environment), service names
    to 127.0.0.1, container ports to this test's free ports."""
    value = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m.group(1)) or m.group(2), str(value))
    for service in SERVICES:
        value = re.sub(rf"^{service}:", "127.0.0.1:", value)
    for container_port, local_port in ports.items():
        value = value.replace(container_port, local_port)
    return value


def gradpool_argv(args: list[str], ports: dict[str, str]) -> list[str]:
    """The image's ENTRYPOINT ["gradpool"], as this environment runs it."""
    return [sys.executable, "-m", "gradpool.cli", *(substitute(a, ports) for a in args)]


def service_env(name: str, ports: dict[str, str], extra: "dict[str, str] | None" = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADPOOL_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update({k: substitute(v, ports) for k, v in SERVICES[name].get("environment", {}).items()})
    env.update(extra or {})
    return env


def start(name: str, ports: dict[str, str], env: "dict[str, str] | None" = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(gradpool_argv(SERVICES[name]["command"], ports), env=env or service_env(name, ports),
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, cwd=ROOT)
    line = proc.stdout.readline().strip()  # type: ignore[union-attr]
    match = LISTENING.match(line)
    assert match, f"{name} printed {line!r} instead of its listening line"
    return proc, match.group(2)


def healthcheck(name: str, ports: dict[str, str], env: "dict[str, str] | None" = None) -> subprocess.CompletedProcess:
    test = SERVICES[name]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "gradpool"
    return subprocess.run(gradpool_argv(test[2:], ports), env=env or service_env(name, ports), capture_output=True,
                          text=True, timeout=30, cwd=ROOT)


def test_compose_services_run_as_written(tmp_path: Path) -> None:
    coordinator_ports = {"50051": free_port()}
    processes = []
    try:
        coordinator, address = start("coordinator", coordinator_ports)
        processes.append(coordinator)
        assert address.endswith(":" + coordinator_ports["50051"])
        assert healthcheck("coordinator", coordinator_ports).returncode == 0
        worker_ports = []
        for _ in range(2):  # `--scale worker=2`
            ports = {"50051": coordinator_ports["50051"], "50052": free_port()}
            worker, _ = start("worker", ports)
            processes.append(worker)
            worker_ports.append(ports)
        for ports in worker_ports:
            result = healthcheck("worker", ports)
            assert result.returncode == 0 and "SERVING" in result.stdout, result.stderr
        graph = softmax_mlp()
        params, batch = params_for(graph), batch_for(graph, 50)
        with gp.Client(f"127.0.0.1:{coordinator_ports['50051']}", timeout=60) as client:
            deadline = time.monotonic() + 30
            while len([w for w in client.status().workers if w.state == "live"]) < 2:
                assert time.monotonic() < deadline, "the workers never registered with the coordinator"
                time.sleep(0.1)
            result = client.gradients(graph, params, batch)
            loss, grads = result
            assert len(result.shards) == 2
        want_loss, want = gp.local_gradients(graph, params, batch)
        assert loss == pytest.approx(want_loss, rel=1e-10)
        for name in want:
            np.testing.assert_allclose(grads[name], want[name], rtol=1e-10)
        # The demo profile's own command, shortened to one quick epoch.
        demo_args = [a.replace("/home/gradpool/gradpool-out", str(tmp_path)) for a in SERVICES["demo"]["command"]]
        result = subprocess.run(gradpool_argv(demo_args + ["--epochs", "1", "--train-examples", "300"],
                                              coordinator_ports),
                                env=service_env("demo", coordinator_ports), capture_output=True, text=True,
                                timeout=120, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        assert "accuracy" in result.stdout and (tmp_path / "metrics.json").exists()
    finally:
        stop_all(processes)


def test_health_probe_fails_for_a_dead_address() -> None:
    result = subprocess.run([sys.executable, "-m", "gradpool.cli", "health", f"127.0.0.1:{free_port()}",
                             "--timeout", "1"], capture_output=True, text=True, timeout=30, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1 and "is not healthy" in result.stderr


def tls_env(name: str, ports: dict[str, str], certs: Path, tokens: dict[str, str]) -> dict[str, str]:
    """A service's environment with docker-compose.tls.yml on top, its /certs mount
    pointing at `certs`, and the tokens a .env from `gradpool certs --compose` sets."""
    saved = {k: os.environ.get(k) for k in tokens}
    os.environ.update(tokens)  # what compose substitutes from .env
    try:
        env = service_env(name, ports)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    override = TLS_OVERRIDE[name]
    assert override["volumes"][0].endswith(":/certs:ro")
    env.update({k: str(v).replace("/certs/", f"{certs}/") for k, v in override["environment"].items()})
    return env


def test_compose_with_tls_and_tokens_runs_as_written(tmp_path: Path) -> None:
    """The TLS override and the .env of `gradpool certs --compose`: mTLS and tokens on every
    port, healthchecks over TLS, gradients from a client with the client certificate."""
    result = subprocess.run([sys.executable, "-m", "gradpool.cli", "certs", str(tmp_path / "certs"), "--compose"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    dotenv = dict(line.split("=", 1) for line in (tmp_path / ".env").read_text().splitlines()
                  if line and not line.startswith("#"))
    assert dotenv["COMPOSE_FILE"] == "docker-compose.yml:docker-compose.tls.yml"
    certs = Path(dotenv["GRADPOOL_CERTS_DIR"])
    tokens = {k: v for k, v in dotenv.items() if k.endswith("TOKEN")}
    assert len(set(tokens.values())) == 3
    coordinator_ports = {"50051": free_port()}
    worker_ports = {"50051": coordinator_ports["50051"], "50052": free_port()}
    processes = []
    try:
        coordinator, _ = start("coordinator", coordinator_ports, tls_env("coordinator", coordinator_ports, certs,
                                                                         tokens))
        processes.append(coordinator)
        worker_env = tls_env("worker", worker_ports, certs, tokens)
        assert worker_env["GRADPOOL_MTLS"] == "1" and "GRADPOOL_TOKEN" not in worker_env
        worker, _ = start("worker", worker_ports, worker_env)
        processes.append(worker)
        for name, ports in (("coordinator", coordinator_ports), ("worker", worker_ports)):
            probe = healthcheck(name, ports, tls_env(name, ports, certs, tokens))
            assert probe.returncode == 0 and "SERVING" in probe.stdout, probe.stderr
            plain = healthcheck(name, ports)  # the same probe without the TLS variables
            assert plain.returncode == 1
        tls = gp.TlsConfig.from_dir(certs, "client")
        graph = softmax_mlp()
        params, batch = params_for(graph), batch_for(graph, 20)
        with gp.Client(f"127.0.0.1:{coordinator_ports['50051']}", token=tokens["GRADPOOL_TOKEN"], tls=tls,
                       timeout=60) as client:
            deadline = time.monotonic() + 30
            while not client.status().live_workers:
                assert time.monotonic() < deadline, "the worker never registered over TLS"
                time.sleep(0.1)
            loss, _ = client.gradients(graph, params, batch)
        assert loss == pytest.approx(gp.local_gradients(graph, params, batch)[0], rel=1e-10)
    finally:
        stop_all(processes)
