"""Multi-token prediction (MTP), depth 1, as in DeepSeek-V3 §2.2. Off by default.

The main model predicts token ``t+1`` from position ``t``. The MTP module predicts ``t+2``:
it combines the main model's final hidden state at ``t`` with the embedding of token ``t+1``
and runs one more decoder block over the sequence::

    h'_t   = eh_proj([enorm(embed(x_{t+1})); hnorm(h_t)])          [B, S-1, D]   (2D -> D)
    h''    = DecoderBlock(h')        (MLA + MoE, causal, its own RoPE positions 0..S-2)
    logits = lm_head(norm(h''))                                     [B, S-1, V]   predicts x_{t+2}

The embedding and the output head are the main model's (shared, not copied, in training).
The concatenation order (embedding first) follows the released V3 checkpoints' consumers.

Checkpoint layout (V3's): the module is layer ``num_hidden_layers`` of the main stack::

    model.layers.{L}.enorm.weight           model.layers.{L}.hnorm.weight
    model.layers.{L}.eh_proj.weight         model.layers.{L}.self_attn.* / mlp.* / *_layernorm.weight
    model.layers.{L}.shared_head.norm.weight
    model.layers.{L}.embed_tokens.weight    model.layers.{L}.shared_head.head.weight   (copies)

``expertmesh.model.load_pretrained`` skips these tensors (generation does not use them);
transformers reports them as unused weights.

Shape letters: B batch, S positions, D hidden, V vocab.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from expertmesh.model.config import ModelConfig
from expertmesh.model.layers import RMSNorm
from expertmesh.model.mla import causal_mask
from expertmesh.model.moe import MoE
from expertmesh.model.transformer import DecoderLayer, DeepseekV3

_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
_RENAMES_TO_CKPT = {"norm.weight": "shared_head.norm.weight"}
_RENAMES_FROM_CKPT = {v: k for k, v in _RENAMES_TO_CKPT.items()}


class MTPModule(nn.Module):
    """The depth-1 MTP module. ``forward(lm, hidden_BSD, next_ids_BS) -> logits [B, S, V]``.

    ``hidden_BSD`` are the main model's final hidden states at positions ``0..S-1`` and
    ``next_ids_BS`` the tokens at ``1..S``; the logits predict the tokens at ``2..S+1``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layer_idx = config.num_hidden_layers
        if not config.is_moe_layer(self.layer_idx):
            raise ValueError("the MTP block is a MoE block; the model config has no MoE layers")
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = DecoderLayer(config, self.layer_idx)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def moe(self) -> MoE:
        """The block's MoE layer (balanced like the main model's)."""
        assert isinstance(self.block.mlp, MoE)
        return self.block.mlp

    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """normal(0, std) for matrices, ones for norms, zero gate bias (like ``DeepseekV3.init_weights``)."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std, generator=generator)
        self.moe.gate.e_score_correction_bias.zero_()

    def forward(self, lm: DeepseekV3, hidden_BSD: torch.Tensor, next_ids_BS: torch.Tensor) -> torch.Tensor:
        batch, seq_len = next_ids_BS.shape
        emb_BSD = lm.model.embed_tokens(next_ids_BS)  # [B, S, D]
        x_BSD = self.eh_proj(torch.cat([self.enorm(emb_BSD), self.hnorm(hidden_BSD)], dim=-1))  # [B, S, 2D] -> [B, S, D]
        positions_BS = torch.arange(seq_len, device=next_ids_BS.device).expand(batch, seq_len)
        cos, sin = lm.rotary(positions_BS, x_BSD.dtype)
        x_BSD = self.block(x_BSD, cos, sin, causal_mask(seq_len, next_ids_BS.device))
        return lm.lm_head(self.norm(x_BSD))  # [B, S, V]


def mtp_checkpoint_tensors(mtp: MTPModule, lm: DeepseekV3) -> dict[str, torch.Tensor]:
    """The module's tensors under V3's names (``model.layers.{L}.*``), including the shared copies."""
    prefix = f"model.layers.{mtp.layer_idx}."
    out: dict[str, torch.Tensor] = {}
    for name, tensor in mtp.state_dict().items():
        local = name.removeprefix("block.")
        out[prefix + _RENAMES_TO_CKPT.get(local, local)] = tensor.detach().cpu().contiguous()
    out[prefix + "embed_tokens.weight"] = lm.model.embed_tokens.weight.detach().cpu().contiguous()
    out[prefix + "shared_head.head.weight"] = lm.lm_head.weight.detach().cpu().contiguous()
    return out


def mtp_state_from_checkpoint(tensors: dict[str, torch.Tensor], num_hidden_layers: int) -> dict[str, torch.Tensor]:
    """Inverse of :func:`mtp_checkpoint_tensors`: an ``MTPModule`` state dict (shared copies dropped).

    Raises:
        ValueError: the checkpoint has no ``model.layers.{num_hidden_layers}.*`` tensors.
    """
    pattern = re.compile(rf"^model\.layers\.{num_hidden_layers}\.(.+)$")
    own_names = {"enorm.weight", "hnorm.weight", "eh_proj.weight", "norm.weight"}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = pattern.match(key)
        if match is None or match.group(1) in _SHARED_COPIES:
            continue
        local = _RENAMES_FROM_CKPT.get(match.group(1), match.group(1))
        state[local if local in own_names else "block." + local] = tensor
    if not state:
        raise ValueError(f"checkpoint has no MTP tensors (model.layers.{num_hidden_layers}.*)")
    return state
