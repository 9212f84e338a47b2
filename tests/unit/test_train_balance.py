"""Aux-loss-free balancing and the sequence-wise balance loss, on the tiny preset's model (no Ray).

A "skewed start" gives experts 0 and 1 (both in group 0) a large selection bias in every MoE
layer, so every token picks them: max/mean load starts at E/K. The bias update must undo it.
"""

from __future__ import annotations

import pytest
import torch

from expertmesh.train.balance import (
    LoadAccumulator,
    LoadSummary,
    max_over_mean,
    read_expert_load,
    sequence_balance_loss,
    step_load,
    update_gate_bias,
)
from expertmesh.train.objective import build_train_model
from expertmesh.train.spec import preset, spec_from_dict

SKEW = 0.3
STEPS = 30
WINDOW = 10  # steps summed for the "late" figure, like an expert_load record
LR = 1e-3
BATCH, SEQ = 8, 32


def _spec(**balance):
    raw = preset("tiny").model_dump(mode="json")
    raw["balance"].update(balance)
    return spec_from_dict(raw)


def _skewed_run(gamma: float) -> list[torch.Tensor]:
    """The ``[L, E]`` load recorded at every step of a short skewed-start run."""
    spec = _spec(bias_update_speed=gamma)
    model = build_train_model(spec)
    moe_layers = model.moe_layers()
    for moe in moe_layers:
        moe.gate.e_score_correction_bias[:2] = SKEW
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(0)
    recorded: list[torch.Tensor] = []
    for _ in range(STEPS):
        ids = torch.randint(3, spec.model.vocab_size, (BATCH, SEQ + 1), generator=generator)
        loss = model(ids).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        load_LE = step_load(moe_layers)
        update_gate_bias(moe_layers, load_LE, gamma)
        recorded.append(load_LE)
    return recorded


def test_bias_updates_undo_a_skewed_start():
    spec = preset("tiny")
    worst_possible = spec.model.n_routed_experts / spec.model.num_experts_per_tok
    balanced = _skewed_run(gamma=0.02)
    frozen = _skewed_run(gamma=0.0)
    first = LoadSummary.of(balanced[0]).worst
    late = LoadSummary.of(sum(balanced[-WINDOW:])).worst
    assert first == pytest.approx(worst_possible)  # the skew routes every token to experts 0 and 1
    assert LoadSummary.of(sum(frozen[-WINDOW:])).worst == pytest.approx(worst_possible)  # no updates: stuck
    assert late < 0.5 * first, [LoadSummary.of(x).worst for x in balanced]


def test_bias_update_direction_and_centering():
    model = build_train_model(_spec())
    moe_layers = model.moe_layers()
    load_LE = torch.tensor([[10.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]] * len(moe_layers))  # expert 0 overloaded
    delta_LE = update_gate_bias(moe_layers, load_LE, gamma=0.1)
    assert delta_LE[0, 0] == pytest.approx(-0.1) and delta_LE[0, 1] == pytest.approx(0.1)
    bias_E = moe_layers[0].gate.e_score_correction_bias
    assert float(bias_E.mean()) == pytest.approx(0.0, abs=1e-7)
    assert float(bias_E[0]) < float(bias_E[1])
    with pytest.raises(ValueError, match="layers"):
        update_gate_bias(moe_layers[:1], load_LE, gamma=0.1)


def test_load_counters_are_read_and_reset():
    model = build_train_model(_spec())
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
    moe_layers = model.moe_layers()
    load_LE = read_expert_load(moe_layers)
    spec = preset("tiny")
    assert load_LE.shape == (spec.model.n_moe_layers, spec.model.n_routed_experts)
    assert torch.all(load_LE.sum(dim=1) == 2 * 8 * spec.model.num_experts_per_tok)
    assert float(read_expert_load(moe_layers).sum()) == 0.0
    accumulator = LoadAccumulator()
    accumulator.add(load_LE)
    accumulator.add(load_LE)
    summary = accumulator.take()
    assert summary is not None and torch.equal(summary.load_LE, 2 * load_LE)
    assert accumulator.take() is None
    record = summary.to_record(model.moe_layer_ids())
    assert record["layers"] == [1, 2] and len(record["tokens_per_expert"][0]) == spec.model.n_routed_experts


def test_max_over_mean_examples():
    load_LE = torch.tensor([[6.0, 4.0, 4.0, 2.0], [8.0, 0.0, 4.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    assert max_over_mean(load_LE).tolist() == pytest.approx([1.5, 2.0, 1.0])


def test_sequence_balance_loss_is_one_when_uniform_and_larger_when_skewed():
    n_experts, top_k, seq_len = 4, 2, 8
    gate_weight_ED = torch.zeros(n_experts, 3, requires_grad=True)  # equal scores for every expert
    x_TD = torch.randn(seq_len, 3)
    uniform_ids = torch.tensor([[t % 4, (t + 1) % 4] for t in range(seq_len)])  # every expert 4 times
    skewed_ids = torch.tensor([[0, 1]] * seq_len)
    uniform = sequence_balance_loss(x_TD, gate_weight_ED, uniform_ids, batch_size=1, seq_len=seq_len)
    skewed = sequence_balance_loss(x_TD, gate_weight_ED, skewed_ids, batch_size=1, seq_len=seq_len)
    assert float(uniform.detach()) == pytest.approx(1.0)
    assert float(skewed.detach()) == pytest.approx(1.0)  # equal probabilities: f only redistributes...
    gate_weight_ED.data[0, 0] = 5.0  # ...until the overloaded expert also has the higher score
    skewed_scored = sequence_balance_loss(x_TD.abs(), gate_weight_ED, skewed_ids, batch_size=1, seq_len=seq_len)
    assert float(skewed_scored.detach()) > 1.0
    skewed_scored.backward()
    assert gate_weight_ED.grad is not None and float(gate_weight_ED.grad[0, 0]) > 0  # pushes expert 0 down


def test_seq_aux_loss_is_part_of_the_training_loss_only():
    model = build_train_model(_spec(seq_aux_loss_alpha=0.01))
    ids = torch.randint(3, 100, (2, 17), generator=torch.Generator().manual_seed(2))
    terms = model(ids)
    assert terms.balance_loss is not None and float(terms.balance_loss) > 0
    assert float(terms.total.detach()) == pytest.approx(float(terms.lm_loss) + float(terms.balance_loss), rel=1e-5)
    terms.total.backward()
    assert model.lm.moe_layers()[0].gate.weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert model(ids).balance_loss is None


def test_seq_aux_loss_covers_the_mtp_block_too():
    raw = preset("tiny").model_dump(mode="json")
    raw["model"]["num_nextn_predict_layers"] = 1
    raw["mtp"]["enabled"] = True
    raw["balance"]["seq_aux_loss_alpha"] = 0.01
    model = build_train_model(spec_from_dict(raw))
    assert model.moe_layer_ids() == [1, 2, 3]  # the MTP block is layer num_hidden_layers
    ids = torch.randint(3, 100, (2, 17), generator=torch.Generator().manual_seed(3))
    terms = model(ids)  # the MTP block's gate sees 15 positions per sequence, the others 16
    assert terms.mtp_loss is not None and terms.balance_loss is not None
    expected = float(terms.lm_loss) + model.mtp_weight * float(terms.mtp_loss) + float(terms.balance_loss)
    assert float(terms.total.detach()) == pytest.approx(expected, rel=1e-5)
    terms.total.backward()
    assert model.mtp is not None and model.mtp.moe.gate.weight.grad is not None
