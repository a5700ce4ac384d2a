"""Tiny random transformers models of every supported configuration, for comparison tests; edits that damage a
saved model folder, for the loaders' error tests."""

import json
import os

import numpy as np
import torch
import transformers as tf

V, D, F, L, H, K = 101, 32, 64, 2, 4, 2
_SIZES = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
              num_key_value_heads=K, max_position_embeddings=64)

CONFIGS = {
    "qwen2_tied": tf.Qwen2Config(**_SIZES, tie_word_embeddings=True),
    "qwen2_untied": tf.Qwen2Config(**_SIZES, tie_word_embeddings=False, rope_theta=1e6),
    "qwen2_head_dim": tf.Qwen2Config(**_SIZES, head_dim=16, tie_word_embeddings=False),  # != hidden / heads
    "llama_gqa_llama3": tf.LlamaConfig(
        **{**_SIZES, "num_key_value_heads": 1}, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8}),
    "llama_bias_linear": tf.LlamaConfig(**_SIZES, attention_bias=True, mlp_bias=True, head_dim=16,
                                        rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama_dynamic": tf.LlamaConfig(**{**_SIZES, "max_position_embeddings": 8},
                                    rope_scaling={"rope_type": "dynamic", "factor": 3.0}),
    "llama_yarn": tf.LlamaConfig(**_SIZES, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                         "original_max_position_embeddings": 16}),
    "stablelm_full": tf.StableLmConfig(**_SIZES, partial_rotary_factor=0.25, use_qkv_bias=True,
                                       qk_layernorm=True, use_parallel_residual=True),
    # head_dim != hidden / heads; GQA with 2 and 1 key/value heads for 4 query heads; q/k/v/o biases.
    "qwen3_untied": tf.Qwen3Config(**_SIZES, head_dim=16, tie_word_embeddings=False),
    "qwen3_tied_bias": tf.Qwen3Config(**{**_SIZES, "num_key_value_heads": 1}, head_dim=12, attention_bias=True,
                                      tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 1e6}),
    "stablelm_plain": tf.StableLmConfig(**{**_SIZES, "num_key_value_heads": 4}, partial_rotary_factor=0.5),
}


def save_tiny(folder, config, *, seed=0, **save_kwargs):
  """Random model with every parameter perturbed (so norms and biases are not trivially 1 and 0)."""
  torch.manual_seed(seed)
  model = tf.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(folder, **save_kwargs)
  return str(folder)


def torch_logits(folder, ids, attention_mask=None, position_ids=None, dtype=torch.float32,
                 output_hidden_states=False):
  model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
  kwargs = {}
  if attention_mask is not None:
    kwargs["attention_mask"] = torch.tensor(np.asarray(attention_mask))
  if position_ids is not None:
    kwargs["position_ids"] = torch.tensor(np.asarray(position_ids))
  with torch.no_grad():
    out = model(torch.tensor(np.asarray(ids)), output_hidden_states=output_hidden_states, **kwargs)
  if output_hidden_states:
    return out.logits.float().numpy(), [h.float().numpy() for h in out.hidden_states]
  return out.logits.float().numpy()


def rewrite_weights(folder, edit):
  """edit(tensors) changes the {name: torch tensor} of folder/model.safetensors in place; it is saved back."""
  from safetensors.torch import load_file, save_file  # pylint: disable=import-outside-toplevel
  path = os.path.join(folder, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def edit_config(folder, **changes):
  path = os.path.join(folder, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(path, "w") as f:
    json.dump(cfg, f)


def truncate_weights(folder):
  """Cuts the last 100 bytes off folder/model.safetensors, as an interrupted download or copy would."""
  path = os.path.join(folder, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
