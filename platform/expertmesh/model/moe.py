"""DeepSeek-V3 MoE layer: sigmoid gate with node-limited (group-limited) top-k, routed
experts computed in one grouped pass, and shared experts.

The gate is separate from the expert computation: ``Gate`` returns the chosen expert ids
and weights (``GateOutput``) and the experts take them back (a loop over experts in training,
``grouped_experts.StackedExperts`` once the engine stacked the weights). The distributed
path (router service) calls the same gate and ships the tokens to expert-shard actors
instead of computing them locally.

Routing (one token):
  scores = sigmoid(x · W_gate)                                    [E]
  choice = scores + e_score_correction_bias      (selection only, aux-loss-free balancing)
  group score = sum of the top-2 ``choice`` inside each of n_group groups   [G]
  keep the ``topk_group`` best groups (one group per node: a token reaches ≤ M nodes)
  top-k experts by ``choice`` among kept groups; weights = their *unbiased* scores,
  normalised to sum 1 when ``norm_topk_prob``, times ``routed_scaling_factor``.

Shape letters: T tokens, D hidden, E routed experts, G groups, K experts per token, F expert inner dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.model import cpu_kernels
from expertmesh.model.config import ModelConfig
from expertmesh.model.grouped_experts import RoutedOutput, StackedExperts
from expertmesh.model.layers import MLP, LinearFactory, backs_all, dense_linear, unhooked


@dataclass(frozen=True)
class GateOutput:
    """The routing decision for a batch of tokens.

    topk_ids_TK: chosen logical experts per token, Shape: [T, K], int64.
    topk_weights_TK: combine weights (float32), Shape: [T, K]; row sums are
        ``routed_scaling_factor`` when ``norm_topk_prob``.
    Example (T=2, K=4): ids [[3, 0, 7, 5], [1, 2, 6, 4]].
    """

    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor


class Gate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        # Gate math stays in FP32 whatever the model dtype (DeepSeek keeps the gate unquantized).
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Buffer(torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor) -> GateOutput:
        scores_TE = F.linear(x_TD.float(), self.weight.float()).sigmoid()
        routed = cpu_kernels.fused_moe_route(scores_TE, self.e_score_correction_bias, self.n_group, self.topk_group,
                                             self.top_k, self.norm_topk_prob, self.routed_scaling_factor)
        if routed is not None:  # CPU inference: the selection below in one C++ pass
            return GateOutput(*routed)
        choice_TE = scores_TE + self.e_score_correction_bias
        if self.n_group > 1 and self.topk_group < self.n_group:
            grouped = choice_TE.view(-1, self.n_group, self.n_experts // self.n_group)  # [T, G, E/G]
            group_scores_TG = grouped.topk(2, dim=-1).values.sum(dim=-1)
            keep_TK = group_scores_TG.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
            # 0 for kept groups, -inf for the others, broadcast over each group's experts
            group_bias_TG = torch.full_like(group_scores_TG, float("-inf")).scatter_(1, keep_TK, 0.0)
            choice_TE = (grouped + group_bias_TG.unsqueeze(-1)).view(-1, self.n_experts)
        topk_ids_TK = choice_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, topk_ids_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return GateOutput(topk_ids_TK, weights_TK * self.routed_scaling_factor)


def grouped_expert_forward(
    experts: nn.ModuleList | dict[int, nn.Module],
    x_TD: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
) -> torch.Tensor:
    """Run each chosen expert once over all its tokens and sum the weighted outputs per token.

    ``experts`` maps expert id -> module (a ModuleList for all experts, or a dict for the
    subset one shard hosts); ids absent from ``experts`` must not appear in ``topk_ids_TK``.
    """
    out_TD = torch.zeros_like(x_TD)
    flat_ids = topk_ids_TK.flatten()  # [T*K]
    order = flat_ids.argsort(stable=True)  # token-slots sorted by expert
    counts = torch.bincount(flat_ids, minlength=int(flat_ids.max()) + 1 if flat_ids.numel() else 1)
    token_of_slot = order // topk_ids_TK.shape[1]  # [T*K]
    weights_sorted = topk_weights_TK.flatten()[order]
    start = 0
    for expert_id, n in enumerate(counts.tolist()):  # NOTE: .tolist() syncs device->host
        if n == 0:
            continue
        tokens = token_of_slot[start:start + n]
        y = experts[expert_id](x_TD[tokens])  # [n, D]
        out_TD.index_add_(0, tokens, (y * weights_sorted[start:start + n, None].to(y.dtype)).to(out_TD.dtype))
        start += n
    return out_TD


class MoE(nn.Module):
    """Routed experts + shared experts. ``tokens_per_expert`` accumulates load for balancing."""

    def __init__(self, config: ModelConfig, linear: LinearFactory = dense_linear):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.gate = Gate(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size, linear) for _ in range(config.n_routed_experts)
        )
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, linear)
            if config.n_shared_experts > 0 else None
        )
        # Load counter read by the trainer (bias update) and by placement; reset by its reader.
        self.tokens_per_expert = nn.Buffer(torch.zeros(self.n_experts, dtype=torch.float32), persistent=False)
        self._stacked: StackedExperts | None = None

    def stack_experts(self) -> bool:
        """Re-home every dense expert's weights (and the shared experts', when they have the same
        width) in two stacked tensors; the per-expert parameters become views into them, so
        checkpoints keep their per-expert layout and later in-place loads stay visible. Enables the
        grouped-GEMM path (``grouped_experts``). FP8 experts stay as they are."""
        if self._stacked is not None and self._stacked.backs(self.experts):
            return True
        if not len(self.experts) or any(type(e.gate_proj) is not nn.Linear for e in self.experts):
            return False  # no local experts (served remotely) or FP8 experts
        self._stacked = StackedExperts.from_modules(self.experts, self.shared_experts)
        return True

    def _fused_layer(self, x_TD: torch.Tensor, stacked: StackedExperts) -> RoutedOutput | None:
        """Gate, routing and experts in one C++ call (``cpu_kernels.fused_moe_layer``), where nothing
        hooks the gate and the stacked experts would run the fused kernel; else None."""
        gate = self.gate
        if type(gate) is not Gate or not unhooked(gate) or stacked.kernel(x_TD, gate.top_k) != "fused":
            return None
        out = cpu_kernels.fused_moe_layer(x_TD, gate.weight, gate.e_score_correction_bias, gate.n_group,
                                          gate.topk_group, gate.top_k, gate.norm_topk_prob, gate.routed_scaling_factor,
                                          stacked.w13_EDH, stacked.w2_EFD, stacked.num_routed)
        return None if out is None else RoutedOutput(*out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])  # [T, D]
        if self._stacked is not None and backs_all(self._stacked.w2_EDF, [self.experts[0].down_proj.weight]):
            routed = self._fused_layer(x_TD, self._stacked)
            if routed is None:
                gate = self.gate(x_TD)
                routed = self._stacked.forward(x_TD, gate.topk_ids_TK, gate.topk_weights_TK)
            with torch.no_grad():  # in place: `+=` on a module attribute re-registers the buffer every call
                self.tokens_per_expert.add_(routed.routed_counts_E)
            y_TD = routed.y_TD  # includes the shared experts when they were stacked
            if self.shared_experts is not None and not self._stacked.num_shared:
                y_TD = y_TD + self.shared_experts(x_TD)
            return y_TD.view(shape)
        gate = self.gate(x_TD)
        with torch.no_grad():
            self.tokens_per_expert.add_(torch.bincount(gate.topk_ids_TK.flatten(), minlength=self.n_experts))
        y_TD = grouped_expert_forward(self.experts, x_TD, gate.topk_ids_TK, gate.topk_weights_TK)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view(shape)
