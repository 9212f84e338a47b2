"""Ray Train + DeepSpeed end to end on the tiny preset (real Ray, real worker processes).

- kill one of two workers by pid (SIGKILL) after a checkpoint: the run resumes from the
  last registered checkpoint, ends at the target step, and its final loss matches an
  uninterrupted run with the same seed;
- stop a 2-worker run half way, resume it with 1 worker from the same run directory: the
  consolidated checkpoint (weights + AdamW moments) resumes at another world size and ends
  close to the uninterrupted 2-worker run (same global batch, reached by grad accumulation).

On 2 cores: ~25 s for a clean run, ~45 s for the killed one (≈17 s of recovery).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from expertmesh.train.spec import preset, spec_from_dict

pytestmark = pytest.mark.integration

STEPS = 12
KILL_AFTER_CHECKPOINT = 4
REGISTRATION_GRACE_S = 3.0  # > Ray Train's 2 s controller poll: the step-4 checkpoint is registered
STEP_DELAY_S = 0.5  # room to kill mid-run
LOSS_TOLERANCE = 1e-3


def _spec():
    raw = preset("tiny").model_dump(mode="json")
    raw.update(steps=STEPS, workers=2, checkpoint_every=4, log_every=4, eval_every=STEPS, max_failures=2)
    raw["name"] = "tiny-fault"
    return spec_from_dict(raw)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False)
    yield ray
    if started_here:
        ray.shutdown()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train-cache")


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, cache_dir, tmp_path_factory):
    from expertmesh.train.trainer import train

    return train(_spec(), tmp_path_factory.mktemp("clean"), cache_dir=cache_dir)


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_uninterrupted_run_exports_a_serving_checkpoint(uninterrupted):
    from expertmesh.model import load_pretrained

    assert uninterrupted.final_step == STEPS and uninterrupted.restarts == 0
    assert uninterrupted.val_loss is not None and uninterrupted.val_loss < 6.3  # ln(512) = 6.24 at init
    assert load_pretrained(uninterrupted.checkpoint_dir).config.num_hidden_layers == 3
    assert uninterrupted.loss_curve_path is not None and uninterrupted.loss_curve_path.is_file()
    loads = _records(uninterrupted.expert_load_path)
    assert [r["step"] for r in loads] == [4, 8, 12] and len(loads[0]["tokens_per_expert"]) == 2


def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, cache_dir, tmp_path, uninterrupted):
    from expertmesh.train.trainer import train

    out, pid_dir = tmp_path / "run", tmp_path / "pids"
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = train(_spec(), out, cache_dir=cache_dir, pid_dir=pid_dir, step_delay_s=STEP_DELAY_S)
        except BaseException as exc:  # surfaced below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    checkpoint_seen_at = None
    killed_pid = None
    while thread.is_alive() and time.monotonic() < deadline:
        if checkpoint_seen_at is None and any(r["kind"] == "checkpoint" and r["step"] >= KILL_AFTER_CHECKPOINT
                                              for r in _records(out / "metrics.jsonl")):
            checkpoint_seen_at = time.monotonic()
        if checkpoint_seen_at is not None and time.monotonic() - checkpoint_seen_at >= REGISTRATION_GRACE_S:
            killed_pid = int((pid_dir / "rank1.pid").read_text())
            os.kill(killed_pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    assert killed_pid is not None, "never saw the step-4 checkpoint"
    kill_time = time.time()
    thread.join(timeout=180)
    assert not thread.is_alive(), "training did not finish after the kill"
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    records = _records(out / "metrics.jsonl")
    starts = [r for r in records if r["kind"] == "start"]
    assert len(starts) == 2 and result.restarts == 1
    resumed = starts[1]
    assert resumed["restore"] == "deepspeed" and KILL_AFTER_CHECKPOINT <= resumed["step"] < STEPS
    assert int((pid_dir / "rank1.pid").read_text()) != killed_pid
    assert result.final_step == STEPS
    assert abs(result.final_loss - uninterrupted.final_loss) <= LOSS_TOLERANCE
    assert abs(result.val_loss - uninterrupted.val_loss) <= LOSS_TOLERANCE
    first_step_after = min(r["time"] for r in records if r["kind"] == "step" and r["time"] > kill_time)
    print(f"kill -> next completed step: {first_step_after - kill_time:.1f} s")


def test_resume_with_a_different_worker_count(ray_cluster, cache_dir, tmp_path, uninterrupted):
    from expertmesh.train.trainer import train

    out = tmp_path / "run"
    half = train(_spec(), out, cache_dir=cache_dir, stop_at_step=STEPS // 2)
    assert half.final_step == STEPS // 2
    resumed = train(_spec(), out, workers=1, cache_dir=cache_dir)
    assert resumed.final_step == STEPS
    start = [r for r in _records(out / "metrics.jsonl") if r["kind"] == "start"][-1]
    assert start["world_size"] == 1 and start["restore"] == "consolidated" and start["step"] == STEPS // 2
    assert start["global_batch"] == 8 and start["grad_accum"] == 2  # the 2-worker global batch is kept
    assert abs(resumed.final_loss - uninterrupted.final_loss) <= 1e-2
    assert abs(resumed.val_loss - uninterrupted.val_loss) <= 1e-2


@pytest.mark.slow
def test_zero2_partitions_consolidate_for_a_smaller_worker_group(ray_cluster, cache_dir, tmp_path, uninterrupted):
    """ZeRO-2 shards the AdamW moments over the 2 workers; the checkpoint gathers them, so one
    worker resumes with the full state and follows the (mathematically identical) ZeRO-0 run."""
    from expertmesh.train.trainer import train

    spec = _spec().model_copy(update={"zero_stage": 2})
    out = tmp_path / "run"
    train(spec, out, cache_dir=cache_dir, stop_at_step=STEPS // 2)
    ray_checkpoints = sorted((out / "ray" / spec.name).glob("checkpoint_*"))
    assert any((c / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
               for c in ray_checkpoints)
    resumed = train(spec, out, workers=1, cache_dir=cache_dir)
    start = [r for r in _records(out / "metrics.jsonl") if r["kind"] == "start"][-1]
    assert start["restore"] == "consolidated" and start["world_size"] == 1
    assert resumed.final_step == STEPS
    assert abs(resumed.final_loss - uninterrupted.final_loss) <= 1e-2
