"""The plain-torch loop (no Ray): learning, early stopping, divergence, resuming."""

import copy
import math

import pytest
import torch

from models.architecture import ArchitectureConfig
from models.losses import TaskLoss
from models.networks import build_network
from models.optimizers import make_optimizer
from pipelines.training.batches import ShardedBatches, shard_for_eval
from pipelines.training.loop import (
    EarlyStopping,
    SupervisedStep,
    TrainingDiverged,
    TrainingState,
    fit,
)

CPU = torch.device("cpu")


def blobs(n=400, seed=0):
    """Two Gaussian blobs in 2-D: linearly separable, learnable in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 2, generator=g) * 0.5 + (y.float()[:, None] * 2 - 1) * 1.5
    return x, y


def make_state(lr=0.05, optimizer="adam", patience=0):
    torch.manual_seed(0)
    model = build_network(ArchitectureConfig(kind="mlp", hidden_sizes=(16,), dropout=0.0), (2,), 2)
    return TrainingState(
        model, {"model": make_optimizer(optimizer, model.parameters(), lr)}, EarlyStopping(patience)
    )


def run(
    state,
    epochs,
    lr=0.05,
    divergence_factor=100.0,
    on_epoch_end=None,
    device=CPU,
    precision="fp32",
    ema_decay=0.0,
):
    x, y = blobs()
    train = ShardedBatches(x[:300], y[:300], batch_size=32, seed=1)
    val = shard_for_eval(x[300:], y[300:], 256, 0, 1)
    return fit(
        state,
        SupervisedStep(TaskLoss("cross_entropy", "classification"), classification=True),
        train.epoch,
        lambda: val.epoch(0),
        epochs=epochs,
        device=device,
        precision=precision,
        divergence_factor=divergence_factor,
        on_epoch_end=on_epoch_end,
        ema_decay=ema_decay,
    )


def test_fit_learns_and_records_history():
    state = run(make_state(), epochs=8)
    history = state.history
    assert len(history) == 8 and state.next_epoch == 8
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_accuracy"] > 0.95
    assert any(k.startswith("grad_norm/") for k in history[0])
    assert state.best_model_state is not None


def test_early_stopping_ends_the_run_after_patience_epochs():
    state = make_state(lr=1e-3)
    state.early_stopping.best_loss = -math.inf  # nothing can improve: stop after `patience`
    state.early_stopping.patience = 3
    state = run(state, epochs=50)
    assert len(state.history) == 3


def test_divergence_names_the_learning_rate():
    with pytest.raises(TrainingDiverged, match=r"learning rate 1e\+06"):
        run(make_state(lr=1e6, optimizer="sgd"), epochs=20, lr=1e6, divergence_factor=10.0)


def test_resume_from_a_saved_state_continues_at_the_next_epoch():
    saved = {}

    def save_at_epoch_2(metrics, state):
        if metrics["epoch"] == 2:  # a snapshot, as torch.save in a checkpoint takes
            saved.update(copy.deepcopy(state.state_dict()))

    full = run(make_state(), epochs=6, on_epoch_end=save_at_epoch_2)
    resumed = make_state()
    resumed.load_state_dict(saved)
    assert resumed.next_epoch == 3
    resumed = run(resumed, epochs=6)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3, 4, 5]
    # Same seeds, same data order: the resumed run ends exactly where the uninterrupted one did.
    assert resumed.history[-1]["train_loss"] == pytest.approx(
        full.history[-1]["train_loss"], rel=1e-5
    )


def test_a_state_loaded_into_other_settings_keeps_their_hyperparameters():
    """PBT: a trial takes a better trial's weights and moments but keeps its own settings."""
    donor = run(make_state(optimizer="adamw"), epochs=2)
    torch.manual_seed(0)
    model = build_network(ArchitectureConfig(kind="mlp", hidden_sizes=(16,), dropout=0.0), (2,), 2)
    taker = TrainingState(
        model,
        {"model": make_optimizer("adamw", model.parameters(), 0.01, weight_decay=0.003)},
        EarlyStopping(0),
    )
    taker.load_state_dict(copy.deepcopy(donor.state_dict()))
    group = taker.optimizer.param_groups[0]
    assert group["weight_decay"] == 0.003 and group["lr"] == 0.01
    moments = taker.optimizer.state[group["params"][0]]["exp_avg"]
    donor_group = donor.optimizer.param_groups[0]
    assert torch.equal(moments, donor.optimizer.state[donor_group["params"][0]]["exp_avg"])
    assert taker.next_epoch == 2
    for mine, theirs in zip(taker.model.parameters(), donor.model.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_shards_are_equal_sized_disjoint_and_cover_the_data():
    x, y = torch.arange(103).float()[:, None], torch.arange(103)
    shards = [ShardedBatches(x, y, 10, rank=r, world_size=2, seed=3) for r in range(2)]
    a, b = (s.indices(epoch=4) for s in shards)
    assert len(a) == len(b) == 52  # padded so both workers take the same number of steps
    assert set(a.tolist()) | set(b.tolist()) == set(range(103))
    assert shards[0].steps_per_epoch() == shards[1].steps_per_epoch() == 6
    assert not torch.equal(shards[0].indices(0), shards[0].indices(1))  # reshuffled per epoch
    evaluation = [shard_for_eval(x, y, 7, r, 2) for r in range(2)]
    assert sum(len(e.x) for e in evaluation) == 103  # validation counts each example once


def test_no_batch_of_a_single_example():
    x, y = torch.zeros(65, 2), torch.zeros(65, dtype=torch.long)
    batches = ShardedBatches(x, y, batch_size=32, shuffle=False)
    assert [len(bx) for bx, _ in batches.epoch(0)] == [32, 33]
    assert batches.steps_per_epoch() == 2


def test_a_run_that_stopped_early_does_not_train_again_when_resumed():
    state = make_state()
    state.early_stopping.patience = 2
    state.early_stopping.epochs_without_improvement = 2
    state.next_epoch = 4
    assert run(state, epochs=10).history == []


def test_a_moving_average_of_the_weights_is_validated_kept_and_resumed():
    saved = {}

    def save_at_epoch_2(metrics, state):
        if metrics["epoch"] == 2:
            saved.update(copy.deepcopy(state.state_dict()))

    averaged = run(make_state(), epochs=6, on_epoch_end=save_at_epoch_2, ema_decay=0.9)
    plain = run(make_state(), epochs=6)
    # The same steps (the average never feeds back into training)...
    assert averaged.history[-1]["train_loss"] == plain.history[-1]["train_loss"]
    # ...but validation and the kept weights are the average's, not the last step's.
    assert averaged.history[-1]["val_loss"] != plain.history[-1]["val_loss"]
    assert averaged.history[-1]["val_accuracy"] > 0.95
    best = averaged.best_model_state
    weights = averaged.model.state_dict()
    assert best.keys() == weights.keys()
    assert not all(torch.equal(best[k], weights[k]) for k in best)
    # The kept weights are the average at the best epoch: they score its validation loss.
    x, y = blobs()
    network = make_state().model
    network.load_state_dict(best)
    network.eval()
    with torch.no_grad():
        loss = TaskLoss("cross_entropy", "classification")(network(x[300:]), y[300:])
    assert float(loss) == pytest.approx(min(h["val_loss"] for h in averaged.history), rel=1e-5)
    # A run resumed from epoch 2's checkpoint continues the same average.
    resumed = make_state()
    resumed.load_state_dict(saved)
    resumed = run(resumed, epochs=6, ema_decay=0.9)
    assert resumed.history[-1]["val_loss"] == pytest.approx(
        averaged.history[-1]["val_loss"], rel=1e-5
    )


def test_the_average_warms_up_so_a_short_run_is_not_held_at_its_untrained_weights():
    from pipelines.training.loop import moving_average, update_average

    state = make_state()
    state.average = moving_average(state, 0.99)
    start = [p.clone() for p in state.average.parameters()]
    with torch.no_grad():
        for p in state.model.parameters():
            p.add_(1.0)
    update_average(state, 0.99)  # the first step: decay min(0.99, 1/10)
    for mean, before in zip(state.average.parameters(), start, strict=True):
        assert torch.allclose(mean, before + 0.9)
    assert state.average_steps == 1
    state.average_steps = 10_000  # late in a run the configured decay holds
    update_average(state, 0.99)
    with torch.no_grad():
        for mean, weight in zip(state.average.parameters(), state.model.parameters()):
            assert torch.allclose(weight - mean, torch.full_like(mean, 0.1 * 0.99), atol=1e-6)
