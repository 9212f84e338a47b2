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

Faults: replicas on slots the slot table (or this router's own failed sends) marks dead are
never chosen. A node send that fails with a transport error marks the unreachable slots dead
and its (token, expert) pairs are re-routed to surviving replicas in the same dispatch, so the
caller never sees the failure. A pair whose expert has no live replica left fails the dispatch
at once with ``ExpertsUnavailable`` (gRPC UNAVAILABLE: retriable), never a hang.

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
from expertmesh.services.server import StalePlan, Unavailable
from expertmesh.services.topology import Hosting, SlotTable, hosting, position_slots

pb = load("expert_shard_pb2")

DispatchDType = Literal["fp8", "bf16", "fp32"]
CombineDType = Literal["float32", "bfloat16"]
LATENCY_WINDOW = 2048  # per-layer dispatch+combine samples kept for percentiles
MAX_REROUTES_PER_DISPATCH = 8  # failed node sends one dispatch may re-route before it gives up
SUSPECT_TTL_S = 5.0  # a slot this router found unreachable is tried again after this (a slow, not dead, slot heals)


class ExpertsUnavailable(Unavailable):
    """Some chosen expert has no live replica: the request fails fast and may be retried after the
    controller has recreated the lost experts."""


class Transport(Protocol):
    """Dispatch/combine verbs; gRPC here, NCCL/DeepEP behind the same verbs on GPU clusters."""

    def send(self, node: int, request: "pb.ExpertRequest",
             forwarders: list[tuple[int, str]] | None = None) -> object:
        """Start one node's send. ``forwarders``: that node's live (slot, address) pairs in the
        routing tables of this dispatch, most preferred first (None without a slot table)."""
        ...

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


class NodeSendFailed(RuntimeError):
    """A node send could not be started (no live forwarder known for the node)."""

    def __init__(self, message: str, dead_slots: tuple[int, ...] = ()):
        super().__init__(message)
        self.dead_slots = tuple(dead_slots)


class Stage(enum.Enum):
    LAUNCHED = "launched"
    DONE = "done"


@dataclass
class NodeSend:
    """One node's share of a dispatch: the token rows sent there and which of their (token, expert)
    pairs it covers (a re-routed send covers only the pairs of the failed one)."""

    node: int
    rows: torch.Tensor  # [n] token indices into the dispatch
    covers_nK: torch.Tensor  # [n, K] bool
    handle: object
    request_bytes: int


@dataclass(frozen=True)
class RouteTables:
    """One consistent routing view: a plan, where its experts live, and which replicas are alive.

    log2phy_LER: live replicas first, -1 padded.  Shape: [L, E, R]
    logcnt_LE:   live replicas per logical expert. Shape: [L, E]
    """

    plan: PlacementPlan
    plan_slots: tuple[int, ...]
    table: SlotTable | None
    hosts: Hosting
    log2phy_LER: torch.Tensor
    logcnt_LE: torch.Tensor
    replica_nodes_LER: torch.Tensor
    single_LE: torch.Tensor  # [L, E] bool: all live replicas on one node
    native: bool  # the plan's own layout, all alive: node-limited routing is guaranteed by the plan
    routes: dict[int, list[tuple[int, str]]]  # node -> live (slot, address), forwarders in order


@dataclass
class PendingRoute:
    """A dispatch in flight: ``Router.launch`` returns it, ``Router.wait`` completes it."""

    layer: int
    num_tokens: int
    sends: list[NodeSend]
    started_s: float
    plan_version: int
    x_wire: object = None  # the encoded activations (re-routed sends slice them again)
    topk_ids_TK: torch.Tensor | None = None
    topk_weights_TK: torch.Tensor | None = None
    tables: RouteTables | None = None  # the routing view the dispatch was launched with
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
    rerouted_sends: int = 0
    unavailable_dispatches: int = 0
    load: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> tokens per logical expert [E]
    latency_s: dict[int, collections.deque] = field(default_factory=dict)


class Router:
    def __init__(self, plan: PlacementPlan, moe_layers: list[int], hidden_size: int, source_node: int,
                 transport: Transport, config: RouterConfig, slots: SlotTable | None = None,
                 plan_slots: tuple[int, ...] | None = None):
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
        self._installing = threading.Lock()  # held while tables are built and swapped in (``_install``)
        self._inflight: collections.Counter[int] = collections.Counter()  # plan version -> dispatches in flight
        self._slots = slots  # the controller's slot table (None: the plan's own layout, all alive)
        self._suspects: dict[int, tuple[str, float]] = {}  # slot -> (address, monotonic expiry) found unreachable
        self.last_install_s = 0.0  # the last plan switch: tables built and swapped (no dispatch waits longer)
        self._install(plan, position_slots(plan, plan_slots))

    # ---- plan and slot table -----------------------------------------------------------------------
    def set_plan(self, plan: PlacementPlan, drain_timeout_s: float = 30.0,
                 plan_slots: tuple[int, ...] | None = None) -> float:
        """Switch to ``plan`` atomically (dispatches launched afterwards use it), then wait until the
        dispatches still in flight under older plans have completed. Returns the seconds waited."""
        if plan.phy2log_LP.shape[0] != len(self.row_of_layer):
            raise ValueError(f"plan has {plan.phy2log_LP.shape[0]} layers, the model {len(self.row_of_layer)} MoE layers")
        if plan.version < self.plan.version:
            raise ValueError(f"plan version {plan.version} is older than the current {self.plan.version}")
        installing = time.perf_counter()
        self._install(plan, position_slots(plan, plan_slots))
        self.last_install_s = time.perf_counter() - installing
        started = time.perf_counter()
        with self._drained:
            done = self._drained.wait_for(
                lambda: all(n == 0 for v, n in self._inflight.items() if v != plan.version), drain_timeout_s)
        if not done:
            raise TimeoutError(f"dispatches on old plans still in flight after {drain_timeout_s}s: "
                               f"{dict(self._inflight)}")
        return time.perf_counter() - started

    def set_slots(self, table: SlotTable) -> None:
        """Install the controller's slot table (newer epochs only). A slot this router marked dead
        itself stays dead until the table lists it at a new address (a recreated actor)."""
        with self._lock:
            if self._slots is not None and table.epoch < self._slots.epoch:
                return
            info = table.by_id()
            self._suspects = {s: v for s, v in self._suspects.items() if s in info and info[s].address == v[0]}
            self._slots = table
        self._install()

    def mark_dead(self, slots: tuple[int, ...] | list[int]) -> None:
        """Route around ``slots`` from now on (a send to them failed)."""
        if self._slots is None or not slots:
            return
        info = self._slots.by_id()
        expiry = time.monotonic() + SUSPECT_TTL_S
        with self._lock:
            fresh = {s: (info[s].address, expiry) for s in slots if s in info and s not in self._suspects}
            self._suspects.update(fresh)
        if fresh:
            self._install()

    @property
    def dead_slots(self) -> list[int]:
        t = self._tables.table
        return sorted(s.slot for s in t.slots if not s.alive) if t is not None else []

    @property
    def slot_epoch(self) -> int:
        return self._slots.epoch if self._slots is not None else 0

    def _install(self, plan: PlacementPlan | None = None, plan_slots: tuple[int, ...] | None = None) -> None:
        """Build and swap in the tables for ``plan`` (None: the one in force) under the slot table
        and dead marks as they are now. Installs run one at a time: a dead mark's rebuild that read
        the plan before a switch would otherwise put the old plan back after it, and the last
        install would not always see the last change."""
        with self._installing:
            if plan is None:
                plan, plan_slots = self._tables.plan, self._tables.plan_slots
            tables = self._build(plan, plan_slots)
            with self._lock:
                self._tables = tables

    def _build(self, plan: PlacementPlan, plan_slots: tuple[int, ...]) -> RouteTables:
        """Routing tables for ``plan`` under the current slot table and this router's dead marks."""
        table = self._slots.mark(set(self._suspects)) if self._slots is not None else None
        hosts = hosting(plan, plan_slots, table)
        log2phy = plan.log2phy_LER.long()  # [L, E, R]
        live = (log2phy >= 0) & hosts.alive_P[log2phy.clamp(min=0)]  # [L, E, R]
        order = torch.argsort((~live).to(torch.int8), dim=-1, stable=True)  # live replicas first
        log2phy = torch.where(live, log2phy, -1).gather(-1, order)
        logcnt = live.sum(dim=-1)  # [L, E]
        replica_nodes = torch.where(log2phy >= 0, hosts.node_P[log2phy.clamp(min=0)], -1)  # [L, E, R]
        first = replica_nodes[..., 0]
        single = ((replica_nodes == first[..., None]) | (replica_nodes < 0)).all(dim=-1)  # [L, E]
        P = plan.phy2log_LP.shape[1]
        own_node_P = torch.arange(P) // (P // plan.num_gpus) // (plan.num_gpus // plan.num_nodes)
        native = hosts.complete and (table is None or bool((hosts.node_P == own_node_P).all()))
        routes: dict[int, list[tuple[int, str]]] = {}
        if table is not None:
            for s in table.live():
                routes.setdefault(s.node, []).append((s.slot, s.address))
        return RouteTables(plan, plan_slots, table, hosts, log2phy, logcnt, replica_nodes, single, native, routes)

    @property
    def plan(self) -> PlacementPlan:
        return self._tables.plan

    # ---- routing decisions (pure) ------------------------------------------------------------------
    def choose_replicas(self, row: int, topk_ids_TK: torch.Tensor,
                        tables: RouteTables | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Physical id [T, K] and node [T, K] for every (token, logical expert), live replicas only."""
        t_ = tables or self._tables
        log2phy, logcnt, replica_nodes, node_of_physical = t_.log2phy_LER, t_.logcnt_LE, t_.replica_nodes_LER, \
            t_.hosts.node_P
        T, K = topk_ids_TK.shape
        ids = topk_ids_TK.long()
        counts = logcnt[row][ids]  # [T, K]
        if T and bool((counts == 0).any()):
            lost = sorted(set(ids[counts == 0].tolist()))
            raise ExpertsUnavailable(f"no live replica of expert(s) {lost} (MoE layer row {row}); the controller "
                                     "is recreating them, retry shortly")
        spread = (torch.arange(T)[:, None] + torch.arange(K)[None, :]) % counts.clamp(min=1)  # round-robin replica
        if bool(t_.single_LE[row][ids].all()):
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
    def _expire_suspects(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [s for s, (_, until) in self._suspects.items() if until <= now]
            for s in expired:
                del self._suspects[s]
        if expired:  # try them again: a dead one is refused at once and re-routed, a slow one is back
            self._install()

    def launch(self, layer: int, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
               topk_weights_TK: torch.Tensor, plan_version: int | None = None) -> PendingRoute:
        if self._suspects:
            self._expire_suspects()
        with self._lock:
            tables = self._tables  # one consistent plan for the whole dispatch
            self._inflight[tables.plan.version] += 1
        try:
            return self._launch(tables, layer, x_TD, topk_ids_TK, topk_weights_TK, plan_version)
        except BaseException as exc:
            self._done(tables.plan.version, failed=isinstance(exc, Unavailable))
            raise

    def _done(self, version: int, failed: bool = False) -> None:
        with self._drained:
            self._inflight[version] -= 1
            if failed:
                self.counters.unavailable_dispatches += 1
            self._drained.notify_all()

    def _launch(self, tables: RouteTables, layer: int, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                topk_weights_TK: torch.Tensor, plan_version: int | None) -> PendingRoute:
        plan = tables.plan
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
        visits_TN = torch.zeros(T, int(tables.hosts.node_P.max()) + 1, dtype=torch.bool)
        visits_TN.scatter_(1, node_TK, True)
        nodes_per_token = visits_TN.sum(dim=1)
        reach = int(nodes_per_token.max()) if T else 0
        if reach > self.config.max_nodes_per_token and tables.native:  # degraded layouts may exceed it
            raise ValueError(f"a token reaches {reach} nodes > max_nodes_per_token="
                             f"{self.config.max_nodes_per_token}: the plan splits expert groups across nodes")
        payload = wire.encode_activation(x_TD, self.config.dispatch_dtype)
        x_wire = wire.decode_activation(payload)  # quantized once; rows sliced per node (exact)
        pending = PendingRoute(layer, T, [], time.perf_counter(), plan.version, x_wire, topk_ids_TK,
                               topk_weights_TK, tables)
        try:
            pending.sends = self._send(tables, pending, physical_TK, node_TK, torch.ones_like(node_TK, dtype=torch.bool))
        except NodeSendFailed as failed:  # a node with live replicas but no known forwarder: fail fast
            self.mark_dead(failed.dead_slots)
            raise Unavailable(str(failed), failed.dead_slots) from failed
        self._count(layer, row, topk_ids_TK, node_TK, nodes_per_token, pending.sends)
        return pending

    def _send(self, tables: RouteTables, pending: PendingRoute, physical_TK: torch.Tensor, node_TK: torch.Tensor,
              cover_TK: torch.Tensor) -> list[NodeSend]:
        """Send the covered (token, expert) pairs, one message per node holding each token once."""
        sends = []
        for node in node_TK[cover_TK].unique().tolist():
            on_node_TK = cover_TK & (node_TK == node)
            rows = on_node_TK.any(dim=1).nonzero(as_tuple=True)[0]
            on_node = on_node_TK[rows]
            physical = torch.where(on_node, physical_TK[rows], -1)
            request = pb.ExpertRequest(
                layer=pending.layer, plan_version=tables.plan.version,
                hidden=wire.encode_any(wire.take_rows(pending.x_wire, rows)),
                physical_ids=wire.encode(physical.int()),
                weights=wire.encode(torch.where(on_node, pending.topk_weights_TK[rows].float(), 0.0)),
                combine_dtype=self.config.combine_dtype,
            )
            if tables.table is not None:  # the forwarder fans out by slot id (survivors may host adopted experts)
                slot_ids = torch.where(on_node, tables.hosts.host_slot_P[physical.clamp(min=0)], -1)
                request.slot_ids.CopyFrom(wire.encode(slot_ids.int()))
            try:  # the forwarders of these tables: another thread may install newer ones meanwhile
                handle = self.transport.send(node, request, tables.routes.get(node, []) if tables.table is not None
                                             else None)
            except RuntimeError as exc:  # NodeUnavailable: no live forwarder known for the node
                self._cancel(sends)
                raise NodeSendFailed(f"cannot send to node {node}: {exc}", getattr(exc, "dead_slots", ())) from exc
            sends.append(NodeSend(node, rows, on_node, handle, request.ByteSize()))
        return sends

    def wait(self, pending: PendingRoute) -> torch.Tensor:
        """Sum the nodes' partial results: [T, D] float32."""
        assert pending.stage is Stage.LAUNCHED, "wait() called twice on one dispatch"
        failed = False
        try:
            return self._combine(pending)
        except Unavailable:
            failed = True
            raise
        finally:
            pending.stage = Stage.DONE
            self._done(pending.plan_version, failed)

    def _combine(self, pending: PendingRoute) -> torch.Tensor:
        out_TD = torch.zeros(pending.num_tokens, self.hidden_size, dtype=torch.float32)
        inter = intra = rerouted = 0
        queue = collections.deque(pending.sends)
        while queue:
            send = queue.popleft()
            try:
                response = self.transport.result(send.handle)
            except RuntimeError as exc:  # NodeUnavailable: route around the dead slots, redo this send's pairs
                if not hasattr(exc, "dead_slots"):
                    raise
                rerouted += 1
                if rerouted > MAX_REROUTES_PER_DISPATCH:
                    self._cancel(queue)
                    raise Unavailable(f"dispatch gave up after {rerouted - 1} re-routes: {exc}", exc.dead_slots) from exc
                self.mark_dead(exc.dead_slots)
                try:
                    queue.extend(self._reroute(pending, send))
                except Unavailable:
                    self._cancel(queue)
                    raise
                continue
            partial = wire.decode(response.partial, "partial")
            if list(partial.shape) != [len(send.rows), self.hidden_size]:
                self._cancel(queue)
                raise ValueError(f"node {send.node} returned shape {list(partial.shape)}, expected "
                                 f"{[len(send.rows), self.hidden_size]}")
            out_TD.index_add_(0, send.rows, partial.float())
            intra += response.intra_node_bytes
            if send.node == self.source_node:
                intra += response.ByteSize()
            else:
                inter += response.ByteSize()
        with self._lock:
            c = self.counters
            c.inter_node_bytes += inter
            c.intra_node_bytes += intra
            c.rerouted_sends += rerouted
            c.latency_s.setdefault(pending.layer, collections.deque(maxlen=LATENCY_WINDOW)).append(
                time.perf_counter() - pending.started_s)
        return out_TD

    def _reroute(self, pending: PendingRoute, failed: NodeSend) -> list[NodeSend]:
        """New sends for the (token, expert) pairs ``failed`` covered, over live replicas only. The
        dispatch keeps its plan version: a plan switch waits for it (drain), so that plan is served."""
        tables = self._tables
        if tables.plan.version != pending.plan_version:  # a switch happened meanwhile: same dead marks, old plan
            tables = self._build(pending.tables.plan, pending.tables.plan_slots)
        row = self.row_of_layer[pending.layer]
        ids = pending.topk_ids_TK[failed.rows]
        physical, nodes = self.choose_replicas(row, ids, tables)  # raises ExpertsUnavailable when none is left
        sub = PendingRoute(pending.layer, len(failed.rows), [], pending.started_s, pending.plan_version,
                           wire.take_rows(pending.x_wire, failed.rows), ids, pending.topk_weights_TK[failed.rows])
        try:
            sends = self._send(tables, sub, physical, nodes, failed.covers_nK)
        except NodeSendFailed as exc:
            raise Unavailable(str(exc), exc.dead_slots) from exc
        for s in sends:
            s.rows = failed.rows[s.rows]  # back to the dispatch's token indices
        return sends

    @staticmethod
    def _cancel(queue) -> None:
        for send in queue:
            future = getattr(send.handle, "future", send.handle)
            if hasattr(future, "cancel"):
                future.cancel()

    def route(self, layer: int, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
              plan_version: int | None = None) -> torch.Tensor:
        return self.wait(self.launch(layer, x_TD, topk_ids_TK, topk_weights_TK, plan_version))

    def _count(self, layer, row, topk_ids_TK, node_TK, nodes_per_token, sends) -> None:
        T, K = topk_ids_TK.shape
        D = self.hidden_size
        remote_pairs = int((node_TK != self.source_node).sum())
        naive_dispatch = remote_pairs * D * 2  # BF16 activations, one copy per chosen expert
        dispatch_inter = sum(s.request_bytes for s in sends if s.node != self.source_node)
        dispatch_intra = sum(s.request_bytes for s in sends if s.node == self.source_node)
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
            c.node_sends += sum(len(s.rows) for s in sends)
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
