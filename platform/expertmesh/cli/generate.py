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
    dtype: Annotated[str, typer.Option("--dtype", help="compute dtype: auto | fp32 | bf16")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list of completions")] = False,
    nodes: Annotated[int | None, typer.Option("--nodes", help="run on the distributed path over N Ray nodes")] = None,
    slots_per_node: Annotated[int, typer.Option("--slots-per-node")] = 1,
    dispatch: Annotated[str, typer.Option("--dispatch", help="fp8 | bf16 | fp32 (with --nodes)")] = "fp8",
    overlap: Annotated[bool, typer.Option("--overlap/--no-overlap", help="two micro-batches (with --nodes)")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="add the router's byte counters (with --nodes)")] = False,
    placement: Annotated[str | None, typer.Option(
        "--placement", help="eplb | mirrored: every expert group on two nodes (with --nodes; default eplb)")] = None,
) -> None:
    """Generate completions with the single-process engine, or with --nodes on the distributed path."""
    from expertmesh.engine import LLM, SamplingParams

    if (prompt is None) == (prompt_ids is None):
        raise CLIError("give either --prompt (repeatable) or --prompt-ids")
    prompts: list = list(prompt) if prompt else parse_prompt_ids(prompt_ids or "")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    if stats and nodes is None:
        raise CLIError("--stats reports router counters: it needs --nodes")
    if placement is not None and nodes is None:
        raise CLIError("--placement places experts over nodes: it needs --nodes")
    if nodes is not None:
        outs, counters = _generate_distributed(model, prompts, params, nodes, slots_per_node, dispatch, overlap,
                                               quantization, placement or "eplb")
    else:
        llm = LLM(model, kv_cache_dtype=kv_cache_dtype, quantization=quantization,  # type: ignore[arg-type]
                  dtype=dtype)  # type: ignore[arg-type]
        outs, counters = llm.generate(prompts, params), None
    if as_json:
        result: object = [{"token_ids": o.token_ids, "text": o.text, "finish_reason": o.finish_reason} for o in outs]
        if stats:
            result = {"completions": result, "stats": counters}
        typer.echo(json.dumps(result))
        return
    if stats:
        typer.echo(json.dumps(counters, indent=2))
    for p, o in zip(prompts, outs):
        shown = p if isinstance(p, str) else ",".join(map(str, p))
        typer.echo(f"--- prompt: {shown!r}  [{o.finish_reason}, {len(o.token_ids)} tokens]")
        typer.echo(o.text if o.text else " ".join(map(str, o.token_ids)))


def _generate_distributed(model: Path, prompts: list, params, nodes: int, slots_per_node: int, dispatch: str,
                          overlap: bool, quantization: str, placement: str):
    """Start a local multi-node data plane for this one run, generate, report, stop."""
    from expertmesh.cli.dataplane import _config
    from expertmesh.engine import Completion, load_tokenizer
    from expertmesh.engine.llm import encode_prompt
    from expertmesh.model import read_config
    from expertmesh.services.dataplane import DataPlane

    tokenizer = load_tokenizer(model)
    config = read_config(model)  # the attention actors' engines use max_model_len = max_position_embeddings
    ids = [encode_prompt(p, tokenizer, config.vocab_size, config.max_position_embeddings) for p in prompts]
    plane = DataPlane.start(_config(model, nodes, slots_per_node, dispatch, overlap, quantization, placement=placement))
    try:
        results = plane.generate(ids, params)
        s = plane.router_stats()
    finally:
        plane.stop()
    outs = [Completion(f"req-{i}", p, toks, tokenizer.decode(toks) if tokenizer else "", reason)  # type: ignore
            for i, (p, (toks, reason)) in enumerate(zip(ids, results))]
    counters = {
        "inter_node_bytes": s.inter_node_bytes, "intra_node_bytes": s.intra_node_bytes,
        "naive_inter_node_bytes": s.naive_inter_node_bytes,
        "dispatch_inter_node_bytes": s.dispatch_inter_node_bytes,
        "naive_dispatch_inter_node_bytes": s.naive_dispatch_inter_node_bytes,
        "max_nodes_per_token": s.max_nodes_per_token, "node_sends": s.node_sends, "tokens": s.tokens,
        "dispatches": s.dispatches,
    }
    return outs, counters
