"""Precision and GPU shares: the choices are pure functions checked here on CPU; the CUDA
kernels run only where a GPU exists (CI has none: those tests skip, benchmarks/gpu.py runs
them on a lent GPU machine)."""

import pytest
import torch

from pipelines.training.cluster import gpu_share
from pipelines.training.loop import autocast_for, choose_precision, precision_for
from tests.unit.test_training_loop import make_state, run

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.mark.parametrize(
    ("device", "amp", "bf16", "expected"),
    [
        ("cpu", True, False, "fp32"),  # autocast on CPU only slows training down
        ("cuda", True, True, "bf16"),  # Ampere and later
        ("cuda", True, False, "fp16"),  # older GPUs: fp16 with a gradient scaler
        ("cuda", False, True, "fp32"),  # amp off
    ],
)
def test_precision_is_bf16_where_the_gpu_has_it_else_fp16_and_fp32_on_cpu(
    device, amp, bf16, expected
):
    assert choose_precision(device, amp, bf16) == expected


def test_cpu_training_is_fp32():
    assert precision_for(torch.device("cpu"), amp=True) == "fp32"
    with autocast_for(torch.device("cpu"), "fp32"):
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    ("gpus", "workers", "share"),
    [(1, 1, 1.0), (2, 2, 1.0), (4, 2, 1.0), (1, 2, 0.5), (1, 4, 0.25), (3, 4, 0.5), (2, 5, 1 / 3)],
)
def test_gpu_share_fits_every_worker_at_once(gpus, workers, share):
    assert gpu_share(gpus, workers) == pytest.approx(share)
    # Ray places a fraction of a GPU on a single GPU: count whole workers per GPU.
    assert gpus * int(1 / gpu_share(gpus, workers) + 1e-9) >= workers


def test_fp16_trains_through_the_gradient_scaler_and_checkpoints_its_scale():
    # fp16 autocast and GradScaler exist on CPU too: the scaler path runs here, not just on GPUs.
    state = run(make_state(), epochs=4, precision="fp16")
    assert state.scaler is not None and state.scaler.is_enabled()
    assert state.history[-1]["train_loss"] < state.history[0]["train_loss"]
    saved = state.state_dict()
    assert saved["scaler"]["scale"] > 0

    resumed = make_state()
    resumed.load_state_dict(saved)
    resumed = run(resumed, epochs=5, precision="fp16")
    assert resumed.history[-1]["epoch"] == 4
    assert resumed.scaler.get_scale() > 0


def test_fp32_keeps_the_scaler_a_pass_through():
    state = run(make_state(), epochs=1)
    assert state.scaler is not None and not state.scaler.is_enabled()
    assert state.state_dict()["scaler"] == {}


@needs_gpu
def test_bf16_autocast_on_cuda_and_training_there():
    precision = precision_for(torch.device("cuda"), amp=True)
    with autocast_for(torch.device("cuda"), precision):
        out = torch.ones(2, 2, device="cuda") @ torch.ones(2, 2, device="cuda")
    assert out.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    state = make_state()
    state.model.to("cuda")
    state = run(state, epochs=3, device=torch.device("cuda"), precision=precision)
    assert state.history[-1]["train_loss"] < state.history[0]["train_loss"]
