"""Model configuration for DeepSeek-V3-architecture decoders.

``ModelConfig`` is the typed, validated form of a Hugging Face ``config.json``
(``model_type: deepseek_v3``). It accepts both the released checkpoints' field names
(``rope_scaling``, ``rope_theta``, ``quantization_config``) and what ``transformers`` 5.x
writes (``rope_parameters``). A field it does not know, or a value it cannot run, is a
``ValueError`` naming the field: a checkpoint is never half-understood.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

# Fields every Hugging Face config may carry that do not change the math.
_GENERIC_FIELDS = frozenset(
    {
        "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
        "use_cache", "initializer_range", "pretraining_tp", "output_router_logits",
        "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id",
        "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "name_or_path",
        "tokenizer_class", "num_key_value_heads", "head_dim", "qk_head_dim", "pad_token_id",
        "bos_token_id", "eos_token_id", "attention_dropout", "aux_loss_alpha", "seq_aux",
        "ep_size", "num_labels", "tf_legacy_loss", "use_bfloat16", "torchscript",
    }
)
# DeepSeek-V3 fields with a single supported value: (field, supported values).
_FIXED_FIELDS: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "scoring_func": ("sigmoid",),
    "topk_method": ("noaux_tc",),
    "moe_layer_freq": (1,),
    "attention_bias": (False,),
}


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency layout. ``kind="yarn"`` is DeepSeek-V3's long-context extension."""

    kind: Literal["default", "yarn"] = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.kind == "yarn" and self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0 for yarn, got {self.factor}")
        if self.theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.theta}")

    @classmethod
    def from_hf(cls, params: dict[str, Any] | None, rope_theta: float | None) -> RopeScaling:
        params = dict(params or {})
        theta = float(params.pop("rope_theta", rope_theta if rope_theta is not None else 10000.0))
        kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        if kind not in ("default", "yarn"):
            raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, yarn)")
        if kind == "default":
            return cls(kind="default", theta=theta)
        known = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                 "mscale_all_dim", "attention_factor", "truncate"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown rope_scaling field(s): {', '.join(unknown)}")
        if "original_max_position_embeddings" not in params:
            raise ValueError("rope_scaling of type yarn needs original_max_position_embeddings")
        return cls(
            kind="yarn",
            theta=theta,
            factor=float(params.get("factor") or 1.0),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
        )

    def to_hf(self) -> dict[str, Any] | None:
        if self.kind == "default":
            return None
        out: dict[str, Any] = {
            "type": "yarn",
            "factor": self.factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
        }
        for name in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


@dataclass(frozen=True)
class FP8Format:
    """Block-wise FP8 weights as DeepSeek-V3 checkpoints store them (``weight_scale_inv``)."""

    fmt: Literal["e4m3"] = "e4m3"
    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: Literal["dynamic"] = "dynamic"

    @classmethod
    def from_hf(cls, q: dict[str, Any]) -> FP8Format:
        method = q.get("quant_method")
        if method != "fp8":
            raise ValueError(f"quantization_config.quant_method {method!r} is not supported (supported: fp8)")
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"quantization_config.fmt {fmt!r} is not supported (supported: e4m3)")
        block = tuple(q.get("weight_block_size") or (128, 128))
        if len(block) != 2 or block[0] != block[1]:
            raise ValueError(f"quantization_config.weight_block_size must be square [b, b], got {list(block)}")
        scheme = q.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ValueError(f"quantization_config.activation_scheme {scheme!r} is not supported (dynamic only)")
        return cls(weight_block_size=(int(block[0]), int(block[1])))

    def to_hf(self) -> dict[str, Any]:
        return {
            "quant_method": "fp8",
            "fmt": self.fmt,
            "weight_block_size": list(self.weight_block_size),
            "activation_scheme": self.activation_scheme,
        }


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and routing of a DeepSeek-V3-architecture model (names follow config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope: RopeScaling = field(default_factory=RopeScaling)
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    quantization: FP8Format | None = None

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"q_lora_rank must be > 0 or null, got {self.q_lora_rank}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(
                f"first_k_dense_replace={self.first_k_dense_replace} must be in [0, "
                f"num_hidden_layers={self.num_hidden_layers}]"
            )
        if self.has_moe:
            if self.n_routed_experts <= 0 or self.moe_intermediate_size <= 0:
                raise ValueError(
                    f"MoE layers need n_routed_experts > 0 and moe_intermediate_size > 0, got "
                    f"{self.n_routed_experts} and {self.moe_intermediate_size}"
                )
            if self.n_routed_experts % self.n_group:
                raise ValueError(f"n_group={self.n_group} must divide n_routed_experts={self.n_routed_experts}")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1 and per_group < 2:
                raise ValueError(
                    f"groups are scored by their top-2 experts: n_routed_experts={self.n_routed_experts} / "
                    f"n_group={self.n_group} leaves {per_group} per group"
                )
            if not 1 <= self.num_experts_per_tok <= self.topk_group * per_group:
                raise ValueError(
                    f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, topk_group*experts_per_group="
                    f"{self.topk_group * per_group}]"
                )

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def has_moe(self) -> bool:
        return self.first_k_dense_replace < self.num_hidden_layers

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def kv_cache_dim(self) -> int:
        """Elements cached per token per layer by MLA: the latent plus the decoupled RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def softmax_scale(self) -> float:
        """Attention scale; YaRN multiplies it by mscale² (as DeepSeek-V3 and transformers do)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope.kind == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    # ---- Hugging Face config.json --------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        d = dict(raw)
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in ("deepseek_v3", "deepseek_v2", "kimi_k2"):
            raise ValueError(f"model_type {model_type!r} is not supported (supported: deepseek_v3)")
        for name, allowed in _FIXED_FIELDS.items():
            if name in d and d[name] not in allowed:
                raise ValueError(f"{name}={d[name]!r} is not supported (supported: {', '.join(map(repr, allowed))})")
        rope_params = d.get("rope_parameters") if d.get("rope_parameters") is not None else d.get("rope_scaling")
        rope = RopeScaling.from_hf(rope_params, d.get("rope_theta"))
        quant = FP8Format.from_hf(d["quantization_config"]) if d.get("quantization_config") else None
        names = {f.name for f in dataclasses.fields(cls)} - {"rope", "quantization"}
        consumed = names | set(_FIXED_FIELDS) | {"rope_parameters", "rope_scaling", "rope_theta",
                                                  "quantization_config"}
        unknown = sorted(k for k in d if k not in consumed and k not in _GENERIC_FIELDS and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ValueError(f"config is missing required field(s): {', '.join(missing)}")
        kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
        if "q_lora_rank" in d:
            kwargs["q_lora_rank"] = d["q_lora_rank"]
        kwargs.setdefault("moe_intermediate_size", 0)
        return cls(rope=rope, quantization=quant, **kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "hidden_act": "silu",
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "attention_bias": False,
            "num_key_value_heads": self.num_attention_heads,
        }
        for f in dataclasses.fields(self):
            if f.name not in ("rope", "quantization"):
                out[f.name] = getattr(self, f.name)
        out["rope_theta"] = self.rope.theta
        out["rope_scaling"] = self.rope.to_hf()
        if self.quantization is not None:
            out["quantization_config"] = self.quantization.to_hf()
        return out

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1·mscale·ln(scale) + 1 (1 when not extrapolating)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
