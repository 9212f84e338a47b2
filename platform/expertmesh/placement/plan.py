"""Placement plans: the versioned tables that say which expert lives in which slot, and their diffs.

Glossary
  logical expert   one of the E routed experts of a MoE layer, as trained (ids 0..E-1).
  physical expert  a replica of a logical expert loaded into one slot (ids 0..P-1); each logical
                   expert has >= 1, and its load is split evenly across them.
  slot             room for one physical expert on a GPU. Physical ids run GPU by GPU, so physical p
                   is slot p % slots_per_gpu of GPU p // slots_per_gpu.
  GPU (rank)       one expert-parallel rank; GPU g is on node g // gpus_per_node.
  node             a server of num_gpus / num_nodes GPUs joined by NVLink.
  group            E / num_groups consecutive logical experts kept on one node (the plan itself
                   does not record groups; the balancer that made it did).
  plan             ``PlacementPlan``: phy2log / log2phy / logcnt for every layer plus a version.
  move             ``ExpertMove``: one slot that must drop one logical expert and load another to go
                   from one plan to the next.

Numbers (DeepSeek-V3 prefill): 256 logical + 32 redundant = 288 physical; /32 GPUs = 9 slots per GPU;
  4 nodes x 8 GPUs. Physical 40 is slot 4 of GPU 4, which is on node 0.

Shape letters: L layers, E logical experts, P physical experts, R max replicas of one logical expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# Sentinel in log2phy_LER for "no replica in this column".
NO_REPLICA = -1


def logical_to_physical(phy2log_LP: Tensor, num_logical: int) -> tuple[Tensor, Tensor]:
    """Invert phy2log: replicas of each logical expert, ascending physical id, padded with -1.

    Returns:
        log2phy_LER: int64 [L, E, R], R = max(1, the largest replica count in any layer).
        logcnt_LE: int64 [L, E], replicas per logical expert (0 for an expert with no replica).
    Example: phy2log [[0, 1, 2, 0]], E=3 -> log2phy [[[0, 3], [1, -1], [2, -1]]], logcnt [[2, 1, 1]].
    """
    phy2log_LP = phy2log_LP.to(device="cpu", dtype=torch.int64)
    if phy2log_LP.dim() != 2:
        raise ValueError(f"phy2log_LP must be 2-D [layers, physical], got shape {tuple(phy2log_LP.shape)}")
    if phy2log_LP.numel() and (int(phy2log_LP.min()) < 0 or int(phy2log_LP.max()) >= num_logical):
        low, high = int(phy2log_LP.min()), int(phy2log_LP.max())
        raise ValueError(f"phy2log_LP values must be in [0, {num_logical}), got min={low} max={high}")
    num_layers, num_physical = phy2log_LP.shape
    logcnt_LE = torch.zeros(num_layers, num_logical, dtype=torch.int64)
    logcnt_LE.scatter_add_(1, phy2log_LP, torch.ones_like(phy2log_LP))
    max_replicas = max(1, int(logcnt_LE.max())) if logcnt_LE.numel() else 1
    # physical ids grouped by logical expert (stable: ascending physical inside a group)
    phys_by_log_LP = torch.argsort(phy2log_LP, dim=-1, stable=True)
    log_sorted_LP = phy2log_LP.gather(1, phys_by_log_LP)
    first_LE = torch.cumsum(logcnt_LE, dim=-1) - logcnt_LE  # position of each expert's first replica
    rank_LP = torch.arange(num_physical) - first_LE.gather(1, log_sorted_LP)  # replica rank 0..cnt-1
    log2phy_LER = torch.full((num_layers, num_logical, max_replicas), NO_REPLICA, dtype=torch.int64)
    log2phy_LER.view(num_layers, -1).scatter_(1, log_sorted_LP * max_replicas + rank_LP, phys_by_log_LP)
    return log2phy_LER, logcnt_LE


@dataclass(frozen=True, eq=False)
class PlacementPlan:
    """One versioned placement of physical experts for all MoE layers (what Redis stores).

    The example in the field docs is one plan: L=2 layers, E=3 logical, P=4 physical, 2 GPUs x 2 slots.
    Tensors are int64 on CPU (converted on construction). ``==`` compares every field.
    """

    version: int
    """Monotonic plan number; a newer plan has a larger version."""

    phy2log_LP: Tensor
    """Logical expert held by each physical expert (physical p = slot p % slots_per_gpu of GPU
    p // slots_per_gpu). Shape: [L, P]. No sentinel: every slot holds a replica.
    Example: [[0, 1, 2, 0],
              [2, 0, 1, 2]]   (layer 0: GPU 0 holds experts 0, 1; GPU 1 holds 2, 0)"""

    logcnt_LE: Tensor
    """Replicas of each logical expert. Shape: [L, E], every entry >= 1; row sums are P.
    Example: [[2, 1, 1],
              [1, 1, 2]]"""

    log2phy_LER: Tensor
    """Physical ids of each logical expert's replicas, valid entries first. Shape: [L, E, R];
    -1 = no replica in this column (an expert with fewer than R replicas).
    Example: [[[0, 3], [1, -1], [2, -1]],
              [[1, -1], [2, -1], [0, 3]]]"""

    num_gpus: int
    """Expert-parallel GPUs; slots per GPU = P / num_gpus."""

    num_nodes: int
    """Nodes; GPUs per node = num_gpus / num_nodes."""

    def __post_init__(self) -> None:
        for name in ("phy2log_LP", "logcnt_LE", "log2phy_LER"):
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            if value.is_floating_point() or value.is_complex():
                raise ValueError(f"{name} must hold integers, got dtype {value.dtype}")
            object.__setattr__(self, name, value.detach().to(device="cpu", dtype=torch.int64).contiguous())
        for name in ("version", "num_gpus", "num_nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}={value!r} must be an int")
        if self.version < 0 or self.num_gpus < 1 or self.num_nodes < 1:
            raise ValueError(
                f"need version >= 0, num_gpus >= 1, num_nodes >= 1; got version={self.version}, "
                f"num_gpus={self.num_gpus}, num_nodes={self.num_nodes}"
            )
        self._check_tables()

    def _check_tables(self) -> None:
        phy2log_LP, logcnt_LE, log2phy_LER = self.phy2log_LP, self.logcnt_LE, self.log2phy_LER
        if phy2log_LP.dim() != 2 or logcnt_LE.dim() != 2 or log2phy_LER.dim() != 3:
            raise ValueError(
                f"expected phy2log [L, P], logcnt [L, E], log2phy [L, E, R]; got shapes "
                f"{tuple(phy2log_LP.shape)}, {tuple(logcnt_LE.shape)}, {tuple(log2phy_LER.shape)}"
            )
        num_layers, num_physical = phy2log_LP.shape
        if logcnt_LE.shape[0] != num_layers or tuple(log2phy_LER.shape[:2]) != tuple(logcnt_LE.shape):
            raise ValueError(
                f"layer/expert dims disagree: phy2log {tuple(phy2log_LP.shape)}, logcnt {tuple(logcnt_LE.shape)}, "
                f"log2phy {tuple(log2phy_LER.shape)}"
            )
        if num_physical % self.num_gpus != 0:
            raise ValueError(f"physical experts P={num_physical} must be a multiple of num_gpus={self.num_gpus}")
        if self.num_gpus % self.num_nodes != 0:
            raise ValueError(f"num_gpus={self.num_gpus} must be a multiple of num_nodes={self.num_nodes}")
        expected_log2phy_LER, expected_logcnt_LE = logical_to_physical(phy2log_LP, self.num_logical)
        if not torch.equal(logcnt_LE, expected_logcnt_LE):
            raise ValueError("logcnt_LE does not match the replica counts in phy2log_LP")
        if bool((logcnt_LE < 1).any()):
            layer, expert = (int(v) for v in (logcnt_LE < 1).nonzero()[0])
            raise ValueError(f"logical expert {expert} has no replica in layer {layer}; every expert needs >= 1")
        if log2phy_LER.shape[2] < expected_log2phy_LER.shape[2]:
            raise ValueError(f"log2phy_LER has R={log2phy_LER.shape[2]} columns, need {expected_log2phy_LER.shape[2]}")
        # replica order inside a row is free (the reference lists them by replica rank), so compare as sets
        valid_LER = log2phy_LER != NO_REPLICA
        column_R = torch.arange(log2phy_LER.shape[2])
        padded_last = torch.equal(valid_LER, column_R < logcnt_LE.unsqueeze(-1))
        in_range = bool(((log2phy_LER >= 0) & (log2phy_LER < num_physical) | ~valid_LER).all())
        if not (padded_last and in_range):
            raise ValueError("log2phy_LER must list logcnt physical ids in [0, P) per expert, then -1 padding")
        sorted_LER = torch.where(valid_LER, log2phy_LER, num_physical).sort(dim=-1).values
        sorted_LER = sorted_LER[..., : expected_log2phy_LER.shape[2]]
        if not torch.equal(sorted_LER.masked_fill(sorted_LER == num_physical, NO_REPLICA), expected_log2phy_LER):
            raise ValueError("log2phy_LER disagrees with phy2log_LP")

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.phy2log_LP.shape[0]

    @property
    def num_physical(self) -> int:
        return self.phy2log_LP.shape[1]

    @property
    def num_logical(self) -> int:
        return self.logcnt_LE.shape[1]

    @property
    def slots_per_gpu(self) -> int:
        return self.num_physical // self.num_gpus

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes

    # ---- lookups -------------------------------------------------------------------------------
    def gpu_of(self, physical: int) -> int:
        """GPU holding physical expert ``physical``."""
        self._check_index("physical", physical, self.num_physical)
        return physical // self.slots_per_gpu

    def slot_of(self, physical: int) -> int:
        """Slot index of physical expert ``physical`` on its GPU (0..slots_per_gpu-1)."""
        self._check_index("physical", physical, self.num_physical)
        return physical % self.slots_per_gpu

    def node_of_gpu(self, gpu: int) -> int:
        self._check_index("gpu", gpu, self.num_gpus)
        return gpu // self.gpus_per_node

    def experts_on_gpu(self, layer: int, gpu: int) -> list[int]:
        """Logical experts in ``gpu``'s slots for ``layer``, slot by slot."""
        self._check_index("layer", layer, self.num_layers)
        self._check_index("gpu", gpu, self.num_gpus)
        first = gpu * self.slots_per_gpu
        return self.phy2log_LP[layer, first : first + self.slots_per_gpu].tolist()

    def replicas_of(self, layer: int, logical: int) -> list[int]:
        """Physical ids holding ``logical`` in ``layer``."""
        self._check_index("layer", layer, self.num_layers)
        self._check_index("logical", logical, self.num_logical)
        return [p for p in self.log2phy_LER[layer, logical].tolist() if p != NO_REPLICA]

    @staticmethod
    def _check_index(name: str, value: int, size: int) -> None:
        if not 0 <= value < size:
            raise IndexError(f"{name}={value} out of range [0, {size})")

    # ---- construction, storage -----------------------------------------------------------------
    @classmethod
    def from_phy2log(
        cls, version: int, phy2log_LP: Tensor, num_logical: int, num_gpus: int, num_nodes: int
    ) -> PlacementPlan:
        """Plan from phy2log alone (log2phy and logcnt derived)."""
        log2phy_LER, logcnt_LE = logical_to_physical(phy2log_LP, num_logical)
        return cls(version, phy2log_LP, logcnt_LE, log2phy_LER, num_gpus, num_nodes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (ints and nested lists of ints)."""
        return {
            "version": self.version,
            "num_gpus": self.num_gpus,
            "num_nodes": self.num_nodes,
            "phy2log_LP": self.phy2log_LP.tolist(),
            "logcnt_LE": self.logcnt_LE.tolist(),
            "log2phy_LER": self.log2phy_LER.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlacementPlan:
        """Inverse of ``to_dict``; validates as the constructor does."""
        missing = [
            k for k in ("version", "num_gpus", "num_nodes", "phy2log_LP", "logcnt_LE", "log2phy_LER") if k not in data
        ]
        if missing:
            raise ValueError(f"plan dict is missing keys {missing}; it has {sorted(data)}")
        try:
            tables = {k: torch.tensor(data[k], dtype=torch.int64) for k in ("phy2log_LP", "logcnt_LE", "log2phy_LER")}
        except (TypeError, ValueError) as err:
            raise ValueError(f"plan dict tables must be rectangular lists of ints: {err}") from err
        return cls(
            data["version"],
            tables["phy2log_LP"],
            tables["logcnt_LE"],
            tables["log2phy_LER"],
            data["num_gpus"],
            data["num_nodes"],
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PlacementPlan):
            return NotImplemented
        return (
            (self.version, self.num_gpus, self.num_nodes) == (other.version, other.num_gpus, other.num_nodes)
            and torch.equal(self.phy2log_LP, other.phy2log_LP)
            and torch.equal(self.logcnt_LE, other.logcnt_LE)
            and torch.equal(self.log2phy_LER, other.log2phy_LER)
        )

    __hash__ = None  # type: ignore[assignment]  # holds tensors: not hashable


@dataclass(frozen=True)
class ExpertMove:
    """One slot change between two plans: slot ``slot`` of GPU ``gpu`` (physical id ``physical``)
    in MoE layer ``layer`` drops logical expert ``drop_logical`` and loads ``load_logical``."""

    layer: int
    physical: int
    gpu: int
    slot: int
    drop_logical: int
    load_logical: int


def diff_plans(old: PlacementPlan, new: PlacementPlan) -> list[ExpertMove]:
    """Moves that turn ``old`` into ``new``, ordered by layer then physical id.

    A slot whose logical expert is the same in both plans yields no move. Both plans must have the
    same layers, logical experts, physical experts and GPUs.
    """
    old_shape = (old.num_layers, old.num_logical, old.num_physical, old.num_gpus)
    new_shape = (new.num_layers, new.num_logical, new.num_physical, new.num_gpus)
    if old_shape != new_shape:
        raise ValueError(f"plans differ in (layers, logical, physical, gpus): old={old_shape} new={new_shape}")
    changed_C2 = (old.phy2log_LP != new.phy2log_LP).nonzero()  # [C, 2] (layer, physical), row-major order
    moves = []
    for layer, physical in changed_C2.tolist():
        moves.append(
            ExpertMove(
                layer=layer,
                physical=physical,
                gpu=physical // new.slots_per_gpu,
                slot=physical % new.slots_per_gpu,
                drop_logical=int(old.phy2log_LP[layer, physical]),
                load_logical=int(new.phy2log_LP[layer, physical]),
            )
        )
    return moves


def moves_by_layer(moves: list[ExpertMove]) -> dict[int, list[ExpertMove]]:
    """Group moves by layer (ascending), keeping their order; layers without moves are absent."""
    grouped: dict[int, list[ExpertMove]] = {}
    for move in sorted(moves, key=lambda m: m.layer):
        grouped.setdefault(move.layer, []).append(move)
    return grouped


def apply_moves(phy2log_LP: Tensor, moves: list[ExpertMove]) -> Tensor:
    """New phy2log after ``moves``; raises ValueError if a slot does not hold the expert a move drops."""
    result_LP = phy2log_LP.detach().to(device="cpu", dtype=torch.int64).clone()
    num_layers, num_physical = result_LP.shape
    for move in moves:
        if not (0 <= move.layer < num_layers and 0 <= move.physical < num_physical):
            raise ValueError(f"{move} is outside phy2log of shape {(num_layers, num_physical)}")
        held = int(result_LP[move.layer, move.physical])
        if held != move.drop_logical:
            raise ValueError(f"{move}: slot holds logical {held}, not drop_logical={move.drop_logical} (stale plan?)")
        result_LP[move.layer, move.physical] = move.load_logical
    return result_LP
