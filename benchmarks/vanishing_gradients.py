"""Vanishing gradients through time: a plain tanh RNN against an LSTM on long sequences.

Both networks read GunPoint (aeon's bundled UCR set: 150 steps, 1 channel; the official
50 training / 150 test series, through the stages' own `.ts` reader) and classify from
their state at the last step, the summary `models/recurrent.py` uses. The loss's gradient
with respect to the input at step t, ||dL/dx_t|| over the batch, has to flow
back from the last step through every step between: the course's vanishing-gradient
effect is that, in a tanh RNN, it shrinks geometrically with the distance, so the early
steps barely learn; an LSTM's cell state carries it much further. Measured at
initialisation and after training (mini-batch Adam, the same seed and settings for both),
each as the ratio to the gradient at the last step.

    python -m benchmarks.vanishing_gradients   # writes benchmarks/results/vanishing_gradients.json
                                               # (+ .md) and docs/vanishing_gradients.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.scratch import markdown_table, write_results
from models.architecture import ArchitectureConfig
from models.networks import build_network
from pipelines.stagekit.dataset import normalization
from pipelines.stagekit.sequences import bundled_sets, read_ts_folder

KINDS = ("rnn", "lstm")
DISTANCES = (0, 10, 25, 50, 100, 149)
"""Steps before the last one at which the table reports the gradient ratio."""


def load(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    train, test = read_ts_folder(bundled_sets()[name])
    names = sorted(set(train.labels))
    norm = normalization(train.x, "sequence")
    mean, std = np.asarray(norm["mean"]), np.asarray(norm["std"])

    def tensors(part):
        x = ((part.x - mean) / std).astype(np.float32)
        y = np.asarray([names.index(label) for label in part.labels])
        return torch.from_numpy(x), torch.from_numpy(y)

    return (*tensors(train), *tensors(test))


def gradient_through_time(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """||dL/dx_t|| for every step t: how much of the loss's gradient reaches the input at
    step t, back through the recurrence from the last step (the only one the head reads)."""
    x = x.clone().requires_grad_(True)
    net.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    return x.grad.norm(dim=(0, 2)).numpy()  # (T,)


def train(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.003)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 10):
            batch = order[start : start + 10]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
    net.eval()


def plot(curves: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    styles = {"initialised": "--", "trained": "-"}
    colours = {"rnn": "tab:red", "lstm": "tab:blue"}
    for label, ratio in curves.items():
        kind, stage = label.split(" ", 1)
        distance = np.arange(len(ratio))[::-1]  # steps before the last
        ax.plot(distance, ratio, styles[stage], color=colours[kind], label=label)
    ax.set(
        xlabel="steps before the last one",
        ylabel="||dL/dx_t|| / ||dL/dx_T||",
        yscale="log",
        title="Gradient through time on GunPoint (150 steps): tanh RNN vs LSTM",
    )
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="GunPoint")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results/vanishing_gradients.json")
    parser.add_argument("--figure", default="docs/vanishing_gradients.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load(args.dataset)
    steps = x_train.shape[1]
    figures: dict = {"dataset": args.dataset, "steps": steps, "epochs": args.epochs}
    curves: dict[str, np.ndarray] = {}
    rows = []
    for kind in KINDS:
        torch.manual_seed(args.seed)
        arch = ArchitectureConfig(kind=kind, recurrent_size=32, hidden_sizes=(), dropout=0.0)
        net = build_network(arch, tuple(x_train.shape[1:]), num_outputs=2)
        entry: dict = {}
        for stage in ("initialised", "trained"):
            if stage == "trained":
                started = time.perf_counter()
                train(net, x_train, y_train, args.epochs, args.seed)
                entry["train_s"] = round(time.perf_counter() - started, 2)
                with torch.no_grad():
                    predicted = net(x_test).argmax(dim=1)
                entry["test_accuracy"] = float((predicted == y_test).float().mean())
            norms = gradient_through_time(net, x_train, y_train)
            ratio = norms / norms[-1]
            curves[f"{kind} {stage}"] = ratio
            entry[stage] = {f"ratio_{d}_steps_back": float(ratio[steps - 1 - d]) for d in DISTANCES}
            rows.append([kind, stage, *(f"{ratio[steps - 1 - d]:.1e}" for d in DISTANCES[1:])])
        figures[kind] = entry
    plot(curves, Path(args.figure))
    for kind in KINDS:
        rows.append(
            [kind, "test accuracy", f"{figures[kind]['test_accuracy']:.3f}", "", "", "", ""]
        )
    table = markdown_table(["network", "when", *(f"{d} steps back" for d in DISTANCES[1:])], rows)
    note = (
        f"{args.dataset} ({steps} steps), recurrent size 32, one layer, summary at the last "
        f"step; ratio = ||dL/dx_t|| / ||dL/dx_T|| over the 50 training series; trained "
        f"{args.epochs} epochs of Adam (lr 0.003, batch 10, gradient clipping 1.0), seed "
        f"{args.seed}. Figure: {args.figure}."
    )
    write_results(args.output, figures, table, note)


if __name__ == "__main__":
    main()
