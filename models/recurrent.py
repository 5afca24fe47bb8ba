"""Recurrent classifiers for sequences: plain RNN (tanh), LSTM and GRU, optionally stacked
and bidirectional, then the dense head on a summary of each whole sequence.

Variable-length sequences arrive padded with NaN after their last step, one (B, T, C)
tensor: the ONNX graph then has a single input, a served batch of sequences of different
lengths is one padded array (the batcher concatenates it like any other), and a real
value can never be mistaken for padding (inputs must be finite). The masked path below
is the only path, in training and in the exported graph alike, so what is checked at
export is what was trained:

- a forward direction reads every padded step, but padding only comes after a
  sequence's end, so its state at the sequence's last step never saw any;
- a backward direction reads each sequence reversed *within its length* (a gather), so it
  starts at the sequence's true last step, not in the padding;
- the summary is the forward state at the last step and the backward state at the first.

`torch.nn.utils.rnn.pack_padded_sequence` would skip the padded steps' arithmetic, but it
does not export to ONNX with a dynamic time axis; sequences here are short (tens to
hundreds of steps), so the masked path costs little.
"""

from __future__ import annotations

import torch
from torch import nn

from models.architecture import ArchitectureConfig, dense_head

CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
"""model.kind -> torch's recurrent layer. The plain `rnn` uses tanh, the course's classic
(and the one whose gradients vanish over long sequences)."""


class RecurrentNet(nn.Module):
    def __init__(
        self, arch: ArchitectureConfig, input_shape: tuple[int, ...], num_outputs: int
    ) -> None:
        super().__init__()
        _, channels = input_shape  # (time, channels); the time axis is free
        cell = CELLS[arch.kind]
        self.directions = 2 if arch.bidirectional else 1
        self.size = arch.recurrent_size
        # One single-layer module per layer and direction, so a backward direction can be fed
        # its own reversed input, and the gradient-norm curves name each layer and direction.
        layers = []
        width = channels
        for _ in range(arch.recurrent_layers):
            layers.append(
                nn.ModuleList(
                    cell(width, arch.recurrent_size, batch_first=True)
                    for _ in range(self.directions)
                )
            )
            width = arch.recurrent_size * self.directions
        self.layers = nn.ModuleList(layers)
        self.head = dense_head(arch, width, num_outputs)
        if arch.kind == "lstm":
            remember_by_default(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = self.sequence_states(x)  # (B, T, D*H)
        return self.head(self.summary(steps, sequence_lengths(x)))  # (B, num_outputs)

    def sequence_states(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output at every step, (B, T, directions * recurrent_size);
        steps past a sequence's end hold values nothing downstream reads."""
        lengths = sequence_lengths(x)  # (B,)
        h = torch.nan_to_num(x, nan=0.0)  # (B, T, C)
        reverse = reversal_index(lengths, x.shape[1])  # (B, T)
        for layer in self.layers:
            outputs = [layer[0](h)[0]]  # (B, T, H)
            if self.directions == 2:
                backward = layer[1](gather_steps(h, reverse))[0]
                outputs.append(gather_steps(backward, reverse))  # back in time order
            h = torch.cat(outputs, dim=-1)  # (B, T, D*H)
        return h

    def summary(self, steps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Forward state at each sequence's last step (+ backward state at its first)."""
        last = (lengths - 1).clamp_min(0)[:, None, None].expand(-1, 1, steps.shape[-1])
        final = steps.gather(1, last)[:, 0]  # (B, D*H)
        if self.directions == 1:
            return final
        return torch.cat([final[:, : self.size], steps[:, 0, self.size :]], dim=-1)


def remember_by_default(layers: nn.ModuleList) -> None:
    """Start each LSTM's forget gate at bias 1 (Jozefowicz et al., 2015; Gers et al., 2000):
    torch's default 0 makes the gate forget half the cell state every step, so at
    initialisation the gradient from the last step fades as 0.5^t, as fast as a tanh RNN's;
    at 1 the cell keeps most of itself and early steps get a gradient to learn from."""
    with torch.no_grad():
        for directions in layers:
            for lstm in directions:
                size = lstm.hidden_size
                lstm.bias_ih_l0[size : 2 * size].fill_(1.0)  # gates: input, forget, cell, output
                lstm.bias_hh_l0[size : 2 * size].fill_(0.0)


def sequence_lengths(x: torch.Tensor) -> torch.Tensor:
    """Steps before the NaN padding of each sequence in (B, T, C): (B,) int64."""
    return (~torch.isnan(x[..., 0])).sum(dim=1)


def reversal_index(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, T) step indices that reverse each sequence within its length and leave its
    padding in place: for length 3 of 5, [2, 1, 0, 3, 4]."""
    time = torch.arange(steps, device=lengths.device)[None]  # (1, T)
    end = lengths[:, None]  # (B, 1)
    return torch.where(time < end, end - 1 - time, time)


def gather_steps(h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """h (B, T, F) reordered along time by index (B, T)."""
    return h.gather(1, index[..., None].expand(-1, -1, h.shape[-1]))
