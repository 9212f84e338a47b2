"""Stacked expert weights and the grouped GEMMs that run them: the MoE fast path of the engine.

Permute → grouped GEMMs → combine:
  1. permute: the (token, expert) pairs of a batch are sorted by expert, so each expert's
     tokens are one contiguous run of rows (``PermutedTokens``);
  2. two grouped GEMMs over all experts at once (gate+up, then down), each expert's weights
     applied to its own run only: experts with no tokens cost nothing;
  3. combine: rows are weighted and summed back onto their tokens.

Shared experts of the routed experts' width are stacked after the routed ones and chosen by
every token with weight 1 (exact: a SwiGLU MLP is the same whether it runs alone or as a
group of the grouped GEMM), so one pass computes routed and shared experts; the padded
kernel runs them apart instead (padding every run to their T rows would multiply its work).

Five kernels, chosen per call by ``choose_kernel`` from measurements on CPU:
  "fused"       all three steps in one C++ pass (``cpu_kernels.fused_moe``: each expert's weights
                streamed once per six rows, partial sums in registers, SwiGLU and the routing
                weight applied on the way out), up to ``FUSED_MAX_ROWS_PER_EXPERT`` rows per
                expert: decode batches, FP32 or BF16 inference on an AVX-512 CPU, weights
                stored input-major;
  "grouped_mm"  ``torch._grouped_mm`` with per-expert row offsets (no padding; every chunk off
                CPU);
  "padded_bmm"  each routed expert's run padded to the busiest one's count, two ``bmm`` calls
                (a handful to 64 rows per expert, where the grouped kernel runs one small
                single-core GEMM per expert);
  "dense"       every token through every expert, unchosen experts weighted 0 (exact: 0 times a
                finite output): one GEMM over all experts' gate/up rows and one bmm down
                (decode batches of up to 16 FP32 / 64 BF16 tokens, where oneDNN's GEMMs make
                the extra rows cheaper than gathering and padding);
  "looped"      one SwiGLU per expert that has rows, gathered from and added back into the
                batch, through ``fast_linear`` (fewer pairs than experts, e.g. a batch-1
                decode step, FP32 and, except on AMD, BF16; and prefill chunks, where
                per-expert GEMMs beat the grouped kernel on CPU).

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
from torch import nn

from expertmesh.model import cpu_kernels
from expertmesh.model.layers import (
    CPU_VENDOR, SHADOW_MAX_ROWS, backs_all, fast_linear, input_major, input_major_pays, swiglu,
)

ExpertKernel = Literal["fused", "grouped_mm", "padded_bmm", "looped", "dense"]

# Measured on the 2-core AMD EPYC (AVX-512), 4 layers' weights in turn (as in a step; demo shapes:
# D=256, F=192, 16 routed + 1 shared expert, top-4; median ms per MoE layer, FP32 / BF16):
#   batch 1 (0.3 rows per expert): FP32 looped 0.15 vs grouped_mm 0.25; BF16 padded_bmm over the
#   gathered busy experts 0.13 vs grouped_mm 0.26, looped 0.23;
#   16 tokens (4.7 rows per expert): FP32 dense 0.80 vs padded_bmm 1.02, grouped_mm 1.35;
#   BF16 dense 0.72 vs padded_bmm 0.73, grouped_mm 1.28 (in the engine: dense 2.6-2.9 ms per step
#   over 4 MoE layers vs padded_bmm 3.5-4.6 ms);
#   64 tokens: FP32 padded_bmm 1.72 vs looped 2.50, dense 2.17; BF16 padded_bmm 1.21 vs dense 1.51;
#   128 tokens (38 rows per expert): FP32 padded_bmm 2.50 vs looped 3.06, grouped_mm 3.64; BF16
#   padded_bmm 1.04 vs grouped_mm 1.73, looped 2.22; 256 tokens: BF16 padded_bmm 1.56 vs grouped 2.15;
#   512 tokens (150 rows per expert): FP32 looped 5.8 vs padded_bmm 7.6, grouped_mm 7.7; BF16
#   grouped_mm 2.55 vs looped 2.76, padded_bmm 3.00;
#   2048 tokens: FP32 looped 15.0 vs grouped_mm 25.0; BF16 looped 7.4 vs grouped_mm 8.0.
# In the engine (16 x 128-token prefill): FP32 looped 169 ms vs 230 ms when it still permuted the
# whole batch first; BF16 looped 86 ms vs grouped_mm 107 ms.
# On the 2-core Intel Xeon (AVX-512 + AMX), in the engine (tok/s of whole runs, A/B in one process):
#   batch 1 BF16: looped with the few rows upcast to FP32 (``_swiglu``) 1.24x padded_bmm (whose
#   BF16 bmm of one row per expert took ~126 us there); looped without the upcast 1.05x;
#   16 tokens: FP32 padded_bmm 1.03x dense (a wash, dense kept); BF16 dense 1.07x padded_bmm.
# The fused kernel against the best of the others (Xeon, 4 layers' weights in turn, median us per
# layer, FP32 / BF16): 1 token 61 vs 190 (looped) / 76 vs 470; 16 tokens 457 vs 612 (dense) / 455
# vs 613; 64 tokens 790-840 vs 1620-1690 (padded_bmm) / 1190-1260 vs 1390-1440 (dense); 128
# tokens (38 rows per expert) it loses: 2090-2550 vs 1500-2120 / 2680 vs 1750-1950 (it runs
# 6-row tiles, BLAS larger ones).
FUSED_MAX_ROWS_PER_EXPERT = 24
LOOPED_MAX_ROWS_PER_EXPERT = 0.5
PADDED_MAX_ROWS_PER_EXPERT = 64
DENSE_MAX_TOKENS = {torch.bfloat16: 64, torch.float32: 16}
UPCAST_MAX_ROWS = SHADOW_MAX_ROWS  # BF16 expert rows computed in FP32 (``_swiglu``)


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


def choose_kernel(device: torch.device, dtype: torch.dtype, pairs: int, experts: int,
                  tokens: int | None = None, vendor: str | None = None, fused: bool = False) -> ExpertKernel:
    """The expert kernel for ``pairs`` (token, expert) pairs (shared experts included) of ``tokens``
    tokens over ``experts`` stacked experts, on a CPU of ``vendor`` (default: this one's); ``fused``:
    whether the fused kernel can run on these inputs (``StackedExperts.fused_ready``)."""
    vendor = CPU_VENDOR if vendor is None else vendor
    if device.type != "cpu":
        return "grouped_mm" if grouped_mm_supported(device, dtype) else "padded_bmm"
    rows_per_expert = pairs / experts
    if fused and rows_per_expert <= FUSED_MAX_ROWS_PER_EXPERT:
        return "fused"
    if rows_per_expert < LOOPED_MAX_ROWS_PER_EXPERT:  # BF16 on AMD: padded_bmm gathers the busy experts
        return "looped" if dtype == torch.float32 or vendor != "AuthenticAMD" else "padded_bmm"
    if tokens is not None and tokens <= DENSE_MAX_TOKENS.get(dtype, 0):
        return "dense"
    if rows_per_expert <= PADDED_MAX_ROWS_PER_EXPERT:
        return "padded_bmm"
    return "looped"  # oneDNN GEMMs per expert on its own rows beat the grouped kernel on CPU


def stores_input_major(weight: torch.Tensor) -> bool:
    """Whether stacked experts with weights like ``weight`` are stored input-major: FP32 where that
    pays for the GEMMs (``layers.input_major_pays``), and BF16 on CPU where the fused kernel runs
    (it reads input-major weights; see ``StackedExperts``)."""
    return input_major_pays(weight) or (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
                                        and cpu_kernels.enabled() and cpu_kernels.avx512_supported())


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


def _take_experts(w_EXY: torch.Tensor, index_A: torch.Tensor) -> torch.Tensor:
    """``w_EXY.index_select(0, index_A)`` in the storage order of ``w_EXY``'s last two dimensions."""
    if w_EXY.stride(-1) != 1:  # stored transposed: gather in that order, view back
        return w_EXY.mT.index_select(0, index_A).mT
    return w_EXY.index_select(0, index_A)


class StackedExperts:
    """All routed experts (then the merged shared experts) as ``w13_EHD`` [E, 2F, D] and
    ``w2_EDF`` [E, D, F]; the modules' parameters become views into these tensors. ``w13_EDH`` and
    ``w2_EFD`` are the same tensors transposed, the operands of ``x @ W``.

    Storage is *input-major* for FP32 on CPU (except AMD, where it was not measured): ``w13_EDH``
    and ``w2_EFD`` are the contiguous ones, so MKL multiplies without its transposed-operand kernel,
    which at a few rows per expert streams the weights at about 60% of the speed. On the Xeon (FP32,
    17 experts of the demo shapes, caches flushed between calls): the dense kernel at 16 tokens,
    gate/up 463 -> 230 us and down 203 -> 118 us; the padded bmm gate/up at 16 rows per expert
    429 -> 231 us; one expert's GEMMs at 1-512 rows within ±10%. In the engine (A/B in one process,
    with the lm_head's layout, ``layers.prefers_input_major``): FP32 batch 16 decode 1.11x, batch
    1 1.00x. BF16 (oneDNN) gained nothing from it at 16 tokens (1.01x) and lost at batch 1 (0.96x),
    but the fused kernel reads input-major weights, so BF16 experts are stored so where it runs
    (``stores_input_major``): BF16 ``generate`` at prompt 128, A/B in one process, 1.14x at batch
    16 and 1.25-1.8x at batch 1, and oneDNN's prefill kernels ran the same either way (128 and 2048
    tokens). CUDA keeps the output-major storage its grouped GEMM was run with."""

    def __init__(self, w13_EHD: torch.Tensor, w2_EDF: torch.Tensor, num_routed: int):
        self.w13_EHD, self.w13_EDH = w13_EHD, w13_EHD.mT
        self.w2_EDF, self.w2_EFD = w2_EDF, w2_EDF.mT
        self.num_routed = num_routed
        self.num_shared = w13_EHD.shape[0] - num_routed
        self.input_major = self.w13_EDH.is_contiguous()
        # per-expert views, made once: [2F, D], [D, F] and the down projection's operand [F, D]
        self._w13_E, self._w2_E, self._w2t_E = w13_EHD.unbind(0), w2_EDF.unbind(0), self.w2_EFD.unbind(0)

    def backs(self, experts: nn.ModuleList) -> bool:
        """Whether the experts' parameters are still views into these tensors (not re-homed by a cast)."""
        return (backs_all(self.w13_EHD, [w for e in experts for w in (e.gate_proj.weight, e.up_proj.weight)])
                and backs_all(self.w2_EDF, [e.down_proj.weight for e in experts]))

    @classmethod
    def from_modules(cls, experts: nn.ModuleList, shared: nn.Module | None = None,
                     input_major_storage: bool | None = None) -> StackedExperts:
        """Stack dense routed experts, plus ``shared`` when it has the routed experts' width;
        input-major (see the class) when ``input_major_storage`` (default: ``stores_input_major``)."""
        modules = list(experts)
        inner = modules[0].down_proj.weight.shape[1]
        if shared is not None and type(shared.gate_proj) is nn.Linear and shared.down_proj.weight.shape[1] == inner:
            modules.append(shared)
        if input_major_storage is None:
            input_major_storage = stores_input_major(modules[0].down_proj.weight)
        with torch.no_grad():
            w13 = torch.stack([torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in modules])  # [E, 2F, D]
            w2 = torch.stack([m.down_proj.weight for m in modules])  # [E, D, F]
            if input_major_storage:
                w13, w2 = input_major(w13), input_major(w2)
        for i, m in enumerate(modules):
            m.gate_proj.weight = nn.Parameter(w13[i, :inner], requires_grad=m.gate_proj.weight.requires_grad)
            m.up_proj.weight = nn.Parameter(w13[i, inner:], requires_grad=m.up_proj.weight.requires_grad)
            m.down_proj.weight = nn.Parameter(w2[i], requires_grad=m.down_proj.weight.requires_grad)
        return cls(w13, w2, len(experts))

    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                kernel: ExpertKernel | None = None) -> RoutedOutput:
        T = x_TD.shape[0]
        E = self.w13_EHD.shape[0]
        kernel = kernel or self.kernel(x_TD, topk_ids_TK.shape[1])
        if kernel == "fused":
            fused = cpu_kernels.fused_moe(x_TD, topk_ids_TK, topk_weights_TK, self.w13_EDH, self.w2_EFD,
                                          self.num_routed)
            if fused is None:
                raise RuntimeError("the fused expert kernel cannot run here (see StackedExperts.fused_ready)")
            return RoutedOutput(*fused)
        ids_TK, weights_TK = topk_ids_TK, topk_weights_TK.to(x_TD.dtype)
        if kernel == "dense":
            return self._dense(x_TD, ids_TK, weights_TK)
        if kernel == "looped":
            if T == 1 and not torch.is_grad_enabled():
                return self._one_token(x_TD, ids_TK, weights_TK)
            return self._looped(x_TD, ids_TK, weights_TK)
        # Padding every expert's run to the shared experts' T rows would multiply the padded
        # kernel's work: there the shared experts run as plain SwiGLUs on all tokens.
        shared_inline = self.num_shared and kernel == "grouped_mm"
        if shared_inline:  # every token also picks each shared expert, weight 1
            shared_ids = torch.arange(self.num_routed, E, device=x_TD.device)
            ids_TK = torch.cat([ids_TK, shared_ids.expand(T, -1)], dim=1)  # [T, K+shared]
            weights_TK = torch.cat([weights_TK, weights_TK.new_ones(T, self.num_shared)], dim=1)
        perm = permute(ids_TK, E)
        x_SD = x_TD[perm.token_S]  # [S, D] rows grouped by expert
        if kernel == "grouped_mm":
            y_SD = self._grouped(x_SD, perm.counts_E)
        else:
            y_SD = self._padded(x_SD, perm)
        y_SD = y_SD * weights_TK.flatten()[perm.order_S, None]
        y_TD = torch.zeros_like(x_TD).index_add_(0, perm.token_S, y_SD)
        if not shared_inline:
            self._add_shared(x_TD, y_TD)
        return RoutedOutput(y_TD, perm.counts_E[: self.num_routed])

    def kernel(self, x_TD: torch.Tensor, experts_per_token: int) -> ExpertKernel:
        """The kernel ``forward`` runs for ``x_TD`` with ``experts_per_token`` routed experts each."""
        T = x_TD.shape[0]
        return choose_kernel(x_TD.device, x_TD.dtype, T * (experts_per_token + self.num_shared), self.w13_EHD.shape[0],
                             T, fused=self.fused_ready(x_TD))

    def fused_ready(self, x_TD: torch.Tensor) -> bool:
        """Whether ``cpu_kernels.fused_moe`` can run these experts on ``x_TD``: input-major weights
        of its dtype, and ``cpu_kernels.avx512_ready`` (FP32 or BF16 CPU inference, non-empty, the
        kernels built and switched on, AVX-512)."""
        return self.input_major and x_TD.dtype == self.w13_EHD.dtype and cpu_kernels.avx512_ready(x_TD)

    def _dense(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> RoutedOutput:
        T, (E, H, D) = x_TD.shape[0], self.w13_EHD.shape
        coef_TE = x_TD.new_zeros(T, E)  # each token's weight for each stacked expert
        coef_TE[:, : self.num_routed].scatter_(1, ids_TK, weights_TK)
        coef_TE[:, self.num_routed:] = 1
        if self.input_major:  # [D, 2F] blocks, one per expert: a bmm over the batch broadcast to each
            h_ETH = torch.bmm(x_TD.expand(E, T, D), self.w13_EDH)
        else:  # one GEMM over every expert's rows
            h_ETH = fast_linear(x_TD, self.w13_EHD.view(E * H, D)).view(T, E, H).transpose(0, 1)
        a_ETF = swiglu(h_ETH, coef_TE.t())  # [E, T, F], each row times its routing weight
        y_TD = torch.bmm(a_ETF, self.w2_EFD).sum(0)  # [E, T, D] -> [T, D]
        return RoutedOutput(y_TD, torch.bincount(ids_TK.flatten(), minlength=self.num_routed))

    def _one_token(self, x_1D: torch.Tensor, ids_1K: torch.Tensor, weights_1K: torch.Tensor) -> RoutedOutput:
        """A single token (batch-1 decode), inference only: no permutation, its experts summed in
        expert order then the shared ones, the order the grouped path (and transformers) adds
        them in. Batch-1 decode is bound by the number of ops, so each expert is three GEMM-sized
        ops and two small ones: gate/up, SiLU·up, and the down projection fused with the routing
        weight and the running sum (``addmm``, the weight as a Python float: no gradient reaches
        the gate here). A few BF16 rows on CPU run in FP32 (``_upcasts``) and round once at the end."""
        ids, weights = ids_1K[0].tolist(), weights_1K[0].tolist()  # NOTE: syncs device->host
        upcast = self._upcasts(x_1D)
        x = x_1D.float() if upcast else x_1D
        y_1D = torch.zeros_like(x)
        experts = [(ids[k], weights[k]) for k in sorted(range(len(ids)), key=ids.__getitem__)]
        for expert, weight in experts + [(e, 1.0) for e in range(self.num_routed, len(self._w13_E))]:
            if upcast:
                a_1F, w2_DF = self._activation(x, expert, upcast)
                y_1D.addmm_(a_1F, w2_DF.t(), alpha=weight)
            else:  # the same ops, less bookkeeping (views made once, the activation and sum in place)
                y_1D.addmm_(swiglu(fast_linear(x, self._w13_E[expert])), self._w2t_E[expert], alpha=weight)
        return RoutedOutput(y_1D.to(x_1D.dtype), torch.bincount(ids_1K[0], minlength=self.num_routed))

    @staticmethod
    def _upcasts(x_nD: torch.Tensor) -> bool:
        """Whether these rows run in FP32 on upcast weights: a few BF16 rows on CPU, in inference. A
        BF16 GEMM of a few rows costs ~23 us whatever its size there (see ``layers``), the upcast
        and an FP32 GEMM less (BF16 batch-1 decode 1.24x on the Xeon)."""
        return (x_nD.dtype == torch.bfloat16 and x_nD.device.type == "cpu" and x_nD.shape[0] <= UPCAST_MAX_ROWS
                and not torch.is_grad_enabled())

    def _add_shared(self, x_TD: torch.Tensor, y_TD: torch.Tensor) -> None:
        """Add every shared expert on all tokens (weight 1) into ``y_TD`` in place, after the routed ones."""
        for expert in range(self.num_routed, self.w13_EHD.shape[0]):
            y_TD += self._swiglu(x_TD, expert)

    def _activation(self, x_nD: torch.Tensor, expert: int, upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's SiLU(gate)·up on rows [n, D] -> [n, F], and its down projection [D, F] to
        apply; both in FP32 when ``upcast`` (``x_nD`` already FP32 then, the weights upcast here)."""
        w13_HD, w2_DF = self._w13_E[expert], self._w2_E[expert]
        if upcast:
            w13_HD, w2_DF = w13_HD.float(), w2_DF.float()
        return swiglu(fast_linear(x_nD, w13_HD)), w2_DF

    def _swiglu(self, x_nD: torch.Tensor, expert: int) -> torch.Tensor:
        """One expert on its rows [n, D] -> [n, D] (in FP32 on upcast weights when ``_upcasts``)."""
        upcast = self._upcasts(x_nD)
        a_nF, w2_DF = self._activation(x_nD.float() if upcast else x_nD, expert, upcast)
        return fast_linear(a_nF, w2_DF).to(x_nD.dtype)

    def _grouped(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        grouped_mm = _grouped_mm_op()
        offsets_E = counts_E.cumsum(0, dtype=torch.int32)  # end row of each expert's run
        h_SH = grouped_mm(x_SD, self.w13_EDH, offs=offsets_E)  # [S, 2F]
        return grouped_mm(swiglu(h_SH), self.w2_EFD, offs=offsets_E)  # [S, D]

    def _looped(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> RoutedOutput:
        """One expert at a time on its own rows, gathered from and added back into [T, D]: no
        [T*K, D] copies of the batch (at a 2048-token FP32 prefill chunk, gathering, weighting
        and concatenating those took longer than the GEMMs). Experts are added in expert order,
        then the shared ones, as the grouped path (and transformers) adds them."""
        perm = permute(ids_TK, self.num_routed)
        weights_S = weights_TK.flatten()[perm.order_S]
        y_TD = torch.zeros_like(x_TD)
        start = 0
        for expert, n in enumerate(perm.counts_E.tolist()):  # NOTE: .tolist() syncs device->host
            if n:
                rows_n = perm.token_S[start:start + n]
                y_nD = self._swiglu(x_TD.index_select(0, rows_n), expert) * weights_S[start:start + n, None]
                y_TD.index_add_(0, rows_n, y_nD)
                start += n
        self._add_shared(x_TD, y_TD)
        return RoutedOutput(y_TD, perm.counts_E)

    def _padded(self, x_SD: torch.Tensor, perm: PermutedTokens) -> torch.Tensor:
        """Routed experts only (the shared ones run apart, see ``forward``). When at most half of
        them have rows (a batch-1 step), only those experts' weights are gathered and multiplied."""
        E = self.num_routed
        counts_E = perm.counts_E[:E]
        w13_EDH, w2_EFD, expert_S = self.w13_EDH[:E], self.w2_EFD[:E], perm.expert_S
        active_A = counts_E.nonzero().squeeze(1)  # NOTE: syncs device->host
        if 2 * active_A.numel() <= E:
            w13_EDH, w2_EFD = _take_experts(w13_EDH, active_A), _take_experts(w2_EFD, active_A)
            slot_E = torch.zeros(E, dtype=torch.long, device=x_SD.device)
            slot_E[active_A] = torch.arange(active_A.numel(), device=x_SD.device)
            expert_S, counts_E = slot_E[expert_S], counts_E[active_A]
        capacity = int(counts_E.max())  # NOTE: syncs device->host
        starts_E = counts_E.cumsum(0) - counts_E
        rank_S = torch.arange(x_SD.shape[0], device=x_SD.device) - starts_E[expert_S]  # row within its expert
        buf_ECD = x_SD.new_zeros(counts_E.numel(), capacity, x_SD.shape[1])
        buf_ECD[expert_S, rank_S] = x_SD
        h_ECH = torch.bmm(buf_ECD, w13_EDH)  # [E, C, 2F]
        y_ECD = torch.bmm(swiglu(h_ECH), w2_EFD)  # [E, C, D]
        return y_ECD[expert_S, rank_S]  # [S, D]
