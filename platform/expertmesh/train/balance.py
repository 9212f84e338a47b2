"""Expert load balancing during training: the aux-loss-free gate bias and the sequence-wise loss.

Glossary
  load            tokens routed to an expert (each token counts once per expert it is sent to,
                  so one step's loads sum to ``tokens * K``).
  mean load       ``sum(load) / E`` of one layer: what each expert would get if balanced.
  max/mean        the balance figure logged everywhere: the busiest expert's load over the mean
                  load; 1.0 is perfect, ``E / K`` is the worst (all tokens on K experts).
  bias            ``gate.e_score_correction_bias`` [E]: added to the sigmoid scores for the
                  *selection* only; the combine weights use the unbiased scores.

Aux-loss-free update (DeepSeek-V3 §2.1.2), after every optimizer step, for each MoE layer::

    bias_E += gamma * sign(mean_load - load_E)

Overloaded experts get a lower bias (picked less), idle ones a higher one. ``load_E`` is the
step's count summed over all workers (one all-reduce of ``[L, E]``), so every worker applies
the same update and the biases stay identical without broadcasting them.

The biases are kept zero-mean per layer after each update: adding the same constant to every
expert's bias changes no group score ranking and no top-k choice, and a centred bias keeps the
biased scores near the sigmoid range, which is what other implementations' gates (e.g.
transformers', which masks excluded groups with 0 rather than -inf) assume.

Numbers: E = 16, K = 4, one step of 2048 tokens: the loads sum to 8192 and the mean load is
512; an expert with load 900 moves its bias by -gamma, one with 100 by +gamma.

Sequence-wise balance loss (V3 eq. 17-20, optional, ``alpha = 0`` turns it off), per sequence
of ``S`` tokens and averaged over the batch::

    f_e = E / (K * S) * #{t : e in topk(t)}        P_e = mean_t  s_te / sum_e' s_te'
    L_bal = alpha * sum_e f_e * P_e

``s_te`` are the gate's sigmoid scores; they are recomputed from ``gate.weight`` on the gate
input captured by a forward hook, so the model code is unchanged and the gradient reaches the
gate weight and the layer input.

Shape letters: L MoE layers, E routed experts, K experts per token, B sequences, S positions,
T tokens (``B * S``), D hidden.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from expertmesh.model.moe import GateOutput, MoE

GroupSum = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over all workers and returns it (``torch.distributed.all_reduce``); identity
on one worker."""


def local_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The single-worker :data:`GroupSum`: nothing to add."""
    return tensor


# --------------------------------------------------------------------------- load statistics


def read_expert_load(moe_layers: Sequence[MoE], reset: bool = True) -> torch.Tensor:
    """Stack every layer's ``tokens_per_expert`` counter into ``load_LE`` (float64, CPU).

    Args:
        moe_layers: the model's MoE layers in order (``model.moe_layers()``).
        reset: zero the counters after reading (the trainer owns them between steps).
    """
    if not moe_layers:
        return torch.zeros(0, 0, dtype=torch.float64)
    load_LE = torch.stack([moe.tokens_per_expert.detach().to("cpu", torch.float64) for moe in moe_layers])
    if reset:
        for moe in moe_layers:
            moe.tokens_per_expert.zero_()
    return load_LE  # [L, E]


def reset_expert_load(moe_layers: Sequence[MoE]) -> None:
    """Zero every layer's counter (e.g. after an evaluation pass that must not count)."""
    for moe in moe_layers:
        moe.tokens_per_expert.zero_()


def max_over_mean(load_LE: torch.Tensor) -> torch.Tensor:
    """Per-layer ``max(load) / mean(load)``, float64 ``[L]``; a layer with no load is 1.0."""
    if load_LE.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    load_LE = load_LE.to(torch.float64)
    mean_L = load_LE.mean(dim=-1)
    max_L = load_LE.max(dim=-1).values
    return torch.where(mean_L > 0, max_L / mean_L.clamp_min(torch.finfo(torch.float64).tiny), 1.0)


@dataclass(frozen=True)
class LoadSummary:
    """Expert load of one interval (one step or ``log_every`` steps), summed over workers.

    Attributes:
        load_LE: tokens per expert, Shape: [L, E] float64. Example (L=2, E=4, 8 tokens, K=2):
            ``[[6, 4, 4, 2], [8, 0, 4, 4]]``.
        max_over_mean_L: busiest expert over the mean, Shape: [L]. Example: ``[1.5, 2.0]``.
    """

    load_LE: torch.Tensor
    max_over_mean_L: torch.Tensor

    @classmethod
    def of(cls, load_LE: torch.Tensor) -> LoadSummary:
        """Summarise a ``[L, E]`` load matrix."""
        return cls(load_LE=load_LE.to(torch.float64), max_over_mean_L=max_over_mean(load_LE))

    @property
    def worst(self) -> float:
        """The largest per-layer max/mean (the slowest layer sets an EP step's time)."""
        return float(self.max_over_mean_L.max()) if self.max_over_mean_L.numel() else 1.0

    @property
    def average(self) -> float:
        """Per-layer max/mean averaged over layers (the ``balance`` column of the progress bar)."""
        return float(self.max_over_mean_L.mean()) if self.max_over_mean_L.numel() else 1.0

    def to_record(self, layer_ids: Sequence[int]) -> dict[str, Any]:
        """A JSON-ready record: layer ids, full counts and the per-layer figure."""
        return {
            "layers": list(layer_ids),
            "tokens_per_expert": [[int(round(v)) for v in row] for row in self.load_LE.tolist()],
            "max_over_mean": [round(v, 4) for v in self.max_over_mean_L.tolist()],
        }


@dataclass
class LoadAccumulator:
    """Adds step loads between two expert-load records (``log_every`` steps apart)."""

    load_LE: torch.Tensor | None = None
    steps: int = 0

    def add(self, step_load_LE: torch.Tensor) -> None:
        """Add one step's (already worker-summed) ``[L, E]`` load."""
        self.load_LE = step_load_LE.clone() if self.load_LE is None else self.load_LE + step_load_LE
        self.steps += 1

    def take(self) -> LoadSummary | None:
        """The summary since the last ``take`` (None when nothing was added), then reset."""
        if self.load_LE is None:
            return None
        summary = LoadSummary.of(self.load_LE)
        self.load_LE, self.steps = None, 0
        return summary


# --------------------------------------------------------------------------- bias update


@torch.no_grad()
def update_gate_bias(moe_layers: Sequence[MoE], load_LE: torch.Tensor, gamma: float) -> torch.Tensor:
    """Apply ``bias += gamma * sign(mean_load - load)`` to every layer; returns the step ``[L, E]``.

    ``load_LE`` must already be summed over workers (see :func:`step_load`), so that all
    workers apply the same step. ``gamma = 0`` leaves the biases untouched.
    """
    if len(moe_layers) != load_LE.shape[0]:
        raise ValueError(f"load has {load_LE.shape[0]} layers but the model has {len(moe_layers)} MoE layers")
    mean_L1 = load_LE.mean(dim=-1, keepdim=True)  # [L, 1]
    delta_LE = gamma * torch.sign(mean_L1 - load_LE)  # [L, E]
    if gamma == 0.0:
        return torch.zeros_like(delta_LE)
    for moe, delta_E in zip(moe_layers, delta_LE, strict=True):
        bias_E = moe.gate.e_score_correction_bias
        bias_E += delta_E.to(bias_E.device, bias_E.dtype)
        bias_E -= bias_E.mean()  # a shift common to all experts selects the same experts
    return delta_LE


def step_load(moe_layers: Sequence[MoE], group_sum: GroupSum = local_sum) -> torch.Tensor:
    """Read and zero the counters, then sum them over workers: the step's ``[L, E]`` load.

    NOTE: with several workers every rank must call this in the same step (all-reduce).
    """
    local_LE = read_expert_load(moe_layers, reset=True)
    if local_LE.numel() == 0:
        return local_LE
    return group_sum(local_LE.to(torch.float64))


# --------------------------------------------------------------------------- sequence-wise loss


@dataclass
class _Captured:
    x_TD: torch.Tensor
    topk_ids_TK: torch.Tensor


@dataclass
class SequenceBalanceLoss:
    """The complementary sequence-wise balance loss of DeepSeek-V3, via forward hooks on the gates.

    Use: ``install(model.moe_layers())`` once; each training forward fills the captures;
    ``loss(batch)`` returns ``alpha * mean_b sum_e f_e P_e`` summed over layers and
    clears them. ``capturing = False`` (evaluation) skips the capture.
    """

    alpha: float
    capturing: bool = True
    _captures: list[tuple[MoE, _Captured]] = field(default_factory=list)
    _handles: list[RemovableHandle] = field(default_factory=list)

    def install(self, moe_layers: Sequence[MoE]) -> None:
        """Register one forward hook per gate (idempotent: re-installing removes the old ones)."""
        self.remove()
        for moe in moe_layers:
            self._handles.append(moe.gate.register_forward_hook(self._hook_for(moe)))

    def _hook_for(self, moe: MoE) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...], GateOutput], None]:
        def hook(_gate: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: GateOutput) -> None:
            if self.capturing and torch.is_grad_enabled():
                self._captures.append((moe, _Captured(inputs[0], output.topk_ids_TK)))
        return hook

    def remove(self) -> None:
        """Unregister the hooks and drop captures."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captures.clear()

    def clear(self) -> None:
        """Drop captures without computing a loss (e.g. after an aborted forward)."""
        self._captures.clear()

    def loss(self, batch_size: int) -> torch.Tensor:
        """The summed balance loss of the captured layers (a scalar; 0 when nothing was captured).

        Each layer's sequence length is its token count over ``batch_size`` (the MTP block sees
        one position fewer than the main model).
        """
        captures, self._captures = self._captures, []
        if not captures:
            return torch.zeros(())
        total = torch.zeros((), device=captures[0][1].x_TD.device)
        for moe, cap in captures:
            seq_len = cap.x_TD.shape[0] // batch_size
            total = total + sequence_balance_loss(
                cap.x_TD, moe.gate.weight, cap.topk_ids_TK, batch_size, seq_len)
        return self.alpha * total


def sequence_balance_loss(
    x_TD: torch.Tensor, gate_weight_ED: torch.Tensor, topk_ids_TK: torch.Tensor, batch_size: int, seq_len: int
) -> torch.Tensor:
    """``mean_b sum_e f_be * P_be`` for one layer (without ``alpha``); see the module docstring.

    Args:
        x_TD: the gate input, ``T = batch_size * seq_len`` tokens in batch-major order.
        gate_weight_ED: ``gate.weight`` (the loss's gradient flows into it and into ``x_TD``).
        topk_ids_TK: the experts the gate chose.
    """
    n_tokens, _ = x_TD.shape
    if n_tokens != batch_size * seq_len:
        raise ValueError(f"gate saw {n_tokens} tokens, expected batch_size*seq_len={batch_size * seq_len}")
    n_experts = gate_weight_ED.shape[0]
    top_k = topk_ids_TK.shape[1]
    scores_TE = F.linear(x_TD.float(), gate_weight_ED.float()).sigmoid()  # [T, E]
    probs_BSE = (scores_TE / scores_TE.sum(dim=-1, keepdim=True)).view(batch_size, seq_len, n_experts)
    p_BE = probs_BSE.mean(dim=1)  # [B, E]
    chosen_TE = torch.zeros_like(scores_TE).scatter_(1, topk_ids_TK, 1.0)  # [T, E]
    f_BE = chosen_TE.view(batch_size, seq_len, n_experts).sum(dim=1) * (n_experts / (top_k * seq_len))
    return (f_BE * p_BE).sum(dim=-1).mean()
