"""The network of each `model.kind`: the one table a new supervised network is added to.

A network is a module of its own (`mlp.py`, `cnn.py`, `resnet.py`, `recurrent.py`) taking
the `ArchitectureConfig`, the input shape and the number of outputs.
"""

from __future__ import annotations

from torch import nn

from models.architecture import RECURRENT_KINDS, ArchitectureConfig
from models.cnn import ConvNet
from models.mlp import MLP
from models.recurrent import RecurrentNet
from models.resnet import ResidualCNN

NETWORKS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "cnn": ConvNet,
    "resnet": ResidualCNN,
    "rnn": RecurrentNet,
    "lstm": RecurrentNet,
    "gru": RecurrentNet,
}
"""model.kind -> network class. cnn and resnet take images (channels, height, width), the
recurrent kinds sequences (time, channels), mlp anything (flattened)."""


def build_network(
    arch: ArchitectureConfig, input_shape: tuple[int, ...], num_outputs: int
) -> nn.Module:
    """Build the network for inputs of `input_shape` (without batch) and `num_outputs` outputs."""
    if arch.kind in RECURRENT_KINDS:
        if len(input_shape) != 2:
            raise ValueError(
                f"a {arch.kind} needs sequence inputs shaped (time, channels), got "
                f"{input_shape}; prepare a time series (stage prepare_timeseries)"
            )
    elif len(input_shape) == 2:  # padded with NaN: only the recurrent kinds read the lengths
        raise ValueError(
            f"sequence inputs {input_shape} need kind rnn, lstm or gru, not {arch.kind}"
        )
    elif arch.kind != "mlp" and len(input_shape) != 3:
        raise ValueError(
            f"a {arch.kind} needs image inputs shaped (channels, height, width), got {input_shape}; "
            "use kind: mlp for tabular data"
        )
    return NETWORKS[arch.kind](arch, input_shape, num_outputs)
