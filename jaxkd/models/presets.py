"""config.json of real checkpoints, as published on the Hugging Face hub, for offline use.

Benchmarks and tests build these shapes (randomly initialised or abstractly with `jax.eval_shape`)
without downloading anything. Keys are the hub ids.
"""

_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
          "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "initializer_range": 0.02,
          "max_position_embeddings": 131072, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
          "sliding_window": 131072, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False}

# Qwen3's shared keys and the shapes below agree, key by key, with public copies of Qwen3-8B's and Qwen3-4B's
# config.json found in other projects' code (the hub is not reachable from where this was written).
_QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
          "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128,
          "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 40960, "rms_norm_eps": 1e-06,
          "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "torch_dtype": "bfloat16",
          "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}

PRESETS = {
    "Qwen/Qwen2-0.5B": {**_QWEN2, "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
                        "num_hidden_layers": 24, "num_key_value_heads": 2, "max_window_layers": 24,
                        "tie_word_embeddings": True, "vocab_size": 151936},
    "Qwen/Qwen2-1.5B": {**_QWEN2, "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
                        "num_hidden_layers": 28, "num_key_value_heads": 2, "max_window_layers": 28,
                        "tie_word_embeddings": True, "vocab_size": 151936},
    "Qwen/Qwen2-7B": {**_QWEN2, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                      "num_hidden_layers": 28, "num_key_value_heads": 4, "max_window_layers": 28,
                      "tie_word_embeddings": False, "vocab_size": 152064},
    "Qwen/Qwen3-0.6B": {**_QWEN3, "hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16,
                        "num_hidden_layers": 28, "num_key_value_heads": 8, "max_window_layers": 28,
                        "tie_word_embeddings": True},
    "Qwen/Qwen3-1.7B": {**_QWEN3, "hidden_size": 2048, "intermediate_size": 6144, "num_attention_heads": 16,
                        "num_hidden_layers": 28, "num_key_value_heads": 8, "max_window_layers": 28,
                        "tie_word_embeddings": True},
    "Qwen/Qwen3-4B": {**_QWEN3, "hidden_size": 2560, "intermediate_size": 9728, "num_attention_heads": 32,
                      "num_hidden_layers": 36, "num_key_value_heads": 8, "max_window_layers": 36,
                      "tie_word_embeddings": True},
    "Qwen/Qwen3-8B": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32,
                      "num_hidden_layers": 36, "num_key_value_heads": 8, "max_window_layers": 36,
                      "tie_word_embeddings": False},
    "Qwen/Qwen3-32B": {**_QWEN3, "hidden_size": 5120, "intermediate_size": 25600, "num_attention_heads": 64,
                       "num_hidden_layers": 64, "num_key_value_heads": 8, "max_window_layers": 64,
                       "tie_word_embeddings": False},
    "meta-llama/Llama-3.1-8B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 128256},
    "meta-llama/Llama-3.1-70B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
        "hidden_size": 8192, "initializer_range": 0.02, "intermediate_size": 28672,
        "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 64, "num_hidden_layers": 80,
        "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 128256},
    "stabilityai/stablelm-2-1_6b": {
        "architectures": ["StableLmForCausalLM"], "model_type": "stablelm", "bos_token_id": 100257,
        "eos_token_id": 100257, "hidden_act": "silu", "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 4096, "num_attention_heads": 32, "num_hidden_layers": 24,
        "num_key_value_heads": 32, "partial_rotary_factor": 0.25, "qk_layernorm": False, "rope_theta": 10000,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_parallel_residual": False, "use_qkv_bias": True, "vocab_size": 100352},
}
