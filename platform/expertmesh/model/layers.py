"""Small building blocks shared by attention and MoE: RMSNorm, the SwiGLU MLP, linear factories.

A model is built with a ``LinearFactory``: ``dense_linear`` gives ``nn.Linear`` (FP32/BF16)
and ``fp8_linear`` gives ``FP8Linear`` (e4m3 weights with 128×128 block scales). Parameter
names match Hugging Face DeepSeek-V3 checkpoints either way (``weight``, ``weight_scale_inv``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

LinearFactory = Callable[[int, int], nn.Module]


def dense_linear(in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=False)


def fp8_linear(in_features: int, out_features: int) -> nn.Module:
    from expertmesh.model.fp8 import FP8Linear

    return FP8Linear(in_features, out_features, bias=False)


def linear_factory(quantization: str | None) -> LinearFactory:
    if quantization in (None, "none", "bf16", "fp32"):
        return dense_linear
    if quantization == "fp8":
        return fp8_linear
    raise ValueError(f"quantization {quantization!r} is not supported (supported: None, 'fp8')")


def dense_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight of a dense or FP8 linear layer as a dense ``[out, in]`` tensor."""
    if hasattr(linear, "weight_scale_inv"):
        return linear.dequantized_weight(dtype)
    return linear.weight.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers, each routed expert and the shared experts."""

    def __init__(self, dim: int, inter_dim: int, linear: LinearFactory = dense_linear):
        super().__init__()
        self.gate_proj = linear(dim, inter_dim)
        self.up_proj = linear(dim, inter_dim)
        self.down_proj = linear(inter_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
