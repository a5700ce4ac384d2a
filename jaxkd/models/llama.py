"""Llama (2, 3, 3.1, 3.2): HF config conversion and weight names."""

from jaxkd.models import config as C

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"

# Our parameter path -> HF tensor name. `{layer}` runs over the stacked "layers" axis; kernels are
# stored transposed by HF ([out, in]). A row whose parameter the model lacks (a bias a config switches
# off) is skipped. Qwen2 uses the same names.
WEIGHT_NAMES = {
    "embed_tokens.embedding": "model.embed_tokens.weight",
    "layers.input_layernorm.scale": "model.layers.{layer}.input_layernorm.weight",
    "layers.self_attn.q_proj.kernel": "model.layers.{layer}.self_attn.q_proj.weight",
    "layers.self_attn.q_proj.bias": "model.layers.{layer}.self_attn.q_proj.bias",
    "layers.self_attn.k_proj.kernel": "model.layers.{layer}.self_attn.k_proj.weight",
    "layers.self_attn.k_proj.bias": "model.layers.{layer}.self_attn.k_proj.bias",
    "layers.self_attn.v_proj.kernel": "model.layers.{layer}.self_attn.v_proj.weight",
    "layers.self_attn.v_proj.bias": "model.layers.{layer}.self_attn.v_proj.bias",
    "layers.self_attn.o_proj.kernel": "model.layers.{layer}.self_attn.o_proj.weight",
    "layers.self_attn.o_proj.bias": "model.layers.{layer}.self_attn.o_proj.bias",
    "layers.post_attention_layernorm.scale": "model.layers.{layer}.post_attention_layernorm.weight",
    "layers.mlp.gate_proj.kernel": "model.layers.{layer}.mlp.gate_proj.weight",
    "layers.mlp.gate_proj.bias": "model.layers.{layer}.mlp.gate_proj.bias",
    "layers.mlp.up_proj.kernel": "model.layers.{layer}.mlp.up_proj.weight",
    "layers.mlp.up_proj.bias": "model.layers.{layer}.mlp.up_proj.bias",
    "layers.mlp.down_proj.kernel": "model.layers.{layer}.mlp.down_proj.weight",
    "layers.mlp.down_proj.bias": "model.layers.{layer}.mlp.down_proj.bias",
    "norm.scale": "model.norm.weight",
    "lm_head.kernel": "lm_head.weight",
}


def from_hf_config(hf: dict) -> C.ModelConfig:
  C.check_fields(hf, model_type=MODEL_TYPE, allowed={"hidden_act": ("silu",)})
  bias = bool(hf.get("attention_bias", False))
  return C.ModelConfig(
      model_type=MODEL_TYPE,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"],
      num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
      head_dim=C.head_dim_of(hf),
      max_position_embeddings=hf["max_position_embeddings"],
      norm="rms",
      norm_eps=hf.get("rms_norm_eps", 1e-6),
      qkv_bias=bias,
      o_bias=bias,
      mlp_bias=bool(hf.get("mlp_bias", False)),
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
      "mlp_bias": cfg.mlp_bias,
      **C.rope_to_hf(cfg.rope),
  }
