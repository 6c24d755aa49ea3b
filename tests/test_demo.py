"""`gradpool demo` end to end: a real LocalCluster, a shortened run, its report and files.

The full default run (12 epochs) reaches >= 95% test accuracy; here 3 epochs
must reach 90%, and the files it writes must be what the report says.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from gradpool import cli, demo
from gradpool.training import Trainer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_the_demo_trains_through_a_local_cluster_and_writes_its_report(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    status = demo.main(["--epochs", "3", "--no-progress", "--out", str(out), "--min-accuracy", "0.9"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    report = printed.out
    assert "LocalCluster at 127.0.0.1:" in report and "2 worker(s)" in report
    assert "examples/s" in report and "ms per step" in report and str(out / "curves.png") in report

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.9
    assert f"{100 * metrics['test_accuracy']:.1f}% on the test set" in report
    assert metrics["workers"] == 2 and metrics["examples_per_s"] > 0 and metrics["seconds_per_step"] > 0
    assert metrics["data"]["train_examples"] + metrics["data"]["test_examples"] == 1797
    assert [e["epoch"] for e in metrics["history"]["epochs"]] == [1, 2, 3]
    assert metrics["steps"] == len(metrics["history"]["steps"]) == 3 * 22
    assert (out / "curves.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (out / "curves.png").stat().st_size > 10_000  # two plotted panels, not an empty canvas

    # The saved model alone reproduces the reported accuracy (forward passes in this process).
    _, test, _ = demo.load_digits_split(seed=0)
    trainer = Trainer.from_checkpoint(out / "model.npz", progress=False)
    assert trainer.evaluate(test)["correct"] == metrics["test_correct"]
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "metrics.json", "model.npz"]


def test_the_demo_runs_without_servers_with_local(tmp_path: Path, capsys) -> None:
    status = demo.main(["--local", "--epochs", "2", "--no-progress", "--out", str(tmp_path)])
    assert status == 0
    assert "in this process" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["test_accuracy"] >= 0.85


def test_an_unreachable_coordinator_is_one_line_and_keeps_earlier_outputs(tmp_path: Path, capsys) -> None:
    earlier = tmp_path / "metrics.json"
    earlier.write_text('{"from": "an earlier run"}\n')
    status = demo.main(["--coordinator", "127.0.0.1:1", "--timeout", "1", "--no-progress",
                        "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("gradpool demo: error: cannot reach the gradpool coordinator at 127.0.0.1:1")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert earlier.read_text() == '{"from": "an earlier run"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


@pytest.mark.parametrize("argv, status, fragment", [
    (["--epochs", "0"], 2, "--epochs must be >= 1"),
    (["--coordinator", "x:1", "--local"], 2, "not allowed with argument"),
    (["--coordinator", "x:1", "--workers", "3"], 2, "--workers sizes the local cluster"),
    (["--bogus"], 2, "unrecognized arguments: --bogus"),
])
def test_usage_errors_exit_2_with_a_message(argv, status: int, fragment: str, capsys) -> None:
    assert demo.main(argv) == status
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_an_unwritable_output_folder_fails_before_training(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert demo.main(["--local", "--out", str(blocker / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gradpool demo: error: cannot create the output folder") and err.count("\n") == 1


def test_an_existing_folder_that_refuses_writes_fails_before_training(capsys, monkeypatch) -> None:
    """The Docker case: a volume created by root, the demo running as uid 10001.
    Training then failing at the checkpoint lost the whole run; now nothing trains.
    (/proc refuses new files even to root, who writes through file modes.)"""
    folder = "/proc"

    def tripwire(*args, **kwargs):
        raise AssertionError("the demo loaded data and trained before checking --out")
    monkeypatch.setattr(demo, "load_digits_split", tripwire)
    assert demo.main(["--local", "--no-progress", "--out", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"gradpool demo: error: cannot write to the output folder {folder}: "), err
    assert err.count("\n") == 1
    assert not list(Path(folder).glob(".gradpool-write-check.*"))


def test_a_failed_run_leaves_no_empty_output_folder(tmp_path: Path, capsys, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise demo.DemoError("the data could not be loaded")
    monkeypatch.setattr(demo, "load_digits_split", fail)
    out = tmp_path / "new" / "out"
    assert demo.main(["--local", "--no-progress", "--out", str(out)]) == 1
    assert "the data could not be loaded" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_help_through_the_gradpool_command(capsys) -> None:
    assert cli.main(["demo", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--coordinator", "--workers", "--epochs", "--batch-size", "--lr", "--seed", "--out", "--local"):
        assert flag in text


def test_the_model_is_the_one_the_report_describes() -> None:
    graph = demo.build_mlp(64, 64, 10)
    assert {name: shape for name, (shape, _) in graph.params.items()} == {
        "W1": (64, 64), "b1": (64,), "W2": (64, 10), "b2": (10,)}
    assert graph.inputs["y"][1] == np.int64


def test_ctrl_c_stops_the_demo_and_its_cluster_in_order(tmp_path: Path) -> None:
    """SIGINT to the terminal's process group reaches the demo alone (its
    servers run in their own session): it stops the workers, which leave
    the pool, then the coordinator, with no warning and no traceback."""
    import signal
    import subprocess
    import sys
    import time

    demo_process = subprocess.Popen(
        [sys.executable, "-m", "gradpool.cli", "demo", "--epochs", "1000", "--no-progress", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        time.sleep(6.0)  # the cluster is up and training (1000 epochs take minutes)
        assert demo_process.poll() is None, demo_process.communicate()
        os.killpg(demo_process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, err = demo_process.communicate(timeout=60)
    finally:
        if demo_process.poll() is None:
            os.killpg(demo_process.pid, signal.SIGKILL)
    assert demo_process.returncode in (1, 130), err
    assert "could not deregister" not in err and "Traceback" not in err, err
    assert "interrupted" in err


def test_the_cnn_demo_trains_and_its_checkpoint_reproduces_the_accuracy(tmp_path: Path, capsys) -> None:
    """--model cnn: the same outputs, a conv net instead of the MLP, one epoch over the shifted
    images through a LocalCluster (its workers' capped BLAS threads make that the quick path)."""
    status = demo.main(["--model", "cnn", "--epochs", "1", "--no-progress", "--out", str(tmp_path)])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert "CNN 8x8x1: conv 16 3x3" in printed.out and "LocalCluster at" in printed.out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["model"] == "cnn" and metrics["test_accuracy"] >= 0.9
    assert metrics["data"]["train_examples"] == 5 * 1347  # each image and its four one-pixel shifts
    _, test, _ = demo.load_digits_split(seed=0, images=True)
    trainer = Trainer.from_checkpoint(tmp_path / "model.npz", progress=False)
    assert set(trainer.graph.params) == {"K1", "b1", "K2", "b2", "W", "b"}
    assert trainer.evaluate(test)["correct"] == metrics["test_correct"]


def test_the_mlp_stays_the_default_model() -> None:
    assert demo.build_parser().parse_args([]).model == "mlp"
    assert demo.main(["--model", "resnet"]) == 2
