"""Expert-shard logic: the physical experts of one slot, and the per-node forwarder.

Glossary (shared with expertmesh.placement):
  logical expert   an expert of the model (0..E-1 per MoE layer)
  physical expert  one replica of a logical expert, at a fixed index of the plan (0..P-1)
  slot             a device (the plan's "GPU") hosting P/num_slots consecutive physical experts
  node             a machine: slots s with s // slots_per_node == node
  plan             the versioned physical -> logical table (``PlacementPlan``)
Example: 12 logical + 6 redundant = 18 physical over 3 nodes x 2 slots = 6 slots, 3 per slot;
physical 7 lives on slot 2 (7 // 3), node 1 (2 // 2).

Shape letters: T tokens, D hidden, K experts per token on this node/slot, F expert width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from expertmesh.model.fp8 import QuantizedActivation, dequantize_activation, fp8_gemm
from expertmesh.model.layers import MLP
from expertmesh.services.server import StalePlan
from expertmesh.services.wire import num_rows, take_rows


def load_serving_experts(checkpoint: str, wanted: set[tuple[int, int]], quantization: str = "auto"
                         ) -> dict[tuple[int, int], nn.Module]:
    """The one place a shard reads expert weights from the serving checkpoint: at start, for a new
    plan (re-placement), and when it recreates or adopts the experts of a failed slot.
    ``wanted`` is {(layer, logical expert)}."""
    from expertmesh.model.checkpoint import load_experts

    return load_experts(checkpoint, wanted, quantization)


def expert_forward(expert: MLP, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
    """One expert on rows already selected; FP8 input feeds the FP8 GEMMs as it arrived (the
    same per-tile quantization the single-process FP8 model applies), else runs in FP32."""
    if isinstance(x, QuantizedActivation):
        if hasattr(expert.gate_proj, "weight_scale_inv"):
            gate = fp8_gemm(x, expert.gate_proj.weight, expert.gate_proj.weight_scale_inv, torch.float32)
            up = fp8_gemm(x, expert.up_proj.weight, expert.up_proj.weight_scale_inv, torch.float32)
            return expert.down_proj(torch.nn.functional.silu(gate) * up)
        x = dequantize_activation(x, torch.float32)
    return expert(x.float())


@dataclass
class ExpertSlot:
    """The physical experts one slot hosts, for every MoE layer, under each live plan.

    plans[version][layer][physical_id] -> MLP. During a live re-placement two versions are
    live: requests name the version their router dispatched under, so nothing in flight
    breaks when routers switch. Replicas of one logical expert share one module.
    """

    slot: int
    plans: dict[int, dict[int, dict[int, nn.Module]]]
    hidden_size: int

    @property
    def plan_version(self) -> int:
        return max(self.plans)

    @property
    def experts(self) -> dict[int, dict[int, nn.Module]]:
        return self.plans[self.plan_version]

    def add_plan(self, version: int, experts: dict[int, dict[int, nn.Module]]) -> None:
        self.plans = {**self.plans, version: experts}  # copy-on-write: readers never see a half-built dict

    def retire(self, version: int) -> None:
        if version not in self.plans:
            return
        if len(self.plans) == 1:
            raise ValueError(f"slot {self.slot} cannot retire plan {version}: it is the only plan it serves")
        self.plans = {v: e for v, e in self.plans.items() if v != version}

    def compute(
        self,
        layer: int,
        plan_version: int,
        x: torch.Tensor | QuantizedActivation,  # [T, D]
        physical_ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
    ) -> torch.Tensor:
        """Sum over this slot's experts of weight * expert(x), per token: [T, D] float32."""
        plans = self.plans
        if plan_version not in plans:
            raise StalePlan(f"slot {self.slot} serves plan(s) {sorted(plans)}, request names {plan_version}")
        experts = plans[plan_version]
        if layer not in experts:
            raise ValueError(f"layer {layer} is not an MoE layer hosted by slot {self.slot}")
        validate_routing(x, physical_ids_TK, weights_TK, self.hidden_size)
        hosted = experts[layer]
        out_TD = torch.zeros(num_rows(x), self.hidden_size, dtype=torch.float32)
        valid = physical_ids_TK >= 0
        unknown = set(physical_ids_TK[valid].unique().tolist()) - set(hosted)
        if unknown:
            raise ValueError(f"slot {self.slot} does not host physical expert(s) {sorted(unknown)} of layer {layer}")
        tok, k = valid.nonzero(as_tuple=True)
        ids = physical_ids_TK[tok, k]
        for pid in ids.unique().tolist():  # NOTE: .tolist() syncs device->host
            sel = ids == pid
            rows = tok[sel]
            y = expert_forward(hosted[pid], take_rows(x, rows))  # [n, D]
            out_TD.index_add_(0, rows, y.float() * weights_TK[tok[sel], k[sel], None].float())
        return out_TD


def validate_routing(x, physical_ids_TK: torch.Tensor, weights_TK: torch.Tensor, hidden_size: int) -> None:
    T = num_rows(x)
    D = (x.data if isinstance(x, QuantizedActivation) else x).shape[1]
    if D != hidden_size:
        raise ValueError(f"hidden has {D} features, the model's hidden_size is {hidden_size}")
    if physical_ids_TK.dim() != 2 or physical_ids_TK.shape[0] != T:
        raise ValueError(f"physical_ids must be [T={T}, K], got shape {list(physical_ids_TK.shape)}")
    if weights_TK.shape != physical_ids_TK.shape:
        raise ValueError(f"weights shape {list(weights_TK.shape)} != physical_ids shape {list(physical_ids_TK.shape)}")
    if physical_ids_TK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"physical_ids must be int32/int64, got {physical_ids_TK.dtype}")
    if not weights_TK.dtype.is_floating_point:
        raise ValueError(f"weights must be floating point, got {weights_TK.dtype}")


class NodeForwarder:
    """Which of its node's slots each token must visit. The servicer receives each token once for
    the node, fans it out along this split (its own slot directly, the others over gRPC) and sums
    the partial results inside the node.

    ``slot_of_physical`` maps every physical expert of the node to the slot hosting it.
    """

    def __init__(self, node: int, slot_of_physical: dict[int, int]):
        self.node = node
        self._lut = torch.full((max(slot_of_physical) + 2,), -1, dtype=torch.long)
        for pid, slot in slot_of_physical.items():
            self._lut[pid] = slot

    def split(self, physical_ids_TK: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per slot: (token rows, ids masked to that slot's experts [n, K])."""
        ids = physical_ids_TK.long()
        in_range = (ids >= 0) & (ids < len(self._lut) - 1)
        if bool(((ids >= 0) & ~in_range).any()):
            raise ValueError(f"physical ids outside this node's plan: {ids[(ids >= 0) & ~in_range][:4].tolist()}")
        slot_TK = torch.where(in_range, self._lut[ids.clamp(min=0)], torch.full_like(ids, -1))
        if bool(((ids >= 0) & (slot_TK < 0)).any()):
            raise ValueError(f"physical expert(s) {ids[(ids >= 0) & (slot_TK < 0)].unique().tolist()} "
                             f"are not on node {self.node}")
        out = {}
        for slot in slot_TK[slot_TK >= 0].unique().tolist():
            mask = slot_TK == slot
            rows = mask.any(dim=1).nonzero(as_tuple=True)[0]
            out[slot] = (rows, torch.where(mask[rows], ids[rows], torch.full_like(ids[rows], -1)))
        return out
