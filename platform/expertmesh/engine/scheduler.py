"""Continuous-batching scheduler with chunked prefill and recompute preemption.

Every step, each scheduled sequence computes a contiguous run of its tokens
``[start, end)`` whose KV is not cached yet; when ``end`` reaches the sequence's length,
the logits of its last position sample the next token. A decode step is the case
``end - start == 1``. Prompts are split into chunks so that one long prompt never holds
the running decodes back for more than ``max_num_batched_tokens`` per step.

Order of business in a step:
  1. running sequences, oldest first: one token each when decoding, else the next chunk;
     when blocks run out, the newest running sequence is preempted (its blocks freed,
     it goes back to the front of the queue and is recomputed later: prompt + output);
  2. waiting sequences, FIFO, while the token budget, ``max_num_seqs`` and free blocks
     allow; full prompt blocks already in the prefix cache are shared, not recomputed.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import torch

from expertmesh.engine.kv_cache import BlockAllocator, OutOfBlocks, block_hash
from expertmesh.engine.params import FinishReason, SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # hashes of the leading full blocks
    num_computed: int = 0  # tokens whose latent KV is in the cache
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    text: str = ""
    # incremental detokenization: output_ids[detok_prefix:detok_read] rendered the last emitted text
    detok_prefix: int = 0
    detok_read: int = 0
    num_preemptions: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens ``[start, end)`` of ``seq`` run this step; ``sample`` when ``end`` is its length."""

    seq: Sequence
    start: int
    end: int

    @property
    def sample(self) -> bool:
        return self.end == self.seq.num_tokens


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    block_size: int = 16

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator):
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queue -----------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for seq in list(self.running) + list(self.waiting):
            if seq.request_id == request_id:
                if seq in self.waiting:
                    self.waiting.remove(seq)
                self.finish(seq, "stop")
                return seq
        return None

    # ---- blocks ----------------------------------------------------------------------------------
    def _release(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self.allocator.free(block)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        """Hold enough blocks for the first ``num_tokens`` tokens (raises OutOfBlocks, keeping what it got)."""
        need = -(-num_tokens // self.config.block_size)
        while len(seq.block_table) < need:
            seq.block_table.append(self.allocator.allocate())

    def _match_prefix(self, seq: Sequence) -> None:
        """Share cached full blocks of the sequence's leading tokens; always leave one token to compute."""
        bs = self.config.block_size
        ids = seq.token_ids
        parent: bytes | None = None
        for i in range((seq.num_tokens - 1) // bs):
            h = block_hash(parent, ids[i * bs:(i + 1) * bs])
            block = self.allocator.lookup(h)
            if block is None:
                break
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed = len(seq.block_table) * bs

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish blocks that became full after this step's compute."""
        bs = self.config.block_size
        if len(seq.block_hashes) >= seq.num_computed // bs:
            return  # most steps: no block filled up (and no token list to build)
        ids = seq.token_ids
        while len(seq.block_hashes) < seq.num_computed // bs:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = block_hash(parent, ids[i * bs:(i + 1) * bs])
            self.allocator.register(seq.block_table[i], h)
            seq.block_hashes.append(h)

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    # ---- one step ----------------------------------------------------------------------------------
    def schedule(self) -> list[ScheduledChunk]:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        # 1. running sequences, oldest first
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            end = min(seq.num_tokens, seq.num_computed + budget)
            while True:
                try:
                    self._grow(seq, end)
                    break
                except OutOfBlocks:
                    victim = max(self.running, key=lambda s: s.arrival)
                    self._preempt(victim)
                    chunks = [c for c in chunks if c.seq is not victim]
                    if victim is seq:
                        break
            if seq.status is SeqStatus.RUNNING:
                chunks.append(ScheduledChunk(seq, seq.num_computed, end))
                budget -= end - seq.num_computed
        # 2. waiting sequences, FIFO
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            self._match_prefix(seq)
            end = min(seq.num_tokens, seq.num_computed + budget)
            try:
                self._grow(seq, end)
            except OutOfBlocks:
                self._release(seq)
                if not self.running and not chunks:
                    raise RuntimeError(
                        f"the KV cache ({self.allocator.num_blocks} blocks of {self.config.block_size} tokens) "
                        f"cannot hold one {seq.num_tokens}-token sequence; give the engine more blocks"
                    ) from None
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed, end))
            budget -= end - seq.num_computed
        return chunks
