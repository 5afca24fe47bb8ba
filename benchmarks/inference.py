"""Inference latency: onnxruntime against torch eager, for every model the pipeline exports.

Each exported ONNX graph is timed beside the torch module it was exported from, rebuilt by
the export stage's own code from the trained weights on disk, on the inputs that stage
checks parity on:

- `classifier_<architecture>` (and `pseudolabel_classifier_<architecture>`): the servable
  classifier (standardize -> network -> softmax) on test-split images;
- `timeseries_<kind>` (e.g. `timeseries_lstm`): the same servable classifier around the
  recurrent network `timeseries.model.kind` names, on the test split's series, NaN-padded
  to the longest;
- `mlm_fill_mask`, `mlm_embed`: the encoder's two graphs on validation blocks cut to
  random lengths and padded (what serving sends: short, padded batches);
- `segment_kmeans`, `segment_autoencoder`, `segment_model` (the served segmentation):
  raw customer feature rows -> segment and distances to every segment;
- `generate_vae`, `generate_gan`: each generator (latents -> images in [0, 1]) on the
  seeded standard-normal latents `export_generate` checks parity on.

One thread each (`torch.set_num_threads(1)`; onnxruntime intra- and inter-op 1, as a
serving replica runs it), at batch 1 and 32. A figure is the median of many calls after a
warm-up; torch and onnxruntime take turns in short slices, so that a neighbour's burst on a
shared machine falls on both. `max_abs_diff` is the largest |torch - onnxruntime| over
every output of both batches. Run from the repository root after `dvc repro`:

    python -m benchmarks.inference       # writes benchmarks/results/inference.json and .md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.scratch import machine, markdown_table, write_results
from pipelines.stagekit.onnx_export import onnx_session

RESULTS = Path("benchmarks/results/inference.json")
BATCHES = (1, 32)
TARGET_SPEEDUP_B1 = 1.5
TARGET_SPEEDUP_B32 = 1.2


def median_ms(
    calls: dict[str, Callable[[], object]],
    seconds: float,
    *,
    slices: int = 5,
    warmup_s: float = 0.2,
    min_runs: int = 20,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median milliseconds per call of each of `calls`, after `warmup_s` of warm-up each.

    Each call is timed for about `seconds` in all (and at least `min_runs` times), in
    `slices` turns taken one call after the other, so that a disturbance lasting part of
    the measurement touches every call alike rather than only the one running then."""
    for call in calls.values():
        deadline = clock() + warmup_s
        while clock() < deadline:
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    per_slice_s, per_slice_runs = seconds / slices, math.ceil(min_runs / slices)
    for _ in range(slices):
        for name, call in calls.items():
            spent, runs = 0.0, 0
            while spent < per_slice_s or runs < per_slice_runs:
                start = clock()
                call()
                elapsed = clock() - start
                samples[name].append(elapsed)
                spent, runs = spent + elapsed, runs + 1
    return {name: statistics.median(times) * 1e3 for name, times in samples.items()}


@dataclass(frozen=True)
class Case:
    """One exported graph and the torch module it was exported from."""

    name: str
    module: nn.Module
    onnx_path: Path
    input_name: str
    inputs: np.ndarray  # at least max(BATCHES) rows; batch b is the first b
    describe: str
    score: Callable[[Path], float] | None = None
    """The export's int8 gate score of a graph file (test or masked-token accuracy)."""
    score_name: str = ""


def _outputs(value) -> list[np.ndarray]:
    return [t.numpy() for t in value] if isinstance(value, (tuple, list)) else [value.numpy()]


def graphs(case: Case, scratch: Path) -> tuple[Path, Path]:
    """(fp32, int8) files of the case: where the export kept int8, the served file and its
    fp32 original beside it; else the served fp32 file and an int8 copy quantised here the
    way `export.quantize: int8` would."""
    from pipelines.stagekit.quantize import fp32_name, quantize_int8

    kept_fp32 = case.onnx_path.with_name(fp32_name(case.onnx_path.name))
    if kept_fp32.is_file():
        return kept_fp32, case.onnx_path
    int8 = scratch / f"{case.name}.int8.onnx"
    quantize_int8(case.onnx_path, int8)
    return case.onnx_path, int8


def measure(case: Case, seconds: float, scratch: Path, max_drop: float) -> dict:
    from pipelines.stagekit.quantize import Gate

    fp32, int8 = graphs(case, scratch)
    sessions = {"ort": onnx_session(fp32, threads=1), "int8": onnx_session(int8, threads=1)}
    module = case.module.eval()
    figures: dict = {"onnx": str(case.onnx_path), "inputs": case.describe}
    worst = {"ort": 0.0, "int8": 0.0}
    for batch in BATCHES:
        array = np.ascontiguousarray(case.inputs[:batch])
        tensor = torch.from_numpy(array)
        feed = {case.input_name: array}
        with torch.inference_mode():
            expected = _outputs(module(tensor))
            for engine, session in sessions.items():
                for want, got in zip(expected, session.run(None, feed), strict=True):
                    diff = np.abs(want.astype(np.float64) - got.astype(np.float64))
                    worst[engine] = max(worst[engine], float(diff.max()))
            calls = {"torch": partial(module, tensor)}
            calls.update({name: partial(s.run, None, feed) for name, s in sessions.items()})
            ms = median_ms(calls, seconds)
        for engine, prefix in (("torch", "torch"), ("ort", "ort"), ("int8", "int8")):
            figures[f"{prefix}_ms_b{batch}"] = round(ms[engine], 4)
        figures[f"speedup_b{batch}"] = round(ms["torch"] / ms["ort"], 2)
        figures[f"int8_speedup_b{batch}"] = round(ms["torch"] / ms["int8"], 2)
    figures["max_abs_diff"] = worst["ort"]
    figures["int8_max_abs_diff"] = worst["int8"]
    figures["target_b1_met"] = figures["speedup_b1"] >= TARGET_SPEEDUP_B1
    figures["target_b32_met"] = figures["speedup_b32"] >= TARGET_SPEEDUP_B32
    if case.score is not None:
        gate = Gate(case.score_name, case.score(fp32), case.score(int8), max_drop)
        figures.update(gate.figures())
    return figures


# The stage modules are imported where they are used: they bring Ray and MLflow with them
# (seconds), which the timing helper and its unit test do not need.


def classifier_case(name: str, data_dir: str, model_dir: str, export_dir: str) -> Case:
    """The supervised export's servable classifier, named `<name>_<architecture>`."""
    from pipelines.stagekit.dataset import load_prepared
    from pipelines.stagekit.model_bundle import inference_model, load_trained
    from pipelines.stagekit.onnx_export import INPUT_NAME
    from pipelines.stagekit.sequences import sequence_lengths
    from pipelines.supervised.export import CARD_FILE, ONNX_FILE, onnx_accuracy

    data = load_prepared(data_dir)
    model, _ = load_trained(model_dir, data.manifest)
    card = json.loads((Path(export_dir) / CARD_FILE).read_text())
    x_test = data.x("test")
    if data.manifest["input_kind"] == "sequence":  # (N, T, C), NaN after each series' end
        lengths = sequence_lengths(x_test)
        describe = (
            f"test series of {lengths.min()}-{lengths.max()} steps, NaN-padded to "
            f"{x_test.shape[1]} ({x_test.shape[2]} channels)"
        )
    else:
        describe = f"test images {tuple(x_test.shape[1:])}"
    return Case(
        f"{name}_{card['architecture']}",
        inference_model(model, data.task),
        Path(export_dir) / ONNX_FILE,
        INPUT_NAME,
        x_test,
        describe,
        partial(onnx_accuracy, inputs=data.x("val"), labels=data.y("val")),
        "val_accuracy",  # what the export's gate scores
    )


def timeseries_case(data_dir: str, models_dir: str, export_dir: str) -> Case:
    """The exported recurrent classifier: `export_timeseries` runs the supervised export on
    `models_dir/<kind>`, one of the networks `train_timeseries` trains side by side."""
    from pipelines.supervised.export import CARD_FILE

    # The kind the export holds, from its card rather than params.yaml: params edited since
    # the last `dvc repro` would otherwise pair this graph with another network's weights.
    kind = json.loads((Path(export_dir) / CARD_FILE).read_text())["architecture"]
    return classifier_case("timeseries", data_dir, str(Path(models_dir) / kind), export_dir)


def mlm_cases(params: str, data_dir: str, model_dir: str, export_dir: str) -> Iterator[Case]:
    from models.transformer import SentenceEmbedder
    from pipelines.selfsupervised.bundle import load_mlm_bundle
    from pipelines.selfsupervised.export import (
        CARD_FILE,
        export_mlm,
        masked_accuracy,
        parity_inputs,
    )
    from pipelines.selfsupervised.pretrain import validation_arrays
    from pipelines.stagekit.config import load_params
    from pipelines.stagekit.dataset import load_prepared

    data = load_prepared(data_dir)
    model, _ = load_mlm_bundle(model_dir, data.manifest)
    # The validation blocks masked as export_mlm masks them (its view of `mlm`).
    arrays = validation_arrays(load_params(export_mlm, params)["mlm"], data)
    pad_id = data.manifest["special_ids"]["[PAD]"]
    _, (padded, _) = parity_inputs(arrays["x_val"], arrays["y_val"], pad_id)
    ids = padded.astype(np.int64)
    card = json.loads((Path(export_dir) / CARD_FILE).read_text())
    modules = {"fill_mask": model, "embed": SentenceEmbedder(model)}
    # The gate scores the fill-mask graph; the embedding graph shares its weights.
    score = partial(masked_accuracy, inputs=arrays["x_val"], targets=arrays["y_val"])
    for graph, spec in card["graphs"].items():
        yield Case(
            f"mlm_{graph}",
            modules[graph],
            Path(export_dir) / spec["file"],
            spec["input"],
            ids,
            f"validation blocks cut to 2-{ids.shape[1]} tokens, padded to {ids.shape[1]}",
            score if graph == "fill_mask" else None,
            "masked_accuracy",
        )


def segment_cases(data_dir: str, model_dir: str, export_dir: str) -> Iterator[Case]:
    from pipelines.unsupervised.export import INPUT, segmenters
    from pipelines.unsupervised.segment import MODEL_FILE, feature_table

    bundle = torch.load(Path(model_dir) / MODEL_FILE, map_location="cpu", weights_only=True)
    raw = feature_table(data_dir)[bundle["transform"]["columns"]].to_numpy(dtype=np.float32)
    # Each graph export_segment writes: kmeans, autoencoder and model (the served one).
    for graph, module in segmenters(bundle).items():
        yield Case(
            f"segment_{graph}",
            module,
            Path(export_dir) / f"{graph}.onnx",
            INPUT,
            raw,
            f"customer feature rows ({raw.shape[1]} features)",
        )


def generate_cases(models_dir: str, export_dir: str) -> Iterator[Case]:
    """Each generator graph `export_generate` writes, `<kind>.onnx`, beside the `Sampler` it
    was exported from."""
    from pipelines.unsupervised.generator_model import KINDS, Sampler, load_generator
    from serving.generate_predictor import INPUT, latents

    # model.onnx is a copy of the graph `generate.serve` names; each graph is timed once.
    for kind in KINDS:
        sampler = Sampler(load_generator(Path(models_dir) / kind)[0])
        size = sampler.model.config.latent
        # Seed 0, as the parity check draws them: these are the first of its latents.
        z = latents(0, max(BATCHES), size)
        yield Case(
            f"generate_{kind}",
            sampler,
            Path(export_dir) / f"{kind}.onnx",
            INPUT,
            z,
            f"seeded standard-normal latents of size {size}",
        )


# Where `dvc repro` leaves each model's data, trained weights and export (dvc.yaml's outs).
SUPERVISED = (
    "data/prepared/supervised",
    "artifacts/supervised/model",
    "artifacts/supervised/export",
)
PSEUDOLABEL = (
    "data/prepared/pseudolabel",
    "artifacts/pseudolabel/model",
    "artifacts/pseudolabel/export",
)
# One model folder per kind in `timeseries.kinds`; the export's card says which it holds.
TIMESERIES = (
    "data/prepared/timeseries",
    "artifacts/timeseries/models",
    "artifacts/timeseries/export",
)
MLM = ("data/prepared/mlm", "artifacts/mlm/model", "artifacts/mlm/export")
SEGMENT = ("data/raw/customers", "artifacts/segment/model", "artifacts/segment/export")
# One model folder per generator kind; no data: a generator's input is drawn latents.
GENERATE = ("artifacts/generate/models", "artifacts/generate/export")


def cases(root: Path, params: str) -> Iterator[Case]:
    """Every exported model under `root`; the pseudo-label student, the time-series
    classifier and the generators where they were exported."""
    yield classifier_case("classifier", *(str(root / p) for p in SUPERVISED))
    if (root / PSEUDOLABEL[2]).is_dir():
        yield classifier_case("pseudolabel_classifier", *(str(root / p) for p in PSEUDOLABEL))
    if (root / TIMESERIES[2]).is_dir():
        yield timeseries_case(*(str(root / p) for p in TIMESERIES))
    yield from mlm_cases(params, *(str(root / p) for p in MLM))
    yield from segment_cases(*(str(root / p) for p in SEGMENT))
    if (root / GENERATE[1]).is_dir():
        yield from generate_cases(*(str(root / p) for p in GENERATE))


def table(results: dict[str, dict]) -> str:
    header = (
        "model",
        "torch b1 ms",
        "ORT b1 ms",
        "speedup b1",
        "torch b32 ms",
        "ORT b32 ms",
        "speedup b32",
        "max abs diff",
        f"b1 >= {TARGET_SPEEDUP_B1}x, b32 >= {TARGET_SPEEDUP_B32}x",
        "int8 speedup b1 / b32",
        "int8 accuracy (fp32)",
    )

    def met(f: dict) -> str:
        return "met" if f["target_b1_met"] and f["target_b32_met"] else "**MISSED**"

    def accuracy(f: dict) -> str:
        name = next((k[len("fp32_") :] for k in f if k.startswith("fp32_")), None)
        if name is None:
            return "-"
        verdict = "kept" if f["int8_kept"] else "refused"
        return f"{f['int8_' + name]:.4f} ({f['fp32_' + name]:.4f}), {verdict}"

    rows = (
        (
            name,
            f"{f['torch_ms_b1']:.3f}",
            f"{f['ort_ms_b1']:.3f}",
            f"{f['speedup_b1']:.2f}x",
            f"{f['torch_ms_b32']:.3f}",
            f"{f['ort_ms_b32']:.3f}",
            f"{f['speedup_b32']:.2f}x",
            f"{f['max_abs_diff']:.1e}",
            met(f),
            f"{f['int8_speedup_b1']:.2f}x / {f['int8_speedup_b32']:.2f}x",
            accuracy(f),
        )
        for name, f in results.items()
    )
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default=".", help="the repository whose models to time")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument(
        "--seconds", type=float, default=1.0, help="timed per engine, model and batch size"
    )
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    import onnxruntime as ort

    from pipelines.stagekit.config import load_params
    from pipelines.supervised.export import export

    max_drop = load_params(export, args.params)["export_config"].quantize_max_drop
    started = time.perf_counter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for case in cases(Path(args.root), args.params):
            results[case.name] = measure(case, args.seconds, Path(scratch), max_drop)
            f = results[case.name]
            print(
                f"{case.name:28s} b1 torch {f['torch_ms_b1']:.3f} ms ort {f['ort_ms_b1']:.3f} "
                f"ms ({f['speedup_b1']:.2f}x, int8 {f['int8_speedup_b1']:.2f}x)  b32 torch "
                f"{f['torch_ms_b32']:.3f} ms ort {f['ort_ms_b32']:.3f} ms "
                f"({f['speedup_b32']:.2f}x, int8 {f['int8_speedup_b32']:.2f}x)  "
                f"max |diff| {f['max_abs_diff']:.1e}",
                flush=True,
            )
    versions = f"torch {torch.__version__}, onnxruntime {ort.__version__}"
    write_results(
        args.output,
        {**results, "machine": f"{machine()}; {versions}"},
        table(results),
        f"{versions}. One thread each, median of the calls in {args.seconds:g} s per engine and "
        "batch size (after 0.2 s of warm-up), torch in `inference_mode`. Target: onnxruntime >= "
        f"{TARGET_SPEEDUP_B1}x torch eager at batch 1 and >= {TARGET_SPEEDUP_B32}x at batch 32, "
        "fp32 graphs (the default `export.quantize: none`). int8: the same graph quantised as "
        "`export.quantize: int8` would (MatMul/Gemm weights, dynamic activations), its accuracy "
        "on the export's gate data beside fp32's, and whether the gate (`export."
        f"quantize_max_drop` {max_drop:g}) would serve it. Took "
        f"{time.perf_counter() - started:.0f} s.",
    )


if __name__ == "__main__":
    main()
