"""The distributed data plane on a 3-node local Ray cluster: attention actors, router, expert
shards with per-node forwarders, all over gRPC. The single-process engine is the reference."""

from __future__ import annotations

import grpc
import pytest
import torch
from tiny_models import train_tiny

from expertmesh.engine import LLM, SamplingParams
from expertmesh.model import save_pretrained
from expertmesh.protos import load
from expertmesh.services import wire
from expertmesh.services.dataplane import DataPlane, DataPlaneConfig
from expertmesh.services.server import channel, check_health

pytestmark = pytest.mark.integration

shard_pb, shard_grpc = load("expert_shard_pb2"), load("expert_shard_pb2_grpc")
router_pb, router_grpc = load("router_pb2"), load("router_pb2_grpc")
attention_pb, attention_grpc = load("attention_pb2"), load("attention_pb2_grpc")

PROMPTS = [[5, 8, 11, 14], [3, 4, 5], [20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54],
           [40, 43, 46], [7, 12, 17, 22], [88, 89, 90, 91, 92, 93, 94, 95, 3, 4, 5, 6, 7]]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # 12 experts in 3 groups (one per node), a token may use 2 groups -> at most 2 of 3 nodes
    model = train_tiny(steps=120, seed=2, n_routed_experts=12, n_group=3, topk_group=2, num_experts_per_tok=4)
    return str(save_pretrained(model, tmp_path_factory.mktemp("dist") / "ckpt"))


@pytest.fixture(scope="module")
def plane(checkpoint):
    dp = DataPlane.start(DataPlaneConfig(checkpoint, num_nodes=3, slots_per_node=2, quantization="fp8",
                                         dispatch_dtype="fp8", overlap=True))
    yield dp
    dp.stop()


def test_greedy_matches_single_process_fp8(plane, checkpoint):
    assert plane.plan.logcnt_LE.max() > 1, "the plan should hold redundant replicas"
    reference = [o.token_ids for o in LLM(checkpoint, quantization="fp8").generate(PROMPTS, GREEDY)]
    plane.router_stats(reset=True)
    got = plane.generate(PROMPTS, GREEDY)
    assert [tokens for tokens, _ in got] == reference
    assert all(reason == "length" for _, reason in got)


def test_tokens_reach_at_most_topk_group_nodes_once_each(plane):
    plane.router_stats(reset=True)
    plane.generate(PROMPTS[:3], GREEDY)
    s = plane.router_stats()
    assert s.dispatches > 0 and s.tokens > 0
    assert 1 <= s.max_nodes_per_token <= 2  # topk_group = 2 of 3 nodes
    assert s.duplicate_node_sends == 0
    assert s.node_sends < s.tokens * 4  # one send per (token, node), fewer than per (token, expert)
    assert s.dispatch_inter_node_bytes < s.naive_dispatch_inter_node_bytes
    assert sum(sum(layer.tokens_per_expert) for layer in s.load) == s.tokens * 4


def test_bf16_dispatch_matches_dense_engine(plane, checkpoint):
    cfg = DataPlaneConfig(checkpoint, num_nodes=3, slots_per_node=1, quantization="none", dispatch_dtype="bf16",
                          overlap=False, controller=False)
    dense = DataPlane.start(cfg)  # second plane on the same cluster (the first one's Ray connection)
    try:
        reference = [o.token_ids for o in LLM(checkpoint).generate(PROMPTS, GREEDY)]
        got = [tokens for tokens, _ in dense.generate(PROMPTS, GREEDY)]
        assert sum(a == b for a, b in zip(got, reference)) >= len(PROMPTS) - 1, (got, reference)
    finally:
        dense.stop()  # its actors only: the cluster belongs to the first plane


def test_status_lists_nodes_slots_and_experts(plane):
    st = plane.status()
    assert len(st["nodes"]) == 3 and len(st["slots"]) == 6
    assert all(s["healthy"] for s in st["slots"]) and all(a["healthy"] for a in st["attention"])
    assert all(s["forwarder"] for s in st["slots"])  # every slot can forward for its node
    hosted = {e for s in st["slots"] for e in s["experts"]["1"]}
    assert hosted == set(range(12))


# ---- bad messages: the right status code, and the service keeps serving ---------------------------

def _expert_request(plane, layer=1, version=None, rows=3, hidden=64, k=2, ids=None):
    x = torch.randn(rows, hidden)
    ids = ids if ids is not None else torch.zeros(rows, k, dtype=torch.int32)
    return shard_pb.ExpertRequest(layer=layer, plan_version=plane.plan.version if version is None else version,
                                  hidden=wire.encode_activation(x, "fp8"), physical_ids=wire.encode(ids),
                                  weights=wire.encode(torch.full((rows, ids.shape[1]), 0.5)),
                                  combine_dtype="float32")


def _code(call, request, timeout=10):
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=timeout) if timeout is not None else call(request)
    return err.value.code(), err.value.details()


def test_shard_rejects_bad_messages_and_keeps_serving(plane):
    address = plane.shard_addresses[0]  # slot 0: forwarder of node 0
    stub = shard_grpc.ExpertShardStub(channel(address))
    bad_shape = _expert_request(plane)
    bad_shape.hidden.shape[:] = [3, 65]
    cases = {
        "shape": (stub.Dispatch, bad_shape, grpc.StatusCode.INVALID_ARGUMENT),
        "dtype": (stub.Compute, shard_pb.ExpertRequest(layer=1, plan_version=1, hidden=wire.tensor_pb2.Tensor(
            dtype="complex64", shape=[1, 64], data=b"\0" * 512)), grpc.StatusCode.INVALID_ARGUMENT),
        "hidden size": (stub.Compute, _expert_request(plane, hidden=32), grpc.StatusCode.INVALID_ARGUMENT),
        "layer": (stub.Compute, _expert_request(plane, layer=0), grpc.StatusCode.INVALID_ARGUMENT),
        "expert elsewhere": (stub.Compute, _expert_request(plane, ids=torch.full((3, 1), 17, dtype=torch.int32)),
                             grpc.StatusCode.INVALID_ARGUMENT),
        "plan version": (stub.Dispatch, _expert_request(plane, version=99), grpc.StatusCode.ABORTED),
        "oversized": (stub.Compute, shard_pb.ExpertRequest(hidden=wire.tensor_pb2.Tensor(
            dtype="float32", shape=[1], data=b"\0" * (65 << 20))), grpc.StatusCode.RESOURCE_EXHAUSTED),
    }
    for name, (call, request, expected) in cases.items():
        code, details = _code(call, request)
        assert code == expected, (name, code, details)
    code, details = _code(stub.Compute, _expert_request(plane), timeout=None)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "deadline" in details
    assert check_health(address)
    ok = stub.Dispatch(_expert_request(plane), timeout=10)
    assert list(ok.partial.shape) == [3, 64]


def test_router_rejects_bad_messages_and_keeps_serving(plane):
    stub = router_grpc.RouterStub(channel(plane.attention_addresses[0]))

    def route(layer=1, version=1, ids=None, hidden=64):
        ids = ids if ids is not None else torch.tensor([[0, 1, 2, 3]] * 2)
        return router_pb.RouteRequest(layer=layer, plan_version=version, hidden=wire.encode(torch.randn(2, hidden)),
                                      topk_ids=wire.encode(ids), topk_weights=wire.encode(torch.full(ids.shape, .25)))

    assert _code(stub.Route, route(version=7))[0] == grpc.StatusCode.ABORTED
    assert _code(stub.Route, route(layer=0))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(stub.Route, route(hidden=10))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(stub.Route, route(ids=torch.tensor([[0, 1, 2, 99]] * 2)))[0] == grpc.StatusCode.INVALID_ARGUMENT
    # experts 0..3 (group 0) and 4, 8 (groups 1, 2): three nodes > max_nodes_per_token = 2
    code, details = _code(stub.Route, route(ids=torch.tensor([[0, 4, 8, 1]] * 2)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_nodes_per_token" in details
    assert _code(stub.Route, route(), timeout=None)[0] == grpc.StatusCode.INVALID_ARGUMENT
    out = stub.Route(route(), timeout=10)
    assert list(out.output.shape) == [2, 64]


def test_attention_rejects_bad_requests_and_keeps_serving(plane):
    stub = attention_grpc.AttentionStub(channel(plane.attention_addresses[0]))

    def gen(prompts, **params):
        return attention_pb.GenerateRequest(prompts=[attention_pb.Prompt(token_ids=p) for p in prompts],
                                            params=attention_pb.SamplingParams(max_tokens=4, **params))

    assert _code(stub.Generate, gen([[1, 2]], temperature=-1.0))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(stub.Generate, gen([[1, 5000]]))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(stub.Generate, gen([]))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(stub.Generate, gen([[]]))[0] == grpc.StatusCode.INVALID_ARGUMENT
    ok = stub.Generate(gen([[5, 8, 11]]), timeout=60)
    assert len(ok.completions[0].token_ids) == 4
