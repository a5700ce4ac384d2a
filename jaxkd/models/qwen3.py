"""Qwen3 (dense): HF config conversion and weight names.

Llama's decoder with an RMSNorm over each head of the queries and keys before rotary (one [head_dim] weight
shared by the heads), biases on q/k/v/o only with `attention_bias`, and an explicit head_dim.
"""

from jaxkd.models import config as C
from jaxkd.models import llama

MODEL_TYPE = "qwen3"
ARCHITECTURE = "Qwen3ForCausalLM"
WEIGHT_NAMES = {
    **llama.WEIGHT_NAMES,
    "layers.self_attn.q_norm.scale": "model.layers.{layer}.self_attn.q_norm.weight",
    "layers.self_attn.k_norm.scale": "model.layers.{layer}.self_attn.k_norm.weight",
}
# transformers' Qwen3Config default: a config.json without head_dim means 128, not hidden_size / heads.
DEFAULT_HEAD_DIM = 128


def from_hf_config(hf: dict) -> C.ModelConfig:
  C.check_fields(hf, model_type=MODEL_TYPE, allowed={"hidden_act": ("silu",)})
  C.check_full_attention(hf)
  bias = bool(hf.get("attention_bias", False))
  return C.ModelConfig(
      model_type=MODEL_TYPE,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"],
      num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
      head_dim=int(hf.get("head_dim") or DEFAULT_HEAD_DIM),
      max_position_embeddings=hf["max_position_embeddings"],
      norm="rms",
      norm_eps=hf.get("rms_norm_eps", 1e-6),
      qkv_bias=bias,
      o_bias=bias,
      qk_norm="shared",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      rope=C.rope_from_hf(hf),
      initializer_range=hf.get("initializer_range", 0.02),
      hf_passthrough=C.passthrough_of(hf),
  )


def to_hf_config(cfg: C.ModelConfig) -> dict:
  return {
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.norm_eps,
      "attention_bias": cfg.qkv_bias,
      "use_sliding_window": False,
      "max_window_layers": cfg.num_layers,
      **C.rope_to_hf(cfg.rope),
  }
