"""Each example runs briefly as a user would run it (a subprocess, from another
folder, no PYTHONPATH), on its own LocalCluster or on a given --coordinator,
exits 0 and prints a falling loss."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return done.stdout


def losses(output: str) -> list[float]:
    return [float(m) for m in re.findall(r"loss(?: per example)? +([0-9.]+)", output)]


def test_logistic_regression_on_its_own_local_cluster(tmp_path: Path) -> None:
    out = run_example("logistic_regression.py", "--steps", "5", cwd=tmp_path)
    found = losses(out)
    assert len(found) == 5 and found[-1] < found[0]
    assert "accuracy on the training data" in out


def test_two_layer_net_on_its_own_local_cluster(tmp_path: Path) -> None:
    out = run_example("two_layer_net.py", "--steps", "40", cwd=tmp_path)
    found = losses(out)
    assert len(found) == 10 and found[-1] < 0.5 * found[0]
    assert "mean squared error" in out


def test_digits_mlp_on_its_own_local_cluster(tmp_path: Path) -> None:
    out = run_example("digits_mlp.py", "--epochs", "1", cwd=tmp_path)
    assert re.search(r"epoch  1  loss [0-9.]+  test accuracy", out)
    accuracy = float(re.search(r"^test accuracy ([0-9.]+)%", out, re.M).group(1))
    assert accuracy > 80


def test_sequence_model_learns_addition(tmp_path: Path) -> None:
    """The recurrent net's whole run, as its docstring states it: every digit of
    held-out sums right for over 99% (99.6% on this machine; 97 leaves room for
    another BLAS's rounding)."""
    out = run_example("sequence.py", cwd=tmp_path)
    found = losses(out)
    assert len(found) == 8 and found[-1] < 0.1 * found[0]
    accuracy = float(re.search(r"^held-out sums right: ([0-9.]+)%", out, re.M).group(1))
    assert accuracy >= 97


def test_digits_cnn_reaches_98_percent_on_its_own_local_cluster(tmp_path: Path) -> None:
    out = run_example("digits_cnn.py", cwd=tmp_path)
    assert re.search(r"epoch  6  loss [0-9.]+  test accuracy", out)
    accuracy = float(re.search(r"^test accuracy ([0-9.]+)%", out, re.M).group(1))
    assert accuracy >= 98


@pytest.fixture(scope="module")
def coordinator() -> str:
    from gradpool.cluster import LocalCluster

    with LocalCluster(workers=2) as cluster:
        yield cluster.address


@pytest.mark.parametrize("name, args", [
    ("logistic_regression.py", ["--steps", "3"]),
    ("two_layer_net.py", ["--steps", "3"]),
    ("digits_mlp.py", ["--steps", "3"]),
    ("sequence.py", ["--epochs", "1"]),
    ("digits_cnn.py", ["--steps", "3"]),
])
def test_each_example_uses_a_given_coordinator(coordinator: str, name: str, args: list[str],
                                               tmp_path: Path) -> None:
    out = run_example(name, "--coordinator", coordinator, *args, cwd=tmp_path)
    assert losses(out)

