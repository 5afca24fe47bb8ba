"""CUDA paths: bf16 autocast and device placement. Skipped where no GPU exists (CI has none)."""

import pytest
import torch

from pipelines.training.loop import autocast_for

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def test_autocast_is_a_no_op_on_cpu():
    with autocast_for(torch.device("cpu"), amp=True):
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == torch.float32


@needs_gpu
def test_bf16_autocast_on_cuda_and_training_there():
    from tests.unit.test_training_loop import make_state, run

    with autocast_for(torch.device("cuda"), amp=True):
        out = torch.ones(2, 2, device="cuda") @ torch.ones(2, 2, device="cuda")
    assert out.dtype == torch.bfloat16
    state = make_state()
    state.model.to("cuda")
    state = run(state, epochs=3, device=torch.device("cuda"), amp=True)
    assert state.history[-1]["train_loss"] < state.history[0]["train_loss"]
