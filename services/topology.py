"""The live slot table: which shard actor serves each slot, which slots are alive, and where the
physical experts of the current plan are hosted after failures.

Glossary (shared with expertmesh.placement and services/expert_shard):
  slot id     a stable number for one expert-shard actor's device slot; a recreated actor keeps
              its slot id, a slot added by ``expertmesh scale`` gets a new one
  position    an index of a plan's slot axis (``num_gpus``); ``plan_slots[position]`` is the slot
              id there. A plan over slots 0..5 has plan_slots = (0, 1, 2, 3, 4, 5); after node 1
              (slots 2, 3) is lost and the controller re-plans over the survivors it is (0, 1, 4, 5)
  adopted     physical id -> slot id: a survivor hosting a physical expert whose own slot died,
              until the next plan
  epoch       version of the slot table; it only grows
Example: 24 physical over plan_slots (0..5), 4 per slot: physical 9 sits at position 2, slot 2,
node 1; when slot 2 dies and slot 3 adopts it, adopted = {8: 3, 9: 3, 10: 3, 11: 3}.

Shape letters: P physical experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from expertmesh.placement import PlacementPlan
from expertmesh.protos import load

placement_pb = load("placement_pb2")


@dataclass(frozen=True)
class SlotInfo:
    slot: int
    node: int  # node index (position in the data plane's node list)
    address: str
    alive: bool = True


@dataclass(frozen=True)
class SlotTable:
    epoch: int
    slots: tuple[SlotInfo, ...]
    plan_version: int = 0  # the plan ``adopted`` refers to
    adopted: dict[int, int] = field(default_factory=dict)  # physical id -> slot id

    def __post_init__(self) -> None:
        ids = [s.slot for s in self.slots]
        if len(set(ids)) != len(ids):
            raise ValueError(f"slot ids must be unique, got {ids}")

    @classmethod
    def initial(cls, addresses: list[str], slots_per_node: int) -> SlotTable:
        return cls(1, tuple(SlotInfo(s, s // slots_per_node, a) for s, a in enumerate(addresses)))

    def by_id(self) -> dict[int, SlotInfo]:
        return {s.slot: s for s in self.slots}

    def live(self) -> list[SlotInfo]:
        return [s for s in self.slots if s.alive]

    def node_slots(self, node: int, alive_only: bool = True) -> list[SlotInfo]:
        return [s for s in self.slots if s.node == node and (s.alive or not alive_only)]

    def with_slots(self, slots: list[SlotInfo], **changes) -> SlotTable:
        return replace(self, epoch=self.epoch + 1, slots=tuple(sorted(slots, key=lambda s: s.slot)), **changes)

    def mark(self, dead: set[int]) -> SlotTable:
        """Same table with ``dead`` slots marked not alive (a new epoch when anything changed)."""
        if not any(s.alive and s.slot in dead for s in self.slots):
            return self
        return self.with_slots([replace(s, alive=False) if s.slot in dead else s for s in self.slots])

    # ---- (de)serialization: JSON for Redis, protobuf for the wire -------------------------------------
    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "plan_version": self.plan_version,
                "slots": [{"slot": s.slot, "node": s.node, "address": s.address, "alive": s.alive} for s in self.slots],
                "adopted": {str(p): s for p, s in self.adopted.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> SlotTable:
        return cls(int(d["epoch"]), tuple(SlotInfo(int(s["slot"]), int(s["node"]), s["address"], bool(s["alive"]))
                                          for s in d["slots"]),
                   int(d.get("plan_version", 0)), {int(p): int(s) for p, s in d.get("adopted", {}).items()})

    def to_proto(self):
        return placement_pb.SlotTable(
            epoch=self.epoch, plan_version=self.plan_version, adopted=self.adopted,
            slots=[placement_pb.Slot(slot=s.slot, node=s.node, address=s.address, alive=s.alive) for s in self.slots])

    @classmethod
    def from_proto(cls, msg) -> SlotTable:
        if msg.epoch <= 0:
            raise ValueError(f"slot table epoch must be >= 1, got {msg.epoch}")
        return cls(msg.epoch, tuple(SlotInfo(s.slot, s.node, s.address, s.alive) for s in msg.slots),
                   msg.plan_version, dict(msg.adopted))


def identity_slots(plan: PlacementPlan) -> tuple[int, ...]:
    return tuple(range(plan.num_gpus))


def position_slots(plan: PlacementPlan, plan_slots: tuple[int, ...] | list[int] | None) -> tuple[int, ...]:
    """``plan_slots`` checked against the plan (None/empty = identity)."""
    if not plan_slots:
        return identity_slots(plan)
    if len(plan_slots) != plan.num_gpus:
        raise ValueError(f"plan v{plan.version} has {plan.num_gpus} slot positions, slot_ids names {len(plan_slots)}")
    return tuple(int(s) for s in plan_slots)


@dataclass(frozen=True)
class Hosting:
    """Where every physical expert of a plan lives under a slot table.

    host_slot_P: slot id hosting each physical expert.  Shape: [P]
    node_P:      node index of that slot.               Shape: [P]
    alive_P:     whether that slot is alive.             Shape: [P], bool
    Example (2 slots x 2 physical, slot 1 dead): host_slot_P = [0, 0, 1, 1], alive_P = [T, T, F, F].
    """

    host_slot_P: torch.Tensor
    node_P: torch.Tensor
    alive_P: torch.Tensor

    @property
    def complete(self) -> bool:
        return bool(self.alive_P.all())


def hosting(plan: PlacementPlan, plan_slots: tuple[int, ...], table: SlotTable | None,
            slots_per_node: int | None = None) -> Hosting:
    """Hosting of ``plan`` over ``table``. Without a table: the plan's own layout (slot = position,
    node = position // slots per node), everything alive."""
    P = plan.phy2log_LP.shape[1]
    per_slot = P // plan.num_gpus
    position_P = torch.arange(P) // per_slot
    slot_of_position = torch.tensor(plan_slots, dtype=torch.long)
    host_P = slot_of_position[position_P].clone()
    if table is None:
        per_node = slots_per_node or plan.num_gpus // plan.num_nodes
        return Hosting(host_P, position_P // per_node, torch.ones(P, dtype=torch.bool))
    if table.plan_version == plan.version:
        for p, s in table.adopted.items():
            if 0 <= p < P:
                host_P[p] = s
    info = table.by_id()
    missing = sorted({int(s) for s in host_P.unique().tolist()} - set(info))
    if missing:
        raise ValueError(f"plan v{plan.version} places experts on slot(s) {missing} that the slot table "
                         f"(epoch {table.epoch}) does not list")
    node_P = torch.tensor([info[int(s)].node for s in host_P.tolist()], dtype=torch.long)
    alive_P = torch.tensor([info[int(s)].alive for s in host_P.tolist()], dtype=torch.bool)
    return Hosting(host_P, node_P, alive_P)
