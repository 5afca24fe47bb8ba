"""The medical-style case at scale: 1,000 labeled images beside a pool of 60,000 unlabeled
ones, FixMatch end to end through the stages on 2 Ray Train workers.

Fashion-MNIST from Debian's `dataset-fashion-mnist`, kept disjoint: the labeled folder is
2,900 images of the official test file (t10k), which `prepare` splits 1,000 train / 500
validation / 1,400 test; the pool is all 60,000 images of the training file, written as a
folder of PNGs without labels, the kind of folder a user points `pseudolabel.unlabeled_source`
at. Then `prepare`, `prepare_pseudolabel` and `train_pseudolabel` (method fixmatch, with its
supervised-only baseline) run as `dvc repro` runs them, with params.yaml's other settings.

    python -m benchmarks.fixmatch_scale --epochs 3   # writes benchmarks/results/fixmatch_scale.json

A FixMatch epoch is one pass over the pool: about 540 steps per worker here, a few minutes
on 2 CPUs; the baseline's epoch is one pass over the 1,000 labels. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from benchmarks.scratch import machine, markdown_table, scratch_stores, write_results
from benchmarks.training_throughput import FASHION_MNIST
from pipelines.semisupervised.prepare import prepare_pseudolabel
from pipelines.semisupervised.train import train_pseudolabel
from pipelines.stagekit.config import load_params, read_params
from pipelines.stagekit.readers import read_idx_file
from pipelines.supervised.prepare import prepare

RESULTS = Path("benchmarks/results/fixmatch_scale.json")
LABELED, VALIDATION, TEST = 1_000, 500, 1_400  # prepare keeps a test split <= half


def idx(name: str) -> np.ndarray:
    path = FASHION_MNIST / f"{name}.gz"
    if not path.is_file():
        raise SystemExit(f"{path} missing: apt-get install dataset-fashion-mnist")
    return read_idx_file(path)


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray | None) -> Path:
    """PNG files, one folder per class (or one flat folder without labels)."""
    for i, pixels in enumerate(images):
        folder = root / str(labels[i]) if labels is not None else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return root


def scale_params(params: str, labeled: Path, pool: Path, epochs: int, workdir: Path) -> Path:
    raw = read_params(params)
    total = LABELED + VALIDATION + TEST
    raw["prepare"] = {
        **raw["prepare"],
        "source": str(labeled),
        "format": "image_folder",
        "image_size": [28, 28],
        "grayscale": True,
        "val_fraction": VALIDATION / total,
        "test_fraction": TEST / total,
    }
    # Clothes keep their label when mirrored; small shifts, no rotation (the usual recipe).
    raw["train"]["augment"] = {
        **raw["train"]["augment"],
        "enabled": True,
        "scale": [0.9, 1.0],
        "rotation": 0.0,
        "horizontal_flip": True,
    }
    raw["pseudolabel"] = {
        **raw["pseudolabel"],
        "unlabeled_source": str(pool),
        "method": "fixmatch",
        "rounds": 0,
        "fixmatch_epochs": epochs,
    }
    path = workdir / "params-scale.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    started = time.perf_counter()
    with scratch_stores() as workdir:
        rng = np.random.default_rng(0)
        test_images, test_labels = idx("t10k-images-idx3-ubyte"), idx("t10k-labels-idx1-ubyte")
        chosen = rng.permutation(len(test_labels))[: LABELED + VALIDATION + TEST]
        labeled = write_folder(workdir / "labeled", test_images[chosen], test_labels[chosen])
        pool = write_folder(workdir / "pool", idx("train-images-idx3-ubyte"), None)
        print(f"wrote {len(chosen)} labeled and 60,000 unlabeled PNGs", flush=True)
        params = scale_params(args.params, labeled, pool, args.epochs, workdir)
        prepare(**load_params(prepare, params), output=str(workdir / "prepared"))
        prepare_pseudolabel(
            **load_params(prepare_pseudolabel, params),
            data_dir=str(workdir / "prepared"),
            output=str(workdir / "pl"),
        )
        trained = time.perf_counter()
        figures = train_pseudolabel(
            **load_params(train_pseudolabel, params),
            data_dir=str(workdir / "pl"),
            output=str(workdir / "model"),
            metrics_path=str(workdir / "metrics.json"),
            plots_dir=str(workdir / "plots"),
        )
        train_s = time.perf_counter() - trained
    result = {
        "labeled": figures["labeled_count"],
        "unlabeled": figures["unlabeled_count"],
        "epochs": args.epochs,
        "workers": read_params(args.params)["train"]["num_workers"],
        **{
            k: v for k, v in figures.items() if k.startswith(("test_", "baseline_test_", "pseudo_"))
        },
        "train_s": round(train_s, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
    }
    table = markdown_table(
        ("labeled / unlabeled", "epochs", "fixmatch test acc.", "supervised-only", "train s"),
        [
            (
                f"{result['labeled']:,} / {result['unlabeled']:,}",
                args.epochs,
                f"{result['test_accuracy']:.4f} ({result['test_accuracy_ci95_low']:.4f}-"
                f"{result['test_accuracy_ci95_high']:.4f})",
                f"{result['baseline_test_accuracy']:.4f}",
                result["train_s"],
            )
        ],
    )
    write_results(
        args.output,
        result,
        table,
        "Fashion-MNIST: labeled images from t10k, the pool is the 60,000 training images; "
        f"{result['workers']} Ray Train workers. Took {result['seconds']} s.",
    )


if __name__ == "__main__":
    main()
