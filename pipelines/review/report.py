"""`report`: one static page with the whole pipeline's current state, reports/index.html.

The last stage of the DAG (also `dlpipe report`). It reads what the other stages wrote, never
re-computes a figure: each stage's headline figures beside their baselines (the networks vs
scikit-learn's logistic regression, the pseudo-label student vs the same network trained on
its labels alone, the MLM vs unigram and
most-frequent-token guesses, segmentation vs K-means on raw features, the search's best per
optimizer, the networks vs the time-series baselines, the generators vs real digits and
noise, serving vs the bare server), with their learning curves, confusion matrix, gradient
norms, learning-rate sweep and segment profiles. Each section links to the MLflow run that
made its figures (the run id every stage writes into its metrics file). The page is also
logged as an artifact of a run in the `dlpipe-report` experiment.

Why a template (templates/index.html.j2, Jinja2 with autoescaping) and matplotlib PNGs next
to it: the page opens from a file, a CI artifact or an MLflow artifact alike, with no server
and no script, and a stage's label cannot inject markup.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.stagekit import tracking
from pipelines.stagekit.atomic import output_directory, write_text
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.plots import comparison_png, learning_curves_png
from pipelines.stagekit.stage import stage_command

log = logging.getLogger(__name__)

STAGE = "report"
EXPERIMENT = "dlpipe-report"
TEMPLATES = Path(__file__).with_name("templates")

# Every input the page is made of, relative to the repository; the stage that writes each
# is read from dvc.yaml for the "not run yet" message.
METRICS = (
    "train_supervised",
    "supervised",
    "evaluate",
    "pseudolabel",
    "evaluate_pseudolabel",
    "mlm",
    "segment",
    "segment_digits",
    "tune",
    "timeseries",
    "generate",
)
FILES = (
    "plots/supervised/learning_curves.csv",
    "plots/supervised/test_predictions.png",
    "artifacts/supervised/model/gradient_norms.png",
    "plots/pseudolabel/test_predictions.png",
    "plots/mlm/learning_curves.csv",
    "plots/segment/profiles.csv",
    "plots/segment/k_sweep.png",
    "plots/segment/kmeans_projection.png",
    "plots/segment/autoencoder_projection.png",
    "artifacts/tune/results.csv",
    "plots/tune/lr_sweep.png",
    "plots/tune/best_curves.png",
    "artifacts/generate/models/vae/samples.png",
    "artifacts/generate/models/gan/samples.png",
)


@dataclass
class Section:
    """One part of the page: a stage's figures, its images, and a link to its run."""

    title: str
    summary: str
    runs: list[tuple[str, str]] = field(default_factory=list)
    """(label, MLflow run id) of the runs behind the figures."""
    figures: list[tuple[str, str]] = field(default_factory=list)
    """(name, formatted value) rows."""
    images: list[tuple[str, str]] = field(default_factory=list)
    """(file in the report folder, caption)."""
    table: tuple[list[str], list[list[str]]] | None = None
    """A table of the stage's own (headers, rows), e.g. the segment profiles."""


def report(
    root_dir: str = ".",
    serving_path: str = "benchmarks/results/serving.json",
    output: str = "reports",
) -> Path:
    """Write `output`/index.html (and its images) from the outputs under `root_dir`, log it to
    MLflow; returns the page. A UserError names every stage not run yet, before anything
    is written."""
    root = Path(root_dir)
    missing = [
        path
        for path in (*(f"metrics/{name}.json" for name in METRICS), *FILES)
        if not (root / path).is_file()
    ]
    if missing:
        if not (root / "dvc.yaml").is_file():
            raise UserError(
                f"no dvc.yaml in {root.resolve()}: run the report in the pipeline's repository"
            )
        stages, unknown = _producing_stages(root, missing)
        listed = [f"{stage} ({path})" for stage, path in stages.items()] + unknown
        raise UserError(
            f"not run yet: {', '.join(listed)}; run `dvc repro {' '.join(stages)}` "
            "(or `dvc repro`) first"
        )
    metrics = {name: json.loads((root / f"metrics/{name}.json").read_text()) for name in METRICS}
    serving = json.loads(Path(serving_path).read_text()) if Path(serving_path).is_file() else None
    with output_directory(output) as staging, _figures_named():
        sections = [
            supervised(root, metrics, staging),
            semisupervised(root, metrics, staging),
            masked_language_model(root, metrics, staging),
            segmentation(root, metrics, staging),
            search(root, metrics, staging),
            time_series(metrics, staging),
            generative(root, metrics, staging),
        ]
        if serving is not None:
            sections.append(serving_section(serving, staging))
        page = _render(sections, tracking.dashboard_url())
        write_text(staging / "index.html", page)
    index = Path(output) / "index.html"
    inputs = hashlib.sha256(json.dumps(metrics, sort_keys=True, default=str).encode()).hexdigest()
    with tracking.stage_run(EXPERIMENT, STAGE, tracking.stage_tags(STAGE, inputs)) as run:
        for file in sorted(Path(output).iterdir()):
            run.log_artifact(file, "report")
    log.info("wrote %s (%d sections); MLflow run %s", index, len(sections), run.run_id)
    return index


@contextlib.contextmanager
def _figures_named() -> Iterator[None]:
    """A figure a section needs but a metrics file lacks (written by an older dlpipe, or a
    regression model where a section shows accuracies) is one line naming it."""
    try:
        yield
    except KeyError as exc:
        raise UserError(
            f"the report needs the figure {exc.args[0]!r}, which the metrics files lack: "
            "written by an older dlpipe (re-run the pipeline: dvc repro), or a regression "
            "model where the report shows a classifier's accuracies"
        ) from None


def _producing_stages(root: Path, paths: list[str]) -> tuple[dict[str, str], list[str]]:
    """stage -> the first of `paths` it writes (outs, metrics or plots in dvc.yaml), and the
    paths no stage writes."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    found: dict[str, str] = {}
    unknown: list[str] = []
    for path in paths:
        for name, entry in stages.items():
            outs = [
                next(iter(o)) if isinstance(o, dict) else str(o)
                for key in ("outs", "metrics", "plots")
                for o in entry.get(key, [])
            ]
            if any(path == o or path.startswith(o.rstrip("/") + "/") for o in outs):
                found.setdefault(name, path)
                break
        else:
            unknown.append(f"{path} (no stage in dvc.yaml writes it)")
    return found, unknown


def _run(figures: dict[str, Any]) -> str | None:
    return figures.get(tracking.RUN_ID_KEY)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _with_ci(figures: dict[str, Any], key: str) -> str:
    low, high = figures.get(f"{key}_ci95_low"), figures.get(f"{key}_ci95_high")
    interval = f" (95% CI {_pct(low)}-{_pct(high)})" if low is not None else ""
    return f"{_pct(figures[key])}{interval}"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _history(path: Path) -> list[dict[str, float]]:
    """A learning_curves.csv as the history rows the curve plots take."""
    return [{k: float(v) for k, v in row.items() if v} for row in _read_csv(path)]


def _copy(root: Path, source: str, staging: Path, name: str) -> str:
    shutil.copyfile(root / source, staging / name)
    return name


def supervised(root: Path, metrics: dict, staging: Path) -> Section:
    train, test, evaluation = (
        metrics["train_supervised"],
        metrics["supervised"],
        metrics["evaluate"],
    )
    learning_curves_png(
        _history(root / "plots/supervised/learning_curves.csv"), staging / "supervised_curves.png"
    )
    comparison_png(
        [
            ("CNN (Ray Train)", test["test_accuracy"], True),
            ("logistic regression (scikit-learn)", evaluation["sklearn_test_accuracy"], False),
        ],
        "Digits: test accuracy",
        "accuracy",
        staging / "supervised_vs_baselines.png",
    )
    return Section(
        "Supervised: digits",
        f"Trained on Ray Train for {train['epochs_run']} epochs (best at epoch "
        f"{train['best_epoch'] + 1}); tested on the held-out split, exported to ONNX.",
        runs=[
            ("train_supervised", _run(train)),
            ("evaluate", _run(metrics["evaluate"])),
            ("export", _run(test)),
        ],
        figures=[
            ("test accuracy", _with_ci(test, "test_accuracy")),
            ("test macro F1", _with_ci(test, "test_macro_f1")),
            ("scikit-learn logistic regression", _with_ci(evaluation, "sklearn_test_accuracy")),
            ("best validation accuracy", _with_ci(train, "best_val_accuracy")),
            ("ONNX vs torch, max |diff|", f"{test['onnx_max_abs_diff']:.1e}"),
        ],
        images=[
            ("supervised_vs_baselines.png", "test accuracy beside the baselines"),
            ("supervised_curves.png", "learning curves: train vs validation"),
            (
                _copy(root, "plots/supervised/test_predictions.png", staging, "confusion.png"),
                "confusion matrix (test split)",
            ),
            (
                _copy(
                    root, "artifacts/supervised/model/gradient_norms.png", staging, "gradients.png"
                ),
                "per-layer gradient norms",
            ),
        ],
    )


def semisupervised(root: Path, metrics: dict, staging: Path) -> Section:
    figures, evaluation = metrics["pseudolabel"], metrics["evaluate_pseudolabel"]
    labels = figures["labeled_count"]
    comparison_png(
        [
            (f"student ({labels} labels + pool)", figures["test_accuracy"], True),
            (f"same network, {labels} labels only", figures["baseline_test_accuracy"], False),
            (f"logistic regression, {labels} labels", evaluation["sklearn_test_accuracy"], False),
        ],
        "Digits from few labels: test accuracy",
        "accuracy",
        staging / "pseudolabel_vs_baselines.png",
    )
    return Section(
        "Semi-supervised: pseudo-labels",
        f"{figures['method']} from {figures['labeled_count']} labels and "
        f"{figures['unlabeled_count']} unlabeled digits.",
        runs=[("train_pseudolabel", _run(figures)), ("evaluate_pseudolabel", _run(evaluation))],
        figures=[
            ("student test accuracy", _with_ci(figures, "test_accuracy")),
            ("same network, labels only", _with_ci(figures, "baseline_test_accuracy")),
            ("logistic regression, labels only", _with_ci(evaluation, "sklearn_test_accuracy")),
            ("pseudo-labels used", f"{figures['pseudo_labels']:.0f}"),
            ("pseudo-label accuracy", _with_ci(figures, "pseudo_label_accuracy")),
        ],
        images=[
            ("pseudolabel_vs_baselines.png", "the student beside its baselines"),
            (
                _copy(root, "plots/pseudolabel/test_predictions.png", staging, "pseudolabel.png"),
                "student: confusion matrix (test split)",
            ),
        ],
    )


def masked_language_model(root: Path, metrics: dict, staging: Path) -> Section:
    figures = metrics["mlm"]
    comparison_png(
        [
            ("transformer encoder", figures["masked_accuracy"], True),
            ("most frequent token", figures["baseline_masked_accuracy"], False),
        ],
        "Masked tokens: accuracy (validation)",
        "accuracy",
        staging / "mlm_accuracy.png",
    )
    comparison_png(
        [
            ("transformer encoder", figures["perplexity"], True),
            ("unigram frequencies", figures["unigram_perplexity"], False),
        ],
        "Masked tokens: perplexity (validation)",
        "perplexity",
        staging / "mlm_perplexity.png",
        lower_is_better=True,
    )
    learning_curves_png(
        _history(root / "plots/mlm/learning_curves.csv"), staging / "mlm_curves.png"
    )
    return Section(
        "Self-supervised: masked-language model",
        f"Pretrained on Python's pydoc topics ({figures['train_tokens']} tokens) for "
        f"{figures['epochs_run']} epochs.",
        runs=[("pretrain_mlm", _run(figures))],
        figures=[
            ("masked-token accuracy", _with_ci(figures, "masked_accuracy")),
            ("most-frequent-token accuracy", _with_ci(figures, "baseline_masked_accuracy")),
            ("perplexity", f"{figures['perplexity']:.1f}"),
            ("unigram perplexity", f"{figures['unigram_perplexity']:.1f}"),
        ],
        images=[
            ("mlm_accuracy.png", "masked-token accuracy beside the most frequent token"),
            ("mlm_perplexity.png", "perplexity beside unigram frequencies"),
            ("mlm_curves.png", "learning curves"),
        ],
    )


def segmentation(root: Path, metrics: dict, staging: Path) -> Section:
    customers, digits = metrics["segment"], metrics["segment_digits"]
    comparison_png(
        [
            ("autoencoder + K-means (refined)", digits["accuracy"], True),
            ("autoencoder codes + K-means", digits["autoencoder_kmeans_accuracy"], True),
            ("K-means on raw pixels", digits["kmeans_accuracy"], False),
        ],
        "Digits without labels: matched accuracy",
        "accuracy",
        staging / "segment_digits.png",
    )
    profiles = _read_csv(root / "plots/segment/profiles.csv")
    headers = list(profiles[0]) if profiles else []
    return Section(
        "Unsupervised: segmentation",
        f"CDNOW customers ({customers['customers']}) in k={customers['k']} segments; the "
        "same method on the digits with their labels hidden.",
        runs=[("segment", _run(customers)), ("segment_digits", _run(digits))],
        figures=[
            ("digits: matched accuracy", _with_ci(digits, "accuracy")),
            ("digits: K-means on raw pixels", _with_ci(digits, "kmeans_accuracy")),
            ("customers: silhouette (features)", f"{customers['silhouette']:.3f}"),
            (
                "customers: silhouette (autoencoder codes)",
                f"{customers['autoencoder_silhouette']:.3f}",
            ),
            ("customers: stability over seeds (ARI)", f"{customers['stability_ari']:.3f}"),
            (
                "customers: agreement with scikit-learn (ARI)",
                f"{customers['sklearn_agreement_ari']:.3f}",
            ),
        ],
        images=[
            ("segment_digits.png", "digits: clustering accuracy beside raw K-means"),
            (_copy(root, "plots/segment/k_sweep.png", staging, "k_sweep.png"), "the k sweep"),
            (
                _copy(
                    root, "plots/segment/kmeans_projection.png", staging, "kmeans_projection.png"
                ),
                "K-means on the features (PCA projection)",
            ),
            (
                _copy(
                    root, "plots/segment/autoencoder_projection.png", staging, "ae_projection.png"
                ),
                "K-means on autoencoder codes (PCA projection)",
            ),
        ],
        table=(headers, [[row[h] for h in headers] for row in profiles]),
    )


def search(root: Path, metrics: dict, staging: Path) -> Section:
    figures = metrics["tune"]
    best: dict[str, float] = {}
    for row in _read_csv(root / "artifacts/tune/results.csv"):
        if row["val_accuracy"]:
            best[row["optimizer"]] = max(
                best.get(row["optimizer"], 0.0), float(row["val_accuracy"])
            )
    ranked = sorted(best.items(), key=lambda item: -item[1])
    comparison_png(
        [(name, value, name == figures["best_optimizer"]) for name, value in ranked],
        "Search: best validation accuracy per optimizer",
        "validation accuracy",
        staging / "tune_per_optimizer.png",
    )
    return Section(
        "Search: optimizers and learning rates",
        f"{figures['trials']} trials ({figures['search']} search, {figures['scheduler']} "
        f"scheduler): {figures['trials_stopped_early']} stopped early, "
        f"{figures['trials_diverged']} diverged.",
        runs=[("tune", _run(figures))],
        figures=[
            ("best", f"{figures['best_optimizer']} at lr {figures['best_lr']:.3g}"),
            ("its validation accuracy", _with_ci(figures, "best_val_accuracy")),
            ("epochs trained in all", str(figures["epochs_total"])),
        ],
        images=[
            ("tune_per_optimizer.png", "best validation accuracy per optimizer"),
            (
                _copy(root, "plots/tune/lr_sweep.png", staging, "lr_sweep.png"),
                "learning-rate sweep",
            ),
            (
                _copy(root, "plots/tune/best_curves.png", staging, "best_curves.png"),
                "best trial per optimizer: curves",
            ),
        ],
    )


def time_series(metrics: dict, staging: Path) -> Section:
    table = metrics["timeseries"]
    networks = [k for k, v in table.items() if tracking.RUN_ID_KEY in v or "epochs_run" in v]
    comparison_png(
        [(name, row["test_accuracy"], name in networks) for name, row in table.items()],
        "Time series: test accuracy",
        "accuracy",
        staging / "timeseries.png",
    )
    return Section(
        "Supervised: time series",
        "Recurrent networks on Ray Train beside aeon's distance and convolution-kernel baselines.",
        runs=[(name, _run(table[name])) for name in networks],
        figures=[(name, _with_ci(row, "test_accuracy")) for name, row in table.items()],
        images=[("timeseries.png", "test accuracy: networks (blue) and baselines (grey)")],
    )


def generative(root: Path, metrics: dict, staging: Path) -> Section:
    table = metrics["generate"]
    comparison_png(
        [(name, row["fid"], name in ("vae", "gan")) for name, row in table.items()],
        "Generated digits: Fréchet distance to real ones",
        "FID",
        staging / "generate_fid.png",
        lower_is_better=True,
    )
    return Section(
        "Generative: VAE and GAN",
        "Samples judged by the supervised CNN's features: held-out real digits are the floor, "
        "uniform noise the ceiling.",
        runs=[(name, _run(table[name])) for name in ("vae", "gan")],
        figures=[
            (f"{name}: FID / mean confidence", f"{row['fid']:.1f} / {row['mean_confidence']:.3f}")
            for name, row in table.items()
        ],
        images=[
            ("generate_fid.png", "Fréchet distance (lower is better)"),
            (
                _copy(
                    root, "artifacts/generate/models/vae/samples.png", staging, "vae_samples.png"
                ),
                "VAE samples",
            ),
            (
                _copy(
                    root, "artifacts/generate/models/gan/samples.png", staging, "gan_samples.png"
                ),
                "GAN samples",
            ),
        ],
    )


def serving_section(results: dict, staging: Path) -> Section:
    clients = "32"
    rows = [
        (name, by_clients[clients]["rps"], name == "dlpipe")
        for name, by_clients in results.items()
        if clients in by_clients
    ]
    comparison_png(
        rows, f"Serving: requests/s at {clients} clients", "requests/s", staging / "serving.png"
    )
    return Section(
        "Serving: throughput",
        "benchmarks/serving_throughput.py (median of 3 rounds, this machine); not a DVC stage.",
        figures=[
            (
                f"{name}: requests/s, p99",
                f"{by[clients]['rps']:.0f}, {by[clients]['p99_ms']:.1f} ms",
            )
            for name, by in results.items()
            if clients in by
        ],
        images=[("serving.png", f"requests/s at {clients} clients")],
    )


def _render(sections: list[Section], dashboard: str) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    environment = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,
    )
    return environment.get_template("index.html.j2").render(
        sections=sections, dashboard=dashboard.rstrip("/")
    )


if __name__ == "__main__":
    stage_command(report, name=STAGE)
