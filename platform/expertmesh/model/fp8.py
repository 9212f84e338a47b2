"""FP8 (e4m3) fine-grained quantization and block-scaled GEMM, as in DeepSeek-V3.

Activations are scaled per 1×128 tile along K, weights per 128×128 block; a GEMM
multiplies each 128-wide K block in FP8, scales the partial product by the tile
scale (per row) and the block scale (per output column block), and accumulates
the partial products in FP32 (DeepGEMM-style promotion).

Convention (same as DeepSeek-V3 checkpoints' ``weight_scale_inv``): a scale
multiplies the FP8 value back to the real value, ``real ≈ fp8.float() * scale``.

Shape letters:
    M   rows of the activation (tokens; leading dims flattened)
    N   output features (rows of the weight)
    K   input features (reduction dim)
    nK  ceil(K / block), number of K tiles/blocks
    nN  ceil(N / block), number of N blocks
    Mp, Np  M, N padded to a multiple of 16 (``torch._scaled_mm`` alignment)
    B   block size (128)

Backends (``fp8_backend(device)``, probed once per device type):
    "scaled_mm"  ``torch._scaled_mm`` per K block with row-wise scales
    "emulated"   FP8 blocks upcast to FP32, same per-K-block scaled accumulation
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
BLOCK = 128  # tile/block edge, elements
MIN_SCALE = 1e-12  # floor on a scale so an all-zero tile quantizes to zeros, not NaN
SCALED_MM_ALIGN = 16  # torch._scaled_mm wants every dim a multiple of this (CUDA)

Backend = Literal["scaled_mm", "emulated"]
BackendChoice = Literal["auto", "scaled_mm", "emulated"]


@dataclass(frozen=True, eq=False)  # tensors: no elementwise __eq__
class QuantizedActivation:
    """An activation quantized per 1×block tile along its last dim.

    data:  Shape [..., K], dtype float8_e4m3fn.
    scale: Shape [..., nK], float32; tile j covers data[..., j*B:(j+1)*B]
           (the last tile is shorter when K % B != 0).
    Example (K=200, B=128): data [2, 200], scale [2, 2].
    """

    data: torch.Tensor
    scale: torch.Tensor
    block: int = BLOCK


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _ceil_div(a, b) * b


def _check_fp8(name: str, t: torch.Tensor) -> None:
    if t.dtype != FP8_DTYPE:
        raise ValueError(f"{name} must have dtype {FP8_DTYPE}, got {t.dtype}")


def _check_scale(name: str, scale: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if scale.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {scale.dtype}")
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"{name} shape {tuple(scale.shape)} does not match {what}: expected {expected}"
        )


def _quantize_scaled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to e4m3 (saturating at ±448)."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _pad_fp8(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2-D FP8 tensor to [rows, cols] (via uint8: fp8 0x00 is +0.0)."""
    r, c = t.shape
    if (r, c) == (rows, cols):
        return t
    t_u8 = torch.nn.functional.pad(t.view(torch.uint8), (0, cols - c, 0, rows - r))  # [rows, cols]
    return t_u8.view(FP8_DTYPE)


def quantize_activation(x: torch.Tensor, block: int = BLOCK) -> QuantizedActivation:
    """Quantize x [..., K] per 1×block tile: scale = amax(tile) / 448."""
    if not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise ValueError(f"x must be a float/bf16/fp16 tensor to quantize, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"x must have at least 1 dim, got shape {tuple(x.shape)}")
    *lead, k = x.shape
    n_k = _ceil_div(k, block)
    x_pad = torch.nn.functional.pad(x.float(), (0, n_k * block - k))  # [..., nK*B]
    tiles = x_pad.view(*lead, n_k, block)  # [..., nK, B]
    amax = tiles.abs().amax(dim=-1, keepdim=True)  # [..., nK, 1]
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)  # [..., nK, 1]
    data = _quantize_scaled(tiles, scale).view(*lead, n_k * block)  # [..., nK*B]
    data = data[..., :k].contiguous()  # [..., K]
    return QuantizedActivation(data=data, scale=scale.squeeze(-1), block=block)  # scale [..., nK]


def dequantize_activation(q: QuantizedActivation, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """data.float() * scale broadcast per tile -> [..., K] in dtype."""
    _check_fp8("q.data", q.data)
    *lead, k = q.data.shape
    n_k = _ceil_div(k, q.block)
    _check_scale("q.scale", q.scale, (*lead, n_k), f"data {tuple(q.data.shape)} with block={q.block}")
    scale_full = q.scale.repeat_interleave(q.block, dim=-1)[..., :k]  # [..., K]
    return (q.data.float() * scale_full).to(dtype)


def quantize_weight(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize w [N, K] per block×block -> (w_fp8 [N, K], scale_inv [nN, nK] float32)."""
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {tuple(w.shape)}")
    if not w.is_floating_point() or w.dtype == FP8_DTYPE:
        raise ValueError(f"w must be a float/bf16/fp16 tensor to quantize, got {w.dtype}")
    n, k = w.shape
    n_n, n_k = _ceil_div(n, block), _ceil_div(k, block)
    w_pad = torch.nn.functional.pad(w.float(), (0, n_k * block - k, 0, n_n * block - n))  # [nN*B, nK*B]
    blocks = w_pad.view(n_n, block, n_k, block)  # [nN, B, nK, B]
    amax = blocks.abs().amax(dim=(1, 3), keepdim=True)  # [nN, 1, nK, 1]
    scale_inv = (amax / FP8_MAX).clamp(min=MIN_SCALE)  # [nN, 1, nK, 1]
    w_fp8 = _quantize_scaled(blocks, scale_inv).view(n_n * block, n_k * block)  # [nN*B, nK*B]
    w_fp8 = w_fp8[:n, :k].contiguous()  # [N, K]
    return w_fp8, scale_inv.view(n_n, n_k)  # scale_inv [nN, nK]


def _expand_block_scale(scale_inv: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """[nN, nK] -> [N, K] by repeating each block scale over its block."""
    s = scale_inv.repeat_interleave(block, dim=0)[:n]  # [N, nK]
    return s.repeat_interleave(block, dim=1)[:, :k]  # [N, K]


def dequantize_weight(
    w_fp8: torch.Tensor,
    scale_inv: torch.Tensor,
    block: int = BLOCK,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """w_fp8 [N, K] * scale_inv [nN, nK] (per block) -> [N, K] in dtype."""
    _check_fp8("w_fp8", w_fp8)
    if w_fp8.dim() != 2:
        raise ValueError(f"w_fp8 must be 2-D [N, K], got shape {tuple(w_fp8.shape)}")
    n, k = w_fp8.shape
    expected = (_ceil_div(n, block), _ceil_div(k, block))
    _check_scale("scale_inv", scale_inv, expected, f"ceil(N/{block})×ceil(K/{block}) for weight {(n, k)}")
    return (w_fp8.float() * _expand_block_scale(scale_inv, n, k, block)).to(dtype)


# ---------------------------------------------------------------------------------- GEMM


def _to_k_blocks(t_fp8: torch.Tensor, rows: int, n_k: int, block: int) -> torch.Tensor:
    """[R, K] fp8 -> zero-padded [nK, rows, B] fp8, each K block contiguous row-major."""
    t_pad = _pad_fp8(t_fp8, rows, n_k * block)  # [rows, nK*B]
    t_u8 = t_pad.view(torch.uint8).view(rows, n_k, block)  # [rows, nK, B]
    return t_u8.permute(1, 0, 2).contiguous().view(FP8_DTYPE)  # [nK, rows, B]


def _gemm_scaled_mm(
    x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_col_scale: torch.Tensor, block: int
) -> torch.Tensor:
    """Per-K-block torch._scaled_mm with row-wise scales, FP32 accumulation -> [M, N]."""
    m, n = x_fp8.shape[0], w_fp8.shape[0]
    n_k = x_scale.shape[1]
    m_pad, n_pad = _round_up(m, SCALED_MM_ALIGN), _round_up(n, SCALED_MM_ALIGN)
    x_blocks = _to_k_blocks(x_fp8, m_pad, n_k, block)  # [nK, Mp, B]
    w_blocks = _to_k_blocks(w_fp8, n_pad, n_k, block)  # [nK, Np, B]
    # padded rows/cols have zero data; scale 1 keeps them finite
    sx = torch.nn.functional.pad(x_scale, (0, 0, 0, m_pad - m), value=1.0)  # [Mp, nK]
    sw = torch.nn.functional.pad(w_col_scale, (0, 0, 0, n_pad - n), value=1.0)  # [Np, nK]
    sx_blocks = sx.t().contiguous().unsqueeze(-1)  # [nK, Mp, 1]
    sw_blocks = sw.t().contiguous().unsqueeze(1)  # [nK, 1, Np]
    out = torch.zeros(m_pad, n_pad, dtype=torch.float32, device=x_fp8.device)  # [Mp, Np]
    for kb in range(n_k):
        out += torch._scaled_mm(
            x_blocks[kb],  # [Mp, B] row-major
            w_blocks[kb].t(),  # [B, Np] column-major
            scale_a=sx_blocks[kb],  # [Mp, 1]
            scale_b=sw_blocks[kb],  # [1, Np]
            out_dtype=torch.float32,
        )
    return out[:m, :n]  # [M, N]


def _gemm_emulated(
    x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_col_scale: torch.Tensor, block: int
) -> torch.Tensor:
    """FP8 blocks upcast to FP32, one scaled product per K block accumulated in FP32 -> [M, N].

    The row scale (x tile) and column scale (w block) are folded into the upcast operands
    before each block product: diag(sx) (x_k @ w_k.T) diag(sw) == (sx * x_k) @ (sw * w_k).T,
    equal up to FP32 rounding (~1e-7 relative), and no [nK, M, N] partials are materialised.
    """
    m, n = x_fp8.shape[0], w_fp8.shape[0]
    n_k = x_scale.shape[1]
    x_blocks = _to_k_blocks(x_fp8, m, n_k, block).float()  # [nK, M, B]
    w_blocks = _to_k_blocks(w_fp8, n, n_k, block).float()  # [nK, N, B]
    x_blocks.mul_(x_scale.t().unsqueeze(-1))  # [nK, M, B] * [nK, M, 1]
    w_blocks.mul_(w_col_scale.t().unsqueeze(-1))  # [nK, N, B] * [nK, N, 1]
    out = torch.zeros(m, n, dtype=torch.float32, device=x_fp8.device)  # [M, N]
    for kb in range(n_k):
        out.addmm_(x_blocks[kb], w_blocks[kb].t())  # [M, B] @ [B, N], promoted into FP32 out
    return out


_GEMMS = {"scaled_mm": _gemm_scaled_mm, "emulated": _gemm_emulated}


@functools.lru_cache(maxsize=None)
def _probe_backend(device_type: str) -> Backend:
    """Try one tiny row-wise-scaled torch._scaled_mm on device_type; cached per device type.

    On CUDA, row-wise scales with FP32 output need cuBLAS on SM 9.0 (H100) with CUDA >= 12.9;
    elsewhere torch only offers bf16 output for row-wise scaling, and this falls back to emulation.
    """
    if not hasattr(torch, "_scaled_mm"):
        return "emulated"
    try:
        a = torch.ones(SCALED_MM_ALIGN, BLOCK, device=device_type).to(FP8_DTYPE)  # [16, B]
        b = torch.ones(SCALED_MM_ALIGN, BLOCK, device=device_type).to(FP8_DTYPE)  # [16, B]
        sa = torch.full((SCALED_MM_ALIGN, 1), 0.5, device=device_type)  # [16, 1]
        sb = torch.full((1, SCALED_MM_ALIGN), 2.0, device=device_type)  # [1, 16]
        out = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
        ok = out.dtype == torch.float32 and bool(torch.allclose(out, torch.full_like(out, BLOCK)))
    except Exception:  # any failure of the probe (no kernel, no device, fp32 out unsupported) -> emulate
        return "emulated"
    return "scaled_mm" if ok else "emulated"


def fp8_backend(device: torch.device | str | None = None) -> Backend:
    """The FP8 GEMM path used on device (default: cuda if available, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _probe_backend(torch.device(device).type)


def fp8_gemm(
    x_q: QuantizedActivation,
    w_fp8: torch.Tensor,
    w_scale_inv: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    backend: BackendChoice = "auto",
) -> torch.Tensor:
    """x [M, K] @ w [N, K].T with per-K-block FP32 promotion -> [M, N] in out_dtype.

    The weight must be blocked with the activation's block size (x_q.block, 128 by default).
    backend="auto" uses fp8_backend(device); naming an unavailable backend raises ValueError.
    """
    x_fp8, x_scale, block = x_q.data, x_q.scale, x_q.block
    _check_fp8("x_q.data", x_fp8)
    _check_fp8("w_fp8", w_fp8)
    if x_fp8.dim() != 2 or w_fp8.dim() != 2:
        raise ValueError(
            f"fp8_gemm wants x [M, K] and w [N, K], got {tuple(x_fp8.shape)} and {tuple(w_fp8.shape)}"
        )
    (m, k), (n, k_w) = x_fp8.shape, w_fp8.shape
    if k != k_w:
        raise ValueError(f"x K={k} does not match w K={k_w} (x {(m, k)}, w {(n, k_w)})")
    n_k = _ceil_div(k, block)
    _check_scale("x_q.scale", x_scale, (m, n_k), f"ceil(K/{block}) tiles per row of x {(m, k)}")
    _check_scale(
        "w_scale_inv", w_scale_inv, (_ceil_div(n, block), n_k),
        f"ceil(N/{block})×ceil(K/{block}) for weight {(n, k)}",
    )
    chosen = fp8_backend(x_fp8.device) if backend == "auto" else backend
    if chosen not in _GEMMS:
        raise ValueError(f"backend={backend!r} is not one of 'auto', 'scaled_mm', 'emulated'")
    if chosen == "scaled_mm" and fp8_backend(x_fp8.device) != "scaled_mm":
        raise ValueError(f"backend='scaled_mm' is unavailable on {x_fp8.device}; use 'auto' or 'emulated'")
    w_col_scale = w_scale_inv.repeat_interleave(block, dim=0)[:n]  # [N, nK]
    out = _GEMMS[chosen](x_fp8, x_scale, w_fp8, w_col_scale, block)  # [M, N] float32
    return out.to(out_dtype)


def fp8_linear(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: BackendChoice = "auto",
) -> torch.Tensor:
    """y = x @ w.T + bias for x [..., K] (quantized here per 1×128 tile) -> [..., N] in x.dtype."""
    *lead, k = x.shape
    x_MK = x.reshape(-1, k)  # [M, K]
    y_MN = fp8_gemm(quantize_activation(x_MK), w_fp8, w_scale_inv, torch.float32, backend)  # [M, N]
    if bias is not None:
        y_MN = y_MN + bias.float()  # [M, N]
    return y_MN.reshape(*lead, w_fp8.shape[0]).to(x.dtype)  # [..., N]


class FP8Linear(nn.Module):
    """Linear layer with an FP8 weight and per-128×128-block scales.

    Parameters are named like DeepSeek-V3 FP8 checkpoints:
      weight:           Shape [N, K], float8_e4m3fn (frozen)
      weight_scale_inv: Shape [nN, nK], float32 (frozen); real ≈ weight.float() * scale per block
      bias:             Shape [N], dtype given at construction, or None
    Move with ``.to(device)`` only: ``.to(dtype)`` would cast the FP8 weight too.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        n_n, n_k = _ceil_div(out_features, BLOCK), _ceil_div(in_features, BLOCK)
        weight = torch.zeros(out_features, in_features, device=device).to(FP8_DTYPE)  # [N, K]
        self.weight = nn.Parameter(weight, requires_grad=False)
        scale = torch.ones(n_n, n_k, dtype=torch.float32, device=device)  # [nN, nK]
        self.weight_scale_inv = nn.Parameter(scale, requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        """Quantize an existing nn.Linear (weight [N, K]) per 128×128 block."""
        w_fp8, scale_inv = quantize_weight(linear.weight.detach())
        has_bias = linear.bias is not None
        bias_dtype = linear.bias.dtype if has_bias else torch.float32
        layer = cls(linear.in_features, linear.out_features, has_bias, bias_dtype, linear.weight.device)
        with torch.no_grad():
            layer.weight.copy_(w_fp8)
            layer.weight_scale_inv.copy_(scale_inv)
            if has_bias:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x last dim {x.shape[-1]} != in_features={self.in_features}")
        if self.weight.dtype != FP8_DTYPE or self.weight_scale_inv.dtype != torch.float32:
            raise ValueError(
                f"weight dtype {self.weight.dtype} / weight_scale_inv dtype {self.weight_scale_inv.dtype}"
                f" must be {FP8_DTYPE} / float32; move FP8Linear with .to(device), not .to(dtype)"
            )
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.bias)  # [..., N]

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The real-valued weight [N, K] in dtype."""
        return dequantize_weight(self.weight, self.weight_scale_inv, BLOCK, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's 1 - 2·Σ(x·y) / Σ(x² + y²) in float64; 0 for identical (also all-zero) inputs."""
    if x.shape != y.shape:
        raise ValueError(f"calc_diff needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    x64, y64 = x.double(), y.double()
    denom = (x64 * x64 + y64 * y64).sum()
    if denom.item() == 0.0:  # NOTE: .item() syncs GPU→host
        return 0.0
    return float(1.0 - 2.0 * (x64 * y64).sum() / denom)
