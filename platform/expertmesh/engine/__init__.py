"""Single-process inference: paged latent KV cache, continuous batching, sampling.

    from expertmesh.engine import LLM, SamplingParams
    llm = LLM("path/to/checkpoint", kv_cache_dtype="fp8", max_num_seqs=16)
    outs = llm.generate(["def add(a, b):"], SamplingParams(max_tokens=32, temperature=0))
"""

from expertmesh.engine.llm import LLM, EngineConfig, LLMEngine, load_tokenizer
from expertmesh.engine.params import Completion, RequestOutput, SamplingParams

__all__ = ["LLM", "Completion", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams", "load_tokenizer"]
