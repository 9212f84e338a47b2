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


# On CPU, MKL runs an FP32 GEMM of a handful of rows (a decode step) on one core, streaming the
# weight at ~10 GB/s. The same product as one bmm over SKINNY_SPLIT row blocks of the weight uses
# every thread. Measured on the 2-core AVX-512 machine, weights cold in cache: lm_head 8192x256
# at 1 row 0.93 -> 0.21 ms, at 16 rows 0.96 -> 0.75 ms; the dense MLP's 1536x256 0.16 -> 0.06 ms.
# BF16 GEMMs (oneDNN) gain nothing, and small weights lose to the extra call.
SKINNY_SPLIT = 4
SKINNY_MAX_ROWS = 16
SKINNY_MIN_ELEMENTS = 1 << 16


def skinny_linear(x: torch.Tensor, weight_OI: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight_OI)`` (no bias), through a split bmm when that is the faster kernel:
    CPU, FP32, inference (no autograd), at most ``SKINNY_MAX_ROWS`` rows, a large contiguous weight.
    The same dot products either way; only the kernel that computes them differs."""
    out_features, in_features = weight_OI.shape
    rows = x.numel() // in_features if in_features else 0
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight_OI.dtype != torch.float32
            or torch.is_grad_enabled() or not 0 < rows <= SKINNY_MAX_ROWS or out_features % SKINNY_SPLIT
            or weight_OI.numel() < SKINNY_MIN_ELEMENTS or not weight_OI.is_contiguous()
            or torch.get_num_threads() < 2):
        return F.linear(x, weight_OI)
    x_IM = x.reshape(rows, in_features).t()
    blocks_PNI = weight_OI.view(SKINNY_SPLIT, out_features // SKINNY_SPLIT, in_features)
    y_PNM = torch.bmm(blocks_PNI, x_IM.expand(SKINNY_SPLIT, in_features, rows))
    return y_PNM.reshape(out_features, rows).t().reshape(*x.shape[:-1], out_features)


def linear_forward(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)``, with ``skinny_linear`` for a plain dense ``nn.Linear`` without bias."""
    if type(linear) is nn.Linear and linear.bias is None:
        return skinny_linear(x, linear.weight)
    return linear(x)


def backs_all(fused: torch.Tensor | None, weights: list[torch.Tensor]) -> bool:
    """Whether ``fused`` still holds these weights (a later cast or load may have re-homed them)."""
    if fused is None:
        return False
    ptr = fused.untyped_storage().data_ptr()
    return all(w.dtype == fused.dtype and w.untyped_storage().data_ptr() == ptr for w in weights)


def fuse_linear_weights(linears: list[nn.Module]) -> torch.Tensor | None:
    """Re-home the weights of dense linears that read the same input in one ``[sum(out), in]``
    tensor, so one GEMM computes all their outputs. Each ``weight`` becomes a view into it
    (checkpoints keep their layout; later in-place loads stay visible). None when any of them
    is not a plain dense ``nn.Linear`` (FP8 weights keep their own kernels)."""
    if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
        return None
    with torch.no_grad():
        fused_OI = torch.cat([m.weight for m in linears])  # [sum(out), in]
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight = nn.Parameter(fused_OI[start:start + rows], requires_grad=m.weight.requires_grad)
        start += rows
    return fused_OI


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is one fused kernel, bit-identical in FP32 to x * rsqrt(mean(x^2) + eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # other dtypes: normalise in FP32, round to the input dtype, then scale (as DeepSeek/HF do)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers, each routed expert and the shared experts."""

    def __init__(self, dim: int, inter_dim: int, linear: LinearFactory = dense_linear):
        super().__init__()
        self.gate_proj = linear(dim, inter_dim)
        self.up_proj = linear(dim, inter_dim)
        self.down_proj = linear(inter_dim, dim)
        self._gate_up_HD: torch.Tensor | None = None  # [2*inter, dim] once fuse_gate_up() ran

    def fuse_gate_up(self) -> bool:
        """Compute gate and up projections with one GEMM from now on (dense weights only)."""
        if not backs_all(self._gate_up_HD, [self.gate_proj.weight, self.up_proj.weight]):
            self._gate_up_HD = fuse_linear_weights([self.gate_proj, self.up_proj])
        return self._gate_up_HD is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_up_HD is not None and backs_all(self._gate_up_HD, [self.gate_proj.weight]):  # not re-homed
            gate, up = skinny_linear(x, self._gate_up_HD).chunk(2, dim=-1)
            return linear_forward(self.down_proj, F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
