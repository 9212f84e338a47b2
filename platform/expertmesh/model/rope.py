"""Rotary position embedding for MLA's decoupled RoPE key/query (default and YaRN).

Only ``qk_rope_head_dim`` dimensions of each head are rotated. DeepSeek lays them out as
interleaved pairs ``(x0, x1), (x2, x3), ...``; with ``interleave=True`` the rotated
output is written de-interleaved (evens then odds), as transformers does. Queries and
keys get the same layout, so their dot products are unchanged, and the cached key is
stored already rotated.

Shape letters: B batch, S query positions, H heads, R rope dims (R/2 frequencies).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from expertmesh.model.config import RopeScaling, yarn_mscale
from expertmesh.model.cpu_kernels import fused_rope


def rope_inv_freq(rope: RopeScaling, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[R/2]`` and the factor applied to cos/sin (YaRN's attention factor)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim  # [R/2]
    inv_freq_extrapolation = 1.0 / (rope.theta ** exponents)  # [R/2]
    if rope.kind == "default":
        return inv_freq_extrapolation, 1.0

    factor = rope.factor
    original = rope.original_max_position_embeddings or max_position_embeddings
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)  # [R/2]
    extrapolation_weight = 1.0 - ramp
    inv_freq_interpolation = inv_freq_extrapolation / factor
    inv_freq = inv_freq_interpolation * ramp + inv_freq_extrapolation * extrapolation_weight
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions, computed on demand (no max-length table to outgrow)."""

    def __init__(self, rope: RopeScaling, dim: int, max_position_embeddings: int, interleave: bool = True):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(rope, dim, max_position_embeddings)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)  # [R/2]
        self.interleave = interleave

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` [..., S] -> (cos, sin), each [..., S, R/2]."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq  # [..., S, R/2]
        cos = freqs.cos() * self.attention_factor
        sin = freqs.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate ``x`` [B, S, H, R] (or [B, S, R]) by cos/sin [B, S, R/2]."""
    fused = fused_rope(x, cos, sin, interleave)  # FP32/BF16 CPU inference: one C++ pass, same values
    if fused is not None:
        return fused
    if x.dim() == cos.dim() + 1:  # per-head input: broadcast over H
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [B, S, 1, R/2]
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]  # pairs (x0, x1), (x2, x3), ...
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
