"""FP8 e4m3 fine-grained quantization and block-scaled GEMM (expertmesh.model.fp8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from expertmesh.model import fp8
from expertmesh.model.fp8 import (
    BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    FP8Linear,
    QuantizedActivation,
    calc_diff,
    dequantize_activation,
    dequantize_weight,
    fp8_backend,
    fp8_gemm,
    fp8_linear,
    quantize_activation,
    quantize_weight,
)

# e4m3: 3 mantissa bits -> round-to-nearest error <= 2^-4 of the value for normals;
# subnormals (below 2^-6 in scaled units) have a fixed step 2^-9 -> abs error <= 2^-10.
REL_ERR_E4M3 = 2.0**-4
SUBNORMAL_HALF_STEP = 2.0**-10
SCALED_MM_SKIP = pytest.mark.skipif(
    fp8_backend("cpu") != "scaled_mm",
    reason="torch._scaled_mm with row-wise FP32-output scales is unavailable on this build",
)
BACKENDS = [
    pytest.param("emulated"),
    pytest.param("scaled_mm", marks=SCALED_MM_SKIP),
]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_within_e4m3_bound(x: torch.Tensor, x_deq: torch.Tensor, amax_full: torch.Tensor) -> None:
    """|x - deq| <= |x|/16 + half a subnormal step (in real units), and <= amax/16 of the tile."""
    scale = amax_full / FP8_MAX
    err = (x - x_deq).abs()
    bound = x.abs() * REL_ERR_E4M3 * (1 + 1e-5) + scale * SUBNORMAL_HALF_STEP + 1e-30
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3e}"
    assert bool((err <= amax_full * REL_ERR_E4M3 + 1e-30).all())


@pytest.mark.parametrize("shape", [(4, 256), (3, 5, 300), (7, 1), (2, 128)])
def test_activation_round_trip_within_tile_bound(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, generator=_gen()) * torch.logspace(-3, 3, shape[-1])
    q = quantize_activation(x)
    n_k = -(-shape[-1] // BLOCK)
    assert q.data.dtype == FP8_DTYPE and q.data.shape == x.shape
    assert q.scale.dtype == torch.float32 and q.scale.shape == (*shape[:-1], n_k)
    x_deq = dequantize_activation(q)
    tiles_amax = torch.stack(
        [x[..., j * BLOCK:(j + 1) * BLOCK].abs().amax(-1) for j in range(n_k)], dim=-1
    )  # [..., nK]
    amax_full = tiles_amax.repeat_interleave(BLOCK, dim=-1)[..., : shape[-1]]  # [..., K]
    _assert_within_e4m3_bound(x, x_deq, amax_full)
    # the tile maximum maps onto ±448 exactly, so it comes back to fp32 precision
    assert torch.allclose(x_deq.abs().amax(-1), x.abs().amax(-1), rtol=1e-6)


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (1, 129), (130, 7)])
def test_weight_round_trip_within_block_bound(shape: tuple[int, int]) -> None:
    w = torch.randn(*shape, generator=_gen(1))
    w_fp8, scale_inv = quantize_weight(w)
    n_n, n_k = -(-shape[0] // BLOCK), -(-shape[1] // BLOCK)
    assert w_fp8.dtype == FP8_DTYPE and w_fp8.shape == w.shape
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (n_n, n_k)
    w_deq = dequantize_weight(w_fp8, scale_inv)
    amax_full = (scale_inv * FP8_MAX).repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    amax_full = amax_full[: shape[0], : shape[1]]  # [N, K]
    _assert_within_e4m3_bound(w, w_deq, amax_full)
    assert dequantize_weight(w_fp8, scale_inv, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_zero_tensors_quantize_to_zero() -> None:
    q = quantize_activation(torch.zeros(3, 200))
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    assert (dequantize_activation(q) == 0).all()
    w_fp8, scale_inv = quantize_weight(torch.zeros(130, 140))
    assert torch.isfinite(scale_inv).all()
    assert (dequantize_weight(w_fp8, scale_inv) == 0).all()
    y = fp8_linear(torch.zeros(2, 140), w_fp8, scale_inv)
    assert y.shape == (2, 130) and (y == 0).all()


def test_outlier_block_does_not_hurt_other_blocks() -> None:
    w = torch.randn(256, 384, generator=_gen(2)) * 0.02
    w_outlier = w.clone()
    w_outlier[3, 5] = 1.0e3  # in block (0, 0) only
    w_fp8, scale_inv = quantize_weight(w_outlier)
    w_deq = dequantize_weight(w_fp8, scale_inv)
    others = torch.ones_like(w, dtype=torch.bool)
    others[:BLOCK, :BLOCK] = False
    # every other block keeps e4m3 precision relative to its own amax ...
    rel_err = (w_deq - w).abs()[others].max() / w[others].abs().max()
    assert rel_err <= REL_ERR_E4M3
    # ... and is quantized bit-for-bit as if the outlier were absent
    w_fp8_clean, scale_inv_clean = quantize_weight(w)
    assert torch.equal(w_fp8.view(torch.uint8)[others], w_fp8_clean.view(torch.uint8)[others])
    assert torch.equal(scale_inv.flatten()[1:], scale_inv_clean.flatten()[1:])
    assert calc_diff(w_deq[others], w[others]) < 1e-3
    # a single tensor-wide scale would instead push the small weights into subnormals
    tensor_scale = w_outlier.abs().max() / FP8_MAX
    w_tensorwise = (w_outlier / tensor_scale).to(FP8_DTYPE).float() * tensor_scale
    assert calc_diff(w_tensorwise[others], w[others]) > 4 * calc_diff(w_deq[others], w[others])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_gemm_matches_fp32_reference(backend: str) -> None:
    m, n, k = 256, 512, 1024
    x = torch.randn(m, k, generator=_gen(3))
    w = torch.randn(n, k, generator=_gen(4)) * 0.05
    w_fp8, scale_inv = quantize_weight(w)
    y = fp8_gemm(quantize_activation(x), w_fp8, scale_inv, backend=backend)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert calc_diff(y, x @ w.t()) < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_gemm_equals_dequantized_matmul_on_ragged_shapes(backend: str) -> None:
    m, n, k = 5, 200, 300  # none a multiple of 16 or 128
    x_q = quantize_activation(torch.randn(m, k, generator=_gen(5)))
    w_fp8, scale_inv = quantize_weight(torch.randn(n, k, generator=_gen(6)))
    y = fp8_gemm(x_q, w_fp8, scale_inv, out_dtype=torch.bfloat16, backend=backend)
    ref = dequantize_activation(x_q) @ dequantize_weight(w_fp8, scale_inv).t()
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), ref, rtol=1e-2, atol=1e-2)
    y32 = fp8_gemm(x_q, w_fp8, scale_inv, backend=backend)
    assert torch.allclose(y32, ref, rtol=1e-4, atol=1e-4)


@SCALED_MM_SKIP
def test_scaled_mm_and_emulated_backends_agree() -> None:
    x_q = quantize_activation(torch.randn(96, 640, generator=_gen(7)) * 3)
    w_fp8, scale_inv = quantize_weight(torch.randn(272, 640, generator=_gen(8)))
    y_mm = fp8_gemm(x_q, w_fp8, scale_inv, backend="scaled_mm")
    y_em = fp8_gemm(x_q, w_fp8, scale_inv, backend="emulated")
    assert torch.allclose(y_mm, y_em, rtol=1e-5, atol=1e-4)
    assert calc_diff(y_mm, y_em) < 1e-10


def test_backend_is_probed_once_and_named() -> None:
    assert fp8_backend("cpu") in ("scaled_mm", "emulated")
    assert fp8_backend() == fp8_backend()
    assert fp8._probe_backend.cache_info().currsize >= 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp8_linear_handles_leading_dims_bias_and_dtype(backend: str, with_bias: bool) -> None:
    x = torch.randn(2, 3, 200, generator=_gen(9)).to(torch.bfloat16)  # M=6, not a multiple of 16
    w = torch.randn(72, 200, generator=_gen(10)) * 0.1
    bias = torch.randn(72, generator=_gen(11)) if with_bias else None
    w_fp8, scale_inv = quantize_weight(w)
    y = fp8_linear(x, w_fp8, scale_inv, bias, backend=backend)
    assert y.shape == (2, 3, 72) and y.dtype == torch.bfloat16
    ref = x.float() @ w.t() + (bias if bias is not None else 0.0)
    assert calc_diff(y.float(), ref) < 1e-3


def test_fp8linear_from_linear_matches_fp32_linear() -> None:
    torch.manual_seed(12)
    linear = nn.Linear(384, 272, bias=True)
    layer = FP8Linear.from_linear(linear)
    x = torch.randn(4, 16, 384)
    with torch.no_grad():
        assert calc_diff(layer(x), linear(x)) < 1e-3
    assert set(layer.state_dict()) == {"weight", "weight_scale_inv", "bias"}
    assert layer.weight.dtype == FP8_DTYPE and layer.weight.shape == (272, 384)
    assert layer.weight_scale_inv.shape == (3, 3) and layer.weight_scale_inv.dtype == torch.float32
    assert calc_diff(layer.dequantized_weight(), linear.weight.detach()) < 1e-3
    assert not any(p.requires_grad for name, p in layer.named_parameters() if name != "bias")


def test_fp8linear_loads_checkpoint_style_state_dict() -> None:
    w_fp8, scale_inv = quantize_weight(torch.randn(130, 260, generator=_gen(13)))
    layer = FP8Linear(260, 130)
    layer.load_state_dict({"weight": w_fp8, "weight_scale_inv": scale_inv})
    assert torch.equal(layer.dequantized_weight(), dequantize_weight(w_fp8, scale_inv))
    with pytest.raises(ValueError, match=r"\.to\(device\)"):
        layer.to(torch.bfloat16)(torch.randn(1, 260))


def test_bad_scale_shape_names_both_shapes() -> None:
    w_fp8, scale_inv = quantize_weight(torch.randn(200, 300, generator=_gen(14)))
    x_q = quantize_activation(torch.randn(4, 300, generator=_gen(15)))
    bad = scale_inv[:, :2].contiguous()  # [2, 2] instead of [2, 3]
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\)"):
        fp8_gemm(x_q, w_fp8, bad)
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\)"):
        dequantize_weight(w_fp8, bad)
    bad_x = QuantizedActivation(data=x_q.data, scale=x_q.scale[:, :1].contiguous())
    with pytest.raises(ValueError, match=r"\(4, 1\).*\(4, 3\)"):
        fp8_gemm(bad_x, w_fp8, scale_inv)


def test_wrong_dtypes_and_shapes_raise() -> None:
    w_fp8, scale_inv = quantize_weight(torch.randn(128, 256, generator=_gen(16)))
    x_q = quantize_activation(torch.randn(4, 256, generator=_gen(17)))
    with pytest.raises(ValueError, match="float8_e4m3fn.*float32"):
        fp8_gemm(x_q, w_fp8.float(), scale_inv)
    with pytest.raises(ValueError, match="float32.*bfloat16"):
        fp8_gemm(x_q, w_fp8, scale_inv.bfloat16())
    with pytest.raises(ValueError, match="K=256.*K=128"):
        fp8_gemm(x_q, w_fp8[:, :128].contiguous(), scale_inv[:, :1].contiguous())
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="int64"):
        quantize_activation(torch.arange(10))
    with pytest.raises(ValueError, match="backend='nope'"):
        fp8_gemm(x_q, w_fp8, scale_inv, backend="nope")  # type: ignore[arg-type]


def test_calc_diff() -> None:
    x = torch.randn(64, generator=_gen(18))
    assert calc_diff(x, x) == pytest.approx(0.0, abs=1e-12)
    assert calc_diff(x, -x) == pytest.approx(2.0)
    assert calc_diff(torch.zeros(3), torch.zeros(3)) == 0.0
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        calc_diff(torch.zeros(3), torch.zeros(4))
