"""The model core against transformers' DeepseekV3ForCausalLM on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VARIANTS, make_hf_model, save_hf_checkpoint

from expertmesh.model import load_pretrained


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    path = save_hf_checkpoint(tmp_path_factory.mktemp(request.param), seed=len(request.param), **VARIANTS[request.param])
    hf = make_hf_model(seed=len(request.param), **VARIANTS[request.param])
    return load_pretrained(path), hf


def test_logits_match_transformers(pair):
    ours, hf = pair
    ids = torch.randint(0, ours.config.vocab_size, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape == (3, 37, ours.config.vocab_size)
    assert expected.abs().max() > 1.0, "weights too small for the comparison to mean anything"
    assert (got - expected).abs().max().item() <= 1e-4


def test_absorbed_matches_naive(pair):
    ours, _ = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 29), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        naive = ours(ids, absorbed=False)
        absorbed = ours(ids, absorbed=True)
    assert (naive - absorbed).abs().max().item() <= 1e-4


def test_gate_routes_within_topk_groups(pair):
    ours, _ = pair
    cfg = ours.config
    moe = ours.moe_layers()[0]
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    out = moe.gate(x)
    assert out.topk_ids_TK.shape == (64, cfg.num_experts_per_tok)
    groups_per_token = (out.topk_ids_TK // cfg.experts_per_group).sort(dim=1).values
    n_groups = torch.tensor([len(set(row.tolist())) for row in groups_per_token])
    assert int(n_groups.max()) <= cfg.topk_group
    # each token's experts are distinct
    assert all(len(set(row.tolist())) == cfg.num_experts_per_tok for row in out.topk_ids_TK)
    if cfg.norm_topk_prob:
        torch.testing.assert_close(out.topk_weights_TK.sum(-1), torch.full((64,), cfg.routed_scaling_factor))
