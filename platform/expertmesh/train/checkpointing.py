"""Training checkpoints: what a checkpoint directory holds, how it is written, checked and read.

One checkpoint (a Ray Train checkpoint directory; every worker writes its part into a local
directory and Ray Train merges them into one) looks like::

    model/                serving layout, world-size independent (rank 0):
        config.json, model.safetensors      the weights, fp32, HF DeepSeek-V3 names; the MTP
                                            module (if on) at model.layers.{L}.*
        tokenizer.json, tokenizer_config.json, special_tokens_map.json
    optimizer/            AdamW state, world-size independent (rank 0, gathered from all):
        moments.safetensors                 "exp_avg/<param>", "exp_avg_sq/<param>" full tensors
        optimizer.json                      Adam step count, parameter names
    deepspeed/state/      ``engine.save_checkpoint`` (every rank): model states + ZeRO
                          partitions (``zero_pp_rank_{r}_mp_rank_00_optim_states.pt``), exact
                          only for the same world size and ZeRO stage
    trainer_state.json    step, next global sample, spec fingerprint, world size, ZeRO stage
    COMPLETE              written last, after a barrier: a manifest of rank 0's files and sizes

Resume (see :func:`plan_restore`): a checkpoint without a valid ``COMPLETE`` is refused
(Ray Train only registers a checkpoint once every worker's report returned, so one cut off
mid-write is never offered; the marker is the second lock). With the same world size and
ZeRO stage the DeepSpeed state is loaded (bit-exact); otherwise the weights come from
``model/`` and the AdamW moments from ``optimizer/``, so any number of workers can resume.

Shape letters: none (tensors keep their parameter shapes).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from expertmesh.model.checkpoint import (
    SINGLE_FILE,
    Provenance,
    read_tensors,
    save_pretrained,
    save_weights,
    write_manifest,
)
from expertmesh.train.mtp import mtp_checkpoint_tensors, mtp_state_from_checkpoint
from expertmesh.train.objective import TrainModel

MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
TRAINER_STATE_FILE = "trainer_state.json"
COMPLETE_FILE = "COMPLETE"
MOMENTS_FILE = "moments.safetensors"
OPTIMIZER_META_FILE = "optimizer.json"
ADAM_MOMENT_KEYS: tuple[str, str] = ("exp_avg", "exp_avg_sq")
CHECKPOINT_FORMAT = "expertmesh-train-v1"


class IncompleteCheckpoint(ValueError):
    """A checkpoint directory lacks its completion marker or a file the marker lists."""


@dataclass(frozen=True)
class TrainerState:
    """``trainer_state.json``: where training stands at a checkpoint.

    Attributes:
        step: optimizer steps completed.
        next_sample: global sample index the next step starts at (any world size).
        spec_fingerprint: :func:`expertmesh.train.objective.spec_fingerprint` of the writer.
        world_size: workers that wrote it.
        zero_stage: DeepSpeed ZeRO stage that wrote it.
        global_batch_size: sequences per optimizer step when written.
        tokens_seen: target tokens trained on so far.
        wall_time_s: ``time.time()`` when written.
    """

    step: int
    next_sample: int
    spec_fingerprint: str
    world_size: int
    zero_stage: int
    global_batch_size: int
    tokens_seen: int
    wall_time_s: float
    format: str = CHECKPOINT_FORMAT

    def to_json(self) -> str:
        """Pretty JSON text."""
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, directory: Path) -> TrainerState:
        """Parse ``directory/trainer_state.json``.

        Raises:
            IncompleteCheckpoint: missing or malformed.
        """
        path = directory / TRAINER_STATE_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(**raw)
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise IncompleteCheckpoint(f"{path}: unreadable trainer state ({exc})") from None


# --------------------------------------------------------------------------- serving layout


def save_serving_model(model: TrainModel, directory: Path, tokenizer_dir: Path | None,
                       provenance: Provenance | None = None) -> Path:
    """Write ``model/``-style output: ``save_pretrained`` + MTP tensors + tokenizer files, then the
    manifest (last; see :mod:`expertmesh.model.checkpoint_check`).

    ``load_pretrained`` and ``transformers.DeepseekV3ForCausalLM.from_pretrained`` both load it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    save_pretrained(model.lm, directory, manifest="defer")
    if model.mtp is not None:
        weights = directory / SINGLE_FILE
        tensors = load_file(str(weights))
        tensors.update(mtp_checkpoint_tensors(model.mtp, model.lm))
        save_weights(tensors, weights)
        config_path = directory / "config.json"
        config = json.loads(config_path.read_text())
        config["num_nextn_predict_layers"] = 1
        config_path.write_text(json.dumps(config, indent=2))
    if tokenizer_dir is not None:
        for file in sorted(Path(tokenizer_dir).iterdir()):
            if file.is_file():
                shutil.copy2(file, directory / file.name)
    write_manifest(directory, provenance)
    return directory


def load_serving_weights(model: TrainModel, directory: Path) -> None:
    """Copy the weights (and gate biases) of a ``model/`` directory into ``model`` in place.

    Raises:
        ValueError: a missing, unexpected or mis-shaped tensor (nothing is copied then).
    """
    tensors = read_tensors(directory)
    n_layers = model.config.num_hidden_layers
    lm_state = model.lm.state_dict()
    wanted = {k: v for k, v in tensors.items() if k in lm_state}
    missing = sorted(set(lm_state) - set(wanted))
    if missing:
        raise ValueError(f"{directory}: missing tensor(s) {missing[:3]}")
    for name, tensor in wanted.items():
        if tensor.shape != lm_state[name].shape:
            raise ValueError(f"{directory}: {name} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(lm_state[name].shape)}")
    mtp_state = mtp_state_from_checkpoint(tensors, n_layers) if model.mtp is not None else None
    with torch.no_grad():
        model.lm.load_state_dict(wanted, strict=True)
        if model.mtp is not None and mtp_state is not None:
            model.mtp.load_state_dict(mtp_state, strict=True)


# --------------------------------------------------------------------------- optimizer state


def _is_zero_partitioned(params: list[torch.nn.Parameter]) -> bool:
    return any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in params)


def _relink_zero_optimizer_state(zero: Any) -> None:
    """Point every parameter's optimizer-state fragment at the current AdamW state.

    DeepSpeed links the fragments once, right after the first param group's first step, when
    the other groups' (lazily created) AdamW state does not exist yet; with two param groups
    the second group's fragments then stay empty. Relinking once the state exists fixes that.
    """
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def gather_optimizer_state(engine: Any, model: TrainModel) -> tuple[dict[str, torch.Tensor], int]:
    """Full AdamW moments of every parameter, keyed ``"<moment>/<param name>"``, and the Adam step.

    NOTE: under ZeRO 1/2 this is a collective (one all-reduce per tensor): every rank must call
    it in the same order. Without ZeRO each rank already holds the full state.
    """
    named = list(model.named_parameters())
    params = [p for _, p in named]
    tensors: dict[str, torch.Tensor] = {}
    adam_step = 0
    if _is_zero_partitioned(params):
        from deepspeed.utils import safe_get_full_optimizer_state

        _relink_zero_optimizer_state(engine.optimizer)
        for name, param in named:
            for key in ADAM_MOMENT_KEYS:
                full = safe_get_full_optimizer_state(param, key)
                tensors[f"{key}/{name}"] = (torch.zeros_like(param, dtype=torch.float32) if full is None
                                            else full.detach().cpu().contiguous())
        inner = engine.optimizer.optimizer
        for state in inner.state.values():
            if "step" in state:
                adam_step = int(float(state["step"]))
                break
    else:
        optimizer = engine.optimizer
        for name, param in named:
            state = optimizer.state.get(param, {})
            for key in ADAM_MOMENT_KEYS:
                value = state.get(key)
                tensors[f"{key}/{name}"] = (torch.zeros_like(param, dtype=torch.float32) if value is None
                                            else value.detach().cpu().contiguous())
            if "step" in state:
                adam_step = int(float(state["step"]))
    return tensors, adam_step


def save_optimizer_state(directory: Path, tensors: dict[str, torch.Tensor], adam_step: int) -> None:
    """Write ``optimizer/`` (rank 0)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / MOMENTS_FILE), metadata={"format": "pt"})
    meta = {"adam_step": adam_step, "moments": list(ADAM_MOMENT_KEYS), "n_tensors": len(tensors)}
    (directory / OPTIMIZER_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def restore_optimizer_state(engine: Any, model: TrainModel, directory: Path) -> int:
    """Load ``optimizer/`` into the engine's optimizer at the current world size; returns the Adam step.

    Works without ZeRO (every rank sets the full state) and with ZeRO 1/2 (each rank keeps
    its partition's fragment). Call after ``deepspeed.initialize`` and before the first step.
    """
    tensors = load_file(str(directory / MOMENTS_FILE))
    adam_step = int(json.loads((directory / OPTIMIZER_META_FILE).read_text())["adam_step"])
    named = list(model.named_parameters())
    missing = [f"{k}/{n}" for n, _ in named for k in ADAM_MOMENT_KEYS if f"{k}/{n}" not in tensors]
    if missing:
        raise ValueError(f"{directory}: optimizer state lacks {missing[:3]} (written by another model?)")
    step_tensor = torch.tensor(float(adam_step), dtype=torch.float32)
    params = [p for _, p in named]
    if _is_zero_partitioned(params):
        from deepspeed.utils import safe_set_full_optimizer_state

        zero = engine.optimizer
        # AdamW creates its state lazily on the first step: create it now for the flat fp32
        # partitions, then link each parameter's fragment view to it.
        for flat in zero.single_partition_of_fp32_groups:
            zero.optimizer.state[flat] = {"step": step_tensor.clone(),
                                          **{key: torch.zeros_like(flat) for key in ADAM_MOMENT_KEYS}}
        _relink_zero_optimizer_state(zero)
        for name, param in named:
            for key in ADAM_MOMENT_KEYS:
                safe_set_full_optimizer_state(param, tensors[f"{key}/{name}"].to(param.device), key)
    else:
        optimizer = engine.optimizer
        for name, param in named:
            optimizer.state[param] = {"step": step_tensor.clone(),
                                      **{key: tensors[f"{key}/{name}"].to(param.device).clone()
                                         for key in ADAM_MOMENT_KEYS}}
    return adam_step


# --------------------------------------------------------------------------- completion marker


def _iter_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path


def write_complete_marker(directory: Path, state: TrainerState, expected_peer_files: list[str]) -> Path:
    """Write ``trainer_state.json`` then ``COMPLETE`` (last) listing rank 0's files and sizes.

    ``expected_peer_files`` are relative paths other ranks write into the merged checkpoint
    (their ZeRO partitions); verification checks they arrived.
    """
    (directory / TRAINER_STATE_FILE).write_text(state.to_json(), encoding="utf-8")
    manifest = {str(p.relative_to(directory)): p.stat().st_size for p in _iter_files(directory)}
    marker = {"format": CHECKPOINT_FORMAT, "step": state.step, "files": manifest,
              "peer_files": expected_peer_files, "written_at_s": time.time()}
    tmp = directory / f".{COMPLETE_FILE}.tmp"
    tmp.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, directory / COMPLETE_FILE)
    return directory / COMPLETE_FILE


def verify_checkpoint(directory: Path) -> TrainerState:
    """The checkpoint's :class:`TrainerState` once its marker and every listed file check out.

    Raises:
        IncompleteCheckpoint: no marker, a listed file missing or of another size, or peer
            files (other ranks' parts) missing.
    """
    marker_path = directory / COMPLETE_FILE
    if not marker_path.is_file():
        raise IncompleteCheckpoint(f"{directory}: no {COMPLETE_FILE} marker (checkpoint was not finished)")
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise IncompleteCheckpoint(f"{marker_path}: unreadable ({exc})") from None
    for rel, size in marker.get("files", {}).items():
        path = directory / rel
        if not path.is_file() or path.stat().st_size != size:
            raise IncompleteCheckpoint(f"{directory}: {rel} is missing or truncated")
    for rel in marker.get("peer_files", []):
        if not (directory / rel).is_file():
            raise IncompleteCheckpoint(f"{directory}: {rel} (another worker's part) is missing")
    state = TrainerState.read(directory)
    if state.step != marker.get("step"):
        raise IncompleteCheckpoint(f"{directory}: marker step {marker.get('step')} != trainer state {state.step}")
    return state


def zero_partition_files(world_size: int, zero_stage: int) -> list[str]:
    """Relative paths of the per-rank ZeRO optimizer partitions DeepSpeed writes (none at stage 0)."""
    if zero_stage == 0:
        return []
    return [f"{DEEPSPEED_DIR}/{DEEPSPEED_TAG}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            for rank in range(world_size)]


# --------------------------------------------------------------------------- restore plan


class RestoreSource(Enum):
    """Where a resumed worker group takes its state from."""

    DEEPSPEED = "deepspeed"  # same world size and ZeRO stage: engine.load_checkpoint, bit-exact
    CONSOLIDATED = "consolidated"  # anything else: model/ weights + optimizer/ moments


@dataclass(frozen=True)
class RestorePlan:
    """The decision :func:`plan_restore` takes for one checkpoint."""

    directory: Path
    state: TrainerState
    source: RestoreSource
    reason: str


def plan_restore(directory: Path, world_size: int, zero_stage: int, spec_fingerprint: str) -> RestorePlan:
    """Check a checkpoint and decide how to restore it at ``world_size`` workers.

    Raises:
        IncompleteCheckpoint: see :func:`verify_checkpoint`.
        ValueError: the checkpoint was written for another model or data spec.
    """
    state = verify_checkpoint(directory)
    if state.spec_fingerprint != spec_fingerprint:
        raise ValueError(f"checkpoint {directory} was written by a different model/data spec "
                         f"({state.spec_fingerprint} != {spec_fingerprint}); use a new --out directory")
    same_layout = state.world_size == world_size and state.zero_stage == zero_stage
    ds_dir = directory / DEEPSPEED_DIR / DEEPSPEED_TAG
    if same_layout and ds_dir.is_dir():
        return RestorePlan(directory, state, RestoreSource.DEEPSPEED,
                           f"same world size {world_size} and ZeRO stage {zero_stage}: DeepSpeed state")
    return RestorePlan(directory, state, RestoreSource.CONSOLIDATED,
                       f"written by {state.world_size} worker(s) at ZeRO {state.zero_stage}, resuming with "
                       f"{world_size} at ZeRO {zero_stage}: consolidated weights + optimizer moments")


def export_serving_checkpoint(checkpoint_dir: Path, destination: Path) -> Path:
    """Copy a checkpoint's ``model/`` to ``destination`` (replacing it), via a temp dir and a rename."""
    source = checkpoint_dir / MODEL_DIR
    if not (source / "config.json").is_file():
        raise IncompleteCheckpoint(f"{checkpoint_dir}: no {MODEL_DIR}/config.json to export")
    destination = Path(destination)
    tmp = destination.with_name(f".{destination.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    if destination.exists():
        shutil.rmtree(destination)
    os.replace(tmp, destination)
    return destination
