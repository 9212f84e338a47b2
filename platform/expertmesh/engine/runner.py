"""Runs one scheduled step of the model over the paged latent cache.

All tokens of the step travel together through embeddings, norms, projections and the
MLP/MoE layers as one flat batch ``[1, T, D]`` (T = tokens of every scheduled chunk).
Attention is the only per-sequence part:
  * decode chunks (one new token) are batched into one *absorbed* MLA call over their
    cached blocks (copied block by block, padded to the longest table, masked);
  * prefill chunks use the *naive* form (K/V expanded from the latent): a chunk that starts
    the sequence attends causally to its own keys (SDPA's fused kernel); a chunk after a
    cached prefix attends over prefix + chunk with an explicit mask.
Masks and slot ids are built once per step (``build_batch``), not once per layer.

Shape letters: T step tokens, D hidden, Bd decode sequences, N blocks per table, BS block
size, H heads, N nope dim, R rope dim, C latent dim, W = C + R, V vocab, S chunk queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertmesh.engine.kv_cache import PagedLatentCache
from expertmesh.engine.scheduler import ScheduledChunk, Sequence
from expertmesh.model import cpu_kernels
from expertmesh.model.layers import linear_forward
from expertmesh.model.mla import MLA, LatentKV
from expertmesh.model.transformer import DeepseekV3

NEG_INF = float("-inf")


@dataclass(frozen=True)
class PrefillChunk:
    """A prompt chunk of the step: rows ``[row_start, row_end)`` of the flat batch, positions from
    ``start_pos``.

    blocks_1N: the blocks holding every key of the sequence up to the chunk's end, Shape: [1, N].
    bias_1ST: additive mask over those N*BS keys (0 allowed, -inf not), float32, Shape: [1, S, N*BS];
        None when the chunk starts at position 0 (causal over its own keys, no cached prefix).
    """

    row_start: int
    row_end: int
    start_pos: int
    blocks_1N: torch.Tensor
    bias_1ST: torch.Tensor | None


@dataclass(frozen=True)
class StepBatch:
    """Flat inputs of one step, built from the scheduled chunks.

    token_ids_T / positions_T / slots_T: per step token, Shape: [T].
    decode_rows: index of each decode chunk's token in the flat batch, Shape: [Bd].
    all_decode: every token of the step is a decode token (then decode_rows is 0..T-1).
    decode_blocks_BN: block table of each decode sequence, padded with block 0, Shape: [Bd, N].
    decode_bias_B1T: 0 for each sequence's real keys, -inf for padding, float32, Shape: [Bd, 1, N*BS].
        Example (BS=4, lengths 5 and 2): blocks [[7, 2], [3, 0]], bias rows [0 0 0 0 0 -inf -inf -inf]
        and [0 0 -inf -inf -inf -inf -inf -inf]. None when every decode sequence has the same
        length (always so at batch 1): then only the first ``decode_keys`` keys are read, unmasked.
    decode_keys: that common length (0 when the lengths differ or nothing decodes).
    decode_lengths_B: keys of each decode sequence (its cached tokens, the new one included), Shape: [Bd].
    prefill: the step's prompt chunks.
    sample_rows: flat index of the last token of every chunk that samples.
    sample_all: every token of the step samples, in order (sample_rows is 0..T-1).
    max_position: the step's largest position.
    """

    token_ids_T: torch.Tensor
    positions_T: torch.Tensor
    slots_T: torch.Tensor
    decode_rows: torch.Tensor
    all_decode: bool
    decode_blocks_BN: torch.Tensor
    decode_bias_B1T: torch.Tensor | None
    decode_keys: int
    decode_lengths_B: torch.Tensor
    prefill: list[PrefillChunk]
    sample_rows: torch.Tensor
    sample_all: bool
    max_position: int


def _token_slice(seq: Sequence, start: int, end: int) -> list[int]:
    """``seq.token_ids[start:end]`` without building the whole list (decode steps read one token)."""
    n_prompt = len(seq.prompt_ids)
    if start >= n_prompt:
        return seq.output_ids[start - n_prompt:end - n_prompt]
    if end <= n_prompt:
        return seq.prompt_ids[start:end]
    return seq.prompt_ids[start:] + seq.output_ids[:end - n_prompt]


def _prefix_bias(start: int, end: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """[1, end-start, num_keys]: query i (position start+i) sees keys 0..start+i."""
    keys_K = torch.arange(num_keys)
    queries_S = torch.arange(start, end)
    hidden = keys_K[None, None, :] > queries_S[None, :, None]  # [1, S, K]
    return torch.zeros(hidden.shape).masked_fill_(hidden, NEG_INF).to(device)


def build_batch(chunks: list[ScheduledChunk], block_size: int, device: torch.device) -> StepBatch:
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    sample_rows: list[int] = []
    decode_rows: list[int] = []
    decode_tables: list[list[int]] = []
    decode_lengths: list[int] = []
    prefill: list[PrefillChunk] = []
    row = 0
    for c in chunks:
        n, table = c.end - c.start, c.seq.block_table
        num_blocks = -(-c.end // block_size)
        token_ids += _token_slice(c.seq, c.start, c.end)
        positions += range(c.start, c.end)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(c.start, c.end)]
        if n == 1:
            decode_rows.append(row)
            decode_tables.append(table[:num_blocks])
            decode_lengths.append(c.end)
        else:
            bias = _prefix_bias(c.start, c.end, num_blocks * block_size, device) if c.start > 0 else None
            blocks = torch.tensor([table[:num_blocks]], dtype=torch.long, device=device)
            prefill.append(PrefillChunk(row, row + n, c.start, blocks, bias))
        if c.sample:
            sample_rows.append(row + n - 1)
        row += n
    longest = max(map(len, decode_tables), default=0)
    decode_blocks = torch.tensor([t + [0] * (longest - len(t)) for t in decode_tables], dtype=torch.long,
                                 device=device).view(len(decode_tables), longest)
    same_length = bool(decode_lengths) and min(decode_lengths) == max(decode_lengths)
    bias = None if same_length else _padding_bias(decode_lengths, longest * block_size, device)
    return StepBatch(
        token_ids_T=torch.tensor(token_ids, dtype=torch.long, device=device),
        positions_T=torch.tensor(positions, dtype=torch.long, device=device),
        slots_T=torch.tensor(slots, dtype=torch.long, device=device),
        decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=device),
        all_decode=not prefill,
        decode_blocks_BN=decode_blocks,
        decode_bias_B1T=bias,
        decode_keys=decode_lengths[0] if same_length else 0,
        decode_lengths_B=torch.tensor(decode_lengths, dtype=torch.long, device=device),
        prefill=prefill,
        sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=device),
        sample_all=sample_rows == list(range(row)),
        max_position=max((c.end for c in chunks), default=1) - 1,
    )


def _padding_bias(lengths: list[int], keys: int, device: torch.device) -> torch.Tensor:
    """0 for each sequence's first ``lengths[b]`` of ``keys`` keys, -inf after: [B, 1, keys] float32."""
    keys_K = torch.arange(keys, device=device)
    padding_B1K = (keys_K[None, :] >= torch.tensor(lengths, dtype=torch.long, device=device)[:, None]).unsqueeze(1)
    return torch.zeros(padding_B1K.shape, device=device).masked_fill_(padding_B1K, NEG_INF)


class ModelRunner:
    """Executes steps single-process; subclasses replace ``ffn`` (e.g. to route experts remotely)."""

    def __init__(self, model: DeepseekV3, cache: PagedLatentCache):
        self.model = model
        self.cache = cache
        self.block_size = cache.layout.block_size
        # Decode attention is a few small GEMMs per layer: on CPU they run faster (and more
        # precisely) in float32 than in BF16, so a BF16 model still attends in float32 there.
        self.attention_dtype = torch.float32 if model.device.type == "cpu" else model.dtype
        self._cache_is_exact = cache.entries.dtype == model.dtype  # entries read back bit-identical
        self._rope_table: torch.Tensor | None = None  # [P, R]: cos then sin of positions 0..P-1
        # the fused decode step (a CPU kernel) reads exact caches on any CPU; FP8 ones with the
        # AVX-512 kernel only, and only when each 16-entry vector lies within one scale tile
        # (a latent width divisible by 16)
        self._fused_decode_reads_cache = model.device.type == "cpu" and (cache.scales is None or (
            cpu_kernels.avx512_supported() and cache.layout.latent_dim % 16 == 0))

    def rope(self, positions_T: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's RoPE cos/sin [1, T, R/2], looked up in a table of every position so far
        (grown to the next power of two as sequences get longer): one op per step instead of
        eight, and a position's values no longer depend on which others share its step."""
        if self._rope_table is None or self._rope_table.shape[0] <= max_position:
            n = max(1024, 1 << max_position.bit_length())
            cos, sin = self.model.rotary(torch.arange(n, device=positions_T.device), self.model.dtype)  # [n, R/2]
            self._rope_table = torch.cat([cos, sin], dim=-1)
        return self._rope_table.index_select(0, positions_T).unsqueeze(0).chunk(2, dim=-1)

    def embed(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token embeddings [1, T, D] and the step's RoPE cos/sin [1, T, R/2]."""
        cos, sin = self.rope(batch.positions_T, batch.max_position)
        return self.model.model.embed_tokens(batch.token_ids_T).unsqueeze(0), cos, sin

    def attention(self, layer_idx: int, x: torch.Tensor, batch: StepBatch, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
        """MLA of one layer for every token of the step (writes their latents to the cache)."""
        layer = self.model.layers[layer_idx]
        attn = layer.self_attn
        if batch.all_decode and self._fused_decode_reads_cache:
            fp8 = self.cache.scales is not None
            out_TD = attn.decode_fused(x[0], layer.input_layernorm, cos[0], sin[0], self.cache.entries[layer_idx],
                                       batch.slots_T, batch.decode_blocks_BN, batch.decode_lengths_B, batch.decode_keys,
                                       batch.decode_bias_B1T, self.block_size,
                                       self.cache.scales[layer_idx] if fp8 else None, self.cache.tiles if fp8 else None)
            if out_TD is not None:  # the steps below in one C++ call
                return out_TD.unsqueeze(0)
        h = layer.input_layernorm(x)
        q_nope, q_rope, kv = attn.project(h, cos, sin)  # [1, T, H, N], [1, T, H, R], latents [1, T, *]
        self.cache.write(layer_idx, batch.slots_T, kv)
        if batch.all_decode:  # the common step: no scatter into a mixed output
            out_TO = self._decode(layer_idx, attn, q_nope[0], q_rope[0], batch)  # [T, H*V]
            return linear_forward(attn.o_proj, out_TO.to(x.dtype).unsqueeze(0))
        out = torch.empty(1, x.shape[1], attn.n_heads * attn.v_dim, dtype=x.dtype, device=x.device)
        if batch.decode_rows.numel():
            rows = batch.decode_rows
            out[0, rows] = self._decode(layer_idx, attn, q_nope[0, rows], q_rope[0, rows], batch).to(x.dtype)
        for chunk in batch.prefill:
            r0, r1 = chunk.row_start, chunk.row_end
            if chunk.bias_1ST is None and self._cache_is_exact:  # own keys only: what the cache now holds
                keys = LatentKV(kv.latent_BTC[:, r0:r1], kv.k_rope_BTR[:, r0:r1])
            else:
                packed = self.cache.read_blocks(layer_idx, chunk.blocks_1N, x.dtype)  # [1, N*BS, W]
                if chunk.bias_1ST is None:
                    packed = packed[:, : r1 - r0]  # the chunk's own keys
                keys = LatentKV(packed[..., : attn.kv_lora_rank], packed[..., attn.kv_lora_rank:])
            out[:, r0:r1] = attn.attend_prefill(q_nope[:, r0:r1], q_rope[:, r0:r1], keys, chunk.bias_1ST)
        return linear_forward(attn.o_proj, out)

    def _decode(self, layer_idx: int, attn: MLA, q_nope_BHN: torch.Tensor, q_rope_BHR: torch.Tensor,
                batch: StepBatch) -> torch.Tensor:
        """Absorbed attention of the decode tokens over their cached blocks: [Bd, H*V] in ``attention_dtype``."""
        dtype = self.attention_dtype
        rows_BTW = self.cache.read_blocks(layer_idx, batch.decode_blocks_BN, dtype)  # [Bd, N*BS, W]
        if batch.decode_bias_B1T is None:  # one length for all: its keys, nothing to mask
            rows_BTW = rows_BTW[:, : batch.decode_keys]
        return attn.attend_latent_rows(q_nope_BHN.to(dtype), q_rope_BHR.to(dtype), rows_BTW, batch.decode_bias_B1T)

    def ffn(self, layer_idx: int, h: torch.Tensor) -> torch.Tensor:
        """Dense MLP or MoE of one layer on normalised hidden states [1, T, D]."""
        return self.model.layers[layer_idx].mlp(h)

    def logits(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        if batch.sample_rows.numel() == 0:
            return torch.empty(0, self.model.config.vocab_size)
        last = self.model.model.norm(x[0] if batch.sample_all else x[0, batch.sample_rows])  # [S, D]
        return linear_forward(self.model.lm_head, last).float()  # [S, V]

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run the step; return float32 logits [S, V] for the chunks that sample, in order."""
        batch = build_batch(chunks, self.block_size, self.model.device)
        x, cos, sin = self.embed(batch)
        for layer_idx, layer in enumerate(self.model.layers):
            x = x + self.attention(layer_idx, x, batch, cos, sin)
            x = x + self.ffn(layer_idx, layer.post_attention_layernorm(x))
        return self.logits(x, batch)
