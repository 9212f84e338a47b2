"""Training throughput of the Ray Train + DeepSpeed path vs a plain torch loop, and recovery time.

1. tokens/s: the same model (a preset's), the same packed batches, the same AdamW settings and
   bias updates, timed per optimizer step (forward + backward + step + balance update):
     plain      one process, ``torch.optim.AdamW``, no Ray, no DeepSpeed, no process group
     ray+ds     ``expertmesh.train.train`` with 1 worker (the worker's own per-step timing),
                and "ray+ds wall": steps / wall seconds between step records, which also
                counts metric publishing, ``ray.train.report`` calls and the step-level all-reduces
   Reported: median over the steps after ``--warmup``, and the ratio ray+ds / plain.
2. recovery: a 2-worker tiny run whose rank-1 worker is killed (SIGKILL) a few seconds after
   its first checkpoint; seconds from the kill to (a) the new worker group's start record
   (restarted and restored) and (b) the next completed step.

Usage:
  python benchmarks/bench_train.py [--preset demo] [--steps 30] [--warmup 5] [--skip-recovery]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from expertmesh.train.balance import step_load, update_gate_bias
from expertmesh.train.data import prepare_data
from expertmesh.train.loop import learning_rate, parameter_groups
from expertmesh.train.objective import build_train_model
from expertmesh.train.spec import TrainSpec, preset, spec_from_dict

RECOVERY_STEPS = 16
RECOVERY_STEP_DELAY_S = 0.5
REGISTRATION_GRACE_S = 3.0
OBJECT_STORE_BYTES = 300 * 1024 * 1024


def _bench_spec(name: str, steps: int) -> TrainSpec:
    raw = preset(name).model_dump(mode="json")
    raw.update(steps=steps, workers=1, checkpoint_every=steps, eval_every=steps, log_every=10,
               name=f"bench-{name}")
    raw["optim"]["warmup_steps"] = min(raw["optim"]["warmup_steps"], steps)
    return spec_from_dict(raw)


def plain_loop_tokens_per_s(spec: TrainSpec, cache: Path, threads: int) -> list[float]:
    """Per-step tokens/s of a single-process torch loop on the spec's model and data."""
    torch.set_num_threads(threads)
    prepared = prepare_data(spec.data, cache, spec.model.max_position_embeddings)
    model = build_train_model(spec)
    optimizer = torch.optim.AdamW(parameter_groups(model, spec.optim.weight_decay), lr=spec.optim.lr,
                                  betas=spec.optim.betas, eps=1e-8)
    moe_layers = model.moe_layers()
    batches = prepared.train_dataset().batches(spec.micro_batch_size)
    tokens = spec.micro_batch_size * spec.data.seq_len
    rates = []
    for step in range(spec.steps):
        ids = torch.from_numpy(next(batches).input_ids)
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, spec.optim, spec.steps)
        loss = model(ids).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if spec.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.optim.grad_clip)
        optimizer.step()
        update_gate_bias(moe_layers, step_load(moe_layers), spec.balance.bias_update_speed)
        rates.append(tokens / (time.perf_counter() - started))
    return rates


def ray_tokens_per_s(spec: TrainSpec, out: Path, cache: Path) -> tuple[list[float], list[float], float]:
    """(per-step tokens/s from the worker, wall tokens/s between step records, total wall seconds)."""
    from expertmesh.train.trainer import train

    started = time.time()
    result = train(spec, out, cache_dir=cache)
    wall = time.time() - started
    steps = [r for r in _records(result.metrics_path) if r["kind"] == "step"]
    worker = [r["tokens_per_s"] for r in steps]
    tokens = spec.global_batch_size * spec.data.seq_len
    between = [tokens / (b["time"] - a["time"]) for a, b in zip(steps, steps[1:], strict=False)]
    return worker, between, wall


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def recovery_seconds(out: Path, cache: Path) -> dict[str, float]:
    """Kill rank 1 of a 2-worker tiny run after its first checkpoint; time the recovery."""
    from expertmesh.train.trainer import train

    raw = preset("tiny").model_dump(mode="json")
    raw.update(steps=RECOVERY_STEPS, workers=2, checkpoint_every=4, log_every=4, eval_every=RECOVERY_STEPS,
               max_failures=2, name="bench-recovery")
    spec = spec_from_dict(raw)
    pid_dir = out / "pids"
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = train(spec, out, cache_dir=cache, pid_dir=pid_dir, step_delay_s=RECOVERY_STEP_DELAY_S)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    seen_at = None
    kill_time = None
    while thread.is_alive():
        if seen_at is None and any(r["kind"] == "checkpoint" for r in _records(out / "metrics.jsonl")):
            seen_at = time.monotonic()
        if seen_at is not None and time.monotonic() - seen_at >= REGISTRATION_GRACE_S:
            kill_time = time.time()
            os.kill(int((pid_dir / "rank1.pid").read_text()), signal.SIGKILL)
            break
        time.sleep(0.05)
    thread.join()
    if "error" in outcome or kill_time is None:
        raise RuntimeError(f"recovery run failed: {outcome.get('error')}")
    records = _records(out / "metrics.jsonl")
    restart = min(r["time"] for r in records if r["kind"] == "start" and r["time"] > kill_time)
    next_step = min(r["time"] for r in records if r["kind"] == "step" and r["time"] > kill_time)
    resumed = [r for r in records if r["kind"] == "start"][-1]
    return {"kill_to_restart_s": restart - kill_time, "kill_to_next_step_s": next_step - kill_time,
            "resumed_at_step": float(resumed["step"])}


def _median_after(values: list[float], warmup: int) -> float:
    kept = values[warmup:] or values
    return statistics.median(kept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", help="model/data preset to time (default: demo)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
    parser.add_argument("--skip-recovery", action="store_true")
    args = parser.parse_args(argv)
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    import ray

    cpus = os.cpu_count() or 1
    ray.init(address="local", num_cpus=cpus, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
             log_to_driver=False)
    spec = _bench_spec(args.preset, args.steps)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        cache = root / "cache"
        prepare_data(spec.data, cache, spec.model.max_position_embeddings)  # not timed: both paths reuse it
        plain = plain_loop_tokens_per_s(spec, cache, threads=cpus)
        worker, between, wall = ray_tokens_per_s(spec, root / "ray-run", cache)
        plain_m, worker_m, between_m = (_median_after(v, args.warmup) for v in (plain, worker, between))
        params = spec.model.parameter_count()
        print(f"model: preset {args.preset!r}, {params.total / 1e6:.1f}M params ({params.active / 1e6:.1f}M active), "
              f"{spec.micro_batch_size}x{spec.data.seq_len} tokens/step, {args.steps} steps, "
              f"median of steps after {args.warmup}; {cpus} CPU(s), 1 worker")
        print(f"{'path':<24}{'tokens/s':>12}{'vs plain':>10}")
        print(f"{'plain torch loop':<24}{plain_m:>12,.0f}{1.0:>10.2f}")
        print(f"{'ray+ds (worker step)':<24}{worker_m:>12,.0f}{worker_m / plain_m:>10.2f}")
        print(f"{'ray+ds (wall per step)':<24}{between_m:>12,.0f}{between_m / plain_m:>10.2f}")
        print(f"ray+ds whole call (Ray start, data, worker start, DeepSpeed init, {args.steps} steps, "
              f"checkpoint, export): {wall:.1f} s")
        if not args.skip_recovery:
            recovery = recovery_seconds(root / "recovery", cache)
            print(f"recovery (tiny, 2 workers, SIGKILL rank 1 after a checkpoint): kill -> restarted and restored "
                  f"{recovery['kill_to_restart_s']:.1f} s, kill -> next completed step "
                  f"{recovery['kill_to_next_step_s']:.1f} s (resumed at step {recovery['resumed_at_step']:.0f})")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
