"""Paged latent KV cache for MLA, with prefix sharing of full blocks.

MLA caches one latent per token per layer (``kv_lora_rank`` + ``qk_rope_head_dim``
elements), shared by every head. Tokens live in fixed-size blocks; a sequence owns a
block table (logical block i -> physical block id). Full blocks are content-addressed
by a hash chained over the tokens before them, so two requests with the same prompt
prefix share those blocks (refcounted); freed blocks keep their content and hash until
they are reused (LRU), so a later request with the same prefix still hits them.

Storage dtypes:
  "fp32" | "bf16"  entries stored as is.
  "fp8"            e4m3 entries with one float32 scale per 1×128 tile per token
                   (latent: ceil(C/128) tiles, rope key: ceil(R/128) tiles), the same
                   fine-grained scheme as FP8 activations. V3: 576 + 5·4 = 596 B/token/layer
                   vs 1152 B in BF16.

Glossary / shape letters: L layers, NB physical blocks, BS block size (tokens),
C kv_lora_rank, R qk_rope_head_dim, W = C + R, B sequences, T positions, NT tiles.
Example: block_size=16, a 40-token sequence holds 3 blocks: table [7, 2, 9], the last
block 8/16 full; token 35 lives in block 9 at offset 3 (slot 9*16+3 = 147).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch

from expertmesh.model.fp8 import FP8_DTYPE, FP8_MAX
from expertmesh.model.mla import LatentKV

CacheDType = Literal["fp32", "bf16", "fp8"]
TILE = 128
_STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": FP8_DTYPE}


class OutOfBlocks(Exception):
    """No free or evictable block is left; the scheduler preempts a sequence."""


def block_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    """Content hash of a full block, chained on the hash of the blocks before it."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(b",".join(str(t).encode() for t in tokens))
    return h.digest()


class BlockAllocator:
    """Physical block ids with refcounts and a content-hash index for prefix sharing.

    ref_count[b]: sequences holding block b (0 = free). Free blocks that carry a hash
    stay findable until reused; reuse takes plain free blocks first, then the least
    recently freed hashed block.
    """

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self._free_plain: list[int] = list(range(num_blocks - 1, -1, -1))  # stack, pops block 0 first
        self._free_hashed: OrderedDict[int, None] = OrderedDict()  # LRU order of freed, hashed blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of_hash: dict[bytes, int] = {}
        self.prefix_hits = 0  # blocks served from the prefix cache (stats)

    @property
    def num_free(self) -> int:
        return len(self._free_plain) + len(self._free_hashed)

    def allocate(self) -> int:
        if self._free_plain:
            block = self._free_plain.pop()
        elif self._free_hashed:
            block, _ = self._free_hashed.popitem(last=False)
            del self._block_of_hash[self._hash_of.pop(block)]
        else:
            raise OutOfBlocks
        self.ref_count[block] = 1
        return block

    def lookup(self, content_hash: bytes) -> int | None:
        """A block already holding this content, taking a reference to it; None on a miss."""
        block = self._block_of_hash.get(content_hash)
        if block is None:
            return None
        if self.ref_count[block] == 0:
            del self._free_hashed[block]
        self.ref_count[block] += 1
        self.prefix_hits += 1
        return block

    def register(self, block: int, content_hash: bytes) -> None:
        """Publish a block that has just become full so later prompts can share it."""
        if content_hash in self._block_of_hash or block in self._hash_of:
            return  # an identical block is already published; keep the first
        self._hash_of[block] = content_hash
        self._block_of_hash[content_hash] = block

    def free(self, block: int) -> None:
        assert self.ref_count[block] > 0, f"double free of block {block}"
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            if block in self._hash_of:
                self._free_hashed[block] = None
            else:
                self._free_plain.append(block)


@dataclass(frozen=True)
class CacheLayout:
    num_layers: int
    num_blocks: int
    block_size: int
    latent_dim: int  # C
    rope_dim: int  # R
    dtype: CacheDType

    @property
    def width(self) -> int:
        return self.latent_dim + self.rope_dim

    @property
    def num_tiles(self) -> int:
        return -(-self.latent_dim // TILE) + -(-self.rope_dim // TILE)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all layers (entries + FP8 scales)."""
        per_layer = self.width * _STORAGE_DTYPES[self.dtype].itemsize
        if self.dtype == "fp8":
            per_layer += self.num_tiles * 4
        return per_layer * self.num_layers


def _tile_bounds(layout: CacheLayout) -> list[tuple[int, int]]:
    """[start, end) of each scale tile across the W entries: latent tiles, then rope tiles."""
    bounds = []
    for base, size in ((0, layout.latent_dim), (layout.latent_dim, layout.rope_dim)):
        bounds += [(base + s, base + min(s + TILE, size)) for s in range(0, size, TILE)]
    return bounds


class PagedLatentCache:
    """Storage for all layers: entries [L, NB*BS, W] (+ scales [L, NB*BS, NT] for fp8)."""

    def __init__(self, layout: CacheLayout, device: torch.device | str = "cpu"):
        self.layout = layout
        slots = layout.num_blocks * layout.block_size
        self.entries = torch.zeros(layout.num_layers, slots, layout.width, dtype=_STORAGE_DTYPES[layout.dtype],
                                   device=device)  # [L, NB*BS, W]
        self.scales = (
            torch.ones(layout.num_layers, slots, layout.num_tiles, dtype=torch.float32, device=device)
            if layout.dtype == "fp8" else None
        )  # [L, NB*BS, NT]
        self._tiles = _tile_bounds(layout)
        self.tiles = torch.tensor(self._tiles, dtype=torch.long).view(-1, 2)  # [NT, 2]: [start, end) of each tile
        # e4m3 -> float32 by table lookup: on CPU ~2x faster than the dtype conversion, same values
        self._fp8_table = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float().to(device)  # [256]
        self._tile_of_W = torch.tensor([i for i, (a, b) in enumerate(self._tiles) for _ in range(a, b)],
                                       dtype=torch.long, device=device)  # [W]: scale tile of each entry

    @property
    def allocated_bytes(self) -> int:
        n = self.entries.numel() * self.entries.element_size()
        if self.scales is not None:
            n += self.scales.numel() * self.scales.element_size()
        return n

    def write(self, layer: int, slots_T: torch.Tensor, kv: LatentKV) -> None:
        """Store new tokens' latent [T, C] and rope key [T, R] at flat slot ids [T]."""
        rows_TW = torch.cat([kv.latent_BTC, kv.k_rope_BTR], dim=-1).reshape(-1, self.layout.width)
        if self.scales is None:  # (a step's slots are distinct: index_copy_ is a plain scatter)
            self.entries[layer].index_copy_(0, slots_T, rows_TW.to(self.entries.dtype))
            return
        rows_TW = rows_TW.float()
        scales_TN = torch.stack(
            [rows_TW[:, a:b].abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX for a, b in self._tiles], dim=-1
        )  # [T, NT]
        self.entries[layer, slots_T] = (rows_TW / scales_TN[:, self._tile_of_W]).to(FP8_DTYPE)
        self.scales[layer, slots_T] = scales_TN

    def read(self, layer: int, slots_BT: torch.Tensor, dtype: torch.dtype) -> LatentKV:
        """Gather entries for slot ids [B, T] (padding slots may point anywhere; mask them)."""
        rows = self.entries[layer][slots_BT]  # [B, T, W]
        if self.scales is not None:
            rows = self._fp8_to_float(rows) * self.scales[layer][slots_BT][..., self._tile_of_W]  # [B, T, W]
        rows = rows.to(dtype)
        return LatentKV(rows[..., : self.layout.latent_dim], rows[..., self.layout.latent_dim:])

    def _fp8_to_float(self, entries: torch.Tensor) -> torch.Tensor:
        return self._fp8_table[entries.view(torch.uint8).int()]

    def read_blocks(self, layer: int, blocks_BN: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Packed entries (latent then RoPE key) of whole blocks ``[B, N]`` -> ``[B, N*BS, W]``.

        Copies block-sized runs (BS·W contiguous entries, one ``index_select`` over the block ids)
        instead of gathering token by token; positions past a sequence's length hold stale or
        foreign entries: mask them. FP8 entries are decoded by table lookup and scaled tile by
        tile (a broadcast multiply per tile, no per-entry gather of the scales): at batch 16 x 256
        keys ~6x faster on CPU than advanced indexing, same values."""
        L = self.layout
        B, N = blocks_BN.shape
        ids = blocks_BN.reshape(-1)  # [B*N]
        entries = self.entries[layer].view(L.num_blocks, L.block_size * L.width)
        if self.scales is None:
            return entries.index_select(0, ids).view(B, N * L.block_size, L.width).to(dtype)
        codes = entries.view(torch.uint8).index_select(0, ids)  # [B*N, BS*W]
        rows = self._fp8_table.index_select(0, codes.view(-1).int()).view(B * N, L.block_size, L.width)
        scales = self.scales[layer].view(L.num_blocks, L.block_size, L.num_tiles).index_select(0, ids)
        for tile, (a, b) in enumerate(self._tiles):
            rows[..., a:b] *= scales[..., tile:tile + 1]
        return rows.view(B, N * L.block_size, L.width).to(dtype)
