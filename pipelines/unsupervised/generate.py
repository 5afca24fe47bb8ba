"""Stage `generate`: a VAE and a DCGAN learn to draw the digits, and the digits classifier
judges their drawings.

Both train on Ray Train (the GAN's generator and discriminator take turns in one worker
loop, each with its own optimizer, data-parallel over the workers: see
pipelines/training/generative.py), each as its own MLflow run with its loss curves and a
grid of samples every `generate.sample_every` epochs. Then `train_supervised`'s classifier
scores samples of each beside held-out real digits (the floor) and uniform noise (the
ceiling): Fréchet distance on its penultimate features, its mean confidence and the spread
of its predicted classes (sample_quality.py). Writes `metrics/generate.json`:
`{"vae": {"fid", "mean_confidence", "class_entropy", ...}, "gan": {...}, "real": {...},
"noise": {...}}` and one model file per network for `export_generate`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch

from pipelines.stagekit import tracking
from pipelines.stagekit.atomic import output_directory, write_json
from pipelines.stagekit.config import Param, TrainConfig, config_to_dict
from pipelines.stagekit.dataset import PreparedData, load_prepared
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.model_bundle import load_trained
from pipelines.stagekit.plots import sample_grid_png
from pipelines.stagekit.stage import stage_command
from pipelines.training.driver import (
    interrupted_run,
    remember_run,
    run_name,
    supervised_arrays,
    train_job,
)
from pipelines.training.loop import without_timings
from pipelines.training.tasks import GanTask, GenerativeTask, VaeTask, latent_samples
from pipelines.unsupervised.config import GenerateConfig
from pipelines.unsupervised.generator_model import save_generator
from pipelines.unsupervised.sample_quality import classifier_features, judge

log = logging.getLogger(__name__)

STAGE = "generate"


def image_digits(data_dir: str) -> PreparedData:
    """The prepared images, checked to be what both networks model: pixels in [0, 1]."""
    data = load_prepared(data_dir)
    if data.manifest["input_kind"] != "image":
        raise UserError(f"{data_dir}: the generative models draw images; these are not")
    x = data.x("train")
    if x.min() < 0.0 or x.max() > 1.0:
        raise UserError(
            f"{data_dir}: pixels must lie in [0, 1] (the models' sigmoid outputs), found "
            f"{x.min():.3g}..{x.max():.3g}"
        )
    return data


def train_generator(
    kind: str,
    task: GenerativeTask,
    train: TrainConfig,
    data: PreparedData,
    experiment: str,
    directory: Path,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train `task` on Ray Train as its own MLflow run; save its model file and last sample
    grid in `directory`. Returns the trained network and its training figures."""
    name = run_name(STAGE, kind, config_to_dict(task.config), config_to_dict(train), data.data_hash)
    tags = {**tracking.stage_tags(STAGE, data.data_hash), "model_kind": kind}
    with tracking.stage_run(
        experiment, f"{STAGE}-{kind}", tags, resume_run_id=interrupted_run(name)
    ) as run:
        remember_run(name, run.run_id)
        run.log_params({kind: config_to_dict(task.config), "train": config_to_dict(train)})
        log.info(
            "training the %s on %d worker(s): mlflow run %s", kind, train.num_workers, run.run_id
        )
        started = time.perf_counter()
        state = train_job(
            supervised_arrays(data), task, train, name, run, lr_key=f"generate.{kind}_train.lr"
        ).state
        job_s = time.perf_counter() - started
        model = task.build_model()
        model.load_state_dict(state["best_model"] if task.best_by_validation else state["model"])
        history = state["history"]
        directory.mkdir(parents=True)
        model_file = save_generator(
            directory, kind, model, task.image_shape, without_timings(history)
        )
        tracking.tag_output(run, model_file)
        sample_grid_png(
            latent_samples(model, task.config.latent).numpy(), directory / "samples.png"
        )
        run.log_artifact(directory / "samples.png", "samples")
        figures = {
            "train_s": round(sum(h["epoch_seconds"] for h in history), 2),
            "job_s": round(job_s, 2),
            "epochs_run": len(history),
            tracking.RUN_ID_KEY: run.run_id,
        }
    return model.eval(), figures


def generate(
    config: Annotated[GenerateConfig, Param("generate")],
    data_dir: str = "data/prepared/supervised",
    classifier_dir: str = "artifacts/supervised/model",
    output: str = "artifacts/generate/models",
    metrics_path: str = "metrics/generate.json",
) -> dict[str, dict[str, float]]:
    data = image_digits(data_dir)
    classifier, _ = load_trained(classifier_dir, data.manifest)
    shape = tuple(data.input_shape)
    tasks = {
        "vae": (VaeTask(config.vae, shape, config.sample_every), config.vae_train),
        "gan": (GanTask(config.gan, shape, config.sample_every), config.gan_train),
    }
    # Every set is judged at the held-out digits' count: the Fréchet distance of a finite
    # sample is biased by its size, so sets of one size compare fairly.
    held_out = np.concatenate([data.x("val"), data.x("test")])
    reference, _ = classifier_features(classifier, data.x("train"))
    noise = np.random.default_rng(config.vae_train.seed).random(held_out.shape, dtype=np.float32)
    table: dict[str, dict[str, float]] = {
        "real": judge(classifier, reference, held_out),
        "noise": judge(classifier, reference, noise),
    }
    with output_directory(output) as staging:
        for kind, (task, train) in tasks.items():
            model, figures = train_generator(
                kind, task, train, data, config.experiment, staging / kind
            )
            latents = torch.randn(
                len(held_out),
                task.config.latent,
                generator=torch.Generator().manual_seed(train.seed),
            )
            with torch.no_grad():
                samples = model.generate(latents).numpy()
            table[kind] = {**judge(classifier, reference, samples), **figures}
    for name, row in table.items():
        log.info(
            "%-5s FID %7.2f  mean confidence %.3f  class entropy %.2f bits",
            name,
            row["fid"],
            row["mean_confidence"],
            row["class_entropy"],
        )
    write_json(metrics_path, table)
    return table


if __name__ == "__main__":
    stage_command(generate, name=STAGE)
