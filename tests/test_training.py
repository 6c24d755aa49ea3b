"""The training loop, its checkpoints, callbacks and logs, in-process (LocalBackend).

The claims: training lowers the loss; a run stopped anywhere (mid-epoch, or
by a failing backend) and resumed from its checkpoint ends bit for bit where
an uninterrupted run does; a checkpoint write that dies half-way leaves the
previous checkpoint intact; a checkpoint of another graph is refused; bad
data gets one clear error before any step; predictions match local_forward.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import gradpool as gp
from gradpool import checkpoint as ckpt_module
from gradpool.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from gradpool.optim import SGD, Adam, CosineLR
from gradpool.training import LocalBackend, Trainer, TrainingError, fit

from models import logistic_regression, softmax_mlp


def teacher_data(n: int, sample: int = 0, d: int = 8, classes: int = 5) -> dict[str, np.ndarray]:
    """Labels one fixed linear teacher gives, so a student can learn them; `sample` draws other examples."""
    teacher = np.random.default_rng(1234).normal(size=(d, classes))
    x = np.random.default_rng(sample).normal(size=(n, d))
    return {"x": x, "y": (x @ teacher).argmax(axis=1).astype(np.int64)}


def sgd_momentum(params: dict[str, np.ndarray]) -> SGD:
    return SGD(params, lr=CosineLR(0.2, total_steps=40, warmup_steps=3), momentum=0.9, nesterov=True,
               weight_decay=1e-3)


def make_trainer(graph: gp.Graph | None = None, **options) -> Trainer:
    graph = graph or softmax_mlp()
    options.setdefault("batch_size", 16)
    options.setdefault("progress", False)
    return Trainer(graph, options.pop("optimizer", sgd_momentum), **options)


def assert_same_state(a: Trainer, b: Trainer) -> None:
    for name in a.params:
        assert a.params[name].dtype == b.params[name].dtype == np.float64
        assert np.array_equal(a.params[name], b.params[name]), name
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["step_count"] == sb["step_count"]
    for name in sa["slots"]:
        for slot in sa["slots"][name]:
            assert np.array_equal(sa["slots"][name][slot], sb["slots"][name][slot]), (name, slot)
    assert a.history.losses == b.history.losses
    assert [e["loss"] for e in a.history.epochs] == [e["loss"] for e in b.history.epochs]
    assert (a.step, a.epoch) == (b.step, b.epoch)


# ------------------------------------------------------------------ training


def test_training_lowers_the_loss_and_learns() -> None:
    data, held_out = teacher_data(240), teacher_data(200, sample=1)
    trainer = make_trainer(optimizer=lambda p: Adam(p, lr=0.02), batch_size=32)
    before = trainer.evaluate(data)
    history = trainer.fit(data, epochs=8)
    first_epoch, last_epoch = history.epochs[0]["loss"], history.epochs[-1]["loss"]
    assert last_epoch < 0.6 * first_epoch
    after = trainer.evaluate(held_out)
    assert after["accuracy"] > max(0.8, before["accuracy"] + 0.3)
    assert len(history.steps) == 8 * 8 and history.steps[-1]["step"] == trainer.step == 64
    assert trainer.epoch == 8
    assert trainer.throughput["examples"] == 8 * 240


def test_the_lectures_logistic_regression_trains_with_a_sum_loss() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=200)
    t = (x + 0.3 * rng.normal(size=200) > 0).astype(np.float64)
    trainer = Trainer(logistic_regression(), lambda p: SGD(p, lr=0.02), batch_size=50, progress=False)
    history = trainer.fit({"x": x, "t": t}, epochs=20)
    assert history.epochs[-1]["loss"] < 0.5 * history.epochs[0]["loss"]
    assert trainer.params["w"] > 1.0  # sigmoid(w x + b) turns up with x


def test_fit_function_and_drop_last() -> None:
    data = teacher_data(50)
    trainer = fit(softmax_mlp(), data, epochs=2, batch_size=16, drop_last=True, progress=False)
    assert trainer.step == 2 * 3  # 50 // 16 full batches per epoch
    assert all(record["examples"] == 16 for record in trainer.history.steps)


def test_training_without_tqdm_installed_just_has_no_bar(monkeypatch, capsys) -> None:
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)  # `import tqdm` now raises ImportError
    trainer = make_trainer(progress=True)
    trainer.fit(teacher_data(40), epochs=1)
    assert trainer.step == 3 and capsys.readouterr().err == ""


def test_the_progress_bar_shows_loss_and_speed(capsys) -> None:
    make_trainer(progress=True).fit(teacher_data(40), epochs=2, eval_data=teacher_data(20, sample=1))
    bar = capsys.readouterr().err
    assert "6/6" in bar and "loss=" in bar and "ex_s=" in bar and "val_acc=" in bar


def test_eval_data_adds_held_out_metrics_to_every_epoch() -> None:
    data, held_out = teacher_data(100), teacher_data(40, sample=1)
    trainer = make_trainer()
    trainer.fit(data, epochs=3, eval_data=held_out)
    assert all(0.0 <= e["val_accuracy"] <= 1.0 and e["val_cross_entropy"] > 0 for e in trainer.history.epochs)
    calls = []
    trainer.fit(data, epochs=5, eval_every=2, eval_fn=lambda t: calls.append(t.epoch) or {"custom": 1.0})
    assert calls == [4, 5]  # epoch 4 is due (4 % 2 == 0), epoch 5 because it is the last
    assert trainer.history.epochs[-1]["custom"] == 1.0


# ------------------------------------------------------------------ resuming


@pytest.mark.parametrize("stop_at", [6, 8, 13])  # mid-epoch, at an epoch's end, mid-epoch later
def test_resuming_from_a_checkpoint_is_bitwise_identical(tmp_path: Path, stop_at: int) -> None:
    data = teacher_data(60)  # 4 batches of 16 per epoch, the last of 12
    uninterrupted = make_trainer()
    uninterrupted.fit(data, epochs=5)

    first = make_trainer()
    first.fit(data, epochs=5, max_steps=stop_at)
    assert first.step == stop_at
    path = first.save_checkpoint(tmp_path / "run.npz")

    resumed = make_trainer(seed=123)  # other init and shuffle seed: all of it must come from the checkpoint
    resumed.load_checkpoint(path)
    assert resumed.step == stop_at
    resumed.fit(data, epochs=5)
    assert_same_state(uninterrupted, resumed)


def test_a_failing_backend_leaves_a_checkpoint_to_resume_from(tmp_path: Path) -> None:
    class Unreachable(gp.GradpoolError):
        pass

    class FailsAtCall(LocalBackend):
        def __init__(self, fail_at: int):
            super().__init__()
            self.calls, self.fail_at = 0, fail_at

        def gradients(self, graph, params, batch):
            self.calls += 1
            if self.calls == self.fail_at:
                raise Unreachable("coordinator at localhost:1 is unreachable")
            return super().gradients(graph, params, batch)

    data = teacher_data(60)
    uninterrupted = make_trainer()
    uninterrupted.fit(data, epochs=3)

    crashing = make_trainer(backend=FailsAtCall(7), checkpoint_dir=tmp_path, checkpoint_every=4)
    with pytest.raises(Unreachable):
        crashing.fit(data, epochs=3)
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-00000006.npz"
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["step-00000004.npz", "step-00000006.npz"]

    resumed = make_trainer(checkpoint_dir=tmp_path).load_checkpoint(latest)
    resumed.fit(data, epochs=3)
    assert_same_state(uninterrupted, resumed)


def test_old_checkpoints_are_pruned_and_the_newest_kept(tmp_path: Path) -> None:
    trainer = make_trainer(checkpoint_dir=tmp_path, checkpoint_every=1, keep_checkpoints=2)
    trainer.fit(teacher_data(64), epochs=2)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["step-00000007.npz", "step-00000008.npz"]
    assert trainer.last_checkpoint == tmp_path / "step-00000008.npz"


def test_from_checkpoint_rebuilds_graph_params_and_optimizer(tmp_path: Path) -> None:
    data = teacher_data(60)
    trainer = make_trainer()
    trainer.fit(data, epochs=1)
    path = trainer.save_checkpoint(tmp_path / "model.npz")
    trainer.fit(data, epochs=2)

    rebuilt = Trainer.from_checkpoint(path, progress=False)
    assert rebuilt.graph.graph_id == trainer.graph.graph_id
    assert isinstance(rebuilt.optimizer, SGD) and rebuilt.optimizer.hyperparams["nesterov"] is True
    rebuilt.fit(data, epochs=2)
    assert_same_state(trainer, rebuilt)


def test_checkpoints_hold_no_pickles(tmp_path: Path) -> None:
    trainer = make_trainer()
    trainer.fit(teacher_data(40), epochs=1, max_steps=1)
    path = trainer.save_checkpoint(tmp_path / "c.npz")
    with np.load(path, allow_pickle=False) as npz:
        assert all(npz[key].dtype != object for key in npz.files)
    loaded = load_checkpoint(path)
    assert loaded.graph_id == trainer.graph.graph_id
    assert loaded.state["trainer"]["step"] == 1


# ------------------------------------------------------------------ atomic writes


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_write_that_dies_half_way_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch,
                                                                 failure: BaseException) -> None:
    data = teacher_data(40)
    trainer = make_trainer()
    trainer.fit(data, epochs=1)
    path = trainer.save_checkpoint(tmp_path / "latest.npz")
    good_bytes = path.read_bytes()
    trainer.fit(data, epochs=2)

    def dies_half_way(file, arrays) -> None:
        file.write(b"PK\x03\x04 half a zip")
        file.flush()
        raise failure

    monkeypatch.setattr(ckpt_module, "_write_npz", dies_half_way)
    expected = CheckpointError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as caught:
        trainer.save_checkpoint(path)
    if expected is CheckpointError:
        assert "No space left" in str(caught.value) and "\n" not in str(caught.value)
    assert os.listdir(tmp_path) == ["latest.npz"]  # no temp file left behind
    assert path.read_bytes() == good_bytes
    assert load_checkpoint(path).state["trainer"]["epoch"] == 1


def test_a_damaged_file_is_one_clear_error(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="not a readable gradpool checkpoint"):
        make_trainer().load_checkpoint(damaged)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        make_trainer().load_checkpoint(tmp_path / "missing.npz")
    plain = tmp_path / "plain.npz"
    np.savez(plain, x=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a readable gradpool checkpoint"):
        make_trainer().load_checkpoint(plain)


# ------------------------------------------------------------------ other graphs


def test_a_checkpoint_of_another_graph_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    trainer = make_trainer(softmax_mlp(l2=1e-2))
    trainer.fit(teacher_data(40), epochs=1)
    path = trainer.save_checkpoint(tmp_path / "l2.npz")

    other = make_trainer(softmax_mlp(l2=1e-3))  # same params and shapes, another loss
    before = {k: v.copy() for k, v in other.params.items()}
    with pytest.raises(CheckpointError) as caught:
        other.load_checkpoint(path)
    message = str(caught.value)
    assert "written for graph" in message and "refusing" in message and "\n" not in message
    assert all(np.array_equal(before[k], other.params[k]) for k in before)
    assert other.step == 0 and other.optimizer.step_count == 0

    with pytest.raises(CheckpointError, match="written for graph"):
        make_trainer(softmax_mlp(h=8)).load_checkpoint(path)


def test_the_same_model_built_on_other_lines_is_accepted(tmp_path: Path) -> None:
    """The graph id leaves out where each node was built: moving the code does not change the model."""
    trainer = make_trainer(softmax_mlp())
    trainer.fit(teacher_data(40), epochs=1)
    path = trainer.save_checkpoint(tmp_path / "c.npz")

    moved = softmax_mlp()
    moved._nodes[0].origin = "elsewhere.py:99"
    moved._invalidate()
    assert moved.graph_id == trainer.graph.graph_id
    resumed = make_trainer(moved).load_checkpoint(path)
    assert all(np.array_equal(resumed.params[k], trainer.params[k]) for k in trainer.params)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("data, fragment", [
    ({"x": np.zeros((10, 8)), "y": np.zeros(9, dtype=np.int64)}, "inputs disagree on the batch size: {'x': 10, 'y': 9}"),
    ({"x": np.zeros((10, 8)), "y": np.full(10, 5)}, "input 'y' (class labels for 'logits') has 5 at example 0, out of range [0, 5)"),
    ({"x": np.zeros((10, 8)), "y": np.r_[np.zeros(9, np.int64), -1]}, "has -1 at example 9"),
    ({"x": np.zeros((10, 8))}, "missing input(s) ['y']"),
    ({"x": np.zeros((10, 8)), "y": np.zeros(10, np.int64), "z": np.zeros(10)}, "unknown input(s) ['z']; the graph's inputs are ['x', 'y']"),
    ({"x": np.zeros((10, 7)), "y": np.zeros(10, np.int64)}, "input 'x' has shape (10, 7), but the graph declares (batch, 8)"),
    ({"x": np.zeros((10, 8)), "y": np.zeros(10)}, "input 'y' is float64, but the graph declares int64"),
    ({"x": np.zeros((0, 8)), "y": np.zeros(0, np.int64)}, "the batch is empty"),
    ({"x": np.zeros((10, 8)), "y": np.zeros(10, np.int64)}, "batch_size 16 is larger than the training data"),
    ([1, 2, 3], "must be a non-empty dict"),
])
def test_bad_training_data_is_one_clear_error_and_loses_nothing(tmp_path: Path, data, fragment: str) -> None:
    trainer = make_trainer(checkpoint_dir=tmp_path, checkpoint_every=1)
    trainer.fit(teacher_data(32), epochs=1)
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    params = {k: v.copy() for k, v in trainer.params.items()}
    with pytest.raises(gp.InputError) as caught:
        trainer.fit(data, epochs=3)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved
    assert all(np.array_equal(params[k], trainer.params[k]) for k in params)


def test_resuming_with_other_data_mid_epoch_is_refused(tmp_path: Path) -> None:
    trainer = make_trainer()
    trainer.fit(teacher_data(40), epochs=1, max_steps=1)
    with pytest.raises(gp.InputError, match="stopped mid-epoch over 40 examples"):
        trainer.fit(teacher_data(41), epochs=1)


def test_bad_settings_are_refused_at_construction() -> None:
    with pytest.raises(gp.InputError, match="batch_size must be a positive integer"):
        make_trainer(batch_size=0)
    with pytest.raises(gp.InputError, match="backend must be"):
        make_trainer(backend=object())
    graph = softmax_mlp()
    foreign = graph.init_params(0)
    with pytest.raises(gp.InputError, match="not the arrays the optimizer updates"):
        Trainer(graph, SGD(graph.init_params(0), lr=0.1), params=foreign)
    with pytest.raises(gp.InputError, match="missing"):
        Trainer(graph, params={"W1": np.zeros((8, 16))})
    with pytest.raises(gp.InputError, match="eval_fn"):
        make_trainer(logistic_regression()).fit({"x": np.zeros(20), "t": np.zeros(20)},
                                                eval_data={"x": np.zeros(5), "t": np.zeros(5)})


def test_a_diverging_loss_stops_with_the_last_good_params(tmp_path: Path) -> None:
    class NanAfterTwo(LocalBackend):
        calls = 0

        def gradients(self, graph, params, batch):
            self.calls += 1
            loss, grads = super().gradients(graph, params, batch)
            return (float("nan") if self.calls > 2 else loss), grads

    trainer = make_trainer(backend=NanAfterTwo(), checkpoint_dir=tmp_path)
    with pytest.raises(TrainingError, match="the loss is nan at step 3"):
        trainer.fit(teacher_data(64), epochs=2)
    assert trainer.step == 2 and trainer.optimizer.step_count == 2
    assert latest_checkpoint(tmp_path).name == "step-00000002.npz"


# ------------------------------------------------------------------ forward only


def test_predict_and_accuracy_match_local_forward() -> None:
    data = teacher_data(103)
    trainer = make_trainer(eval_batch_size=10)
    trainer.fit(data, epochs=2)
    logits = trainer.predict({"x": data["x"]})
    reference = gp.local_forward(trainer.graph, trainer.params, {"x": data["x"]}, ["logits"])["logits"]
    assert logits.shape == (103, 5)
    np.testing.assert_allclose(logits, reference, rtol=1e-12, atol=1e-12)
    both = trainer.predict(data, ["logits"], batch_size=1000)
    np.testing.assert_array_equal(both["logits"], reference)

    metrics = trainer.evaluate(data)
    expected = float(np.mean(reference.argmax(axis=1) == data["y"]))
    assert metrics["accuracy"] == pytest.approx(expected, abs=0)
    assert metrics["examples"] == 103 and metrics["correct"] == round(expected * 103)
    shifted = reference - reference.max(axis=1, keepdims=True)
    xent = -(shifted[np.arange(103), data["y"]] - np.log(np.exp(shifted).sum(axis=1))).mean()
    assert metrics["cross_entropy"] == pytest.approx(xent, rel=1e-12)


def test_predict_names_a_missing_node_clearly() -> None:
    with pytest.raises(gp.InputError, match="no node named 'scores'"):
        make_trainer().predict({"x": np.zeros((3, 8))}, "scores")
    with pytest.raises(gp.InputError, match="cannot measure accuracy"):
        make_trainer(logistic_regression()).evaluate({"x": np.zeros(3), "t": np.zeros(3)})


# ------------------------------------------------------------------ through the service


@pytest.fixture(scope="module")
def cluster():
    from gradpool.cluster import LocalCluster

    with LocalCluster(workers=2) as running:
        yield running


def test_remote_training_equals_local_training_with_as_many_shards(cluster) -> None:
    """The trainer's code path is the same; two equal workers split batches as shards=2 does."""
    from gradpool.remote import Client

    data, held_out = teacher_data(60), teacher_data(30, sample=1)
    local = make_trainer(backend=LocalBackend(shards=2))
    local.fit(data, epochs=2, eval_data=held_out)
    with Client(cluster.address) as service:
        remote = make_trainer(backend=service)
        remote.fit(data, epochs=2, eval_data=held_out)
        logits = remote.predict(held_out)
    assert_same_state(local, remote)
    with make_trainer(backend=cluster.address) as by_address:  # the trainer opens and closes a Client
        by_address.fit(data, epochs=1, max_steps=2)
        assert type(by_address.backend).__name__ == "Client" and by_address.step == 2
    assert [e["val_accuracy"] for e in local.history.epochs] == [e["val_accuracy"] for e in remote.history.epochs]
    reference = gp.local_forward(local.graph, local.params, {"x": held_out["x"]}, ["logits"])["logits"]
    np.testing.assert_allclose(logits, reference, rtol=1e-12, atol=1e-12)


def test_an_unreachable_coordinator_is_one_clear_error_and_keeps_checkpoints(tmp_path: Path) -> None:
    from gradpool.remote import Client, ServiceUnavailable

    data = teacher_data(40)
    trainer = make_trainer(checkpoint_dir=tmp_path)
    trainer.fit(data, epochs=1)
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert saved

    with Client("127.0.0.1:1", timeout=1.0) as nowhere:
        resumed = make_trainer(backend=nowhere, checkpoint_dir=tmp_path).load_checkpoint(latest_checkpoint(tmp_path))
        with pytest.raises(ServiceUnavailable) as caught:
            resumed.fit(data, epochs=2)
    assert "cannot reach the gradpool coordinator at 127.0.0.1:1" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved


# ------------------------------------------------------------------ clipping and parameter groups


def grouped_clipped(params: dict[str, np.ndarray]) -> SGD:
    """Nesterov SGD, no decay and a tenth of the rate on biases, global-norm clipping that bites."""
    return SGD(params, lr=CosineLR(0.2, total_steps=40, warmup_steps=3), momentum=0.9, nesterov=True,
               weight_decay=1e-3, clip_grad_norm=0.3,
               groups=[{"params": ["b1", "b2"], "weight_decay": 0.0, "lr": 0.02}])


@pytest.mark.parametrize("stop_at", [6, 13])
def test_resuming_with_clipping_and_groups_is_bitwise_identical(tmp_path: Path, stop_at: int) -> None:
    data = teacher_data(60)
    uninterrupted = make_trainer(optimizer=grouped_clipped)
    uninterrupted.fit(data, epochs=5)
    norms = [r["grad_norm"] for r in uninterrupted.history.steps]
    assert max(norms) > 0.3 and all(np.isfinite(norms))  # clipping did happen

    first = make_trainer(optimizer=grouped_clipped)
    first.fit(data, epochs=5, max_steps=stop_at)
    path = first.save_checkpoint(tmp_path / "run.npz")
    resumed = make_trainer(seed=7)  # plain SGD: groups and clipping come from the checkpoint
    resumed.load_checkpoint(path)
    assert resumed.optimizer.clip_grad_norm == 0.3 and resumed.optimizer.groups[0]["params"] == ["b1", "b2"]
    resumed.fit(data, epochs=5)
    assert_same_state(uninterrupted, resumed)
    rebuilt = Trainer.from_checkpoint(path, progress=False)
    rebuilt.fit(data, epochs=5)
    assert_same_state(uninterrupted, rebuilt)


def test_a_non_finite_gradient_with_clipping_stops_with_the_last_good_params(tmp_path: Path) -> None:
    class InfGradAtThree(LocalBackend):
        calls = 0

        def gradients(self, graph, params, batch):
            self.calls += 1
            loss, grads = super().gradients(graph, params, batch)
            if self.calls == 3:
                grads = dict(grads, W1=np.full_like(grads["W1"], np.inf))
            return loss, grads

    trainer = make_trainer(backend=InfGradAtThree(), checkpoint_dir=tmp_path, optimizer=grouped_clipped)
    with pytest.raises(TrainingError, match="step 3: the gradient norm is inf"):
        trainer.fit(teacher_data(64), epochs=1)
    assert trainer.step == trainer.optimizer.step_count == 2 and all(np.isfinite(trainer.params["W1"]).flat)
    assert latest_checkpoint(tmp_path).name == "step-00000002.npz"


# ------------------------------------------------------------------ iterables of batches


def batches_of(data: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    n = len(data["y"])
    return [{k: v[i:i + size] for k, v in data.items()} for i in range(0, n, size)]


class FakeTensor:
    """What a DataLoader yields, duck-typed: `.detach()`, `.cpu()`, `.numpy()`, no `__array__`."""

    def __init__(self, array: np.ndarray, dtype=None):
        self._array = np.asarray(array, dtype=dtype)

    def detach(self) -> "FakeTensor":
        return self

    def cpu(self) -> "FakeTensor":
        return self

    def numpy(self) -> np.ndarray:
        return self._array


def test_a_list_of_batches_trains_as_the_same_arrays_unshuffled() -> None:
    data = teacher_data(60)
    arrays = make_trainer(shuffle=False)
    arrays.fit(data, epochs=3)
    listed = make_trainer()
    listed.fit(batches_of(data, 16), epochs=3)
    assert_same_state(arrays, listed)
    as_tuples = make_trainer()  # (x, y) in the graph's input order, float32 "tensors" cast to float64
    as_tuples.fit([(FakeTensor(b["x"]), FakeTensor(b["y"])) for b in batches_of(data, 16)], epochs=3)
    as_lists = make_trainer()
    as_lists.fit([[b["x"].tolist(), b["y"]] for b in batches_of(data, 16)], epochs=3)  # anything np.asarray takes
    assert_same_state(arrays, as_tuples)
    assert_same_state(arrays, as_lists)
    assert [e["examples"] for e in listed.history.epochs] == [60, 60, 60]


@pytest.mark.parametrize("stop_at", [2, 4, 6])  # mid-epoch, at an epoch's end (found on the next read), later
def test_resuming_over_a_list_of_batches_is_bitwise_identical(tmp_path: Path, stop_at: int) -> None:
    batches = batches_of(teacher_data(60), 16)
    uninterrupted = make_trainer()
    uninterrupted.fit(batches, epochs=3)
    first = make_trainer()
    first.fit(batches, epochs=3, max_steps=stop_at)
    path = first.save_checkpoint(tmp_path / "run.npz")
    resumed = make_trainer(seed=5).load_checkpoint(path)
    resumed.fit(batches, epochs=3)
    assert_same_state(uninterrupted, resumed)
    # Every stop is mid-epoch for the trainer (an iterable's end shows only on the next read): arrays are refused.
    with pytest.raises(gp.InputError, match="mid-epoch over an iterable of batches"):
        make_trainer().load_checkpoint(path).fit(teacher_data(60), epochs=3)


def test_a_generator_is_one_epoch_or_cut_by_steps_per_epoch() -> None:
    data = teacher_data(80)

    def stream(n_batches: int):
        for batch in batches_of(data, 16)[:n_batches]:
            yield batch

    one = make_trainer()
    one.fit(stream(5))
    assert (one.step, one.epoch, one.stop_reason) == (5, 1, None)
    with pytest.raises(gp.InputError, match="one-shot iterator .* steps_per_epoch"):
        make_trainer().fit(stream(5), epochs=2)

    cut = make_trainer()
    cut.fit(stream(5), epochs=3, steps_per_epoch=2)  # 2 + 2 + 1: the stream runs dry in epoch 3
    assert cut.step == 5 and [e["steps"] for e in cut.history.epochs] == [2, 2, 1]
    exact = make_trainer()
    exact.fit(stream(4), epochs=3, steps_per_epoch=2)  # dry at an epoch's boundary: stops, no empty epoch
    assert exact.epoch == 2 and exact.stop_reason == "the training data is exhausted"
    with pytest.raises(gp.InputError, match="yielded no batches"):
        make_trainer().fit(stream(0))


@pytest.mark.parametrize("batches, fragment", [
    ([{"x": np.zeros((4, 8))}], "training batch 1: missing input(s) ['y']"),
    ([(np.zeros((4, 8)),)], "training batch 1 has 1 arrays, but the graph has 2 inputs ['x', 'y']"),
    ([{"x": np.zeros((4, 8)), "y": np.zeros(4, np.int64)}, 7], "training batch 2 must be a non-empty dict"),
    ([], "the training data has no batches"),
])
def test_bad_batches_are_one_clear_error(batches, fragment: str) -> None:
    trainer = make_trainer()
    with pytest.raises(gp.InputError) as caught:
        trainer.fit(batches)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(gp.InputError, match="steps_per_epoch is for iterables"):
        trainer.fit(teacher_data(40), steps_per_epoch=2)


# ------------------------------------------------------------------ callbacks


class Recorder(gp.Callback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_fit_start(self, trainer) -> None:
        self.events.append("start")

    def on_step(self, trainer, record) -> None:
        self.events.append(f"step{record['step']}")

    def on_eval(self, trainer, metrics) -> None:
        self.events.append("eval:" + ",".join(sorted(metrics)))

    def on_epoch(self, trainer, record) -> None:
        self.events.append(f"epoch{record['epoch']}")

    def on_fit_end(self, trainer) -> None:
        self.events.append("end")


def test_callbacks_see_steps_evaluations_and_epochs_in_order() -> None:
    data, held_out = teacher_data(40), teacher_data(20, sample=1)
    recorder = Recorder()
    trainer = make_trainer(callbacks=[recorder])
    trainer.fit(data, epochs=2, eval_data=held_out, eval_every=2)
    metrics = "eval:val_accuracy,val_cross_entropy,val_loss"
    assert recorder.events == ["start", "step1", "step2", "step3", "epoch1", "step4", "step5", "step6",
                               metrics, "epoch2", "end"]
    step = trainer.history.steps[0]
    assert step["examples_per_s"] > 0 and step["grad_norm"] > 0 and step["lr"] == trainer.history.steps[0]["lr"]
    loss, _ = gp.local_gradients(trainer.graph, trainer.params, held_out)
    assert trainer.history.epochs[-1]["val_loss"] == pytest.approx(loss, rel=1e-12)
    with pytest.raises(gp.InputError, match="callbacks must be"):
        make_trainer(callbacks=[print])


def scripted(values):
    """An eval_fn giving the next of `values` as val_loss each epoch it runs."""
    it = iter(values)
    return lambda trainer: {"val_loss": next(it)}


def test_early_stopping_stops_cleanly_and_a_resumed_run_stops_at_the_same_epoch(tmp_path: Path) -> None:
    losses = [1.0, 0.8, 0.85, 0.81, 0.9, 0.7, 0.6]  # best at epoch 2, then three epochs without improving
    stopper = gp.EarlyStopping(monitor="val_loss", patience=2, min_delta=0.01)
    trainer = make_trainer(checkpoint_dir=tmp_path / "a")
    trainer.fit(teacher_data(40), epochs=7, eval_fn=scripted(losses), callbacks=[stopper])
    assert trainer.epoch == 5 and stopper.stopped_epoch == 5 and stopper.best_epoch == 2
    assert "early stopping: val_loss has not improved for 3 epochs" in trainer.stop_reason
    assert latest_checkpoint(tmp_path / "a").name == f"step-{trainer.step:08d}.npz"

    first = make_trainer()
    first.fit(teacher_data(40), epochs=7, max_steps=9, eval_fn=scripted(losses))  # 3 epochs, no callback
    path = first.save_checkpoint(tmp_path / "at3.npz")
    resumed = make_trainer().load_checkpoint(path)
    resumed.fit(teacher_data(40), epochs=7, eval_fn=scripted(losses[3:]),
                callbacks=[gp.EarlyStopping(patience=2, min_delta=0.01)])
    assert resumed.epoch == 5  # the callback's count came back from the checkpointed history


def test_early_stopping_names_a_metric_the_records_lack() -> None:
    with pytest.raises(gp.InputError, match="monitors 'val_los'.*'val_accuracy'"):
        make_trainer().fit(teacher_data(40), epochs=2, eval_data=teacher_data(20, sample=1),
                           callbacks=[gp.EarlyStopping(monitor="val_los")])
    with pytest.warns(UserWarning, match="never saw 'val_loss'"):
        make_trainer().fit(teacher_data(40), epochs=1, callbacks=[gp.EarlyStopping()])
    with pytest.raises(gp.InputError, match="mode must be"):
        gp.EarlyStopping(mode="lowest")


def test_best_checkpoint_keeps_the_best_epoch(tmp_path: Path) -> None:
    best = tmp_path / "best.npz"
    keeper = gp.BestCheckpoint(best, monitor="val_accuracy", mode="max")
    trainer = make_trainer()
    snapshots = {}

    class Snapshot(gp.Callback):
        def on_epoch(self, trainer, record) -> None:
            snapshots[record["epoch"]] = {k: v.copy() for k, v in trainer.params.items()}

    accuracies = iter([0.5, 0.7, 0.6, 0.7, 0.65])
    trainer.fit(teacher_data(40), epochs=5, eval_fn=lambda t: {"val_accuracy": next(accuracies)},
                callbacks=[keeper, Snapshot()])
    assert keeper.saved_epoch == 2 and keeper.best == 0.7  # a tie is no improvement
    saved = load_checkpoint(best)
    assert saved.state["trainer"]["epoch"] == 2
    assert all(np.array_equal(saved.params[k], snapshots[2][k]) for k in snapshots[2])
    assert os.listdir(tmp_path) == ["best.npz"]  # atomic writes leave no temp file


# ------------------------------------------------------------------ logs


def test_csv_logger_writes_steps_and_epochs_and_a_resumed_run_continues_it(tmp_path: Path) -> None:
    import csv

    log = tmp_path / "train.csv"
    data, held_out = teacher_data(40), teacher_data(20, sample=1)
    trainer = make_trainer(callbacks=[gp.CSVLogger(log)])
    trainer.fit(data, epochs=2, eval_data=held_out)
    rows = list(csv.DictReader(log.open()))
    assert [r["kind"] for r in rows] == ["step"] * 3 + ["epoch"] + ["step"] * 3 + ["epoch"]
    assert {"loss", "lr", "grad_norm", "examples_per_s", "val_loss", "val_accuracy"} <= set(rows[0])
    assert float(rows[1]["loss"]) == trainer.history.steps[1]["loss"]  # repr round-trips floats exactly
    assert float(rows[-1]["val_accuracy"]) == trainer.history.epochs[-1]["val_accuracy"]

    first = make_trainer(callbacks=[gp.CSVLogger(tmp_path / "resumed.csv")])
    first.fit(data, epochs=2, eval_data=held_out, max_steps=4)
    path = first.save_checkpoint(tmp_path / "at4.npz")
    first.fit(data, epochs=2, eval_data=held_out, max_steps=5)  # a step the resumed run redoes
    resumed = make_trainer(callbacks=[gp.CSVLogger(tmp_path / "resumed.csv")]).load_checkpoint(path)
    resumed.fit(data, epochs=2, eval_data=held_out)
    again = list(csv.DictReader((tmp_path / "resumed.csv").open()))
    assert [(r["kind"], r["step"], r["loss"]) for r in again] == [(r["kind"], r["step"], r["loss"]) for r in rows]


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Parse TensorBoard event files: TFRecord framing (length, masked CRC32C of it, data, masked
    CRC32C of the data) around Event protos, read with tensorboardX's bundled protos."""
    import struct

    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto import event_pb2

    def masked(data: bytes) -> int:
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        raw, at = path.read_bytes(), 0
        while at < len(raw):
            header = raw[at:at + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", raw[at + 8:at + 12])[0] == masked(header)
            data = raw[at + 12:at + 12 + length]
            assert struct.unpack("<I", raw[at + 12 + length:at + 16 + length])[0] == masked(data)
            at += 16 + length
            event = event_pb2.Event.FromString(data)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_logger_writes_scalars_tensorboard_reads(tmp_path: Path) -> None:
    trainer = make_trainer(callbacks=[gp.TensorBoardLogger(tmp_path / "run")])
    trainer.fit(teacher_data(40), epochs=2, eval_data=teacher_data(20, sample=1))
    scalars = read_scalars(tmp_path / "run")
    losses = [r["loss"] for r in trainer.history.steps]
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], losses, rtol=1e-6)  # stored as float32
    assert {"train/lr", "train/grad_norm", "train/examples_per_s", "epoch/loss", "epoch/val_loss",
            "epoch/val_accuracy"} <= set(scalars)
    assert [step for step, _ in scalars["epoch/val_accuracy"]] == [3, 6]
    assert scalars["epoch/val_accuracy"][-1][1] == pytest.approx(trainer.history.epochs[-1]["val_accuracy"])


def test_remote_training_on_an_iterable_sends_batches_inline_and_equals_local(cluster) -> None:
    from gradpool.remote import Client

    batches = batches_of(teacher_data(60), 16)
    with Client(cluster.address) as service:
        uploads = []
        service.upload = lambda *a, **k: uploads.append(a)  # noqa: E731  (would be the resident path)
        remote = make_trainer(backend=service)
        remote.fit(iter(batches), epochs=2, steps_per_epoch=2)  # a one-shot stream, cut into epochs
        assert uploads == []
    local_cut = make_trainer(backend=LocalBackend(shards=2))
    local_cut.fit(iter(batches), epochs=2, steps_per_epoch=2)
    assert_same_state(local_cut, remote)
    assert remote.step == 4 and remote.epoch == 2
