"""FixMatch: its batches, its loss, and a short run on the real digits; and that
augmentation only ever reaches training batches."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from models.architecture import ArchitectureConfig
from models.augmentation import AugmentConfig
from models.losses import IGNORE_INDEX, FixMatchLoss
from pipelines.stagekit.config import TrainConfig
from pipelines.training.fitting import fit_task, initial_state
from pipelines.training.fixmatch import FixMatchBatches
from pipelines.training.tasks import FixMatchTask, SupervisedTask

CPU = torch.device("cpu")
WEAK = AugmentConfig(enabled=True, scale=(0.9, 1.0), translate=0.1, rotation=5.0)
MANIFEST = {
    "task": "classification",
    "class_names": [str(d) for d in range(10)],
    "normalization": {"mean": [0.3], "std": [0.4]},
    "input_kind": "image",
    "input_shape": [1, 8, 8],
}
SMALL_CNN = ArchitectureConfig(kind="cnn", channels=(16, 32), hidden_sizes=(64,), dropout=0.1)


def digits_split(per_class=2, seed=0):
    """The real 8x8 digits as pixels in [0, 1]: `per_class` labeled training images per
    class, the rest of the first 1,200 unlabeled, the last 597 held out."""
    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    rng = np.random.default_rng(seed)
    labeled = np.concatenate(
        [
            rng.choice(np.flatnonzero(digits.target[:1200] == c), per_class, replace=False)
            for c in range(10)
        ]
    )
    pool = np.setdiff1d(np.arange(1200), labeled)
    return {
        "x_train": x[labeled],
        "y_train": y[labeled],
        "x_unlabeled": x[pool],
        "x_val": x[1200:],
        "y_val": y[1200:],
    }


def test_each_step_holds_labeled_weak_and_strong_views_and_an_epoch_covers_the_pool():
    x_l, y_l = torch.rand(10, 1, 8, 8), torch.arange(10)
    x_u = torch.rand(50, 1, 8, 8)
    seen = []
    for rank in (0, 1):
        batches = FixMatchBatches(x_l, y_l, x_u, 4, 3, WEAK, WEAK.strong(), rank, 2, seed=1)
        steps = list(batches.epoch(0))
        # 25 pool images per worker, 12 a step: 12 and 13 (a lone last image joins the step before).
        assert len(steps) == batches.steps_per_epoch() == 2
        for x, y in steps:
            labeled = int((y != IGNORE_INDEX).sum())
            unlabeled = (len(y) - labeled) // 2
            assert labeled == 4 and x.shape[0] == labeled + 2 * unlabeled
            assert (y[labeled:] == IGNORE_INDEX).all() and set(y[:labeled].tolist()) <= set(
                range(10)
            )
        seen.append(sum(((len(y) - 4) // 2 for _, y in steps)))
    assert sum(seen) == 50  # every pool image once per epoch across the two workers


def test_the_labeled_shard_is_cycled_to_fill_every_step():
    x_l, y_l = torch.rand(6, 1, 8, 8), torch.arange(6)
    batches = FixMatchBatches(x_l, y_l, torch.rand(80, 1, 8, 8), 4, 2, WEAK, WEAK.strong())
    labels = torch.cat([y[y != IGNORE_INDEX] for _, y in batches.epoch(3)])
    assert len(labels) == 40  # 10 steps of 4
    assert set(labels.tolist()) == set(range(6))
    counts = torch.bincount(labels, minlength=6)
    assert counts.max() - counts.min() <= 1  # whole passes, not random draws


def test_the_loss_trains_strong_views_towards_confident_weak_predictions_only():
    loss = FixMatchLoss(threshold=0.9)
    labeled = torch.tensor([[4.0, 0.0, 0.0]])
    weak = torch.tensor([[0.0, 9.0, 0.0], [1.0, 1.1, 1.0]])  # confident, not confident
    strong = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 2.0]], requires_grad=True)
    weak = weak.clone().requires_grad_(True)
    output = torch.cat([labeled, weak, strong])
    target = torch.tensor([0, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX])
    value = loss(output, target)
    expected = torch.nn.functional.cross_entropy(labeled, torch.tensor([0])) + (
        torch.nn.functional.cross_entropy(strong[:1], torch.tensor([1])) / 2
    )
    assert value.item() == pytest.approx(expected.item())
    value.backward()
    assert weak.grad is None or torch.count_nonzero(weak.grad) == 0  # the target side
    assert torch.count_nonzero(strong.grad[1]) == 0  # below the threshold: no pull
    # Validation batches hold labeled examples only: plain cross-entropy.
    assert loss(labeled, torch.tensor([0])).item() == pytest.approx(
        torch.nn.functional.cross_entropy(labeled, torch.tensor([0])).item()
    )


def test_a_short_fixmatch_run_on_the_real_digits_learns():
    # 20 labels (2 per class) and 600 unlabeled images, 5 epochs. Whether FixMatch beats
    # its labels alone is a question of hundreds of epochs: benchmarks/pseudolabel_seeds.py.
    arrays = digits_split(per_class=2)
    arrays["x_unlabeled"] = arrays["x_unlabeled"][:600]
    train = TrainConfig(epochs=5, batch_size=8, lr=0.003, early_stopping_patience=0, augment=WEAK)
    task = FixMatchTask(SMALL_CNN, MANIFEST, WEAK, WEAK.strong(), 0.9, 4)
    state = fit_task(initial_state(task, train), task, arrays, train, CPU)
    assert state.history[-1]["train_loss"] < state.history[0]["train_loss"]
    assert state.history[-1]["val_accuracy"] > 0.5  # 10 classes: chance is 0.1


def test_augmentation_never_reaches_validation_batches():
    arrays = digits_split(per_class=5)
    heavy = AugmentConfig(enabled=True, rotation=90.0, translate=0.4, color_jitter=0.9, cutout=0.5)
    task = SupervisedTask(SMALL_CNN, MANIFEST, augment=heavy)
    train = TrainConfig(epochs=2, batch_size=16, early_stopping_patience=0, augment=heavy)
    state = initial_state(task, train)
    inputs = {"train": [], "eval": []}
    state.model.register_forward_pre_hook(
        lambda module, args: inputs["train" if module.training else "eval"].append(args[0])
    )
    fit_task(state, task, arrays, train, CPU)
    # The first forward pass is the untrained model's loss on a training batch (the reference
    # for divergence); then each epoch evaluates the validation split, untouched.
    validation = inputs["eval"][1:]
    assert torch.equal(torch.cat(validation[: len(validation) // 2]), arrays["x_val"])
    trained = torch.cat(inputs["train"])
    originals = {tuple(x.flatten().tolist()) for x in arrays["x_train"]}
    assert not any(tuple(x.flatten().tolist()) in originals for x in trained)  # all changed


@pytest.mark.parametrize(
    ("labeled", "pool", "workers"), [(60, 1197, 2), (1000, 60000, 2), (30, 300, 1)]
)
def test_the_baseline_takes_about_as_many_labeled_batches_as_fixmatch(labeled, pool, workers):
    """Counted on the batches themselves: FixMatch's labeled batches over its epochs, and
    the labeled-only batches over the baseline's."""
    from pipelines.semisupervised.config import PseudoLabelConfig
    from pipelines.semisupervised.train import matched_epochs
    from pipelines.training.batches import ShardedBatches

    pl = PseudoLabelConfig()
    x_labeled, y_labeled = torch.zeros(labeled, 1, 8, 8), torch.zeros(labeled, dtype=torch.int64)
    fixmatch = FixMatchBatches(
        x_labeled,
        y_labeled,
        torch.zeros(pool, 1, 8, 8),
        pl.batch_size,
        pl.unlabeled_ratio,
        WEAK,
        WEAK.strong(),
        world_size=workers,
    )
    alone = ShardedBatches(x_labeled, y_labeled, pl.batch_size, world_size=workers)
    epochs = 12
    baseline = matched_epochs(labeled, pool, pl, workers, epochs)
    assert baseline >= epochs
    fixmatch_batches = epochs * fixmatch.steps_per_epoch()
    assert baseline * alone.steps_per_epoch() == pytest.approx(fixmatch_batches, rel=0.1)


def test_every_run_of_the_stage_takes_the_sections_schedule_and_fixmatch_its_length():
    from pipelines.semisupervised.config import PseudoLabelConfig
    from pipelines.semisupervised.train import fixmatch_epochs, round_train_config
    from pipelines.stagekit.config import TrainConfig

    train = TrainConfig(lr_schedule="constant", ema_decay=0.5, early_stopping_patience=8)
    pl = PseudoLabelConfig(lr_schedule="cosine", ema_decay=0.99, batch_size=4)
    run = round_train_config(train, pl, 7)
    assert (run.lr_schedule, run.ema_decay, run.batch_size, run.epochs) == ("cosine", 0.99, 4, 7)
    assert run.early_stopping_patience == 0 and run.lr == train.lr
    # teacher_student keeps train's moving average
    assert round_train_config(train, replace(pl, method="teacher_student"), 7).ema_decay == 0.5
    assert fixmatch_epochs(pl) == 30 * 4  # 0: the teacher/student schedule's length
    assert fixmatch_epochs(replace(pl, fixmatch_epochs=360)) == 360
    with pytest.raises(ValueError, match="fixmatch_epochs"):
        PseudoLabelConfig(fixmatch_epochs=-1)
