"""Training throughput: dlpipe's Ray Train stage against a plain PyTorch loop, steady state.

The supervised stage's default network, optimizer and batch size (params.yaml `model` and
`train`, with `tuned_params` laid over them as the stage does) train on a real image set:
Fashion-MNIST (70,000 28x28 images) read from the IDX files of Debian's
`dataset-fashion-mnist` package through `prepare` (format `idx`, the reader users point at
MNIST-format files), or, where that package is not installed, the bundled 8x8 digits. Runs:

- `plain`: one process, no Ray: the stage's own per-process training (`initial_state` and
  `fit_task`, the same step, batches, validation and learning-rate schedule the Ray worker
  runs) with as many torch threads as a Ray Train worker gets (1: it reserves one CPU and
  Ray sets OMP_NUM_THREADS to it; checked on the cluster and reported);
- `ray1`, `ray2`: the `train_supervised` stage itself on 1 and 2 Ray Train workers (DDP,
  per-epoch checkpoint and report, MLflow logging), each on a Ray instance it starts.

Figures, from each epoch's metrics and the wall-clock time each epoch ended:
- samples/s: training examples per second of wall time over the epochs after the first
  (warm-up), everything the run does between them included (validation, reports,
  checkpoints);
- startup_s: from calling the stage to its first training step: MLflow run, loading the
  prepared data, Ray start, worker group, data shards through the object store, model
  build. The plain run's figure (data loading and model build only) is beside it;
- data_wait_fraction: the share of the training epochs' time spent waiting for the next
  batch (the loop's `data_wait_seconds` / `train_seconds`), the largest of the runs.

Where CUDA is available the plain loop and a 1-worker stage also run on the GPU with bf16
autocast (`train.amp`); without one that part is skipped with a note. Runs go to a
throw-away MLflow store and checkpoint folder. Run from the repository root (Fashion-MNIST:
10-15 minutes on 2 CPUs):

    python -m benchmarks.training_throughput     # writes benchmarks/results/training.json, .md

Ray starts locally (`RAY_ADDRESS=local`) unless RAY_ADDRESS names a cluster to join; do not
run it beside other Ray work on the same machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from benchmarks.scratch import machine, markdown_table, scratch_stores, write_results
from models.architecture import ArchitectureConfig
from pipelines.stagekit.config import TrainConfig, load_params, overlay_sections
from pipelines.stagekit.dataset import load_prepared
from pipelines.stagekit.readers import RawDataset
from pipelines.supervised.config import PrepareConfig, TrackingConfig
from pipelines.supervised.prepare import read_raw, write_prepared
from pipelines.supervised.train import train_supervised
from pipelines.training.driver import supervised_arrays, supervised_task
from pipelines.training.fitting import fit_task, initial_state

RESULTS = Path("benchmarks/results/training.json")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist
IDX_IMAGE_SIZE = (28, 28)  # MNIST-format sets are 28x28: trained at their own size
RUNS = ("plain", "ray1", "ray2")
PLAIN_THREADS = 1  # a Ray Train worker's share: it reserves 1 CPU by default
TARGET_RAY_1W = 0.9  # of the plain loop's samples/s
STEADY_SAMPLES = 30_000  # at least this many training examples after the warm-up epoch


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """What `train_supervised` reads from params.yaml: `model` and `train` with the
    `tuned_params` file laid over them (as the stage does), `tracking` and that file."""

    model: ArchitectureConfig
    train: TrainConfig
    tracking: TrackingConfig
    tuned_params: str


def stage_settings(params: str) -> StageSettings:
    arguments = load_params(train_supervised, params)
    tuned = overlay_sections(
        arguments["tuned_params"], {"model": arguments["model"], "train": arguments["train"]}
    )
    return StageSettings(
        tuned["model"], tuned["train"], arguments["tracking_config"], arguments["tuned_params"]
    )


def dataset(
    idx_dir: Path, limit: int | None, seed: int = 0
) -> tuple[str, PrepareConfig, RawDataset]:
    """The image set to train on, read by `prepare`'s own readers: `idx_dir`'s IDX files
    when it exists, else the bundled digits as params.yaml's defaults prepare them.
    `limit` keeps that many images (a seeded random subset) for a quick check."""
    if idx_dir.is_dir():
        name = idx_dir.name
        config = PrepareConfig(source=str(idx_dir), format="idx", image_size=IDX_IMAGE_SIZE)
    else:
        name, config = "digits", PrepareConfig()
        if not Path(config.source).is_dir():
            raise SystemExit(f"{config.source} not found: run `dvc repro prepare` first")
    raw = read_raw(config, config.source)
    if limit is not None and limit < len(raw.labels):
        keep = np.sort(np.random.default_rng(seed).permutation(len(raw.labels))[:limit])
        raw = dataclasses.replace(raw, features=raw.features[keep], labels=raw.labels[keep])
        name = f"{name} ({limit} of its images)"
    return name, config, raw


def steady_epochs(train_size: int) -> int:
    """Epochs to run: one of warm-up, then enough for STEADY_SAMPLES (at least two)."""
    return 1 + max(2, math.ceil(STEADY_SAMPLES / train_size))


def run_config(config: StageSettings, workers: int, device: str) -> StageSettings:
    """The stage's config for one run: on `workers` workers, every epoch (no early stop)."""
    train = dataclasses.replace(
        config.train, early_stopping_patience=0, num_workers=workers, device=device
    )
    return dataclasses.replace(config, train=train)


def epoch_figures(
    history: Sequence[dict[str, float]], epoch_ends: Sequence[float], started: float, samples: int
) -> dict:
    """A run's figures from its per-epoch metrics, the wall-clock time (s) each epoch ended
    and when the run was started; `samples` training examples make an epoch."""
    if len(history) < 2 or len(epoch_ends) != len(history):
        raise ValueError(f"{len(history)} epochs and {len(epoch_ends)} end times: need >= 2 each")
    steady = history[1:]
    window = epoch_ends[-1] - epoch_ends[0]
    first_step = epoch_ends[0] - history[0]["epoch_seconds"]
    waited = sum(m["data_wait_seconds"] for m in steady)
    return {
        "samples_per_s": round(samples * len(steady) / window, 1),
        "startup_s": round(first_step - started, 2),
        "data_wait_fraction": round(waited / sum(m["train_seconds"] for m in steady), 5),
        "epochs": len(history),
        "steady_s": round(window, 2),
        "epoch_seconds": [round(m["epoch_seconds"], 2) for m in history],
        "final_val_accuracy": round(history[-1].get("val_accuracy", float("nan")), 4),
    }


def plain_run(config: StageSettings, data_dir: Path, device: torch.device) -> dict:
    """The reference: the stage's per-process training in this process, without Ray."""
    started = time.time()
    data = load_prepared(data_dir)
    task = supervised_task(config.model, data.manifest, config.train)
    arrays = {name: torch.from_numpy(a) for name, a in supervised_arrays(data).items()}
    state = initial_state(task, config.train, lambda model: model.to(device))
    ends: list[float] = []

    def on_epoch_end(metrics: dict[str, float], _) -> None:
        ends.append(time.time())
        print(f"  plain epoch {len(ends)}/{config.train.epochs}: {metrics['epoch_seconds']:.1f} s")

    fit_task(state, task, arrays, config.train, device, on_epoch_end=on_epoch_end)
    return epoch_figures(state.history, ends, started, len(arrays["x_train"]))


def ray_worker_threads() -> int:
    """Torch's intra-op threads in a task holding one CPU, as each Train worker does."""
    import ray

    return ray.get(ray.remote(num_cpus=1)(_torch_threads).remote())


def _torch_threads() -> int:
    return torch.get_num_threads()


def logged_epochs(run_id: str) -> tuple[list[dict[str, float]], list[float]]:
    """The run's per-epoch timings as rank 0 logged them to MLflow (the model file keeps no
    timings), and when each epoch's metrics were logged (unix s): as each epoch ended."""
    from mlflow.tracking import MlflowClient

    from pipelines.stagekit.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    series = {
        key: {m.step: m for m in client.get_metric_history(run_id, key)}
        for key in ("epoch_seconds", "train_seconds", "data_wait_seconds", "val_accuracy")
    }
    steps = sorted(series["epoch_seconds"])
    history = [{key: values[step].value for key, values in series.items()} for step in steps]
    ends = [series["epoch_seconds"][step].timestamp / 1000 for step in steps]
    return history, ends


def ray_run(
    config: StageSettings, data_dir: Path, workdir: Path, name: str, train_size: int
) -> dict:
    """The `train_supervised` stage as `dvc repro` runs it, on a Ray instance of its own."""
    import ray

    from pipelines.stagekit import tracking
    from pipelines.stagekit.model_bundle import MODEL_FILE

    out = workdir / name
    # Creating the scratch MLflow store is a one-off of this benchmark, not stage start-up.
    tracking.ensure_experiment(config.tracking.experiment)
    started = time.time()
    # The stage lays `tuned_params` over model and train itself, as under `dvc repro`.
    train_supervised(
        config.model,
        config.train,
        config.tracking,
        config.tuned_params,
        data_dir=str(data_dir),
        output=str(out / "model"),
        metrics_path=str(out / "metrics.json"),
        plots_dir=str(out / "plots"),
    )
    stage_s = time.time() - started
    threads = ray_worker_threads()
    ray.shutdown()  # the next run starts its own Ray, so its start-up is measured whole
    run_id = tracking.producing_run(out / "model" / MODEL_FILE, config.tracking.experiment)
    if run_id is None:
        raise RuntimeError(f"no MLflow run wrote {out / 'model' / MODEL_FILE}")
    history, ends = logged_epochs(run_id)
    figures = epoch_figures(history, ends, started, train_size)
    return {**figures, "stage_s": round(stage_s, 1), "worker_torch_threads": threads}


LABELS = {
    "plain": ("plain PyTorch loop (reference)", 1),
    "ray1": ("dlpipe train_supervised, Ray Train", 1),
    "ray2": ("dlpipe train_supervised, Ray Train", 2),
}


def measure(
    selected: Sequence[str],
    config: StageSettings,
    data_dir: Path,
    workdir: Path,
    train_size: int,
    device: str,
) -> dict[str, dict]:
    """The `selected` runs on `device`: cpu, or gpu (one per worker; bf16 with train.amp)."""
    runs: dict[str, dict] = {}
    for run in selected:
        label, workers = LABELS[run]
        if device == "gpu" and workers > torch.cuda.device_count():
            continue  # each Ray Train worker takes a GPU of its own
        print(f"{label}, {workers} worker(s), {device} ...", flush=True)
        run_cfg = run_config(config, workers, device)
        if run == "plain":
            torch_device = torch.device("cuda" if device == "gpu" else "cpu")
            runs[run] = plain_run(run_cfg, data_dir, torch_device)
        else:
            runs[run] = ray_run(run_cfg, data_dir, workdir, f"{run}-{device}", train_size)
        print(f"  {runs[run]['samples_per_s']:.0f} samples/s", flush=True)
    return runs


def summary(runs: dict[str, dict]) -> dict:
    """The issue's figures from the runs measured (None for a run not measured)."""
    rate = {run: runs[run]["samples_per_s"] if run in runs else None for run in RUNS}
    plain, ray1, ray2 = rate["plain"], rate["ray1"], rate["ray2"]
    ratio_1w = round(ray1 / plain, 3) if plain and ray1 else None
    target = None if ratio_1w is None else ("met" if ratio_1w >= TARGET_RAY_1W else "MISSED")
    return {
        "plain_samples_per_s": plain,
        "ray_1w_samples_per_s": ray1,
        "ray_2w_samples_per_s": ray2,
        "startup_s": runs["ray1"]["startup_s"] if "ray1" in runs else None,
        "data_wait_fraction": max((r["data_wait_fraction"] for r in runs.values()), default=None),
        "ray_1w_vs_plain": ratio_1w,
        "ray_2w_vs_plain": round(ray2 / plain, 3) if plain and ray2 else None,
        "target_ray_1w_ge_90pct_plain": target,
    }


def gpu_part(selected: Sequence[str], config: StageSettings, *where) -> dict:
    """The runs on CUDA with bf16 autocast, or the note saying why there are none."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine: the GPU runs were skipped"}
    runs = measure(selected, config, *where, "gpu")
    return {
        "device": torch.cuda.get_device_name(),
        "amp_bf16": config.train.amp,
        **summary(runs),
        "runs": runs,
        "mlm_mfu": None,
        "mlm_mfu_note": "the MLM stage's model FLOPs utilization is not measured yet",
    }


def table_rows(runs: dict[str, dict], device: str) -> list[tuple]:
    """One row per run; `vs plain` against the plain run on the same device."""
    figures = summary(runs)
    plain = figures["plain_samples_per_s"]
    rows = []
    for run, f in runs.items():
        label, workers = LABELS[run]
        target = figures["target_ray_1w_ge_90pct_plain"] if run == "ray1" else None
        rows.append(
            (
                label,
                device,
                workers,
                f"{f['samples_per_s']:.0f}",
                f"{f['samples_per_s'] / plain:.2f}" if plain else "n/a",
                f"{f['startup_s']:.1f}",
                f"{100 * f['data_wait_fraction']:.2f}%",
                {None: "", "met": "met", "MISSED": "**MISSED**"}[target],
            )
        )
    return rows


def table(runs: dict[str, dict], gpu: dict) -> str:
    rows = table_rows(runs, "cpu")
    if "runs" in gpu:
        rows += table_rows(gpu["runs"], f"{gpu['device']}, bf16" if gpu["amp_bf16"] else "cuda")
    header = (
        "run",
        "device",
        "workers",
        "samples/s",
        "vs plain",
        "startup s",
        "data wait",
        f"1 worker >= {TARGET_RAY_1W:.0%} of plain",
    )
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--idx", default=str(FASHION_MNIST), help="a folder of IDX files")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--epochs", type=int, help="default: 1 warm-up + enough for 30k images")
    parser.add_argument("--limit", type=int, help="train on this many images (a quick check)")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    # A Ray instance of the benchmark's own, unless RAY_ADDRESS names a cluster to join.
    os.environ.setdefault("RAY_ADDRESS", "local")
    torch.set_num_threads(PLAIN_THREADS)
    started = time.perf_counter()

    with scratch_stores() as workdir:
        name, prepare_config, raw = dataset(Path(args.idx), args.limit)
        data_dir = workdir / "prepared"
        manifest = write_prepared(raw, prepare_config, prepare_config.source, str(data_dir))
        del raw
        train_size = manifest["splits"]["train"]["size"]
        epochs = args.epochs or steady_epochs(train_size)
        config = stage_settings(args.params)
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=epochs))
        print(f"{name}: {train_size} training images {manifest['input_shape']}, {epochs} epochs")
        where = (data_dir, workdir, train_size)
        runs = measure(args.runs, config, *where, "cpu")
        gpu = gpu_part(args.runs, config, *where)
    print(gpu.get("skipped", f"GPU: {gpu.get('device')}"))
    threads = sorted(
        {r["worker_torch_threads"] for r in runs.values() if "worker_torch_threads" in r}
    )
    if threads and threads != [PLAIN_THREADS]:
        print(f"warning: Ray workers ran {threads} torch threads, the plain loop {PLAIN_THREADS}")
    results = {
        **summary(runs),
        "dataset": name,
        "train_images": train_size,
        "input_shape": manifest["input_shape"],
        "epochs": epochs,
        "batch_size": config.train.batch_size,
        "optimizer": config.train.optimizer,
        "model": dataclasses.asdict(config.model),
        "plain_torch_threads": PLAIN_THREADS,
        "ray_worker_torch_threads": threads,
        "ray_address": os.environ["RAY_ADDRESS"],
        "runs": runs,
        "gpu": gpu,
        "machine": f"{machine()}; torch {torch.__version__}",
    }
    note = (
        f"{name}: {train_size} training images {manifest['input_shape']} (the prepare stage's "
        f"split), the default {config.model.kind} ({config.train.optimizer}, batch "
        f"{config.train.batch_size} per worker), {epochs} epochs. samples/s: training images "
        f"per second of wall time over epochs 2-{epochs} (the first is warm-up), validation "
        f"and per-epoch reports included. Startup: from calling the stage to its first step. "
        f"Data wait: share of the training time spent waiting for batches. torch "
        f"{torch.__version__}; plain loop on {PLAIN_THREADS} thread, Ray workers on "
        f"{threads or 'n/a'}. GPU: {gpu.get('skipped') or gpu['device']}. Took "
        f"{time.perf_counter() - started:.0f} s."
    )
    write_results(args.output, results, table(runs, gpu), note)


if __name__ == "__main__":
    main()
