"""Stage `train_pseudolabel`: semi-supervised training by pseudo-labeling, on Ray Train.

Round 0 trains a teacher on the labeled examples. Each later round predicts the unlabeled
pool (on the Train workers), keeps the confident predictions (capped per class) as
pseudo-labels, and trains a fresh student on labeled + pseudo-labeled data, the pseudo-labels'
loss weight ramping up over the first epochs; the student teaches the next round. A
supervised-only baseline gets the same labeled examples and trains as long as the method
(the same epochs as the rounds; beside FixMatch, as many labeled batches: `matched_epochs`).
Every round is a run of the same Ray Train driver as `train_supervised`, and a child MLflow
run of this stage's run. The final student is saved in the supervised model format, so the
`evaluate` and `export` stages (and the classify endpoint) take it unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch

from models.architecture import ArchitectureConfig
from pipelines.semisupervised.config import PseudoLabelConfig
from pipelines.semisupervised.pseudo_labels import select_pseudo_labels, selection_stats
from pipelines.stagekit import tracking
from pipelines.stagekit.atomic import output_directory, write_json
from pipelines.stagekit.config import Param, TrainConfig, config_to_dict
from pipelines.stagekit.dataset import PreparedData, load_prepared
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.metrics import (
    accuracy_figures,
    classification_metrics,
    small_split_warnings,
)
from pipelines.stagekit.model_bundle import (
    build_model,
    check_compatible,
    inference_model,
    save_bundle,
)
from pipelines.stagekit.plots import learning_curves_png, write_csv
from pipelines.stagekit.stage import stage_command
from pipelines.training.driver import (
    RunDiverged,
    run_name,
    supervised_task,
    train_job,
)
from pipelines.training.loop import without_timings
from pipelines.training.tasks import FixMatchTask, Task
from pipelines.training.worker import EVAL_BATCH_SIZE

log = logging.getLogger(__name__)

STAGE = "train_pseudolabel"
# Every round sets these itself (from `pseudolabel`): the stage reads the rest of `train`.
ROUND_SETS = ("epochs", "batch_size", "early_stopping_patience", "lr_schedule")
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in ROUND_SETS)
# What this stage reads of `pseudolabel` (the split keys are prepare_pseudolabel's).
ROUND_KEYS = (
    "method",
    "unlabeled_ratio",
    "unlabeled_weight",
    "ema_decay",
    "fixmatch_epochs",
    "lr_schedule",
    "rounds",
    "epochs_per_round",
    "batch_size",
    "confidence_threshold",
    "max_per_class",
    "pseudo_weight",
    "ramp_epochs",
    "experiment",
)
ROUND_COLUMNS = (
    "round",
    "pseudo_labels",
    "pseudo_label_accuracy",
    "class_balance",
    "mean_confidence",
    "test_accuracy",
    "test_macro_f1",
)


@dataclass
class RoundResult:
    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    predictions: np.ndarray | None


def round_train_config(
    train: TrainConfig, pseudolabel: PseudoLabelConfig, epochs: int
) -> TrainConfig:
    """`train` as a run of this stage uses it: the ROUND_SETS keys from `pseudolabel` (no
    early stopping: the labeled validation split is small) and `epochs` long."""
    pl = pseudolabel
    return dataclasses.replace(
        train,
        epochs=epochs,
        batch_size=pl.batch_size,
        early_stopping_patience=0,
        lr_schedule=pl.lr_schedule,
        # FixMatch's moving average of the weights, for the method and its baseline alike.
        ema_decay=pl.ema_decay if pl.method == "fixmatch" else train.ema_decay,
    )


def fixmatch_epochs(pseudolabel: PseudoLabelConfig) -> int:
    """FixMatch's length: its own setting, or as long as the teacher/student schedule."""
    pl = pseudolabel
    return pl.fixmatch_epochs or pl.epochs_per_round * (pl.rounds + 1)


def train_round(
    model: ArchitectureConfig,
    train: TrainConfig,
    pseudolabel: PseudoLabelConfig,
    data: PreparedData,
    label: str,
    arrays: dict[str, np.ndarray],
    epochs: int,
    parent: tracking.RunLogger,
    extra_params: dict[str, Any],
    task: Task | None = None,
) -> RoundResult:
    """One Ray Train run (teacher, student, baseline or FixMatch), tracked as a child MLflow
    run; `train` needs every key but ROUND_SETS, which the round sets. `task` defaults to
    supervised training on `arrays` (pseudo-labeled examples weighted as `pseudolabel` says)."""
    pl = pseudolabel
    train = round_train_config(train, pl, epochs)
    pseudo = (
        {"weight": pl.pseudo_weight, "ramp_epochs": pl.ramp_epochs}
        if "pseudo_train" in arrays
        else None
    )
    name = run_name(
        f"{STAGE}-{label}",
        config_to_dict(model),
        config_to_dict(train),
        config_to_dict(pl),
        data.data_hash,
        {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in arrays.items() if k != "x_predict"},
    )
    tags = {**tracking.stage_tags(STAGE, data.data_hash), "round": label}
    with tracking.stage_run(pl.experiment, label, tags, parent_run_id=parent.run_id) as run:
        run.log_params(
            {"train": config_to_dict(train), "examples": len(arrays["y_train"]), **extra_params}
        )
        unlabeled = len(arrays.get("x_unlabeled", ()))
        log.info(
            "%s: training on %d labeled%s examples for %d epochs",
            label,
            len(arrays["y_train"]),
            f" and {unlabeled} unlabeled" if unlabeled else "",
            epochs,
        )
        try:
            finished = train_job(
                arrays,
                task or supervised_task(model, data.manifest, train, pseudo),
                train,
                name,
                run,
            )
        except RunDiverged as exc:
            raise RunDiverged(f"{label}: {exc}") from None
    # No early stopping on the (small) labeled validation data: the last epoch is kept, as
    # its moving average where the run keeps one (pseudolabel.ema_decay).
    weights = finished.state.get("average") or finished.state["model"]
    return RoundResult(weights, finished.state["history"], finished.predictions)


def score_on_test(
    model: ArchitectureConfig, data: PreparedData, state_dict: dict
) -> dict[str, float]:
    network = build_model(model, data.manifest)
    network.load_state_dict(state_dict)
    classifier = inference_model(network, "classification")
    x_test = torch.from_numpy(data.x("test"))
    with torch.no_grad():  # in chunks: a large image test set need not fit in one batch
        probabilities = torch.cat(
            [
                classifier(x_test[i : i + EVAL_BATCH_SIZE])
                for i in range(0, len(x_test), EVAL_BATCH_SIZE)
            ]
        )
    metrics, _ = classification_metrics(data.y("test"), probabilities.numpy(), data.class_names)
    # The overall figures with their intervals; the per-class ones are evaluate's.
    return {k: v for k, v in metrics.items() if "/" not in k}


@dataclass
class Rounds:
    first_teacher: RoundResult | None
    """Round 0's teacher (None for fixmatch, which has no teacher)."""
    final: RoundResult
    table: list[dict[str, float]]
    """One row per round: pseudo-label count, accuracy and balance, test figures."""
    baseline_epochs: int
    """Epochs of the supervised-only baseline beside this method: as long as it, on the
    labeled examples alone."""
    fallback_round: int = 0
    """The round in which no prediction reached the threshold (0: none); the model trained
    before it was kept."""


def run_rounds(
    model: ArchitectureConfig,
    train: TrainConfig,
    pseudolabel: PseudoLabelConfig,
    data: PreparedData,
    parent: tracking.RunLogger,
    labeled_only: dict[str, np.ndarray],
    truth: np.ndarray | None,
) -> Rounds:
    """Round 0's teacher, then `pseudolabel.rounds` students, each taught by the previous model."""
    pl = pseudolabel
    pool = data.x("unlabeled")
    # Only a model that will teach a next round needs to predict the pool.
    teach = {"x_predict": pool} if pl.rounds > 0 else {}
    teacher = train_round(
        model,
        train,
        pl,
        data,
        "round-0-teacher",
        {**labeled_only, **teach},
        pl.epochs_per_round,
        parent,
        {"round": 0},
    )
    outcome = Rounds(
        teacher,
        teacher,
        [{"round": 0, **score_on_test(model, data, teacher.state_dict)}],
        # As many epochs as the whole schedule (teacher and every student).
        baseline_epochs=pl.epochs_per_round * (pl.rounds + 1),
    )
    for number in range(1, pl.rounds + 1):
        selection = select_pseudo_labels(
            outcome.final.predictions, pl.confidence_threshold, pl.max_per_class
        )
        stats = selection_stats(selection, data.class_names, truth)
        parent.log_metrics({k: v for k, v in stats.items() if "/" not in k}, step=number)
        if len(selection.indices) == 0:
            log.warning(
                "round %d: no prediction reaches confidence %.2f; keeping the teacher of "
                "round %d as the final model",
                number,
                pl.confidence_threshold,
                number - 1,
            )
            parent.set_tags({"fallback_to_teacher": f"round {number}"})
            outcome.table.append({"round": number, **stats})
            outcome.fallback_round = number
            break
        log.info(
            "round %d: %d pseudo-labels (accuracy %s, class balance %.2f)",
            number,
            len(selection.indices),
            f"{stats['pseudo_label_accuracy']:.3f}" if truth is not None else "unknown",
            stats["class_balance"],
        )
        labeled = len(labeled_only["y_train"])
        arrays = {
            **labeled_only,
            "x_train": np.concatenate([labeled_only["x_train"], pool[selection.indices]]),
            "y_train": np.concatenate([labeled_only["y_train"], selection.labels]),
            "pseudo_train": np.arange(labeled + len(selection.indices)) >= labeled,
            **({"x_predict": pool} if number < pl.rounds else {}),
        }
        outcome.final = train_round(
            model,
            train,
            pl,
            data,
            f"round-{number}-student",
            arrays,
            pl.epochs_per_round,
            parent,
            {"round": number, **stats},
        )
        outcome.table.append(
            {"round": number, **stats, **score_on_test(model, data, outcome.final.state_dict)}
        )
    return outcome


def run_fixmatch(
    model: ArchitectureConfig,
    train: TrainConfig,
    pseudolabel: PseudoLabelConfig,
    data: PreparedData,
    parent: tracking.RunLogger,
    labeled_only: dict[str, np.ndarray],
    truth: np.ndarray | None,
) -> Rounds:
    """One FixMatch run over the labeled examples and the whole pool, `fixmatch_epochs(pl)`
    long; its final predictions on the pool show how many unlabeled examples it now labels
    confidently (and, where the truth is known, how well)."""
    pl = pseudolabel
    weak = dataclasses.replace(train.augment, enabled=True)
    task = FixMatchTask(
        model,
        data.manifest,
        weak,
        weak.strong(),
        pl.confidence_threshold,
        pl.unlabeled_ratio,
        pl.unlabeled_weight,
    )
    pool = data.x("unlabeled")
    epochs = fixmatch_epochs(pl)
    result = train_round(
        model,
        train,
        pl,
        data,
        "fixmatch",
        {**labeled_only, "x_unlabeled": pool, "x_predict": pool},
        epochs,
        parent,
        {"round": "fixmatch", "unlabeled": len(pool), "weak_augment": config_to_dict(weak)},
        task,
    )
    selection = select_pseudo_labels(result.predictions, pl.confidence_threshold, pl.max_per_class)
    stats = selection_stats(selection, data.class_names, truth)
    parent.log_metrics({k: v for k, v in stats.items() if "/" not in k}, step=1)
    row = {"round": 1, **stats, **score_on_test(model, data, result.state_dict)}
    baseline = matched_epochs(
        len(labeled_only["y_train"]), len(pool), pl, train.num_workers, epochs
    )
    return Rounds(None, result, [row], baseline_epochs=baseline)


def matched_epochs(
    labeled: int, pool: int, pseudolabel: PseudoLabelConfig, workers: int, epochs: int
) -> int:
    """Epochs over the `labeled` examples alone that take about as many labeled batches as
    `epochs` FixMatch epochs do. A FixMatch epoch is one pass over the `pool` (a labeled
    batch beside every `unlabeled_ratio` unlabeled ones), so with a pool far larger than the
    labels it holds many passes over them: a baseline given the same number of epochs would
    have trained on a fraction of the labeled batches (a third with 60 digit labels, an
    eighth with 1,000 Fashion-MNIST labels beside 60,000 images), and its figure would
    flatter the method."""
    pl = pseudolabel

    def steps(examples: int, batch: int) -> int:
        per_worker = -(-examples // workers)
        return max(1, -(-per_worker // batch))

    fixmatch_batches = epochs * steps(pool, pl.batch_size * pl.unlabeled_ratio)
    return max(epochs, round(fixmatch_batches / steps(labeled, pl.batch_size)))


def summary_figures(
    model: ArchitectureConfig, data: PreparedData, rounds: Rounds, baseline: RoundResult
) -> dict:
    """The stage's headline figures: the final student beside the round-0 teacher and the baseline."""
    # The pseudo-labels the final model was trained on (a fallback round's empty set is not).
    last_selection = next((r for r in reversed(rounds.table) if r.get("pseudo_labels")), {})
    teacher = rounds.first_teacher
    figures = {
        "labeled_count": len(data.y("labeled")),
        "unlabeled_count": len(data.x("unlabeled")),
        **score_on_test(model, data, rounds.final.state_dict),
        **{
            f"teacher_{k}": v
            for k, v in (score_on_test(model, data, teacher.state_dict) if teacher else {}).items()
        },
        **{f"baseline_{k}": v for k, v in score_on_test(model, data, baseline.state_dict).items()},
        "pseudo_labels": last_selection.get("pseudo_labels", 0.0),
        "baseline_epochs": rounds.baseline_epochs,
        "fell_back_to_teacher": rounds.fallback_round > 0,
        "fallback_round": rounds.fallback_round,
    }
    if "pseudo_label_accuracy" in last_selection:
        figures.update(
            accuracy_figures(
                "pseudo_label_accuracy",
                round(last_selection["pseudo_label_accuracy"] * last_selection["pseudo_labels"]),
                int(last_selection["pseudo_labels"]),
            )
        )
    return figures


def train_pseudolabel(
    model: Annotated[ArchitectureConfig, Param("model")],
    train: Annotated[TrainConfig, Param("train", reads=TRAIN_KEYS)],
    pseudolabel: Annotated[PseudoLabelConfig, Param("pseudolabel", reads=ROUND_KEYS)],
    data_dir: str = "data/prepared/pseudolabel",
    output: str = "artifacts/pseudolabel/model",
    metrics_path: str = "metrics/pseudolabel.json",
    plots_dir: str = "plots/pseudolabel",
) -> dict:
    data = load_prepared(data_dir)
    if "semi_supervised" not in data.manifest:
        raise UserError(f"{data_dir}: not a pseudo-label split; run prepare_pseudolabel first")
    check_compatible(model, train, data.manifest)
    pl = pseudolabel
    if pl.method == "fixmatch" and data.manifest["input_kind"] != "image":
        raise UserError(
            "pseudolabel.method fixmatch needs images (it trains on augmented views); "
            f"the prepared data is {data.manifest['input_kind']}: use teacher_student"
        )
    truth = (
        data.y("unlabeled") if data.manifest["semi_supervised"]["unlabeled_truth_known"] else None
    )
    labeled_only = {
        "x_train": data.x("labeled"),
        "y_train": data.y("labeled"),
        "x_val": data.x("val"),
        "y_val": data.y("val"),
    }
    with tracking.stage_run(
        pl.experiment, STAGE, tracking.stage_tags(STAGE, data.data_hash)
    ) as parent:
        parent.log_params(
            {
                "pseudolabel": config_to_dict(pl),
                "model": config_to_dict(model),
                "train": config_to_dict(train),
                "labeled": len(data.y("labeled")),
                "unlabeled": len(data.x("unlabeled")),
            }
        )
        method = run_fixmatch if pl.method == "fixmatch" else run_rounds
        rounds = method(model, train, pl, data, parent, labeled_only, truth)
        # Same labeled examples, trained as long as the method (see Rounds.baseline_epochs).
        baseline = train_round(
            model,
            train,
            pl,
            data,
            "baseline-supervised-only",
            labeled_only,
            rounds.baseline_epochs,
            parent,
            {"round": "baseline"},
        )
        figures = summary_figures(model, data, rounds, baseline)
        parent.log_metrics({k: float(v) for k, v in figures.items()})
        parent.set_tags({"method": pl.method})
        warnings = small_split_warnings(data.manifest["splits"])
        for warning in warnings:
            log.warning(warning)
        figures.update(method=pl.method, warnings=warnings)

        network = build_model(model, data.manifest)
        network.load_state_dict(rounds.final.state_dict)
        with output_directory(output) as staging:
            model_file = save_bundle(
                staging,
                network,
                model,
                data.manifest,
                extra={"history": without_timings(rounds.final.history), "rounds": rounds.table},
            )
            tracking.tag_output(parent, model_file)
            learning_curves_png(rounds.final.history, staging / "learning_curves.png")
        write_csv(Path(plots_dir) / "rounds.csv", rounds.table, ROUND_COLUMNS)
        write_json(metrics_path, {**figures, tracking.RUN_ID_KEY: parent.run_id})
        parent.log_artifact(Path(output) / "learning_curves.png", "plots")
    teacher = (
        f"round-0 teacher {figures['teacher_test_accuracy']:.4f}, "
        if "teacher_test_accuracy" in figures
        else ""
    )
    log.info(
        "%s: final model test accuracy %.4f (%ssupervised-only baseline %.4f)",
        pl.method,
        figures["test_accuracy"],
        teacher,
        figures["baseline_test_accuracy"],
    )
    return figures


if __name__ == "__main__":
    stage_command(train_pseudolabel, name=STAGE)
