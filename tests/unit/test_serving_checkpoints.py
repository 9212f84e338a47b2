"""Serving checkpoints: good ones (FP32, BF16, FP8, sharded, saved by transformers) validate; every
kind of corruption or partial write is refused with a message naming it; ``expertmesh checkpoint``
exit codes and output; an expert shard refuses a corrupted checkpoint and keeps serving; the
gateway answers 400 to an endpoint on one."""

from __future__ import annotations

import functools
import json
import shutil
import struct
from pathlib import Path

import grpc
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from servicer_context import Aborted, ServicerContext
from tiny_models import save_hf_checkpoint

from expertmesh.cli import main
from expertmesh.model import load_pretrained, save_pretrained
from expertmesh.model.checkpoint import MANIFEST_FILE, Provenance, load_experts, save_weights
from expertmesh.model.checkpoint_check import (
    CheckMode,
    CheckpointInvalid,
    ManifestStatus,
    find_checkpoints,
    require_valid_checkpoint,
    verify_checkpoint,
)
from expertmesh.train.checkpointing import TrainerState, write_complete_marker

EXPERT = "model.layers.2.mlp.experts.5.up_proj.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("good")
    hf = save_hf_checkpoint(root / "hf", seed=3)
    model = load_pretrained(hf)
    return {
        "hf": hf,
        "fp32": save_pretrained(model, root / "fp32", provenance=Provenance("training unit", step=4)),
        "bf16": save_pretrained(load_pretrained(hf, dtype=torch.bfloat16), root / "bf16"),
        "fp8": save_pretrained(model, root / "fp8", quantization="fp8"),
        "sharded": save_pretrained(model, root / "sharded", max_shard_bytes=64 << 10),
    }


def _copy(src: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    return Path(shutil.copytree(src, tmp_path / name))


def _problems(path: Path, mode: CheckMode = CheckMode.DEEP) -> str:
    report = verify_checkpoint(path, mode)
    assert not report.ok
    return "\n".join(report.problems)


def _rewrite_tensors(path: Path, fn, file: str = "model.safetensors") -> None:
    tensors = load_file(str(path / file))
    fn(tensors)
    save_weights(tensors, path / file)  # as our writer does, so only the change itself is wrong


# --------------------------------------------------------------------------- good checkpoints


@pytest.mark.parametrize("name, fmt, manifest", [
    ("fp32", "fp32", ManifestStatus.VERIFIED), ("bf16", "bf16", ManifestStatus.VERIFIED),
    ("fp8", "fp8", ManifestStatus.VERIFIED), ("sharded", "fp32", ManifestStatus.VERIFIED),
    ("hf", "fp32", ManifestStatus.ABSENT)])
def test_good_checkpoints_validate(good, name, fmt, manifest):
    report = require_valid_checkpoint(good[name], CheckMode.DEEP)
    assert report.ok and report.problems == () and report.fix is None
    assert report.format == fmt and report.manifest is manifest
    assert (report.num_layers, report.num_moe_layers, report.num_routed_experts) == (3, 2, 8)
    assert report.parameter_count == verify_checkpoint(good["hf"]).parameter_count > 100_000
    assert report.bytes_on_disk == sum(p.stat().st_size for p in good[name].iterdir())
    assert len(report.shard_files) == (len(list(good[name].glob("*.safetensors"))))
    quick = verify_checkpoint(good[name], CheckMode.QUICK)
    assert quick.ok and quick.manifest is (ManifestStatus.SIZES_MATCH if manifest is ManifestStatus.VERIFIED
                                           else ManifestStatus.ABSENT)


def test_manifest_records_every_file_and_provenance(good):
    manifest = json.loads((good["fp32"] / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert manifest["files"]["model.safetensors"]["bytes"] == (good["fp32"] / "model.safetensors").stat().st_size
    report = verify_checkpoint(good["fp32"])
    assert (report.step, report.source) == (4, "training unit")
    assert verify_checkpoint(good["hf"]).source.startswith("transformers ")


def test_resaving_into_a_sharded_directory_leaves_no_stray_shard(good, tmp_path):
    path = _copy(good["sharded"], tmp_path)
    save_pretrained(load_pretrained(good["hf"]), path)  # one file now
    assert sorted(p.name for p in path.glob("*.safetensors")) == ["model.safetensors"]
    assert require_valid_checkpoint(path, CheckMode.DEEP).ok


# --------------------------------------------------------------------------- each corruption, named


def test_flipped_byte_inside_a_tensor_is_caught_by_the_manifest(good, tmp_path):
    path = _copy(good["fp32"], tmp_path)
    data = bytearray((path / "model.safetensors").read_bytes())
    header_bytes = struct.unpack("<Q", data[:8])[0]
    offset = 8 + header_bytes + (len(data) - 8 - header_bytes) // 2  # in the middle of the tensor data
    data[offset] ^= 0x01
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointInvalid) as info:
        require_valid_checkpoint(path, CheckMode.DEEP)
    message = str(info.value)
    assert "model.safetensors does not match its sha256" in message and "Fix: restore the changed file" in message
    assert info.value.report.manifest is ManifestStatus.MISMATCH
    # quick mode reads no tensor data: same size, so it cannot see this (deep mode is what catches it)
    assert verify_checkpoint(path, CheckMode.QUICK).ok


def test_truncated_safetensors_file(good, tmp_path):
    path = _copy(good["fp32"], tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-100])
    problems = _problems(path, CheckMode.QUICK)
    assert "model.safetensors is truncated or not a safetensors file" in problems
    assert "model.safetensors has" in problems and "(truncated or rewritten)" in problems  # and the manifest agrees


def test_missing_shard(good, tmp_path):
    path = _copy(good["sharded"], tmp_path)
    (path / "model-00002-of-00014.safetensors").unlink()
    report = verify_checkpoint(path, CheckMode.QUICK)
    assert report.problems[0] == ("shard model-00002-of-00014.safetensors listed in model.safetensors.index.json "
                                  "is missing")
    assert "re-run the export" in report.fix


def test_missing_tensor(good, tmp_path):
    path = _copy(good["fp32"], tmp_path)
    _rewrite_tensors(path, lambda t: t.pop(EXPERT))
    report = verify_checkpoint(path, CheckMode.QUICK)
    assert f"is missing tensor {EXPERT!r}" in report.problems[0]
    assert any("(truncated or rewritten)" in p for p in report.problems)  # the manifest saw the rewrite too


def test_wrong_shape(good, tmp_path):
    path = _copy(good["hf"], tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.self_attn.kv_b_proj.weight"] = tensors["model.layers.0.self_attn.kv_b_proj.weight"][:, :5]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    assert "kv_b_proj.weight' has shape (128, 5), config expects (128, 32)" in _problems(path)


def test_fp8_scale_of_the_wrong_block_grid(good, tmp_path):
    path = _copy(good["fp8"], tmp_path)
    name = "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"
    _rewrite_tensors(path, lambda t: t.update({name: torch.ones(2, 1)}))
    assert f"{name!r} has shape (2, 1), expected (1, 1) for 128x128 blocks" in _problems(path, CheckMode.QUICK)


def test_fp8_weight_without_its_scale(good, tmp_path):
    path = _copy(good["fp8"], tmp_path)
    _rewrite_tensors(path, lambda t: t.pop(EXPERT.replace("weight", "weight_scale_inv")))
    assert f"FP8 tensor {EXPERT!r} has no" in _problems(path, CheckMode.QUICK)


def test_nan_in_a_weight(good, tmp_path):
    model = load_pretrained(good["hf"])
    with torch.no_grad():
        model.layers[2].mlp.experts[5].up_proj.weight[3, 7] = float("nan")
        model.layers[1].self_attn.kv_b_proj.weight[0, 0] = float("inf")
    path = save_pretrained(model, tmp_path / "diverged")  # written properly: only the values are wrong
    report = verify_checkpoint(path, CheckMode.DEEP)
    assert not report.ok and report.manifest is ManifestStatus.VERIFIED
    assert f"tensor {EXPERT!r} holds 1 NaN/Inf value(s)" in report.problems
    assert "model.layers.1.self_attn.kv_b_proj.weight' holds 1 NaN/Inf" in "\n".join(report.problems)
    assert "serve an earlier checkpoint" in report.fix


def test_config_that_does_not_parse(good, tmp_path):
    path = _copy(good["hf"], tmp_path)
    (path / "config.json").write_text('{"vocab_size": 96,')
    report = verify_checkpoint(path)
    assert "config.json" in report.problems[0] and "invalid JSON" in report.problems[0]
    assert report.num_layers is None and "correct config.json" in report.fix


def test_unsupported_config(good, tmp_path):
    path = _copy(good["hf"], tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "scoring_func": "softmax"}))
    assert "scoring_func='softmax' is not supported" in _problems(path)


def test_config_edited_after_writing_is_caught_even_in_quick_mode(good, tmp_path):
    path = _copy(good["fp32"], tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "routed_scaling_factor": 1.5}, indent=2))
    assert "config.json does not match its sha256" in _problems(path, CheckMode.QUICK)


@pytest.mark.parametrize("leftover", ["manifest-missing", "temp-file", "temp-export-dir"])
def test_leftover_partial_write(good, tmp_path, leftover):
    if leftover == "manifest-missing":  # expertmesh wrote the weights, the manifest never came
        path = _copy(good["fp32"], tmp_path)
        (path / MANIFEST_FILE).unlink()
        expected = f"written by expertmesh but has no {MANIFEST_FILE}: the write did not finish"
    elif leftover == "temp-file":
        path = _copy(good["fp32"], tmp_path)
        (path / "model.safetensors.tmp").write_bytes(b"\0" * 64)
        expected = "model.safetensors.tmp is left over from an unfinished write"
    else:
        path = _copy(good["fp32"], tmp_path, ".checkpoint.tmp")
        expected = ".checkpoint.tmp is the temp directory of an unfinished export"
    report = verify_checkpoint(path, CheckMode.QUICK)
    assert expected in report.problems and "re-run the export" in report.fix


def test_stray_shard_next_to_an_index(good, tmp_path):
    path = _copy(good["sharded"], tmp_path)
    shutil.copy(good["fp32"] / "model.safetensors", path / "model.safetensors")
    assert "model.safetensors is not listed in model.safetensors.index.json" in _problems(path, CheckMode.QUICK)


def _training_checkpoint(root: Path, good: Path, step: int, complete: bool) -> Path:
    shutil.copytree(good, root / "model")
    state = TrainerState(step=step, next_sample=0, spec_fingerprint="f", world_size=1, zero_stage=0,
                         global_batch_size=1, tokens_seen=0, wall_time_s=0.0)
    if complete:
        write_complete_marker(root, state, [])
    else:  # a writer killed between its files and the marker
        (root / "trainer_state.json").write_text(state.to_json())
    return root / "model"


def test_model_dir_of_a_training_checkpoint_needs_its_complete_marker(good, tmp_path):
    hf = good["hf"]  # no manifest, so the step comes from the training checkpoint itself
    assert verify_checkpoint(_training_checkpoint(tmp_path / "checkpoint_000001", hf, 7, True)).step == 7
    report = verify_checkpoint(_training_checkpoint(tmp_path / "checkpoint_000002", hf, 9, False))
    assert "training checkpoint checkpoint_000002" in report.problems[0] and "no COMPLETE marker" in report.problems[0]


def test_load_experts_refuses_before_reading_weights(good, tmp_path):
    path = _copy(good["fp32"], tmp_path)
    (path / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointInvalid, match="the write did not finish"):
        load_experts(path, {(1, 0)})


# --------------------------------------------------------------------------- the CLI


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out = capsys.readouterr()
    return info.value.code or 0, out.out, out.err


def test_cli_validate_good_and_bad(good, tmp_path, capsys):
    code, out, err = _cli(capsys, "checkpoint", "validate", str(good["fp8"]))
    assert code == 0 and err == ""
    assert "status:      valid, deep check" in out and "model:       fp8, 3 layers (2 MoE), 8 routed experts" in out
    assert "sha256 of every file verified" in out
    code, out, _ = _cli(capsys, "checkpoint", "validate", str(good["hf"]), "--quick")
    assert code == 0 and "not checked: no expertmesh-manifest.json" in out

    bad = _copy(good["fp32"], tmp_path)
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:1000])
    code, out, err = _cli(capsys, "checkpoint", "validate", str(bad))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: checkpoint {bad} cannot be served: ")
    assert "truncated" in err and "Fix: " in err

    code, out, err = _cli(capsys, "checkpoint", "validate", str(bad), "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and report["mode"] == "deep" and err.count("\n") == 1
    assert any("truncated" in p for p in report["problems"]) and report["fix"]

    code, out, err = _cli(capsys, "checkpoint", "validate", str(tmp_path / "nowhere"))
    assert code == 2 and err == f"error: {tmp_path / 'nowhere'} is not a directory\n"


def test_cli_list_finds_good_and_bad_under_a_run_directory(good, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "home" / "runs"
    shutil.copytree(good["fp32"], runs / "demo" / "checkpoint")
    ray_dir = runs / "demo" / "ray" / "demo"
    _training_checkpoint(ray_dir / "checkpoint_000001", good["hf"], 175, True)
    _training_checkpoint(ray_dir / "checkpoint_000002", good["hf"], 350, False)
    flipped = _copy(good["bf16"], runs, "other")
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (flipped / "model.safetensors").write_bytes(bytes(data))
    (runs / "demo" / "cache").mkdir()  # not a checkpoint: not listed

    monkeypatch.setenv("EXPERTMESH_HOME", str(tmp_path / "home"))
    code, out, _ = _cli(capsys, "checkpoint", "list")  # default: $EXPERTMESH_HOME/runs, quick
    assert code == 0
    lines = {line.split()[-1]: line for line in out.splitlines() if line.startswith(("ok", "INVALID"))}
    assert set(lines) == {str(runs / "demo" / "checkpoint"), str(ray_dir / "checkpoint_000001" / "model"),
                          str(ray_dir / "checkpoint_000002" / "model"), str(flipped)}
    assert lines[str(runs / "demo" / "checkpoint")].split()[:2] == ["ok", "fp32"]
    assert lines[str(ray_dir / "checkpoint_000001" / "model")].split()[-2] == "175"  # STEP, before PATH
    assert lines[str(ray_dir / "checkpoint_000002" / "model")].startswith("INVALID")
    assert lines[str(flipped)].startswith("ok")  # quick: same size, weights not hashed
    assert "no COMPLETE marker" in out and "4 checkpoint(s), 1 invalid (quick check)" in out

    code, out, _ = _cli(capsys, "checkpoint", "list", str(runs), "--deep", "--json")
    listed = {r["path"]: r for r in json.loads(out)}
    assert code == 0 and not listed[str(flipped)]["ok"] and "sha256" in listed[str(flipped)]["problems"][0]
    assert listed[str(runs / "demo" / "checkpoint")]["step"] == 4 and listed[str(flipped)]["format"] == "bf16"
    assert [p.name for p in find_checkpoints(runs / "demo" / "cache")] == []

    code, _, err = _cli(capsys, "checkpoint", "list", str(tmp_path / "nowhere"))
    assert code == 2 and err.startswith("error: not a directory: ")


# --------------------------------------------------------------------------- where serving loads


def test_expert_shard_refuses_a_corrupted_checkpoint_and_keeps_its_experts(good, tmp_path):
    from expertmesh.placement import PlacementPlan
    from expertmesh.protos import load
    from expertmesh.services import wire
    from expertmesh.services.expert_shard.servicer import ExpertShardServicer
    from expertmesh.services.expert_shard.shard import ExpertSlot

    pb = load("expert_shard_pb2")
    path = _copy(good["fp32"], tmp_path)
    config = load_pretrained(path).config
    loader = functools.partial(load_experts, path)  # the expert-shard actor's loader
    # 8 experts per layer over 2 slots; this is slot 0 (physical 0..3 = logical 0..3)
    identity = torch.arange(8).repeat(len(config.moe_layers), 1)  # [L, P]
    logical_of = {layer: {p: p for p in range(4)} for layer in config.moe_layers}
    modules = loader({(layer, e) for layer in config.moe_layers for e in range(4)})
    slot = ExpertSlot(0, {0: {layer: {p: modules[(layer, p)] for p in range(4)} for layer in config.moe_layers}},
                      config.hidden_size)
    servicer = ExpertShardServicer(slot, logical_of, node_index=0, moe_layers=config.moe_layers, loader=loader,
                                   modules=dict(modules))
    x = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(0))  # [T, D]
    request = pb.ExpertRequest(layer=1, plan_version=0, hidden=wire.encode_any(x),
                               physical_ids=wire.encode(torch.tensor([[0, 3]] * 5, dtype=torch.int32)),
                               weights=wire.encode(torch.full((5, 2), 0.5)), combine_dtype="float32")
    before = wire.decode(servicer.Compute(request, ServicerContext()).partial)

    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 3])  # the checkpoint breaks under the shard
    swapped = identity.roll(4, dims=1)  # plan 1: slot 0 would host logical 4..7, which it must load
    plan = PlacementPlan.from_phy2log(1, swapped, 8, 2, 1)
    context = ServicerContext()
    with pytest.raises(Aborted):
        servicer.PreparePlan(wire.encode_plan(plan), context)
    assert context.code is grpc.StatusCode.INVALID_ARGUMENT
    assert f"checkpoint {path} cannot be served" in context.details and "truncated" in context.details
    assert sorted(slot.plans) == [0] and servicer.slot.plan_version == 0
    assert set(servicer.modules) == set(modules)  # nothing half-loaded
    torch.testing.assert_close(wire.decode(servicer.Compute(request, ServicerContext()).partial), before, rtol=0, atol=0)


def test_gateway_refuses_an_endpoint_on_a_corrupted_checkpoint(good, valkey, tmp_path):
    from expertmesh.serve import GatewayConfig, build_services
    from expertmesh.serve.backend import LocalBackend
    from expertmesh.serve.gateway import create_app
    from expertmesh.store import connect

    connect(valkey.url).flushdb()
    bad = _copy(good["fp32"], tmp_path)
    (bad / MANIFEST_FILE).unlink()
    services = build_services(GatewayConfig(valkey.url, str(tmp_path / "home"), key_hash_n=2**8), LocalBackend())
    client = TestClient(create_app(services))
    admin = {"Authorization": f"Bearer {services.tenants.create_admin_key().key}"}
    assert client.post("/admin/tenants", json={"name": "acme"}, headers=admin).status_code == 201
    r = client.post("/admin/endpoints", json={"name": "chat", "tenant": "acme", "model": str(bad)}, headers=admin)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "model" and "the write did not finish" in error["message"]
    assert client.get("/admin/endpoints", headers=admin).json()["data"] == []  # nothing was registered
