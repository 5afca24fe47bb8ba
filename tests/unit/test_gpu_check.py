"""benchmarks/gpu.py on a machine without CUDA, as CI and laptops run it: the GPU parts are
skipped with a line saying so, the CPU runs train, match and export, and the script's whole
import chain stays free of what a lent GPU machine lacks (Ray, MLflow, DVC, scikit-learn).
Its arithmetic (FLOPs, the peak table, where results go) is checked in-process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu

REPO = Path(__file__).resolve().parents[2]
ABSENT_ON_THE_GPU_MACHINE = ("ray", "mlflow", "dvc", "sklearn")


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    """The script as a lent machine starts it (`python benchmarks/gpu.py`), CUDA hidden,
    with the fewest steps; `-X importtime` lists every module it imported, lazily too."""
    output = tmp_path_factory.mktemp("gpu") / "gpu.json"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "benchmarks/gpu.py", "--steps", "3"]
        + ["--output", str(output)],
        check=False,  # the return code is a test of its own
        cwd=REPO,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=180,
    )
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    return done, json.loads(output.read_text()) if output.is_file() else None, imported, output


def test_without_cuda_it_says_the_gpu_parts_were_skipped_and_succeeds(cpu_check):
    done, results, _, _ = cpu_check
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "CUDA: skipped: no CUDA device" in done.stdout
    assert results["device"] == "cpu"
    assert results["cuda"] == "skipped: no CUDA device"


def test_both_models_learn_and_a_repeated_cpu_run_matches_the_reference(cpu_check):
    _, results, _, _ = cpu_check
    for name in ("cnn", "mlm"):
        check = results["models"][name]
        assert check["loss_fell"] is True
        assert check["loss_match"] is True  # the same steps on the same device: same losses
        reference, again = check["reference_cpu_fp32"], check["runs"]["fp32"]
        assert again["final_train_loss"] == pytest.approx(reference["final_train_loss"])
        assert check["samples_per_s"]["fp32"] > 0 and check["samples_per_s"]["bf16"] is None


def test_the_trained_weights_export_to_onnx_with_parity(cpu_check):
    _, results, _, _ = cpu_check
    for name in ("cnn", "mlm"):
        onnx = results["models"][name]["onnx"]
        assert onnx["parity"] is True and onnx["max_abs_diff"] <= onnx["atol"]
    assert results["models"]["cnn"]["onnx"]["argmax_agreement"] == 1.0


def test_mfu_is_left_empty_without_cuda_and_the_table_is_written_beside(cpu_check):
    _, results, _, output = cpu_check
    assert results["models"]["mlm"]["mfu"] is None
    assert results["mfu"]["mfu_note"] == "skipped: no CUDA device"
    assert "| mlm | cpu | fp32 (reference) |" in output.with_suffix(".md").read_text()


def test_the_import_chain_has_no_ray_mlflow_dvc_or_sklearn(cpu_check):
    _, _, imported, _ = cpu_check
    assert "torch" in imported and "onnxruntime" in imported  # the listing works
    assert not imported & set(ABSENT_ON_THE_GPU_MACHINE)


def test_train_flops_are_six_per_parameter_and_token_plus_attention():
    model = torch.nn.Linear(10, 10)  # 110 parameters
    # Per token: 6 * 110 + 12 * layers 2 * width 8 * length 4 = 660 + 768; x 4 tokens.
    assert gpu.train_flops(model, layers=2, width=8, length=4) == 4 * (660 + 768)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),  # not the L4
        ("NVIDIA A10", 125e12),
        ("NVIDIA A10G", None),  # not the A10: unknown, so no MFU rather than a wrong one
        ("Tesla T4", None),
    ],
)
def test_the_bf16_peak_is_looked_up_by_whole_names(name, peak):
    assert gpu.bf16_peak(name) == peak


def test_a_cpu_run_never_replaces_gpu_results_unasked(tmp_path, monkeypatch):
    results = tmp_path / "gpu.json"
    monkeypatch.setattr(gpu, "RESULTS", results)
    assert gpu.output_path(None, cuda=False) == results  # nothing there yet
    results.write_text(json.dumps({"device": "cpu"}))
    assert gpu.output_path(None, cuda=False) == results  # CPU results: replaced
    results.write_text(json.dumps({"device": "NVIDIA H200"}))
    assert gpu.output_path(None, cuda=False) is None  # GPU results: kept
    assert gpu.output_path(None, cuda=True) == results
    assert gpu.output_path(str(tmp_path / "cpu.json"), cuda=False) == tmp_path / "cpu.json"
