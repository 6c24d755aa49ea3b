"""One import package, one version, README snippets that run as written, and
the same error for the same mistake whatever the backend."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest

import gradpool as gp
from gradpool.protos import gradpool_pb2 as pb
from gradpool.protos import gradpool_pb2_grpc as pb_grpc
from gradpool.worker.rpc import with_port

from models import batch_for, params_for, softmax_mlp

ROOT = Path(__file__).resolve().parent.parent
GRADPOOL = Path(sys.executable).parent / "gradpool"


def test_the_wheel_installs_one_top_level_package(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=240)
    wheel = next(tmp_path.glob("gradpool-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"gradpool", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for module in ("gradpool/__init__.py", "gradpool/py.typed", "gradpool/server/__main__.py",
                   "gradpool/worker/__main__.py", "gradpool/worker/engine/program.py",
                   "gradpool/protos/gradpool_pb2.py", "gradpool/protos/gradpool.proto"):
        assert module in names, module
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata


def test_one_version_everywhere() -> None:
    from importlib.metadata import version
    assert gp.__version__ == version("gradpool")
    shown = subprocess.run([str(GRADPOOL), "--version"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and shown.stdout.strip() == f"gradpool {gp.__version__}"


@pytest.mark.parametrize("module, server", [("gradpool.server", "gradpool.server.coordinator"),
                                            ("gradpool.worker", "gradpool.worker.server")])
def test_servers_run_as_modules_without_importing_the_sdk(module: str, server: str) -> None:
    shown = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and f"python -m {module}" in shown.stdout
    loaded = subprocess.run([sys.executable, "-c", f"import sys, {server}; print(' '.join(sys.modules))"],
                            capture_output=True, text=True, timeout=30, check=True)
    sdk = {"gradpool.graph", "gradpool.remote", "gradpool.training", "gradpool.cluster", "gradpool.local"}
    assert not sdk & set(loaded.stdout.split()), f"{server} imported SDK modules"


def readme_snippets() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_the_readme_has_python_snippets() -> None:
    assert len(readme_snippets()) >= 2


@pytest.mark.parametrize("index", range(len(readme_snippets())))
def test_readme_snippet_runs_as_written_next_to_a_users_own_client_and_protos(tmp_path: Path, index: int) -> None:
    """Run from a folder holding a `client.py` and a `protos/` of the user's own:
    with one `gradpool` package neither can shadow the SDK."""
    (tmp_path / "client.py").write_text("raise SystemExit('the user client.py was imported')\n")
    (tmp_path / "protos").mkdir()
    (tmp_path / "protos" / "__init__.py").write_text("raise SystemExit('the user protos/ was imported')\n")
    script = tmp_path / "snippet.py"
    script.write_text(readme_snippets()[index])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


# ------------------------------------------------------------------ one error, any backend

def _mistakes(graph: gp.Graph) -> dict[str, tuple[dict, dict]]:
    params, batch = params_for(graph), batch_for(graph, 8)
    wrong_label = {**batch, "y": batch["y"].copy()}
    wrong_label["y"][5] = 7
    return {
        "wrong shape": (params, {**batch, "x": batch["x"][:, :5]}),
        "no batch axis": (params, {**batch, "x": batch["x"][0]}),
        "missing input": (params, {"x": batch["x"]}),
        "missing param": ({k: v for k, v in params.items() if k != "b2"}, batch),
        "label out of range": (params, wrong_label),
        "wrong dtype": (params, {**batch, "y": batch["y"].astype(np.float64) + 0.5}),
        "unknown input": (params, {**batch, "z": batch["x"]}),
    }


def test_the_same_mistake_raises_the_same_error_in_process_and_through_the_service() -> None:
    graph = softmax_mlp()
    local: dict[str, BaseException] = {}
    for what, (params, batch) in _mistakes(graph).items():
        with pytest.raises(gp.InputError) as caught:
            gp.local_gradients(graph, params, batch)
        local[what] = caught.value
    with gp.LocalCluster(workers=2) as cluster, gp.Client(cluster.address, timeout=30) as service:
        for what, (params, batch) in _mistakes(graph).items():
            with pytest.raises(gp.InputError) as caught:
                service.gradients(graph, params, batch)
            assert type(caught.value) is type(local[what]), what
            assert str(caught.value) == str(local[what]), what
        # A request that skips the SDK's checks gets the servers' verdict as
        # the same exception class, with the same message core.
        params, batch = _mistakes(graph)["label out of range"]
        service.register(graph)
        raw = pb.GradientsRequest(graph_id=graph.graph_id, params=gp_named(params), inputs=gp_named(batch))
        with pytest.raises(gp.InputError) as caught:
            service._rpc.compute_gradients(raw)
        assert isinstance(caught.value, gp.ServiceError) and caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "label 7 is out of range [0, 5)" in str(caught.value)
        no_axis = pb.GradientsRequest(graph_id=graph.graph_id, params=gp_named(params),
                                      inputs=gp_named({**batch, "x": batch["x"][0]}))
        with pytest.raises(gp.InputError) as caught:
            service._rpc.compute_gradients(no_axis)
        assert str(caught.value) == str(local["no batch axis"])


def gp_named(arrays: dict) -> list:
    from gradpool.worker.engine import to_named
    return to_named(arrays)


def test_missing_batch_axis_says_so() -> None:
    graph = softmax_mlp()
    params, batch = _mistakes(graph)["no batch axis"]
    with pytest.raises(gp.InputError, match=r"input 'x' has shape \(8,\), but the graph declares \(batch, 8\) "
                                            r"\(the batch axis first\)"):
        gp.local_gradients(graph, params, batch)


def test_errors_never_echo_unbounded_input() -> None:
    """A 100 KB graph id or a 1M-dim shape is quoted short, so the real error
    reaches the caller instead of RESOURCE_EXHAUSTED for oversized metadata."""
    with gp.LocalCluster(workers=1) as cluster:
        with grpc.insecure_channel(cluster.address) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ComputeGradients(pb.GradientsRequest(graph_id="g" * 100_000), timeout=10)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert len(caught.value.details()) < 400
            graph = softmax_mlp()
            stub.RegisterGraph(pb.RegisterGraphRequest(graph=graph.to_proto()), timeout=10)
            batch = batch_for(graph, 4)
            request = pb.GradientsRequest(graph_id=graph.graph_id, params=gp_named(params_for(graph)),
                                          inputs=gp_named({"y": batch["y"]}))
            bad = request.inputs.add(name="x")
            bad.tensor.dtype = pb.FLOAT64
            bad.tensor.shape.extend([1] * 1_000_000)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ComputeGradients(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = caught.value.details()  # refused at the 9th dim, before a tuple of a million is built
            assert len(details) < 400 and "input 'x'" in details and "more than 8 dims" in details


@pytest.mark.parametrize("given, expected", [
    ("localhost", "localhost:50051"), ("localhost:7", "localhost:7"), ("10.0.0.1", "10.0.0.1:50051"),
    ("::1", "[::1]:50051"), ("[::1]", "[::1]:50051"), ("[::1]:9", "[::1]:9"), ("unix:/tmp/s", "unix:/tmp/s"),
])
def test_an_address_without_a_port_gets_the_default_port(given: str, expected: str) -> None:
    assert with_port(given) == expected


def test_cli_status_into_a_closed_pipe_is_quiet() -> None:
    with gp.LocalCluster(workers=1) as cluster:
        done = subprocess.run(f"'{GRADPOOL}' status --json --coordinator {cluster.address} | head -1",
                              shell=True, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "{"
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_a_busy_port_is_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([str(GRADPOOL), "coordinator", "--host", "127.0.0.1", "--port", str(port)],
                              capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port} is already in use" in lines[0], done.stderr
