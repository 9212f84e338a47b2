"""Fused CPU kernels for inference, compiled from C++ on first use (as DeepSpeed builds its ops).

On CPU a decode step is bound by the number of ATen kernels it launches (each costs 3-15 µs
alone and 2-5x that right after a large GEMM has flushed the caches) and by how the expert
weights are streamed. Here, one C++ call each, in FP32 and BF16 inference (sources in csrc/:
elementwise.cpp, linear.cpp, moe.cpp, mla.cpp, sampling.cpp, with common.h and the AVX-512 helpers
simd.h):

  rms_norm      RMSNorm (seven eager kernels); agrees to rounding (another summation order).
  rope          RoPE (eight); the eager values bit for bit.
  silu_mul      SwiGLU's SiLU(gate) * up (two or three); BF16 bit for bit, FP32 to rounding
                (vectorised on AVX-512).
  moe_route     the gate's group-limited top-k from its FP32 sigmoid scores (about twelve).
  moe_experts   every routed and shared expert of a decode batch (AVX-512): ``fused_moe``;
                ``moe_layer`` runs the gate, the routing and the experts in one call: ``fused_moe_layer``.
  mla_decode_layer  a decode step's attention half of a layer, input RMSNorm to o_proj, cache
                write included, the cache read in place on AVX-512: ``fused_mla_decode``.
  argmax_rows   greedy sampling's first maximum per row (AVX-512).
  blocked_linear  a linear layer of a few rows over a column-blocked copy of its weight (AVX-512):
                ``fused_linear``, chosen by ``layers.fast_linear``.

The AVX-512 kernels are compiled for that instruction set whatever the build machine (a
``#pragma GCC target`` region) and run only where ``avx512_supported()`` finds it at run time.
Measurements are with the functions that use them (``grouped_experts``, ``mla``, the README).

Built as one translation unit with ``torch.utils.cpp_extension.load_inline`` (g++, ``-fopenmp`` so that ATen's inline
``parallel_for`` uses torch's threads; cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``; ``make venv`` builds them once, ~40 s, later loads take ~0.1 s). A
process killed mid-build leaves no lock that stalls the next one (``_build_lock``).
Without a compiler, or with ``EXPERTMESH_CPU_KERNELS=0``, the ``fused_*`` functions return None
and callers keep their eager path; training (autograd) and CUDA always do.

    python -c "from expertmesh.model import cpu_kernels; print(cpu_kernels.status())"   # build or load
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

ENV_SWITCH = "EXPERTMESH_CPU_KERNELS"
_DTYPES = (torch.float32, torch.bfloat16)

# The C++ sources (csrc/), joined in this order into one translation unit: common.h and simd.h
# hold what the others share.
_SOURCE_FILES = ("common.h", "simd.h", "elementwise.cpp", "linear.cpp", "moe.cpp", "mla.cpp", "sampling.cpp")


@functools.cache
def _source() -> str:
    """The translation unit: the sources, then the Python bindings of ``_FUNCTIONS``. Each binding
    releases the GIL while its kernel runs (they touch no Python object), as torch's own ops do:
    the engine steps in a worker thread, and a serving replica's event loop must keep answering
    (queue probes, streams, health checks) while a decode step runs."""
    csrc = Path(__file__).with_name("csrc")
    bindings = "".join(f'  m.def("{f}", &{f}, pybind11::call_guard<pybind11::gil_scoped_release>());\n'
                       for f in _FUNCTIONS)
    return "\n".join(f"// ---- {name}\n" + (csrc / name).read_text() for name in _SOURCE_FILES) + (
        f"\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {{\n{bindings}}}\n")


# The scalar kernel's exp is std::exp, ATen's is vectorised: past ~2K outputs the two eager
# kernels win (Xeon, hot: 192 outputs 1.6 vs 5.5 us, 1536 6.0 vs 6.8, 3072 10.7 vs 7.8, the
# 17-expert dense kernel's 52K 174 vs 27). Batch-1 experts and small dense MLPs fit. FP32 on
# AVX-512 runs the vectorised kernel (act::silu_mul, moe::exp) at any size instead: [600, 384]
# 74 -> 52 us, [2048, 1536] 1240 -> 653 us against the eager pair.
SILU_MUL_MAX_OUTPUTS = 2048

_FUNCTIONS = ("rms_norm", "rope", "silu_mul", "mla_decode_layer", "fp8_to_float", "argmax_rows", "moe_route",
              "moe_experts", "moe_layer", "blocked_linear", "avx512_supported")
# -fopenmp: ATen's parallel_for is inline OpenMP in its headers (without the flag it runs on one
# thread); the symbols resolve to the libgomp torch has loaded, no second OpenMP runtime is linked.
_CFLAGS = ("-O3", "-fopenmp")


def _build_name() -> str:
    """The extension's name, unique to this source (bindings included) and these flags: checkouts
    with other kernel sources (another version, a branch) keep their own builds in the shared cache
    instead of rebuilding over each other."""
    digest = hashlib.sha256("\0".join([_source(), *_CFLAGS, torch.__version__, sys.version]).encode()).hexdigest()
    return f"expertmesh_cpu_kernels_{digest[:12]}"


def _build_directory(name: str) -> str:
    """``$TORCH_EXTENSIONS_DIR/<name>``, by default under ``~/.cache/torch_extensions`` (the name
    holds the torch and Python versions, so one root serves every environment)."""
    from torch.utils.cpp_extension import get_default_build_root

    path = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root(), name)
    os.makedirs(path, exist_ok=True)
    return path


@contextlib.contextmanager
def _build_lock(build_directory: str):
    """One process at a time builds or loads, by an ``flock`` that the OS drops when its holder
    dies. Torch's own lock is a file (``lock``) that a process killed mid-build leaves behind, and
    every later load (a serving replica, a shard actor) would then wait on it forever. Whoever
    holds ours may remove it: its maker held ours too, so it is gone."""
    with open(os.path.join(build_directory, "expertmesh.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(build_directory, "lock"))
                log.warning("removed a build lock left by a process that died mid-build in %s", build_directory)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.cache
def enabled() -> bool:
    """Whether the kernels may be used at all (``EXPERTMESH_CPU_KERNELS=0`` turns them off). The
    variable is read once per process (a decode step asks ~60 times); ``enabled.cache_clear()``
    reads it again."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled kernels, built (or loaded from the cache) on first call; None when they cannot
    be built here (no compiler, a failed build: logged once). Callers check :func:`enabled` first."""
    try:
        from torch.utils.cpp_extension import load_inline

        name = _build_name()
        directory = _build_directory(name)
        with _build_lock(directory):
            return load_inline(name, cpp_sources=_source(), extra_cflags=list(_CFLAGS), build_directory=directory,
                               verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the eager path"
        log.warning("expertmesh CPU kernels unavailable, using eager PyTorch: %s", str(exc).splitlines()[0])
        return None


def _kernels_for(x: torch.Tensor) -> ModuleType | None:
    """The kernels, where they apply to ``x`` at all: a non-empty FP32 or BF16 CPU tensor with
    autograd off (training needs the eager graph), switched on, and built here; else None."""
    if x.dtype not in _DTYPES or x.device.type != "cpu" or not x.numel() or torch.is_grad_enabled() or not enabled():
        return None
    return kernels()


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The fused RMSNorm of an FP32 or BF16 CPU input with a weight of its dtype, in inference; else
    None (the caller runs its eager form): other devices, dtypes and mixed dtypes keep theirs."""
    if weight.dtype != x.dtype or x.shape[-1] != weight.shape[0] or (k := _kernels_for(x)) is None:
        return None
    return k.rms_norm(x, weight, eps)


def fused_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor | None:
    """RoPE of ``x`` [B, S, H, R] or [B, S, R] by cos/sin [B, S, R/2] of its dtype in one pass (FP32
    or BF16 CPU inference), else None for the caller's eager form; same values as the eager ops."""
    if (cos.dtype != x.dtype or sin.dtype != x.dtype or cos.shape[:-1] != x.shape[:cos.dim() - 1]
            or (k := _kernels_for(x)) is None):
        return None
    rows = cos.shape[:-1].numel()
    out = k.rope(x.reshape(rows, -1, x.shape[-1]), cos.reshape(rows, -1), sin.reshape(rows, -1), interleave)
    return out.view(x.shape)


def fused_silu_mul(h: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """SiLU(gate) * up of ``h`` [..., 2F] -> [..., F] (times ``scale`` [...] per row when given) in
    one pass (CPU inference, FP32 or BF16, up to ``SILU_MUL_MAX_OUTPUTS`` outputs but FP32 on
    AVX-512 at any size), else None for the caller's eager form."""
    if ((h.numel() > 2 * SILU_MUL_MAX_OUTPUTS and not (h.dtype == torch.float32 and _avx512_supported()))
            or (scale is not None and (scale.dtype != h.dtype or scale.shape != h.shape[:-1]))
            or (k := _kernels_for(h)) is None):
        return None
    rows = h.shape[:-1].numel()
    out = k.silu_mul(h.reshape(rows, h.shape[-1]), None if scale is None else scale.reshape(rows))
    return out.view(*h.shape[:-1], h.shape[-1] // 2)


def fused_mla_decode(x_TD: torch.Tensor, in_norm_weight: torch.Tensor, in_eps: float,
                     in_proj: tuple[torch.Tensor, bool], in_features_out: int, o_proj: tuple[torch.Tensor, bool],
                     q_a_norm_weight: torch.Tensor | None, q_a_eps: float, q_b: tuple[torch.Tensor, bool] | None,
                     kv_norm_weight: torch.Tensor, kv_eps: float, cos_TR: torch.Tensor, sin_TR: torch.Tensor,
                     interleave: bool, entries_SW: torch.Tensor, slots_T: torch.Tensor, w_uk: torch.Tensor,
                     w_uv: torch.Tensor, blocks_TN: torch.Tensor, lengths_T: torch.Tensor, keys: int,
                     bias_T1K: torch.Tensor | None, scales_SN: torch.Tensor | None, tiles_N2: torch.Tensor | None,
                     block_size: int, heads: int, nope_dim: int, rope_dim: int, v_dim: int,
                     softmax_scale: float) -> torch.Tensor | None:
    """The attention half of one layer in a decode step, in one call (see ``MLA.decode_fused``,
    which resolves the arguments): the input RMSNorm of the residual rows ``x_TD``, the fused input
    projection, MLA with the new entries written to ``entries_SW`` (FP8 codes and ``scales_SN`` per
    tile of ``tiles_N2`` when those are given), and ``o_proj``: [T, D] in x's dtype, before the
    residual add. GEMM operands are ``layers.weight_operand``'s ``(weight, upcast)``. None where the
    kernels do not run (the caller's Python steps then)."""
    if ((k := _kernels_for(x_TD)) is None or not entries_SW.is_contiguous()
            or (scales_SN is not None and not _avx512_supported())):
        return None
    q_b_weight, q_b_upcast = q_b if q_b is not None else (None, False)
    return k.mla_decode_layer(x_TD, in_norm_weight, in_eps, *in_proj, in_features_out, *o_proj, q_a_norm_weight,
                              q_a_eps, q_b_weight, q_b_upcast, kv_norm_weight, kv_eps, cos_TR, sin_TR, interleave,
                              entries_SW, slots_T, w_uk, w_uv, blocks_TN, lengths_T, keys, bias_T1K, scales_SN,
                              tiles_N2, block_size, heads, nope_dim, rope_dim, v_dim, softmax_scale)


def fused_moe_route(scores_TE: torch.Tensor, bias_E: torch.Tensor, n_group: int, topk_group: int, top_k: int,
                    normalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``Gate``'s expert selection from its FP32 sigmoid scores in one pass (CPU inference):
    ``(ids_TK int64, weights_TK float32)``, ids in descending order of choice; else None for the
    eager form (other devices, autograd, groups of one expert, which the eager form rejects)."""
    if (scores_TE.dtype != torch.float32 or not _routes(scores_TE.shape[-1], bias_E, n_group, topk_group)
            or (k := _kernels_for(scores_TE)) is None):
        return None
    ids_TK, weights_TK = k.moe_route(scores_TE, bias_E, n_group, topk_group, top_k, normalize, scale)
    return ids_TK, weights_TK


def _routes(E: int, bias_E: torch.Tensor, n_group: int, topk_group: int) -> bool:
    """Whether ``moe_route`` takes this gate: a float32 bias, groups of two or more experts."""
    return bias_E.dtype == torch.float32 and not (
        n_group > 1 and topk_group < n_group and (E % n_group or E // n_group < 2 or topk_group < 1))


def fused_argmax(logits_BV: torch.Tensor) -> torch.Tensor | None:
    """``logits_BV.max(dim=-1).indices`` (the first maximum; NaN counts as the maximum) of FP32 CPU
    logits in one vectorised pass (~10x faster at [16, 8192]), or None where it does not apply."""
    if (logits_BV.dim() != 2 or logits_BV.dtype != torch.float32 or logits_BV.device.type != "cpu"
            or not logits_BV.shape[1] or not enabled() or not _avx512_supported()):
        return None  # (autograd may be on: indices carry no gradient)
    return kernels().argmax_rows(logits_BV)


def avx512_supported() -> bool:
    """Whether the AVX-512 kernels (experts, the decode step's in-place attention, argmax, the
    vectorised SwiGLU) can run here at all: the kernels are built and the CPU has AVX-512 (F, BW,
    VL, DQ). Says nothing of the switch (:func:`enabled`) or of any input."""
    return _avx512_supported()


def avx512_ready(x: torch.Tensor) -> bool:
    """Whether the AVX-512 kernels apply to ``x``: :func:`_kernels_for` ``x`` (a non-empty FP32 or
    BF16 CPU tensor, autograd off, switched on, built) on an AVX-512 CPU."""
    return _kernels_for(x) is not None and _avx512_supported()


@functools.cache
def _avx512_supported() -> bool:
    k = kernels()
    return k is not None and bool(k.avx512_supported())


def fused_linear(x: torch.Tensor, blocked_SKC: torch.Tensor, out_features: int) -> torch.Tensor | None:
    """``F.linear(x, weight)`` of FP32 or BF16 CPU rows ``x`` [..., K] in inference, through the
    weight's column-blocked copy ``blocked_SKC`` [ceil(out / 32), K, 32] (``layers.block_columns``,
    FP32 or BF16): [..., out_features] in x's dtype, each output summed in input order in FP32
    (AVX-512). None where the kernel does not run (the caller's GEMM then)."""
    if not avx512_ready(x):
        return None
    return kernels().blocked_linear(x, blocked_SKC, out_features)


def _experts_apply(x_TD: torch.Tensor, w13_EDH: torch.Tensor, w2_EFD: torch.Tensor) -> bool:
    """Whether ``moe_experts`` takes these experts: contiguous weights of x's dtype, ``avx512_ready``."""
    return (w13_EDH.dtype == x_TD.dtype and w2_EFD.dtype == x_TD.dtype and w13_EDH.is_contiguous()
            and w2_EFD.is_contiguous() and avx512_ready(x_TD))


def fused_moe(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, w13_EDH: torch.Tensor,
              w2_EFD: torch.Tensor, num_routed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The routed experts and then the shared ones (``w13_EDH[num_routed:]``, weight 1 for every
    token) of a batch in one pass: ``(y_TD, routed_counts_E)``, as ``StackedExperts`` returns them.
    Weights input-major and contiguous ([E, D, 2F] gate then up, [E, F, D]), of x's dtype (FP32 or
    BF16, CPU inference, AVX-512); else None for the caller's other kernels. Expert ids outside
    ``[0, num_routed)`` raise ``RuntimeError`` before anything is computed."""
    if not _experts_apply(x_TD, w13_EDH, w2_EFD):
        return None
    y_TD, counts_E = kernels().moe_experts(x_TD, ids_TK, weights_TK.float(), w13_EDH, w2_EFD, num_routed)
    return y_TD, counts_E


def fused_moe_layer(x_TD: torch.Tensor, gate_weight_ED: torch.Tensor, bias_E: torch.Tensor, n_group: int,
                    topk_group: int, top_k: int, normalize: bool, scale: float, w13_EDH: torch.Tensor,
                    w2_EFD: torch.Tensor, num_routed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A decode batch's MoE layer on normalised rows in one call: the ``Gate``'s FP32 scores (its
    linear and sigmoid), ``fused_moe_route``'s selection, then ``fused_moe``; ``(y_TD,
    routed_counts_E)``. None where either of those two would not run."""
    if not _routes(gate_weight_ED.shape[0], bias_E, n_group, topk_group) or not _experts_apply(x_TD, w13_EDH, w2_EFD):
        return None
    y_TD, counts_E = kernels().moe_layer(x_TD, gate_weight_ED, bias_E, n_group, topk_group, top_k, normalize, scale,
                                         w13_EDH, w2_EFD, num_routed)
    return y_TD, counts_E


def status() -> str:
    """One line for the install step (``make venv`` builds the kernels through this)."""
    if not enabled():
        return f"expertmesh CPU kernels: off ({ENV_SWITCH}=0)"
    if kernels() is None:
        return "expertmesh CPU kernels: unavailable, eager PyTorch is used"
    return "expertmesh CPU kernels: ready" + ("" if avx512_supported() else " (no AVX-512 here: the MoE, attention and "
                                                                        "argmax kernels fall back to eager PyTorch)")
