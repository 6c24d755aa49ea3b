"""deploy/kubernetes, the Dockerfile and docker-compose.yml, checked offline.

* Every Kubernetes manifest (the plaintext + tokens kustomization and its
  tls/ overlay, rendered here the way kustomize does) passes
  `kubernetes-validate` in strict mode, for the oldest and the newest
  Kubernetes this project supports; a broken manifest is refused.
* docker-compose.yml (and the TLS override) pass the Compose-spec schema
  (`check-jsonschema --builtin-schema vendor.compose-spec`); the Dockerfile
  passes `hadolint` with no warning, every ignore justified.
* As tests/test_compose.py does for compose: the pods' exact command, args
  and env (downward API, Secrets, resource fields) run as local processes,
  with the pod IP 127.0.0.1, the coordinator Service name resolving to
  127.0.0.1 and container ports mapped to free local ports. Gradients go
  through them, workers appear at the address they advertise, and each probe
  (native gRPC, or `gradpool health` in tls/) runs as the kubelet would.

The validators come from the dev extra (pyproject.toml) and need no network,
no Docker and no cluster.
"""

from __future__ import annotations

import copy
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import numpy as np
import pytest
import yaml

import gradpool as gp
import kubernetes_validate  # the dev extra: a missing validator fails the suite, it does not skip
from gradpool.cluster import LISTENING

from models import batch_for, params_for, softmax_mlp

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
BIN = Path(sys.executable).parent
# gRPC probes are GA since 1.27; the oldest release still maintained upstream,
# and the newest the installed kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.32.0", "latest")
LABEL = "app.kubernetes.io/component"


# ------------------------------------------------------------ kustomize, the part used here


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 add/replace/remove, as kustomize's `patches` apply them."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        target: Any = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if op["op"] == "add" and isinstance(target, list):
            target.insert(len(target) if last == "-" else int(last), copy.deepcopy(op["value"]))
        elif op["op"] in ("add", "replace"):
            if op["op"] == "replace":
                assert (int(last) < len(target)) if isinstance(target, list) else (last in target), op["path"]
            target[int(last) if isinstance(target, list) else last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del target[int(last) if isinstance(target, list) else last]
        else:
            raise AssertionError(f"unsupported patch op {op['op']!r}")
    return doc


def render(directory: Path) -> list[dict]:
    """`kustomize build` for the features these kustomizations use: resources
    (files and directories), namespace, images and targeted JSON 6902 patches."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "namespace", "images", "patches"}, \
        "a kustomize feature this test does not render: teach render() or keep the kustomization simple"
    docs: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        docs += render(path) if path.is_dir() else load_docs(path)
    if "namespace" in kustomization:
        for doc in docs:
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        for container in containers(docs):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    for patch in kustomization.get("patches", []):
        target, ops = patch["target"], yaml.safe_load((directory / patch["path"]).read_text())
        hits = [i for i, d in enumerate(docs) if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert len(hits) == 1, f"patch {patch['path']} matches {len(hits)} resources"
        docs[hits[0]] = json_patch(docs[hits[0]], ops)
    return docs


def containers(docs: list[dict]) -> Iterator[dict]:
    for doc in docs:
        if doc["kind"] == "Deployment":
            yield from doc["spec"]["template"]["spec"]["containers"]


def find(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


BASE = render(KUBE)
TLS = render(KUBE / "tls")
VARIANTS = {"base": BASE, "tls": TLS}


# ------------------------------------------------------------ validation


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_pass_strict_kubernetes_validation(variant: str, version: str) -> None:
    if version == "latest":
        version = kubernetes_validate.latest_version()
    validated = []
    for doc in VARIANTS[variant]:
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError, naming the field
        validated.append((doc["kind"], doc["metadata"]["name"]))
    assert sorted(validated) == sorted([
        ("Namespace", "gradpool"), ("Deployment", "coordinator"), ("Service", "coordinator"),
        ("Deployment", "worker"), ("HorizontalPodAutoscaler", "worker"), ("PodDisruptionBudget", "worker"),
        ("NetworkPolicy", "worker"), ("NetworkPolicy", "coordinator")])


def test_every_manifest_file_is_in_the_kustomization_and_valid_alone() -> None:
    """`kubectl apply -f deploy/kubernetes/base/X.yaml` works too; no file is forgotten."""
    base = KUBE / "base"
    listed = yaml.safe_load((base / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in base.glob("*.yaml") if p.name != "kustomization.yaml")
    for name in listed:
        for doc in load_docs(base / name):
            assert doc["metadata"].get("namespace", "gradpool") == "gradpool"
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSIONS[0],
                             *(str(base / n) for n in listed)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == 8, result.stdout


@pytest.mark.parametrize("breakage", ["unknown field", "wrong type", "missing selector", "bad probe"])
def test_a_broken_manifest_is_refused(breakage: str) -> None:
    worker = copy.deepcopy(find(BASE, "Deployment", "worker"))
    container = worker["spec"]["template"]["spec"]["containers"][0]
    if breakage == "unknown field":
        container["imagePulPolicy"] = "Always"  # a typo Kubernetes would silently drop without strict mode
    elif breakage == "wrong type":
        worker["spec"]["replicas"] = "two"
    elif breakage == "missing selector":
        del worker["spec"]["selector"]
    else:
        container["readinessProbe"]["grpc"]["port"] = "grpc"  # gRPC probes take a number, not a port name
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, kubernetes_validate.latest_version(), strict=True)


def test_compose_files_pass_the_compose_spec_schema(tmp_path: Path) -> None:
    check = str(BIN / "check-jsonschema")
    result = subprocess.run([check, "--builtin-schema", "vendor.compose-spec", "docker-compose.yml",
                             "docker-compose.tls.yml"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok -- validation done" in result.stdout, result.stdout + result.stderr
    broken = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    broken["services"]["worker"]["restart_policy"] = "always"  # not a compose key
    broken["services"]["coordinator"]["ports"] = {"50051": 50051}  # ports is a list
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(broken))
    result = subprocess.run([check, "--builtin-schema", "vendor.compose-spec", str(tmp_path / "docker-compose.yml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "restart_policy" in result.stdout + result.stderr, result.stdout


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    hadolint = str(BIN / "hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "info", "Dockerfile"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i > 0 and lines[i - 1].startswith("#") and len(lines[i - 1]) > 20, \
                f"Dockerfile line {i + 1}: each hadolint ignore is justified by the comment line above it"
    (tmp_path / "Dockerfile").write_text("FROM python:latest\nRUN pip install numpy\nUSER root\n")
    result = subprocess.run([hadolint, str(tmp_path / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and {"DL3007", "DL3013", "DL3002"} <= set(re.findall(r"DL\d+", result.stdout))


# ------------------------------------------------------------ what the manifests promise


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def test_kubernetes_structure() -> None:
    coordinator, worker = find(BASE, "Deployment", "coordinator"), find(BASE, "Deployment", "worker")
    service = find(BASE, "Service", "coordinator")
    assert coordinator["spec"]["replicas"] == 1 and coordinator["spec"]["strategy"]["type"] == "Recreate", \
        "one coordinator at a time: its registry is in memory"
    assert service["spec"]["selector"].items() <= coordinator["spec"]["template"]["metadata"]["labels"].items()
    for deployment in (coordinator, worker):
        pod = deployment["spec"]["template"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "9100",
                                                  "prometheus.io/path": "/metrics"}
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 10001
        assert spec["automountServiceAccountToken"] is False
        (container,) = spec["containers"]
        assert container["command"] == ["gradpool"]
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] and not ctx["allowPrivilegeEscalation"] and ctx["capabilities"]["drop"] == ["ALL"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == 9100 and env_of(container)["GRADPOOL_METRICS_PORT"]["value"] == "9100"
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == ports["grpc"], "native gRPC probes on the gRPC port"
        limits = container["resources"]["limits"]
        assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(container["resources"]["requests"])
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            assert env_of(container)[name]["valueFrom"]["resourceFieldRef"] == {"resource": "limits.cpu", "divisor": "1"}
        cache = float(env_of(container)["GRADPOOL_DATASET_CACHE_MB"]["value"])
        assert cache * 2**20 < parse_quantity(limits["memory"]) / 1.5, "the dataset cache fits the memory limit"
        for entry in container["env"]:
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "gradpool-tokens" and entry["name"].endswith("_TOKEN")
    w = worker["spec"]["template"]["spec"]["containers"][0]
    env, names = env_of(w), [e["name"] for e in w["env"]]
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["GRADPOOL_ADVERTISE"]["value"] == "$(POD_IP):50052" and names.index("POD_IP") < names.index(
        "GRADPOOL_ADVERTISE"), "$(POD_IP) is expanded only when defined above"
    assert env["GRADPOOL_WORKER_PORT"]["value"] == "50052"
    assert env["GRADPOOL_COORDINATOR"]["value"] == f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert "GRADPOOL_TOKEN" not in env, "workers never hold the clients' token"
    hpa, pdb = find(BASE, "HorizontalPodAutoscaler", "worker"), find(BASE, "PodDisruptionBudget", "worker")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "worker"}
    assert hpa["spec"]["minReplicas"] <= worker["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    assert pdb["spec"]["selector"]["matchLabels"] == worker["spec"]["selector"]["matchLabels"]
    policy = find(BASE, "NetworkPolicy", "worker")
    assert policy["spec"]["podSelector"]["matchLabels"] == worker["spec"]["selector"]["matchLabels"]
    (grpc_rule,) = [r for r in policy["spec"]["ingress"] if {"port": 50052, "protocol": "TCP"} in r["ports"]]
    assert grpc_rule["from"] == [{"podSelector": {"matchLabels": coordinator["spec"]["selector"]["matchLabels"]}}], \
        "only the coordinator reaches workers"
    namespace = find(BASE, "Namespace", "gradpool")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_tls_overlay_mounts_each_role_its_own_key() -> None:
    for name, port in (("coordinator", 50051), ("worker", 50052)):
        spec = find(TLS, "Deployment", name)["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if v.get("secret")]
        assert volume["secret"]["secretName"] == "gradpool-tls"
        assert {i["key"] for i in volume["secret"]["items"]} == {"ca.pem", f"{name}.pem", f"{name}-key.pem"}
        container = spec["containers"][0]
        assert {"name": "tls", "mountPath": "/certs", "readOnly": True} in container["volumeMounts"]
        env = env_of(container)
        assert env["GRADPOOL_TLS_CERT"]["value"] == f"/certs/{name}.pem" and env["GRADPOOL_MTLS"]["value"] == "1"
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["exec"]["command"][:3] == ["gradpool", "health", f"localhost:{port}"]
    assert env_of(find(TLS, "Deployment", "coordinator")["spec"]["template"]["spec"]["containers"][0])[
        "GRADPOOL_TLS_WORKER_NAME"]["value"] == "worker", "workers advertise pod IPs: their certificates name `worker`"


# ------------------------------------------------------------ the pods, as local processes


def parse_quantity(quantity: str) -> float:
    units = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity)).groups()  # type: ignore[union-attr]
    return float(number) * units[unit]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


class Pod:
    """One container of a rendered Deployment, started as a local process the way
    the kubelet would start it: command + args, env resolved from the downward
    API, resource fields and Secrets, in order, with $(VAR) expansion."""

    def __init__(self, docs: list[dict], name: str, ports: dict[str, str], secrets: dict[str, dict[str, str]],
                 mounts: dict[str, Path]):
        self.spec = find(docs, "Deployment", name)["spec"]["template"]["spec"]
        (self.container,) = self.spec["containers"]
        self.pod_name = f"{name}-7d9f8c6b5-{free_port()}"
        self.ports, self.secrets, self.mounts = ports, secrets, mounts
        self.env = self.resolve_env()
        self.proc: "subprocess.Popen | None" = None
        self.address = ""

    def local(self, value: str) -> str:
        """The Service name and container ports as this machine has them."""
        value = re.sub(r"^coordinator:", "127.0.0.1:", value)
        for container_port, local_port in self.ports.items():
            value = re.sub(rf"(?<![0-9]){container_port}(?![0-9])", local_port, value)
        for mount, directory in self.mounts.items():
            value = value.replace(mount + "/", f"{directory}/")
        return value

    def resolve_env(self) -> dict[str, str]:
        resolved: dict[str, str] = {}
        limits = self.container["resources"]["limits"]
        for entry in self.container.get("env", []):
            if "value" in entry:
                value = re.sub(r"\$\((\w+)\)", lambda m: resolved.get(m.group(1), m.group(0)), entry["value"])
            elif "fieldRef" in entry["valueFrom"]:
                value = {"status.podIP": "127.0.0.1", "metadata.name": self.pod_name,
                         "metadata.namespace": "gradpool"}[entry["valueFrom"]["fieldRef"]["fieldPath"]]
            elif "resourceFieldRef" in entry["valueFrom"]:
                ref = entry["valueFrom"]["resourceFieldRef"]
                kind, resource = ref["resource"].split(".")
                value = str(math.ceil(parse_quantity(self.container["resources"][kind][resource])
                                      / parse_quantity(ref.get("divisor", "1"))))
                assert kind == "limits" and resource in limits
            else:
                ref = entry["valueFrom"]["secretKeyRef"]
                if ref["key"] not in self.secrets.get(ref["name"], {}):
                    assert ref.get("optional"), f"Secret {ref['name']} has no key {ref['key']}: the pod would not start"
                    continue
                value = self.secrets[ref["name"]][ref["key"]]
            resolved[entry["name"]] = value
        return {k: self.local(v) for k, v in resolved.items()}

    def process_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRADPOOL_")}
        env.update(self.env, PYTHONPATH=str(ROOT))
        return env

    def argv(self, command: list[str]) -> list[str]:
        assert command[0] == "gradpool", "the image has only the gradpool command"
        return [sys.executable, "-m", "gradpool.cli", *(self.local(a) for a in command[1:])]

    def start(self) -> "Pod":
        self.proc = subprocess.Popen(self.argv(self.container["command"] + self.container.get("args", [])),
                                     env=self.process_env(), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     text=True, cwd=ROOT)
        line = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        match = LISTENING.match(line)
        assert match, f"{self.pod_name} printed {line!r} instead of its listening line"
        self.address = match.group(2)
        return self

    def probe(self, name: str) -> bool:
        """The kubelet's probe: a gRPC health check on the port, or the exec command."""
        probe = self.container[name]
        if "grpc" in probe:
            port = self.local(str(probe["grpc"]["port"]))
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                from grpc_health.v1 import health_pb2, health_pb2_grpc
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")),
                        timeout=probe.get("timeoutSeconds", 1))
                except grpc.RpcError:
                    return False
                return reply.status == health_pb2.HealthCheckResponse.SERVING
        result = subprocess.run(self.argv(probe["exec"]["command"]), env=self.process_env(), capture_output=True,
                                text=True, timeout=30, cwd=ROOT)
        return result.returncode == 0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM, as the kubelet sends
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.mark.parametrize("variant", VARIANTS)
def test_kubernetes_pods_run_as_written(variant: str, tmp_path: Path) -> None:
    docs = VARIANTS[variant]
    tokens = {"client": "client-" + free_port(), "worker": "worker-" + free_port(),
              "coordinator": "coordinator-" + free_port()}
    secrets = {"gradpool-tokens": tokens}
    mounts: dict[str, Path] = {}
    tls = None
    if variant == "tls":
        # What README tells you to put in the gradpool-tls Secret: `gradpool certs` files.
        certs = tmp_path / "certs"
        result = subprocess.run([sys.executable, "-m", "gradpool.cli", "certs", str(certs)], capture_output=True,
                                text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 0, result.stderr
        mounts["/certs"] = certs
        tls = gp.TlsConfig.from_dir(certs, "client")
    coordinator_port = free_port()
    pods: list[Pod] = []
    try:
        coordinator = Pod(docs, "coordinator", {"50051": coordinator_port, "9100": free_port()}, secrets, mounts)
        assert coordinator.env["OMP_NUM_THREADS"] == "2" and coordinator.env["GRADPOOL_TOKEN"] == tokens["client"]
        pods.append(coordinator.start())
        assert coordinator.address.endswith(":" + coordinator_port)
        workers = []
        for _ in range(2):  # replicas: 2
            worker = Pod(docs, "worker", {"50051": coordinator_port, "50052": free_port(), "9100": free_port()},
                         secrets, mounts)
            assert worker.env["GRADPOOL_ADVERTISE"] == f"127.0.0.1:{worker.ports['50052']}"
            assert worker.env["GRADPOOL_CAPACITY"] == "2" and "GRADPOOL_TOKEN" not in worker.env
            pods.append(worker.start())
            workers.append(worker)
        for pod in pods:
            for probe in ("readinessProbe", "livenessProbe"):
                assert pod.probe(probe), f"{pod.pod_name}: {probe} failed"
        graph = softmax_mlp()
        params, batch = params_for(graph), batch_for(graph, 40)
        with gp.Client(f"127.0.0.1:{coordinator_port}", token=tokens["client"], tls=tls, timeout=60) as client:
            deadline = time.monotonic() + 30
            while len([w for w in client.status().workers if w.state == "live"]) < 2:
                assert time.monotonic() < deadline, "the workers never registered with the coordinator"
                time.sleep(0.1)
            status = client.status()
            assert sorted(w.address for w in status.workers) == sorted(
                f"127.0.0.1:{w.ports['50052']}" for w in workers), "each worker is called at its pod IP"
            assert sorted(w.worker_id for w in status.workers) == sorted(w.pod_name for w in workers)
            result = client.gradients(graph, params, batch)
            loss, grads = result
            assert len(result.shards) == 2
        want_loss, want = gp.local_gradients(graph, params, batch)
        assert loss == pytest.approx(want_loss, rel=1e-10)
        for name in want:
            np.testing.assert_allclose(grads[name], want[name], rtol=1e-10)
        # Tokens from the Secret are enforced: a client without one is refused.
        with gp.Client(f"127.0.0.1:{coordinator_port}", tls=tls, timeout=10,
                       retry=gp.RetryPolicy(budget_seconds=0)) as anonymous:
            with pytest.raises(Exception, match="(?i)unauthenticated|token"):
                anonymous.status()
        # SIGTERM (a scale-down): the worker drains and its readiness probe fails.
        workers[0].stop()
        assert not workers[0].probe("readinessProbe")
    finally:
        for pod in reversed(pods):
            pod.stop()


# ------------------------------------------------------------ the image and compose's limits


def test_image_pins_and_labels() -> None:
    """constraints.txt pins every dependency the image installs, within pyproject's ranges;
    the image carries OCI labels; compose publishes on 127.0.0.1 and caps CPUs and BLAS threads."""
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    pins = {norm(n): v for n, v in re.findall(r"^([\w.-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)}
    extras = project["optional-dependencies"]
    for line in project["dependencies"] + extras["demo"] + extras["tensorboard"]:
        requirement = Requirement(line)
        assert norm(requirement.name) in pins, f"constraints.txt does not pin {requirement.name}"
        assert requirement.specifier.contains(pins[norm(requirement.name)]), f"{line} vs {pins[norm(requirement.name)]}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "-c constraints.txt -r requirements.txt" in dockerfile
    labels = dict(re.findall(r'(org\.opencontainers\.image\.\w+)="([^"]*)"', dockerfile))
    assert {"title", "description", "version", "licenses"} <= {k.rsplit(".", 1)[1] for k in labels}
    assert labels["org.opencontainers.image.version"] == project["version"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert compose["coordinator"]["ports"] == ["${GRADPOOL_PUBLISH_ADDRESS:-127.0.0.1}:${GRADPOOL_PUBLISH_PORT:-50051}:50051"]
    worker = compose["worker"]
    assert "cpus" in compose["coordinator"] and worker["cpus"] == "${GRADPOOL_WORKER_CPUS:-1}"
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        assert worker["environment"][name] == worker["cpus"], "BLAS threads follow the worker's CPU limit"
