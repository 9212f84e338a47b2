"""Router logic: node-limited dispatch and combine over a placement plan.

For one MoE layer and a batch of tokens with the gate's top-k logical experts:
  1. choose a physical replica for every (token, expert): the replica's node is the
     expert's node when all its replicas share one (hierarchical plans keep groups on
     nodes); otherwise prefer a node the token already visits. Among replicas on the chosen
     node, tokens take them round-robin, which spreads a hot expert's tokens evenly;
  2. check node-limited routing: no token reaches more than ``max_nodes_per_token`` nodes;
  3. per node, send each token that visits it **once** (activations FP8 with 1×128 tile
     scales, or BF16/FP32), with the physical ids and weights it needs there; nodes
     are sent to concurrently and their per-token partial sums are added up.

Shape letters: T tokens, D hidden, K experts per token, E logical experts, R max replicas,
P physical experts, N nodes.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from expertmesh.placement import PlacementPlan
from expertmesh.protos import load
from expertmesh.services import wire
from expertmesh.services.server import StalePlan

pb = load("expert_shard_pb2")

DispatchDType = Literal["fp8", "bf16", "fp32"]
CombineDType = Literal["float32", "bfloat16"]
LATENCY_WINDOW = 2048  # per-layer dispatch+combine samples kept for percentiles


class Transport(Protocol):
    """Dispatch/combine verbs; gRPC here, NCCL/DeepEP behind the same verbs on GPU clusters."""

    def send(self, node: int, request: "pb.ExpertRequest") -> object: ...

    def result(self, handle: object) -> "pb.ExpertResponse": ...


@dataclass(frozen=True)
class RouterConfig:
    max_nodes_per_token: int
    dispatch_dtype: DispatchDType = "fp8"
    combine_dtype: CombineDType = "float32"

    def __post_init__(self) -> None:
        if self.max_nodes_per_token < 1:
            raise ValueError(f"max_nodes_per_token must be >= 1, got {self.max_nodes_per_token}")
        if self.dispatch_dtype not in ("fp8", "bf16", "fp32"):
            raise ValueError(f"dispatch_dtype must be fp8, bf16 or fp32, got {self.dispatch_dtype!r}")
        if self.combine_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"combine_dtype must be float32 or bfloat16, got {self.combine_dtype!r}")


class Stage(enum.Enum):
    LAUNCHED = "launched"
    DONE = "done"


@dataclass
class PendingRoute:
    """A dispatch in flight: ``Router.launch`` returns it, ``Router.wait`` completes it."""

    layer: int
    num_tokens: int
    sends: list[tuple[int, torch.Tensor, object, int]]  # (node, rows, handle, request bytes)
    started_s: float
    plan_version: int
    stage: Stage = Stage.LAUNCHED


@dataclass
class RouterCounters:
    dispatches: int = 0
    tokens: int = 0
    inter_node_bytes: int = 0
    intra_node_bytes: int = 0
    dispatch_inter_node_bytes: int = 0
    naive_inter_node_bytes: int = 0
    naive_dispatch_inter_node_bytes: int = 0
    max_nodes_per_token: int = 0
    node_sends: int = 0
    token_node_pairs: int = 0
    load: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> tokens per logical expert [E]
    latency_s: dict[int, collections.deque] = field(default_factory=dict)


class Router:
    def __init__(self, plan: PlacementPlan, moe_layers: list[int], hidden_size: int, source_node: int,
                 transport: Transport, config: RouterConfig):
        if plan.phy2log_LP.shape[0] != len(moe_layers):
            raise ValueError(f"plan has {plan.phy2log_LP.shape[0]} layers, the model {len(moe_layers)} MoE layers")
        self.hidden_size = hidden_size
        self.source_node = source_node
        self.transport = transport
        self.config = config
        self.row_of_layer = {layer: i for i, layer in enumerate(moe_layers)}
        self.counters = RouterCounters()
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._inflight: collections.Counter[int] = collections.Counter()  # plan version -> dispatches in flight
        self._install(plan)

    # ---- plan --------------------------------------------------------------------------------------
    def set_plan(self, plan: PlacementPlan, drain_timeout_s: float = 30.0) -> float:
        """Switch to ``plan`` atomically (dispatches launched afterwards use it), then wait until the
        dispatches still in flight under older plans have completed. Returns the seconds waited."""
        if plan.phy2log_LP.shape[0] != len(self.row_of_layer):
            raise ValueError(f"plan has {plan.phy2log_LP.shape[0]} layers, the model {len(self.row_of_layer)} MoE layers")
        if plan.version < self.plan.version:
            raise ValueError(f"plan version {plan.version} is older than the current {self.plan.version}")
        self._install(plan)
        started = time.perf_counter()
        with self._drained:
            done = self._drained.wait_for(
                lambda: all(n == 0 for v, n in self._inflight.items() if v != plan.version), drain_timeout_s)
        if not done:
            raise TimeoutError(f"dispatches on old plans still in flight after {drain_timeout_s}s: "
                               f"{dict(self._inflight)}")
        return time.perf_counter() - started

    def _install(self, plan: PlacementPlan) -> None:
        P = plan.phy2log_LP.shape[1]
        gpus_per_node = plan.num_gpus // plan.num_nodes
        per_gpu = P // plan.num_gpus
        node_of_physical = torch.arange(P) // per_gpu // gpus_per_node  # [P]
        log2phy = plan.log2phy_LER.long()  # [L, E, R]
        replica_nodes = torch.where(log2phy >= 0, node_of_physical[log2phy.clamp(min=0)], -1)  # [L, E, R]
        first = replica_nodes[..., 0]
        single = ((replica_nodes == first[..., None]) | (replica_nodes < 0)).all(dim=-1)  # [L, E]
        self._tables = (plan, node_of_physical, log2phy, plan.logcnt_LE.long(), replica_nodes, first, single)

    @property
    def plan(self) -> PlacementPlan:
        return self._tables[0]

    # ---- routing decisions (pure) ------------------------------------------------------------------
    def choose_replicas(self, row: int, topk_ids_TK: torch.Tensor, tables=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Physical id [T, K] and node [T, K] for every (token, logical expert)."""
        _, node_of_physical, log2phy, logcnt, replica_nodes, first, single = tables or self._tables
        T, K = topk_ids_TK.shape
        ids = topk_ids_TK.long()
        spread = (torch.arange(T)[:, None] + torch.arange(K)[None, :]) % logcnt[row][ids]  # round-robin replica
        if bool(single[row][ids].all()):
            physical = log2phy[row][ids, spread]
            return physical, node_of_physical[physical]
        physical = torch.empty_like(ids)
        for t in range(T):  # general plans: replicas of one expert on several nodes
            visited: set[int] = set()
            order = sorted(range(K), key=lambda k: int((replica_nodes[row, ids[t, k]] >= 0).sum()))
            for k in order:
                reps = [int(p) for p in log2phy[row, ids[t, k]] if p >= 0]
                nodes = [int(node_of_physical[p]) for p in reps]
                preferred = [p for p, n in zip(reps, nodes) if n in visited] or \
                            [p for p, n in zip(reps, nodes) if n == self.source_node] or reps
                physical[t, k] = preferred[(t + k) % len(preferred)]
                visited.add(int(node_of_physical[physical[t, k]]))
        return physical, node_of_physical[physical]

    # ---- dispatch / combine ------------------------------------------------------------------------
    def launch(self, layer: int, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
               topk_weights_TK: torch.Tensor, plan_version: int | None = None) -> PendingRoute:
        with self._lock:
            tables = self._tables  # one consistent plan for the whole dispatch
            self._inflight[tables[0].version] += 1
        try:
            return self._launch(tables, layer, x_TD, topk_ids_TK, topk_weights_TK, plan_version)
        except BaseException:
            self._done(tables[0].version)
            raise

    def _done(self, version: int) -> None:
        with self._drained:
            self._inflight[version] -= 1
            self._drained.notify_all()

    def _launch(self, tables, layer: int, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                topk_weights_TK: torch.Tensor, plan_version: int | None) -> PendingRoute:
        plan = tables[0]
        if plan_version is not None and plan_version != plan.version:
            raise StalePlan(f"router serves plan {plan.version}, request names {plan_version}")
        if layer not in self.row_of_layer:
            raise ValueError(f"layer {layer} is not an MoE layer (MoE layers: {sorted(self.row_of_layer)})")
        T = x_TD.shape[0]
        if x_TD.dim() != 2 or x_TD.shape[1] != self.hidden_size:
            raise ValueError(f"hidden must be [T, {self.hidden_size}], got {list(x_TD.shape)}")
        if topk_ids_TK.dim() != 2 or topk_ids_TK.shape[0] != T or topk_weights_TK.shape != topk_ids_TK.shape:
            raise ValueError(f"topk ids/weights must both be [T={T}, K], got {list(topk_ids_TK.shape)} and "
                             f"{list(topk_weights_TK.shape)}")
        num_logical = plan.logcnt_LE.shape[1]
        if T and (int(topk_ids_TK.min()) < 0 or int(topk_ids_TK.max()) >= num_logical):
            raise ValueError(f"topk ids must be logical experts in [0, {num_logical})")
        row = self.row_of_layer[layer]
        physical_TK, node_TK = self.choose_replicas(row, topk_ids_TK, tables)
        visits_TN = torch.zeros(T, plan.num_nodes, dtype=torch.bool)
        visits_TN.scatter_(1, node_TK, True)
        nodes_per_token = visits_TN.sum(dim=1)
        reach = int(nodes_per_token.max()) if T else 0
        if reach > self.config.max_nodes_per_token:
            raise ValueError(f"a token reaches {reach} nodes > max_nodes_per_token="
                             f"{self.config.max_nodes_per_token}: the plan splits expert groups across nodes")
        payload = wire.encode_activation(x_TD, self.config.dispatch_dtype)
        x_wire = wire.decode_activation(payload)  # quantized once; rows sliced per node (exact)
        sends = []
        for node in visits_TN.any(dim=0).nonzero(as_tuple=True)[0].tolist():
            rows = visits_TN[:, node].nonzero(as_tuple=True)[0]
            on_node = node_TK[rows] == node
            request = pb.ExpertRequest(
                layer=layer, plan_version=plan.version,
                hidden=wire.encode_any(wire.take_rows(x_wire, rows)),
                physical_ids=wire.encode(torch.where(on_node, physical_TK[rows], -1).int()),
                weights=wire.encode(torch.where(on_node, topk_weights_TK[rows].float(), 0.0)),
                combine_dtype=self.config.combine_dtype,
            )
            sends.append((node, rows, self.transport.send(node, request), request.ByteSize()))
        self._count(layer, row, topk_ids_TK, node_TK, nodes_per_token, sends)
        return PendingRoute(layer, T, sends, time.perf_counter(), plan.version)

    def wait(self, pending: PendingRoute) -> torch.Tensor:
        """Sum the nodes' partial results: [T, D] float32."""
        assert pending.stage is Stage.LAUNCHED, "wait() called twice on one dispatch"
        try:
            return self._combine(pending)
        finally:
            pending.stage = Stage.DONE
            self._done(pending.plan_version)

    def _combine(self, pending: PendingRoute) -> torch.Tensor:
        out_TD = torch.zeros(pending.num_tokens, self.hidden_size, dtype=torch.float32)
        inter = intra = 0
        for node, rows, handle, _ in pending.sends:
            response = self.transport.result(handle)
            partial = wire.decode(response.partial, "partial")
            if list(partial.shape) != [len(rows), self.hidden_size]:
                raise ValueError(f"node {node} returned shape {list(partial.shape)}, expected "
                                 f"{[len(rows), self.hidden_size]}")
            out_TD.index_add_(0, rows, partial.float())
            intra += response.intra_node_bytes
            if node == self.source_node:
                intra += response.ByteSize()
            else:
                inter += response.ByteSize()
        with self._lock:
            c = self.counters
            c.inter_node_bytes += inter
            c.intra_node_bytes += intra
            c.latency_s.setdefault(pending.layer, collections.deque(maxlen=LATENCY_WINDOW)).append(
                time.perf_counter() - pending.started_s)
        return out_TD

    def route(self, layer: int, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
              plan_version: int | None = None) -> torch.Tensor:
        return self.wait(self.launch(layer, x_TD, topk_ids_TK, topk_weights_TK, plan_version))

    def _count(self, layer, row, topk_ids_TK, node_TK, nodes_per_token, sends) -> None:
        T, K = topk_ids_TK.shape
        D = self.hidden_size
        remote_pairs = int((node_TK != self.source_node).sum())
        naive_dispatch = remote_pairs * D * 2  # BF16 activations, one copy per chosen expert
        dispatch_inter = sum(b for node, _, _, b in sends if node != self.source_node)
        dispatch_intra = sum(b for node, _, _, b in sends if node == self.source_node)
        with self._lock:
            c = self.counters
            c.dispatches += 1
            c.tokens += T
            c.dispatch_inter_node_bytes += dispatch_inter
            c.inter_node_bytes += dispatch_inter
            c.intra_node_bytes += dispatch_intra
            c.naive_dispatch_inter_node_bytes += naive_dispatch
            c.naive_inter_node_bytes += 2 * naive_dispatch  # combine sends the same back
            c.max_nodes_per_token = max(c.max_nodes_per_token, int(nodes_per_token.max()) if T else 0)
            c.node_sends += sum(len(rows) for _, rows, _, _ in sends)
            c.token_node_pairs += int(nodes_per_token.sum())
            num_logical = self.plan.logcnt_LE.shape[1]
            counts = torch.bincount(topk_ids_TK.flatten().long(), minlength=num_logical)
            c.load[layer] = c.load.get(layer, torch.zeros(num_logical, dtype=torch.long)) + counts

    def take_load(self) -> dict[int, torch.Tensor]:
        """Per-layer token counts since the last call (and zero them)."""
        with self._lock:
            load, self.counters.load = self.counters.load, {}
        return load

    def reset_counters(self) -> RouterCounters:
        with self._lock:
            old, self.counters = self.counters, RouterCounters()
        return old
