"""FP8 checkpoints in DeepSeek's released layout: e4m3 weights + 128×128 ``weight_scale_inv``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import train_tiny

from expertmesh.engine import LLM, SamplingParams
from expertmesh.model import load_pretrained, save_pretrained
from expertmesh.model.fp8 import FP8Linear, calc_diff, dequantize_weight, quantize_weight


@pytest.fixture(scope="module")
def dense_and_fp8(tmp_path_factory):
    # widths past one 128 block so the block grid is exercised: 192 = 1.5 blocks, 256 = 2
    model = train_tiny(steps=60, seed=1, hidden_size=192, intermediate_size=256, moe_intermediate_size=64,
                       kv_lora_rank=128)
    root = tmp_path_factory.mktemp("fp8")
    dense = save_pretrained(model, root / "dense")
    fp8 = save_pretrained(model, root / "fp8", quantization="fp8")
    return model, dense, fp8


def test_fp8_checkpoint_layout(dense_and_fp8):
    _, _, fp8 = dense_and_fp8
    cfg = json.loads((fp8 / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                          "activation_scheme": "dynamic"}
    with safe_open(str(fp8 / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.1.self_attn.kv_b_proj.weight")
        s = f.get_tensor("model.layers.1.self_attn.kv_b_proj.weight_scale_inv")
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        assert s.shape == (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
        assert f.get_tensor("lm_head.weight").dtype == torch.float32  # head and embeddings stay high precision
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32


def test_fp8_kept_in_fp8_matches_dequantized(dense_and_fp8):
    model, _, fp8 = dense_and_fp8
    kept = load_pretrained(fp8)  # auto: FP8 checkpoint stays FP8
    deq = load_pretrained(fp8, quantization="none")
    assert isinstance(kept.layers[1].self_attn.kv_b_proj, FP8Linear)
    assert isinstance(deq.layers[1].self_attn.kv_b_proj, torch.nn.Linear)
    # dequantized weights are exactly weight * scale_inv per block
    ref_w = model.layers[1].mlp.experts[3].up_proj.weight
    w8, s = quantize_weight(ref_w.detach())
    torch.testing.assert_close(deq.layers[1].mlp.experts[3].up_proj.weight, dequantize_weight(w8, s), rtol=0, atol=0)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits_kept, logits_deq, logits_ref = kept(ids), deq(ids), model(ids)
    # A whole network in FP8 accumulates the rounding of every layer: one GEMM is held to 1e-3
    # (test_fp8.py), the logits of the full model to 1e-2.
    assert calc_diff(logits_kept, logits_deq) < 1e-2  # differ only by 1×128 activation quantization
    assert calc_diff(logits_deq, logits_ref) < 1e-2


def test_dense_checkpoint_quantized_on_load(dense_and_fp8):
    model, dense, _ = dense_and_fp8
    q = load_pretrained(dense, quantization="fp8")
    assert isinstance(q.layers[0].mlp.gate_proj, FP8Linear)
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert calc_diff(q(ids), model(ids)) < 1e-2


def test_fp8_engine_greedy_agrees(dense_and_fp8):
    _, dense, fp8 = dense_and_fp8
    prompts = [[5, 8, 11, 14], [20, 22, 24, 26], [40, 43, 46], [7, 12, 17, 22]]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    a = [o.token_ids for o in LLM(dense).generate(prompts, params)]
    b = [o.token_ids for o in LLM(fp8, kv_cache_dtype="fp8").generate(prompts, params)]
    assert sum(x == y for x, y in zip(a, b)) >= 3, (a, b)


def test_fp8_weight_without_scale_is_refused(dense_and_fp8, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, _, fp8 = dense_and_fp8
    broken = tmp_path / "broken"
    shutil.copytree(fp8, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.2.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"o_proj\.weight' has no .*weight_scale_inv"):
        load_pretrained(broken)
