"""Runs one scheduled step of the model over the paged latent cache.

All tokens of the step travel together through embeddings, norms, projections and the
MLP/MoE layers as one flat batch ``[1, T, D]`` (T = tokens of every scheduled chunk).
Attention is the only per-sequence part:
  * decode chunks (one new token) are batched into one *absorbed* MLA call over their
    gathered latent caches (padded to the longest, masked);
  * prefill chunks use the *naive* form (K/V expanded from the latent), causal within
    the chunk and over the cached prefix before it.

Shape letters: T step tokens, D hidden, Bd decode sequences, Tk key positions, H heads,
N nope dim, R rope dim, C latent dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertmesh.engine.kv_cache import PagedLatentCache
from expertmesh.engine.scheduler import ScheduledChunk
from expertmesh.model.transformer import DeepseekV3


@dataclass(frozen=True)
class StepBatch:
    """Flat inputs of one step, built from the scheduled chunks.

    token_ids_T / positions_T / slots_T: per step token, Shape: [T].
    decode_rows: index of each decode chunk's token in the flat batch.
    decode_slots_BT: cache slots of each decode sequence's keys, padded, Shape: [Bd, Tk].
    decode_allowed_BT: which of those keys are real, Shape: [Bd, Tk].
    sample_rows: flat index of the last token of every chunk that samples.
    """

    token_ids_T: torch.Tensor
    positions_T: torch.Tensor
    slots_T: torch.Tensor
    decode_rows: torch.Tensor
    decode_slots_BT: torch.Tensor
    decode_allowed_BT: torch.Tensor
    prefill: list[tuple[int, int, int, torch.Tensor]]  # (row_start, row_end, start_pos, key slots [Tk])
    sample_rows: torch.Tensor


def _slots(block_table: list[int], block_size: int, start: int, end: int) -> torch.Tensor:
    pos = torch.arange(start, end)
    table = torch.tensor(block_table, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


def build_batch(chunks: list[ScheduledChunk], block_size: int, device: torch.device) -> StepBatch:
    token_ids, positions, slots, sample_rows = [], [], [], []
    decode_rows, decode_keys, prefill = [], [], []
    row = 0
    for c in chunks:
        n = c.end - c.start
        token_ids.append(torch.tensor(c.seq.token_ids[c.start:c.end], dtype=torch.long))
        positions.append(torch.arange(c.start, c.end))
        keys = _slots(c.seq.block_table, block_size, 0, c.end)  # [Tk]: every key of the sequence so far
        slots.append(keys[c.start:])  # the step's own tokens are the last ones
        if n == 1:
            decode_rows.append(row)
            decode_keys.append(keys)
        else:
            prefill.append((row, row + n, c.start, keys.to(device)))
        if c.sample:
            sample_rows.append(row + n - 1)
        row += n
    longest = max((len(k) for k in decode_keys), default=0)
    decode_slots = torch.zeros(len(decode_keys), longest, dtype=torch.long)
    decode_allowed = torch.zeros(len(decode_keys), longest, dtype=torch.bool)
    for i, keys in enumerate(decode_keys):
        decode_slots[i, : len(keys)] = keys
        decode_allowed[i, : len(keys)] = True
    return StepBatch(
        token_ids_T=torch.cat(token_ids).to(device),
        positions_T=torch.cat(positions).to(device),
        slots_T=torch.cat(slots).to(device),
        decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=device),
        decode_slots_BT=decode_slots.to(device),
        decode_allowed_BT=decode_allowed.to(device),
        prefill=prefill,
        sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=device),
    )


class ModelRunner:
    """Executes steps single-process; subclasses replace ``ffn`` (e.g. to route experts remotely)."""

    def __init__(self, model: DeepseekV3, cache: PagedLatentCache):
        self.model = model
        self.cache = cache
        self.block_size = cache.layout.block_size

    def embed(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token embeddings [1, T, D] and the step's RoPE cos/sin [1, T, R/2]."""
        cos, sin = self.model.rotary(batch.positions_T.unsqueeze(0), self.model.dtype)
        return self.model.model.embed_tokens(batch.token_ids_T).unsqueeze(0), cos, sin

    def attention(self, layer_idx: int, x: torch.Tensor, batch: StepBatch, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
        """MLA of one layer for every token of the step (writes their latents to the cache)."""
        layer = self.model.layers[layer_idx]
        attn = layer.self_attn
        dtype = self.model.dtype
        h = layer.input_layernorm(x)
        q_nope, q_rope = attn.project_q(h, cos, sin)  # [1, T, H, N], [1, T, H, R]
        self.cache.write(layer_idx, batch.slots_T, attn.compress_kv(h, cos, sin))
        out = torch.empty(1, x.shape[1], attn.n_heads * attn.v_dim, dtype=dtype, device=x.device)
        if batch.decode_rows.numel():
            rows = batch.decode_rows
            kv = self.cache.read(layer_idx, batch.decode_slots_BT, dtype)  # [Bd, Tk, *]
            out[0, rows] = attn.attend_absorbed(
                q_nope[0, rows].unsqueeze(1), q_rope[0, rows].unsqueeze(1), kv, batch.decode_allowed_BT.unsqueeze(1),
            ).squeeze(1)
        for row_start, row_end, start_pos, key_slots in batch.prefill:
            kv = self.cache.read(layer_idx, key_slots.unsqueeze(0), dtype)  # [1, Tk, *]
            n, tk = row_end - row_start, key_slots.shape[0]
            q_pos = torch.arange(start_pos, start_pos + n, device=x.device)
            allowed = (torch.arange(tk, device=x.device)[None, :] <= q_pos[:, None]).unsqueeze(0)  # [1, n, Tk]
            out[:, row_start:row_end] = attn.attend_naive(
                q_nope[:, row_start:row_end], q_rope[:, row_start:row_end], kv, allowed
            )
        return attn.o_proj(out)

    def ffn(self, layer_idx: int, h: torch.Tensor) -> torch.Tensor:
        """Dense MLP or MoE of one layer on normalised hidden states [1, T, D]."""
        return self.model.layers[layer_idx].mlp(h)

    def logits(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        if batch.sample_rows.numel() == 0:
            return torch.empty(0, self.model.config.vocab_size)
        last = self.model.model.norm(x[0, batch.sample_rows])  # [S, D]
        return self.model.lm_head(last).float()  # [S, V]

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run the step; return float32 logits [S, V] for the chunks that sample, in order."""
        batch = build_batch(chunks, self.block_size, self.model.device)
        x, cos, sin = self.embed(batch)
        for layer_idx, layer in enumerate(self.model.layers):
            x = x + self.attention(layer_idx, x, batch, cos, sin)
            x = x + self.ffn(layer_idx, layer.post_attention_layernorm(x))
        return self.logits(x, batch)
