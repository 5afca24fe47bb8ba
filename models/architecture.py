"""The architecture a user picks in params.yaml, and the dense head every network ends with.

`ArchitectureConfig` holds what a user chooses; the input shape and number of outputs come
from the prepared data, so the same params work for 8x8 digits and a 64-column CSV. The
networks import this module; `models/networks.py` maps each kind to its network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from models.activations import ACTIVATIONS, make_activation, width_factor

NetworkKind = Literal["mlp", "cnn", "resnet", "rnn", "lstm", "gru"]
RECURRENT_KINDS = ("rnn", "lstm", "gru")
Pooling = Literal["max", "avg", "min"]
GlobalPool = Literal["none", "avg", "max"]


@dataclass(frozen=True)
class ArchitectureConfig:
    kind: NetworkKind = "cnn"
    """Network family: `mlp` (flattened input), `cnn` (conv blocks), `resnet` (small residual
    CNN), or for sequences `rnn` (plain, tanh), `lstm` or `gru`."""
    hidden_sizes: tuple[int, ...] = (128,)
    """Widths of the fully connected hidden layers (the whole MLP, or the CNN's head)."""
    channels: tuple[int, ...] = (32, 64)
    """Output channels of each conv block (cnn) or residual stage (resnet)."""
    kernel_size: int = 3
    """Square convolution kernel size (odd, so 'same' padding keeps the spatial size)."""
    pooling: Pooling = "max"
    """Down-sampling after each conv block: max, avg or min pooling (2x2)."""
    global_pool: GlobalPool = "none"
    """How the CNN's last feature map reaches its dense head: `none` flattens it (the head
    learns where things are: right for small centred inputs such as the 8x8 digits), `avg`
    or `max` pool each channel over the whole map (the head learns what is there, wherever
    it is: objects at random places in a small set of larger images). The resnet always
    averages."""
    activation: str = "relu"
    """Hidden activation, one of: sigmoid, tanh, relu, leaky_relu, prelu, elu, maxout."""
    dropout: float = 0.1
    """Dropout probability before every fully connected layer."""
    batch_norm: bool = True
    """Batch normalization after each convolution (cnn/resnet)."""
    recurrent_size: int = 64
    """Hidden state size of each recurrent layer and direction (rnn/lstm/gru)."""
    recurrent_layers: int = 1
    """Stacked recurrent layers (rnn/lstm/gru), each reading the one below at every step."""
    bidirectional: bool = False
    """Also read each sequence backwards (rnn/lstm/gru): the summary then sees both ends."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS or self.activation == "softmax":
            raise ValueError(
                f"activation {self.activation!r} is not a hidden activation; choose one of "
                + ", ".join(a for a in ACTIVATIONS if a != "softmax")
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {self.kernel_size}")
        if any(w < 1 for w in (*self.hidden_sizes, *self.channels)):
            raise ValueError("hidden_sizes and channels must be positive integers")
        if self.kind in ("cnn", "resnet") and not self.channels:
            raise ValueError(f"channels: a {self.kind} needs at least one entry")
        for name in ("recurrent_size", "recurrent_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")


def dense_head(arch: ArchitectureConfig, in_features: int, num_outputs: int) -> nn.Sequential:
    """Dropout -> Linear -> activation blocks for `arch.hidden_sizes`, then the output layer."""
    layers: list[nn.Module] = []
    width = in_features
    factor = width_factor(arch.activation)
    for hidden in arch.hidden_sizes:
        if arch.dropout > 0:
            layers.append(nn.Dropout(arch.dropout))
        layers.append(nn.Linear(width, hidden * factor))
        layers.append(make_activation(arch.activation, hidden * factor))
        width = hidden
    if arch.dropout > 0:
        layers.append(nn.Dropout(arch.dropout))
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)
