"""A user's own small image folder, as issue 19 tried it: does dlpipe's default pipeline
learn it, and are its figures honest?

The folder: 3 classes of simple shapes (circle, square, triangle), 60 RGB images each at
40x40 pixels, each shape at a random position, size and colour on a random background
colour, with pixel noise. Generated here with a seed (no download); `--folder` runs the same
measurements on a folder of your own instead.

Measured, through the stages' own functions on Ray Train (params.yaml's `model` and `train`,
`prepare.image_size` set to 40x40 and `grayscale` off, as a user of RGB images would):

- `supervised`: prepare -> train_supervised -> evaluate, with params.yaml's CNN and
  `train.augment` on (the default) and off, then with the settings the README gives for
  objects anywhere in the image (`ANYWHERE`: 3 conv blocks, global average pooling, 150
  epochs with patience 40) without and with augmentation (edge fill `border`); test accuracy
  with its 95% interval, accuracy on 600 fresh images, the small-split warnings;
  scikit-learn's logistic regression and SVC on the same pixels and split as anchors;
- `cross_validation`: the `cross_validate` stage, 5 folds over all 180 images with the
  `ANYWHERE` settings: the mean and spread a 27-image test split cannot give;
- `semi_supervised`: 10 labeled images per class plus 300 unlabeled ones of the same kind
  (`pseudolabel.unlabeled_source`), FixMatch and teacher -> student beside the supervised-only
  baseline, with the `ANYWHERE` network and edge fill, scored on the stage's own tiny test
  split and on 600 fresh images.

    python -m benchmarks.shapes_folder   # writes benchmarks/results/shapes_folder.json (+ .md)

Runs go to a throw-away MLflow store and checkpoint folder, not the project's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw

from benchmarks.scratch import machine, markdown_table, scratch_stores, write_results
from pipelines.semisupervised.prepare import prepare_pseudolabel
from pipelines.semisupervised.train import train_pseudolabel
from pipelines.stagekit.config import load_params, read_params
from pipelines.stagekit.dataset import load_prepared
from pipelines.stagekit.model_bundle import inference_model, load_trained
from pipelines.supervised.cross_validate import cross_validate
from pipelines.supervised.evaluate import evaluate
from pipelines.supervised.prepare import prepare
from pipelines.supervised.train import train_supervised

RESULTS = Path("benchmarks/results/shapes_folder.json")
CLASSES = ("circle", "square", "triangle")
SIZE = 40
ANYWHERE = {
    "model": {"channels": [32, 64, 128], "global_pool": "avg"},
    "train": {"epochs": 150, "early_stopping_patience": 40},
}
"""The README's settings for objects at any place in a small set of larger images: a cell
of the third block's map sees 22x22 pixels, global pooling finds a shape wherever it is,
and 126 images at 2 batches per worker need many epochs."""
BORDER_FILL = {"fill": "border"}  # a photo's background goes on past its edge


def draw_shape(kind: str, rng: np.random.Generator) -> Image.Image:
    """One 40x40 RGB image: `kind` at a random place, size and colour, on a random
    background colour far enough from it to be seen, plus pixel noise."""
    background = rng.integers(0, 256, 3)
    while True:
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - background).sum() > 150:
            break
    image = Image.new("RGB", (SIZE, SIZE), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(image)
    radius = int(rng.integers(6, 14))
    cx, cy = (int(v) for v in rng.integers(radius + 1, SIZE - radius - 1, 2))
    fill = tuple(int(c) for c in colour)
    if kind == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif kind == "square":
        draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon(
            [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill
        )
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, 20, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def shapes_folder(root: Path, per_class: int, seed: int, labeled: bool = True) -> Path:
    """`per_class` images of each shape: in `<root>/<class>/` folders, or all in `root`
    (an unlabeled pool) when not `labeled`."""
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        folder = root / kind if labeled else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(kind, rng).save(folder / f"{kind}-{seed}-{i:04d}.png")
    return root


def user_params(workdir: Path, name: str, **sections: dict) -> Path:
    """params.yaml with the RGB 40x40 prepare settings and `sections` laid over it (one
    level deeper for `train.augment`)."""
    raw = read_params("params.yaml")
    raw["prepare"] = {**raw["prepare"], "image_size": [SIZE, SIZE], "grayscale": False}
    for section, values in sections.items():
        merged = {**raw[section], **values}
        if "augment" in values and "augment" in raw[section]:
            merged["augment"] = {**raw[section]["augment"], **values["augment"]}
        raw[section] = merged
    path = workdir / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def sklearn_anchors(prepared: Path) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    data = load_prepared(prepared)
    flat = lambda split: data.x(split).reshape(len(data.x(split)), -1)  # noqa: E731
    scores = {}
    for name, model in (
        ("logistic_regression", LogisticRegression(max_iter=2000)),
        ("svc", SVC()),
    ):
        model.fit(flat("train"), data.y("train"))
        scores[name] = float(np.mean(model.predict(flat("test")) == data.y("test")))
    return scores


def accuracy_on(model_dir: Path, manifest: dict, folder: Path) -> float:
    """The trained model's accuracy on a labeled folder prepared with the same settings."""
    from pipelines.stagekit.readers import read_image_folder

    raw = read_image_folder(str(folder), (SIZE, SIZE), grayscale=False)
    assert list(raw.class_names) == list(manifest["class_names"])
    model, _ = load_trained(model_dir, manifest)
    with torch.no_grad():
        output = inference_model(model, "classification")(torch.from_numpy(raw.features))
    return float((output.argmax(1).numpy() == raw.labels).mean())


def anywhere(augment: bool) -> dict[str, dict]:
    """The ANYWHERE sections, augmentation on (edge fill border) or off."""
    return {
        "model": ANYWHERE["model"],
        "train": {**ANYWHERE["train"], "augment": {"enabled": augment, **BORDER_FILL}},
    }


SUPERVISED_RUNS = {
    "augment_on": {"train": {"augment": {"enabled": True}}},
    "augment_off": {"train": {"augment": {"enabled": False}}},
    "anywhere_augment_off": anywhere(False),
    "anywhere_augment_on": anywhere(True),
}
"""Run name -> sections laid over params.yaml: its own CNN first, then ANYWHERE."""


def supervised(folder: Path, workdir: Path, fresh_test: Path | None) -> dict:
    """The SUPERVISED_RUNS, the scikit-learn anchors and the cross-validation on `folder`;
    `fresh_test`, when given, is a folder of fresh images of the same classes to score on."""
    results: dict = {}
    prepared = workdir / "prepared"
    for name, sections in SUPERVISED_RUNS.items():
        params = user_params(workdir, name, **sections)
        prepare(**load_params(prepare, params), source=str(folder), output=str(prepared))
        started = time.perf_counter()
        train_supervised(
            **load_params(train_supervised, params),
            data_dir=str(prepared),
            output=str(workdir / f"model-{name}"),
            metrics_path=str(workdir / f"train-{name}.json"),
            plots_dir=str(workdir / f"plots-{name}"),
        )
        figures = evaluate(
            "dlpipe-supervised",
            str(prepared),
            str(workdir / f"model-{name}"),
            str(workdir / f"evaluate-{name}.json"),
            str(workdir / f"plots-{name}"),
        )
        warnings = json.loads((workdir / f"evaluate-{name}.json").read_text())["warnings"]
        results[name] = {
            **{k: v for k, v in figures.items() if k.startswith("test_accuracy")},
            "fresh_test_accuracy": (
                accuracy_on(workdir / f"model-{name}", load_prepared(prepared).manifest, fresh_test)
                if fresh_test is not None
                else None
            ),
            "warnings": warnings,
            "seconds": round(time.perf_counter() - started, 1),
        }
    results.update(sklearn_anchors(prepared))
    params = user_params(workdir, "cv", evaluate={"folds": 5}, **anywhere(False))
    started = time.perf_counter()
    cv = cross_validate(
        **load_params(cross_validate, params),
        data_dir=str(prepared),
        metrics_path=str(workdir / "cv.json"),
    )
    results["cross_validation"] = {
        **{k: v for k, v in cv.items() if k != "per_fold"},
        "per_fold_accuracy": [f["test_accuracy"] for f in cv["per_fold"].values()],
        "settings": "anywhere_augment_off",
        "seconds": round(time.perf_counter() - started, 1),
    }
    return results


def semi_supervised(workdir: Path, fresh_test: Path) -> dict:
    labeled = shapes_folder(workdir / "few-labels", 10, seed=11)
    pool = shapes_folder(workdir / "unlabeled", 100, seed=12, labeled=False)
    prepared = workdir / "few-prepared"
    split = workdir / "few-split"
    results: dict = {}
    for method in ("fixmatch", "teacher_student"):
        params = user_params(
            workdir,
            f"semi-{method}",
            model=ANYWHERE["model"],
            train={"augment": {"enabled": True, **BORDER_FILL}},
            # The settings of the recorded runs (params.yaml's FixMatch now trains 3 times
            # longer, with a cosine schedule and a moving average: not re-run here yet).
            pseudolabel={
                "method": method,
                "unlabeled_source": str(pool),
                "fixmatch_epochs": 0,
                "lr_schedule": "constant",
                "ema_decay": 0.0,
            },
        )
        prepare(**load_params(prepare, params), source=str(labeled), output=str(prepared))
        prepare_pseudolabel(
            **load_params(prepare_pseudolabel, params), data_dir=str(prepared), output=str(split)
        )
        started = time.perf_counter()
        figures = train_pseudolabel(
            **load_params(train_pseudolabel, params),
            data_dir=str(split),
            output=str(workdir / f"semi-model-{method}"),
            metrics_path=str(workdir / f"semi-{method}.json"),
            plots_dir=str(workdir / f"semi-plots-{method}"),
        )
        manifest = load_prepared(split).manifest
        results[method] = {
            "test_accuracy": figures["test_accuracy"],
            "test_accuracy_examples": figures["test_accuracy_examples"],
            "test_accuracy_ci95_low": figures["test_accuracy_ci95_low"],
            "test_accuracy_ci95_high": figures["test_accuracy_ci95_high"],
            "fresh_test_accuracy": accuracy_on(
                workdir / f"semi-model-{method}", manifest, fresh_test
            ),
            "baseline_test_accuracy": figures["baseline_test_accuracy"],
            "pseudo_labels": figures["pseudo_labels"],
            "warnings": figures["warnings"],
            "seconds": round(time.perf_counter() - started, 1),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--folder", help="your own image folder instead of the shapes")
    parser.add_argument("--skip-semi", action="store_true", help="the supervised part only")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    started = time.perf_counter()
    with scratch_stores() as workdir:
        folder = Path(args.folder) if args.folder else shapes_folder(workdir / "shapes", 60, 0)
        fresh = shapes_folder(workdir / "fresh-test", 200, seed=13)
        # Your own folder has other classes: no fresh shapes to score it on.
        figures: dict = {"supervised": supervised(folder, workdir, None if args.folder else fresh)}
        if not args.skip_semi:
            figures["semi_supervised"] = semi_supervised(workdir, fresh)
    figures.update(machine=machine(), seconds=round(time.perf_counter() - started))
    sup = figures["supervised"]
    cv = sup["cross_validation"]
    labels = {
        "augment_on": "params.yaml's CNN, augmentation on (fill zeros, as for the digits)",
        "augment_off": "params.yaml's CNN, augmentation off",
        "anywhere_augment_off": "3 blocks + global average pooling, 150 epochs, augmentation off",
        "anywhere_augment_on": "3 blocks + global average pooling, 150 epochs, augmentation on (fill border)",
    }
    rows = [
        (
            label,
            f"{sup[name]['test_accuracy']:.3f}"
            + (
                f"; {sup[name]['fresh_test_accuracy']:.3f} on 600 fresh"
                if sup[name]["fresh_test_accuracy"] is not None
                else ""
            ),
            f"{sup[name]['test_accuracy_ci95_low']:.3f}-{sup[name]['test_accuracy_ci95_high']:.3f}",
        )
        for name, label in labels.items()
    ]
    rows += [
        ("logistic regression (pixels)", f"{sup['logistic_regression']:.3f}", ""),
        ("SVC (pixels)", f"{sup['svc']:.3f}", ""),
        (
            "3 blocks + global average pooling, 5-fold cross-validation",
            f"{cv['test_accuracy_mean']:.3f} ± {cv['test_accuracy_std']:.3f}",
            f"pooled {cv['pooled_test_accuracy_ci95_low']:.3f}-{cv['pooled_test_accuracy_ci95_high']:.3f}",
        ),
    ]
    for method, result in figures.get("semi_supervised", {}).items():
        rows.append(
            (
                f"10 labels/class + 300 unlabeled: {method}",
                f"{result['test_accuracy']:.3f} ({result['test_accuracy_examples']:.0f} test images); "
                f"{result['fresh_test_accuracy']:.3f} on 600 fresh; baseline {result['baseline_test_accuracy']:.3f}",
                f"{result['test_accuracy_ci95_low']:.3f}-{result['test_accuracy_ci95_high']:.3f}",
            )
        )
    table = markdown_table(("model", "test accuracy", "95% interval"), rows)
    note = (
        f"{'Your folder ' + args.folder if args.folder else 'Generated shapes: 3 classes x 60 RGB 40x40 images'}"
        f"; params.yaml's model and train, prepare.image_size 40x40 RGB. Took {figures['seconds']} s."
    )
    write_results(args.output, figures, table, note)


if __name__ == "__main__":
    main()
