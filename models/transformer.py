"""A small BERT-style transformer encoder with a masked-language-model head.

Pre-LayerNorm blocks (stable without learning-rate warm-up tricks), rotary position
encoding (RoFormer) and an output projection tied to the token embeddings (fewer
parameters, and the embedding of a word is trained both by reading and by predicting it).
Padding is token `pad_id`; attention never looks at it.

Why rotary positions: on a small corpus, learned absolute position embeddings left the
model predicting unigram frequencies for several epochs (it must first learn what
"neighbour" means from scratch); rotating queries and keys by their position makes
attention scores depend on relative offsets from the first step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class EncoderConfig:
    layers: int = 4
    """Transformer blocks."""
    width: int = 128
    """Hidden size of every token's vector."""
    heads: int = 4
    """Attention heads (width must divide by it)."""
    ffn_width: int = 512
    """Hidden size of each block's feed-forward layer."""
    dropout: float = 0.1
    """Dropout on embeddings, attention and feed-forward outputs during training."""
    max_length: int = 64
    """Longest token sequence (including [CLS]/[SEP]) the model reads; also the length of
    the packed training blocks."""

    def __post_init__(self) -> None:
        for name in ("layers", "width", "heads", "ffn_width", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width % (2 * self.heads):
            raise ValueError(
                f"width {self.width} must be divisible by 2 x heads ({2 * self.heads}): rotary "
                "positions rotate pairs of each head's channels"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.max_length < 3:
            raise ValueError(
                f"max_length must be >= 3 ([CLS], a token, [SEP]), got {self.max_length}"
            )


ONNX_OPSET = 23
"""The lowest ONNX opset of the exported graph: its attention and rotary positions are ONNX's
own `Attention` and `RotaryEmbedding` operators, which opset 23 introduced."""


def rotary_angles(length: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """(length, dim / 2): the angle position t turns channel pair i by, t / 10000^(2i/D)."""
    inverse_frequency = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=device) / dim))
    return torch.arange(length, device=device)[:, None] * inverse_frequency


def rotate(x: torch.Tensor) -> torch.Tensor:
    """Rotary position encoding: channel pair i of position t turns by t / 10000^(2i/D).

    x: (B, heads, T, D). The dot product of a rotated query and key then depends on their
    positions only through the offset between them."""
    angles = rotary_angles(x.shape[-2], x.shape[-1], x.device)  # (T, D/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class SelfAttention(nn.Module):
    onnx_min_opset = ONNX_OPSET
    """Read by the export (pipelines/stagekit/onnx_export.py): the graph's opset is at least
    this, whatever `export.opset` asks."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)
        # The rotary angles of every position the model reads, for the ONNX graph: looked up
        # there instead of computed per call. Not saved with the weights (derived).
        angles = rotary_angles(config.max_length, config.width // config.heads)
        self.register_buffer("rotary_cos", angles.cos(), persistent=False)
        self.register_buffer("rotary_sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # x: (B, T, C); keep: (B, 1, 1, T), True where a key is a real token
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        if torch.onnx.is_in_onnx_export():
            return self.proj(self._onnx_attention(q, k, v, keep))
        # (B, T, C) -> (B, heads, T, C / heads)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        q, k = rotate(q), rotate(k)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))

    def _onnx_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """The same attention written with ONNX's RotaryEmbedding and Attention operators on
        (B, T, C) tensors, so that the exported graph holds one kernel each and no head
        transposes, where the exporter would otherwise spell out the strided slices, the
        transposes, the softmax and the masking op by op (onnxruntime ran that form slower
        than torch at batch 32). Inference only: no dropout."""
        batch, length, _ = q.shape
        positions = torch.arange(length, device=q.device).expand(batch, length)
        q, k = (
            torch.onnx.ops.rotary_embedding(
                t,
                self.rotary_cos,
                self.rotary_sin,
                positions,
                interleaved=True,
                num_heads=self.heads,
            )
            for t in (q, k)
        )
        # onnxruntime wants the mask's query axis spelled out: (B, 1, T, T).
        mask = keep.expand(batch, 1, length, length)
        return torch.onnx.ops.attention(
            q, k, v, mask, q_num_heads=self.heads, kv_num_heads=self.heads
        )[0]


class EncoderBlock(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.width)
        self.attention = SelfAttention(config)
        self.ffn_norm = nn.LayerNorm(config.width)
        self.ffn = nn.Sequential(
            nn.Linear(config.width, config.ffn_width),
            nn.GELU(),
            nn.Linear(config.ffn_width, config.width),
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), keep))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class MaskedLanguageModel(nn.Module):
    """input_ids (B, T) -> logits over the vocabulary (B, T, V) at every position (or at
    the positions asked for: `forward`)."""

    def __init__(self, config: EncoderConfig, vocab_size: int, pad_id: int = 0) -> None:
        super().__init__()
        self.config = config
        self.pad_id = pad_id
        self.token_embedding = nn.Embedding(vocab_size, config.width)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.width)
        # The MLM head: a transform, then scores against every token embedding (tied).
        self.head_transform = nn.Sequential(
            nn.Linear(config.width, config.width), nn.GELU(), nn.LayerNorm(config.width)
        )
        self.head_bias = nn.Parameter(torch.zeros(vocab_size))
        self.apply(_init_weights)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, C) contextual vectors."""
        keep = (input_ids != self.pad_id)[:, None, None, :]  # (B, 1, 1, T)
        x = self.dropout(self.token_embedding(input_ids))  # positions enter in attention
        for block in self.blocks:
            x = block(x, keep)
        return self.final_norm(x)

    def forward(self, input_ids: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V); given `where` (B, T) bool, only those positions' (N, V), in
        row-major order. Training scores the masked positions alone: the head's projection
        onto the vocabulary was 40% of a step's time on CPU when taken at every position."""
        hidden = self.hidden_states(input_ids)  # (B, T, C)
        if where is not None:
            hidden = hidden[where]  # (N, C)
        hidden = self.head_transform(hidden)
        return hidden @ self.token_embedding.weight.T + self.head_bias

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, C): the mean of the non-padding tokens' vectors, L2-normalized."""
        hidden = self.hidden_states(input_ids)
        real = (input_ids != self.pad_id).unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        mean = (hidden * real).sum(dim=1) / real.sum(dim=1).clamp(min=1.0)
        return F.normalize(mean, dim=-1)


class SentenceEmbedder(nn.Module):
    """`MaskedLanguageModel.embed` as a module's forward (what the embedding graph exports)."""

    def __init__(self, model: MaskedLanguageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids)


def _init_weights(module: nn.Module) -> None:
    # BERT's initialisation: PyTorch's default N(0, 1) embeddings, multiplied through the
    # tied head, start the loss near 35 instead of log(V).
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
