"""Unit tests for the training data side: corpus, tokenizer, packed data, specs.

Fast (well under a minute on 2 cores): the tokenizer and streams are built once per module
from a ~300 KB subset of the stdlib, with caches under pytest's tmp dirs.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from expertmesh.train.corpus import (
    EXCLUDED_DIR_NAMES,
    Corpus,
    discover_files,
    limit_bytes,
    load_corpus,
    split_files,
)
from expertmesh.train.data import (
    PackedDataset,
    TokenStreams,
    ValidationSet,
    load_token_streams,
    prepare_data,
    unigram_cross_entropy,
)
from expertmesh.train.spec import (
    TrainSpec,
    dump_spec,
    load_spec,
    preset,
    spec_from_dict,
)
from expertmesh.train.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    load_tokenizer,
    prepare_tokenizer,
    save_tokenizer,
    tokenizer_hash,
    train_tokenizer_on_corpus,
)

SUBSET_BYTES = 300_000
SUBSET_FRACTION = 0.2
TEST_VOCAB = 1024
SEQ_LEN = 32


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return load_corpus(validation_fraction=SUBSET_FRACTION, seed=0, max_bytes=SUBSET_BYTES)


@pytest.fixture(scope="module")
def tokenizer_dir(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory):
    tokenizer, directory = prepare_tokenizer(corpus, tmp_path_factory.mktemp("tok"), vocab_size=TEST_VOCAB)
    return tokenizer, directory


@pytest.fixture(scope="module")
def streams(corpus: Corpus, tokenizer_dir, tmp_path_factory: pytest.TempPathFactory) -> TokenStreams:
    tokenizer, _ = tokenizer_dir
    return load_token_streams(tokenizer, corpus, tmp_path_factory.mktemp("tokens"))


# --------------------------------------------------------------------------- corpus


def test_discovery_is_sorted_deterministic_and_excludes() -> None:
    files = discover_files()
    relpaths = [f.relpath for f in files]
    assert relpaths == sorted(relpaths)
    assert relpaths == [f.relpath for f in discover_files()]
    assert len(files) > 100
    for relpath in relpaths:
        parts = relpath.split("/")
        assert relpath.endswith(".py")
        assert not set(parts[:-1]) & EXCLUDED_DIR_NAMES, relpath
        assert not parts[-1].startswith("_sysconfigdata"), relpath
    assert "json/decoder.py" in relpaths and "os.py" in relpaths


def test_split_is_deterministic_disjoint_and_seedable() -> None:
    full = load_corpus()
    again = load_corpus()
    assert full.train == again.train and full.validation == again.validation
    train = {f.relpath for f in full.train}
    validation = {f.relpath for f in full.validation}
    assert train.isdisjoint(validation)
    assert train | validation == {f.relpath for f in discover_files()}
    assert 0.005 < len(validation) / (len(train) + len(validation)) < 0.05
    other_seed = {f.relpath for f in load_corpus(seed=1).validation}
    assert other_seed != validation
    assert "corpus" in full.describe() and "files" in full.describe()


def test_subset_respects_budget_and_keeps_each_files_split() -> None:
    files = discover_files()
    subset = limit_bytes(files, SUBSET_BYTES)
    assert 0 < sum(f.size_bytes for f in subset) <= SUBSET_BYTES
    assert subset == limit_bytes(files, SUBSET_BYTES)
    _, full_validation = split_files(files, 0.2, seed=3)
    _, sub_validation = split_files(subset, 0.2, seed=3)
    full_names = {f.relpath for f in full_validation}
    assert {f.relpath for f in sub_validation} == {f.relpath for f in subset} & full_names
    with pytest.raises(ValueError, match="max_bytes"):
        limit_bytes(files, 0)


# --------------------------------------------------------------------------- tokenizer


def _sample_texts(corpus: Corpus) -> list[str]:
    texts = [f.read_text() for f in corpus.files[:6]]
    texts.append("def f(x):\r\n\tif x:\n        return '<|eos|>'  # caf\u00e9 \u4e2d \U0001F600\n\n\n   \n")
    return texts


def test_tokenizer_ids_roundtrip_and_determinism(corpus: Corpus, tokenizer_dir) -> None:
    tokenizer, _ = tokenizer_dir
    assert tokenizer.get_vocab_size() == TEST_VOCAB
    assert (tokenizer.token_to_id("<|bos|>"), tokenizer.token_to_id("<|eos|>"),
            tokenizer.token_to_id("<|pad|>")) == (BOS_ID, EOS_ID, PAD_ID) == (0, 1, 2)
    for text in _sample_texts(corpus):
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    retrained = train_tokenizer_on_corpus(corpus, vocab_size=TEST_VOCAB)
    assert tokenizer_hash(retrained) == tokenizer_hash(tokenizer)


def test_tokenizer_save_load_and_transformers_parity(corpus: Corpus, tokenizer_dir, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer, cached_dir = tokenizer_dir
    out_dir = save_tokenizer(tokenizer, tmp_path / "tok")
    assert {p.name for p in out_dir.iterdir()} == {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert tokenizer_hash(load_tokenizer(out_dir)) == tokenizer_hash(tokenizer)
    auto = transformers.AutoTokenizer.from_pretrained(str(out_dir))
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(cached_dir))
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    for text in _sample_texts(corpus):
        ids = tokenizer.encode(text).ids
        assert auto.encode(text) == ids
        assert fast(text)["input_ids"] == ids
        assert auto.decode(ids) == text
        assert fast.decode(ids) == text


def test_prepare_tokenizer_uses_cache(corpus: Corpus, tokenizer_dir) -> None:
    tokenizer, directory = tokenizer_dir
    started = time.perf_counter()
    again, again_dir = prepare_tokenizer(corpus, directory.parent, vocab_size=TEST_VOCAB)
    assert again_dir == directory
    assert tokenizer_hash(again) == tokenizer_hash(tokenizer)
    assert time.perf_counter() - started < 1.0


# --------------------------------------------------------------------------- streams


def test_streams_are_cached_and_separated_by_eos(corpus: Corpus, tokenizer_dir,
                                                 streams: TokenStreams, tmp_path: Path) -> None:
    tokenizer, _ = tokenizer_dir
    assert streams.train.dtype == np.uint16
    assert int((np.asarray(streams.train) == EOS_ID).sum()) == len(corpus.train)
    assert int((np.asarray(streams.validation) == EOS_ID).sum()) == len(corpus.validation)
    assert streams.train[-1] == EOS_ID
    first_doc = tokenizer.encode(corpus.train[0].read_text()).ids
    assert streams.train[:len(first_doc)].tolist() == first_doc
    load_token_streams(tokenizer, corpus, tmp_path)
    started = time.perf_counter()
    cached = load_token_streams(tokenizer, corpus, tmp_path)
    assert time.perf_counter() - started < 0.5
    assert isinstance(cached.train, np.memmap)
    np.testing.assert_array_equal(cached.train, streams.train)
    np.testing.assert_array_equal(cached.validation, streams.validation)
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 2


# --------------------------------------------------------------------------- packing


def _ids(dataset: PackedDataset, batch_size: int, start: int, n: int) -> list[np.ndarray]:
    return [b.input_ids for b in dataset.batches(batch_size, start_sample=start, num_batches=n)]


def test_packed_batches_deterministic_and_shaped(streams: TokenStreams) -> None:
    a = PackedDataset(streams.train, SEQ_LEN, seed=7)
    b = PackedDataset(streams.train, SEQ_LEN, seed=7)
    c = PackedDataset(streams.train, SEQ_LEN, seed=8)
    for x, y in zip(_ids(a, 4, 0, 3), _ids(b, 4, 0, 3), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(_ids(a, 4, 0, 1)[0], _ids(c, 4, 0, 1)[0])
    batch = next(a.batches(4))
    assert batch.input_ids.shape == (4, SEQ_LEN + 1) and batch.input_ids.dtype == np.int64
    np.testing.assert_array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    # One epoch visits every packed sequence exactly once; the next epoch reshuffles.
    q = a.n_sequences
    epoch0 = a.sequence_ids(np.arange(q))
    epoch1 = a.sequence_ids(np.arange(q, 2 * q))
    assert sorted(epoch0.tolist()) == list(range(q)) == sorted(epoch1.tolist())
    assert not np.array_equal(epoch0, epoch1)


def test_ranks_are_disjoint_and_reshard_to_the_same_global_order(streams: TokenStreams) -> None:
    base = PackedDataset(streams.train, SEQ_LEN, seed=3)
    start, per_rank, steps = 5, 3, 4
    ranks = [base.shard(rank, 2) for rank in range(2)]
    rank_batches = [list(r.batches(per_rank, start_sample=start, num_batches=steps)) for r in ranks]
    single = list(base.batches(2 * per_rank, start_sample=start, num_batches=steps))
    seen: set[int] = set()
    for step in range(steps):
        ids0, ids1 = (rank_batches[r][step].sample_ids for r in range(2))
        assert set(ids0.tolist()).isdisjoint(ids1.tolist())
        seen |= set(ids0.tolist()) | set(ids1.tolist())
        union = np.concatenate([rank_batches[0][step].input_ids, rank_batches[1][step].input_ids])
        np.testing.assert_array_equal(union, single[step].input_ids)
        assert rank_batches[0][step].next_sample == rank_batches[1][step].next_sample == single[step].next_sample
    assert seen == set(range(start, start + steps * 2 * per_rank))


def test_resume_from_sample_offset_continues_identically(streams: TokenStreams) -> None:
    dataset = PackedDataset(streams.train, SEQ_LEN, seed=11)
    full = list(dataset.batches(4, num_batches=6))
    resumed = list(dataset.batches(4, start_sample=full[2].next_sample, num_batches=3))
    for x, y in zip(full[3:], resumed, strict=True):
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
    # Two workers for 2 steps, then resume on one worker: same global stream.
    two = [dataset.shard(r, 2) for r in range(2)]
    first = [list(w.batches(2, num_batches=2)) for w in two]
    after = list(PackedDataset(streams.train, SEQ_LEN, seed=11).batches(4, start_sample=first[0][-1].next_sample,
                                                                       num_batches=4))
    stitched = [np.concatenate([first[0][s].input_ids, first[1][s].input_ids]) for s in range(2)]
    stitched += [b.input_ids for b in after]
    assert len(stitched) == len(full)
    for x, y in zip(stitched, full, strict=True):
        np.testing.assert_array_equal(x, y.input_ids)
    # Crossing an epoch boundary keeps going.
    last = list(dataset.batches(4, start_sample=dataset.n_sequences - 2, num_batches=2))
    assert last[0].sample_ids.tolist() == list(range(dataset.n_sequences - 2, dataset.n_sequences + 2))


def test_validation_set_is_fixed_and_sharded(streams: TokenStreams) -> None:
    validation = ValidationSet(streams.validation, SEQ_LEN)
    batches = list(validation.batches(5))
    assert sum(b.shape[0] for b in batches) == validation.n_sequences
    np.testing.assert_array_equal(batches[0][0], np.asarray(streams.validation[:SEQ_LEN + 1], dtype=np.int64))
    again = list(validation.batches(5))
    for x, y in zip(batches, again, strict=True):
        np.testing.assert_array_equal(x, y)
    sharded = [np.concatenate(list(validation.batches(5, rank=r, world_size=2))) for r in range(2)]
    assert sharded[0].shape[0] + sharded[1].shape[0] == validation.n_sequences
    np.testing.assert_array_equal(sharded[1][0], batches[0][1])


def test_epoch_permutation_is_pinned() -> None:
    # Documented in data.py; a change here silently reorders every resumed run.
    from expertmesh.train.data import epoch_permutation

    assert epoch_permutation(4, 0, 0).tolist() == [3, 2, 1, 0]
    assert epoch_permutation(4, 0, 1).tolist() == [1, 2, 0, 3]


def test_unigram_baseline(streams: TokenStreams) -> None:
    ce = unigram_cross_entropy(streams.train, streams.validation, streams.vocab_size)
    assert math.isfinite(ce) and 0 < ce < math.log(streams.vocab_size)
    # Hand check: V=2, train [0, 0, 1] -> p(0) = (2+1)/(3+2) = 0.6; targets [0].
    assert unigram_cross_entropy(np.array([0, 0, 1]), np.array([1, 0]), 2) == pytest.approx(-math.log(0.6))


def test_prepare_data_for_the_tiny_preset(tmp_path: Path) -> None:
    spec = preset("tiny")
    prepared = prepare_data(spec.data, tmp_path, model_max_length=spec.model.max_position_embeddings)
    assert prepared.tokenizer.get_vocab_size() <= spec.model.vocab_size
    batch = next(prepared.train_dataset(rank=1, world_size=2).batches(spec.micro_batch_size))
    assert batch.input_ids.shape == (spec.micro_batch_size, spec.data.seq_len + 1)
    assert batch.sample_ids.tolist() == list(range(spec.micro_batch_size, 2 * spec.micro_batch_size))
    assert int(batch.input_ids.max()) < spec.model.vocab_size
    assert prepared.validation_set().n_sequences > 0
    assert 0 < prepared.unigram_baseline_nats() < math.log(spec.model.vocab_size)
    assert "validation" in prepared.describe()
    again = prepare_data(spec.data, tmp_path, model_max_length=spec.model.max_position_embeddings)
    assert again.tokenizer_dir == prepared.tokenizer_dir
    np.testing.assert_array_equal(again.streams.train, prepared.streams.train)


# --------------------------------------------------------------------------- spec


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("steps: 10\nbogus: 1\n", r"bogus: Extra inputs are not permitted"),
        ("model:\n  hidden_sise: 64\n", r"model\.hidden_sise: Extra inputs"),
        ("steps: -5\n", r"steps: Input should be greater than 0"),
        ("model:\n  n_group: 4\n  topk_group: 5\n", r"model: topk_group=5 must be <= n_group=4"),
        ("model:\n  n_routed_experts: 18\n", r"n_routed_experts=18 must be divisible by n_group=4"),
        ("model:\n  num_experts_per_tok: 12\n", r"num_experts_per_tok=12 exceeds"),
        ("steps: [1, 2\n", r"not valid YAML at line \d+"),
        ("- 1\n- 2\n", r"must be a mapping"),
        ("preset: huge\n", r"unknown preset 'huge'"),
        ("mtp: {enabled: true}\n", r"num_nextn_predict_layers=1"),
    ],
)
def test_spec_errors_are_one_readable_line(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path / "spec.yaml", text)
    with pytest.raises(ValueError, match=expected) as info:
        load_spec(path)
    assert "\n" not in str(info.value)


def test_spec_missing_file_and_roundtrip(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"spec file not found: .*nope\.yaml"):
        load_spec(tmp_path / "nope.yaml")
    spec = load_spec(_write(tmp_path / "s.yaml", "preset: tiny\nsteps: 30\nmodel: {num_hidden_layers: 4}\n"))
    assert spec.steps == 30 and spec.model.num_hidden_layers == 4
    assert spec.model.hidden_size == preset("tiny").model.hidden_size
    for name in ("back.yaml", "back.json"):
        assert load_spec(dump_spec(spec, tmp_path / name)) == spec
    assert load_spec(_write(tmp_path / "empty.yaml", "")) == TrainSpec()
    with pytest.raises(ValueError, match="unknown preset"):
        preset("nope")


def test_presets_build_hf_configs_with_expected_sizes() -> None:
    transformers = pytest.importorskip("transformers")
    import torch

    demo = preset("demo")
    model = demo.model
    assert model.n_routed_experts >= 16 and model.n_group >= 4 and model.topk_group < model.n_group
    assert model.n_shared_experts == 1 and model.first_k_dense_replace == 1
    config_dict = demo.to_hf_config_dict()
    assert config_dict["model_type"] == "deepseek_v3"
    assert (config_dict["bos_token_id"], config_dict["eos_token_id"], config_dict["pad_token_id"]) == (0, 1, 2)
    for spec, low, high in ((demo, 10_000_000, 30_000_000), (preset("tiny"), 100_000, 1_000_000)):
        config = transformers.DeepseekV3Config(**spec.to_hf_config_dict())
        assert config.n_group == spec.model.n_group and config.topk_group == spec.model.topk_group
        with torch.device("meta"):
            hf_model = transformers.DeepseekV3ForCausalLM(config)
        hf_count = sum(p.numel() for p in hf_model.parameters())
        counts = spec.model.parameter_count()
        assert counts.total == hf_count
        assert low <= counts.total <= high
        assert counts.active < counts.total


def test_spec_from_dict_accepts_mtp_and_elastic() -> None:
    spec = spec_from_dict({"model": {"num_nextn_predict_layers": 1}, "mtp": {"enabled": True},
                           "workers": 2, "elastic": {"min_workers": 1, "max_workers": 4}})
    assert spec.mtp.enabled and spec.model.parameter_count().mtp > 0
    with pytest.raises(ValueError, match=r"workers=5 must be within elastic \[1, 4\]"):
        spec_from_dict({"workers": 5, "elastic": {"min_workers": 1, "max_workers": 4}})
