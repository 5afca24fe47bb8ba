"""Does augmentation help? The same network, epochs and seeds, with and without it.

For each image set, the default `model` and `train` settings of params.yaml train twice per
seed, through `fit_task` (what each Ray Train worker runs, here in one process): once with
`train.augment` off, once with the set's augmentation on. Test accuracy is that of the
best-validation weights, as the `train_supervised` stage keeps them.

- digits: the bundled 8x8 digits as `prepare` splits them (1,257 training images); no
  mirror (a mirrored 2 is not a 2).
- fashion-mnist: Debian's `dataset-fashion-mnist` (28x28 clothes), a seeded subset of
  `--fashion-images` images through `prepare` (format `idx`); mirror on (a mirrored shirt is
  a shirt). Left out, with a note, when the package is missing.

    python -m benchmarks.augmentation   # writes benchmarks/results/augmentation.json (+ .md)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.cluster import prepare_digits
from benchmarks.scratch import markdown_table, write_results
from benchmarks.training_throughput import FASHION_MNIST, IDX_IMAGE_SIZE
from models.architecture import ArchitectureConfig
from models.augmentation import AugmentConfig
from pipelines.stagekit.config import TrainConfig, load_params
from pipelines.stagekit.dataset import load_prepared
from pipelines.stagekit.model_bundle import build_model
from pipelines.supervised.config import PrepareConfig
from pipelines.supervised.prepare import read_raw, write_prepared
from pipelines.supervised.train import train_supervised
from pipelines.training.driver import supervised_arrays, supervised_task
from pipelines.training.fitting import fit_task, initial_state

RESULTS = Path("benchmarks/results/augmentation.json")
# Black fill, as every recorded run had (before `fill` existed): both sets have a black
# background, so black is also what lies beyond their edges.
AUGMENTATIONS = {
    "digits": AugmentConfig(
        enabled=True, scale=(0.8, 1.0), translate=0.1, rotation=10.0, fill="zeros"
    ),
    # The usual recipe for clothes: a mirror and small shifts (a first try with the digits'
    # crops and rotations as well scored 0.856 against 0.875 without, one seed, 15 epochs).
    "fashion-mnist": AugmentConfig(
        enabled=True,
        scale=(0.9, 1.0),
        translate=0.1,
        rotation=0.0,
        horizontal_flip=True,
        fill="zeros",
    ),
}


def prepare_fashion(root: Path, images: int, seed: int = 0) -> Path:
    """A seeded subset of Fashion-MNIST's 70,000 images, prepared as the `prepare` stage does."""
    config = PrepareConfig(source=str(FASHION_MNIST), format="idx", image_size=IDX_IMAGE_SIZE)
    raw = read_raw(config, config.source)
    keep = np.sort(np.random.default_rng(seed).permutation(len(raw.labels))[:images])
    raw = dataclasses.replace(raw, features=raw.features[keep], labels=raw.labels[keep])
    write_prepared(raw, config, config.source, str(root / "fashion"))
    return root / "fashion"


def test_accuracy(model_state: dict, arch: ArchitectureConfig, manifest: dict, x, y) -> float:
    network = build_model(arch, manifest)
    network.load_state_dict(model_state)
    network.eval()
    with torch.no_grad():
        predicted = torch.cat(
            [network(batch).argmax(1) for batch in torch.from_numpy(x).split(1024)]
        )
    return float((predicted.numpy() == y).mean())


def run(data_dir: Path, arch: ArchitectureConfig, train: TrainConfig) -> dict:
    data = load_prepared(data_dir)
    task = supervised_task(arch, data.manifest, train)
    arrays = {name: torch.from_numpy(a) for name, a in supervised_arrays(data).items()}
    started = time.perf_counter()
    state = fit_task(initial_state(task, train), task, arrays, train, torch.device("cpu"))
    seconds = time.perf_counter() - started
    history = state.history
    accuracy = test_accuracy(
        state.best_model_state, arch, data.manifest, data.x("test"), data.y("test")
    )
    return {
        "test_accuracy": round(accuracy, 4),
        "best_epoch": state.early_stopping.best_epoch,
        "epochs_run": len(history),
        "seconds": round(seconds, 1),
        "data_wait_share": round(
            sum(m["data_wait_seconds"] for m in history) / sum(m["train_seconds"] for m in history),
            4,
        ),
    }


def summary(runs: list[dict]) -> dict:
    accuracies = [r["test_accuracy"] for r in runs]
    return {
        "test_accuracy_mean": round(statistics.mean(accuracies), 4),
        "test_accuracy_std": round(statistics.stdev(accuracies), 4) if len(runs) > 1 else 0.0,
        "seconds_mean": round(statistics.mean(r["seconds"] for r in runs), 1),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fashion-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--fashion-images", type=int, default=10_000)
    parser.add_argument("--fashion-epochs", type=int, default=15)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    settings = load_params(train_supervised, args.params)
    arch, base = settings["model"], settings["train"]
    # Every epoch counted alike in both arms: early stopping keeps the best weights anyway.
    base = dataclasses.replace(base, early_stopping_patience=0, num_workers=1)
    figures: dict = {"model": arch.kind, "sets": {}}
    notes = []
    with tempfile.TemporaryDirectory(prefix="dlpipe-augment-") as scratch:
        root = Path(scratch)
        sets = {"digits": (prepare_digits(root / "digits"), base.epochs, args.seeds)}
        if FASHION_MNIST.is_dir():
            fashion = prepare_fashion(root, args.fashion_images)
            sets["fashion-mnist"] = (fashion, args.fashion_epochs, args.fashion_seeds)
        else:
            notes.append(
                f"fashion-mnist left out: {FASHION_MNIST} missing (apt-get install dataset-fashion-mnist)"
            )
        for name, (data_dir, epochs, seeds) in sets.items():
            arms = {"none": AugmentConfig(enabled=False), "augment": AUGMENTATIONS[name]}
            results = {}
            for arm, augment in arms.items():
                runs = []
                for seed in seeds:
                    train = dataclasses.replace(base, epochs=epochs, seed=seed, augment=augment)
                    runs.append({"seed": seed, **run(data_dir, arch, train)})
                    print(f"{name} {arm} seed {seed}: {runs[-1]}", flush=True)
                results[arm] = summary(runs)
            manifest = load_prepared(data_dir).manifest
            figures["sets"][name] = {
                "seeds": seeds,
                "train_images": manifest["splits"]["train"]["size"],
                "test_images": manifest["splits"]["test"]["size"],
                "epochs": epochs,
                "augment": dataclasses.asdict(AUGMENTATIONS[name]),
                **results,
                "gain_points": round(
                    100
                    * (
                        results["augment"]["test_accuracy_mean"]
                        - results["none"]["test_accuracy_mean"]
                    ),
                    2,
                ),
            }
    rows = [
        (
            name,
            f"{s['train_images']:,} / {s['test_images']:,}",
            s["epochs"],
            f"{s['none']['test_accuracy_mean']:.4f} ± {s['none']['test_accuracy_std']:.4f}",
            f"{s['augment']['test_accuracy_mean']:.4f} ± {s['augment']['test_accuracy_std']:.4f}",
            f"{s['gain_points']:+.2f}",
            f"{s['none']['seconds_mean']} / {s['augment']['seconds_mean']}",
        )
        for name, s in figures["sets"].items()
    ]
    table = markdown_table(
        (
            "set",
            "train / test images",
            "epochs",
            "no augmentation",
            "augmentation",
            "gain (points)",
            "s per run (none / aug)",
        ),
        rows,
    )
    note = (
        f"Test accuracy, mean ± std over seeds (train.seed; digits {args.seeds}, "
        f"fashion-mnist {args.fashion_seeds}), default `model` "
        f"({arch.kind}) and `train` settings, one process with 2 threads, every epoch run, the "
        "best-validation weights scored. " + " ".join(notes)
    )
    write_results(args.output, figures, table, note)


if __name__ == "__main__":
    main()
