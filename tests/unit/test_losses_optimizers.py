import pytest
import torch
import torch.nn.functional as F

from models.losses import LOSSES, TaskLoss
from models.optimizers import OPTIMIZERS, batch_size_for, fusable, make_optimizer


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_is_lower_for_the_right_class(name):
    loss = TaskLoss(name, "classification")
    target = torch.tensor([0, 2])
    right = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    wrong = torch.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])
    assert loss(right, target) < loss(wrong, target)


def test_kl_to_a_one_hot_target_equals_cross_entropy():
    logits, target = torch.randn(6, 4), torch.randint(0, 4, (6,))
    kl = TaskLoss("kl_divergence", "classification")(logits, target)
    assert torch.allclose(kl, F.cross_entropy(logits, target), atol=1e-6)


def test_regression_losses_and_huber_delta():
    pred, target = torch.tensor([[0.0], [10.0]]), torch.tensor([0.0, 0.0])
    assert TaskLoss("mse", "regression")(pred, target).item() == pytest.approx(50.0)
    assert TaskLoss("mae", "regression")(pred, target).item() == pytest.approx(5.0)
    # Beyond delta the huber loss grows linearly: 0.5 * (delta * (|e| - delta/2)) averaged.
    assert TaskLoss("huber", "regression", huber_delta=1.0)(pred, target).item() == pytest.approx(
        4.75
    )
    with pytest.raises(ValueError, match="needs class labels"):
        TaskLoss("cross_entropy", "regression")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_reduces_a_least_squares_loss(name):
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    model = torch.nn.Linear(3, 1)
    # Adadelta's effective step starts tiny by design: it needs a larger nominal rate.
    lr = 1.0 if name == "adadelta" else 0.05
    optimizer = make_optimizer(name, model.parameters(), lr=lr)
    initial = F.mse_loss(model(x).squeeze(1), y).item()
    for _ in range(150):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x).squeeze(1), y)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * initial


def test_batch_size_rules_of_gd_and_sgd():
    assert batch_size_for("gd", 32, 1000) == 1000
    assert batch_size_for("sgd", 32, 1000) == 1
    assert batch_size_for("minibatch_sgd", 32, 1000) == 32
    assert batch_size_for("adam", 32, 1000) == 32
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lbfgs", [torch.nn.Parameter(torch.zeros(1))], lr=0.1)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_runs_fused_on_cpu_with_the_default_update(name):
    """The fused kernel is what the stages get on CPU, and it makes the same steps as
    torch's default (foreach) up to rounding."""
    torch.manual_seed(0)
    weights = torch.randn(64, 16)
    models = [torch.nn.Linear(16, 4) for _ in range(2)]
    for model in models:
        model.load_state_dict(models[0].state_dict())
    fused = make_optimizer(name, models[0].parameters(), 0.01, weight_decay=0.01)
    default = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    reference = default(models[1].parameters(), lr=0.01, weight_decay=0.01)
    assert fused.defaults["fused"] is True and not reference.defaults["fused"]
    for _ in range(20):
        for model, optimizer in ((models[0], fused), (models[1], reference)):
            optimizer.zero_grad()
            model(weights).square().mean().backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_parameters_without_a_fused_kernel_keep_the_default_step():
    on_cpu = torch.nn.Parameter(torch.zeros(3))
    elsewhere = torch.nn.Parameter(torch.zeros(3, device="meta"))  # no fused kernel there
    assert fusable([on_cpu]) is True
    assert fusable([on_cpu, elsewhere]) is None
    assert fusable([]) is None
