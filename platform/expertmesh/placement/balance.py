"""How balanced a placement is, and the load-unaware placements to compare the balancer against.

Glossary
  logical expert   one of the E routed experts of a MoE layer (ids 0..E-1).
  physical expert  a replica of a logical expert in one slot; it carries load[logical] / logcnt[logical]
                   (the dispatcher spreads an expert's tokens evenly over its replicas).
  slot             room for one physical expert; GPU g holds physical ids g*S .. g*S+S-1, S = P / num_gpus.
  GPU (rank)       one expert-parallel rank; its load is the sum over its slots.
  node, group      not used here: balance is measured per GPU, whatever the node layout.
  plan             phy2log_LP + logcnt_LE (see ``plan.PlacementPlan``).
  balancedness     mean(load per GPU) / max(load per GPU), per layer; 1.0 is perfect. The max GPU
                   sets the MoE layer's step time, so 1 / balancedness is the slowdown vs perfect.

Numbers (DeepSeek-V3 prefill): 256 logical + 32 redundant = 288 physical; /32 GPUs = 9 slots per GPU.
  The naive placement puts experts 0..255 in physical 0..255 and copies of experts 0..31 in 256..287.

Shape letters: L layers, E logical experts, P physical experts, R max replicas of one logical
  expert, D GPUs (devices).
"""

from __future__ import annotations

import torch
from torch import Tensor

from expertmesh.placement.plan import logical_to_physical


def gpu_loads(weight_LE: Tensor, phy2log_LP: Tensor, logcnt_LE: Tensor, num_gpus: int) -> Tensor:
    """Load on each GPU: sum over its slots of weight[logical] / logcnt[logical]. float64 [L, D]."""
    load_LE = weight_LE.detach().to(device="cpu", dtype=torch.float64)
    phy2log_LP = phy2log_LP.to(device="cpu", dtype=torch.int64)
    logcnt_LE = logcnt_LE.to(device="cpu", dtype=torch.int64)
    if load_LE.dim() != 2 or phy2log_LP.dim() != 2 or tuple(logcnt_LE.shape) != tuple(load_LE.shape):
        raise ValueError(
            f"expected weight [L, E], phy2log [L, P], logcnt [L, E]; got {tuple(load_LE.shape)}, "
            f"{tuple(phy2log_LP.shape)}, {tuple(logcnt_LE.shape)}"
        )
    num_layers, num_physical = phy2log_LP.shape
    if num_layers != load_LE.shape[0]:
        raise ValueError(f"weight has {load_LE.shape[0]} layers but phy2log has {num_layers}")
    if num_gpus < 1 or num_physical % num_gpus != 0:
        raise ValueError(f"physical experts P={num_physical} must be a multiple of num_gpus={num_gpus}")
    if bool((logcnt_LE < 1).any()):
        raise ValueError("logcnt_LE must be >= 1 for every logical expert")
    per_replica_LE = load_LE / logcnt_LE
    load_LP = per_replica_LE.gather(1, phy2log_LP)
    return load_LP.view(num_layers, num_gpus, num_physical // num_gpus).sum(dim=-1)  # [L, D, S] -> [L, D]


def balancedness(weight_LE: Tensor, phy2log_LP: Tensor, logcnt_LE: Tensor, num_gpus: int) -> Tensor:
    """mean(load per GPU) / max(load per GPU) for each layer, float64 [L]; a layer with no load is 1.0."""
    load_LD = gpu_loads(weight_LE, phy2log_LP, logcnt_LE, num_gpus)
    max_L = load_LD.max(dim=-1).values
    mean_L = load_LD.mean(dim=-1)
    return torch.where(max_L > 0, mean_L / max_L.clamp_min(torch.finfo(torch.float64).tiny), 1.0)


def naive_placement(
    num_logical: int, num_replicas: int, num_gpus: int, *, num_layers: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """Load-unaware baseline: experts 0..E-1 in order, then the redundant slots round-robin with
    experts 0, 1, 2, ... (physical p holds logical p % E); the same for every layer.

    Returns (phy2log_LP, log2phy_LER, logcnt_LE) like ``rebalance_experts``.
    """
    for name, value in (
        ("num_logical", num_logical),
        ("num_replicas", num_replicas),
        ("num_gpus", num_gpus),
        ("num_layers", num_layers),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    if num_replicas < num_logical:
        raise ValueError(f"num_replicas={num_replicas} must be >= num_logical={num_logical}")
    if num_replicas % num_gpus != 0:
        raise ValueError(f"num_replicas={num_replicas} must be a multiple of num_gpus={num_gpus}")
    phy2log_LP = (torch.arange(num_replicas) % num_logical).expand(num_layers, num_replicas).clone()
    log2phy_LER, logcnt_LE = logical_to_physical(phy2log_LP, num_logical)
    return phy2log_LP, log2phy_LER, logcnt_LE


def no_redundancy_placement(num_logical: int, num_gpus: int, *, num_layers: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Baseline without replicas: P = E, experts laid out contiguously (GPU g holds a block of E / num_gpus)."""
    return naive_placement(num_logical, num_logical, num_gpus, num_layers=num_layers)
