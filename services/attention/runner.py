"""The engine's model runner with routed experts served remotely through the router.

Per MoE layer the attention actor computes the gate (and the shared experts) itself and
hands (hidden, top-k) to the router. With ``overlap`` the step's sequences are split into
two micro-batches: micro-batch 0's dispatch is in flight while micro-batch 1's attention
runs, and the shared experts of each run while its own dispatch is out.
"""

from __future__ import annotations

import torch

from expertmesh.engine.kv_cache import PagedLatentCache
from expertmesh.engine.runner import ModelRunner, build_batch
from expertmesh.engine.scheduler import ScheduledChunk
from expertmesh.model.moe import MoE
from expertmesh.model.transformer import DeepseekV3
from expertmesh.services.router.router import PendingRoute, Router


class DistributedRunner(ModelRunner):
    def __init__(self, model: DeepseekV3, cache: PagedLatentCache, router: Router, overlap: bool = True):
        super().__init__(model, cache)
        self.router = router
        self.overlap = overlap

    def launch_ffn(self, layer_idx: int, h: torch.Tensor) -> PendingRoute | torch.Tensor:
        mlp = self.model.layers[layer_idx].mlp
        if not isinstance(mlp, MoE):
            return mlp(h)  # dense layer: computed here, nothing to wait for
        h_TD = h.reshape(-1, h.shape[-1])
        gate = mlp.gate(h_TD)
        return self.router.launch(layer_idx, h_TD.float(), gate.topk_ids_TK, gate.topk_weights_TK)

    def finish_ffn(self, layer_idx: int, h: torch.Tensor, launched: PendingRoute | torch.Tensor) -> torch.Tensor:
        if isinstance(launched, torch.Tensor):
            return launched
        mlp = self.model.layers[layer_idx].mlp
        shared = mlp.shared_experts(h) if mlp.shared_experts is not None else None  # overlaps the dispatch
        routed = self.router.wait(launched).to(h.dtype).view(h.shape)
        return routed if shared is None else routed + shared

    def ffn(self, layer_idx: int, h: torch.Tensor) -> torch.Tensor:
        return self.finish_ffn(layer_idx, h, self.launch_ffn(layer_idx, h))

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        if not self.overlap or len(chunks) < 2:
            return super().execute(chunks)
        half = len(chunks) // 2
        batches = [build_batch(group, self.block_size, self.model.device) for group in (chunks[:half], chunks[half:])]
        states = [list(self.embed(b)) for b in batches]  # per micro-batch: [x, cos, sin]
        for layer_idx, layer in enumerate(self.model.layers):
            launched = []
            for batch, state in zip(batches, states):
                x, cos, sin = state
                state[0] = x = x + self.attention(layer_idx, x, batch, cos, sin)
                h = layer.post_attention_layernorm(x)
                launched.append((h, self.launch_ffn(layer_idx, h)))
            for (h, handle), state in zip(launched, states):
                state[0] = state[0] + self.finish_ffn(layer_idx, h, handle)
        return torch.cat([self.logits(state[0], batch) for batch, state in zip(batches, states)])
