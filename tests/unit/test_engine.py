"""The single-process engine against transformers' greedy generate, plus its own contract."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from tiny_models import char_tokenizer, hf_greedy, make_hf_model, save_hf_checkpoint, train_tiny

from expertmesh.engine import LLM, LLMEngine, SamplingParams
from expertmesh.model import cpu_kernels, load_pretrained

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(20, 53)), [40] * 17, [7, 8, 9, 10, 11, 12, 13, 14, 15]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_hf_checkpoint(tmp_path_factory.mktemp("engine"), seed=3, q_lora_rank=16)


@pytest.fixture(scope="module")
def reference(ckpt):
    hf = make_hf_model(seed=3, q_lora_rank=16)
    return {tuple(p): hf_greedy(hf, p, GREEDY.max_tokens) for p in PROMPTS}


@pytest.fixture(scope="module")
def model(ckpt):
    return load_pretrained(ckpt)


def _assert_clean(engine: LLMEngine) -> None:
    assert not engine.has_unfinished()
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_batch_matches_transformers(model, reference):
    llm = LLM(model, max_num_seqs=8, block_size=4)
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == reference[tuple(prompt)]
        assert out.finish_reason == "length"
    _assert_clean(llm.engine)


def test_requests_join_mid_flight(model, reference):
    llm = LLM(model, max_num_seqs=8, block_size=4)
    engine = llm.engine
    results: dict[str, list[int]] = {}
    ids = {engine.add_request(PROMPTS[0], GREEDY): PROMPTS[0]}
    steps = 0
    pending = list(PROMPTS[1:])
    while engine.has_unfinished() or pending:
        if pending and steps % 3 == 2:  # a new request joins running decodes every third step
            prompt = pending.pop(0)
            ids[engine.add_request(prompt, GREEDY)] = prompt
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.token_ids
        steps += 1
    for rid, prompt in ids.items():
        assert results[rid] == reference[tuple(prompt)]
    _assert_clean(engine)


def test_chunked_prefill_matches(model, reference):
    llm = LLM(model, max_num_seqs=8, block_size=4, max_num_batched_tokens=6)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [reference[tuple(p)] for p in PROMPTS]


def test_preemption_recomputes_and_matches(model, reference):
    # 12 blocks of 4 tokens = 48 slots: the 5 requests (up to 43 tokens each) cannot all fit at once
    llm = LLM(model, max_num_seqs=8, block_size=4, num_kv_blocks=12)
    outs = llm.generate(PROMPTS, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [reference[tuple(p)] for p in PROMPTS]
    _assert_clean(llm.engine)


def test_prefix_blocks_are_shared(model, reference):
    llm = LLM(model, max_num_seqs=8, block_size=4)
    first = llm.generate([PROMPTS[2]], GREEDY)[0]
    hits_before = llm.engine.allocator.prefix_hits
    second = llm.generate([PROMPTS[2]], GREEDY)[0]
    assert llm.engine.allocator.prefix_hits - hits_before == (len(PROMPTS[2]) - 1) // 4
    assert first.token_ids == second.token_ids == reference[tuple(PROMPTS[2])]


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    llm = LLM(model, max_num_seqs=8)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=20, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], params)[0].token_ids
    batched = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]],
                           [SamplingParams(max_tokens=5, temperature=1.0, seed=7), params, GREEDY])[1].token_ids
    assert alone == batched
    other_seed = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0.9, seed=99,
                                                           ignore_eos=True))[0].token_ids
    assert other_seed != alone


def test_top_k_1_is_greedy(model, reference):
    llm = LLM(model)
    out = llm.generate([PROMPTS[3]], SamplingParams(max_tokens=10, temperature=1.3, top_k=1, seed=3,
                                                    ignore_eos=True))[0]
    assert out.token_ids == reference[tuple(PROMPTS[3])]


def test_stop_token_ids_end_with_stop(model, reference):
    ref = reference[tuple(PROMPTS[0])]
    llm = LLM(model)
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[ref[3]],
                                                    ignore_eos=True))[0]
    first = ref.index(ref[3])
    assert out.token_ids == ref[: first + 1]
    assert out.finish_reason == "stop"


def test_eos_stops_unless_ignored(model, reference):
    ref = reference[tuple(PROMPTS[1])]
    eos = ref[2]
    model_eos = load_pretrained_with_eos(model, eos)
    llm = LLM(model_eos)
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0))[0]
    assert out.token_ids == ref[: ref.index(eos) + 1] and out.finish_reason == "stop"
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == ref and out.finish_reason == "length"


def load_pretrained_with_eos(model, eos: int):
    clone = type(model)(model.config.replace(eos_token_id=eos))
    clone.load_state_dict(model.state_dict())
    return clone.eval()


def test_stop_strings_with_tokenizer(model):
    tok = char_tokenizer(model.config.vocab_size)
    llm = LLM(model, tokenizer=tok)
    free = llm.generate(["def f(x):"], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert free.text == tok.decode(free.token_ids)
    stop = free.text[3:5]
    out = llm.generate(["def f(x):"], SamplingParams(max_tokens=10, temperature=0, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.find(stop)]
    assert stop not in out.text


def _metaspace_tokenizer(texts: list[str]):
    """A SentencePiece-style BPE: words carry a leading "\u2581" that the decoder turns into a space,
    except at the very start of a text (so a token renders differently there)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"], show_progress=False))
    return tok


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_incremental_detokenization_adds_up_to_the_full_decode(model, kind):
    from expertmesh.train.tokenizer import train_tokenizer

    text = "def café(x):\n    return '€ 😀' + x  # ünïcode, done"
    corpus = ["def f(x):\n    return x + 1\n", "import os, sys # a comment\n"] * 20
    tok = train_tokenizer(corpus, vocab_size=300) if kind == "byte_level" else _metaspace_tokenizer(corpus)
    engine = LLM(model, tokenizer=tok).engine
    seq = engine.make_sequence([3], GREEDY)
    deltas, waited = [], 0
    for token in tok.encode(text).ids:
        seq.output_ids.append(token)
        deltas.append(engine._detokenize(seq))
        full = tok.decode(seq.output_ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # inside a UTF-8 character: nothing shown yet
            waited += 1
            assert deltas[-1] == ""
        else:
            assert seq.text == full
    assert "".join(deltas) == seq.text == tok.decode(seq.output_ids, skip_special_tokens=True)
    if kind == "byte_level":
        assert waited > 0  # multi-byte characters were split over tokens: the wait was exercised
        assert seq.text == text
    else:  # a word's token alone renders without its space: the context window is what keeps it
        ids = seq.output_ids
        assert any(d.startswith(" ") and not tok.decode([ids[i]]).startswith(" ") for i, d in enumerate(deltas) if i)


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], GREEDY, "prompt is empty"),
        ("", GREEDY, "prompt is empty"),
        ("text without tokenizer", GREEDY, "no tokenizer"),
        ([1, 2, 10_000], GREEDY, "outside the vocabulary"),
        ([-1, 2], GREEDY, "outside the vocabulary"),
        (list(range(2, 90)) * 3, GREEDY, "max_model_len"),
        ([1, 2], {"max_tokens": 0}, "max_tokens"),
        ([1, 2], {"temperature": -0.5}, "temperature"),
        ([1, 2], {"top_p": 0.0}, "top_p"),
        ([1, 2], {"top_p": 1.5}, "top_p"),
        ([1, 2], {"max_tokens": 4, "frequency_pentaly": 1.0}, "unknown sampling parameter.*frequency_pentaly"),
    ],
)
def test_bad_input_is_rejected_and_engine_keeps_serving(model, reference, prompt, params, message):
    llm = LLM(model, max_model_len=200)
    with pytest.raises(ValueError, match=message):
        llm.generate([PROMPTS[0], prompt], params)
    _assert_clean(llm.engine)  # the valid prompt in the same call was not started either
    assert llm.generate([PROMPTS[0]], GREEDY)[0].token_ids == reference[tuple(PROMPTS[0])]


@pytest.fixture(scope="module")
def trained():
    return train_tiny(steps=150, seed=0)


def test_fp8_cache_halves_entry_bytes_and_mostly_agrees(trained):
    # a trained model: random ones have near-tied logits that any rounding flips
    bf16 = LLM(trained, kv_cache_dtype="bf16", num_kv_blocks=64)
    fp8 = LLM(trained, kv_cache_dtype="fp8", num_kv_blocks=64)
    assert fp8.engine.cache.entries.element_size() == 1 and bf16.engine.cache.entries.element_size() == 2
    entries_fp8 = fp8.engine.cache.entries.numel()
    assert fp8.engine.cache.entries.numel() == bf16.engine.cache.entries.numel()
    scale_bytes = fp8.engine.cache.scales.numel() * 4
    assert fp8.engine.cache.allocated_bytes == entries_fp8 + scale_bytes
    assert fp8.engine.cache.allocated_bytes - scale_bytes == bf16.engine.cache.allocated_bytes // 2
    prompts = [[5, 8, 11, 14], [3, 4, 5], [20, 22, 24, 26, 28], [40, 43, 46], [7, 12, 17, 22], [88, 89, 90],
               list(range(10, 50, 3))]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    a = [o.token_ids for o in bf16.generate(prompts, params)]
    b = [o.token_ids for o in fp8.generate(prompts, params)]
    agree = sum(x == y for x, y in zip(a, b))
    assert agree >= 0.75 * len(prompts), (a, b)


def test_streaming_matches_generate(model, reference):
    llm = LLM(model, max_num_seqs=4)

    async def collect(prompt):
        tokens = []
        async for out in llm.stream(prompt, GREEDY):
            tokens += out.new_token_ids
            last = out
        assert last.finished and last.finish_reason == "length"
        return tokens

    async def main():
        return await asyncio.gather(*(collect(p) for p in PROMPTS[:3]))

    results = asyncio.run(main())
    assert results == [reference[tuple(p)] for p in PROMPTS[:3]]
    _assert_clean(llm.engine)


def test_abandoned_stream_frees_its_blocks(model):
    llm = LLM(model, max_num_seqs=4)

    async def main():
        async for out in llm.stream(PROMPTS[2], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)):
            break
        with pytest.raises(ValueError, match="temperature"):
            async for _ in llm.stream(PROMPTS[0], {"temperature": -1}):
                pass
        await llm._loop_task

    asyncio.run(main())
    _assert_clean(llm.engine)


def test_bf16_compute_agrees_with_fp32_on_a_trained_model(trained):
    prompts = [[5, 8, 11, 14], [3, 4, 5], [20, 22, 24, 26, 28], [40, 43, 46], [7, 12, 17, 22], [88, 89, 90],
               list(range(10, 50, 3))]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    fp32 = [o.token_ids for o in LLM(trained, num_kv_blocks=64).generate(prompts, params)]
    llm = LLM(copy.deepcopy(trained), dtype="bf16", num_kv_blocks=64)  # casts the model it is given
    assert llm.model.dtype == torch.bfloat16 and llm.engine.cache.entries.dtype == torch.bfloat16
    assert llm.model.layers[1].mlp.gate.weight.dtype == torch.float32  # routing stays FP32
    bf16 = [o.token_ids for o in llm.generate(prompts, params)]
    first_two = sum(a[:2] == b[:2] for a, b in zip(fp32, bf16))
    assert first_two >= len(prompts) - 1, (fp32, bf16)
    assert sum(a == b for a, b in zip(fp32, bf16)) >= 0.75 * len(prompts), (fp32, bf16)


@pytest.mark.parametrize("dtype", ["fp16", "float32", torch.float16, 32])
def test_bad_compute_dtype_is_a_value_error_naming_it(model, dtype):
    with pytest.raises(ValueError, match=f"dtype must be 'auto', 'fp32' or 'bf16', got .*{str(dtype).split('.')[-1]}"):
        LLM(model, dtype=dtype)
    assert model.dtype == torch.float32  # nothing was cast


def test_fp32_path_is_exact_after_a_bf16_round_trip(ckpt, reference):
    # casting re-homes parameters; the engine must re-fuse them, not keep stale fused copies
    model = load_pretrained(ckpt)
    LLM(model, max_num_seqs=8)
    LLM(model, dtype="bf16")
    outs = LLM(model, dtype="fp32", max_num_seqs=8).generate(PROMPTS, GREEDY)
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in outs)
    fresh = LLM(load_pretrained(ckpt).to(torch.bfloat16).float(), max_num_seqs=8).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in fresh]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 40])
@pytest.mark.parametrize("input_major", [True, False], ids=["input-major", "output-major"])
def test_grouped_expert_kernels_match_the_expert_loop(dtype, tokens, input_major):
    from expertmesh.model import ModelConfig
    from expertmesh.model.grouped_experts import StackedExperts
    from expertmesh.model.moe import MoE

    cfg = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                      num_hidden_layers=1, num_attention_heads=2, kv_lora_rank=8, qk_nope_head_dim=8,
                      qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1,
                      num_experts_per_tok=3, n_group=2, topk_group=1)
    g = torch.Generator().manual_seed(tokens)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    moe = moe.to(dtype)
    moe.gate.float()
    x = torch.randn(tokens, 32, generator=g).to(dtype)
    with torch.inference_mode():
        reference = moe(x).float()
        moe._stacked = StackedExperts.from_modules(moe.experts, moe.shared_experts, input_major)
        assert moe._stacked.num_shared == 1 and moe._stacked.input_major == input_major
        assert moe._stacked.w13_EDH.is_contiguous() == input_major == moe._stacked.w2_EFD.is_contiguous()
        assert torch.allclose(moe(x).float(), reference, atol=1e-5 if dtype == torch.float32 else 6e-2, rtol=3e-2)
        gate = moe.gate(x)
        fused = moe._stacked.fused_ready(x)
        # the fused kernel runs on input-major FP32/BF16 weights where the C++ kernels are built on an AVX-512 CPU
        assert fused == (input_major and cpu_kernels.avx512_supported() and cpu_kernels.enabled())
        for kernel in ("grouped_mm", "padded_bmm", "looped", "dense") + (("fused",) if fused else ()):
            out = moe._stacked.forward(x, gate.topk_ids_TK, gate.topk_weights_TK, kernel)
            tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 6e-2, "rtol": 3e-2}
            assert torch.allclose(out.y_TD.float(), reference, **tolerance), kernel
            assert out.routed_counts_E.tolist() == torch.bincount(gate.topk_ids_TK.flatten(), minlength=8).tolist()


def test_input_major_storage_keeps_names_values_and_state_dicts(tmp_path):
    """Where input-major storage pays (FP32 on a non-AMD CPU) the engine stores the lm_head, the
    dense MLP's fused gate/up and the stacked experts input-major; a save from the fused model
    writes the same tensors as the original checkpoint, and in-place loads reach the fused copies."""
    from expertmesh.model import save_pretrained
    from expertmesh.model.layers import input_major_pays, prefers_input_major

    wide, deep = torch.zeros(1024, 256), torch.zeros(256, 1024)
    assert prefers_input_major(wide, vendor="GenuineIntel") and not prefers_input_major(deep, vendor="GenuineIntel")
    assert not prefers_input_major(wide, vendor="AuthenticAMD")  # FP32 runs on oneDNN there, unmeasured
    assert not prefers_input_major(wide.bfloat16(), vendor="GenuineIntel")  # oneDNN's BF16 GEMMs gained nothing

    # a 512 x 64 head and a 256 x 64 fused gate/up are wide enough; the attention projections are not
    model = load_pretrained(save_hf_checkpoint(tmp_path / "wide", seed=3, vocab_size=512, intermediate_size=128))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    LLM(model)
    expected = input_major_pays(model.lm_head.weight)
    assert model.lm_head.weight.mT.is_contiguous() == expected
    assert model.layers[0].mlp._gate_up_HD.mT.is_contiguous() == expected
    assert not model.layers[1].self_attn._input_proj_OD.mT.is_contiguous()
    assert all(m._stacked.input_major == expected for m in model.moe_layers())
    state = model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], v) for k, v in original.items())
    save_pretrained(model, tmp_path / "resaved")
    resaved = load_pretrained(tmp_path / "resaved").state_dict()
    assert all(torch.equal(resaved[k], v) for k, v in original.items())
    with torch.no_grad():  # an in-place load lands in the stacked (possibly transposed) storage
        model.layers[1].mlp.experts[2].down_proj.weight.mul_(2)
        model.lm_head.weight.mul_(2)
    stacked = model.layers[1].mlp._stacked
    assert torch.equal(stacked.w2_EDF[2], 2 * original["model.layers.1.mlp.experts.2.down_proj.weight"])


def test_fused_weights_are_not_used_once_a_cast_re_homes_them(ckpt):
    model = load_pretrained(ckpt)
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        before = model(ids)
        LLM(model)  # fuses in place
        assert torch.allclose(model(ids), before, atol=1e-5)
        model.to(torch.float64)  # re-homes every parameter; the fused copies are stale now
        assert torch.allclose(model(ids.clone()).float(), before, atol=1e-4)


def test_generate_cli_takes_a_compute_dtype(ckpt, tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "EXPERTMESH_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "expertmesh", "generate", "--model", str(ckpt), "--prompt-ids", "5,6,7", "--max-tokens",
           "3", "--json"]
    ok = subprocess.run([*cmd, "--dtype", "bf16"], env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)[0]["token_ids"]) == 3
    bad = subprocess.run([*cmd, "--dtype", "fp16"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "dtype must be 'auto', 'fp32' or 'bf16', got 'fp16'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_generate_cli_placement_reaches_the_distributed_plan(ckpt, tmp_path):
    """``--placement`` needs ``--nodes``, and reaches the data plane's static plan, which checks it
    before anything starts (a mirrored layout needs two nodes; EPLB would run on one)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "EXPERTMESH_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "expertmesh", "generate", "--model", str(ckpt), "--prompt-ids", "5,6,7"]
    cases = {("--placement", "mirrored"): "--placement places experts over nodes: it needs --nodes",
             ("--nodes", "1", "--placement", "mirrored"): "mirrored placement does not fit: it needs >= 2 nodes, got 1",
             ("--nodes", "1", "--placement", "ring"): "placement must be eplb or mirrored, got 'ring'"}
    for args, message in cases.items():
        bad = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=300)
        assert bad.returncode != 0 and message in bad.stderr, (args, bad.stderr)
        assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("rows", [1, 3, 16, 300])
def test_fast_linear_is_linear(rows):
    """Every CPU kernel ``fast_linear`` can pick computes ``F.linear``, whichever this CPU picks."""
    import torch.nn.functional as F

    from expertmesh.model.layers import fast_linear

    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(2, rows, 96, generator=g), torch.randn(1024, 96, generator=g)
    with torch.inference_mode():
        expected = F.linear(x, w)
        for kernel in (None, "mkl", "split_bmm", "onednn", "fp32_shadow", "blocked"):
            assert torch.allclose(fast_linear(x, w, kernel), expected, atol=1e-5, rtol=1e-5), kernel
        xb, wb = x.bfloat16(), torch.nn.Parameter(w.bfloat16())
        exact = F.linear(xb.float(), wb.float()).bfloat16()  # FP32 products of the BF16 inputs, rounded once
        for kernel in (None, "mkl", "fp32_shadow", "blocked"):
            got = fast_linear(xb, wb, kernel)
            assert got.dtype == torch.bfloat16 and got.shape == expected.shape
            assert torch.allclose(got.float(), exact.float(), atol=0.05, rtol=0.02), kernel
    w.requires_grad_(True)
    y = fast_linear(x, w, "split_bmm")  # autograd on: the plain kernel, gradients flow
    y.sum().backward()
    assert w.grad is not None and torch.equal(y, F.linear(x, w))


def test_fp32_shadow_follows_in_place_updates():
    import torch.nn.functional as F

    from expertmesh.model.layers import fast_linear

    w = torch.nn.Parameter(torch.randn(64, 32).bfloat16())
    x = torch.randn(1, 32).bfloat16()
    with torch.no_grad():
        first = fast_linear(x, w, "fp32_shadow")
        w.mul_(2)  # e.g. a checkpoint loaded in place: the cached FP32 copy must not be used
        second = fast_linear(x, w, "fp32_shadow")
    assert torch.equal(second, F.linear(x.float(), w.detach().float()).bfloat16())
    assert not torch.equal(first, second)


def test_linear_kernel_choice_follows_the_measurements():
    from expertmesh.model.layers import choose_linear_kernel

    def kernel(dtype, rows, out, inp, vendor, avx512=True):
        return choose_linear_kernel(dtype, rows, out, inp, vendor=vendor, threads=2, avx512=avx512)

    f32, bf16 = torch.float32, torch.bfloat16
    # AMD: split bmm for a few rows over large weights, oneDNN for large products, MKL for small ones
    assert [kernel(f32, r, 8192, 256, "AuthenticAMD") for r in (1, 8, 16, 2048)] == [
        "split_bmm", "split_bmm", "onednn", "onednn"]
    assert kernel(f32, 16, 208, 256, "AuthenticAMD") == "mkl"
    assert choose_linear_kernel(f32, 1, 8192, 256, vendor="AuthenticAMD", threads=1, avx512=True) == "onednn"
    for vendor in ("GenuineIntel", ""):
        # Intel and unknown CPUs: the blocked kernel from 2 to 64 rows on AVX-512, MKL otherwise
        for out in (208, 8192):
            assert [kernel(f32, r, out, 256, vendor) for r in (1, 2, 16, 64, 65, 2048)] == [
                "mkl", "blocked", "blocked", "blocked", "mkl", "mkl"]
        assert {kernel(f32, r, o, 256, vendor, avx512=False) for r in (1, 8, 16, 2048) for o in (208, 8192)} == {"mkl"}
        # BF16: blocked up to 4 rows, and up to 16 over weights of at most 2^18 elements
        assert [kernel(bf16, r, 8192, 256, vendor) for r in (1, 4, 5, 16)] == ["blocked"] * 2 + ["mkl"] * 2
        assert [kernel(bf16, r, 256, 768, vendor) for r in (1, 16, 17)] == ["blocked"] * 2 + ["mkl"]
    # BF16 without the AVX-512 kernels, and on AMD: a few rows over a small weight run on its FP32 copy
    for vendor, avx512 in (("GenuineIntel", False), ("AuthenticAMD", True), ("AuthenticAMD", False)):
        assert [kernel(bf16, r, 208, 256, vendor, avx512) for r in (1, 4, 16, 17)] == ["fp32_shadow"] * 3 + ["mkl"]
        assert [kernel(bf16, r, 256, 768, vendor, avx512) for r in (1, 4, 5)] == ["fp32_shadow"] * 2 + ["mkl"]
        assert kernel(bf16, 1, 8192, 256, vendor, avx512) == "mkl"  # the copy would double a large weight's bytes
    assert kernel(f32, 0, 8192, 256, "GenuineIntel") == "mkl"  # nothing to multiply


@pytest.mark.parametrize("cache_dtype", ["fp32", "bf16", "fp8"])
def test_block_reads_equal_slot_reads(cache_dtype):
    from expertmesh.engine.kv_cache import CacheLayout, PagedLatentCache
    from expertmesh.model.mla import LatentKV

    layout = CacheLayout(num_layers=2, num_blocks=6, block_size=4, latent_dim=160, rope_dim=8, dtype=cache_dtype)
    cache = PagedLatentCache(layout)
    g = torch.Generator().manual_seed(0)
    slots = torch.arange(24)
    cache.write(1, slots, LatentKV(torch.randn(1, 24, 160, generator=g) * 5, torch.randn(1, 24, 8, generator=g)))
    blocks = torch.tensor([[4, 1, 5], [2, 2, 0]])
    packed = cache.read_blocks(1, blocks, torch.float32)  # [2, 12, 168]
    token_slots = (blocks[:, :, None] * 4 + torch.arange(4)).view(2, 12)
    by_slot = cache.read(1, token_slots, torch.float32)
    assert torch.equal(packed, torch.cat([by_slot.latent_BTC, by_slot.k_rope_BTR], dim=-1))


def test_expert_kernel_choice_follows_the_measurements():
    from expertmesh.model.grouped_experts import choose_kernel

    cpu = torch.device("cpu")

    def kernel(dtype, tokens, vendor):  # demo shapes: 16 routed + 1 shared, top-4
        return choose_kernel(cpu, dtype, tokens * 5, 17, tokens, vendor=vendor)

    for vendor in ("AuthenticAMD", "GenuineIntel"):
        assert [kernel(torch.float32, t, vendor) for t in (1, 16, 128, 2048)] == [
            "looped", "dense", "padded_bmm", "looped"]
    assert [kernel(torch.bfloat16, t, "AuthenticAMD") for t in (1, 16, 128, 2048)] == [
        "padded_bmm", "dense", "padded_bmm", "looped"]
    assert [kernel(torch.bfloat16, t, "GenuineIntel") for t in (1, 16, 128, 2048)] == [
        "looped", "dense", "padded_bmm", "looped"]
    # where the fused kernel can run, it takes every batch of up to 24 rows per expert (~80 tokens here)
    for dtype in (torch.float32, torch.bfloat16):
        fused = [choose_kernel(cpu, dtype, t * 5, 17, t, fused=True) for t in (1, 16, 81, 83, 2048)]
        assert fused == ["fused", "fused", "fused", "padded_bmm", "looped"], fused


def test_hooked_modules_keep_their_calls_in_decode_steps(tmp_path):
    """The one-call decode paths bypass module calls (the input norm, the gate): a hook on either
    keeps the module's call in every step, and the tokens stay the same."""
    path = save_hf_checkpoint(tmp_path / "m", seed=6)
    llm = LLM(path, max_num_seqs=2)
    params = SamplingParams(max_tokens=5, temperature=0)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    reference = [o.token_ids for o in llm.generate(prompts, params)]
    layer = next(layer for layer in llm.engine.model.layers if hasattr(layer.mlp, "gate"))
    rows = {"norm": [], "gate": []}
    hooks = [layer.input_layernorm.register_forward_hook(lambda m, a, o: rows["norm"].append(a[0].shape[-2])),
             layer.mlp.gate.register_forward_hook(lambda m, a, o: rows["gate"].append(a[0].shape[0]))]
    try:
        assert [o.token_ids for o in llm.generate(prompts, params)] == reference
    finally:
        for h in hooks:
            h.remove()
    decode_steps = [2] * 4  # 4 decode steps of both sequences after the prefill step
    assert rows["norm"][-4:] == decode_steps and rows["gate"][-4:] == decode_steps


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", [{"q_lora_rank": 16}, {}, {"num_attention_heads": 5, "num_key_value_heads": 5,
                                                               "kv_lora_rank": 72}],
                         ids=["q-lora", "plain-q", "5-heads-latent-72"])
@pytest.mark.parametrize("equal_lengths", [True, False], ids=["equal-lengths", "padded"])
@pytest.mark.parametrize("cache", ["same", "fp8"], ids=["cache-as-dtype", "fp8-cache"])
def test_fused_decode_attention_equals_the_python_steps(tmp_path, monkeypatch, dtype, shape, equal_lengths, cache):
    """``MLA.decode_fused`` (one C++ call a layer) against the Python steps it replaces, on a real
    decode batch: the same cache entries bit for bit, and the same attention output to rounding
    (on AVX-512 the attention reads the cache in place and sums in its own order; elsewhere the
    same ATen ops run and it is bit for bit)."""
    from expertmesh.engine.runner import build_batch
    from expertmesh.model.mla import MLA

    path = save_hf_checkpoint(tmp_path / "m", seed=4, **shape)  # the last: head and latent blocks with tails
    llm = LLM(path, dtype=dtype, max_num_seqs=4, block_size=4, kv_cache_dtype=dtype if cache == "same" else "fp8")
    engine, runner = llm.engine, llm.engine.runner
    # FP8 caches are read by the AVX-512 kernel only, and only with a latent width divisible by 16
    fused_reads = cache == "same" or (cpu_kernels.avx512_supported() and runner.cache.layout.latent_dim % 16 == 0)
    assert runner._fused_decode_reads_cache == fused_reads
    for prompt in ([5, 6, 7, 8, 9], [10, 11, 12, 13, 14]) if equal_lengths else ([5, 6, 7], [8, 9, 10, 11, 12, 13, 14]):
        engine.add_request(prompt, SamplingParams(max_tokens=4, temperature=0))
    engine.step()  # prefill
    captured = {}
    execute = runner.execute

    def capture(chunks):
        captured["chunks"] = chunks
        return execute(chunks)

    runner.execute = capture
    engine.step()  # the first decode step, captured
    runner.execute = execute
    batch = build_batch(captured["chunks"], runner.block_size, runner.model.device)
    assert batch.all_decode and (batch.decode_bias_B1T is None) == equal_lengths
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, batch.token_ids_T.numel(), runner.model.config.hidden_size, generator=g).to(runner.model.dtype)
    results, fused_calls = [], []
    kernel = cpu_kernels.fused_mla_decode
    monkeypatch.setattr(cpu_kernels, "fused_mla_decode", lambda *a: fused_calls.append(kernel(*a)) or fused_calls[-1])
    with torch.inference_mode():
        cos, sin = runner.rope(batch.positions_T, batch.max_position)
        scales = runner.cache.scales
        for fused in (True, False):
            entries = runner.cache.entries.clone()
            saved_scales = None if scales is None else scales.clone()
            if not fused:
                runner.model.layers[1].self_attn.decode_fused = lambda *a, **k: None  # the Python steps
            out = runner.attention(1, x, batch, cos, sin)
            results.append((out, runner.cache.entries[1].clone(), None if scales is None else scales[1].clone()))
            runner.cache.entries.copy_(entries)
            if scales is not None:
                scales.copy_(saved_scales)
    del runner.model.layers[1].self_attn.decode_fused
    assert isinstance(runner.model.layers[1].self_attn, MLA)
    if not fused_reads:  # both runs took the Python steps
        assert not fused_calls and torch.equal(results[0][0], results[1][0])
        return
    assert len(fused_calls) == 1 and fused_calls[0] is not None  # the fused run took the C++ path
    (fused_out, fused_cache, fused_scales), (python_out, python_cache, python_scales) = results
    if cpu_kernels.avx512_supported():
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == "fp32" else {"rtol": 2e-2, "atol": 2e-3}
        torch.testing.assert_close(fused_out, python_out, **tolerance)
    else:
        assert torch.equal(fused_out, python_out)
    # FP8: equal codes (compared as bytes: NaN codes would not compare equal as floats) and scales
    assert torch.equal(fused_cache.view(torch.uint8), python_cache.view(torch.uint8))
    assert not torch.equal(fused_cache.view(torch.uint8), entries[1].view(torch.uint8))
    assert (fused_scales is None) == (cache == "same") and (fused_scales is None or torch.equal(fused_scales,
                                                                                                   python_scales))
    while engine.has_unfinished():
        engine.step()


def test_bf16_gemms_round_their_rows_up_for_onednn(monkeypatch):
    """oneDNN builds a kernel per new row count; fast_linear pads BF16 rows to a multiple of 64
    (prefill's per-expert row counts then take a few dozen shapes) and drops the padding."""
    from expertmesh.model import layers

    seen = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(layers.F, "linear", lambda x, w: seen.append(x.shape[0]) or linear(x, w))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(384, 256, generator=g).bfloat16()
    with torch.inference_mode():
        for rows in (65, 100, 600, 2047, 128, 64, 16):
            x = torch.randn(rows, 256, generator=g).bfloat16()
            y = layers.fast_linear(x, w)
            assert y.shape == (rows, 384) and y.is_contiguous()
            torch.testing.assert_close(y, linear(x, w))
            y3 = layers.fast_linear(x.view(1, rows, 256), w)  # leading dimensions kept
            assert y3.shape == (1, rows, 384) and torch.equal(y3[0], y)
    # 64 rows or fewer as they are; 16 rows take the blocked kernel where it runs (no F.linear at all)
    small = [] if layers.choose_linear_kernel(torch.bfloat16, 16, 384, 256) == "blocked" else [16]
    assert seen[::2] == [128, 128, 640, 2048, 128, 64, *small]
