"""Controller on a 3-node local Ray cluster with real Valkey: live re-placement under a steady
request stream (no failures, identical greedy outputs, better balance) and restart from Redis."""

from __future__ import annotations

import threading
import time

import pytest
import ray
from tiny_models import train_tiny

from expertmesh.engine import LLM, SamplingParams
from expertmesh.model import save_pretrained
from expertmesh.protos import load
from expertmesh.services.dataplane import DataPlane, DataPlaneConfig
from expertmesh.services.server import channel

pytestmark = pytest.mark.integration
ctl_pb, ctl_grpc = load("controller_pb2"), load("controller_pb2_grpc")
shard_pb, shard_grpc = load("expert_shard_pb2"), load("expert_shard_pb2_grpc")

# the same few prompts over and over: a skewed expert load
PROMPTS = [[5, 8, 11, 14], [6, 9, 12, 15], [5, 8, 11, 14, 17], [20, 22, 24, 26]]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    model = train_tiny(steps=120, seed=2, n_routed_experts=12, n_group=3, topk_group=2, num_experts_per_tok=4)
    ckpt = str(save_pretrained(model, tmp_path_factory.mktemp("ctl") / "ckpt"))
    # two slots per node: with one group per node, balance can only improve by moving replicas
    # between the slots of a node
    dp = DataPlane.start(DataPlaneConfig(ckpt, num_nodes=3, slots_per_node=2, quantization="fp8",
                                         rebalance_interval_s=None, load_window_s=300, min_gain=0.001))
    dp.reference = [o.token_ids for o in LLM(ckpt, quantization="fp8").generate(PROMPTS, GREEDY)]
    yield dp
    dp.stop()


def _controller(plane):
    return ctl_grpc.ControllerStub(channel(plane.controller_address))


def test_live_replacement_under_load(plane):
    results, failures, stop = [], [], threading.Event()

    def stream():
        while not stop.is_set():
            try:
                results.append([t for t, _ in plane.generate(PROMPTS, GREEDY)])
            except Exception as exc:  # noqa: BLE001 - the test counts them
                failures.append(repr(exc))

    worker = threading.Thread(target=stream)
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while len(results) < 3 and time.monotonic() < deadline:  # load accumulates in the routers
            time.sleep(0.2)
        result = _controller(plane).Rebalance(ctl_pb.RebalanceRequest(), timeout=300)
        after_switch = len(results)
        while len(results) < after_switch + 3 and time.monotonic() < deadline + 120:
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(timeout=120)
    assert failures == []
    assert result.replaced, result.reason
    # layer by layer: one plan version per MoE layer that changed
    assert result.old_version == 1 and result.new_version == 1 + result.layer_steps >= 2
    assert result.layer_pause_ms_max >= result.layer_pause_ms_p50 > 0
    assert 0 < result.peak_extra_experts <= result.total_experts_loaded
    assert result.balancedness_after > result.balancedness_before
    assert len(results) >= after_switch + 3
    assert all(r == plane.reference for r in results)
    for address in plane.shard_addresses:
        info = shard_grpc.ExpertShardStub(channel(address)).Describe(shard_pb.DescribeShardRequest(), timeout=10)
        assert list(info.plan_versions) == [result.new_version]  # every older plan retired everywhere
    assert plane.router_stats().plan_version == result.new_version
    status = _controller(plane).GetStatus(ctl_pb.ControllerStatusRequest(), timeout=10)
    assert status.plan_version == result.new_version and status.replacements == 1
    assert status.balancedness_now == pytest.approx(result.balancedness_after)


def test_killed_controller_resumes_from_redis(plane):
    version = ray.get(plane.controller.plan_version.remote())
    old_address = plane.controller_address
    ray.kill(plane.controller, no_restart=False)  # Ray restarts it; state comes back from Redis
    deadline = time.monotonic() + 90
    while True:  # ray.kill is asynchronous: wait for the restarted instance (a new server port)
        try:
            address = ray.get(plane.controller.get_address.remote(), timeout=30)
            if address != old_address:
                plane.controller_address = address
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        assert time.monotonic() < deadline, "controller did not come back"
        time.sleep(0.5)
    assert ray.get(plane.controller.plan_version.remote()) == version
    status = _controller(plane).GetStatus(ctl_pb.ControllerStatusRequest(), timeout=10)
    assert status.plan_version == version and status.replacements >= 1
    assert [t for t, _ in plane.generate(PROMPTS, GREEDY)] == plane.reference
