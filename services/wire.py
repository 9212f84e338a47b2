"""Tensors on the wire: raw bytes + dtype + shape (never pickled), FP8 with its tile scales.

Every decode checks the message before trusting it: a known dtype, a non-negative shape
whose size matches the byte count, and for FP8 a scale grid of ceil(K/block) tiles per row.
Violations are ``WireError`` (a ``ValueError``), which servicers answer with INVALID_ARGUMENT.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from expertmesh.model.fp8 import FP8_DTYPE, QuantizedActivation, quantize_activation
from expertmesh.protos import load

tensor_pb2 = load("tensor_pb2")

_CODES: dict[str, tuple[torch.dtype, torch.dtype]] = {
    # wire name: (torch dtype, same-width integer view used for the bytes)
    "float32": (torch.float32, torch.int32),
    "bfloat16": (torch.bfloat16, torch.int16),
    "float16": (torch.float16, torch.int16),
    "float8_e4m3fn": (FP8_DTYPE, torch.uint8),
    "int64": (torch.int64, torch.int64),
    "int32": (torch.int32, torch.int32),
}
_NAMES = {dtype: name for name, (dtype, _) in _CODES.items()}
MAX_DIMS = 4


class WireError(ValueError):
    """A tensor message that cannot be decoded; the message says what is wrong."""


def _raw(t: torch.Tensor) -> bytes:
    view = _CODES[_NAMES[t.dtype]][1]
    return t.detach().contiguous().cpu().view(view).numpy().tobytes()


def encode(t: torch.Tensor) -> "tensor_pb2.Tensor":
    if t.dtype not in _NAMES:
        raise WireError(f"dtype {t.dtype} cannot travel (supported: {', '.join(_CODES)})")
    return tensor_pb2.Tensor(dtype=_NAMES[t.dtype], shape=list(t.shape), data=_raw(t))


def encode_quantized(q: QuantizedActivation) -> "tensor_pb2.Tensor":
    return tensor_pb2.Tensor(dtype="float8_e4m3fn", shape=list(q.data.shape), data=_raw(q.data),
                             scale=_raw(q.scale.float()), scale_shape=list(q.scale.shape), block_size=q.block)


def encode_any(x: torch.Tensor | QuantizedActivation) -> "tensor_pb2.Tensor":
    return encode_quantized(x) if isinstance(x, QuantizedActivation) else encode(x)


def encode_activation(x_TD: torch.Tensor, dtype: str) -> "tensor_pb2.Tensor":
    """Activations for dispatch: "fp8" (e4m3 + float32 1×128 tile scales), "bf16" or "fp32"."""
    if dtype == "fp8":
        return encode_quantized(quantize_activation(x_TD.float()))
    if dtype == "bf16":
        return encode(x_TD.to(torch.bfloat16))
    if dtype == "fp32":
        return encode(x_TD.float())
    raise WireError(f"dispatch dtype must be fp8, bf16 or fp32, got {dtype!r}")


def _decode_raw(data: bytes, dtype_name: str, shape: list[int], what: str) -> torch.Tensor:
    if dtype_name not in _CODES:
        raise WireError(f"{what}: unknown dtype {dtype_name!r} (supported: {', '.join(_CODES)})")
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        raise WireError(f"{what}: invalid shape {list(shape)}")
    dtype, view = _CODES[dtype_name]
    expected = math.prod(shape) * view.itemsize
    if len(data) != expected:
        raise WireError(f"{what}: shape {list(shape)} of {dtype_name} needs {expected} bytes, got {len(data)}")
    array = np.frombuffer(data, dtype=torch.empty(0, dtype=view).numpy().dtype).copy()
    return torch.from_numpy(array).view(dtype).reshape(shape)


def decode(msg: "tensor_pb2.Tensor", what: str = "tensor") -> torch.Tensor:
    if msg.dtype == "float8_e4m3fn":
        raise WireError(f"{what}: FP8 tensors must be decoded as activations (with their scales)")
    return _decode_raw(msg.data, msg.dtype, list(msg.shape), what)


def decode_activation(msg: "tensor_pb2.Tensor", what: str = "hidden") -> torch.Tensor | QuantizedActivation:
    """A [T, D] activation: a float tensor, or a ``QuantizedActivation`` for FP8 payloads."""
    if len(msg.shape) != 2:
        raise WireError(f"{what}: expected a [tokens, hidden] tensor, got shape {list(msg.shape)}")
    if msg.dtype != "float8_e4m3fn":
        t = decode(msg, what)
        if not t.dtype.is_floating_point:
            raise WireError(f"{what}: activations must be floating point, got {msg.dtype}")
        return t
    data = _decode_raw(msg.data, msg.dtype, list(msg.shape), what)
    block = msg.block_size or 128
    want = [msg.shape[0], -(-msg.shape[1] // block)]
    if list(msg.scale_shape) != want:
        raise WireError(f"{what}: FP8 scale shape {list(msg.scale_shape)} does not match {want} for {block}-wide tiles")
    scale = _decode_raw(msg.scale, "float32", want, f"{what}.scale")
    return QuantizedActivation(data, scale, block)


def take_rows(x: torch.Tensor | QuantizedActivation, rows: torch.Tensor) -> torch.Tensor | QuantizedActivation:
    """Rows of an activation; for FP8 the rows keep their own tile scales (exact, no requantization)."""
    if isinstance(x, QuantizedActivation):
        return QuantizedActivation(x.data[rows], x.scale[rows], x.block)
    return x[rows]


def num_rows(x: torch.Tensor | QuantizedActivation) -> int:
    return (x.data if isinstance(x, QuantizedActivation) else x).shape[0]


def nbytes(msg) -> int:
    """Serialized size of a protobuf message (what crosses the network)."""
    return msg.ByteSize()


def encode_plan(plan, slot_ids: list[int] | tuple[int, ...] | None = None) -> object:
    """A ``PlacementPlan`` as the ``Plan`` message (phy2log row-major), with the slot id at each
    plan position when it is not the identity."""
    placement_pb2 = load("placement_pb2")
    L, P = plan.phy2log_LP.shape
    return placement_pb2.Plan(version=plan.version, num_layers=L, num_physical=P, num_gpus=plan.num_gpus,
                              num_nodes=plan.num_nodes, num_logical=plan.logcnt_LE.shape[1],
                              phy2log=plan.phy2log_LP.flatten().tolist(), slot_ids=list(slot_ids or []))


def decode_plan(msg):
    from expertmesh.placement import PlacementPlan

    if msg.num_layers <= 0 or msg.num_physical <= 0 or len(msg.phy2log) != msg.num_layers * msg.num_physical:
        raise WireError(f"plan: phy2log has {len(msg.phy2log)} entries, expected num_layers*num_physical = "
                        f"{msg.num_layers}*{msg.num_physical}")
    if msg.num_gpus <= 0 or msg.num_physical % msg.num_gpus:
        raise WireError(f"plan: num_physical={msg.num_physical} must be a positive multiple of num_gpus={msg.num_gpus}")
    if msg.slot_ids and (len(msg.slot_ids) != msg.num_gpus or len(set(msg.slot_ids)) != len(msg.slot_ids)):
        raise WireError(f"plan: slot_ids must name {msg.num_gpus} distinct slots, got {list(msg.slot_ids)}")
    phy2log = torch.tensor(list(msg.phy2log), dtype=torch.long).view(msg.num_layers, msg.num_physical)
    return PlacementPlan.from_phy2log(msg.version, phy2log, msg.num_logical, msg.num_gpus, msg.num_nodes)


def decode_plan_slots(msg) -> tuple[int, ...]:
    """Slot id at each position of a ``Plan`` message (identity when unset)."""
    return tuple(msg.slot_ids) if msg.slot_ids else tuple(range(msg.num_gpus))
