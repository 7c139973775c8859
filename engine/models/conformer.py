"""Conformer (Gulati et al., 2020) with relative-position self-attention.

Block: x + ½·FFN  ->  x + MHSA(rel-pos)  ->  x + Conv  ->  x + ½·FFN  ->  LayerNorm.

Relative positions are a learned per-head scalar bias on the attention logits, indexed by the
key - query distance clipped to [-rel_pos_max, rel_pos_max] (Shaw et al. / T5 style without log
buckets). It depends only on distances, so it is shift-consistent and works for any length; it
is built from ``torch.arange`` of the runtime length and passed to
``F.scaled_dot_product_attention`` as an additive mask, which exports to ONNX with a dynamic
sequence axis (``nn.MultiheadAttention`` would bake the length in).

The convolution module uses LayerNorm rather than BatchNorm: the output of a window must not
depend on which other windows share its batch, nor on training-time running statistics.
Sequences are processed whole (non-causal within the sequence): livehead bounds the context by
running the network per window segment (``engine.windowing``), not by masking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ConformerConfig


class FeedForward(nn.Module):
    """Pre-norm FFN: LN -> Linear(d, f) -> SiLU -> Dropout -> Linear(f, d) -> Dropout."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d)."""
        return self.dropout(self.fc2(self.dropout(F.silu(self.fc1(self.norm(x))))))


class RelPositionBias(nn.Module):
    """Learned attention bias per head for clipped relative distances."""

    def __init__(self, heads: int, max_distance: int) -> None:
        super().__init__()
        if max_distance < 1:
            raise ValueError("rel_pos_max must be >= 1")
        self.max_distance = max_distance
        self.table = nn.Parameter(torch.zeros(2 * max_distance + 1, heads))
        nn.init.trunc_normal_(self.table, std=0.02)

    def forward(self, length: int, device: torch.device) -> torch.Tensor:
        """-> (1, heads, T, T) bias; entry [h, i, j] = table[clip(j - i) + max, h]."""
        pos = torch.arange(length, device=device)
        rel = (pos[None, :] - pos[:, None]).clamp(-self.max_distance, self.max_distance)
        return self.table[rel + self.max_distance].permute(2, 0, 1).unsqueeze(0)


class RelPosSelfAttention(nn.Module):
    """Multi-head self-attention with a relative-position bias (pre-norm applied by the block)."""

    def __init__(self, d_model: int, heads: int, dropout: float, rel_pos_max: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = d_model // heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.rel = RelPositionBias(heads, rel_pos_max)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d)."""
        b, t, d = x.shape
        # (B, T, 3d) -> (3, B, heads, T, head_dim)
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = self.rel(t, x.device).to(q.dtype)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_dropout if self.training else 0.0
        )
        # (B, heads, T, head_dim) -> (B, T, d), heads concatenated in order. Not
        # transpose+reshape: the ONNX exporter turns that into a view of the SDPA output, whose
        # fake strides make the view fail with a dynamic length.
        return self.out(torch.cat(y.unbind(1), dim=-1))


class ConvModule(nn.Module):
    """LN -> pointwise d->2d -> GLU -> depthwise conv (kernel k, same padding) -> LN -> SiLU
    -> pointwise d->d -> Dropout."""

    def __init__(self, d_model: int, kernel: int, dropout: float) -> None:
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"conv_kernel must be odd for symmetric padding, got {kernel}")
        self.norm = nn.LayerNorm(d_model)
        self.pw1 = nn.Linear(d_model, 2 * d_model)
        self.dw = nn.Conv1d(d_model, d_model, kernel, padding=kernel // 2, groups=d_model)
        self.dw_norm = nn.LayerNorm(d_model)
        self.pw2 = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d)."""
        y = F.glu(self.pw1(self.norm(x)), dim=-1)
        y = self.dw(y.transpose(1, 2)).transpose(1, 2)  # conv over time: (B, d, T)
        return self.dropout(self.pw2(F.silu(self.dw_norm(y))))


class ConformerBlock(nn.Module):
    def __init__(self, cfg: ConformerConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.ff1 = FeedForward(d, cfg.ffn_dim, cfg.dropout)
        self.attn_norm = nn.LayerNorm(d)
        self.attn = RelPosSelfAttention(d, cfg.heads, cfg.dropout, cfg.rel_pos_max)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.conv = ConvModule(d, cfg.conv_kernel, cfg.dropout)
        self.ff2 = FeedForward(d, cfg.ffn_dim, cfg.dropout)
        self.final_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d)."""
        x = x + 0.5 * self.ff1(x)  # macaron: two half-step FFNs around attention and conv
        x = x + self.attn_dropout(self.attn(self.attn_norm(x)))
        x = x + self.conv(x)
        x = x + 0.5 * self.ff2(x)
        return self.final_norm(x)


class Conformer(nn.Module):
    """A stack of ``cfg.blocks`` Conformer blocks at width ``cfg.d_model``."""

    def __init__(self, cfg: ConformerConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d); any T >= 1."""
        for block in self.blocks:
            x = block(x)
        return x
