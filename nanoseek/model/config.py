"""Model configuration: one dataclass that reads and writes Hugging Face DeepseekV3/V2 `config.json`.

Field names are the Hugging Face ones, so a hub config maps onto this class one to one. Every field
that changes the computation is here; keys that only concern other frameworks are accepted and
dropped, anything else is an error that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

ROUTED_SCORING = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
MODEL_TYPES = ("deepseek_v3", "deepseek_v2")

# Keys of hub / transformers configs that do not change what this model computes.
_IGNORED_HF_KEYS = {
    "architectures", "auto_map", "transformers_version", "_name_or_path", "name_or_path", "use_cache",
    "output_router_logits", "router_aux_loss_coef", "aux_loss_alpha", "seq_aux", "ep_size",
    "pretraining_tp", "attention_dropout", "torch_dtype", "dtype", "quantization_config", "head_dim",
    "qk_head_dim", "num_mtp_layers", "initializer_range", "output_attentions", "output_hidden_states",
    "return_dict", "is_encoder_decoder", "tie_encoder_decoder", "chunk_size_feed_forward",
    "problem_type", "id2label", "label2id", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "finetuning_task", "cross_attention_hidden_size",
    "add_cross_attention", "is_decoder", "mlp_bias", "scale_fmt", "rope_parameters", "rope_theta",
    "rope_scaling", "model_type", "num_experts", "num_local_experts", "num_key_value_heads",
}


class ConfigError(ValueError):
    """A config value that is unknown or inconsistent; the message names the field."""


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (YaRN eq. 22, DeepSeek form)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass
class ModelConfig:
    vocab_size: int = 8000
    hidden_size: int = 512
    intermediate_size: int = 1536
    moe_intermediate_size: int = 256
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    q_lora_rank: int | None = 192
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    n_routed_experts: int | None = 16
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 4
    n_group: int | None = 1
    topk_group: int | None = 1
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    num_nextn_predict_layers: int = 0
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    # Log-n attention (Chiang & Cholak 2022, arXiv 2202.12172; Qwen's `use_logn_attn`): the query of
    # the n-th token, n > this length, has its logits multiplied by log(n) / log(length), so the attention
    # entropy does not grow with the number of keys beyond the length the model was trained on. Not a
    # Hugging Face DeepSeek field: transformers ignores it (see checkpoint.transformers_gaps).
    logn_attention_length: int | None = None
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    model_type: str = "deepseek_v3"
    torch_dtype: str | None = None  # dtype of the stored weights, as in the hub config
    extra: dict = field(default_factory=dict, repr=False)  # ignored hub keys, written back on save

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_dim(self) -> int:
        """Elements cached per token per layer: the normalised latent and the rotated shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def has_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.has_moe and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    # ---- rope / softmax scale --------------------------------------------------------------
    @property
    def rope_type(self) -> str:
        """The `rope_scaling` type: 'default', 'linear' (position interpolation) or 'yarn'."""
        rs = self.rope_scaling
        return rs.get("type", rs.get("rope_type", "default")) if rs else "default"

    @property
    def yarn(self) -> dict | None:
        """Normalised YaRN parameters, or None for plain RoPE and for linear scaling."""
        rs = self.rope_scaling
        if not rs or self.rope_type in ("default", "linear"):
            return None
        original = rs["original_max_position_embeddings"]
        factor = rs.get("factor") or self.max_position_embeddings / original
        return {
            "factor": float(factor),
            "original_max_position_embeddings": int(original),
            "beta_fast": float(rs.get("beta_fast") or 32),
            "beta_slow": float(rs.get("beta_slow") or 1),
            "mscale": rs.get("mscale"),
            "mscale_all_dim": rs.get("mscale_all_dim"),
            "attention_factor": rs.get("attention_factor"),
            "truncate": rs.get("truncate", True),
        }

    @property
    def softmax_scale(self) -> float:
        # DeepSeek squares the YaRN temperature into the logit scale (V2 report App. / V3 §4.3),
        # and only through mscale_all_dim; cos/sin then carry the ratio (see rope_amplitude).
        scale = self.qk_head_dim ** -0.5
        yarn = self.yarn
        if yarn and yarn["mscale_all_dim"]:
            scale *= yarn_get_mscale(yarn["factor"], yarn["mscale_all_dim"]) ** 2
        return scale

    @property
    def rope_amplitude(self) -> float:
        """Factor on cos/sin. 1.0 for every released DeepSeek config (mscale == mscale_all_dim).

        With one of the two fields missing it falls back to Llama-YaRN's get_mscale(s), as
        transformers does; writing both fields (save_pretrained always does) avoids that.
        """
        yarn = self.yarn
        if not yarn:
            return 1.0
        if yarn["attention_factor"] is not None:
            return float(yarn["attention_factor"])
        if yarn["mscale"] and yarn["mscale_all_dim"]:
            return yarn_get_mscale(yarn["factor"], yarn["mscale"]) / yarn_get_mscale(
                yarn["factor"], yarn["mscale_all_dim"])
        return yarn_get_mscale(yarn["factor"])

    # ---- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ConfigError(f"config field '{name}' = {getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                fail(name, "must be a positive integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            fail("q_lora_rank", "must be a positive integer or null (plain q_proj)")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "RoPE rotates pairs of dimensions, so it must be even")
        if self.model_type not in MODEL_TYPES:
            fail("model_type", f"expected one of {MODEL_TYPES}")
        if self.hidden_act != "silu":
            fail("hidden_act", "only 'silu' (SwiGLU experts) is implemented")
        if self.num_nextn_predict_layers < 0:
            fail("num_nextn_predict_layers", "must be >= 0")
        if self.first_k_dense_replace < 0:
            fail("first_k_dense_replace", "must be >= 0")
        if not isinstance(self.moe_layer_freq, int) or self.moe_layer_freq < 1:
            fail("moe_layer_freq", "must be a positive integer")
        if self.has_moe:
            if self.scoring_func not in ROUTED_SCORING:
                fail("scoring_func", f"expected one of {ROUTED_SCORING}")
            if self.topk_method not in TOPK_METHODS:
                fail("topk_method", f"expected one of {TOPK_METHODS}")
            if not self.num_experts_per_tok or not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                fail("num_experts_per_tok", f"must be in 1..n_routed_experts ({self.n_routed_experts})")
            if self.moe_intermediate_size is None or self.moe_intermediate_size <= 0:
                fail("moe_intermediate_size", "must be a positive integer")
            if self.n_shared_experts is not None and self.n_shared_experts < 0:
                fail("n_shared_experts", "must be >= 0")
            if self.topk_method in ("group_limited_greedy", "noaux_tc"):
                n_group, topk_group = self.n_group or 1, self.topk_group or 1
                if n_group < 1 or self.n_routed_experts % n_group:
                    fail("n_group", f"must divide n_routed_experts ({self.n_routed_experts})")
                if not 1 <= topk_group <= n_group:
                    fail("topk_group", f"must be in 1..n_group ({n_group})")
                if topk_group * (self.n_routed_experts // n_group) < self.num_experts_per_tok:
                    fail("topk_group", "the kept groups hold fewer experts than num_experts_per_tok")
                if self.topk_method == "noaux_tc" and n_group > 1 and self.n_routed_experts // n_group < 2:
                    fail("n_group", "noaux_tc scores a group by its top-2 experts, so groups need >= 2")
        if self.logn_attention_length is not None and (
                not isinstance(self.logn_attention_length, int) or self.logn_attention_length < 2):
            fail("logn_attention_length", "must be an integer >= 2 (a trained context length) or null")
        if self.rope_scaling is not None:
            rtype = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if rtype not in ("yarn", "linear", "default", None):
                fail("rope_scaling", f"type {rtype!r} is not supported (yarn, linear or default)")
            if rtype == "linear" and not self.rope_scaling.get("factor", 0) >= 1:
                fail("rope_scaling", "linear scaling needs a factor >= 1")
            if rtype == "yarn" and "original_max_position_embeddings" not in self.rope_scaling:
                fail("rope_scaling", "yarn needs original_max_position_embeddings")

    # ---- Hugging Face config.json ----------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        raw = dict(raw)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values: dict[str, Any] = {}
        # transformers 5 writes rope_parameters (rope_theta inside) instead of rope_scaling.
        rope_params = raw.get("rope_parameters")
        if rope_params:
            values["rope_theta"] = rope_params.get("rope_theta", raw.get("rope_theta", 10000.0))
            if rope_params.get("rope_type", "default") != "default":
                values["rope_scaling"] = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if "num_mtp_layers" in raw and "num_nextn_predict_layers" not in raw:
            values["num_nextn_predict_layers"] = raw["num_mtp_layers"]
        for alias in ("num_local_experts", "num_experts"):
            if alias in raw and "n_routed_experts" not in raw:
                values["n_routed_experts"] = raw[alias]
        if raw.get("model_type") == "deepseek_v2":
            # Defaults of the V2 family differ from V3 where a key is absent.
            values.setdefault("topk_method", raw.get("topk_method", "greedy"))
            values.setdefault("scoring_func", raw.get("scoring_func", "softmax"))
            values.setdefault("norm_topk_prob", raw.get("norm_topk_prob", False))
        extra = {}
        for key, value in raw.items():
            if key in names:
                if key in ("rope_theta", "rope_scaling") and key in values:
                    continue
                values[key] = value
            elif key in _IGNORED_HF_KEYS:
                extra[key] = value
            else:
                close = difflib.get_close_matches(key, sorted(names), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown config key '{key}'{hint}")
        if "num_key_value_heads" in raw:
            if raw["num_key_value_heads"] not in (None, raw.get("num_attention_heads")):
                raise ConfigError("config field 'num_key_value_heads' must equal num_attention_heads: "
                                  "MLA shares one latent across all heads, there is no GQA")
        for derived in ("num_key_value_heads", "rope_parameters", "num_experts", "num_local_experts"):
            extra.pop(derived, None)
        return cls(**values, extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        keep_extra = {k: v for k, v in self.extra.items()
                      if k not in ("quantization_config", "torch_dtype", "dtype", "rope_parameters",
                                   "transformers_version", "head_dim", "qk_head_dim", "num_mtp_layers")}
        out = {**keep_extra, **out}
        out["architectures"] = ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3"
                                else "DeepseekV2ForCausalLM"]
        out["num_key_value_heads"] = self.num_attention_heads
        if out["logn_attention_length"] is None:
            del out["logn_attention_length"]  # not a DeepSeek field: written only when used
        if out["rope_scaling"] is not None:
            rs = dict(out["rope_scaling"])
            rs.setdefault("type", rs.pop("rope_type", "yarn"))
            # Always write both mscale fields: with one missing, readers fall back to Llama-YaRN
            # amplitude on cos/sin and double-count the temperature (docs/facts.md §2).
            if rs["type"] == "yarn":
                rs.setdefault("mscale", 1.0)
                rs.setdefault("mscale_all_dim", rs["mscale"])
            out["rope_scaling"] = rs
        return out

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no model config at {path}")
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))

    def save(self, directory: str | os.PathLike) -> None:
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
