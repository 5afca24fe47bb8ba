"""Recurrent classifiers for sequences: plain RNN (tanh), LSTM and GRU, optionally stacked
and bidirectional, then the dense head on a summary of each whole sequence.

Variable-length sequences arrive padded with NaN after their last step, one (B, T, C)
tensor: the ONNX graph then has a single input, a served batch of sequences of different
lengths is one padded array (the batcher concatenates it like any other), and a real
value can never be mistaken for padding (inputs must be finite). The masked path below
is what trains and what torch serves; the export writes the same function with ONNX's own
recurrent operators (`_onnx_summary`), and the export's parity check compares the two on
the test split at several lengths:

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
        if torch.onnx.is_in_onnx_export():
            return self.head(self._onnx_summary(x))
        steps = self.sequence_states(x)  # (B, T, D*H)
        return self.head(self.summary(steps, sequence_lengths(x)))  # (B, num_outputs)

    def _onnx_summary(self, x: torch.Tensor) -> torch.Tensor:
        """The same summary written for the ONNX graph: each layer one ONNX LSTM/GRU/RNN
        operator over both directions, given each sequence's length. ONNX's recurrent ops
        read a backward direction reversed within each sequence's length and return every
        direction's final state, so the reversal gathers and the summary gather above leave
        the graph (onnxruntime spent a fifth of the batch-32 time in them)."""
        lengths = sequence_lengths(x).to(torch.int32)
        h = torch.nan_to_num(x, nan=0.0).transpose(0, 1)  # (T, B, C): ONNX is time-major
        final = h
        for layer in self.layers:
            op, _ = ONNX_GATES[type(layer[0])]
            steps, final = OnnxRecurrentLayer.apply(
                h, lengths, *onnx_weights(layer), op, self.size, self.directions
            )
            # (T, D, B, H) -> (T, B, D*H), the next layer's input
            h = steps.transpose(1, 2).reshape(steps.shape[0], steps.shape[2], -1)
        return final.transpose(0, 1).reshape(final.shape[1], -1)  # (B, D*H)

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


ONNX_GATES = {
    nn.LSTM: ("LSTM", (0, 3, 1, 2)),  # torch's gates i, f, g, o; ONNX's i, o, f, c
    nn.GRU: ("GRU", (1, 0, 2)),  # torch's r, z, n; ONNX's z, r, h
    nn.RNN: ("RNN", (0,)),
}
"""Each torch recurrent layer's ONNX operator, and the order of torch's gate blocks in it."""


def onnx_weights(layer: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (D, G*H, C), R (D, G*H, H), B (D, 2*G*H) of ONNX's recurrent operators, from one
    layer's single-direction torch modules (forward first), gate blocks reordered."""
    _, order = ONNX_GATES[type(layer[0])]

    def reordered(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor.chunk(len(order))[gate] for gate in order])

    w = torch.stack([reordered(cell.weight_ih_l0) for cell in layer])
    r = torch.stack([reordered(cell.weight_hh_l0) for cell in layer])
    b = torch.stack(
        [torch.cat([reordered(cell.bias_ih_l0), reordered(cell.bias_hh_l0)]) for cell in layer]
    )
    return w, r, b


class OnnxRecurrentLayer(torch.autograd.Function):
    """One layer, all directions, as ONNX's LSTM/GRU/RNN operator with `sequence_lens`.

    Used only while exporting: the exporter writes `symbolic` into the graph, and `forward`
    gives the tracer zeros of the operator's output shapes (the graph computes the values;
    the export's parity check compares them with the masked path)."""

    @staticmethod
    def forward(ctx, x, lengths, w, r, b, op, hidden, directions):
        steps, batch = x.shape[0], x.shape[1]
        return x.new_zeros(steps, directions, batch, hidden), x.new_zeros(directions, batch, hidden)

    @staticmethod
    def symbolic(g, x, lengths, w, r, b, op, hidden, directions):
        attributes = {
            "direction_s": "bidirectional" if directions == 2 else "forward",
            "hidden_size_i": hidden,
        }
        if op == "GRU":
            attributes["linear_before_reset_i"] = 1  # torch's GRU applies r after the product
        return g.op(op, x, w, r, b, lengths, outputs=2, **attributes)


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
