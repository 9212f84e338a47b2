"""Tiny random DeepSeek-V3 checkpoints written by transformers, for parity tests.

Nothing is downloaded: each checkpoint is built from a config here, given weights large
enough that routing and attention are far from uniform, and saved with ``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

BASE: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    q_lora_rank=None,
    kv_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    max_position_embeddings=256,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    tie_word_embeddings=False,
)

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

# Named variations the parity tests sweep: each config branch of the model gets one.
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "q_lora": {"q_lora_rank": 24},
    "yarn": {"rope_scaling": YARN},
    "yarn_q_lora_all_moe": {"rope_scaling": YARN, "q_lora_rank": 16, "first_k_dense_replace": 0},
    "no_groups": {"n_group": 1, "topk_group": 1},
    "two_shared_no_norm": {"n_shared_experts": 2, "norm_topk_prob": False, "first_k_dense_replace": 2},
    "no_shared_8_groups": {"n_shared_experts": 0, "n_routed_experts": 16, "n_group": 8, "topk_group": 3,
                           "num_experts_per_tok": 4},
    "not_interleaved": {"rope_interleave": False},
}


def make_hf_model(seed: int = 0, **overrides: Any):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = dict(BASE)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 0:  # transformers builds a zero-width MLP when n_shared_experts == 0
                continue
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5) * 2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def save_hf_checkpoint(path: Path, seed: int = 0, **overrides: Any) -> Path:
    model = make_hf_model(seed, **overrides)
    model.save_pretrained(path)
    return path
