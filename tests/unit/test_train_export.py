"""Checkpoint pieces without Ray: the serving export (expertmesh and transformers give the same
logits), MTP tensors in V3's layout, world-size independent optimizer state, the completion
marker and the restore decision."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from expertmesh.model import load_pretrained
from expertmesh.train.balance import step_load, update_gate_bias
from expertmesh.train.checkpointing import (
    IncompleteCheckpoint,
    RestoreSource,
    TrainerState,
    export_serving_checkpoint,
    gather_optimizer_state,
    load_serving_weights,
    plan_restore,
    restore_optimizer_state,
    save_optimizer_state,
    save_serving_model,
    verify_checkpoint,
    write_complete_marker,
)
from expertmesh.train.objective import TrainModel, build_train_model, spec_fingerprint
from expertmesh.train.spec import preset, spec_from_dict
from expertmesh.train.tokenizer import save_tokenizer, train_tokenizer
from expertmesh.train.trainer import greedy_sample

BATCH, SEQ = 4, 32


def _spec(mtp: bool = False):
    raw = preset("tiny").model_dump(mode="json")
    if mtp:
        raw["model"]["num_nextn_predict_layers"] = 1
        raw["mtp"]["enabled"] = True
    return spec_from_dict(raw)


def _trained(spec, steps: int = 8, seed: int = 0) -> tuple[TrainModel, torch.optim.Optimizer]:
    """A few AdamW steps with bias updates, so weights and gate biases are no longer at init."""
    model = build_train_model(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(3, spec.model.vocab_size, (BATCH, SEQ + 1), generator=generator)
        loss = model(ids).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        update_gate_bias(model.moe_layers(), step_load(model.moe_layers()), spec.balance.bias_update_speed)
    return model, optimizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    texts = ["def add(a, b):\n    return a + b\n", "import os\n\nclass A:\n    pass\n"] * 20
    directory = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(texts, vocab_size=300), directory, model_max_length=128)
    return directory


@pytest.mark.parametrize("mtp", [False, True], ids=["plain", "mtp"])
def test_export_loads_in_expertmesh_and_transformers_with_equal_logits(tmp_path, tokenizer_dir, mtp):
    transformers = pytest.importorskip("transformers")
    spec = _spec(mtp)
    model, _ = _trained(spec)
    assert float(model.lm.moe_layers()[0].gate.e_score_correction_bias.abs().max()) > 0
    out = save_serving_model(model, tmp_path / "ckpt", tokenizer_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    ids = torch.randint(3, spec.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model.lm.eval()(ids)
        ours = load_pretrained(out)(ids)
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(out).eval()
        theirs = hf(ids).logits
    assert expected.abs().max() > 0.5
    assert (ours - expected).abs().max().item() <= 1e-5
    assert (theirs - ours).abs().max().item() <= 1e-4
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer("def f():")["input_ids"]) == "def f():"
    assert greedy_sample(out, "def ", max_new_tokens=4).startswith("def ")


def test_mtp_tensors_use_v3_names_and_round_trip(tmp_path, tokenizer_dir):
    spec = _spec(mtp=True)
    model, _ = _trained(spec, steps=3)
    out = save_serving_model(model, tmp_path / "ckpt", tokenizer_dir)
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    n = spec.model.num_hidden_layers
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "mlp.gate.weight",
                 "mlp.gate.e_score_correction_bias", "self_attn.kv_b_proj.weight"):
        assert f"model.layers.{n}.{name}" in keys
    fresh = build_train_model(spec.model_copy(update={"seed": 7}))
    load_serving_weights(fresh, out)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_optimizer_state_round_trip_gives_the_same_next_step(tmp_path):
    spec = _spec()
    model, optimizer = _trained(spec, steps=4)
    moments, adam_step = gather_optimizer_state(SimpleNamespace(optimizer=optimizer), model)
    assert adam_step == 4
    save_optimizer_state(tmp_path / "optimizer", moments, adam_step)
    clone = build_train_model(spec)
    clone.load_state_dict(model.state_dict())
    clone_optimizer = torch.optim.AdamW(clone.parameters(), lr=3e-3)
    assert restore_optimizer_state(SimpleNamespace(optimizer=clone_optimizer), clone, tmp_path / "optimizer") == 4
    ids = torch.randint(3, spec.model.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(9))
    for m, opt in ((model, optimizer), (clone, clone_optimizer)):
        opt.zero_grad()
        m(ids).total.backward()
        opt.step()
    for (name, a), (_, b) in zip(model.named_parameters(), clone.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def _fake_checkpoint(root: Path, spec, world_size: int = 1, zero_stage: int = 0, peers: list[str] | None = None):
    (root / "model").mkdir(parents=True)
    (root / "model" / "config.json").write_text("{}")
    (root / "deepspeed" / "state").mkdir(parents=True)
    (root / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    state = TrainerState(step=4, next_sample=16, spec_fingerprint=spec_fingerprint(spec), world_size=world_size,
                         zero_stage=zero_stage, global_batch_size=4, tokens_seen=256, wall_time_s=0.0)
    write_complete_marker(root, state, peers or [])
    return state


def test_completion_marker_guards_half_written_checkpoints(tmp_path):
    spec = _spec()
    state = _fake_checkpoint(tmp_path / "a", spec)
    assert verify_checkpoint(tmp_path / "a") == state
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "COMPLETE").unlink()
    with pytest.raises(IncompleteCheckpoint, match="no COMPLETE marker"):
        verify_checkpoint(tmp_path / "b")
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    (tmp_path / "c" / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    with pytest.raises(IncompleteCheckpoint, match="missing or truncated"):
        verify_checkpoint(tmp_path / "c")
    _fake_checkpoint(tmp_path / "d", spec, peers=["deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"])
    with pytest.raises(IncompleteCheckpoint, match="another worker's part"):
        verify_checkpoint(tmp_path / "d")


def test_restore_plan_picks_deepspeed_only_for_the_same_layout(tmp_path):
    spec = _spec()
    _fake_checkpoint(tmp_path / "ck", spec, world_size=2, zero_stage=0)
    fingerprint = spec_fingerprint(spec)
    assert plan_restore(tmp_path / "ck", 2, 0, fingerprint).source is RestoreSource.DEEPSPEED
    assert plan_restore(tmp_path / "ck", 1, 0, fingerprint).source is RestoreSource.CONSOLIDATED
    assert plan_restore(tmp_path / "ck", 2, 2, fingerprint).source is RestoreSource.CONSOLIDATED
    other = spec_from_dict({**spec.model_dump(mode="json"), "model": {**spec.model.model_dump(), "hidden_size": 32}})
    with pytest.raises(ValueError, match="different model/data spec"):
        plan_restore(tmp_path / "ck", 2, 0, spec_fingerprint(other))
    exported = export_serving_checkpoint(tmp_path / "ck", tmp_path / "out" / "checkpoint")
    assert (exported / "config.json").is_file()
