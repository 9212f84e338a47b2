"""Token streams, packed training sequences with resumable sharding, and a unigram baseline.

Legend (shape letters used in names and comments):
    N  tokens in a split's stream          Q  packed sequences in a split (``(N-1) // S``)
    S  sequence length (``seq_len``)       S1 ``S + 1`` ids per sequence (inputs + shifted target)
    B  samples in one rank's batch         W  workers (``world_size``)
    V  vocabulary size

Token stream: each split's files (sorted by relpath) are encoded and joined into one flat
stream, each document followed by ``<|eos|>``::

    doc0 <eos> doc1 <eos> ... docK <eos>                      # tokens_N, uint16 if V <= 65536

Packing: sequence ``q`` is ``tokens_N[q*S : q*S + S + 1]`` (consecutive sequences share one
boundary token so that every token is a target once). ``inputs = ids[:, :-1]`` and
``targets = ids[:, 1:]``.

Global sample order: global sample ``g`` is in epoch ``e = g // Q`` at position
``p = g % Q`` and reads sequence ``perm_e[p]``, where ``perm_e`` is a permutation seeded by
``(seed, e)`` (from numpy's PCG64 raw stream, whose output numpy keeps stable across
versions). Example with Q = 4, seed = 0: perm_0 = [3, 2, 1, 0], perm_1 = [1, 2, 0, 3]
→ samples g = 0..7 read sequences 3, 2, 1, 0, 1, 2, 0, 3.

Sharding: a training step with W workers and B samples per worker consumes the global
samples ``[g0, g0 + W*B)``; rank ``r`` takes the contiguous block ``[g0 + r*B, g0 + (r+1)*B)``
and every rank moves on to ``g0 + W*B``. Ranks never overlap, their union is exactly the
global range, and a run resumed at global sample ``g0`` with any other W continues the
same global order. Example: W=2, B=2 from g0=8: rank 0 gets [8, 9], rank 1 [10, 11]; the
same step with W=1, B=4 gets [8, 9, 10, 11].

Token caches are ``.npy`` files named by split and a key over (cache format version,
tokenizer hash, file fingerprint, split), written atomically, and memory-mapped on load.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from expertmesh.train.corpus import Corpus, CorpusFile, SplitName, files_fingerprint, load_corpus
from expertmesh.train.tokenizer import (
    DEFAULT_MODEL_MAX_LENGTH,
    EOS_ID,
    encode_documents,
    prepare_tokenizer,
    tokenizer_hash,
)

if TYPE_CHECKING:
    from expertmesh.train.spec import DataSpec

_CACHE_FORMAT_VERSION = "stream-v1"
_UINT16_VOCAB_LIMIT = 2**16
DEFAULT_UNIGRAM_SMOOTHING = 1.0  # add-one (Laplace) pseudo-count per vocabulary entry


# --------------------------------------------------------------------------- token streams


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (``vocab_size <= 65536``), else ``uint32``."""
    return np.dtype(np.uint16 if vocab_size <= _UINT16_VOCAB_LIMIT else np.uint32)


def stream_cache_key(tokenizer: Tokenizer, files: Sequence[CorpusFile], split: SplitName) -> str:
    """16 hex digits naming a split's token cache; changes with tokenizer, files or split."""
    text = "|".join([_CACHE_FORMAT_VERSION, tokenizer_hash(tokenizer), files_fingerprint(files), split])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def encode_stream(tokenizer: Tokenizer, files: Sequence[CorpusFile]) -> np.ndarray:
    """Encode ``files`` (in relpath order) into one stream, ``<|eos|>`` after each document."""
    ordered = sorted(files, key=lambda f: f.relpath)
    dtype = token_dtype(tokenizer.get_vocab_size())
    pieces: list[np.ndarray] = []
    for ids in encode_documents(tokenizer, [f.read_text() for f in ordered]):
        pieces.append(np.asarray(ids, dtype=dtype))
        pieces.append(np.asarray([EOS_ID], dtype=dtype))
    if not pieces:
        return np.zeros((0,), dtype=dtype)
    return np.concatenate(pieces)  # [N]


def _load_npy(path: Path) -> np.ndarray:
    tokens_N: np.ndarray = np.load(path, mmap_mode="r")  # [N], read-only memory map
    return tokens_N


def load_or_encode_stream(
    tokenizer: Tokenizer, files: Sequence[CorpusFile], split: SplitName, cache_dir: Path | str
) -> np.ndarray:
    """The split's token stream from ``cache_dir`` (memory-mapped), encoding it on a miss.

    A sidecar ``.json`` records what was encoded (for people, not for the key).
    """
    root = Path(cache_dir)
    key = stream_cache_key(tokenizer, files, split)
    path = root / f"tokens-{split}-{key}.npy"
    if path.is_file():
        return _load_npy(path)
    tokens_N = encode_stream(tokenizer, files)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npy", dir=root)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, tokens_N)
        os.replace(tmp_name, path)  # atomic: concurrent writers produce identical bytes
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    meta = {"split": split, "n_files": len(files), "n_tokens": int(tokens_N.size),
            "dtype": str(tokens_N.dtype), "tokenizer_sha256": tokenizer_hash(tokenizer)}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return _load_npy(path)


@dataclass(frozen=True)
class TokenStreams:
    """Both splits' token streams.

    Attributes:
        train: ``[N_train]`` token ids, read-only (memory-mapped from the cache).
        validation: ``[N_val]`` token ids.
        vocab_size: the tokenizer's vocabulary size ``V``.
    """

    train: np.ndarray
    validation: np.ndarray
    vocab_size: int

    def describe(self) -> str:
        """One log line with the token counts."""
        return f"tokens: train {self.train.size:,}, validation {self.validation.size:,} (V={self.vocab_size})"


def load_token_streams(tokenizer: Tokenizer, corpus: Corpus, cache_dir: Path | str) -> TokenStreams:
    """Encode (or load from cache) the train and validation streams of ``corpus``."""
    return TokenStreams(
        train=load_or_encode_stream(tokenizer, corpus.train, "train", cache_dir),
        validation=load_or_encode_stream(tokenizer, corpus.validation, "validation", cache_dir),
        vocab_size=tokenizer.get_vocab_size(),
    )


# --------------------------------------------------------------------------- packing


def _n_sequences(n_tokens: int, seq_len: int) -> int:
    return max(0, (n_tokens - 1) // seq_len)


def _gather_sequences(tokens_N: np.ndarray, seq_ids_B: np.ndarray, seq_len: int) -> np.ndarray:
    offsets_BS1 = seq_ids_B[:, None] * seq_len + np.arange(seq_len + 1)[None, :]  # [B, S1]
    return np.asarray(tokens_N[offsets_BS1], dtype=np.int64)  # [B, S1]


def epoch_permutation(n_sequences: int, seed: int, epoch: int) -> np.ndarray:
    """The order of sequences in ``epoch``: a permutation of ``range(n_sequences)``."""
    bit_generator = np.random.PCG64(np.random.SeedSequence([seed, epoch]))
    keys = bit_generator.random_raw(n_sequences)  # [Q] uint64; raw streams are version-stable
    return np.argsort(keys, kind="stable").astype(np.int64)  # [Q]


@dataclass(frozen=True)
class PackedBatch:
    """One rank's share of one training step.

    Attributes:
        input_ids: ``[B, S+1]`` int64; ``input_ids[:, :-1]`` are inputs, ``[:, 1:]`` targets.
        sample_ids: ``[B]`` global sample indices (position in the global order).
        next_sample: the global sample offset to resume from after this step (same on all ranks).
    """

    input_ids: np.ndarray
    sample_ids: np.ndarray
    next_sample: int

    @property
    def inputs(self) -> np.ndarray:
        """``[B, S]`` model inputs."""
        return self.input_ids[:, :-1]

    @property
    def targets(self) -> np.ndarray:
        """``[B, S]`` next-token targets."""
        return self.input_ids[:, 1:]


class PackedDataset:
    """Fixed-length packed training sequences, shuffled per epoch, sharded by global sample.

    See the module docstring for the global order and the sharding rule.
    """

    def __init__(self, tokens_N: np.ndarray, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len={seq_len} must be positive")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        n_sequences = _n_sequences(int(tokens_N.size), seq_len)
        if n_sequences == 0:
            raise ValueError(f"{tokens_N.size} tokens cannot fill one sequence of seq_len={seq_len}+1")
        self.tokens_N = tokens_N
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.n_sequences = n_sequences
        self._cached_epoch: tuple[int, np.ndarray] | None = None

    def shard(self, rank: int, world_size: int) -> PackedDataset:
        """The same dataset seen by ``rank`` of ``world_size`` workers (shares the tokens)."""
        return PackedDataset(self.tokens_N, self.seq_len, self.seed, rank=rank, world_size=world_size)

    @property
    def tokens_per_epoch(self) -> int:
        """Target tokens in one pass over all sequences (``Q * S``)."""
        return self.n_sequences * self.seq_len

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            self._cached_epoch = (epoch, epoch_permutation(self.n_sequences, self.seed, epoch))
        return self._cached_epoch[1]

    def sequence_ids(self, sample_ids: np.ndarray) -> np.ndarray:
        """Map global sample indices ``[B]`` to packed sequence indices ``[B]``."""
        samples_B = np.asarray(sample_ids, dtype=np.int64)
        if samples_B.size and samples_B.min() < 0:
            raise ValueError(f"global sample indices must be >= 0, got {int(samples_B.min())}")
        epochs_B = samples_B // self.n_sequences
        positions_B = samples_B % self.n_sequences
        seq_ids_B = np.empty_like(samples_B)
        for epoch in np.unique(epochs_B):
            in_epoch = epochs_B == epoch
            seq_ids_B[in_epoch] = self._permutation(int(epoch))[positions_B[in_epoch]]
        return seq_ids_B

    def samples(self, sample_ids: np.ndarray) -> np.ndarray:
        """``[B, S+1]`` int64 token ids of the given global samples."""
        return _gather_sequences(self.tokens_N, self.sequence_ids(sample_ids), self.seq_len)

    def rank_sample_ids(self, batch_size: int, step_start_sample: int) -> np.ndarray:
        """This rank's ``[B]`` global sample indices for the step starting at ``step_start_sample``."""
        first = step_start_sample + self.rank * batch_size
        return np.arange(first, first + batch_size, dtype=np.int64)

    def batches(self, batch_size: int, start_sample: int = 0,
                num_batches: int | None = None) -> Iterator[PackedBatch]:
        """Yield this rank's batches from global sample ``start_sample`` on.

        Each step consumes ``world_size * batch_size`` global samples; the iterator is
        endless (epochs reshuffle) unless ``num_batches`` is given. To resume, pass the
        ``next_sample`` of the last completed batch (any ``world_size``).
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if start_sample < 0:
            raise ValueError(f"start_sample={start_sample} must be >= 0")
        step_start = start_sample
        produced = 0
        while num_batches is None or produced < num_batches:
            sample_ids_B = self.rank_sample_ids(batch_size, step_start)
            step_start += self.world_size * batch_size
            yield PackedBatch(input_ids=self.samples(sample_ids_B), sample_ids=sample_ids_B,
                              next_sample=step_start)
            produced += 1


# --------------------------------------------------------------------------- validation


class ValidationSet:
    """Held-out sequences in a fixed order: sequence ``q`` is ``tokens[q*S : q*S + S + 1]``.

    Not shuffled. Sharded round-robin: rank ``r`` of ``W`` evaluates sequences
    ``r, r + W, r + 2W, ...``; ranks can differ by one sequence, so weight losses by
    target-token counts when combining them.
    """

    def __init__(self, tokens_N: np.ndarray, seq_len: int) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len={seq_len} must be positive")
        self.tokens_N = tokens_N
        self.seq_len = seq_len
        self.n_sequences = _n_sequences(int(tokens_N.size), seq_len)
        if self.n_sequences == 0:
            raise ValueError(f"{tokens_N.size} validation tokens cannot fill seq_len={seq_len}+1")

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1,
                max_sequences: int | None = None) -> Iterator[np.ndarray]:
        """Yield ``[b, S+1]`` int64 batches (the last may be smaller) of this rank's share.

        ``max_sequences`` caps the global number of sequences evaluated (the first ones).
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        total = self.n_sequences if max_sequences is None else min(max_sequences, self.n_sequences)
        seq_ids = np.arange(rank, total, world_size, dtype=np.int64)
        for start in range(0, seq_ids.size, batch_size):
            yield _gather_sequences(self.tokens_N, seq_ids[start:start + batch_size], self.seq_len)


# --------------------------------------------------------------------------- baseline


def unigram_counts(tokens_N: np.ndarray, vocab_size: int) -> np.ndarray:
    """``[V]`` int64 occurrence count of each id."""
    return np.bincount(np.asarray(tokens_N, dtype=np.int64), minlength=vocab_size)[:vocab_size]


def unigram_cross_entropy(
    train_tokens: np.ndarray,
    validation_tokens: np.ndarray,
    vocab_size: int,
    smoothing: float = DEFAULT_UNIGRAM_SMOOTHING,
) -> float:
    """Cross-entropy in nats/token of an add-``smoothing`` unigram model fit on train tokens.

    This is what a model that ignores all context would score on validation; a trained
    model should be clearly below it (stdlib, V=8192, default split: 6.73 nats).
    Only validation tokens that are prediction targets count (the first token is skipped),
    matching a language model's loss over the packed validation stream.

    Raises:
        ValueError: no validation targets, or a non-positive ``smoothing``.
    """
    if smoothing <= 0:
        raise ValueError(f"smoothing={smoothing} must be positive (zero gives infinite loss on unseen ids)")
    targets = np.asarray(validation_tokens[1:], dtype=np.int64)
    if targets.size == 0:
        raise ValueError("validation stream has no target tokens")
    counts_V = unigram_counts(train_tokens, vocab_size).astype(np.float64) + smoothing
    log_probs_V = np.log(counts_V) - math.log(float(counts_V.sum()))
    target_counts_V = unigram_counts(targets, vocab_size).astype(np.float64)
    return float(-(target_counts_V * log_probs_V).sum() / targets.size)


# --------------------------------------------------------------------------- one call


@dataclass(frozen=True)
class PreparedData:
    """Everything a trainer needs from the data side, built by :func:`prepare_data`.

    Attributes:
        corpus: the split corpus.
        tokenizer: the trained tokenizer.
        tokenizer_dir: a directory ``AutoTokenizer.from_pretrained`` loads (copy it into exports).
        streams: both token streams (memory-mapped).
        seq_len: packed sequence length ``S``.
        seed: shuffle seed.
    """

    corpus: Corpus
    tokenizer: Tokenizer
    tokenizer_dir: Path
    streams: TokenStreams
    seq_len: int
    seed: int

    def train_dataset(self, rank: int = 0, world_size: int = 1) -> PackedDataset:
        """The packed training data as seen by ``rank`` of ``world_size``."""
        return PackedDataset(self.streams.train, self.seq_len, seed=self.seed, rank=rank, world_size=world_size)

    def validation_set(self) -> ValidationSet:
        """The fixed held-out sequences."""
        return ValidationSet(self.streams.validation, self.seq_len)

    def unigram_baseline_nats(self) -> float:
        """Validation cross-entropy of the train-fit unigram model (see :func:`unigram_cross_entropy`)."""
        return unigram_cross_entropy(self.streams.train, self.streams.validation, self.streams.vocab_size)

    def describe(self) -> str:
        """Log lines: corpus, tokenizer, tokens."""
        return (f"{self.corpus.describe()}\ntokenizer {self.tokenizer_dir} "
                f"(V={self.tokenizer.get_vocab_size()})\n{self.streams.describe()}")


def prepare_data(
    data: DataSpec, cache_dir: Path | str, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH
) -> PreparedData:
    """Corpus → tokenizer → token streams for a spec's ``data`` section, cached in ``cache_dir``.

    The first call trains the tokenizer (~1 s) and encodes the stdlib (~2 s) on 2 cores;
    later calls with the same inputs only load files. Safe to call from several workers
    at once (writes are atomic renames). Pass ``model.max_position_embeddings`` as
    ``model_max_length`` so the saved tokenizer config states the model's context.
    """
    corpus = load_corpus(data.corpus_root, validation_fraction=data.validation_fraction,
                         seed=data.seed, max_bytes=data.max_corpus_bytes)
    tokenizer, tokenizer_dir = prepare_tokenizer(
        corpus, cache_dir, vocab_size=data.tokenizer_vocab_size,
        max_train_bytes=data.tokenizer_max_train_bytes, model_max_length=model_max_length)
    streams = load_token_streams(tokenizer, corpus, cache_dir)
    return PreparedData(corpus=corpus, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir,
                        streams=streams, seq_len=data.seq_len, seed=data.seed)
