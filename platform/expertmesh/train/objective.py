"""What training optimises: the model being trained (main LM + optional MTP head) and its loss.

``TrainModel`` is the module DeepSpeed wraps. Its forward takes packed ids ``[B, S+1]`` and
returns :class:`LossTerms`; the total is::

    loss = lm_loss + mtp_weight * mtp_loss + seq_balance_loss

with ``mtp_loss`` present only when the MTP module is on and ``seq_balance_loss`` only when
``balance.seq_aux_loss_alpha > 0``. Evaluation uses ``lm_loss`` alone.

Every worker builds the same model: weights come from a generator seeded by ``spec.seed``
(main model first, then the MTP module), never from the global RNG.

Shape letters: B batch, S positions (inputs), S1 ``S + 1`` packed ids, V vocab, D hidden.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.model.config import ModelConfig
from expertmesh.model.moe import MoE
from expertmesh.model.transformer import DeepseekV3, build_model
from expertmesh.train.balance import SequenceBalanceLoss
from expertmesh.train.mtp import MTPModule
from expertmesh.train.spec import TrainSpec


@dataclass(frozen=True)
class LossTerms:
    """One forward's losses (scalars; ``total`` carries the gradient).

    Attributes:
        total: what is back-propagated.
        lm_loss: next-token cross-entropy in nats/token (detached).
        mtp_loss: the MTP head's cross-entropy for the token after next (None when off).
        balance_loss: the sequence-wise balance loss, ``alpha`` included (None when off).
    """

    total: torch.Tensor
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None

    def to_record(self) -> dict[str, float]:
        """Floats for the metrics (the optional terms only when present)."""
        out = {"loss": float(self.total.detach()), "lm_loss": float(self.lm_loss)}
        if self.mtp_loss is not None:
            out["mtp_loss"] = float(self.mtp_loss)
        if self.balance_loss is not None:
            out["balance_loss"] = float(self.balance_loss)
        return out


def model_config_of(spec: TrainSpec) -> ModelConfig:
    """The model core's config for a spec (through the HF ``config.json`` dict, as serving reads it)."""
    return ModelConfig.from_hf_dict(spec.to_hf_config_dict())


class TrainModel(nn.Module):
    """The main model plus the optional MTP module and sequence-wise balance loss.

    ``forward(input_ids_BS1) -> LossTerms`` where ``input_ids_BS1`` is a packed batch
    ``[B, S+1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``).
    """

    def __init__(self, lm: DeepseekV3, mtp: MTPModule | None = None, mtp_weight: float = 0.0,
                 seq_balance_alpha: float = 0.0) -> None:
        super().__init__()
        self.lm = lm
        self.mtp = mtp
        self.mtp_weight = mtp_weight
        self.seq_balance: SequenceBalanceLoss | None = None
        if seq_balance_alpha > 0:
            self.seq_balance = SequenceBalanceLoss(alpha=seq_balance_alpha)
            self.seq_balance.install(self.moe_layers())

    @property
    def config(self) -> ModelConfig:
        """The main model's config."""
        return self.lm.config

    def moe_layers(self) -> list[MoE]:
        """Every MoE layer that is balanced: the main model's, then the MTP block's."""
        layers = self.lm.moe_layers()
        if self.mtp is not None:
            layers.append(self.mtp.moe)
        return layers

    def moe_layer_ids(self) -> list[int]:
        """Layer index of each entry of :meth:`moe_layers` (the MTP block is ``num_hidden_layers``)."""
        ids = list(self.config.moe_layers)
        if self.mtp is not None:
            ids.append(self.mtp.layer_idx)
        return ids

    def forward(self, input_ids_BS1: torch.Tensor) -> LossTerms:
        inputs_BS, targets_BS = input_ids_BS1[:, :-1], input_ids_BS1[:, 1:]
        batch, seq_len = inputs_BS.shape
        if self.seq_balance is not None:
            self.seq_balance.capturing = self.training
        hidden_BSD = self.lm.hidden_states(inputs_BS)
        lm_loss = cross_entropy(self.lm.lm_head(hidden_BSD), targets_BS)
        total = lm_loss
        mtp_loss = balance_loss = None
        if self.mtp is not None and seq_len > 1:
            # position t (h_t, x_{t+1}) predicts x_{t+2}: drop the last position.
            mtp_logits = self.mtp(self.lm, hidden_BSD[:, :-1], targets_BS[:, :-1])  # [B, S-1, V]
            mtp_loss = cross_entropy(mtp_logits, targets_BS[:, 1:])
            total = total + self.mtp_weight * mtp_loss
        if self.seq_balance is not None and self.training:
            balance_loss = self.seq_balance.loss(batch)
            total = total + balance_loss
        return LossTerms(
            total=total,
            lm_loss=lm_loss.detach(),
            mtp_loss=None if mtp_loss is None else mtp_loss.detach(),
            balance_loss=None if balance_loss is None else balance_loss.detach(),
        )


def cross_entropy(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats over all positions."""
    return F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]).float(), targets_BS.reshape(-1))


def build_train_model(spec: TrainSpec, device: str | torch.device = "cpu") -> TrainModel:
    """A freshly initialised :class:`TrainModel`, identical on every worker for the same spec."""
    config = model_config_of(spec)
    generator = torch.Generator().manual_seed(spec.seed)
    lm = build_model(config, dtype=torch.float32, device="cpu")
    lm.init_weights(std=spec.model.initializer_range, generator=generator)
    mtp = None
    if spec.mtp.enabled:
        mtp = MTPModule(config)
        mtp.init_weights(std=spec.model.initializer_range, generator=generator)
    model = TrainModel(lm, mtp, mtp_weight=spec.mtp.loss_weight if spec.mtp.enabled else 0.0,
                       seq_balance_alpha=spec.balance.seq_aux_loss_alpha)
    return model.to(device)


@torch.no_grad()
def evaluate_lm_loss(model: TrainModel, batches: Iterable[np.ndarray],
                     device: str | torch.device = "cpu") -> tuple[float, int]:
    """Summed next-token loss (nats) and the number of target tokens over ``batches`` of ``[b, S+1]``.

    Sums, not means, so that workers' shares combine exactly: ``sum / count`` after an all-reduce.
    The model is put in eval mode and back; expert-load counters are left for the caller to reset.
    """
    was_training = model.training
    model.eval()
    total_nats, n_targets = 0.0, 0
    try:
        for ids in batches:
            ids_BS1 = torch.as_tensor(ids, device=device)
            logits_BSV = model.lm(ids_BS1[:, :-1])
            targets_BS = ids_BS1[:, 1:]
            total_nats += float(F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]).float(),
                                                targets_BS.reshape(-1), reduction="sum"))
            n_targets += targets_BS.numel()
    finally:
        model.train(was_training)
    return total_nats, n_targets


def spec_fingerprint(spec: TrainSpec) -> str:
    """16 hex digits over the sections a checkpoint must agree with to be resumed: model and data.

    Steps, optimiser settings, intervals and worker counts may change between runs.
    """
    payload = {"model": spec.model.model_dump(mode="json"), "data": spec.data.model_dump(mode="json"),
               "mtp": spec.mtp.enabled}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:16]


@torch.no_grad()
def greedy_continuation(lm: DeepseekV3, prompt_ids: list[int], max_new_tokens: int,
                        stop_ids: Iterable[int] = ()) -> list[int]:
    """Greedy decoding by full recomputation (short demo samples; the engine is for serving)."""
    lm.eval()
    ids = list(prompt_ids)
    stops = set(stop_ids)
    limit = lm.config.max_position_embeddings
    new: list[int] = []
    for _ in range(max_new_tokens):
        window = ids[-limit:]
        logits_V = lm(torch.tensor([window], device=lm.device))[0, -1]
        token = int(logits_V.argmax())
        if token in stops:
            break
        ids.append(token)
        new.append(token)
    return new
