"""The DeepSeek-V3 decoder, single device: embeddings, MLA + (dense MLP | MoE) blocks, LM head.

Module names match Hugging Face checkpoints (``model.layers.N.self_attn.kv_b_proj.weight``,
``model.layers.N.mlp.experts.E.gate_proj.weight``, ``lm_head.weight``), so state dicts load
without renaming. Free of process groups: distribution lives outside ``model/``.

Shape letters: B batch, S positions, D hidden, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from expertmesh.model.config import ModelConfig
from expertmesh.model.layers import MLP, LinearFactory, RMSNorm, dense_linear, store_input_major
from expertmesh.model.mla import MLA, causal_mask
from expertmesh.model.moe import Gate, MoE
from expertmesh.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, linear: LinearFactory = dense_linear):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, linear)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module = (
            MoE(config, linear) if config.is_moe_layer(layer_idx)
            else MLP(config.hidden_size, config.intermediate_size, linear)
        )

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoE)

    def forward(
        self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed_BST: torch.Tensor | None,
        absorbed: bool = False,
    ) -> torch.Tensor:
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), cos, sin, allowed_BST, absorbed)
        return x_BSD + self.mlp(self.post_attention_layernorm(x_BSD))


class DecoderBody(nn.Module):
    """``model.*`` in checkpoints: embeddings, layers and the final norm."""

    def __init__(self, config: ModelConfig, linear: LinearFactory = dense_linear):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, linear) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekV3(nn.Module):
    """A DeepSeek-V3-architecture causal LM. ``forward(input_ids [B, S]) -> logits [B, S, V]``."""

    def __init__(self, config: ModelConfig, linear: LinearFactory = dense_linear):
        super().__init__()
        self.config = config
        self.model = DecoderBody(config, linear)
        # The LM head stays in high precision (DeepSeek keeps embedding and head out of FP8).
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.rope, config.qk_rope_head_dim, config.max_position_embeddings,
                                      config.rope_interleave)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def fuse_for_inference(self) -> None:
        """Re-home dense weights for fewer, larger GEMMs: each attention's two input projections
        as one, each dense MLP's gate and up as one, each MoE's experts (and same-width shared
        experts) stacked for grouped GEMMs, and wide weights (the lm_head) stored input-major where
        that runs faster (``layers.prefers_input_major``). Parameters become views into the fused
        tensors, so names, state dicts and in-place loads are unchanged; FP8 layers keep their own
        kernels."""
        if not self.config.tie_word_embeddings:  # a tied head shares the embedding's [V, D] table
            store_input_major(self.lm_head)
        for layer in self.model.layers:
            layer.self_attn.fuse_input_projections()
            if isinstance(layer.mlp, MoE):
                layer.mlp.stack_experts()
            else:
                layer.mlp.fuse_gate_up()

    def hidden_states(self, input_ids: torch.Tensor, absorbed: bool = False) -> torch.Tensor:
        """Final-norm hidden states [B, S, D] for a batch of full sequences (no cache)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        if S > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {S} exceeds max_position_embeddings={self.config.max_position_embeddings}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids must be in [0, vocab_size={self.config.vocab_size})")
        positions = torch.arange(S, device=input_ids.device).expand(B, S)
        cos, sin = self.rotary(positions, self.dtype)  # [B, S, R/2]
        allowed = causal_mask(S, input_ids.device)
        x = self.model.embed_tokens(input_ids)  # [B, S, D]
        for layer in self.model.layers:
            x = layer(x, cos, sin, allowed, absorbed)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, absorbed: bool = False) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, absorbed))

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init for fresh models (training from scratch, tests): normal(0, std), norms at 1."""
        for name, p in self.named_parameters():
            if p.dtype.is_floating_point and p.element_size() >= 2:
                if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                    nn.init.ones_(p)
                else:
                    with torch.no_grad():
                        p.normal_(0.0, std, generator=generator)
        for moe in self.moe_layers():
            moe.gate.e_score_correction_bias.zero_()


def build_model(config: ModelConfig, linear: LinearFactory = dense_linear, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> DeepseekV3:
    """Construct an uninitialised model on ``device`` (use ``init_weights`` or load a checkpoint)."""
    with torch.device(device):
        model = DeepseekV3(config, linear)
    cast_model(model, dtype)
    return model


def cast_model(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating tensors to ``dtype``, keeping in FP32 what must stay precise: FP8 weights
    and their scales, the gate (its weight, bias and load counter) and RoPE frequencies."""
    for module in model.modules():
        keep_all = isinstance(module, (Gate, RotaryEmbedding))
        fp8 = hasattr(module, "weight_scale_inv")
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if keep_all or (fp8 and name in ("weight", "weight_scale_inv")) or name == "tokens_per_expert":
                continue
            if t.dtype.is_floating_point and t.dtype != dtype:
                t.data = t.data.to(dtype)
