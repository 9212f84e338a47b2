"""Tiny random DeepSeek-V3 checkpoints written by transformers, for parity tests.

Nothing is downloaded: each checkpoint is built from a config here, given weights large
enough that routing and attention are far from uniform, and saved with ``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

BASE: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    q_lora_rank=None,
    kv_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    max_position_embeddings=256,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    tie_word_embeddings=False,
)

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

# Named variations the parity tests sweep: each config branch of the model gets one.
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "q_lora": {"q_lora_rank": 24},
    "yarn": {"rope_scaling": YARN},
    "yarn_q_lora_all_moe": {"rope_scaling": YARN, "q_lora_rank": 16, "first_k_dense_replace": 0},
    "no_groups": {"n_group": 1, "topk_group": 1},
    "two_shared_no_norm": {"n_shared_experts": 2, "norm_topk_prob": False, "first_k_dense_replace": 2},
    "no_shared_8_groups": {"n_shared_experts": 0, "n_routed_experts": 16, "n_group": 8, "topk_group": 3,
                           "num_experts_per_tok": 4},
    "not_interleaved": {"rope_interleave": False},
}


def make_hf_model(seed: int = 0, weight_scale: float = 1.0, **overrides: Any):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = dict(BASE)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 0:  # transformers builds a zero-width MLP when n_shared_experts == 0
                continue
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (weight_scale / p.shape[-1] ** 0.5))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def save_hf_checkpoint(path: Path, seed: int = 0, weight_scale: float = 1.0, **overrides: Any) -> Path:
    model = make_hf_model(seed, weight_scale, **overrides)
    model.save_pretrained(path)
    return path


def char_tokenizer(vocab_size: int = 96):
    """A character-level ``tokenizers.Tokenizer`` over printable ASCII (id 0..vocab-1), for
    tests that need text: ids 0/1/2 are <bos>/<eos>/<pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)][: vocab_size - 4] + ["\n"]
    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<bos>", "<eos>", "<pad>"])
    return tok


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation, EOS ignored."""
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def train_tiny(steps: int = 150, seed: int = 0, **overrides: Any):
    """A tiny model trained for a few seconds on arithmetic progressions mod vocab
    (next = previous + stride): its predictions are confident, unlike a random model's,
    which is what precision comparisons (FP8 cache, FP8 weights) need."""
    from expertmesh.model import ModelConfig, build_model

    cfg = dict(BASE)
    cfg.pop("num_key_value_heads")
    cfg.pop("tie_word_embeddings")
    cfg.update(overrides)
    model = build_model(ModelConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    model.init_weights(generator=g)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    V = model.config.vocab_size
    for _ in range(steps):
        start = torch.randint(3, V, (16, 1), generator=g)
        stride = torch.randint(1, 6, (16, 1), generator=g)
        seq = 3 + (start + stride * torch.arange(33)) % (V - 3)  # [16, 33]
        logits = model(seq[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# A stand-in for `expertmesh train` that job tests launch through Ray Jobs: it prints a few lines,
# fails for a spec named "fail", runs (and can be cancelled) for one named "sleepy", and otherwise
# "trains" for steps/10 seconds and copies a ready checkpoint to <out>/checkpoint.
FAKE_TRAINER = '''
import json, pathlib, shutil, sys, time
spec = json.loads(open(sys.argv[1]).read())
out = pathlib.Path(sys.argv[sys.argv.index("--out") + 1])
name = spec["name"]
print(f"fake training {name}: {spec['steps']} steps", flush=True)
if name == "fail":
    print("Traceback (most recent call last):", flush=True)
    print("ValueError: loss is nan at step 3", flush=True)
    sys.exit(1)
if name == "sleepy":
    for step in range(1200):
        print(f"step {step}", flush=True)
        time.sleep(0.5)
time.sleep(spec["steps"] / 10)
shutil.copytree(SOURCE, out / "checkpoint")
print(f"checkpoint: {out / 'checkpoint'}", flush=True)
'''


def servable_checkpoint_and_fake_trainer(root: Path) -> tuple[Path, Path]:
    """A tiny checkpoint with a tokenizer under ``root/ckpt``, and ``root/fake_train.py`` (FAKE_TRAINER)
    whose output checkpoint is a copy of it. Job commands: ``{python} fake_train.py {spec} --out {out}``."""
    ckpt = save_hf_checkpoint(root / "ckpt", seed=0)
    char_tokenizer(96).save(str(ckpt / "tokenizer.json"))
    trainer = root / "fake_train.py"
    trainer.write_text(f"SOURCE = {str(ckpt)!r}\n" + FAKE_TRAINER)
    return ckpt, trainer
