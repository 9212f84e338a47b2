"""Byte-level BPE tokenizer for the demo model, trained on the stdlib corpus.

The tokenizer is a plain ``tokenizers.Tokenizer``:

- model: BPE over the 256 byte symbols (GPT-2 byte-to-unicode alphabet), no unknown token;
- pre-tokenizer: ``ByteLevel(add_prefix_space=False)`` with the GPT-2 split regex, so runs
  of spaces (indentation) and newlines become their own tokens;
- no normalizer, byte-level decoder: ``decode(encode(text)) == text`` for any string,
  whitespace and newlines included;
- special tokens with fixed ids: ``<|bos|>`` = 0, ``<|eos|>`` = 1, ``<|pad|>`` = 2; then
  the 256 byte symbols (ids 3..258); then merges in the order learned.

Training is deterministic for the same input texts and parameters (same merges, same
JSON, same :func:`tokenizer_hash`). On 2 CPU cores the full stdlib train split (~9 MB)
trains in ~1 s, so ``max_train_bytes`` is only a knob, not a necessity.

:func:`save_tokenizer` writes the three files transformers reads
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``), so
``AutoTokenizer.from_pretrained(dir)`` works offline and gives the same ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from expertmesh.train.corpus import Corpus, CorpusFile, files_fingerprint, limit_bytes

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS: tuple[str, str, str] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
BOS_ID = 0
EOS_ID = 1
PAD_ID = 2

DEFAULT_VOCAB_SIZE = 8192
DEFAULT_MIN_FREQUENCY = 2
DEFAULT_MODEL_MAX_LENGTH = 4096
N_BYTE_SYMBOLS = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + N_BYTE_SYMBOLS + 1

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
_CACHE_FORMAT_VERSION = "bpe-v1"


class TokenizerError(ValueError):
    """A tokenizer file is missing, malformed, or lacks the fixed special-token ids."""


def new_byte_level_tokenizer() -> Tokenizer:
    """An untrained tokenizer with the byte-level pipeline described in the module docstring."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # The ByteLevel post-processor only fixes offsets; it adds no tokens.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def train_tokenizer(
    texts: Sequence[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = DEFAULT_MIN_FREQUENCY,
) -> Tokenizer:
    """Train a byte-level BPE on ``texts``.

    Args:
        texts: training documents (order matters only through ties, and is fixed by callers).
        vocab_size: target vocabulary size including the 3 special tokens and 256 bytes;
            a small corpus may end with fewer tokens (no pair left with ``min_frequency``).
        min_frequency: minimum pair count for a merge.

    Raises:
        ValueError: ``vocab_size`` is below :data:`MIN_VOCAB_SIZE` or ``texts`` is empty.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} must be >= {MIN_VOCAB_SIZE} (3 special + 256 bytes + 1)")
    if not texts:
        raise ValueError("cannot train a tokenizer on zero texts")
    tokenizer = new_byte_level_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0, 1, 2 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    check_special_tokens(tokenizer)
    return tokenizer


def tokenizer_training_files(
    files: Sequence[CorpusFile], max_train_bytes: int | None, seed: int = 0
) -> list[CorpusFile]:
    """The files BPE is trained on: all of ``files``, or a hash-ordered subset within the cap."""
    return limit_bytes(files, max_train_bytes, seed=seed)


def train_tokenizer_on_corpus(
    corpus: Corpus,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_train_bytes: int | None = None,
    min_frequency: int = DEFAULT_MIN_FREQUENCY,
) -> Tokenizer:
    """Train on the corpus's train split (never on validation), capped at ``max_train_bytes``."""
    files = tokenizer_training_files(corpus.train, max_train_bytes, seed=corpus.seed)
    return train_tokenizer([f.read_text() for f in files], vocab_size=vocab_size,
                           min_frequency=min_frequency)


def check_special_tokens(tokenizer: Tokenizer) -> None:
    """Raise :class:`TokenizerError` unless bos/eos/pad have ids 0/1/2."""
    for token, expected_id in zip(SPECIAL_TOKENS, (BOS_ID, EOS_ID, PAD_ID), strict=True):
        actual_id = tokenizer.token_to_id(token)
        if actual_id != expected_id:
            raise TokenizerError(f"special token {token} has id {actual_id}, expected {expected_id}")


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """SHA-256 hex of the tokenizer's canonical JSON (vocab, merges, pipeline)."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def tokenizer_config_dict(model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> dict[str, object]:
    """The ``tokenizer_config.json`` content for transformers.

    No bos/eos is added on encode (so transformers gives the same ids as ``tokenizers``) and
    decode does no "clean up" of spaces (which would corrupt source code).
    """
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "right",
        "model_input_names": ["input_ids", "attention_mask"],
    }


def special_tokens_map_dict() -> dict[str, str]:
    """The ``special_tokens_map.json`` content."""
    return {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}


def _write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_tokenizer(
    tokenizer: Tokenizer, out_dir: Path | str, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH
) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    Returns the directory. Overwrites existing files of the same names.
    """
    check_special_tokens(tokenizer)
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / TOKENIZER_FILE))
    _write_json(directory / TOKENIZER_CONFIG_FILE, tokenizer_config_dict(model_max_length))
    _write_json(directory / SPECIAL_TOKENS_MAP_FILE, special_tokens_map_dict())
    return directory


def load_tokenizer(directory: Path | str) -> Tokenizer:
    """Load ``tokenizer.json`` from ``directory`` (or a path to the file itself).

    Raises:
        TokenizerError: the file is missing or unreadable, or special ids are wrong.
    """
    path = Path(directory)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(f"no tokenizer at {path}; train one with train_tokenizer_on_corpus")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception on bad JSON
        raise TokenizerError(f"cannot read tokenizer {path}: {exc}") from exc
    check_special_tokens(tokenizer)
    return tokenizer


def prepare_tokenizer(
    corpus: Corpus,
    cache_dir: Path | str,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_train_bytes: int | None = None,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> tuple[Tokenizer, Path]:
    """Load the tokenizer for these inputs from ``cache_dir``, training and saving it if absent.

    The cache entry is keyed by the training files' fingerprint and every training
    parameter, so a changed corpus or parameter trains a new tokenizer. Safe when several
    processes race: each writes a private temp dir and renames it into place.

    Returns:
        ``(tokenizer, directory)`` where the directory loads with ``AutoTokenizer``.
    """
    files = tokenizer_training_files(corpus.train, max_train_bytes, seed=corpus.seed)
    key_text = "|".join([_CACHE_FORMAT_VERSION, files_fingerprint(files), str(vocab_size),
                         str(DEFAULT_MIN_FREQUENCY), str(model_max_length)])
    key = hashlib.sha256(key_text.encode("utf-8")).hexdigest()[:16]
    root = Path(cache_dir)
    final_dir = root / f"tokenizer-{vocab_size}-{key}"
    if (final_dir / TOKENIZER_FILE).is_file():
        return load_tokenizer(final_dir), final_dir
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer([f.read_text() for f in files], vocab_size=vocab_size)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=root))
    try:
        save_tokenizer(tokenizer, tmp_dir, model_max_length=model_max_length)
        try:
            os.rename(tmp_dir, final_dir)
        except OSError:
            if not (final_dir / TOKENIZER_FILE).is_file():  # not a lost race: a real error
                raise
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return load_tokenizer(final_dir), final_dir


def encode_documents(tokenizer: Tokenizer, texts: Iterable[str]) -> list[list[int]]:
    """Token ids of each text, with special-token strings inside the text kept as plain text.

    A document that happens to contain ``"<|eos|>"`` is encoded byte by byte, so the
    only special ids in a training stream are the separators added on purpose.
    """
    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.encode_special_tokens = True
    return [encoding.ids for encoding in plain.encode_batch(list(texts), add_special_tokens=False)]
