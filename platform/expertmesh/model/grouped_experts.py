"""Stacked expert weights and the grouped GEMMs that run them: the MoE fast path of the engine.

Permute → grouped GEMMs → combine:
  1. permute: the (token, expert) pairs of a batch are sorted by expert, so each expert's
     tokens are one contiguous run of rows (``PermutedTokens``);
  2. two grouped GEMMs over all experts at once (gate+up, then down), each expert's weights
     applied to its own run only: experts with no tokens cost nothing;
  3. combine: rows are weighted and summed back onto their tokens.

Shared experts of the routed experts' width are stacked after the routed ones and chosen by
every token with weight 1 (exact: a SwiGLU MLP is the same whether it runs alone or as a
group of the grouped GEMM), so one pass computes routed and shared experts.

Two kernels for step 2, chosen per call by ``choose_kernel`` from measurements on CPU:
  "grouped_mm"  ``torch._grouped_mm`` with per-expert row offsets (no padding);
  "padded_bmm"  each expert's run padded to the busiest expert's count, two ``bmm`` calls
                (BF16 with a handful of rows per expert, where the grouped kernel is slow here).

Shape letters: T tokens, D hidden, F expert inner dim, H = 2F (gate rows then up rows),
E stacked experts (routed + shared), K experts per token (+ shared), S = T*K (token, expert)
pairs, C padded capacity per expert.
Example: T=2, K=2 routed + 1 shared among E=4+1: ids [[3, 0], [1, 3]] become
[[3, 0, 4], [1, 3, 4]]; sorted runs: expert 0: 1 row, 1: 1, 2: 0 (skipped), 3: 2, 4: 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.model.layers import backs_all

ExpertKernel = Literal["grouped_mm", "padded_bmm"]

# Measured on the 2-core AVX-512 machine (demo shapes: D=256, F=192, 16 routed + 1 shared expert,
# one thread): BF16 grouped_mm is ~2x slower than padded bmm at 1-32 rows per expert (batch 16:
# 1.58 vs 0.77 ms) but faster below one row per expert (batch 1: 0.56 vs 0.72 ms) and from a few
# hundred rows per expert (prefill); in FP32 grouped_mm is never slower (batch 16: 0.89 vs 1.47 ms).
BF16_PADDED_MIN_ROWS_PER_EXPERT = 1
BF16_PADDED_MAX_ROWS_PER_EXPERT = 32


def _grouped_mm_op():
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build has a grouped GEMM kernel for the device and dtype."""
    if _grouped_mm_op() is None:
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return False


def choose_kernel(device: torch.device, dtype: torch.dtype, pairs: int, experts: int) -> ExpertKernel:
    if not grouped_mm_supported(device, dtype):
        return "padded_bmm"
    rows_per_expert = pairs / experts
    if dtype == torch.bfloat16 and BF16_PADDED_MIN_ROWS_PER_EXPERT <= rows_per_expert \
            <= BF16_PADDED_MAX_ROWS_PER_EXPERT:
        return "padded_bmm"
    return "grouped_mm"


@dataclass(frozen=True)
class PermutedTokens:
    """(token, expert) pairs sorted by expert.

    order_S: position of each sorted pair in the flattened [T*K] ids, Shape: [S].
    expert_S: expert of each sorted pair (non-decreasing), Shape: [S].
    token_S: token of each sorted pair, Shape: [S].
    counts_E: pairs per stacked expert, Shape: [E] (int64).
    """

    order_S: torch.Tensor
    expert_S: torch.Tensor
    token_S: torch.Tensor
    counts_E: torch.Tensor


def permute(ids_TK: torch.Tensor, num_experts: int) -> PermutedTokens:
    flat_S = ids_TK.flatten()  # [T*K]
    expert_S, order_S = flat_S.sort(stable=True)
    counts_E = torch.bincount(flat_S, minlength=num_experts)
    return PermutedTokens(order_S, expert_S, order_S // ids_TK.shape[1], counts_E)


@dataclass(frozen=True)
class RoutedOutput:
    """What the stacked experts return: the combined output and the routed load of the batch.

    y_TD: sum over the token's experts (and shared experts) of weight · expert(x), Shape: [T, D].
    routed_counts_E: tokens per routed expert in this batch, Shape: [E_routed] (int64).
    """

    y_TD: torch.Tensor
    routed_counts_E: torch.Tensor


class StackedExperts:
    """All routed experts (then the merged shared experts) as ``w13_EHD`` [E, 2F, D] and
    ``w2_EDF`` [E, D, F]; the modules' parameters become views into these tensors."""

    def __init__(self, w13_EHD: torch.Tensor, w2_EDF: torch.Tensor, num_routed: int):
        self.w13_EHD = w13_EHD
        self.w2_EDF = w2_EDF
        self.num_routed = num_routed
        self.num_shared = w13_EHD.shape[0] - num_routed

    def backs(self, experts: nn.ModuleList) -> bool:
        """Whether the experts' parameters are still views into these tensors (not re-homed by a cast)."""
        return (backs_all(self.w13_EHD, [w for e in experts for w in (e.gate_proj.weight, e.up_proj.weight)])
                and backs_all(self.w2_EDF, [e.down_proj.weight for e in experts]))

    @classmethod
    def from_modules(cls, experts: nn.ModuleList, shared: nn.Module | None = None) -> StackedExperts:
        """Stack dense routed experts, plus ``shared`` when it has the routed experts' width."""
        modules = list(experts)
        inner = modules[0].down_proj.weight.shape[1]
        if shared is not None and type(shared.gate_proj) is nn.Linear and shared.down_proj.weight.shape[1] == inner:
            modules.append(shared)
        with torch.no_grad():
            w13 = torch.stack([torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in modules])  # [E, 2F, D]
            w2 = torch.stack([m.down_proj.weight for m in modules])  # [E, D, F]
        for i, m in enumerate(modules):
            m.gate_proj.weight = nn.Parameter(w13[i, :inner], requires_grad=m.gate_proj.weight.requires_grad)
            m.up_proj.weight = nn.Parameter(w13[i, inner:], requires_grad=m.up_proj.weight.requires_grad)
            m.down_proj.weight = nn.Parameter(w2[i], requires_grad=m.down_proj.weight.requires_grad)
        return cls(w13, w2, len(experts))

    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                kernel: ExpertKernel | None = None) -> RoutedOutput:
        T = x_TD.shape[0]
        ids_TK, weights_TK = topk_ids_TK, topk_weights_TK.to(x_TD.dtype)
        if self.num_shared:  # every token also picks each shared expert, weight 1
            shared_ids = torch.arange(self.num_routed, self.num_routed + self.num_shared, device=x_TD.device)
            ids_TK = torch.cat([ids_TK, shared_ids.expand(T, -1)], dim=1)  # [T, K+shared]
            weights_TK = torch.cat([weights_TK, weights_TK.new_ones(T, self.num_shared)], dim=1)
        E = self.w13_EHD.shape[0]
        perm = permute(ids_TK, E)
        kernel = kernel or choose_kernel(x_TD.device, x_TD.dtype, ids_TK.numel(), E)
        x_SD = x_TD[perm.token_S]  # [S, D] rows grouped by expert
        if kernel == "grouped_mm":
            y_SD = self._grouped(x_SD, perm.counts_E)
        else:
            y_SD = self._padded(x_SD, perm)
        y_SD = y_SD * weights_TK.flatten()[perm.order_S, None]
        y_TD = torch.zeros_like(x_TD).index_add_(0, perm.token_S, y_SD)
        return RoutedOutput(y_TD, perm.counts_E[: self.num_routed])

    def _grouped(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        grouped_mm = _grouped_mm_op()
        offsets_E = counts_E.cumsum(0, dtype=torch.int32)  # end row of each expert's run
        h_SH = grouped_mm(x_SD, self.w13_EHD.transpose(1, 2), offs=offsets_E)  # [S, 2F]
        gate_SF, up_SF = h_SH.chunk(2, dim=-1)
        return grouped_mm(F.silu(gate_SF) * up_SF, self.w2_EDF.transpose(1, 2), offs=offsets_E)  # [S, D]

    def _padded(self, x_SD: torch.Tensor, perm: PermutedTokens) -> torch.Tensor:
        E = self.w13_EHD.shape[0]
        capacity = int(perm.counts_E.max())  # NOTE: syncs device->host
        starts_E = perm.counts_E.cumsum(0) - perm.counts_E
        rank_S = torch.arange(x_SD.shape[0], device=x_SD.device) - starts_E[perm.expert_S]  # row within its expert
        buf_ECD = x_SD.new_zeros(E, capacity, x_SD.shape[1])
        buf_ECD[perm.expert_S, rank_S] = x_SD
        h_ECH = torch.bmm(buf_ECD, self.w13_EHD.transpose(1, 2))  # [E, C, 2F]
        gate_ECF, up_ECF = h_ECH.chunk(2, dim=-1)
        y_ECD = torch.bmm(F.silu(gate_ECF) * up_ECF, self.w2_EDF.transpose(1, 2))  # [E, C, D]
        return y_ECD[perm.expert_S, rank_S]  # [S, D]
