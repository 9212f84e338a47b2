"""``expertmesh generate``: run the engine on a checkpoint from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from expertmesh.cli import CLIError, app


def parse_prompt_ids(text: str) -> list[list[int]]:
    """``"1,2,3;4,5"`` -> ``[[1, 2, 3], [4, 5]]``."""
    prompts = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            raise CLIError(f"--prompt-ids has an empty prompt in {text!r}")
        try:
            prompts.append([int(tok) for tok in part.split(",")])
        except ValueError:
            raise CLIError(f"--prompt-ids must be integers separated by ',' and ';', got {text!r}") from None
    return prompts


@app.command()
def generate(
    model: Annotated[Path, typer.Option("--model", help="checkpoint directory (config.json + safetensors)")],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="prompt text (repeatable)")] = None,
    prompt_ids: Annotated[str | None, typer.Option("--prompt-ids", help='token ids, e.g. "1,2,3;4,5"')] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 32,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k")] = 0,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    kv_cache_dtype: Annotated[str, typer.Option("--kv-cache-dtype", help="auto | fp32 | bf16 | fp8")] = "auto",
    quantization: Annotated[str, typer.Option("--quantization", help="auto | fp8 | none")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list of completions")] = False,
) -> None:
    """Generate completions with the single-process engine."""
    from expertmesh.engine import LLM, SamplingParams

    if (prompt is None) == (prompt_ids is None):
        raise CLIError("give either --prompt (repeatable) or --prompt-ids")
    prompts: list = list(prompt) if prompt else parse_prompt_ids(prompt_ids or "")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    llm = LLM(model, kv_cache_dtype=kv_cache_dtype, quantization=quantization)  # type: ignore[arg-type]
    outs = llm.generate(prompts, params)
    if as_json:
        typer.echo(json.dumps([{"token_ids": o.token_ids, "text": o.text, "finish_reason": o.finish_reason}
                               for o in outs]))
        return
    for p, o in zip(prompts, outs):
        shown = p if isinstance(p, str) else ",".join(map(str, p))
        typer.echo(f"--- prompt: {shown!r}  [{o.finish_reason}, {len(o.token_ids)} tokens]")
        typer.echo(o.text if o.text else " ".join(map(str, o.token_ids)))
