"""``train(spec, out_dir)``: a Ray Train ``TorchTrainer`` running the DeepSpeed loop on every worker.

What one call does, in order:

1. resolve the spec (``--steps``/``--workers`` overrides, re-validated) and check everything
   that can be checked before a process starts (:func:`preflight`): one ``ValueError`` line;
2. prepare the data once on the driver (tokenizer, token caches) and the unigram baseline;
3. start Ray locally if it is not running, a metrics buffer actor, and the trainer:
   ``ScalingConfig(num_workers=N or (min, max))``, ``FailureConfig(max_failures)``,
   ``RunConfig(storage_path=<out>/ray, name=spec.name)``, ``CheckpointConfig(num_to_keep)``;
   workers get ``DS_ACCELERATOR=cpu`` (no GPU) through their runtime env and a gloo (CPU) or
   NCCL (GPU) process group from Ray Train;
4. while it runs, drain the buffer into ``metrics.jsonl``/``expert_load.jsonl`` and call
   ``on_record`` (the CLI's progress bar);
5. export the last checkpoint's ``model/`` to ``<out>/checkpoint`` (config.json, safetensors,
   tokenizer files), plot ``loss_curve.png``, write ``run.json``.

Fault tolerance is Ray Train's: a dead worker process fails the worker group; the controller
restarts it (``max_failures`` times) and every worker resumes from the latest *registered*
checkpoint (``ray.train.get_checkpoint()``), which ``checkpointing.plan_restore`` checks.
Calling ``train`` again with the same ``out_dir`` and spec name resumes that run (Ray Train
reloads its checkpoint index from storage), with any number of workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from expertmesh.train.checkpointing import export_serving_checkpoint, verify_checkpoint
from expertmesh.train.data import prepare_data
from expertmesh.train.loop import SUPPORTED_ZERO_STAGES, LoopOptions, run_worker
from expertmesh.train.monitor import (
    MetricsBuffer,
    ProgressState,
    RunFiles,
    RunLog,
    loss_history,
    plot_loss_curve,
    read_records,
)
from expertmesh.train.spec import TrainSpec, spec_from_dict

RecordCallback = Callable[[dict[str, Any]], None]
POLL_INTERVAL_S = 0.5
DEFAULT_OBJECT_STORE_BYTES = 300 * 1024 * 1024


@dataclass(frozen=True)
class TrainResult:
    """What a finished :func:`train` call produced.

    Attributes:
        out_dir: the run directory.
        checkpoint_dir: ``<out>/checkpoint`` in the serving layout (``load_pretrained`` loads it).
        ray_checkpoint_dir: the Ray Train checkpoint it was exported from.
        final_step: steps completed.
        final_loss: training loss of the last step (None if no step ran in this call's history).
        val_loss: last validation loss (nats/token).
        unigram_baseline_nats: validation cross-entropy of the unigram model (the bar to beat).
        restarts: worker-group restarts during this call (failures recovered from).
        elapsed_s: wall time of the call.
        metrics_path, expert_load_path, loss_curve_path: the run files.
    """

    out_dir: Path
    checkpoint_dir: Path
    ray_checkpoint_dir: Path
    final_step: int
    final_loss: float | None
    val_loss: float | None
    unigram_baseline_nats: float
    restarts: int
    elapsed_s: float
    metrics_path: Path
    expert_load_path: Path
    loss_curve_path: Path | None


# --------------------------------------------------------------------------- checks before start


def resolve_spec(spec: TrainSpec, workers: int | None = None, steps: int | None = None) -> TrainSpec:
    """Apply CLI overrides and validate again (a bad override is a spec error like any other).

    A ``steps`` override below ``optim.warmup_steps`` shortens the warmup to ``steps`` so that
    ``--steps 20`` works with any preset.
    """
    raw = spec.model_dump(mode="json")
    if workers is not None:
        raw["workers"] = workers
        if spec.elastic is not None and not spec.elastic.min_workers <= workers <= spec.elastic.max_workers:
            raw["elastic"] = None  # an explicit worker count overrides the elastic range
    if steps is not None:
        raw["steps"] = steps
        if isinstance(steps, int) and 0 < steps < spec.optim.warmup_steps:
            raw["optim"]["warmup_steps"] = steps
    return spec_from_dict(raw, source="spec (with command-line overrides)")


def available_cpus() -> int:
    """Free CPUs of the Ray cluster when connected, else this machine's (what a local ``ray.init`` gets)."""
    import ray

    if ray.is_initialized():
        return int(ray.available_resources().get("CPU", 0))
    return os.cpu_count() or 1


def preflight(spec: TrainSpec, cpus: int, stop_at_step: int | None = None) -> None:
    """Everything checkable before Ray starts; raises one readable ``ValueError`` line."""
    problems: list[str] = []
    if spec.zero_stage not in SUPPORTED_ZERO_STAGES:
        problems.append(f"zero_stage={spec.zero_stage} is not supported by this trainer "
                        f"(supported: {', '.join(map(str, SUPPORTED_ZERO_STAGES))})")
    root = spec.data.corpus_root
    if root is not None and not Path(root).is_dir():
        problems.append(f"data.corpus_root={root} is not a directory")
    needed = spec.elastic.min_workers if spec.elastic is not None else spec.workers
    if needed > cpus:
        what = "elastic.min_workers" if spec.elastic is not None else "workers"
        problems.append(f"{what}={needed} needs {needed} CPUs (1 per worker) but only {cpus} are available")
    if stop_at_step is not None and not 0 < stop_at_step <= spec.steps:
        problems.append(f"stop_at_step={stop_at_step} must be in [1, steps={spec.steps}]")
    if problems:
        raise ValueError("; ".join(problems))


# --------------------------------------------------------------------------- the Ray side


class RayWorkerSession:
    """:class:`expertmesh.train.loop.WorkerSession` over ``ray.train`` (inside a Ray Train worker)."""

    def __init__(self, sink: Any) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self._sink = sink

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = None if checkpoint_dir is None else ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(metrics, checkpoint=checkpoint)

    def publish(self, records: list[dict[str, Any]]) -> None:
        self._sink.put.remote(records)  # fire and forget: the driver drains the buffer


def ray_train_worker(config: dict[str, Any]) -> None:
    """The ``train_loop_per_worker`` of the ``TorchTrainer`` (runs in each worker process)."""
    spec = TrainSpec.model_validate(config["spec"])
    options = LoopOptions(**config["options"])
    run_worker(spec, options, RayWorkerSession(config["sink"]))


def _ensure_ray(address: str | None) -> None:
    """Connect to ``address`` or start a private local instance (never attach to a stranger's cluster)."""
    import ray

    if ray.is_initialized():
        return
    if address is None:
        ray.init(address="local", object_store_memory=DEFAULT_OBJECT_STORE_BYTES,
                 include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


def _scaling(spec: TrainSpec, cpus: int, use_gpu: bool) -> tuple[Any, int]:
    from ray.train import ScalingConfig

    most = spec.elastic.max_workers if spec.elastic is not None else spec.workers
    cpus_per_worker = max(1, cpus // most)
    num_workers: int | tuple[int, int] = (
        (spec.elastic.min_workers, spec.elastic.max_workers) if spec.elastic is not None else spec.workers)
    return ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                         resources_per_worker={"CPU": cpus_per_worker}), cpus_per_worker


def train(
    spec: TrainSpec,
    out_dir: Path | str,
    workers: int | None = None,
    steps: int | None = None,
    *,
    stop_at_step: int | None = None,
    on_record: RecordCallback | None = None,
    cache_dir: Path | str | None = None,
    pid_dir: Path | str | None = None,
    step_delay_s: float = 0.0,
    ray_address: str | None = None,
) -> TrainResult:
    """Train (or resume) ``spec`` into ``out_dir`` on Ray Train + DeepSpeed; see the module docstring.

    Args:
        spec: the training spec (``load_spec`` / ``preset``).
        out_dir: run directory; an existing one with the same spec name is resumed.
        workers: override ``spec.workers`` (drops an elastic range it falls outside).
        steps: override ``spec.steps``.
        stop_at_step: checkpoint and return at this step (resume later with another call).
        on_record: called on the driver for every record as it arrives (progress display).
        cache_dir: tokenizer/token cache (default ``<out>/cache``; shared by the workers).
        pid_dir, step_delay_s: test hooks (see :class:`expertmesh.train.loop.LoopOptions`).
        ray_address: cluster to connect to when Ray is not initialised in this process
            (``"auto"``, ``"ray://host:10001"``...); None starts a private local instance.

    Raises:
        ValueError: a spec or resource problem found before anything started.
        RuntimeError: training failed after ``max_failures`` restarts.
    """
    import ray

    started = time.time()
    spec = resolve_spec(spec, workers=workers, steps=steps)
    if ray.is_initialized() or ray_address is None:  # else: checked once connected
        preflight(spec, available_cpus(), stop_at_step)
    files = RunFiles(Path(out_dir).resolve())
    files.root.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir).resolve() if cache_dir is not None else files.cache
    prepared = prepare_data(spec.data, cache, spec.model.max_position_embeddings)
    baseline = prepared.unigram_baseline_nats()

    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    _ensure_ray(ray_address)
    cpus = available_cpus()
    preflight(spec, cpus, stop_at_step)  # the cluster may be smaller than this machine
    use_gpu = int(ray.cluster_resources().get("GPU", 0)) >= (spec.elastic.max_workers if spec.elastic else spec.workers)
    scaling, cpus_per_worker = _scaling(spec, cpus, use_gpu)
    options = LoopOptions(cache_dir=str(cache), threads_per_worker=cpus_per_worker, stop_at_step=stop_at_step,
                          scratch_dir=str(files.staging), pid_dir=None if pid_dir is None else str(pid_dir),
                          step_delay_s=step_delay_s)
    sink = ray.remote(MetricsBuffer).options(num_cpus=0).remote()
    env_vars = {} if use_gpu else {"DS_ACCELERATOR": "cpu"}
    trainer = TorchTrainer(
        ray_train_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "options": asdict(options), "sink": sink},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=RunConfig(
            name=spec.name, storage_path=str(files.ray_storage),
            failure_config=FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoints_to_keep),
            worker_runtime_env={"env_vars": env_vars}),
    )
    log = RunLog(files)
    progress = ProgressState(end_step=stop_at_step or spec.steps)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised on the calling thread below
            outcome["error"] = exc

    def pump() -> None:
        for record in log.append(ray.get(sink.drain.remote())):
            progress.update(record)
            if on_record is not None:
                on_record(record)

    thread = threading.Thread(target=fit, name="expertmesh-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(POLL_INTERVAL_S)
        pump()
    pump()
    ray.kill(sink)
    shutil.rmtree(files.staging, ignore_errors=True)  # parts staged by workers killed mid-checkpoint
    if "error" in outcome:
        raise RuntimeError(f"training failed: {outcome['error']}") from outcome["error"]
    result = outcome["result"]
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint in {files.ray_storage}")
    ray_checkpoint = Path(result.checkpoint.path)
    with result.checkpoint.as_directory() as local:  # the storage path itself when storage is local
        state = verify_checkpoint(Path(local))
        export_serving_checkpoint(Path(local), files.checkpoint)
    run_records = read_records(files.metrics)  # the whole run, earlier calls on this directory included
    history = loss_history(run_records)
    plot = plot_loss_curve(run_records, files.loss_curve, baseline, title=f"{spec.name}: loss")
    outcome_summary = TrainResult(
        out_dir=files.root, checkpoint_dir=files.checkpoint, ray_checkpoint_dir=ray_checkpoint,
        final_step=state.step, final_loss=history.losses[-1] if history.losses else None,
        val_loss=history.val_losses[-1] if history.val_losses else None, unigram_baseline_nats=baseline,
        restarts=progress.restarts, elapsed_s=time.time() - started, metrics_path=files.metrics,
        expert_load_path=files.expert_load, loss_curve_path=plot)
    _write_summary(files, spec, outcome_summary)
    return outcome_summary


def _write_summary(files: RunFiles, spec: TrainSpec, result: TrainResult) -> None:
    payload = {"spec": spec.model_dump(mode="json"),
               "result": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}}
    files.summary.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def greedy_sample(checkpoint_dir: Path | str, prompt: str, max_new_tokens: int = 80) -> str:
    """Greedy continuation of ``prompt`` by an exported checkpoint (the demo's "does it look like Python")."""
    from expertmesh.model import load_pretrained
    from expertmesh.train.objective import greedy_continuation
    from expertmesh.train.tokenizer import EOS_ID, load_tokenizer

    model = load_pretrained(checkpoint_dir)
    tokenizer = load_tokenizer(checkpoint_dir)
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    new = greedy_continuation(model, ids, max_new_tokens, stop_ids=(EOS_ID,))
    return prompt + tokenizer.decode(new)

