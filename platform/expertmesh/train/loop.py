"""The per-worker training loop: one process of a Ray Train worker group running DeepSpeed.

Every worker runs :func:`run_worker` with the same spec. Nothing here imports Ray: the loop
talks to its surroundings through a :class:`WorkerSession` (``RayWorkerSession`` in
``trainer.py``, :class:`LocalSession` for one process without Ray), so it runs and is tested
the same way inside and outside a cluster.

One optimizer step, on every rank::

    for each of grad_accum micro-batches:        # rank r reads global samples
        loss = engine(ids_BS1).total              #   [g0 + r*B, g0 + (r+1)*B) of its micro-step
        engine.backward(loss); engine.step()      # DeepSpeed all-reduces grads at the boundary
    load_LE = all_reduce(tokens_per_expert)       # NOTE: collective, every rank, every step
    bias += gamma * sign(mean(load) - load)       # identical on every rank
    metrics = all_reduce([loss terms]) / W        # NOTE: collective

Then, by step number: metrics report (``log_every``), validation loss (``eval_every``),
checkpoint (``checkpoint_every``, and always at the last step). All ranks take the same
branches, so collectives and ``report`` calls line up.

Global batch: ``micro_batch_size * grad_accum * workers`` of the spec, or of the checkpoint
being resumed. At another world size ``W`` the loop keeps it by changing ``grad_accum`` when
``micro_batch_size * W`` divides it; otherwise the global batch changes and the start
record says so.

Shape letters: B micro-batch per rank, S1 ``seq_len + 1``, L MoE layers, E experts.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from expertmesh.model.checkpoint import Provenance
from expertmesh.train.balance import LoadAccumulator, LoadSummary, reset_expert_load, step_load, update_gate_bias
from expertmesh.train.checkpointing import (
    DEEPSPEED_DIR,
    DEEPSPEED_TAG,
    MODEL_DIR,
    OPTIMIZER_DIR,
    RestorePlan,
    RestoreSource,
    TrainerState,
    gather_optimizer_state,
    load_serving_weights,
    plan_restore,
    restore_optimizer_state,
    save_optimizer_state,
    save_serving_model,
    write_complete_marker,
    zero_partition_files,
)
from expertmesh.train.data import PreparedData, prepare_data
from expertmesh.train.objective import TrainModel, build_train_model, evaluate_lm_loss, spec_fingerprint
from expertmesh.train.spec import OptimSpec, TrainSpec

SUPPORTED_ZERO_STAGES = (0, 1, 2)
ADAM_EPS = 1e-8
_NO_PRINT_STEPS = 10**9  # DeepSpeed's own step logging: off


@dataclass(frozen=True)
class LoopOptions:
    """Per-invocation knobs that are not part of the spec.

    Attributes:
        cache_dir: tokenizer and token-stream cache (shared by the workers of one machine).
        threads_per_worker: ``torch.set_num_threads`` in each worker.
        stop_at_step: checkpoint and stop at this step (the LR schedule still spans ``spec.steps``).
        scratch_dir: where workers stage checkpoints before Ray Train persists them (None: temp dir).
        pid_dir: test hook: each worker writes ``rank{r}.pid`` here when it starts.
        step_delay_s: test hook: sleep this long after every step (to make room for a kill).
    """

    cache_dir: str
    threads_per_worker: int = 1
    stop_at_step: int | None = None
    scratch_dir: str | None = None
    pid_dir: str | None = None
    step_delay_s: float = 0.0


class WorkerSession(Protocol):
    """What the loop needs from its surroundings (Ray Train, or nothing)."""

    rank: int
    world_size: int

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The newest registered checkpoint as a local directory, or None."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Report metrics (and a checkpoint staged in ``checkpoint_dir``); a barrier on all ranks."""

    def publish(self, records: list[dict[str, Any]]) -> None:
        """Send records to the driver's metrics sink (rank 0 calls it)."""


# --------------------------------------------------------------------------- schedule and config


def learning_rate(step: int, optim: OptimSpec, total_steps: int) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr`` or constant.

    Example (lr=3e-3, min_lr=3e-4, warmup 50, 1000 steps): step 0 -> 6e-5, step 49 -> 3e-3,
    step 525 -> 1.65e-3, step 999 -> ~3e-4.
    """
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    span = max(1, total_steps - optim.warmup_steps - 1)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))


def plan_grad_accum(spec: TrainSpec, world_size: int, target_global_batch: int) -> tuple[int, int]:
    """``(grad_accum, global_batch)`` for ``world_size`` workers, keeping ``target_global_batch`` if it can."""
    per_micro_step = spec.micro_batch_size * world_size
    if target_global_batch % per_micro_step == 0:
        return target_global_batch // per_micro_step, target_global_batch
    return spec.grad_accum, spec.grad_accum * per_micro_step


def deepspeed_config(spec: TrainSpec, world_size: int, grad_accum: int) -> dict[str, Any]:
    """The DeepSpeed config for a spec: ZeRO stage, torch AdamW, clipping, fp32 (no bf16/fp16)."""
    if spec.zero_stage not in SUPPORTED_ZERO_STAGES:
        raise ValueError(f"zero_stage={spec.zero_stage} is not supported (supported: {SUPPORTED_ZERO_STAGES})")
    return {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": spec.micro_batch_size * grad_accum * world_size,
        "optimizer": {"type": "AdamW", "params": {
            "lr": spec.optim.lr, "betas": list(spec.optim.betas), "eps": ADAM_EPS,
            "weight_decay": spec.optim.weight_decay, "torch_adam": True}},
        "gradient_clipping": spec.optim.grad_clip or 0.0,
        "zero_optimization": {"stage": spec.zero_stage},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": _NO_PRINT_STEPS,
        "wall_clock_breakdown": False,
    }


def parameter_groups(model: TrainModel, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices decay, vectors (norm weights) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------- collectives


def _group_sum(tensor: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) of a CPU tensor over the worker group; identity on one worker. NOTE: collective.

    NCCL only reduces CUDA tensors: the sum then travels through the current GPU and back.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        on_gpu = dist.get_backend() == "nccl"
        out = tensor.to(torch.device("cuda", torch.cuda.current_device())) if on_gpu else tensor.clone()
        dist.all_reduce(out)
        return out.cpu() if on_gpu else out
    return tensor


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()  # NOTE: every rank must reach it


def init_local_process_group() -> None:
    """A one-process gloo group (what Ray Train sets up for real workers), for :class:`LocalSession`."""
    if dist.is_initialized():
        return
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)  # what DeepSpeed reads; a launcher would set them
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


# --------------------------------------------------------------------------- the loop


@dataclass
class _Progress:
    step: int
    next_sample: int
    tokens_seen: int


def _write_pid(pid_dir: str | None, rank: int) -> None:
    if pid_dir is None:
        return
    path = Path(pid_dir)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".rank{rank}.pid.tmp"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, path / f"rank{rank}.pid")


def _remove_stale_staging(scratch_dir: str | None, rank: int) -> None:
    """Drop this rank's staged checkpoints left by a worker that was killed before reporting them."""
    if scratch_dir is None or not Path(scratch_dir).is_dir():
        return
    for stale in Path(scratch_dir).glob(f"ckpt-*-rank{rank}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _initialize_engine(model: TrainModel, spec: TrainSpec, world_size: int, grad_accum: int) -> Any:
    import deepspeed  # imported late: DS_ACCELERATOR must be set before (the worker's runtime env)

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model, spec.optim.weight_decay),
        config=deepspeed_config(spec, world_size, grad_accum))
    return engine


def _restore(session: WorkerSession, spec: TrainSpec) -> RestorePlan | None:
    with session.latest_checkpoint() as directory:
        if directory is None:
            return None
        return plan_restore(Path(directory), session.world_size, spec.zero_stage, spec_fingerprint(spec))


def run_worker(spec: TrainSpec, options: LoopOptions, session: WorkerSession) -> TrainerState:
    """Train ``spec`` on this worker until ``spec.steps`` (or ``options.stop_at_step``); returns the end state.

    Resumes from ``session.latest_checkpoint()`` when there is one (see ``checkpointing.py``).
    """
    torch.set_num_threads(max(1, options.threads_per_worker))
    rank, world = session.rank, session.world_size
    _write_pid(options.pid_dir, rank)
    _remove_stale_staging(options.scratch_dir, rank)
    prepared = prepare_data(spec.data, options.cache_dir, spec.model.max_position_embeddings)
    model = build_train_model(spec)
    plan = _restore(session, spec)
    if plan is not None and plan.source is RestoreSource.CONSOLIDATED:
        load_serving_weights(model, plan.directory / MODEL_DIR)
    target_global = plan.state.global_batch_size if plan is not None else spec.global_batch_size
    grad_accum, global_batch = plan_grad_accum(spec, world, target_global)
    engine = _initialize_engine(model, spec, world, grad_accum)
    if plan is not None and plan.source is RestoreSource.DEEPSPEED:
        load_path, _ = engine.load_checkpoint(str(plan.directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {plan.directory / DEEPSPEED_DIR}")
    elif plan is not None:
        restore_optimizer_state(engine, model, plan.directory / OPTIMIZER_DIR)
    reset_expert_load(model.moe_layers())
    progress = _Progress(step=plan.state.step if plan else 0, next_sample=plan.state.next_sample if plan else 0,
                         tokens_seen=plan.state.tokens_seen if plan else 0)
    end_step = spec.steps if options.stop_at_step is None else min(spec.steps, options.stop_at_step)
    if rank == 0:
        session.publish([{
            "kind": "start", "time": time.time(), "world_size": world, "step": progress.step,
            "restore": None if plan is None else plan.source.value,
            "restore_reason": None if plan is None else plan.reason,
            "grad_accum": grad_accum, "global_batch": global_batch,
            "global_batch_changed_from": None if global_batch == target_global else target_global,
            "end_step": end_step, "pid": os.getpid()}])
    runner = _StepRunner(spec, options, session, engine, model, prepared, grad_accum, global_batch)
    return runner.run(progress, end_step)


class _StepRunner:
    """The loop body, holding what every step needs."""

    def __init__(self, spec: TrainSpec, options: LoopOptions, session: WorkerSession, engine: Any,
                 model: TrainModel, prepared: PreparedData, grad_accum: int, global_batch: int) -> None:
        self.spec, self.options, self.session = spec, options, session
        self.engine, self.model, self.prepared = engine, model, prepared
        self.grad_accum, self.global_batch = grad_accum, global_batch
        self.rank, self.world = session.rank, session.world_size
        self.moe_layers = model.moe_layers()
        self.layer_ids = model.moe_layer_ids()
        self.loads = LoadAccumulator()
        self.fingerprint = spec_fingerprint(spec)

    def _batches(self, start_sample: int) -> Iterator[torch.Tensor]:
        dataset = self.prepared.train_dataset(self.rank, self.world)
        for batch in dataset.batches(self.spec.micro_batch_size, start_sample=start_sample):
            yield torch.from_numpy(batch.input_ids)  # [B, S1]

    def run(self, progress: _Progress, end_step: int) -> TrainerState:
        batches = self._batches(progress.next_sample)
        samples_per_step = self.global_batch
        tokens_per_step = samples_per_step * self.spec.data.seq_len
        while progress.step < end_step:
            started = time.perf_counter()
            lr = learning_rate(progress.step, self.spec.optim, self.spec.steps)
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr
            terms_sum = torch.zeros(4, dtype=torch.float64)  # total, lm, mtp, balance
            for _ in range(self.grad_accum):
                terms = self.engine(next(batches).to(self.engine.device))
                self.engine.backward(terms.total)
                self.engine.step()
                terms_sum += torch.tensor([float(terms.total.detach()), float(terms.lm_loss),
                                           float(terms.mtp_loss) if terms.mtp_loss is not None else 0.0,
                                           float(terms.balance_loss) if terms.balance_loss is not None else 0.0],
                                          dtype=torch.float64)
            load_LE = step_load(self.moe_layers, _group_sum)  # NOTE: collective
            update_gate_bias(self.moe_layers, load_LE, self.spec.balance.bias_update_speed)
            self.loads.add(load_LE)
            mean_terms = _group_sum(terms_sum) / (self.grad_accum * self.world)  # NOTE: collective
            step_time_s = time.perf_counter() - started
            progress.step += 1
            progress.next_sample += samples_per_step
            progress.tokens_seen += tokens_per_step
            self._after_step(progress, end_step, mean_terms, LoadSummary.of(load_LE), lr, step_time_s,
                             tokens_per_step)
            if self.options.step_delay_s > 0:
                time.sleep(self.options.step_delay_s)
        return self._state(progress)

    def _after_step(self, progress: _Progress, end_step: int, mean_terms: torch.Tensor, step_load_summary: LoadSummary,
                    lr: float, step_time_s: float, tokens_per_step: int) -> None:
        step = progress.step
        last = step >= end_step
        records: list[dict[str, Any]] = []
        metrics: dict[str, Any] = {
            "step": step, "loss": float(mean_terms[0]), "lm_loss": float(mean_terms[1]), "lr": lr,
            "tokens": progress.tokens_seen, "step_time_s": step_time_s,
            "tokens_per_s": tokens_per_step / max(step_time_s, 1e-9),
            "balance_max_over_mean": step_load_summary.average, "world_size": self.world}
        if self.model.mtp is not None:
            metrics["mtp_loss"] = float(mean_terms[2])
        if self.model.seq_balance is not None:
            metrics["balance_loss"] = float(mean_terms[3])
        records.append({"kind": "step", "time": time.time(), **metrics})
        log_now = step % self.spec.log_every == 0 or last
        if log_now:
            interval = self.loads.take()
            if interval is not None:
                records.append({"kind": "expert_load", "time": time.time(), "step": step,
                                "steps": self.spec.log_every, **interval.to_record(self.layer_ids)})
                metrics["expert_load_max_over_mean"] = interval.average
                metrics["expert_load_max_over_mean_per_layer"] = [float(v) for v in interval.max_over_mean_L]
        if step % self.spec.eval_every == 0 or last:
            metrics["val_loss"] = self._evaluate()
            records.append({"kind": "eval", "time": time.time(), "step": step, "val_loss": metrics["val_loss"]})
        checkpoint_dir = None
        if step % self.spec.checkpoint_every == 0 or last:
            checkpoint_dir = self._write_checkpoint(progress)
            records.append({"kind": "checkpoint", "time": time.time(), "step": step})
        if self.rank == 0:
            self.session.publish(records)
        if log_now or checkpoint_dir is not None:
            self.session.report(metrics, checkpoint_dir)  # NOTE: a barrier on all ranks
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def _evaluate(self) -> float:
        validation = self.prepared.validation_set()
        batches = validation.batches(self.spec.micro_batch_size, rank=self.rank, world_size=self.world,
                                     max_sequences=self.spec.eval_max_sequences)
        nats, count = evaluate_lm_loss(self.model, batches, device=self.engine.device)
        total = _group_sum(torch.tensor([nats, float(count)], dtype=torch.float64))  # NOTE: collective
        reset_expert_load(self.moe_layers)  # evaluation must not count as training load
        return float(total[0] / max(total[1], 1.0))

    def _state(self, progress: _Progress) -> TrainerState:
        return TrainerState(step=progress.step, next_sample=progress.next_sample,
                            spec_fingerprint=self.fingerprint, world_size=self.world,
                            zero_stage=self.spec.zero_stage, global_batch_size=self.global_batch,
                            tokens_seen=progress.tokens_seen, wall_time_s=time.time())

    def _write_checkpoint(self, progress: _Progress) -> Path:
        """Stage this rank's part of a checkpoint in a local directory (see ``checkpointing.py``)."""
        if self.options.scratch_dir is not None:
            Path(self.options.scratch_dir).mkdir(parents=True, exist_ok=True)
        local = Path(tempfile.mkdtemp(prefix=f"ckpt-{progress.step:06d}-rank{self.rank}-",
                                      dir=self.options.scratch_dir))
        self.engine.save_checkpoint(str(local / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)
        moments, adam_step = gather_optimizer_state(self.engine, self.model)  # NOTE: collective under ZeRO
        if self.rank == 0:
            save_serving_model(self.model, local / MODEL_DIR, self.prepared.tokenizer_dir,
                               Provenance(f"training {self.spec.name}", progress.step))
            save_optimizer_state(local / OPTIMIZER_DIR, moments, adam_step)
        _barrier()  # every rank's files are written before the marker
        if self.rank == 0:
            peers = [f for f in zero_partition_files(self.world, self.spec.zero_stage) if "zero_pp_rank_0_" not in f]
            write_complete_marker(local, self._state(progress), peers)
        return local


# --------------------------------------------------------------------------- without Ray


class LocalSession:
    """A one-process :class:`WorkerSession`: checkpoints go to ``checkpoint_root/step_N``, records to a list."""

    def __init__(self, checkpoint_root: Path) -> None:
        self.rank = 0
        self.world_size = 1
        self.checkpoint_root = Path(checkpoint_root)
        self.records: list[dict[str, Any]] = []
        self.reports: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        candidates = sorted(self.checkpoint_root.glob("step_*")) if self.checkpoint_root.is_dir() else []
        yield candidates[-1] if candidates else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            destination = self.checkpoint_root / f"step_{int(metrics['step']):08d}"
            shutil.rmtree(destination, ignore_errors=True)
            shutil.copytree(checkpoint_dir, destination)

    def publish(self, records: list[dict[str, Any]]) -> None:
        self.records.extend(records)
