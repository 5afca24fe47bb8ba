"""Optimizers chosen by name (the catalogue in DESIGN.md).

"gd", "sgd" and "minibatch_sgd" are the same update rule; they differ in how many examples
one step sees: the whole training set, one example, or a configured mini-batch.
`batch_size_for` turns that into a batch size so the data loader can honour it.

Adam and AdamW run torch's fused kernel where it has one for the parameters' device (CPU,
CUDA): one pass over each parameter and its moments, where the default (`foreach`) makes
about a dozen. Measured on the MLM encoder (1.34M parameters, one thread): 4.7 -> 1.1 ms a
step, ~5% of a training step of the demo's MLM. The same update, rounded differently.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS = (
    "gd",
    "sgd",
    "minibatch_sgd",
    "momentum",
    "nesterov",
    "adagrad",
    "adadelta",
    "rmsprop",
    "adam",
    "adamw",
)


def batch_size_for(name: str, configured: int, dataset_size: int) -> int:
    """Examples per step for optimizer `name`: full batch for gd, one for sgd, else `configured`."""
    if name == "gd":
        return dataset_size
    if name == "sgd":
        return 1
    return configured


FUSED_DEVICES = ("cpu", "cuda")
"""Where torch's fused Adam/AdamW kernels run (others, e.g. MPS, keep the default)."""


def fusable(params: list[torch.nn.Parameter]) -> bool | None:
    """True when every parameter can take a fused step; None (torch's default) otherwise."""
    fits = all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)
    return True if params and fits else None


def make_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """Build optimizer `name` over `params`."""
    if name in ("gd", "sgd", "minibatch_sgd"):
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "nesterov":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay
        )
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=0.0, weight_decay=weight_decay)
    if name in ("adam", "adamw"):
        params = list(params)
        adam = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return adam(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fusable(params))
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
