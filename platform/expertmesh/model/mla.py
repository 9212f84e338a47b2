"""Multi-head Latent Attention (MLA), DeepSeek-V2/V3.

Keys and values are rebuilt from one compressed latent per token, so the cache holds only
``kv_lora_rank + qk_rope_head_dim`` elements per token per layer (576 for V3), shared by all
heads. Two equivalent ways to attend over that cache:

* naive (prefill): expand the latent into per-head K/V with ``kv_b_proj`` and run ordinary
  attention; cheap when many queries share the expansion.
* absorbed (decode): fold ``W_UK`` into the query and ``W_UV`` into the output, so scores
  and the weighted sum are taken directly against the latent and full K/V never exist.

Shape letters: B batch, S query positions, T key positions, D hidden, H heads,
N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, C kv_lora_rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.model import cpu_kernels
from expertmesh.model.config import ModelConfig
from expertmesh.model.layers import (
    LinearFactory, RMSNorm, backs_all, dense_linear, dense_weight, fast_linear, fuse_linear_weights, gemm_operand,
    linear_forward, unhooked, weight_operand,
)
from expertmesh.model.rope import apply_rope


@dataclass(frozen=True)
class LatentKV:
    """What MLA caches for a run of tokens.

    latent_BTC: normalised compressed KV, Shape: [B, T, C].
    k_rope_BTR: decoupled RoPE key, already rotated, Shape: [B, T, R].
    """

    latent_BTC: torch.Tensor
    k_rope_BTR: torch.Tensor


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, linear: LinearFactory = dense_linear):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        self.softmax_scale = config.softmax_scale
        self.rope_interleave = config.rope_interleave
        qk_dim = config.qk_head_dim
        if config.q_lora_rank is None:
            self.q_proj = linear(config.hidden_size, self.n_heads * qk_dim)
        else:
            self.q_a_proj = linear(config.hidden_size, config.q_lora_rank)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = linear(config.q_lora_rank, self.n_heads * qk_dim)
        self.kv_a_proj_with_mqa = linear(config.hidden_size, config.kv_lora_rank + config.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = linear(config.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim))
        self.o_proj = linear(self.n_heads * self.v_dim, config.hidden_size)
        self._absorbed_cache: tuple[tuple[int, int, torch.dtype], torch.Tensor, torch.Tensor] | None = None
        self._input_proj_OD: torch.Tensor | None = None  # [q rows + C + R, D] once fuse_input_projections() ran

    def fuse_input_projections(self) -> bool:
        """Compute the query's first projection and the KV compression with one GEMM from now on:
        both read the same normalised hidden state (dense weights only; FP8 keeps its kernels)."""
        first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        if not backs_all(self._input_proj_OD, [first.weight, self.kv_a_proj_with_mqa.weight]):
            self._input_proj_OD = fuse_linear_weights([first, self.kv_a_proj_with_mqa])
        return self._input_proj_OD is not None

    # ---- projections ---------------------------------------------------------------------------------
    def project_q(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries split into the no-position part [B, S, H, N] and the rotated part [B, S, H, R]."""
        if self.q_lora_rank is None:
            q = linear_forward(self.q_proj, x_BSD)
        else:
            q = linear_forward(self.q_b_proj, self.q_a_layernorm(linear_forward(self.q_a_proj, x_BSD)))
        q = q.view(*x_BSD.shape[:2], self.n_heads, self.nope_dim + self.rope_dim)  # [B, S, H, N+R]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin, self.rope_interleave)

    def compress_kv(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> LatentKV:
        """The per-token entries MLA caches: normalised latent [B, S, C] and rotated RoPE key [B, S, R]."""
        kv = linear_forward(self.kv_a_proj_with_mqa, x_BSD)  # [B, S, C+R]
        latent, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return LatentKV(self.kv_a_layernorm(latent), apply_rope(k_rope, cos, sin, self.rope_interleave))

    def project(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, LatentKV]:
        """``project_q`` and ``compress_kv`` together: one GEMM for both input projections once
        fused, and one RoPE call for the query and key parts. Returns q_nope [B, S, H, N],
        q_rope [B, S, H, R] and the entries to cache."""
        if not backs_all(self._input_proj_OD, [self.kv_a_proj_with_mqa.weight]):  # not fused, or re-homed since
            q_nope, q_rope = self.project_q(x_BSD, cos, sin)
            return q_nope, q_rope, self.compress_kv(x_BSD, cos, sin)
        B, S = x_BSD.shape[:2]
        kv_width = self.kv_lora_rank + self.rope_dim
        both = fast_linear(x_BSD, self._input_proj_OD)  # [B, S, q rows + C + R]
        q_in, latent, k_rope = both.split([both.shape[-1] - kv_width, self.kv_lora_rank, self.rope_dim], dim=-1)
        q = q_in if self.q_lora_rank is None else linear_forward(self.q_b_proj, self.q_a_layernorm(q_in))
        q = q.view(B, S, self.n_heads, self.nope_dim + self.rope_dim)  # [B, S, H, N+R]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        ropes = torch.cat([q_rope, k_rope.unsqueeze(2)], dim=2)  # [B, S, H+1, R]: heads, then the shared key
        ropes = apply_rope(ropes, cos, sin, self.rope_interleave)
        return q_nope, ropes[:, :, :-1], LatentKV(self.kv_a_layernorm(latent), ropes[:, :, -1])

    def decode_fused(self, x_TD: torch.Tensor, input_norm: RMSNorm, cos_TR: torch.Tensor, sin_TR: torch.Tensor,
                     entries_SW: torch.Tensor, slots_T: torch.Tensor, blocks_TN: torch.Tensor, lengths_T: torch.Tensor,
                     keys: int, bias_T1K: torch.Tensor | None, block_size: int, scales_SN: torch.Tensor | None = None,
                     tiles_N2: torch.Tensor | None = None) -> torch.Tensor | None:
        """A decode step's attention half of the layer (one new token per sequence) in one C++ call
        (``cpu_kernels.fused_mla_decode``): ``input_norm`` of the residual rows ``x_TD``, ``project``,
        the new entries written to one layer of the cache, ``entries_SW`` [slots, C+R] (with
        ``scales_SN`` [slots, NT] per tile of ``tiles_N2`` for FP8, as ``PagedLatentCache.write``
        writes them) at ``slots_T``, ``attend_latent_rows`` over each sequence's first ``lengths_T``
        keys in its blocks ``blocks_TN``, and ``o_proj``. On AVX-512 the attention reads the cache in
        place (float32 math, its own summation order: agrees to rounding); elsewhere the same ATen
        ops run as in Python (``keys`` or ``bias_T1K`` mask the packed rows) and give the same
        values. Returns [T, D] (before the residual add), or None where it does not apply (the
        caller runs those steps)."""
        rows, dtype, device = x_TD.shape[0], x_TD.dtype, x_TD.device
        if (not backs_all(self._input_proj_OD, [self.kv_a_proj_with_mqa.weight]) or not unhooked(input_norm)
                or input_norm.weight.dtype != dtype or self.kv_a_layernorm.weight.dtype != dtype
                or cos_TR.dtype != dtype):
            return None
        q_b, q_a_norm, q_a_eps = None, None, 0.0
        if self.q_lora_rank is not None:
            q_b = gemm_operand(self.q_b_proj, rows, dtype, device)
            q_a_norm, q_a_eps = self.q_a_layernorm.weight, self.q_a_layernorm.eps
            if q_b is None or q_a_norm.dtype != dtype:
                return None
        in_proj = weight_operand(self._input_proj_OD, rows, dtype, device)
        o_proj = gemm_operand(self.o_proj, rows, dtype, device)
        if in_proj is None or o_proj is None:  # another kernel (e.g. oneDNN on AMD) or a hook runs those GEMMs
            return None
        w_uk, w_uv = self.absorbed_weights(torch.float32)
        return cpu_kernels.fused_mla_decode(
            x_TD, input_norm.weight, input_norm.eps, in_proj, self._input_proj_OD.shape[0], o_proj, q_a_norm, q_a_eps,
            q_b, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, cos_TR, sin_TR, self.rope_interleave,
            entries_SW, slots_T, w_uk, w_uv, blocks_TN, lengths_T, keys, bias_T1K, scales_SN, tiles_N2, block_size,
            self.n_heads, self.nope_dim, self.rope_dim, self.v_dim, self.softmax_scale)

    # ---- attention over a latent cache ---------------------------------------------------------------
    def attend_naive(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv: LatentKV, allowed_BST: torch.Tensor | None
    ) -> torch.Tensor:
        """Expand K/V from the latent and attend. Returns [B, S, H*V] (before ``o_proj``)."""
        B, T = kv.latent_BTC.shape[:2]
        kv_full = linear_forward(self.kv_b_proj, kv.latent_BTC).view(B, T, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv_full.split([self.nope_dim, self.v_dim], dim=-1)  # [B, T, H, N], [B, T, H, V]
        k_rope = kv.k_rope_BTR.unsqueeze(2).expand(B, T, self.n_heads, self.rope_dim)  # [B, T, H, R]
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [B, H, S, N+R]
        k = torch.cat([k_nope, k_rope], dim=-1).transpose(1, 2)  # [B, H, T, N+R]
        mask = None if allowed_BST is None else allowed_BST.unsqueeze(1)  # [B, 1, S, T]
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=mask, scale=self.softmax_scale)
        return out.transpose(1, 2).reshape(B, q_nope.shape[1], self.n_heads * self.v_dim)  # [B, S, H*V]

    def attend_prefill(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv: LatentKV, bias_BST: torch.Tensor | None
    ) -> torch.Tensor:
        """Naive attention of a prompt chunk. ``bias_BST`` None: the keys are the chunk's own
        tokens (S == T) and attention is causal; else an additive float32 mask (0 / -inf) over
        cached prefix + chunk keys. Returns [B, S, H*V] (before ``o_proj``).

        The causal case runs SDPA's fused kernel, which needs V as wide as Q/K: V is padded with
        zeros (exact) and the padding sliced off. The masked case is computed as explicit GEMMs
        in float32: on CPU SDPA with an explicit mask falls back to a path ~4x slower."""
        B, T = kv.latent_BTC.shape[:2]
        S, H, qk_dim = q_nope.shape[1], self.n_heads, self.nope_dim + self.rope_dim
        kv_full = linear_forward(self.kv_b_proj, kv.latent_BTC).view(B, T, H, self.nope_dim + self.v_dim)
        k_nope, v = kv_full.split([self.nope_dim, self.v_dim], dim=-1)  # [B, T, H, N], [B, T, H, V]
        k_rope = kv.k_rope_BTR.unsqueeze(2).expand(B, T, H, self.rope_dim)  # [B, T, H, R]
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [B, H, S, N+R]
        k = torch.cat([k_nope, k_rope], dim=-1).transpose(1, 2)  # [B, H, T, N+R]
        if bias_BST is None:
            v_padded = F.pad(v, (0, max(0, qk_dim - self.v_dim))).transpose(1, 2)  # [B, H, T, max(V, N+R)]
            out = F.scaled_dot_product_attention(q, k, v_padded, is_causal=True, scale=self.softmax_scale)
            out = out[..., : self.v_dim]  # [B, H, S, V]
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.softmax_scale + bias_BST.unsqueeze(1)
            out = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v.transpose(1, 2))  # [B, H, S, V]
        return out.transpose(1, 2).reshape(B, S, H * self.v_dim)  # [B, S, H*V]

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK`` [H, N, C] and ``W_UV`` [H, V, C], split from ``kv_b_proj`` (cached per weight version)."""
        weight = self.kv_b_proj.weight
        try:
            version = weight._version  # bumps on in-place updates (training)
        except RuntimeError:  # inference tensors have no version counter and cannot change
            version = -1
        key = (weight.data_ptr(), version, dtype)
        if self._absorbed_cache is None or self._absorbed_cache[0] != key:
            w = dense_weight(self.kv_b_proj, dtype).view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
            w_uk, w_uv = w.split([self.nope_dim, self.v_dim], dim=1)  # [H, N, C], [H, V, C]
            self._absorbed_cache = (key, w_uk.contiguous(), w_uv.contiguous())
        return self._absorbed_cache[1], self._absorbed_cache[2]

    def attend_absorbed(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv: LatentKV, allowed_BST: torch.Tensor | None
    ) -> torch.Tensor:
        """Attend directly on the latent (W_UK folded into q, W_UV into the output). Returns [B, S, H*V]."""
        w_uk, w_uv = self.absorbed_weights(q_nope.dtype)
        B, S, H, _ = q_nope.shape
        q_nope_H = q_nope.permute(2, 0, 1, 3).reshape(H, B * S, self.nope_dim)  # [H, B*S, N]
        q_latent = torch.bmm(q_nope_H, w_uk)  # [H, B*S, C]
        q_latent = q_latent.view(H, B, S, -1).permute(1, 2, 0, 3).reshape(B, S * H, -1)  # [B, S*H, C]
        scores = torch.bmm(q_latent, kv.latent_BTC.transpose(1, 2))  # [B, S*H, T]
        scores = scores + torch.bmm(q_rope.reshape(B, S * H, self.rope_dim), kv.k_rope_BTR.transpose(1, 2))
        scores = scores.float() * self.softmax_scale
        if allowed_BST is not None:  # [B, S, T] -> rows are (s, h) pairs
            scores = scores.view(B, S, H, -1).masked_fill(~allowed_BST.unsqueeze(2), float("-inf")).view(B, S * H, -1)
        probs = scores.softmax(dim=-1).to(q_nope.dtype)  # [B, S*H, T]
        out_latent = torch.bmm(probs, kv.latent_BTC)  # [B, S*H, C]
        out_latent = out_latent.view(B, S, H, -1).permute(2, 0, 1, 3).reshape(H, B * S, -1)  # [H, B*S, C]
        out = torch.bmm(out_latent, w_uv.transpose(1, 2))  # [H, B*S, V]
        return out.view(H, B, S, self.v_dim).permute(1, 2, 0, 3).reshape(B, S, H * self.v_dim)  # [B, S, H*V]

    def attend_latent_rows(
        self, q_nope_BHN: torch.Tensor, q_rope_BHR: torch.Tensor, rows_BTW: torch.Tensor,
        bias_B1T: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Absorbed attention of one query per sequence over packed cache rows (the decode step).

        rows_BTW: cache entries, latent then RoPE key (W = C + R), in the compute dtype.
        bias_B1T: additive mask, 0 for real keys and -inf for padding, float32 (None: no padding).
        Returns [B, H*V] (before ``o_proj``). Scores and softmax are taken in float32; the
        query is scaled before the score GEMM (one small op instead of one per score).
        """
        w_uk, w_uv = self.absorbed_weights(rows_BTW.dtype)
        B, H = q_nope_BHN.shape[:2]
        q_latent = torch.bmm(q_nope_BHN.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, C]
        q_BHW = torch.cat([q_latent, q_rope_BHR], dim=-1) * self.softmax_scale  # [B, H, C+R]
        scores_BHT = torch.bmm(q_BHW, rows_BTW.transpose(1, 2))  # [B, H, T]
        if bias_B1T is not None:
            scores_BHT = scores_BHT.float() + bias_B1T
        probs_BHT = scores_BHT.softmax(dim=-1, dtype=torch.float32).to(rows_BTW.dtype)
        out_BHC = torch.bmm(probs_BHT, rows_BTW[..., : self.kv_lora_rank])  # [B, H, C]
        out_HBV = torch.bmm(out_BHC.transpose(0, 1), w_uv.transpose(1, 2))  # [H, B, V]
        return out_HBV.transpose(0, 1).reshape(B, H * self.v_dim)  # [B, H*V]

    # ---- whole-sequence forward (reference path, no cache) -------------------------------------------
    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        allowed_BST: torch.Tensor | None,
        absorbed: bool = False,
    ) -> torch.Tensor:
        q_nope, q_rope = self.project_q(x_BSD, cos, sin)
        kv = self.compress_kv(x_BSD, cos, sin)
        attend = self.attend_absorbed if absorbed else self.attend_naive
        return linear_forward(self.o_proj, attend(q_nope, q_rope, kv, allowed_BST))


def causal_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [1, S, S]: query i may attend to keys 0..i."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril().unsqueeze(0)
