"""Does pseudo-labeling beat training on the labeled examples alone? Three seeds, one table.

For each seed, the default params (params.yaml) are used with `pseudolabel.split_seed` and
`train.seed` set to the seed: a different 5% of the digits keep their labels and the
networks start from different weights. The student and the supervised-only baseline see
the same labeled examples and the same number of epochs. Run from the repository root
after `dvc repro prepare`:

    python -m benchmarks.pseudolabel_seeds            # writes benchmarks/results/pseudolabel_seeds.json

Runs go to a throw-away MLflow store and checkpoint folder, not the project's.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

from benchmarks.scratch import machine, scratch_stores
from pipelines.semisupervised.prepare import prepare_pseudolabel
from pipelines.semisupervised.train import train_pseudolabel
from pipelines.stagekit.atomic import write_json
from pipelines.stagekit.config import load_config

RESULTS = Path("benchmarks/results/pseudolabel_seeds.json")
COLUMNS = (
    "seed",
    "labeled_count",
    "test_accuracy",
    "baseline_test_accuracy",
    "teacher_test_accuracy",
    "pseudo_label_accuracy",
    "pseudo_labels",
    "seconds",
)


def run_seed(seed: int, params: str, data: str, workdir: Path) -> dict:
    config = load_config(params)
    config = dataclasses.replace(
        config,
        train=dataclasses.replace(config.train, seed=seed),
        pseudolabel=dataclasses.replace(config.pseudolabel, split_seed=seed),
    )
    started = time.perf_counter()
    prepare_pseudolabel(config, data, str(workdir / f"pl-{seed}"))
    figures = train_pseudolabel(
        config,
        str(workdir / f"pl-{seed}"),
        str(workdir / f"model-{seed}"),
        str(workdir / f"m-{seed}.json"),
        str(workdir / f"plots-{seed}"),
    )
    return {"seed": seed, **figures, "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared/supervised")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    with scratch_stores() as workdir:
        rows = []
        for seed in args.seeds:
            rows.append(run_seed(seed, args.params, args.data, workdir))
            print("  ".join(f"{k}={rows[-1].get(k)}" for k in COLUMNS), flush=True)
    student = statistics.mean(r["test_accuracy"] for r in rows)
    baseline = statistics.mean(r["baseline_test_accuracy"] for r in rows)
    summary = {
        "seeds": rows,
        "mean_test_accuracy": student,
        "mean_baseline_test_accuracy": baseline,
        "mean_teacher_test_accuracy": statistics.mean(r["teacher_test_accuracy"] for r in rows),
        "student_beats_baseline": student > baseline,
        "params": dataclasses.asdict(load_config(args.params).pseudolabel),
        "machine": machine(),
    }
    write_json(args.output, summary)
    print(
        f"\nmean over seeds {args.seeds}: student {student:.4f}  baseline {baseline:.4f}  "
        f"(student {'beats' if student > baseline else 'does NOT beat'} the baseline)"
    )
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
