"""Bad checkpoints fail with a ValueError naming the problem, never a silent partial load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import save_hf_checkpoint

from expertmesh.model import load_pretrained, save_pretrained


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return save_hf_checkpoint(tmp_path_factory.mktemp("good"), seed=5)


def _copy(good: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(good, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path: Path, fn) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_config(tmp_path):
    with pytest.raises(ValueError, match="config.json not found"):
        load_pretrained(tmp_path)


def test_unknown_config_field(good, tmp_path):
    path = _copy(good, tmp_path)
    _edit_config(path, frobnicate_experts=3)
    with pytest.raises(ValueError, match="unknown config field.*frobnicate_experts"):
        load_pretrained(path)


def test_unsupported_config_value(good, tmp_path):
    path = _copy(good, tmp_path)
    _edit_config(path, scoring_func="softmax")
    with pytest.raises(ValueError, match="scoring_func='softmax' is not supported"):
        load_pretrained(path)


def test_inconsistent_routing_config(good, tmp_path):
    path = _copy(good, tmp_path)
    _edit_config(path, topk_group=9)
    with pytest.raises(ValueError, match="topk_group=9"):
        load_pretrained(path)


def test_missing_tensor_is_named(good, tmp_path):
    path = _copy(good, tmp_path)
    _edit_tensors(path, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight'"):
        load_pretrained(path)


def test_wrong_shape_is_named(good, tmp_path):
    path = _copy(good, tmp_path)

    def shrink(t):
        t["model.layers.0.self_attn.kv_b_proj.weight"] = t["model.layers.0.self_attn.kv_b_proj.weight"][:, :5].clone()

    _edit_tensors(path, shrink)
    with pytest.raises(ValueError, match=r"kv_b_proj\.weight' has shape \(128, 5\), config expects \(128, 32\)"):
        load_pretrained(path)


def test_unexpected_tensor_is_named(good, tmp_path):
    path = _copy(good, tmp_path)
    _edit_tensors(path, lambda t: t.update({"model.layers.1.mlp.experts.99.up_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor.*experts\.99"):
        load_pretrained(path)


def test_corrupt_safetensors(good, tmp_path):
    path = _copy(good, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable safetensors"):
        load_pretrained(path)


def test_index_pointing_to_missing_shard(good, tmp_path):
    path = _copy(good, tmp_path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002.safetensors"}}))
    with pytest.raises(ValueError, match="model-00002.safetensors"):
        load_pretrained(path)


def test_mtp_layer_is_skipped(good, tmp_path):
    path = _copy(good, tmp_path)
    _edit_tensors(path, lambda t: t.update({"model.layers.3.eh_proj.weight": torch.zeros(4, 4)}))
    model = load_pretrained(path)
    assert len(model.layers) == 3


def test_sharded_save_round_trip(good, tmp_path):
    model = load_pretrained(good)
    out = save_pretrained(model, tmp_path / "sharded", max_shard_bytes=64 << 10)
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    again = load_pretrained(out)
    ids = torch.randint(0, model.config.vocab_size, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)
