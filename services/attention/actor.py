"""Ray actor for one data-parallel attention rank, with its router beside it (same process)."""

from __future__ import annotations

import ray

from expertmesh.placement import PlacementPlan
from expertmesh.protos import load
from expertmesh.services.attention.servicer import AttentionServicer
from expertmesh.services.router.router import Router, RouterConfig
from expertmesh.services.router.servicer import RouterServicer
from expertmesh.services.router.transport import GrpcTransport
from expertmesh.services.server import create_server

attention_grpc = load("attention_pb2_grpc")
router_grpc = load("router_pb2_grpc")


@ray.remote(num_cpus=0.01, max_restarts=3)
class AttentionActor:
    def __init__(self, checkpoint: str, plan: dict, forwarders: dict[int, str], node_index: int, rank: int = 0,
                 dispatch_dtype: str = "fp8", combine_dtype: str = "float32", overlap: bool = True,
                 quantization: str = "auto", max_num_seqs: int = 16, kv_cache_dtype: str = "auto",
                 bind_host: str = "127.0.0.1", torch_threads: int = 1, slots: dict | None = None):
        """``slots``: the slot table (``SlotTable.to_dict``) so the router can fail over inside a node."""
        import torch
        from torch import nn

        from expertmesh.engine import LLM, load_tokenizer
        from expertmesh.model import load_pretrained
        from expertmesh.services.attention.runner import DistributedRunner
        from expertmesh.services.topology import SlotTable

        torch.set_num_threads(torch_threads)
        model = load_pretrained(checkpoint, quantization=quantization)
        for moe in model.moe_layers():
            moe.experts = nn.ModuleList()  # routed experts live on the expert shards
        config = model.config
        self.router = Router(
            PlacementPlan.from_dict(plan), config.moe_layers, config.hidden_size, node_index,
            GrpcTransport(forwarders),
            RouterConfig(max_nodes_per_token=config.topk_group, dispatch_dtype=dispatch_dtype,
                         combine_dtype=combine_dtype),
            slots=SlotTable.from_dict(slots) if slots else None,
        )
        self.llm = LLM(model, tokenizer=load_tokenizer(checkpoint), max_num_seqs=max_num_seqs,
                       kv_cache_dtype=kv_cache_dtype,
                       runner_factory=lambda m, cache: DistributedRunner(m, cache, self.router, overlap))
        node_id = ray.get_runtime_context().get_node_id()
        self.servicer = AttentionServicer(self.llm, rank, node_id, overlap, dispatch_dtype)
        self.server, port = create_server(f"{bind_host}:0", [
            (attention_grpc.add_AttentionServicer_to_server, self.servicer, "expertmesh.v1.Attention"),
            (router_grpc.add_RouterServicer_to_server, RouterServicer(self.router), "expertmesh.v1.Router"),
        ])
        self.address = f"{bind_host}:{port}"
        self.servicer.address = self.address

    def get_address(self) -> str:
        return self.address

    def stop(self) -> None:
        self.server.stop(grace=1.0)
