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


@pytest.fixture
def kernels_off(monkeypatch):
    """``EXPERTMESH_CPU_KERNELS=0`` for one test (the switch is read once per process)."""
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    cpu_kernels.enabled.cache_clear()
    yield
    cpu_kernels.enabled.cache_clear()  # read again once the variable is restored


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


def test_switch_off_gives_the_eager_result_bit_for_bit(kernels_off):
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
            cpu_kernels.enabled.cache_clear()
            eager = apply_rope(x, cos, sin, interleave)
        cpu_kernels.enabled.cache_clear()
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
        if cpu_kernels.avx512_supported():  # FP32 on AVX-512: the vectorised exp runs any size
            torch.testing.assert_close(cpu_kernels.fused_silu_mul(big), F.silu(big[:, :64]) * big[:, 64:])
        else:
            assert cpu_kernels.fused_silu_mul(big) is None
            torch.testing.assert_close(swiglu(big), F.silu(big[:, :64]) * big[:, 64:], rtol=0, atol=0)
        big_bf16 = big.bfloat16()  # BF16 keeps the scalar kernel, so the size cap
        assert cpu_kernels.fused_silu_mul(big_bf16) is None
        torch.testing.assert_close(swiglu(big_bf16), F.silu(big_bf16[:, :64]) * big_bf16[:, 64:], rtol=0, atol=0)
        assert cpu_kernels.fused_silu_mul(torch.randn(4, 8), torch.rand(4, dtype=torch.float64)) is None
        assert cpu_kernels.fused_silu_mul(torch.randn(4, 8), torch.rand(3)) is None
    with pytest.raises(RuntimeError, match="silu_mul"):
        kernels.silu_mul(torch.randn(4, 7), None)  # odd width: no gate/up halves


# ---- fused MoE experts ----------------------------------------------------------------------------

needs_avx512 = pytest.mark.skipif(not cpu_kernels.avx512_supported(),
                                  reason="the fused MoE kernel needs the built kernels and an AVX-512 CPU")


def _experts(E: int, D: int, F_: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random input-major expert weights: w13 [E, D, 2F] (gate then up), w2 [E, F, D]."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(E, D, 2 * F_, generator=g) * D ** -0.5).to(dtype),
            (torch.randn(E, F_, D, generator=g) * F_ ** -0.5).to(dtype))


def _expert_loop(x, ids, weights, w13, w2, num_routed):
    """The definition, in float64: each token's routed experts in expert order, then the shared ones."""
    F_ = w2.shape[1]
    x, w13, w2 = x.double(), w13.double(), w2.double()
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        chosen = sorted(zip(ids[t].tolist(), weights[t].tolist())) + [(e, 1.0) for e in range(num_routed, w13.shape[0])]
        for e, weight in chosen:
            h = x[t] @ w13[e]
            y[t] += weight * (F.silu(h[:F_]) * h[F_:]) @ w2[e]
    return y


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("D", "F_"), [(256, 192), (40, 24), (32, 16), (80, 56)],
                         ids=["demo", "tails", "narrow", "odd-blocks"])
@pytest.mark.parametrize(("tokens", "shared"), [(1, 1), (7, 0), (16, 1), (33, 2)])
def test_fused_moe_equals_the_expert_loop(D, F_, tokens, shared, dtype):
    """Column counts that are not multiples of the 16-wide vectors (masked tails), experts with more
    rows than one register tile (7 and 33 tokens over 4 experts), no, one and two shared experts."""
    num_routed, K = 4 if tokens > 1 else 8, 2
    w13, w2 = _experts(num_routed + shared, D, F_, dtype, seed=tokens)
    g = torch.Generator().manual_seed(D + F_)
    x = torch.randn(tokens, D, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(num_routed, generator=g)[:K] for _ in range(tokens)])
    weights = torch.rand(tokens, K, generator=g)
    with torch.inference_mode():
        out = cpu_kernels.fused_moe(x, ids, weights, w13, w2, num_routed)
    assert out is not None
    y, counts = out
    assert y.dtype == dtype and y.shape == (tokens, D)
    assert counts.tolist() == torch.bincount(ids.flatten(), minlength=num_routed).tolist()
    reference = _expert_loop(x, ids, weights, w13, w2, num_routed)
    # float32 throughout, one rounding to BF16 at the end
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(y.double(), reference, **tolerance)


@needs_avx512
def test_fused_moe_is_the_same_on_one_thread_and_two():
    """Threads split the output columns, never the experts: each token's sum runs in the same order."""
    w13, w2 = _experts(17, 256, 192, torch.float32, seed=1)
    x = torch.randn(16, 256)
    ids = torch.stack([torch.randperm(16)[:4] for _ in range(16)])
    weights = torch.rand(16, 4)
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            one = cpu_kernels.fused_moe(x, ids, weights, w13, w2, 16)[0]
            torch.set_num_threads(max(2, threads))
            two = cpu_kernels.fused_moe(x, ids, weights, w13, w2, 16)[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_avx512
def test_fused_moe_rejects_bad_ids_and_leaves_other_layouts_to_the_caller(kernels):
    w13, w2 = _experts(5, 32, 16, torch.float32, seed=0)
    x, weights = torch.randn(3, 32), torch.rand(3, 2)
    with torch.inference_mode():
        for bad in (4, -1):  # 4 is the shared expert: never a routed choice
            ids = torch.tensor([[0, 1], [2, bad], [3, 0]])
            with pytest.raises(RuntimeError, match=f"expert id {bad} outside \\[0, 4\\)"):
                cpu_kernels.fused_moe(x, ids, weights, w13, w2, 4)
        with pytest.raises(RuntimeError, match="ids \\[T, K\\] int64"):
            kernels.moe_experts(x, torch.zeros(3, 2, dtype=torch.int32), weights, w13, w2, 4)
        ids = torch.tensor([[0, 1], [2, 3], [3, 0]])
        assert cpu_kernels.fused_moe(x, ids, weights, w13.mT.contiguous().mT, w2, 4) is None  # output-major
        assert cpu_kernels.fused_moe(x.bfloat16(), ids, weights, w13, w2, 4) is None  # mixed dtypes
        assert cpu_kernels.fused_moe(x, ids, weights, w13, w2, 4) is not None
    assert cpu_kernels.fused_moe(x, ids, weights, w13, w2, 4) is None  # autograd on: training keeps its graph


@needs_avx512
def test_an_empty_batch_takes_another_expert_kernel():
    """The fused kernel skips empty inputs; StackedExperts must not choose it for them (it used to,
    and raised "the fused expert kernel cannot run here")."""
    from expertmesh.model.grouped_experts import StackedExperts

    w13, w2 = _experts(5, 32, 16, torch.float32, seed=0)
    stacked = StackedExperts(w13.mT, w2.mT, 4)
    empty = torch.randn(0, 32)
    with torch.inference_mode():
        assert not stacked.fused_ready(empty) and stacked.fused_ready(torch.randn(1, 32))
        out = stacked.forward(empty, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert out.y_TD.shape == (0, 32) and out.routed_counts_E.tolist() == [0, 0, 0, 0]


@needs_avx512
def test_switch_off_turns_the_fused_moe_off(monkeypatch):
    from expertmesh.model.grouped_experts import StackedExperts

    w13, w2 = _experts(5, 32, 16, torch.float32, seed=0)
    stacked = StackedExperts(w13.mT, w2.mT, 4)
    x = torch.randn(2, 32)
    with torch.inference_mode():
        assert stacked.input_major and stacked.fused_ready(x)
        try:
            monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
            cpu_kernels.enabled.cache_clear()
            assert not stacked.fused_ready(x) and cpu_kernels.fused_moe(x, torch.zeros(2, 1, dtype=torch.long),
                                                                        torch.ones(2, 1), w13, w2, 4) is None
        finally:
            monkeypatch.undo()
            cpu_kernels.enabled.cache_clear()


# ---- fused MoE routing --------------------------------------------------------------------------------

@pytest.mark.parametrize(("E", "n_group", "topk_group", "top_k", "normalize"), [
    (16, 4, 2, 4, True), (8, 2, 1, 3, True), (16, 1, 1, 4, False), (64, 8, 4, 8, True), (12, 3, 3, 2, True)],
    ids=["demo", "tiny", "ungrouped", "v3-like", "all-groups-kept"])
def test_fused_route_picks_what_the_gate_picks(kernels, E, n_group, topk_group, top_k, normalize):
    from expertmesh.model import ModelConfig
    from expertmesh.model.moe import Gate

    cfg = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                      num_hidden_layers=1, num_attention_heads=2, kv_lora_rank=8, qk_nope_head_dim=8,
                      qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=E, n_shared_experts=1,
                      num_experts_per_tok=top_k, n_group=n_group, topk_group=topk_group, norm_topk_prob=normalize,
                      routed_scaling_factor=2.5)
    gate = Gate(cfg)
    g = torch.Generator().manual_seed(E + top_k)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g))
        gate.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.1)
    x = torch.randn(37, 32, generator=g)
    eager = gate(x.requires_grad_(True))  # autograd on: the eager selection
    with torch.inference_mode():
        fused = gate(x.detach())
    assert torch.equal(fused.topk_ids_TK, eager.topk_ids_TK)
    torch.testing.assert_close(fused.topk_weights_TK, eager.topk_weights_TK.detach(), rtol=1e-6, atol=1e-7)


def test_fused_route_orders_ties_by_index_and_leaves_single_expert_groups_to_the_eager_form(kernels):
    scores = torch.tensor([[0.5, 0.7, 0.7, 0.1, 0.7, 0.2, 0.3, 0.3]])
    with torch.inference_mode():
        ids, weights = cpu_kernels.fused_moe_route(scores, torch.zeros(8), 1, 1, 3, False, 2.0)
        assert ids.tolist() == [[1, 2, 4]]  # three equal choices: the lower index first
        assert torch.equal(weights, torch.full((1, 3), 0.7) * 2.0)
        # groups of two: {0,1} 1.2, {2,3} 0.8, {4,5} 0.9, {6,7} 0.6 -> groups 0 and 2 kept
        ids, weights = cpu_kernels.fused_moe_route(scores, torch.zeros(8), 4, 2, 3, True, 1.0)
        assert ids.tolist() == [[1, 4, 0]]
        torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
        assert cpu_kernels.fused_moe_route(scores, torch.zeros(8), 8, 2, 3, True, 1.0) is None  # one expert a group
    assert cpu_kernels.fused_moe_route(scores, torch.zeros(8), 1, 1, 3, False, 1.0) is None  # autograd on


# ---- greedy argmax ------------------------------------------------------------------------------------

@needs_avx512
def test_fused_argmax_picks_what_torch_max_picks():
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(8192, generator=g), torch.randn(37, generator=g), torch.randn(1, generator=g)]
    tied = torch.zeros(100)
    tied[[17, 40, 99]] = 3.0  # three equal maxima: the first
    with_nan = torch.randn(50, generator=g)
    with_nan[[20, 33]] = float("nan")  # NaN counts as the maximum, the first one
    all_neg_inf = torch.full((20,), float("-inf"))
    neg_inf_but_one = all_neg_inf.clone()
    neg_inf_but_one[19] = -1e30
    with torch.inference_mode():
        for row in rows + [tied, with_nan, all_neg_inf, neg_inf_but_one]:
            for logits in (row[None], row.expand(3, -1)):
                fused = cpu_kernels.fused_argmax(logits)
                assert fused is not None and torch.equal(fused, logits.max(dim=-1).indices), row[:8]
        assert cpu_kernels.fused_argmax(torch.randn(2, 8).bfloat16()) is None
        assert cpu_kernels.fused_argmax(torch.randn(2, 0)) is None
    # the engine samples outside inference mode: autograd on does not matter for indices
    assert torch.is_grad_enabled() and torch.equal(cpu_kernels.fused_argmax(tied[None]), torch.tensor([17]))


@needs_avx512
def test_fp8_decode_of_the_attention_kernel_is_exact_for_every_code(kernels):
    codes = torch.arange(256, dtype=torch.uint8)
    expected = codes.view(torch.float8_e4m3fn).float()
    got = kernels.fp8_to_float(codes)
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan) and nan.sum() == 2  # S.1111.111
    assert torch.equal(got[~nan], expected[~nan])
    assert torch.equal(got[~nan].signbit(), expected[~nan].signbit())  # -0.0 kept
    assert torch.equal(kernels.fp8_to_float(codes[3:40].view(torch.float8_e4m3fn)), expected[3:40])  # a tail


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "out_features", "in_features"), [
    (1, 1, 7), (2, 31, 64), (5, 33, 96), (12, 64, 128), (13, 208, 256), (16, 8192, 256), (40, 100, 3)],
    ids=["one", "under-a-strip", "strip-and-one", "one-tile", "two-tiles", "lm-head", "four-tiles"])
def test_blocked_linear_is_linear(kernels, rows, out_features, in_features, dtype):
    """Widths that are not multiples of a strip (masked stores, zero padding), row counts over one,
    two and four register tiles; FP32 sums, one rounding to BF16."""
    from expertmesh.model.layers import block_columns

    g = torch.Generator().manual_seed(rows * out_features)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    w = torch.randn(out_features, in_features, generator=g).to(dtype)
    blocked = block_columns(w)
    assert blocked.shape == (-(-out_features // 32), in_features, 32) and blocked.is_contiguous()
    with torch.inference_mode():
        y = cpu_kernels.fused_linear(x.view(1, rows, in_features), blocked, out_features)
    assert y.dtype == dtype and y.shape == (1, rows, out_features)
    reference = x.double() @ w.double().T
    tolerance = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}
    torch.testing.assert_close(y[0].double(), reference, **tolerance)


@needs_avx512
def test_blocked_linear_is_the_same_on_one_thread_and_two(kernels):
    """Threads split the strips; each output is one dot product in input order either way."""
    from expertmesh.model.layers import block_columns

    x, w = torch.randn(16, 256), torch.randn(8192, 256)
    blocked = block_columns(w)
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            one = cpu_kernels.fused_linear(x, blocked, 8192)
            torch.set_num_threads(max(2, threads))
            two = cpu_kernels.fused_linear(x, blocked, 8192)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_avx512
def test_blocked_linear_rejects_a_weight_of_another_shape(kernels):
    from expertmesh.model.layers import block_columns

    blocked = block_columns(torch.randn(40, 16))  # two strips
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="does not hold 65 outputs of 16 inputs"):
            kernels.blocked_linear(torch.randn(2, 16), blocked, 65)
        with pytest.raises(RuntimeError, match="does not hold 32 outputs of 16 inputs"):
            kernels.blocked_linear(torch.randn(2, 16), blocked, 32)  # one strip's worth: the other is not padding
        with pytest.raises(RuntimeError, match="does not hold 40 outputs of 8 inputs"):
            kernels.blocked_linear(torch.randn(2, 8), blocked, 40)
        assert kernels.blocked_linear(torch.randn(0, 16), blocked, 40).shape == (0, 40)
    assert cpu_kernels.fused_linear(torch.randn(2, 16), blocked, 40) is None  # autograd on: the caller's GEMM


@needs_avx512
def test_blocked_weight_follows_in_place_updates_and_held_views():
    """The blocked copy is cached per weight and remade when the weight changes in place; fused
    weights kept as views (input-major) use it too, fresh views never do."""
    from expertmesh.model import layers

    w = torch.nn.Parameter(torch.randn(64, 32))
    x = torch.randn(4, 32)
    with torch.no_grad():
        first = layers.fast_linear(x, w, "blocked")
        w.mul_(2)  # e.g. a checkpoint loaded in place
        second = layers.fast_linear(x, w, "blocked")
    torch.testing.assert_close(second, F.linear(x, w.detach()))
    torch.testing.assert_close(second, 2 * first)
    fused = layers.fuse_linear_weights([torch.nn.Linear(256, 768, bias=False), torch.nn.Linear(256, 768, bias=False)])
    assert fused is not None and fused._base is not None  # input-major: a transposed view
    assert layers._outlives_call(fused) and not layers._outlives_call(fused[:8])


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layer_in_one_call_equals_the_gate_then_the_experts(dtype):
    """``MoE.forward`` on a decode batch runs gate, routing and experts in one call: the same
    outputs and load counts, bit for bit, as the gate module followed by ``fused_moe``; a hook on
    the gate keeps the module call (the hook runs)."""
    from expertmesh.model import ModelConfig
    from expertmesh.model.moe import MoE

    cfg = ModelConfig(vocab_size=16, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, kv_lora_rank=8, qk_nope_head_dim=8,
                      qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1,
                      num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    torch.manual_seed(3)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
    moe = moe.to(dtype)
    moe.gate.float()  # the gate stays FP32 (as DeepSeek keeps it)
    assert moe.stack_experts()
    x = torch.randn(1, 6, 64).to(dtype)
    calls = []
    fused_layer = cpu_kernels.fused_moe_layer
    with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "fused_moe_layer", lambda *a: calls.append(1) or fused_layer(*a))
        y = moe(x)
        counts = moe.tokens_per_expert.clone()
        assert calls == [1]
        gate = moe.gate(x[0])
        y_ref, counts_ref = cpu_kernels.fused_moe(x[0], gate.topk_ids_TK, gate.topk_weights_TK,
                                                  moe._stacked.w13_EDH, moe._stacked.w2_EFD, 8)
        assert torch.equal(y[0], y_ref) and torch.equal(counts, counts_ref.float())
        seen = []
        handle = moe.gate.register_forward_hook(lambda module, args, out: seen.append(out))
        assert torch.equal(moe(x), y) and len(seen) == 1 and calls == [1]  # the module path, same values
        handle.remove()


@needs_avx512
def test_kernels_release_the_gil_while_they_run(kernels):
    """The engine steps in a worker thread; a serving replica's event loop must keep running while
    a kernel does (with the GIL held, queue-full 503s waited for the running decode step). This
    thread's longest pause while another thread runs kernels stays well under one kernel call."""
    import threading
    import time

    from expertmesh.model.layers import block_columns

    x, blocked = torch.randn(64, 1024), block_columns(torch.randn(32768, 1024))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernel on one core, this thread free to run on another
    try:
        with torch.inference_mode():
            start = time.perf_counter()
            kernels.blocked_linear(x, blocked, 32768)
            call_s = time.perf_counter() - start  # tens of ms here
        started = threading.Event()

        def work():
            with torch.inference_mode():
                started.set()
                for _ in range(3):
                    kernels.blocked_linear(x, blocked, 32768)

        worker = threading.Thread(target=work)
        worker.start()
        started.wait()
        longest, last = 0.0, time.perf_counter()
        while worker.is_alive():
            now = time.perf_counter()
            longest, last = max(longest, now - last), now
        worker.join()
    finally:
        torch.set_num_threads(threads)
    assert longest < call_s / 2, (longest, call_s)


def test_a_build_lock_left_by_a_killed_process_does_not_stall_the_next_load(kernels):
    """Torch's build lock is a file: a process killed while it built (a Ray actor, a Ctrl-C in
    ``make venv``) left it behind, and every later process waited on it forever. The next load now
    takes the OS lock instead, removes the leftover and loads."""
    import subprocess
    import sys
    from pathlib import Path

    directory = Path(cpu_kernels._build_directory(cpu_kernels._build_name()))
    leftover = directory / "lock"
    killed = subprocess.Popen([sys.executable, "-c", "import os, sys, time; os.open(sys.argv[1], os.O_CREAT | "
                               "os.O_EXCL); print(flush=True); time.sleep(600)", str(leftover)], stdout=subprocess.PIPE)
    try:
        killed.stdout.readline()  # it holds torch's lock now
        killed.kill()
        killed.wait()
        assert leftover.exists()
        load = subprocess.run([sys.executable, "-c", "from expertmesh.model import cpu_kernels; "
                               "assert cpu_kernels.kernels() is not None"], capture_output=True, text=True, timeout=300)
        assert load.returncode == 0, load.stderr[-2000:]
        assert not leftover.exists() and "removed a build lock" in load.stderr
    finally:
        killed.kill()
        leftover.unlink(missing_ok=True)
