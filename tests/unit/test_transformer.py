"""The transformer encoder and its MLM head, in plain torch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from models.transformer import (
    ONNX_OPSET,
    EncoderConfig,
    MaskedLanguageModel,
    SentenceEmbedder,
    rotate,
)
from pipelines.stagekit.onnx_export import export_onnx, onnx_session

SMALL = EncoderConfig(layers=2, width=32, heads=2, ffn_width=64, dropout=0.0, max_length=16)


def test_logits_cover_the_vocabulary_and_the_head_is_tied():
    model = MaskedLanguageModel(SMALL, vocab_size=50)
    ids = torch.randint(5, 50, (3, 10))
    assert model(ids).shape == (3, 10, 50)
    # Tied: the output projection is the input embedding, not a second matrix.
    names = [name for name, _ in model.named_parameters()]
    assert not any("decoder" in name for name in names)
    assert sum(p.numel() for p in model.parameters()) < 50 * 32 * 2 + 40_000


def test_padding_changes_neither_logits_nor_embeddings_of_real_tokens():
    torch.manual_seed(0)
    model = MaskedLanguageModel(SMALL, vocab_size=50).eval()
    ids = torch.randint(5, 50, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model(ids), model(padded)[:, :7], atol=1e-5)
        assert torch.allclose(model.embed(ids), model.embed(padded), atol=1e-6)
        assert model.embed(padded).norm(dim=-1).item() == pytest.approx(1.0, abs=1e-5)


def test_rotary_attention_scores_depend_on_the_offset_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    length = 12
    rq, rk = rotate(q.expand(1, 1, length, 8)), rotate(k.expand(1, 1, length, 8))
    score = rq[0, 0] @ rk[0, 0].T  # (T, T): query position x key position
    assert score[3, 1].item() == pytest.approx(score[9, 7].item(), abs=1e-5)
    assert score[3, 1].item() != pytest.approx(score[3, 2].item(), abs=1e-3)


@pytest.mark.parametrize("graph", ["fill_mask", "embed"])
def test_the_onnx_graph_runs_fused_attention_and_matches_torch_on_padded_batches(tmp_path, graph):
    """The export writes ONNX's Attention and RotaryEmbedding operators in place of the
    eager path's strided slices and scaled_dot_product_attention: the same numbers, on
    every length up to max_length and with padding, in onnxruntime."""
    torch.manual_seed(0)
    model = MaskedLanguageModel(SMALL, vocab_size=50, pad_id=0).eval()
    module = model if graph == "fill_mask" else SentenceEmbedder(model)
    path = tmp_path / "graph.onnx"
    export_onnx(
        module,
        torch.randint(5, 50, (2, 8)),
        path,
        ONNX_OPSET,
        input_name="ids",
        output_name="out",
        dynamic_axes=("batch", "sequence"),
    )
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("Attention") == SMALL.layers
    assert ops.count("RotaryEmbedding") == 2 * SMALL.layers
    assert "Softmax" not in ops and "Sin" not in ops  # nothing left spelled out
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 50, size=(6, SMALL.max_length))
    for row, cut in enumerate([1, 2, 5, 9, 15, 16]):
        ids[row, cut:] = 0
    session = onnx_session(path)
    for length in (1, 7, SMALL.max_length):
        batch = np.ascontiguousarray(ids[:, :length])
        with torch.no_grad():
            want = module(torch.from_numpy(batch)).numpy()
        got = session.run(None, {"ids": batch})[0]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"width": 30, "heads": 4}, "divisible"),
        ({"layers": 0}, "layers"),
        ({"dropout": 1.0}, "dropout"),
        ({"max_length": 2}, "max_length"),
    ],
)
def test_config_rejects_impossible_shapes(fields, message):
    with pytest.raises(ValueError, match=message):
        EncoderConfig(**fields)
