"""A task's run in one process (what each Ray Train worker runs, without Ray), and the time
each epoch spends waiting for its batches."""

import copy
import dataclasses
import time

import pytest
import torch

from models.architecture import ArchitectureConfig
from models.losses import TaskLoss
from pipelines.stagekit.config import TrainConfig
from pipelines.training.batches import ShardedBatches, shard_for_eval
from pipelines.training.fitting import fit_task, initial_state
from pipelines.training.loop import SupervisedStep, TrainingDiverged, fit
from pipelines.training.tasks import SupervisedTask
from tests.unit.test_fixmatch import MANIFEST as DIGITS
from tests.unit.test_fixmatch import SMALL_CNN, digits_split
from tests.unit.test_training_loop import CPU, blobs, make_state

MANIFEST = {
    "task": "classification",
    "class_names": ["left", "right"],
    "normalization": {"mean": [0.0, 0.0], "std": [1.0, 1.0]},
    "input_kind": "tabular",
    "input_shape": [2],
}


def blob_task_and_arrays():
    task = SupervisedTask(ArchitectureConfig(kind="mlp", hidden_sizes=(16,), dropout=0.0), MANIFEST)
    x, y = blobs()
    return task, {"x_train": x[:300], "y_train": y[:300], "x_val": x[300:], "y_val": y[300:]}


def test_fit_task_trains_the_task_with_the_runs_settings():
    task, arrays = blob_task_and_arrays()
    train = TrainConfig(epochs=6, batch_size=32, lr=0.02, early_stopping_patience=0)
    state = fit_task(initial_state(task, train), task, arrays, train, CPU)
    assert len(state.history) == 6
    assert state.history[-1]["train_loss"] < state.history[0]["train_loss"]
    assert state.history[-1]["val_accuracy"] > 0.95
    assert state.optimizer.param_groups[0]["lr"] == 0.02


def test_initial_state_is_the_same_on_every_worker():
    task, _ = blob_task_and_arrays()
    train = TrainConfig(optimizer="momentum", seed=3)
    first, second = initial_state(task, train), initial_state(task, train)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert isinstance(first.optimizer, torch.optim.SGD)


def test_each_epoch_reports_the_time_it_waited_for_batches():
    x, y = blobs()
    batches = ShardedBatches(x[:300], y[:300], batch_size=100, seed=1)  # 3 batches an epoch
    val = shard_for_eval(x[300:], y[300:], 256, 0, 1)

    def slow_batches(epoch):
        for batch in batches.epoch(epoch):
            time.sleep(0.02)  # a data source slower than the step
            yield batch

    state = fit(
        make_state(),
        SupervisedStep(TaskLoss("cross_entropy", "classification"), classification=True),
        slow_batches,
        lambda: val.epoch(0),
        epochs=2,
        device=CPU,
    )
    for metrics in state.history:
        assert 0.06 <= metrics["data_wait_seconds"] < metrics["train_seconds"]
        assert metrics["train_seconds"] <= metrics["epoch_seconds"]


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one():
    # Dropout draws random masks: without a seed per epoch, a run resumed in a new process
    # (another generator state) drifts from the uninterrupted one (cluster.json's
    # node-loss run once ended 1.1 points away).
    task = SupervisedTask(ArchitectureConfig(kind="mlp", hidden_sizes=(16,), dropout=0.3), MANIFEST)
    _, arrays = blob_task_and_arrays()
    train = TrainConfig(epochs=5, batch_size=32, lr=0.02, early_stopping_patience=0)
    whole = fit_task(initial_state(task, train), task, arrays, train, CPU)

    first = fit_task(
        initial_state(task, train), task, arrays, dataclasses.replace(train, epochs=2), CPU
    )
    saved = copy.deepcopy(first.state_dict())
    torch.manual_seed(12345)  # the new process's generator is anywhere
    resumed = initial_state(task, train)
    resumed.load_state_dict(saved)
    resumed = fit_task(resumed, task, arrays, train, CPU)

    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in whole.history]
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_learning_rate_that_blows_up_the_first_steps_is_called_divergence():
    # SGD at lr 20: the first epoch's mean loss is ~1e17 and finite, and batch normalization
    # lets later epochs settle; measured against the untrained model's loss, it diverged.
    arrays = digits_split(per_class=20)
    task = SupervisedTask(SMALL_CNN, DIGITS)
    train = TrainConfig(epochs=2, batch_size=32, optimizer="minibatch_sgd", lr=20.0)
    with pytest.raises(TrainingDiverged, match="epoch 0.*lower train.lr"):
        fit_task(initial_state(task, train), task, arrays, train, CPU)
