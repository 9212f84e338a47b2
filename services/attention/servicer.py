"""gRPC face of an attention actor: batch generation on the distributed path."""

from __future__ import annotations

import threading

from expertmesh.engine import LLM, SamplingParams
from expertmesh.protos import load
from expertmesh.services.server import rpc

pb = load("attention_pb2")
pb_grpc = load("attention_pb2_grpc")


def params_from_proto(p) -> SamplingParams:
    return SamplingParams(
        max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p or 1.0, top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None, stop_token_ids=tuple(p.stop_token_ids), ignore_eos=p.ignore_eos,
    )


def params_to_proto(p: SamplingParams):
    msg = pb.SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                            stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos)
    if p.seed is not None:
        msg.seed = p.seed
    return msg


class AttentionServicer(pb_grpc.AttentionServicer):
    def __init__(self, llm: LLM, rank: int, node_id: str, overlap: bool, dispatch_dtype: str):
        self.llm = llm
        self.rank = rank
        self.node_id = node_id
        self.overlap = overlap
        self.dispatch_dtype = dispatch_dtype
        self.address = ""
        self._lock = threading.Lock()  # one engine loop at a time; a batch shares continuous batching

    @rpc
    def Generate(self, request, context):
        if not request.prompts:
            raise ValueError("no prompts given")
        params = params_from_proto(request.params)
        prompts = [list(p.token_ids) for p in request.prompts]
        with self._lock:
            try:
                outs = self.llm.generate(prompts, params)
            except Exception:
                self._abort_unfinished()  # a failed step (e.g. experts unavailable) leaves nothing behind
                raise
        return pb.GenerateResponse(completions=[pb.Completion(token_ids=o.token_ids, finish_reason=o.finish_reason)
                                                for o in outs])

    def _abort_unfinished(self) -> None:
        sched = self.llm.engine.scheduler
        for seq in list(sched.running) + list(sched.waiting):
            self.llm.engine.abort(seq.request_id)

    @rpc
    def Describe(self, request, context):
        sched = self.llm.engine.scheduler
        return pb.AttentionInfo(node_id=self.node_id, rank=self.rank, running=len(sched.running),
                                waiting=len(sched.waiting), overlap=self.overlap, dispatch_dtype=self.dispatch_dtype,
                                address=self.address)
