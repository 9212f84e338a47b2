"""Training spec files: pydantic models (unknown fields rejected), presets, HF config export.

A spec is YAML or JSON with the sections below; every field has a default (the "demo"
preset's value), so a file only states what it changes. A top-level ``preset: tiny`` key
starts from that preset instead and deep-merges the file's sections onto it::

    preset: demo
    steps: 2000
    model: {num_hidden_layers: 6}
    optim: {lr: 0.002}

``load_spec(path)`` raises ``ValueError`` with one readable line, e.g.
``spec run.yaml is invalid: model: topk_group=5 must be <= n_group=4; steps: Input should be
greater than 0``.

Parameter counts (see :meth:`ModelSpec.parameter_count`) follow transformers'
``DeepseekV3ForCausalLM`` exactly (tests check it on the meta device); the MTP module
(``num_nextn_predict_layers = 1``) is counted separately because transformers has none.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from expertmesh.train.tokenizer import BOS_ID, EOS_ID, PAD_ID


class _Section(BaseModel):
    """Base of every spec section: unknown fields are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)



class ModelSpec(_Section):
    """DeepSeek-V3 architecture hyper-parameters (names as in the HF ``config.json``)."""

    vocab_size: int = Field(default=8192, gt=0)
    hidden_size: int = Field(default=256, gt=0)
    num_hidden_layers: int = Field(default=5, gt=0)
    num_attention_heads: int = Field(default=4, gt=0)
    q_lora_rank: int | None = Field(default=128, gt=0, description="None: queries projected directly")
    kv_lora_rank: int = Field(default=64, gt=0)
    qk_nope_head_dim: int = Field(default=32, gt=0)
    qk_rope_head_dim: int = Field(default=16, gt=0)
    v_head_dim: int = Field(default=32, gt=0)
    intermediate_size: int = Field(default=768, gt=0, description="dense MLP width (first layers)")
    moe_intermediate_size: int = Field(default=192, gt=0, description="width of each expert")
    n_routed_experts: int = Field(default=16, gt=0)
    n_shared_experts: int = Field(default=1, ge=0)
    num_experts_per_tok: int = Field(default=4, gt=0)
    n_group: int = Field(default=4, gt=0, description="expert groups (one per node in routing)")
    topk_group: int = Field(default=2, gt=0, description="groups a token may use (node limit M)")
    first_k_dense_replace: int = Field(default=1, ge=0, description="leading dense layers")
    routed_scaling_factor: float = Field(default=2.5, gt=0)
    max_position_embeddings: int = Field(default=512, gt=0)
    norm_topk_prob: bool = True
    num_nextn_predict_layers: Literal[0, 1] = 0
    rope_theta: float = Field(default=10000.0, gt=0)
    rms_norm_eps: float = Field(default=1e-6, gt=0)
    initializer_range: float = Field(default=0.02, gt=0)

    @model_validator(mode="after")
    def _check_routing(self) -> ModelSpec:
        problems: list[str] = []
        if self.topk_group > self.n_group:
            problems.append(f"topk_group={self.topk_group} must be <= n_group={self.n_group}")
        if self.n_routed_experts % self.n_group:
            problems.append(f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}")
        elif self.n_routed_experts // self.n_group < 2:
            problems.append(f"each group needs >= 2 experts (group score = top-2 sum); "
                            f"n_routed_experts={self.n_routed_experts} / n_group={self.n_group} < 2")
        if self.num_experts_per_tok > self.n_routed_experts:
            problems.append(f"num_experts_per_tok={self.num_experts_per_tok} must be <= "
                            f"n_routed_experts={self.n_routed_experts}")
        elif (self.n_routed_experts % self.n_group == 0 and self.topk_group <= self.n_group
              and self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group)):
            problems.append(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in "
                            f"topk_group={self.topk_group} groups of {self.n_routed_experts // self.n_group}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            problems.append(f"first_k_dense_replace={self.first_k_dense_replace} must be <= "
                            f"num_hidden_layers={self.num_hidden_layers}")
        if self.qk_rope_head_dim % 2:
            problems.append(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def n_moe_layers(self) -> int:
        """Layers whose MLP is a MoE (all after the first ``first_k_dense_replace``)."""
        return self.num_hidden_layers - self.first_k_dense_replace

    def parameter_count(self) -> ParameterCount:
        """Exact parameter counts from the config (see :class:`ParameterCount`)."""
        return count_parameters(self)

    def to_hf_config_dict(self) -> dict[str, Any]:
        """A Hugging Face DeepSeek-V3 ``config.json`` dict (released-checkpoint field names).

        ``transformers.DeepseekV3Config(**d)`` accepts it; transformers 5 turns
        ``rope_theta``/``rope_scaling`` into ``rope_parameters`` on load.
        """
        return {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "n_shared_experts": self.n_shared_experts,
            "n_routed_experts": self.n_routed_experts,
            "ep_size": 1,
            "routed_scaling_factor": self.routed_scaling_factor,
            "kv_lora_rank": self.kv_lora_rank,
            "q_lora_rank": self.q_lora_rank,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "topk_method": "noaux_tc",
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_layer_freq": 1,
            "first_k_dense_replace": self.first_k_dense_replace,
            "norm_topk_prob": self.norm_topk_prob,
            "scoring_func": "sigmoid",
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "use_cache": True,
            "pad_token_id": PAD_ID,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "tie_word_embeddings": False,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "rope_interleave": True,
            "attention_bias": False,
            "attention_dropout": 0.0,
        }


@dataclass(frozen=True)
class ParameterCount:
    """Parameter counts of a :class:`ModelSpec`.

    Attributes:
        total: all parameters of the main model (embedding, layers, final norm, lm_head),
            equal to ``sum(p.numel())`` of transformers' ``DeepseekV3ForCausalLM``.
        active: parameters a token uses in a forward pass: ``total`` minus the routed
            experts it is not sent to (the embedding table counts in full).
        embedding: ``vocab_size * hidden_size`` (the lm_head has as many again).
        mtp: extra parameters of the MTP module (0 when ``num_nextn_predict_layers = 0``);
            it shares the embedding and the output head with the main model.
    """

    total: int
    active: int
    embedding: int
    mtp: int


def _attention_params(m: ModelSpec) -> int:
    qk_head_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
    if m.q_lora_rank is None:
        q = m.hidden_size * m.num_attention_heads * qk_head_dim
    else:  # q_a_proj, q_a_layernorm, q_b_proj
        q = m.hidden_size * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * m.num_attention_heads * qk_head_dim
    kv_a = m.hidden_size * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank  # + kv_a_layernorm
    kv_b = m.kv_lora_rank * m.num_attention_heads * (m.qk_nope_head_dim + m.v_head_dim)
    o = m.num_attention_heads * m.v_head_dim * m.hidden_size
    return q + kv_a + kv_b + o


def _swiglu_params(hidden: int, inner: int) -> int:
    return 3 * hidden * inner  # gate, up, down


def count_parameters(m: ModelSpec) -> ParameterCount:
    """Count parameters from config arithmetic (layout of transformers' DeepSeek-V3)."""
    embedding = m.vocab_size * m.hidden_size
    norms_per_layer = 2 * m.hidden_size
    attention = _attention_params(m)
    dense_layer = attention + norms_per_layer + _swiglu_params(m.hidden_size, m.intermediate_size)
    expert = _swiglu_params(m.hidden_size, m.moe_intermediate_size)
    shared = _swiglu_params(m.hidden_size, m.moe_intermediate_size * m.n_shared_experts) if m.n_shared_experts else 0
    router = m.n_routed_experts * m.hidden_size  # the bias is a buffer, not a parameter
    moe_layer = attention + norms_per_layer + router + shared + m.n_routed_experts * expert
    total = (2 * embedding + m.hidden_size
             + m.first_k_dense_replace * dense_layer + m.n_moe_layers * moe_layer)
    inactive = m.n_moe_layers * (m.n_routed_experts - m.num_experts_per_tok) * expert
    # MTP module: enorm + hnorm + eh_proj [H, 2H] + one MoE decoder layer + its final norm.
    mtp = m.num_nextn_predict_layers * (3 * m.hidden_size + 2 * m.hidden_size ** 2 + moe_layer)
    return ParameterCount(total=total, active=total - inactive, embedding=embedding, mtp=mtp)


class DataSpec(_Section):
    """Corpus, tokenizer and packing."""

    seq_len: int = Field(default=256, gt=0, description="tokens per training sequence")
    validation_fraction: float = Field(default=0.02, ge=0.0, lt=1.0)
    seed: int = Field(default=0, ge=0, description="seeds the split and the per-epoch shuffles")
    tokenizer_vocab_size: int = Field(default=8192, ge=260)
    tokenizer_max_train_bytes: int | None = Field(default=None, gt=0, description="cap on BPE training text")
    max_corpus_bytes: int | None = Field(default=None, gt=0, description="use a subset of the corpus (tests)")
    corpus_root: str | None = Field(default=None, description="None: this interpreter's stdlib")


class OptimSpec(_Section):
    """AdamW with linear warmup and a cosine or constant schedule."""

    lr: float = Field(default=3e-3, gt=0)
    min_lr: float = Field(default=3e-4, ge=0)
    warmup_steps: int = Field(default=50, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = Field(default=1.0, gt=0, description="max global grad norm; None: off")
    schedule: Literal["cosine", "constant"] = "cosine"

    @model_validator(mode="after")
    def _check(self) -> OptimSpec:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} must be <= lr={self.lr}")
        if not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ValueError(f"betas={self.betas} must each be in [0, 1)")
        return self


class ElasticSpec(_Section):
    """Allowed worker range for elastic training (Ray Train scales within it)."""

    min_workers: int = Field(gt=0)
    max_workers: int = Field(gt=0)

    @model_validator(mode="after")
    def _check(self) -> ElasticSpec:
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers={self.min_workers} must be <= max_workers={self.max_workers}")
        return self


class BalanceSpec(_Section):
    """Expert load balancing: aux-loss-free bias updates plus an optional sequence-wise aux loss."""

    bias_update_speed: float = Field(default=1e-3, ge=0, description="gamma: bias += gamma*sign(mean-load)")
    seq_aux_loss_alpha: float = Field(default=0.0, ge=0, description="0 = off")


class MtpSpec(_Section):
    """Multi-token prediction (needs ``model.num_nextn_predict_layers = 1``)."""

    enabled: bool = False
    loss_weight: float = Field(default=0.3, gt=0, le=1)


class TrainSpec(_Section):
    """A whole training job."""

    name: str = Field(default="demo", min_length=1)
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    steps: int = Field(default=1000, gt=0)
    micro_batch_size: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    workers: int = Field(default=1, gt=0)
    elastic: ElasticSpec | None = None
    zero_stage: Literal[0, 1, 2, 3] = 0
    checkpoint_every: int = Field(default=250, gt=0)
    checkpoints_to_keep: int = Field(default=2, gt=0, description="older Ray Train checkpoints are deleted")
    eval_every: int = Field(default=100, gt=0)
    eval_max_sequences: int | None = Field(default=128, gt=0, description="validation sequences per eval; None: all")
    log_every: int = Field(default=10, gt=0, description="steps between metric reports and expert-load records")
    seed: int = Field(default=0, ge=0, description="seeds model init (identical on every worker)")
    max_failures: int = Field(default=3, ge=-1, description="worker-group restarts from the last checkpoint; -1: no limit")
    balance: BalanceSpec = Field(default_factory=BalanceSpec)
    mtp: MtpSpec = Field(default_factory=MtpSpec)

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        problems: list[str] = []
        if self.data.seq_len > self.model.max_position_embeddings:
            problems.append(f"data.seq_len={self.data.seq_len} must be <= "
                            f"model.max_position_embeddings={self.model.max_position_embeddings}")
        if self.data.tokenizer_vocab_size > self.model.vocab_size:
            problems.append(f"data.tokenizer_vocab_size={self.data.tokenizer_vocab_size} must be <= "
                            f"model.vocab_size={self.model.vocab_size}")
        if self.optim.warmup_steps > self.steps:
            problems.append(f"optim.warmup_steps={self.optim.warmup_steps} must be <= steps={self.steps}")
        if self.mtp.enabled and self.model.num_nextn_predict_layers != 1:
            problems.append("mtp.enabled needs model.num_nextn_predict_layers=1")
        if self.elastic is not None and not (self.elastic.min_workers <= self.workers <= self.elastic.max_workers):
            problems.append(f"workers={self.workers} must be within elastic "
                            f"[{self.elastic.min_workers}, {self.elastic.max_workers}]")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step: ``micro_batch_size * grad_accum * workers``."""
        return self.micro_batch_size * self.grad_accum * self.workers

    @property
    def tokens_per_step(self) -> int:
        """Target tokens per optimizer step."""
        return self.global_batch_size * self.data.seq_len

    def to_hf_config_dict(self) -> dict[str, Any]:
        """The model's HF ``config.json`` dict (see :meth:`ModelSpec.to_hf_config_dict`)."""
        return self.model.to_hf_config_dict()


# --------------------------------------------------------------------------- presets and loading

_PRESETS: dict[str, dict[str, Any]] = {
    # 15.5M params (8.4M active, embedding included): MLA with a small q_lora, 16 routed
    # experts in 4 groups, 2 groups per token, 4 experts per token, 1 shared expert, first
    # layer dense. 700 steps x 2048 tokens = 1.4M tokens (~0.6 epoch of the stdlib); a step
    # takes ~0.8 s on 2 cores through Ray Train + DeepSpeed (~10 min of steps, ~11 min in all).
    # gamma = 0.01: the bias must catch up with the gate within a few hundred steps (V3's
    # 0.001 is for runs of many thousands).
    "demo": {
        "steps": 700, "checkpoint_every": 175, "eval_every": 100,
        "optim": {"warmup_steps": 30},
        "balance": {"bias_update_speed": 0.01},
    },
    # ~240K params, 20 steps, on a ~1 MB corpus subset: for tests and smoke runs.
    "tiny": {
        "name": "tiny",
        "model": {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
                  "q_lora_rank": None, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                  "v_head_dim": 16, "intermediate_size": 128, "moe_intermediate_size": 32,
                  "n_routed_experts": 8, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 2,
                  "max_position_embeddings": 128},
        "data": {"seq_len": 64, "validation_fraction": 0.1, "tokenizer_vocab_size": 512,
                 "max_corpus_bytes": 1_000_000},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "steps": 20, "micro_batch_size": 4, "checkpoint_every": 10, "eval_every": 10, "log_every": 5,
        "balance": {"bias_update_speed": 0.01},
    },
}


def preset_names() -> list[str]:
    """Names accepted by :func:`preset`."""
    return sorted(_PRESETS)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _format_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "spec"
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{location}: {message}")
    return "; ".join(parts)


def spec_from_dict(raw: dict[str, Any], source: str = "spec") -> TrainSpec:
    """Validate a spec mapping (optionally with a ``preset`` key) into a :class:`TrainSpec`.

    Raises:
        ValueError: one line naming ``source`` and every ``field: message``.
    """
    data = dict(raw)
    preset_name = data.pop("preset", None)
    if preset_name is not None:
        if preset_name not in _PRESETS:
            raise ValueError(f"{source}: unknown preset {preset_name!r}; choose one of {preset_names()}")
        data = _deep_merge(_PRESETS[preset_name], data)
    try:
        return TrainSpec.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{source} is invalid: {_format_validation_error(exc)}") from None


def preset(name: str) -> TrainSpec:
    """A built-in spec: ``"demo"`` (the platform's demo model) or ``"tiny"`` (tests).

    Raises:
        ValueError: unknown name.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {preset_names()}")
    return spec_from_dict(_PRESETS[name], source=f"preset {name!r}")


def load_spec(path: Path | str) -> TrainSpec:
    """Read a YAML (or ``.json``) spec file and validate it.

    Raises:
        ValueError: one readable line: missing file, unparsable YAML/JSON, a top level that
            is not a mapping, or the validation errors as ``field: message``.
    """
    spec_path = Path(path)
    if not spec_path.is_file():
        raise ValueError(f"spec file not found: {spec_path}")
    text = spec_path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if spec_path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"spec {spec_path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"spec {spec_path} is not valid YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"spec {spec_path} must be a mapping of sections, got {type(raw).__name__}")
    return spec_from_dict(raw, source=f"spec {spec_path}")


def dump_spec(spec: TrainSpec, path: Path | str) -> Path:
    """Write ``spec`` as YAML (or JSON for a ``.json`` path) that :func:`load_spec` reads back."""
    out = Path(path)
    payload = spec.model_dump(mode="json")
    if out.suffix == ".json":
        out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    else:
        out.write_text(yaml.safe_dump(payload, sort_keys=False), encoding="utf-8")
    return out
