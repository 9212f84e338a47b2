"""Checkpoint I/O in the Hugging Face DeepSeek-V3 layout.

A checkpoint directory holds ``config.json`` and one ``model.safetensors`` or several
shards listed in ``model.safetensors.index.json``. FP8 checkpoints
(``quantization_config.quant_method == "fp8"``) store e4m3 weights with a float32
``<name>.weight_scale_inv`` per 128×128 block; they can be kept in FP8 or dequantized.

Loading is all-or-nothing: a missing tensor, an unexpected tensor or a wrong shape is a
``ValueError`` naming it, before any weight is copied into the model. Multi-token
prediction layers (``model.layers.{num_hidden_layers}+``) are not used for generation and
are skipped, as transformers does.

Writing: weights and ``config.json`` first (each file through a temp name and a rename), then
``expertmesh-manifest.json`` last and atomically: the size and sha256 of every file, so a
partial write (no manifest) or bytes changed later (hash mismatch) are caught by
:mod:`expertmesh.model.checkpoint_check` before anything serves the checkpoint. Files written
here carry ``writer: expertmesh`` in their safetensors metadata, which is how a missing manifest
is told apart from a checkpoint saved by another tool.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from expertmesh.model.config import FP8Format, ModelConfig
from expertmesh.model.layers import dense_linear, fp8_linear
from expertmesh.model.transformer import DeepseekV3, build_model

Quantization = Literal["auto", "fp8", "none"]
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MANIFEST_FILE = "expertmesh-manifest.json"
MANIFEST_FORMAT = "expertmesh-manifest-v1"
WRITER_METADATA: dict[str, str] = {"format": "pt", "writer": "expertmesh"}  # safetensors header metadata
TEMP_SUFFIX = ".tmp"
HASH_CHUNK_BYTES = 8 << 20
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_FUSED_EXPERTS_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not a checkpoint directory: config.json not found")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_file}: invalid JSON ({exc})") from None
    return ModelConfig.from_hf_dict(raw)


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{index}: not a safetensors index ({exc})") from None
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} lists shard(s) that do not exist: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors weights found")
    return files


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory by name (memory-mapped reads)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(path)):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key in tensors:
                        raise ValueError(f"tensor {key!r} appears in more than one shard ({file.name})")
                    tensors[key] = f.get_tensor(key)
        except (OSError, RuntimeError, SafetensorError) as exc:  # truncated or corrupt file
            raise ValueError(f"{file}: unreadable safetensors file ({exc})") from None
    return tensors


def _split_fused_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept transformers' fused in-memory expert layout ([E, 2F, D] gate_up, [E, D, F] down)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _FUSED_EXPERTS_RE.match(key)
        if not m:
            out[key] = t
            continue
        prefix, kind = m.groups()
        for e in range(t.shape[0]):
            if kind == "gate_up_proj":
                gate, up = t[e].chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate
                out[f"{prefix}.{e}.up_proj.weight"] = up
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = t[e]
    return out


def _dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    from expertmesh.model.fp8 import dequantize_weight

    return dequantize_weight(weight, scale_inv.float(), block=block, dtype=dtype)


def _quantize(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    from expertmesh.model.fp8 import quantize_weight

    return quantize_weight(weight.float(), block=block)


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one stored tensor (from a safetensors header or a loaded tensor)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def tensor_meta(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorMeta]:
    return {k: TensorMeta(tuple(t.shape), t.dtype) for k, t in tensors.items()}


def _split_fused_meta(stored: Mapping[str, TensorMeta]) -> dict[str, TensorMeta]:
    """:func:`_split_fused_experts` on shapes only ([E, 2F, D] gate_up -> E x ([F, D], [F, D]))."""
    out: dict[str, TensorMeta] = {}
    for key, meta in stored.items():
        m = _FUSED_EXPERTS_RE.match(key)
        if not m or len(meta.shape) != 3:
            out[key] = meta
            continue
        prefix, kind = m.groups()
        n_experts, rows, cols = meta.shape
        for e in range(n_experts):
            if kind == "gate_up_proj":
                out[f"{prefix}.{e}.gate_proj.weight"] = out[f"{prefix}.{e}.up_proj.weight"] = TensorMeta(
                    (rows // 2, cols), meta.dtype)
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = TensorMeta((rows, cols), meta.dtype)
    return out


def expected_layout(config: ModelConfig) -> dict[str, TensorMeta]:
    """Every tensor a checkpoint of ``config`` holds, in its own format (an FP8 config: e4m3
    linear weights, each with a float32 ``weight_scale_inv`` per block), built on the meta device."""
    block = (config.quantization or FP8Format()).weight_block_size[0]
    fp8 = config.quantization is not None
    stored_config = config.replace(quantization=FP8Format(weight_block_size=(block, block)) if fp8 else None)
    model = build_model(stored_config, fp8_linear if fp8 else dense_linear, dtype=torch.float32, device="meta")
    return tensor_meta(model.state_dict())


def layout_problems(config: ModelConfig, stored: Mapping[str, TensorMeta], path: str | Path) -> list[str]:
    """What is wrong with the tensors a checkpoint holds for ``config``, most telling first:
    FP8 scales without an FP8 config, then per expected tensor (model order) missing / FP8
    without scale / wrong shape / wrong scale grid / not floating point, then unexpected tensors.
    Multi-token-prediction layers (``model.layers.{num_hidden_layers}+``) are not checked."""
    stored = _split_fused_meta(stored)
    expected = expected_layout(config)
    block = (config.quantization or FP8Format()).weight_block_size[0]
    problems: list[str] = []
    scale_keys = sorted(k for k in stored if k.endswith(".weight_scale_inv"))
    if scale_keys and config.quantization is None:
        problems.append(f"tensor {scale_keys[0]!r} found but config.json has no fp8 quantization_config")
    used: set[str] = {k for k in stored if (m := _LAYER_RE.match(k)) and int(m.group(1)) >= config.num_hidden_layers}
    for name, target in expected.items():
        if name.endswith(".weight_scale_inv"):
            continue  # checked with its weight
        if name not in stored:
            if not (name == "lm_head.weight" and config.tie_word_embeddings):
                problems.append(f"checkpoint {path} is missing tensor {name!r}")
            continue
        used.add(name)
        src = stored[name]
        scale_name = name[: -len("weight")] + "weight_scale_inv"
        if src.dtype == torch.float8_e4m3fn and scale_name not in stored:
            problems.append(f"FP8 tensor {name!r} has no {scale_name!r} in checkpoint {path}")
        if src.shape != target.shape:
            problems.append(f"tensor {name!r} has shape {src.shape}, config expects {target.shape}")
        elif not src.dtype.is_floating_point:
            problems.append(f"tensor {name!r} has dtype {str(src.dtype).removeprefix('torch.')}; "
                            f"weights must be floating point")
        if src.dtype == torch.float8_e4m3fn and scale_name in stored:
            used.add(scale_name)
            want = expected[scale_name].shape if scale_name in expected else None
            if stored[scale_name].shape != want:
                problems.append(f"tensor {scale_name!r} has shape {stored[scale_name].shape}, "
                                f"expected {want} for {block}x{block} blocks")
    # zero-size tensors hold no weights (transformers writes a 0-wide shared MLP when n_shared_experts=0)
    unexpected = sorted(k for k, meta in stored.items() if k not in used and meta.numel > 0)
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        problems.append(f"checkpoint {path} has unexpected tensor(s) {', '.join(map(repr, unexpected[:3]))}{more}")
    return problems


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantization: Quantization = "auto",
) -> DeepseekV3:
    """Load a DeepSeek-V3-layout checkpoint.

    quantization: "auto" keeps an FP8 checkpoint in FP8 and a dense one dense; "fp8" runs the
    linear layers in FP8 (quantizing a dense checkpoint on load); "none" runs dense
    (dequantizing an FP8 checkpoint to ``dtype``).
    """
    if quantization not in ("auto", "fp8", "none"):
        raise ValueError(f"quantization must be 'auto', 'fp8' or 'none', got {quantization!r}")
    path = Path(path)
    config = read_config(path)
    tensors = _split_fused_experts(read_tensors(path))
    problems = layout_problems(config, tensor_meta(tensors), path)
    if problems:
        raise ValueError(problems[0])
    ckpt_fp8 = config.quantization is not None
    run_fp8 = quantization == "fp8" or (quantization == "auto" and ckpt_fp8)
    block = (config.quantization or FP8Format()).weight_block_size[0]
    model_config = config.replace(quantization=FP8Format(weight_block_size=(block, block)) if run_fp8 else None)
    model = build_model(model_config, fp8_linear if run_fp8 else dense_linear, dtype=dtype, device="meta")

    expected = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for name in expected:
        if name.endswith(".weight_scale_inv") or name not in tensors:
            continue  # scales come with their weight; only a tied lm_head may be absent (checked above)
        src = tensors[name]
        scale_name = name[: -len("weight")] + "weight_scale_inv"
        src_is_fp8 = src.dtype == torch.float8_e4m3fn
        wants_fp8 = scale_name in expected
        if wants_fp8 and src_is_fp8:
            loaded[name], loaded[scale_name] = src, tensors[scale_name].float()
        elif wants_fp8:
            loaded[name], loaded[scale_name] = _quantize(src, block)
        elif src_is_fp8:
            loaded[name] = _dequantize(src, tensors[scale_name], block, dtype)
        else:
            loaded[name] = src
        if wants_fp8 and loaded[scale_name].shape != expected[scale_name].shape:
            raise ValueError(
                f"tensor {scale_name!r} has shape {tuple(loaded[scale_name].shape)}, "
                f"expected {tuple(expected[scale_name].shape)} for {block}x{block} blocks"
            )

    model = model.to_empty(device=device)
    for name, t in loaded.items():
        target = expected[name]
        loaded[name] = t.to(device=device, dtype=target.dtype if not t.dtype == torch.float8_e4m3fn else t.dtype)
    missing, unexpected_keys = model.load_state_dict(loaded, strict=False)
    leftover = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    assert not leftover and not unexpected_keys, (leftover, unexpected_keys)  # checked above
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _reset_non_persistent(model, device)
    return model.eval()


def _reset_non_persistent(model: DeepseekV3, device: str | torch.device) -> None:
    """Non-persistent buffers were created on the meta device; rebuild them for real."""
    from expertmesh.model.rope import rope_inv_freq

    inv_freq, factor = rope_inv_freq(model.config.rope, model.config.qk_rope_head_dim,
                                     model.config.max_position_embeddings)
    model.rotary.inv_freq = inv_freq.to(device)
    model.rotary.attention_factor = factor
    for moe in model.moe_layers():
        moe.tokens_per_expert = torch.zeros(moe.n_experts, dtype=torch.float32, device=device)


@dataclass(frozen=True)
class Provenance:
    """Where a checkpoint came from, recorded in its manifest (``expertmesh checkpoint list`` shows it)."""

    source: str
    step: int | None = None


def save_pretrained(
    model: DeepseekV3,
    path: str | Path,
    quantization: Literal["keep", "fp8"] = "keep",
    max_shard_bytes: int = 4 << 30,
    provenance: Provenance | None = None,
    manifest: Literal["write", "defer"] = "write",
) -> Path:
    """Write ``config.json`` + safetensors (sharded with an index past ``max_shard_bytes``), then
    the manifest (last). ``manifest="defer"`` leaves it to a caller that adds files afterwards
    and then calls :func:`write_manifest` itself.

    quantization="fp8" stores every linear weight of a dense model as e4m3 with 128×128
    ``weight_scale_inv`` blocks (DeepSeek's released layout); "keep" writes what the model holds.
    Weight files of an earlier save into the same directory are removed first.
    """
    if manifest not in ("write", "defer"):
        raise ValueError(f"manifest must be 'write' or 'defer', got {manifest!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if quantization == "fp8" and config.quantization is None:
        fp8_names = [n + ".weight" for n, m in model.named_modules() if _is_quantizable(n, m)]
        block = 128
        for name in fp8_names:
            state[name], state[name[: -len("weight")] + "weight_scale_inv"] = _quantize(state[name], block)
        config = config.replace(quantization=FP8Format(weight_block_size=(block, block)))
    elif quantization not in ("keep", "fp8"):
        raise ValueError(f"quantization must be 'keep' or 'fp8', got {quantization!r}")

    # the manifest goes first and comes back last: in between the directory is visibly unfinished
    for stale in [path / MANIFEST_FILE, path / INDEX_FILE, *path.glob("*.safetensors")]:
        stale.unlink(missing_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    if len(shards) == 1:
        save_weights(shards[0], path / SINGLE_FILE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_weights(shard, path / fname)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        _write_text_atomic(path / INDEX_FILE, json.dumps({"metadata": {"total_size": total},
                                                          "weight_map": weight_map}, indent=2))
    hf = config.to_hf_dict()
    hf["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    _write_text_atomic(path / "config.json", json.dumps(hf, indent=2))
    if manifest == "write":
        write_manifest(path, provenance)
    return path


def save_weights(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """One safetensors file with the ``writer: expertmesh`` metadata, through a temp name and a rename."""
    tmp = file.with_name(file.name + TEMP_SUFFIX)
    save_file(tensors, str(tmp), metadata=WRITER_METADATA)
    os.replace(tmp, file)


def _write_text_atomic(file: Path, text: str) -> None:
    tmp = file.with_name(file.name + TEMP_SUFFIX)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, file)


def file_sha256(file: Path) -> str:
    """Hex sha256 of a file, read in ``HASH_CHUNK_BYTES`` chunks."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_files(directory: Path) -> list[Path]:
    """The files a manifest covers: everything under ``directory`` except the manifest itself."""
    return [p for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST_FILE, MANIFEST_FILE + TEMP_SUFFIX)]


def write_manifest(directory: str | Path, provenance: Provenance | None = None) -> Path:
    """Write ``expertmesh-manifest.json`` (size + sha256 of every other file), atomically. Call it
    after the last file of the checkpoint is in place."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in manifest_files(directory)}
    body = {"format": MANIFEST_FORMAT, "files": files, "written_at_s": time.time(),
            "source": provenance.source if provenance else None, "step": provenance.step if provenance else None}
    _write_text_atomic(directory / MANIFEST_FILE, json.dumps(body, indent=2) + "\n")
    return directory / MANIFEST_FILE


def _is_quantizable(name: str, module: torch.nn.Module) -> bool:
    """Linear layers DeepSeek stores in FP8: attention and MLP/expert projections."""
    return isinstance(module, torch.nn.Linear) and name != "lm_head"


def load_experts(
    path: str | Path,
    wanted: set[tuple[int, int]],
    quantization: Quantization = "auto",
    dtype: torch.dtype = torch.float32,
) -> dict[tuple[int, int], torch.nn.Module]:
    """Only the routed experts ``(layer, logical_id)`` an expert shard hosts, as ``MLP`` modules.

    Weights are converted exactly as ``load_pretrained`` converts them (same quantization),
    so a shard computes what the single-process model computes. The checkpoint is validated
    first (quick mode: structure, sizes, manifest): a corrupted or partial one raises
    ``CheckpointInvalid`` (a ``ValueError``) before any weight is read, so no slot swaps to it.
    """
    from expertmesh.model.checkpoint_check import CheckMode, require_valid_checkpoint
    from expertmesh.model.layers import MLP

    path = Path(path)
    require_valid_checkpoint(path, CheckMode.QUICK)
    config = read_config(path)
    run_fp8 = quantization == "fp8" or (quantization == "auto" and config.quantization is not None)
    block = (config.quantization or FP8Format()).weight_block_size[0]
    for layer, expert in wanted:
        if not config.is_moe_layer(layer) or not 0 <= expert < config.n_routed_experts:
            raise ValueError(f"layer {layer} expert {expert} is not a routed expert of {path}")
    tensors = _split_fused_experts(read_tensors(path))
    out: dict[tuple[int, int], torch.nn.Module] = {}
    for layer, expert in sorted(wanted):
        mlp = MLP(config.hidden_size, config.moe_intermediate_size, fp8_linear if run_fp8 else dense_linear)
        state = {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
            if name not in tensors:
                raise ValueError(f"checkpoint {path} is missing tensor {name!r}")
            src, scale = tensors[name], tensors.get(name[: -len("weight")] + "weight_scale_inv")
            if src.dtype == torch.float8_e4m3fn and scale is None:
                raise ValueError(f"FP8 tensor {name!r} has no weight_scale_inv in checkpoint {path}")
            if run_fp8:
                w, s = (src, scale.float()) if src.dtype == torch.float8_e4m3fn else _quantize(src, block)
                state[f"{proj}.weight"], state[f"{proj}.weight_scale_inv"] = w, s
            else:
                state[f"{proj}.weight"] = (_dequantize(src, scale, block, dtype) if src.dtype == torch.float8_e4m3fn
                                           else src.to(dtype))
        mlp.load_state_dict(state)
        out[(layer, expert)] = mlp.eval()
    return out
