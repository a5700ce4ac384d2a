"""StableLM (StableLM-2, StableLM-3B-4E1T): HF config conversion and weight names.

Differs from Llama by LayerNorm with biases, partial rotary, optional q/k/v biases, optional per-head
q/k LayerNorm (`{head}` in a name runs over the heads axis of the stacked norm weight) and an optional
parallel residual.
"""

from jaxkd.models import config as C
from jaxkd.models import llama

MODEL_TYPE = "stablelm"
ARCHITECTURE = "StableLmForCausalLM"
WEIGHT_NAMES = {
    **llama.WEIGHT_NAMES,
    "layers.input_layernorm.bias": "model.layers.{layer}.input_layernorm.bias",
    "layers.post_attention_layernorm.bias": "model.layers.{layer}.post_attention_layernorm.bias",
    "layers.self_attn.q_layernorm.scale": "model.layers.{layer}.self_attn.q_layernorm.norms.{head}.weight",
    "layers.self_attn.k_layernorm.scale": "model.layers.{layer}.self_attn.k_layernorm.norms.{head}.weight",
    "norm.bias": "model.norm.bias",
}


def from_hf_config(hf: dict) -> C.ModelConfig:
  C.check_fields(hf, model_type=MODEL_TYPE, allowed={"hidden_act": ("silu",)})
  if hf["hidden_size"] % hf["num_attention_heads"]:
    raise C.UnsupportedConfigError("hidden_size must be a multiple of num_attention_heads for StableLM")
  return C.ModelConfig(
      model_type=MODEL_TYPE,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"],
      num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
      head_dim=hf["hidden_size"] // hf["num_attention_heads"],  # StableLM ignores a head_dim field
      max_position_embeddings=hf["max_position_embeddings"],
      norm="layer",
      norm_eps=hf.get("layer_norm_eps", 1e-5),
      norm_bias=True,
      qkv_bias=bool(hf.get("use_qkv_bias", False)),
      qk_norm="per_head" if hf.get("qk_layernorm", False) else "none",
      parallel_residual=bool(hf.get("use_parallel_residual", False)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      rope=C.rope_from_hf({"partial_rotary_factor": 0.25, **hf}),
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
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "layer_norm_eps": cfg.norm_eps,
      "use_qkv_bias": cfg.qkv_bias,
      "qk_layernorm": cfg.qk_norm == "per_head",
      "use_parallel_residual": cfg.parallel_residual,
      "partial_rotary_factor": cfg.rope.fraction,
      **C.rope_to_hf(cfg.rope),
  }
