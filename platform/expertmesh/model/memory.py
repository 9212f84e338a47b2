"""KV-cache and parameter accounting: what MLA's latent cache saves.

Per token per layer, elements cached:
  MLA latent:  kv_lora_rank + qk_rope_head_dim            (V3: 512 + 64 = 576)
  MHA K/V:     heads · (qk_head_dim + v_head_dim)          (V3: 128 · (192 + 128) = 40,960)
  GQA-g K/V:   g · (qk_head_dim + v_head_dim)              (V3 shapes, g=8: 2,560)
DeepSeek-V3 (61 layers) in BF16: 576 · 2 · 61 = 70,272 B/token.
"""

from __future__ import annotations

from dataclasses import dataclass

from expertmesh.model.config import ModelConfig

FP8_TILE = 128


@dataclass(frozen=True)
class KVBytesPerToken:
    """Bytes one token occupies in the cache across all layers, by cache layout."""

    mla_bf16: int
    mla_fp8: int  # e4m3 entries + one float32 scale per 1×128 tile
    mla_fp32: int
    mha_bf16: int
    gqa8_bf16: int


def kv_bytes_per_token(config: ModelConfig, gqa_groups: int = 8) -> KVBytesPerToken:
    layers = config.num_hidden_layers
    width = config.kv_cache_dim
    tiles = -(-config.kv_lora_rank // FP8_TILE) + -(-config.qk_rope_head_dim // FP8_TILE)
    per_head = config.qk_head_dim + config.v_head_dim
    return KVBytesPerToken(
        mla_bf16=width * 2 * layers,
        mla_fp8=(width + 4 * tiles) * layers,
        mla_fp32=width * 4 * layers,
        mha_bf16=config.num_attention_heads * per_head * 2 * layers,
        gqa8_bf16=min(gqa_groups, config.num_attention_heads) * per_head * 2 * layers,
    )


@dataclass(frozen=True)
class ParameterCount:
    total: int
    active_per_token: int  # shared + top-k routed experts, attention, embeddings, head


def parameter_count(config: ModelConfig) -> ParameterCount:
    D = config.hidden_size
    q = (D * config.num_attention_heads * config.qk_head_dim if config.q_lora_rank is None else
         D * config.q_lora_rank + config.q_lora_rank + config.q_lora_rank * config.num_attention_heads
         * config.qk_head_dim)
    attn = (q + D * (config.kv_lora_rank + config.qk_rope_head_dim) + config.kv_lora_rank
            + config.kv_lora_rank * config.num_attention_heads * (config.qk_nope_head_dim + config.v_head_dim)
            + config.num_attention_heads * config.v_head_dim * D)
    expert = 3 * D * config.moe_intermediate_size
    dense_mlp = 3 * D * config.intermediate_size
    moe_total = config.n_routed_experts * expert + config.n_shared_experts * expert + config.n_routed_experts * D
    moe_active = (config.num_experts_per_tok + config.n_shared_experts) * expert + config.n_routed_experts * D
    n_moe = len(config.moe_layers)
    n_dense = config.num_hidden_layers - n_moe
    layers_common = config.num_hidden_layers * (attn + 2 * D) + n_dense * dense_mlp
    ends = config.vocab_size * D * (1 if config.tie_word_embeddings else 2) + D
    return ParameterCount(
        total=layers_common + n_moe * moe_total + ends,
        active_per_token=layers_common + n_moe * moe_active + ends,
    )


# The released DeepSeek-V3 shapes (config.json of deepseek-ai/DeepSeek-V3), for comparisons.
DEEPSEEK_V3 = ModelConfig(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, num_attention_heads=128, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
    n_group=8, topk_group=4, first_k_dense_replace=3, routed_scaling_factor=2.5, max_position_embeddings=163840,
)
