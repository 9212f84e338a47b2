"""Bad specs and impossible requests fail before anything starts, as one readable line; the
LR schedule and the global-batch rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertmesh.cli import main
from expertmesh.train.loop import deepspeed_config, learning_rate, plan_grad_accum
from expertmesh.train.spec import load_spec, preset, spec_from_dict
from expertmesh.train.trainer import preflight, resolve_spec, train


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_negative_steps_is_a_spec_error():
    with pytest.raises(ValueError, match=r"steps: Input should be greater than 0") as exc:
        resolve_spec(preset("tiny"), steps=-3)
    _one_line(exc)


def test_unknown_field_is_named(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\noptim: {lr: 0.001, momentum: 0.9}\n")
    with pytest.raises(ValueError, match=r"optim.momentum: Extra inputs are not permitted") as exc:
        load_spec(path)
    _one_line(exc)


def test_missing_data_dir_and_too_many_workers_are_reported_together(tmp_path: Path):
    raw = preset("tiny").model_dump(mode="json")
    raw["data"]["corpus_root"] = str(tmp_path / "nowhere")
    raw["workers"] = 5
    with pytest.raises(ValueError) as exc:
        preflight(spec_from_dict(raw), cpus=2)
    message = _one_line(exc)
    assert f"data.corpus_root={tmp_path / 'nowhere'} is not a directory" in message
    assert "workers=5 needs 5 CPUs (1 per worker) but only 2 are available" in message


def test_elastic_minimum_must_fit():
    raw = preset("tiny").model_dump(mode="json")
    raw.update(workers=3, elastic={"min_workers": 3, "max_workers": 4})
    with pytest.raises(ValueError, match=r"elastic.min_workers=3 needs 3 CPUs"):
        preflight(spec_from_dict(raw), cpus=2)


def test_unsupported_zero_stage_and_stop_step():
    raw = preset("tiny").model_dump(mode="json")
    raw["zero_stage"] = 3
    with pytest.raises(ValueError, match=r"zero_stage=3 is not supported"):
        preflight(spec_from_dict(raw), cpus=2)
    with pytest.raises(ValueError, match=r"stop_at_step=50 must be in \[1, steps=20\]"):
        preflight(preset("tiny"), cpus=2, stop_at_step=50)


def test_train_fails_before_starting_anything(tmp_path: Path):
    import ray

    was_running = ray.is_initialized()
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="workers=64 needs 64 CPUs"):
        train(preset("tiny"), out, workers=64)
    with pytest.raises(ValueError, match="steps: Input should be greater than 0"):
        train(preset("tiny"), out, steps=0)
    assert not out.exists()
    assert ray.is_initialized() == was_running


def test_cli_prints_one_error_line_and_exits_2(tmp_path: Path, capsys):
    for argv in (["train", "--preset", "tiny", "--steps", "-5"],
                 ["train", "--preset", "tiny", "--workers", "64", "--out", str(tmp_path / "r")],
                 ["train"],
                 ["train", str(tmp_path / "missing.yaml")]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def test_steps_override_shortens_warmup():
    spec = resolve_spec(preset("demo"), steps=10)
    assert spec.steps == 10 and spec.optim.warmup_steps == 10


def test_learning_rate_schedule():
    optim = preset("demo").optim.model_copy(update={"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 50})
    assert learning_rate(0, optim, 1000) == pytest.approx(6e-5)
    assert learning_rate(49, optim, 1000) == pytest.approx(3e-3)
    assert learning_rate(999, optim, 1000) == pytest.approx(3e-4)
    middle = learning_rate(524, optim, 1000)
    assert 3e-4 < middle < 3e-3
    constant = optim.model_copy(update={"schedule": "constant"})
    assert learning_rate(700, constant, 1000) == pytest.approx(3e-3)


def test_global_batch_is_kept_across_world_sizes_when_it_divides():
    spec = preset("tiny")  # micro batch 4
    assert plan_grad_accum(spec, world_size=1, target_global_batch=8) == (2, 8)
    assert plan_grad_accum(spec, world_size=2, target_global_batch=8) == (1, 8)
    assert plan_grad_accum(spec, world_size=3, target_global_batch=8) == (1, 12)  # cannot: say so
    config = deepspeed_config(spec, world_size=2, grad_accum=1)
    assert config["train_batch_size"] == 8 and config["zero_optimization"]["stage"] == spec.zero_stage
    assert config["bf16"]["enabled"] is False and config["optimizer"]["params"]["torch_adam"] is True
