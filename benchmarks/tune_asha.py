"""Does ASHA early stopping find as good a trial as running every trial to the end?

The `tune` stage's default search (params.yaml) is run twice on the same trials (same
seed: the same optimizers, learning rates and other settings, in the same order): once
with `tune.scheduler: asha`, once with `tune.scheduler: none`. Reported: the best
validation accuracy of each, and the training epochs summed over all trials. Run from the
repository root after `dvc repro prepare`:

    python -m benchmarks.tune_asha            # writes benchmarks/results/tune_asha.json

Runs go to a throw-away MLflow store and checkpoint folder, not the project's.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from benchmarks.scratch import machine, scratch_stores
from pipelines.stagekit.atomic import write_json
from pipelines.stagekit.config import load_params
from pipelines.tuning.tune import tune_search

RESULTS = Path("benchmarks/results/tune_asha.json")


def search(scheduler: str, params: str, data: str, workdir: Path) -> dict:
    arguments = load_params(tune_search, params)
    arguments["tune"] = dataclasses.replace(arguments["tune"], scheduler=scheduler)
    started = time.perf_counter()
    figures = tune_search(
        **arguments,
        data_dir=data,
        output=str(workdir / f"out-{scheduler}"),
        metrics_path=str(workdir / f"tune-{scheduler}.json"),
        plots_dir=str(workdir / f"plots-{scheduler}"),
    )
    return {**figures, "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared/supervised")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    with scratch_stores() as workdir:
        asha = search("asha", args.params, args.data, workdir)
        full = search("none", args.params, args.data, workdir)
    tune = load_params(tune_search, args.params)["tune"]
    summary = {
        "asha_best_val_accuracy": asha["best_val_accuracy"],
        "full_best_val_accuracy": full["best_val_accuracy"],
        "accuracy_gap_points": round(
            100 * (full["best_val_accuracy"] - asha["best_val_accuracy"]), 2
        ),
        "asha_epochs": asha["epochs_total"],
        "full_epochs": full["epochs_total"],
        "epoch_ratio": round(asha["epochs_total"] / full["epochs_total"], 3),
        "asha_seconds": asha["seconds"],
        "full_seconds": full["seconds"],
        "asha_best": {k: asha[k] for k in ("best_optimizer", "best_lr", "best_trial")},
        "full_best": {k: full[k] for k in ("best_optimizer", "best_lr", "best_trial")},
        "trials": asha["trials"],
        "trials_stopped_early": asha["trials_stopped_early"],
        "trials_diverged": full["trials_diverged"],
        "params": dataclasses.asdict(tune),
        "machine": machine(),
    }
    write_json(args.output, summary)
    print(
        f"\nASHA: best val_accuracy {summary['asha_best_val_accuracy']:.4f} in "
        f"{summary['asha_epochs']} epochs ({summary['asha_seconds']} s); every trial to the end: "
        f"{summary['full_best_val_accuracy']:.4f} in {summary['full_epochs']} epochs "
        f"({summary['full_seconds']} s). Gap {summary['accuracy_gap_points']} points, "
        f"epochs x{summary['epoch_ratio']}."
    )
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
