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
import statistics
import time
from pathlib import Path

import yaml

from benchmarks.scratch import machine, scratch_stores
from pipelines.semisupervised.config import PseudoLabelConfig
from pipelines.semisupervised.prepare import prepare_pseudolabel
from pipelines.semisupervised.train import train_pseudolabel
from pipelines.stagekit.atomic import write_json
from pipelines.stagekit.config import config_to_dict, load_params, parse_section, read_params

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


def seed_params(params: str, seed: int, workdir: Path) -> Path:
    """A copy of the params file with `train.seed` and `pseudolabel.split_seed` set to `seed`."""
    raw = read_params(params)
    raw["train"] = {**(raw.get("train") or {}), "seed": seed}
    raw["pseudolabel"] = {**(raw.get("pseudolabel") or {}), "split_seed": seed}
    path = workdir / f"params-{seed}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_seed(seed: int, params: str, data: str, workdir: Path) -> dict:
    path = seed_params(params, seed, workdir)
    started = time.perf_counter()
    prepare_pseudolabel(
        **load_params(prepare_pseudolabel, path), data_dir=data, output=str(workdir / f"pl-{seed}")
    )
    figures = train_pseudolabel(
        **load_params(train_pseudolabel, path),
        data_dir=str(workdir / f"pl-{seed}"),
        output=str(workdir / f"model-{seed}"),
        metrics_path=str(workdir / f"m-{seed}.json"),
        plots_dir=str(workdir / f"plots-{seed}"),
    )
    return {"seed": seed, **figures, "seconds": round(time.perf_counter() - started, 1)}


def pseudolabel_section(params: str) -> PseudoLabelConfig:
    """The whole `pseudolabel` section of the params file (both stages' keys), for the record."""
    raw = read_params(params).get("pseudolabel") or {}
    return parse_section(PseudoLabelConfig, raw, params, "pseudolabel.")


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
        "params": config_to_dict(pseudolabel_section(args.params)),
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
