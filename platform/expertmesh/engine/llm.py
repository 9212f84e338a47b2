"""The single-process inference engine: ``LLMEngine`` (add requests, ``step()``) and the
vLLM-like ``LLM`` façade (``generate`` for batches, ``stream`` for one request).

Input is checked before anything changes: a bad prompt or parameter is a ``ValueError``
and the engine goes on serving the next request.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from expertmesh.engine.kv_cache import BlockAllocator, CacheLayout, PagedLatentCache
from expertmesh.engine.params import Completion, RequestOutput, SamplingParams
from expertmesh.engine.runner import ModelRunner
from expertmesh.engine.sampler import make_generator, sample
from expertmesh.engine.scheduler import Scheduler, SchedulerConfig, Sequence
from expertmesh.model.checkpoint import load_pretrained
from expertmesh.model.transformer import DeepseekV3, cast_model

KVCacheDType = Literal["auto", "fp32", "bf16", "fp8"]
ComputeDType = Literal["auto", "fp32", "bf16"]
COMPUTE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
Prompt = str | list[int]


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 16
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    kv_cache_dtype: KVCacheDType = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None  # default: room for max_num_seqs full-length sequences
    max_num_batched_tokens: int = 512
    # Weights and activations: "auto" keeps the model's dtype (FP32 when loaded from a path by
    # default); "bf16" runs weights and GEMMs in BF16 (the gate and the decode attention stay FP32).
    dtype: ComputeDType = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"dtype must be 'auto', 'fp32' or 'bf16', got {self.dtype!r}")
        if self.kv_cache_dtype not in ("auto", "fp32", "bf16", "fp8"):
            raise ValueError(f"kv_cache_dtype must be 'auto', 'fp32', 'bf16' or 'fp8', got {self.kv_cache_dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


def load_tokenizer(path: str | Path):
    """The checkpoint's ``tokenizer.json`` as a ``tokenizers.Tokenizer``, or None when it has none."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(file))


def _eos_ids(model: DeepseekV3) -> frozenset[int]:
    eos = model.config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset(eos if isinstance(eos, list) else [eos])


def encode_prompt(prompt: Prompt, tokenizer: Any, vocab_size: int, max_model_len: int) -> list[int]:
    """Token ids of a prompt (text needs a tokenizer), checked against the vocabulary and the room
    ``max_model_len`` leaves to generate: a ``ValueError`` saying what is wrong."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty")
        if tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json: pass prompts as token ids")
        ids = tokenizer.encode(prompt).ids
    elif isinstance(prompt, (list, tuple)):
        ids = list(prompt)
        if any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
            raise ValueError("prompt token ids must be integers")
    else:
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise ValueError("prompt is empty")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if len(ids) >= max_model_len:
        raise ValueError(f"prompt has {len(ids)} tokens; max_model_len={max_model_len} leaves no room to generate")
    return ids


class LLMEngine:
    def __init__(self, model: DeepseekV3, tokenizer: Any = None, config: EngineConfig | None = None,
                 runner_factory: Callable[[DeepseekV3, PagedLatentCache], ModelRunner] = ModelRunner):
        self.config = config or EngineConfig()
        if self.config.dtype != "auto" and model.dtype != COMPUTE_DTYPES[self.config.dtype]:
            cast_model(model, COMPUTE_DTYPES[self.config.dtype])  # in place: the engine owns the model now
        self.model = model.eval()
        model.fuse_for_inference()  # fewer, larger GEMMs (dense weights only); names and values unchanged
        self.tokenizer = tokenizer
        cfg = model.config
        self.max_model_len = self.config.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings="
                f"{cfg.max_position_embeddings}"
            )
        bs = self.config.block_size
        num_blocks = self.config.num_kv_blocks or self.config.max_num_seqs * -(-self.max_model_len // bs)
        cache_dtype = self.config.kv_cache_dtype
        if cache_dtype == "auto":
            cache_dtype = "bf16" if model.dtype == torch.bfloat16 else "fp32"
        self.layout = CacheLayout(cfg.num_hidden_layers, num_blocks, bs, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                                  cache_dtype)
        self.cache = PagedLatentCache(self.layout, device=model.device)
        self.allocator = BlockAllocator(num_blocks)
        self.scheduler = Scheduler(
            SchedulerConfig(self.config.max_num_seqs, self.config.max_num_batched_tokens, bs), self.allocator
        )
        self.runner = runner_factory(model, self.cache)
        self.eos_ids = _eos_ids(model)
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._seqs: dict[str, Sequence] = {}

    # ---- input checks (no state changes) ---------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt, validated against the vocabulary and ``max_model_len``."""
        return encode_prompt(prompt, self.tokenizer, self.model.config.vocab_size, self.max_model_len)

    @staticmethod
    def coerce_params(params: SamplingParams | dict[str, Any] | None) -> SamplingParams:
        if params is None:
            return SamplingParams()
        if isinstance(params, SamplingParams):
            return params
        if isinstance(params, dict):
            return SamplingParams.from_dict(params)
        raise ValueError(f"params must be SamplingParams or a dict, got {type(params).__name__}")

    # ---- requests ---------------------------------------------------------------------------------
    def make_sequence(self, prompt: Prompt, params: SamplingParams | dict[str, Any] | None = None,
                      request_id: str | None = None) -> Sequence:
        """Validate a request into a ``Sequence`` without touching engine state."""
        params = self.coerce_params(params)
        ids = self.encode(prompt)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        return Sequence(request_id, ids, params, next(self._arrivals), make_generator(params))

    def submit(self, seq: Sequence) -> None:
        self._seqs[seq.request_id] = seq
        self.scheduler.add(seq)

    def add_request(self, prompt: Prompt, params: SamplingParams | dict[str, Any] | None = None,
                    request_id: str | None = None) -> str:
        seq = self.make_sequence(prompt, params, request_id)
        self.submit(seq)
        return seq.request_id

    def is_active(self, request_id: str) -> bool:
        return request_id in self._seqs

    def abort(self, request_id: str) -> None:
        if self.scheduler.abort(request_id) is not None:
            self._seqs.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        logits = self.runner.execute(chunks)
        for c in chunks:
            c.seq.num_computed = c.end
            self.scheduler.register_full_blocks(c.seq)
        sampling = [c.seq for c in chunks if c.sample]
        new_ids = sample(logits, [s.params for s in sampling], [s.generator for s in sampling])
        return [self._append(seq, tok) for seq, tok in zip(sampling, new_ids)]

    def _append(self, seq: Sequence, token: int) -> RequestOutput:
        seq.output_ids.append(token)
        p = seq.params
        reason = None
        delta = self._detokenize(seq)
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            reason = "stop"
        elif p.stop and (cut := self._find_stop(seq, len(delta))) is not None:
            delta = delta[: max(0, cut - (len(seq.text) - len(delta)))]
            seq.text = seq.text[:cut]
            reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self._seqs[seq.request_id]
        return RequestOutput(seq.request_id, [token], delta, reason is not None, reason, list(seq.output_ids),
                             seq.text)

    def _detokenize(self, seq: Sequence) -> str:
        """The text the newest tokens add to ``seq.text`` ("" while they end inside a UTF-8 character
        or render nothing). Incremental: only the tokens since the last emitted text are decoded,
        after the tokens of the emission before as context (a decoder may render a token
        differently at the start of a text, e.g. SentencePiece's leading space), so a step costs
        the same at the 10th and the 10,000th token instead of decoding the whole output again."""
        if self.tokenizer is None:
            return ""
        ids = seq.output_ids
        shown = self.tokenizer.decode(ids[seq.detok_prefix:seq.detok_read], skip_special_tokens=True)
        text = self.tokenizer.decode(ids[seq.detok_prefix:], skip_special_tokens=True)
        if len(text) <= len(shown) or text.endswith("\ufffd"):
            return ""  # nothing new yet, or an incomplete UTF-8 sequence: wait for the next token
        delta = text[len(shown):]
        seq.detok_prefix, seq.detok_read = seq.detok_read, len(ids)
        seq.text += delta
        return delta

    @staticmethod
    def _find_stop(seq: Sequence, delta_len: int) -> int | None:
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, len(seq.text) - delta_len - longest)
        hits = [i for s in seq.params.stop if (i := seq.text.find(s, start)) >= 0]
        return min(hits) if hits else None


def _dtype_name(dtype: ComputeDType | torch.dtype) -> str:
    """``torch.float32`` -> "fp32", ``torch.bfloat16`` -> "bf16"; strings pass through (EngineConfig checks them)."""
    if isinstance(dtype, torch.dtype):
        for name, value in COMPUTE_DTYPES.items():
            if value == dtype:
                return name
        raise ValueError(f"dtype must be 'auto', 'fp32' or 'bf16', got {dtype}")
    return dtype


class LLM:
    """Offline and streaming generation from a checkpoint directory.

    >>> llm = LLM("runs/demo/checkpoint", kv_cache_dtype="fp8")        # FP32 compute
    >>> llm = LLM("runs/demo/checkpoint", dtype="bf16")                # BF16 weights and GEMMs
    >>> llm.generate(["def fib(n):"], SamplingParams(max_tokens=32, temperature=0))[0].text
    """

    def __init__(
        self,
        model: str | Path | DeepseekV3,
        *,
        kv_cache_dtype: KVCacheDType = "auto",
        max_num_seqs: int = 16,
        max_model_len: int | None = None,
        quantization: Literal["auto", "fp8", "none"] = "auto",
        dtype: ComputeDType | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        max_num_batched_tokens: int = 512,
        tokenizer: Any = None,
        runner_factory: Callable[[DeepseekV3, PagedLatentCache], ModelRunner] = ModelRunner,
    ):
        dtype_name = _dtype_name(dtype)
        config = EngineConfig(max_num_seqs, max_model_len, kv_cache_dtype, block_size, num_kv_blocks,
                              max_num_batched_tokens, dtype_name)  # validated before anything loads
        if isinstance(model, DeepseekV3):
            self.model, self.tokenizer = model, tokenizer
        else:
            load_dtype = COMPUTE_DTYPES.get(dtype_name, torch.float32)
            self.model = load_pretrained(model, dtype=load_dtype, device=device, quantization=quantization)
            self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        self.engine = LLMEngine(self.model, self.tokenizer, config, runner_factory)
        self._loop_task: asyncio.Task | None = None
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._pending: list[Sequence] = []
        self._aborts: list[str] = []

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | dict[str, Any] | Seq[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Generate for every prompt (continuous batching); results in prompt order."""
        if self._loop_task is not None and not self._loop_task.done():
            raise RuntimeError("generate() cannot run while streams are active on this LLM")
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"got {len(per_prompt)} sampling params for {len(prompts)} prompts")
        seqs = [self.engine.make_sequence(p, sp) for p, sp in zip(prompts, per_prompt)]  # all checked first
        for seq in seqs:
            self.engine.submit(seq)
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [
            Completion(s.request_id, s.prompt_ids, done[s.request_id].token_ids, done[s.request_id].text,
                       done[s.request_id].finish_reason or "length")
            for s in seqs
        ]

    # ---- streaming --------------------------------------------------------------------------------
    async def stream(self, prompt: Prompt, params: SamplingParams | dict[str, Any] | None = None,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield ``RequestOutput`` deltas for one request while other streams share the batch."""
        seq = self.engine.make_sequence(prompt, params, request_id)  # raises ValueError on bad input
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[seq.request_id] = queue
        self._pending.append(seq)  # the loop submits it between steps (the engine is not thread-safe)
        self._ensure_loop()
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            self._streams.pop(seq.request_id, None)
            if not finished:
                self._aborts.append(seq.request_id)  # the consumer went away: free its blocks
                self._ensure_loop()

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    async def _run_loop(self) -> None:
        while True:
            while self._pending:
                self.engine.submit(self._pending.pop(0))
            while self._aborts:
                self.engine.abort(self._aborts.pop(0))
            if not self.engine.has_unfinished():
                return
            outputs = await asyncio.to_thread(self.engine.step)
            for out in outputs:
                queue = self._streams.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
