"""``expertmesh demo``: what ``make run`` shows — the demo model, its cache economics, and
completions from the engine. The demo model is trained here on the Python standard
library's source the first time (no weights are downloaded); ``--tiny`` skips training
and uses a small random checkpoint instead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from expertmesh import paths
from expertmesh.cli import app

DEMO_PROMPTS = ("def fibonacci(n):\n", "import os\n\n\ndef ", "class Stack:\n    def __init__(self):\n")


def tiny_checkpoint(path: Path) -> Path:
    """A small random DeepSeek-V3-architecture checkpoint (MLA, 16 experts in 4 groups)."""
    from expertmesh.model import ModelConfig, build_model, save_pretrained

    if (path / "config.json").exists():
        return path
    config = ModelConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        q_lora_rank=96, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=1024,
        bos_token_id=0, eos_token_id=1,
    )
    model = build_model(config)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return save_pretrained(model, path)


def ensure_demo_checkpoint(tiny: bool, steps: int | None) -> Path:
    if tiny:
        return tiny_checkpoint(paths.home() / "runs" / "tiny-random")
    ckpt = paths.demo_checkpoint()
    if (ckpt / "config.json").exists():
        return ckpt
    from expertmesh.train.spec import preset
    from expertmesh.train.trainer import train

    typer.echo(f"No demo checkpoint yet: training the demo preset on the Python standard library -> {ckpt.parent}")
    result = train(preset("demo"), ckpt.parent, steps=steps)
    return Path(result.checkpoint_dir)


def describe(path: Path) -> None:
    from expertmesh.engine import LLM, SamplingParams
    from expertmesh.model import load_pretrained
    from expertmesh.model.memory import kv_bytes_per_token, parameter_count

    model = load_pretrained(path)
    cfg = model.config
    count = parameter_count(cfg)
    kv = kv_bytes_per_token(cfg)
    typer.echo(f"checkpoint: {path}")
    typer.echo(f"model: {cfg.num_hidden_layers} layers ({len(cfg.moe_layers)} MoE), hidden {cfg.hidden_size}, "
               f"{cfg.n_routed_experts} routed experts in {cfg.n_group} groups (top-{cfg.num_experts_per_tok}, "
               f"≤{cfg.topk_group} groups/token) + {cfg.n_shared_experts} shared; "
               f"{count.total / 1e6:.1f}M params, {count.active_per_token / 1e6:.1f}M active per token")
    typer.echo(f"KV cache per token: MLA latent {kv.mla_bf16} B (BF16), {kv.mla_fp8} B (FP8) vs "
               f"full MHA K/V {kv.mha_bf16} B ({kv.mha_bf16 / kv.mla_bf16:.1f}x) and GQA-8 {kv.gqa8_bf16} B")
    ids = torch.arange(1, 17).unsqueeze(0) % cfg.vocab_size
    with torch.no_grad():
        logits = model(ids)[0, -1]
    typer.echo(f"logits for a 16-token probe: mean {logits.mean():.3f}, std {logits.std():.3f}, "
               f"argmax {int(logits.argmax())}")

    llm = LLM(model, tokenizer=_tokenizer(path), kv_cache_dtype="fp8")
    params = SamplingParams(max_tokens=48, temperature=0)
    prompts: list = list(DEMO_PROMPTS) if llm.tokenizer is not None else [[5, 6, 7, 8], [9, 10, 11]]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    n = sum(len(o.token_ids) for o in outs)
    typer.echo(f"\ngreedy completions (engine, FP8 latent cache, batch {len(prompts)}: "
               f"{n} tokens in {elapsed:.2f}s = {n / elapsed:.0f} tok/s):")
    for prompt, out in zip(prompts, outs):
        typer.echo("─" * 60)
        typer.echo(f"{prompt if isinstance(prompt, str) else prompt}"
                   f"{out.text if out.text else ' -> ' + str(out.token_ids)}")


def _tokenizer(path: Path):
    from expertmesh.engine import load_tokenizer

    return load_tokenizer(path)


@app.command()
def demo(
    tiny: Annotated[bool, typer.Option("--tiny", help="use a small random checkpoint; no training")] = False,
    steps: Annotated[int | None, typer.Option("--steps", help="override the demo preset's training steps")] = None,
) -> None:
    """Train (first time) and show the demo model: cache economics and completions."""
    describe(ensure_demo_checkpoint(tiny, steps))
