"""The fused CPU kernels (``model/cpu_kernels.py``) against the eager ops they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from expertmesh.model import cpu_kernels
from expertmesh.model.layers import RMSNorm


@pytest.fixture(scope="module")
def kernels():
    k = cpu_kernels.kernels()
    assert k is not None, "the CPU kernels did not build here (g++ and ninja are needed; see the README)"
    return k


def _reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return (w.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)).float()


@pytest.mark.parametrize("shape", [(1, 1, 256), (1, 16, 256), (16, 128), (1, 2048, 256), (3, 5, 64), (2, 7)])
def test_rms_norm_agrees_with_eager_to_rounding(kernels, shape):
    torch.manual_seed(0)
    x, w = torch.randn(*shape) * 3, torch.randn(shape[-1])
    fused = kernels.rms_norm(x, w, 1e-6)
    eager = F.rms_norm(x, (shape[-1],), w, 1e-6)
    assert fused.shape == x.shape and fused.dtype == torch.float32
    torch.testing.assert_close(fused, eager, rtol=1e-6, atol=1e-6)
    # no further from the float64 result than the eager composite is
    ref = _reference(x, w, 1e-6)
    assert (fused - ref).abs().max() <= 2 * (eager - ref).abs().max() + 1e-7


def test_rms_norm_reads_non_contiguous_inputs(kernels):
    x = torch.randn(8, 512)[:, ::2]  # [8, 256], stride 2
    w = torch.randn(512)[::2]
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), F.rms_norm(x, (256,), w, 1e-5), rtol=1e-6, atol=1e-6)


def test_rms_norm_bf16_matches_the_modules_bf16_form(kernels):
    torch.manual_seed(2)
    norm = RMSNorm(256).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(16, 256) * 4).bfloat16()
    with torch.inference_mode():
        fused = cpu_kernels.fused_rms_norm(x, norm.weight, norm.eps)
        eager = norm.weight * F.rms_norm(x.float(), (256,), None, norm.eps).to(torch.bfloat16)
    assert fused is not None and fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused, eager)  # BF16 tolerances: the sum of squares may round differently
    assert (fused != eager).float().mean() < 0.01


def test_rms_norm_rejects_mismatched_weight_and_dtype(kernels):
    with pytest.raises(RuntimeError, match="weight must be Float"):
        kernels.rms_norm(torch.randn(2, 8), torch.randn(4), 1e-6)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 CPU input"):
        kernels.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.randn(8), 1e-6)


def test_module_uses_the_kernel_only_in_fp32_inference(kernels):
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 64)
    with torch.inference_mode():
        assert cpu_kernels.fused_rms_norm(x, norm.weight, norm.eps) is not None
        torch.testing.assert_close(norm(x), F.rms_norm(x, (64,), norm.weight, norm.eps), rtol=1e-6, atol=1e-6)
        assert cpu_kernels.fused_rms_norm(x.bfloat16(), norm.weight, norm.eps) is None  # mixed dtypes: eager
    # training: the eager graph, so gradients flow
    assert cpu_kernels.fused_rms_norm(x, norm.weight, norm.eps) is None
    norm(x.requires_grad_()).sum().backward()
    assert norm.weight.grad is not None and x.grad is not None


def test_switch_off_gives_the_eager_result_bit_for_bit(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    norm = RMSNorm(256)
    x = torch.randn(16, 256)
    with torch.inference_mode():
        assert cpu_kernels.fused_rms_norm(x, norm.weight, norm.eps) is None
        assert torch.equal(norm(x), F.rms_norm(x, (256,), norm.weight, norm.eps))
    assert "off" in cpu_kernels.status()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("shape", [(1, 16, 5, 16), (2, 7, 4, 8), (1, 1, 16), (3, 9, 64)])
def test_rope_equals_eager_bit_for_bit(kernels, shape, interleave, dtype):
    from expertmesh.model.rope import apply_rope

    torch.manual_seed(1)
    x = torch.randn(*shape).to(dtype)
    R = shape[-1]
    table = torch.randn(shape[0], shape[1], R).to(dtype)  # cos then sin, as the engine's table lookup gives them
    cos, sin = table.chunk(2, dim=-1)  # strided views [B, S, R/2]
    with torch.inference_mode():
        fused = cpu_kernels.fused_rope(x, cos, sin, interleave)
        assert fused is not None
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(cpu_kernels.ENV_SWITCH, "0")
            eager = apply_rope(x, cos, sin, interleave)
    assert torch.equal(fused, eager)


def test_rope_falls_back_where_it_does_not_apply(kernels):
    x = torch.randn(2, 3, 4, 8)
    cos, sin = torch.randn(1, 3, 4), torch.randn(1, 3, 4)  # broadcast over the batch: eager handles it
    with torch.inference_mode():
        assert cpu_kernels.fused_rope(x, cos, sin, True) is None
        assert cpu_kernels.fused_rope(x.bfloat16(), cos, sin, True) is None
    assert cpu_kernels.fused_rope(x, torch.randn(2, 3, 4), torch.randn(2, 3, 4), True) is None  # autograd on
    with torch.inference_mode():  # no tokens: the eager ops (a [0, -1, R] view has no meaning)
        from expertmesh.model.rope import apply_rope

        empty, cos0 = torch.randn(1, 0, 4, 8), torch.randn(1, 0, 4)
        assert cpu_kernels.fused_rope(empty, cos0, cos0, True) is None
        assert apply_rope(empty, cos0, cos0, True).shape == empty.shape
    with pytest.raises(RuntimeError, match="rope: x"):
        kernels.rope(torch.randn(3, 2, 8), torch.randn(3, 3), torch.randn(3, 3), True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
def test_swiglu_agrees_with_eager(kernels, dtype, scaled):
    from expertmesh.model.layers import swiglu

    torch.manual_seed(3)
    h = (torch.randn(5, 8, 2 * 48) * 3).to(dtype)  # [E, T, 2F]: gate columns, then up
    scale = torch.rand(5, 8).to(dtype) if scaled else None
    eager = F.silu(h[..., :48]) * h[..., 48:]
    if scaled:
        eager = eager * scale[..., None]
    with torch.inference_mode():
        fused = cpu_kernels.fused_silu_mul(h, scale)
        assert fused is not None and fused.shape == (5, 8, 48) and fused.dtype == dtype
        torch.testing.assert_close(fused, eager, rtol=1e-6 if dtype == torch.float32 else None,
                                   atol=1e-6 if dtype == torch.float32 else None)
        torch.testing.assert_close(swiglu(h, scale), eager, rtol=1e-6 if dtype == torch.float32 else None,
                                   atol=1e-6 if dtype == torch.float32 else None)
        # a transposed view (the output-major dense expert kernel's [E, T, 2F]) and its [E, T] scale
        ht = h.transpose(0, 1).contiguous().transpose(0, 1)
        torch.testing.assert_close(cpu_kernels.fused_silu_mul(ht, scale), fused, rtol=0, atol=0)


def test_swiglu_keeps_the_eager_form_for_training_and_mismatched_scales(kernels):
    from expertmesh.model.layers import swiglu

    h = torch.randn(4, 8, requires_grad=True)
    swiglu(h).sum().backward()  # autograd: eager ops, gradients flow
    assert h.grad is not None
    with torch.inference_mode():
        big = torch.randn(cpu_kernels.SILU_MUL_MAX_OUTPUTS // 64 + 1, 128)  # past the size the scalar exp pays
        assert cpu_kernels.fused_silu_mul(big) is None
        torch.testing.assert_close(swiglu(big), F.silu(big[:, :64]) * big[:, 64:], rtol=0, atol=0)
        assert cpu_kernels.fused_silu_mul(torch.randn(4, 8), torch.rand(4, dtype=torch.float64)) is None
        assert cpu_kernels.fused_silu_mul(torch.randn(4, 8), torch.rand(3)) is None
    with pytest.raises(RuntimeError, match="silu_mul"):
        kernels.silu_mul(torch.randn(4, 7), None)  # odd width: no gate/up halves
