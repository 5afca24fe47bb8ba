"""params.yaml section of the semi-supervised stages: `pseudolabel`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipelines.stagekit.config import LrSchedule, Section


@dataclass(frozen=True, repr=False)
class PseudoLabelConfig(Section):
    labeled_fraction: float = 0.05
    """Share of each class's training examples that keep their label (the rest become the
    unlabeled pool, their labels held aside for evaluation only). Ignored with `unlabeled_source`."""
    labeled_per_class: int = 0
    """When > 0, keep exactly this many labels per class instead of `labeled_fraction`."""
    unlabeled_source: str = ""
    """Your own unlabeled data: a folder of images (any layout) or a CSV with the feature
    columns. Empty: split the prepared training data as above."""
    split_seed: int = 0
    """Seed choosing which training examples keep their labels."""
    method: Literal["teacher_student", "fixmatch"] = "fixmatch"
    """teacher_student: rounds of a teacher labeling the pool for a fresh student (below).
    fixmatch: one run in which, at every step, the prediction on a weakly augmented view of
    each unlabeled image (where confident) is the target of a strongly augmented view of
    it, beside the labeled loss; images only, its augmentation from `train.augment`."""
    unlabeled_ratio: int = 7
    """fixmatch: unlabeled images per labeled one in each step (each seen in two views)."""
    unlabeled_weight: float = 1.0
    """fixmatch: weight of the unlabeled (consistency) loss beside the labeled one."""
    ema_decay: float = 0.0
    """fixmatch: decay of the moving average of the weights that is validated and kept
    (`train.ema_decay`, 0: off), for the method and its supervised-only baseline alike."""
    fixmatch_epochs: int = 0
    """fixmatch: epochs of its one run, an epoch being one pass over the unlabeled pool
    (0: as long as the teacher/student schedule, (rounds + 1) x epochs_per_round). With 60
    digit labels, 360 instead of 120 took test accuracy from 0.963 and 0.956 to 0.970 and
    0.974 (seeds 1 and 2, one run each, cosine schedule, ema_decay 0.99)."""
    lr_schedule: LrSchedule = "constant"
    """Learning-rate schedule of every run of this stage (teacher, student, FixMatch and the
    baseline), in place of `train.lr_schedule`: a long FixMatch run ends at a small rate
    (the FixMatch paper decays it with a cosine too)."""
    rounds: int = 3
    """Teacher -> student rounds after the first teacher; each student teaches the next round."""
    epochs_per_round: int = 30
    """Epochs of every teacher and student. The supervised-only baseline trains as long as
    the method: (rounds + 1) times this beside teacher_student, and as many labeled batches
    as fixmatch took beside it (with 60 labels and 1,197 unlabeled digits, about 3 passes
    over the labels per fixmatch epoch)."""
    batch_size: int = 8
    """Examples per step on each worker in every round (a few labeled examples need small
    batches to get enough steps); the other optimisation settings come from `train`, but
    for `lr_schedule` (above)."""
    confidence_threshold: float = 0.9
    """A prediction becomes a pseudo-label only when its top class probability reaches this
    (fixmatch: the weak view's prediction, at every step)."""
    max_per_class: int = 0
    """Most pseudo-labels any class may receive per round, the most confident first
    (0: the pool size divided by the number of classes, so no class can flood the set)."""
    pseudo_weight: float = 1.0
    """Loss weight of a pseudo-labeled example once ramped up (labeled examples weigh 1)."""
    ramp_epochs: int = 10
    """Epochs over which the pseudo-label weight rises linearly to `pseudo_weight`
    (pseudo_weight / ramp_epochs in the first epoch); 0 or 1: full weight at once."""
    registered_model: str = "dlpipe-pseudolabel-classifier"
    """MLflow registry name of the final student (exported like the supervised model)."""
    experiment: str = "dlpipe-pseudolabel"
    """MLflow experiment: a parent run per stage execution, a child run per round."""

    def __post_init__(self) -> None:
        if not 0.0 < self.labeled_fraction < 1.0:
            raise ValueError(
                f"labeled_fraction must be between 0 and 1, got {self.labeled_fraction}"
            )
        if not 0.0 < self.confidence_threshold <= 1.0:
            raise ValueError(
                f"confidence_threshold must be in (0, 1], got {self.confidence_threshold}"
            )
        for name in (
            "labeled_per_class",
            "rounds",
            "max_per_class",
            "ramp_epochs",
            "fixmatch_epochs",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("epochs_per_round", "batch_size", "unlabeled_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("pseudo_weight", "unlabeled_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
