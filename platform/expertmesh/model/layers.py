"""Small building blocks shared by attention and MoE: RMSNorm, the SwiGLU MLP, linear factories.

A model is built with a ``LinearFactory``: ``dense_linear`` gives ``nn.Linear`` (FP32/BF16)
and ``fp8_linear`` gives ``FP8Linear`` (e4m3 weights with 128×128 block scales). Parameter
names match Hugging Face DeepSeek-V3 checkpoints either way (``weight``, ``weight_scale_inv``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from expertmesh.model import cpu_kernels
from expertmesh.model.cpu_kernels import fused_rms_norm, fused_silu_mul

LinearFactory = Callable[[int, int], nn.Module]


def dense_linear(in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=False)


def fp8_linear(in_features: int, out_features: int) -> nn.Module:
    from expertmesh.model.fp8 import FP8Linear

    return FP8Linear(in_features, out_features, bias=False)


def linear_factory(quantization: str | None) -> LinearFactory:
    if quantization in (None, "none", "bf16", "fp32"):
        return dense_linear
    if quantization == "fp8":
        return fp8_linear
    raise ValueError(f"quantization {quantization!r} is not supported (supported: None, 'fp8')")


def dense_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight of a dense or FP8 linear layer as a dense ``[out, in]`` tensor."""
    if hasattr(linear, "weight_scale_inv"):
        return linear.dequantized_weight(dtype)
    return linear.weight.to(dtype)


def cpuinfo_field(name: str) -> str:
    """A field of the first CPU in /proc/cpuinfo (e.g. "vendor_id", "model name"); "" elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


CPU_VENDOR = cpuinfo_field("vendor_id")  # "GenuineIntel", "AuthenticAMD", "" when unknown

# Inference GEMMs on CPU (no autograd): which kernel ``fast_linear`` runs, measured in the engine
# on two 2-core AVX-512 machines, an AMD EPYC and an Intel Xeon with AMX. All kernels compute the
# same dot products (FP32 accumulation); only the kernel and its summation order differ.
#
# FP32 on AMD ("AuthenticAMD"; torch sends FP32 GEMMs to MKL, whose code path there runs at about
# half the speed of oneDNN's AVX-512 kernels):
# - up to SPLIT_MAX_ROWS rows (small decode batches) over a weight of at least SPLIT_MIN_WEIGHT
#   elements: "split_bmm", one bmm over SPLIT_BLOCKS row blocks of the weight. MKL runs a GEMM of a
#   few rows on one core, streaming the weight at ~10 GB/s; the bmm uses every thread (lm_head at
#   1 row 0.93 -> 0.21 ms). FP32 batch 1 decode ran 16% slower with oneDNN here instead;
# - otherwise at least ONEDNN_MIN_MACS multiply-adds, or a weight of at least ONEDNN_MIN_WEIGHT
#   elements: "onednn", oneDNN's linear (the op inductor lowers linear layers to): a 2048x256 ->
#   1536 prefill GEMM 11.6 -> 5.2 ms, lm_head at 16 rows 957 -> 484 us; FP32 batch 16 decode ran
#   1.09-1.13x faster than with the split bmm;
# - smaller products: "mkl" (call overhead ~3 us against oneDNN's ~14 us).
# FP32 on Intel and anything else: BLOCKED_MIN_ROWS to BLOCKED_MAX_ROWS rows on AVX-512,
# "blocked": the ``blocked_linear`` kernel over a copy of the weight stored in strips of 32 output
# columns (``blocked_weight``), which it streams once per 12 rows; MKL re-packs an [out, in] weight
# on every call. Measured on the Xeon with the caches flushed between calls, against MKL's better
# layout: lm_head 8192x256 at 16 rows 363 -> 281 us, at 64 rows 1173 -> 979 us; 1536x256 at 16 rows
# 143 -> 101 us; 256x768 109 -> 60 us; 208x256 46 -> 35 us. In the engine at 16 rows: lm_head
# 670 -> 286 us, 256x768 87 -> 41 us, 208x256 35 -> 24 us; FP32 batch 16 decode 1.16x. At 128 rows
# it loses, and at 1 row MKL's matrix-vector kernel ran as fast in the engine (208 vs 207 us,
# small weights 3 us slower). Otherwise "mkl" (torch's own dispatch): on the Xeon MKL was as
# fast as or faster than oneDNN everywhere (lm_head at 1 row 164 vs 204 us, 2048x256 -> 1536 4.8 vs
# 5.3 ms) and the split bmm was 2-3x slower; the AMD rules cost the engine 1.31x at FP32 batch 1 and
# 1.12x at batch 16 there. The blocked kernel was not measured on AMD, so AMD keeps its rules.
#
# BF16 (any CPU): "fp32_shadow" for up to SHADOW_MAX_ROWS rows over a weight of at most
# SHADOW_MAX_WEIGHT elements, or up to SHADOW_SMALL_MAX_ROWS rows over one of at most
# SHADOW_SMALL_MAX_WEIGHT: the GEMM runs in FP32 on a cached FP32 copy of the weight and the
# result is rounded to BF16. A BF16 GEMM of a few rows costs ~23 us on the Xeon whatever its size
# (oneDNN's AMX set-up) against ~5 us in FP32 (attention projections at 1 row: 26 -> 8.4 us,
# 256x768 at 1 row 33 -> 17 us; BF16 batch 1 decode 1.10x); at 16 rows only the attention-sized
# weights still gain (BF16 batch 16 decode 1.05x, three A/B runs 1.02-1.09x); on the EPYC it saved
# ~10 us a call. Larger BF16 GEMMs keep oneDNN (AMX: a 2048x256 -> 1536 GEMM takes 0.73 ms
# against 4.8 ms in FP32). The copies cost 2x the BF16 bytes of those small weights only (none of
# DeepSeek-V3's full-size projections qualify).
# On AVX-512 other than AMD's (not measured there), "blocked" comes first: up to
# BLOCKED_BF16_MAX_ROWS rows over any weight, up to BLOCKED_BF16_SMALL_MAX_ROWS over one of at most
# BLOCKED_BF16_SMALL_MAX_WEIGHT elements. It reads the BF16 weight (its blocked copy: the same
# bytes again) and sums in FP32, as the FP32 copy's GEMM does. Caches flushed: lm_head at 1 row
# 355 -> 145 us, at 4 rows 268 -> 148 us; 256x768 at 16 rows 140 -> 99 us; 208x256 at 16 rows
# 116 -> 87 us. The lm_head at 16 rows keeps oneDNN (AMX, 267 against 382 us). BF16 decode in the
# engine: batch 1 1.20x, batch 16 1.08x.
#
# Weight layout (FP32 on Intel and anything but AMD): a weight at least INPUT_MAJOR_MIN_RATIO times
# wider than deep (the lm_head, a dense MLP's fused gate/up; the stacked experts in
# ``grouped_experts``) is stored input-major, ``[in, out]`` contiguous, its ``[out, in]`` parameter a
# transposed view: MKL then runs ``x @ W`` without the transposed-operand kernel, which at a few
# rows streams the weight at about 60% of the speed. Measured on the Xeon with the caches flushed
# between calls: lm_head 8192x256 at 16 rows 513 -> 337 us, at 1 row 210 -> 168 us; 1536x256 at
# 16 rows 128 -> 75 us, at 1 row 46 -> 41 us; prefill-sized GEMMs (2048 rows) the same either
# way. Narrower weights lost at 1 row (256x768 31 -> 38 us, 208x256 23 -> 28 us) and stay
# output-major. BF16 GEMMs (oneDNN) were the same either way; AMD runs FP32 on oneDNN (above) and
# was not measured with this layout.
SPLIT_BLOCKS = 4
SPLIT_MAX_ROWS = 8
SPLIT_MIN_WEIGHT = 1 << 16
ONEDNN_MIN_MACS = 1 << 20
ONEDNN_MIN_WEIGHT = 1 << 18
SHADOW_MAX_ROWS = 4
SHADOW_MAX_WEIGHT = 1 << 18
SHADOW_SMALL_MAX_ROWS = 16
SHADOW_SMALL_MAX_WEIGHT = 1 << 16
INPUT_MAJOR_MIN_RATIO = 4
ONEDNN_ROW_QUANTUM = 64
BLOCKED_MIN_ROWS = 2
BLOCKED_MAX_ROWS = 64
BLOCKED_BF16_MAX_ROWS = 4
BLOCKED_BF16_SMALL_MAX_ROWS = 16
BLOCKED_BF16_SMALL_MAX_WEIGHT = 1 << 18
BLOCK_COLUMNS = 32  # the strip width blocked_linear reads
_onednn_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None

LinearKernel = Literal["mkl", "split_bmm", "onednn", "fp32_shadow", "blocked"]


def choose_linear_kernel(dtype: torch.dtype, rows: int, out_features: int, in_features: int,
                         vendor: str | None = None, threads: int | None = None,
                         avx512: bool | None = None) -> LinearKernel:
    """The CPU inference kernel for ``rows`` rows through an ``[out_features, in_features]`` weight
    (see the measurements above) on a CPU of ``vendor`` (default: this one's) where the AVX-512
    kernels run or not (``avx512``, default: whether they do here, switched on); "mkl" means
    torch's own ``F.linear``."""
    vendor = CPU_VENDOR if vendor is None else vendor
    weight = out_features * in_features
    if dtype not in (torch.float32, torch.bfloat16) or rows <= 0:
        return "mkl"
    if avx512 is None:
        avx512 = cpu_kernels.enabled() and cpu_kernels.avx512_supported()
    if dtype == torch.bfloat16:
        if avx512 and vendor != "AuthenticAMD" and (rows <= BLOCKED_BF16_MAX_ROWS
                       or (rows <= BLOCKED_BF16_SMALL_MAX_ROWS and weight <= BLOCKED_BF16_SMALL_MAX_WEIGHT)):
            return "blocked"
        shadow = ((rows <= SHADOW_MAX_ROWS and weight <= SHADOW_MAX_WEIGHT)
                  or (rows <= SHADOW_SMALL_MAX_ROWS and weight <= SHADOW_SMALL_MAX_WEIGHT))
        return "fp32_shadow" if shadow else "mkl"
    if vendor != "AuthenticAMD":
        return "blocked" if avx512 and BLOCKED_MIN_ROWS <= rows <= BLOCKED_MAX_ROWS else "mkl"
    threads = torch.get_num_threads() if threads is None else threads
    if 0 < rows <= SPLIT_MAX_ROWS and weight >= SPLIT_MIN_WEIGHT and out_features % SPLIT_BLOCKS == 0 and threads > 1:
        return "split_bmm"
    if _onednn_linear is not None and (rows * weight >= ONEDNN_MIN_MACS or weight >= ONEDNN_MIN_WEIGHT):
        return "onednn"
    return "mkl"


def input_major_pays(weight: torch.Tensor, vendor: str | None = None) -> bool:
    """Where input-major storage was measured to pay (see above): FP32 on a CPU other than AMD's."""
    vendor = CPU_VENDOR if vendor is None else vendor
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and vendor != "AuthenticAMD"


def prefers_input_major(weight_OI: torch.Tensor, vendor: str | None = None) -> bool:
    """Whether inference GEMMs through this ``[out, in]`` weight run faster with it stored
    input-major: where that pays, for weights at least ``INPUT_MAJOR_MIN_RATIO`` times wider than deep."""
    out_features, in_features = weight_OI.shape
    return input_major_pays(weight_OI, vendor) and out_features >= INPUT_MAJOR_MIN_RATIO * in_features


def input_major(t: torch.Tensor) -> torch.Tensor:
    """The same values with the last two dimensions stored the other way round: a view whose
    transposed last two dimensions are contiguous (``input_major(w).mT.is_contiguous()``)."""
    return t.mT.contiguous().mT


def store_input_major(linear: nn.Module) -> bool:
    """Re-home a plain ``nn.Linear``'s weight input-major when ``prefers_input_major`` (values,
    name and state dict unchanged; the parameter becomes a transposed view). Whether it did."""
    if type(linear) is not nn.Linear or not prefers_input_major(linear.weight) or linear.weight.mT.is_contiguous():
        return False
    with torch.no_grad():
        linear.weight = nn.Parameter(input_major(linear.weight), requires_grad=linear.weight.requires_grad)
    return True


# What is kept per weight tensor: copies made from it (kind -> (its version, the copy)) and the
# "held" mark (hold_weight). Keyed by id() with a weak reference that drops the entry with the
# tensor: a lookup is one dict access (a WeakTensorKeyDictionary took ~5 us a GEMM).
_per_weight: dict[int, tuple[weakref.ref, dict]] = {}


def _weight_entry(weight: torch.Tensor, create: bool = True) -> dict | None:
    key = id(weight)
    entry = _per_weight.get(key)
    if entry is not None and entry[0]() is weight:
        return entry[1]
    if not create:
        return None

    def drop(ref: weakref.ref, key: int = key) -> None:
        if _per_weight.get(key, (None,))[0] is ref:
            del _per_weight[key]

    entry = _per_weight[key] = (weakref.ref(weight, drop), {})
    return entry[1]


def _weight_copy(weight: torch.Tensor, kind: str, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``make(weight)``, made once per ``kind`` and remade when the weight changes in place (its
    version counter); dropped with the weight."""
    try:
        version = weight._version
    except RuntimeError:  # inference tensors have no version counter and cannot change
        version = -1
    copies = _weight_entry(weight)
    cached = copies.get(kind)
    if cached is None or cached[0] != version:
        with torch.no_grad():
            cached = copies[kind] = (version, make(weight))
    return cached[1]


def fp32_shadow(weight: torch.Tensor) -> torch.Tensor:
    """An FP32 copy of a weight (``_weight_copy``)."""
    return _weight_copy(weight, "fp32", torch.Tensor.float)


def block_columns(weight_OI: torch.Tensor) -> torch.Tensor:
    """``weight_OI`` [out, in] as ``blocked_linear`` reads it: strips of ``BLOCK_COLUMNS`` output
    columns, ``[ceil(out / 32), in, 32]`` contiguous, zeros past ``out``."""
    out_features, in_features = weight_OI.shape
    padded = F.pad(weight_OI, (0, 0, 0, -out_features % BLOCK_COLUMNS))
    return padded.view(-1, BLOCK_COLUMNS, in_features).transpose(1, 2).contiguous()


def blocked_weight(weight_OI: torch.Tensor) -> torch.Tensor:
    """The column-blocked copy of a weight (``block_columns``, ``_weight_copy``): the same bytes again."""
    return _weight_copy(weight_OI, "blocked", block_columns)


def hold_weight(weight: torch.Tensor) -> torch.Tensor:
    """Mark a weight view that a module keeps (e.g. a fused, input-major weight) as one that
    outlives each call, so copies cached on it are used (``_outlives_call``); returns it."""
    _weight_entry(weight)["held"] = True
    return weight


def _outlives_call(weight: torch.Tensor) -> bool:
    """A parameter, a tensor of its own or a held view, not a view made for the call: a copy
    cached on it is found again next time."""
    return (isinstance(weight, nn.Parameter) or weight._base is None
            or "held" in (_weight_entry(weight, create=False) or ()))


def _copy_operand(weight_OI: torch.Tensor, kernel: LinearKernel,
                  dtype: torch.dtype) -> tuple[torch.Tensor, bool] | None:
    """The cached copy ``kernel`` multiplies ``dtype`` rows by, ``(copy, upcast)``: the FP32 shadow of
    a non-FP32 weight (``upcast``: x in FP32, the result rounded back) or the blocked copy; None when
    the kernel takes the weight itself, or when the weight does not outlive the call."""
    if kernel == "fp32_shadow" and dtype != torch.float32 and _outlives_call(weight_OI):
        return fp32_shadow(weight_OI), True
    if kernel == "blocked" and _outlives_call(weight_OI):
        return blocked_weight(weight_OI), False
    return None


def fast_linear(x: torch.Tensor, weight_OI: torch.Tensor, kernel: LinearKernel | None = None) -> torch.Tensor:
    """``F.linear(x, weight_OI)`` (no bias) through the fastest CPU kernel for its shape
    (``choose_linear_kernel``; ``kernel`` forces one). Only for inference on CPU: with autograd
    on, on other devices or mixed dtypes it is plain ``F.linear``. The FP32 shadow needs a
    weight that outlives the call, as does the blocked kernel (``_outlives_call``)."""
    if x.device.type != "cpu" or x.dtype != weight_OI.dtype or torch.is_grad_enabled():
        return F.linear(x, weight_OI)
    out_features, in_features = weight_OI.shape
    rows = x.numel() // in_features if in_features else 0
    kernel = kernel or choose_linear_kernel(x.dtype, rows, out_features, in_features)
    if (copy := _copy_operand(weight_OI, kernel, x.dtype)) is not None:
        operand, upcast = copy
        if upcast:
            return F.linear(x.float(), operand).to(x.dtype)
        if (y := cpu_kernels.fused_linear(x, operand, out_features)) is not None:
            return y
    if kernel == "split_bmm" and weight_OI.is_contiguous() and out_features % SPLIT_BLOCKS == 0 and rows:
        blocks_PNI = weight_OI.view(SPLIT_BLOCKS, out_features // SPLIT_BLOCKS, in_features)
        y_PNM = torch.bmm(blocks_PNI, x.reshape(rows, in_features).t().expand(SPLIT_BLOCKS, in_features, rows))
        return y_PNM.reshape(out_features, rows).t().reshape(*x.shape[:-1], out_features)
    if kernel == "onednn" and _onednn_linear is not None:
        return _onednn_linear(x, weight_OI, None, "none", [], "")
    if x.dtype == torch.bfloat16 and rows > ONEDNN_ROW_QUANTUM and rows % ONEDNN_ROW_QUANTUM:
        # oneDNN builds (JIT-compiles) a kernel for every new row count, ~1-3 ms each, and keeps
        # only the last 1024: prefill's per-expert row counts are all different. Rounded up, rows
        # take a few dozen shapes; the padding rows are zeros and are dropped.
        x_MI = x.reshape(rows, in_features)
        padded = F.pad(x_MI, (0, 0, 0, -rows % ONEDNN_ROW_QUANTUM))
        return F.linear(padded, weight_OI)[:rows].view(*x.shape[:-1], out_features)
    return F.linear(x, weight_OI)


def unhooked(module: nn.Module) -> bool:
    """Nothing hooks calls of ``module`` (e.g. DeepSpeed ZeRO-3 gathers weights in hooks), so code
    may run its computation without calling it."""
    return not (module._forward_pre_hooks or module._forward_hooks or _global_forward_pre_hooks
                or _global_forward_hooks)


def _plain_linear(linear: nn.Module) -> bool:
    """A dense ``nn.Linear`` without bias, called with autograd off and nothing hooking the call:
    ``linear_forward`` may run its GEMM itself."""
    return type(linear) is nn.Linear and linear.bias is None and not torch.is_grad_enabled() and unhooked(linear)


def weight_operand(weight_OI: torch.Tensor, rows: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, bool] | None:
    """What ``fast_linear(x, weight_OI)`` multiplies ``rows`` rows of ``dtype`` on ``device`` by, for
    C++ code that runs the same GEMM: ``(weight, upcast)`` where it is ``F.linear`` (``upcast``: on
    the FP32 shadow of the weight, x in FP32, the result rounded back), ``(blocked weight, False)``
    where it is ``blocked_linear`` (a 3-D operand); None where another kernel would run."""
    if device.type != "cpu" or dtype != weight_OI.dtype or torch.is_grad_enabled():
        return None
    out_features, in_features = weight_OI.shape
    kernel = choose_linear_kernel(dtype, rows, out_features, in_features)
    if (copy := _copy_operand(weight_OI, kernel, dtype)) is not None:
        return copy
    # what fast_linear runs otherwise for these kernels: F.linear on the weight itself
    return (weight_OI, False) if kernel in ("mkl", "fp32_shadow", "blocked") else None


def gemm_operand(linear: nn.Module, rows: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, bool] | None:
    """``weight_operand`` of ``linear_forward(linear, x)``: None also where a hook would run."""
    return weight_operand(linear.weight, rows, dtype, device) if _plain_linear(linear) else None


def linear_forward(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)``, with ``fast_linear`` for a plain dense ``nn.Linear`` (``_plain_linear``)."""
    if _plain_linear(linear):
        return fast_linear(x, linear.weight)
    return linear(x)


def backs_all(fused: torch.Tensor | None, weights: list[torch.Tensor]) -> bool:
    """Whether ``fused`` still holds these weights (a later cast or load may have re-homed them)."""
    if fused is None:
        return False
    ptr = fused.untyped_storage().data_ptr()
    return all(w.dtype == fused.dtype and w.untyped_storage().data_ptr() == ptr for w in weights)


def fuse_linear_weights(linears: list[nn.Module]) -> torch.Tensor | None:
    """Re-home the weights of dense linears that read the same input in one ``[sum(out), in]``
    tensor (stored input-major when ``prefers_input_major``), so one GEMM computes all their
    outputs. Each ``weight`` becomes a view into it (checkpoints keep their layout; later
    in-place loads stay visible). None when any of them
    is not a plain dense ``nn.Linear`` (FP8 weights keep their own kernels)."""
    if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
        return None
    with torch.no_grad():
        fused_OI = torch.cat([m.weight for m in linears])  # [sum(out), in]
        if prefers_input_major(fused_OI):
            fused_OI = input_major(fused_OI)
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight = nn.Parameter(fused_OI[start:start + rows], requires_grad=m.weight.requires_grad)
        start += rows
    return hold_weight(fused_OI)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_rms_norm(x, self.weight, self.eps)  # FP32/BF16 CPU inference: one C++ pass
        if fused is not None:
            return fused
        # F.rms_norm is bit-identical in FP32 to x * rsqrt(mean(x^2) + eps) (seven kernels on CPU)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # other dtypes: normalise in FP32, round to the input dtype, then scale (as DeepSeek/HF do)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def swiglu(h: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(gate) * up of ``h`` [..., 2F] (gate columns, then up) -> [..., F], times ``scale``
    [...] per row when given; one fused pass in CPU inference (``cpu_kernels``)."""
    fused = fused_silu_mul(h, scale)
    if fused is not None:
        return fused
    inner = h.shape[-1] // 2
    out = F.silu(h[..., :inner]) * h[..., inner:]
    return out if scale is None else out * scale[..., None]


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers, each routed expert and the shared experts."""

    def __init__(self, dim: int, inter_dim: int, linear: LinearFactory = dense_linear):
        super().__init__()
        self.gate_proj = linear(dim, inter_dim)
        self.up_proj = linear(dim, inter_dim)
        self.down_proj = linear(inter_dim, dim)
        self._gate_up_HD: torch.Tensor | None = None  # [2*inter, dim] once fuse_gate_up() ran

    def fuse_gate_up(self) -> bool:
        """Compute gate and up projections with one GEMM from now on (dense weights only)."""
        if not backs_all(self._gate_up_HD, [self.gate_proj.weight, self.up_proj.weight]):
            self._gate_up_HD = fuse_linear_weights([self.gate_proj, self.up_proj])
        return self._gate_up_HD is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_up_HD is not None and backs_all(self._gate_up_HD, [self.gate_proj.weight]):  # not re-homed
            return linear_forward(self.down_proj, swiglu(fast_linear(x, self._gate_up_HD)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
