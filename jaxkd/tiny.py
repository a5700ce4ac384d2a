"""Tiny randomly initialised models on the bundled tokenizer, built on first use into a cache folder.

A config names them as `tiny:NAME` wherever it takes a model path. Their embedding tables are padded
past the tokenizer (like Qwen2's 151936/152064 rows), so the tiny runs exercise the vocabulary cut. All
but one use the bundled tokenizer; `llama-teacher-othertok` uses the second (SentencePiece-style) one, so a run with it
as the teacher needs cross-tokenizer (hidden-state) distillation.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
TOKENIZER_DIR = os.path.join(ASSETS, "tokenizer")
OTHER_TOKENIZER_DIR = os.path.join(ASSETS, "tokenizer_other")

_QWEN2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
          "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "use_sliding_window": False,
          "attention_dropout": 0.0, "initializer_range": 0.02}

_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
          "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 500000.0}

_LLAMA_TEACHER = {**_LLAMA, "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 4,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 832, "tie_word_embeddings": False}

TINY_CONFIGS = {
    # A cross-architecture pair for hidden-state distillation (Llama teacher, StableLM student).
    "llama-teacher": _LLAMA_TEACHER,
    # The same teacher on another tokenizer (SentencePiece-style, 512 tokens): only hidden states can be
    # distilled from it.
    "llama-teacher-othertok": {**_LLAMA_TEACHER, "vocab_size": 576},
    # A Llama student for the Qwen2 teacher (Qwen2 -> Llama across architectures).
    "llama-student": {**_LLAMA, "hidden_size": 48, "intermediate_size": 128, "num_hidden_layers": 3,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 800,
                      "tie_word_embeddings": True},
    "stablelm-student": {"model_type": "stablelm", "architectures": ["StableLmForCausalLM"], "hidden_act": "silu",
                         "max_position_embeddings": 2048, "layer_norm_eps": 1e-5, "rope_theta": 10000,
                         "partial_rotary_factor": 0.25, "use_qkv_bias": True, "hidden_size": 64,
                         "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 4, "vocab_size": 800, "tie_word_embeddings": False},
    "teacher": {**_QWEN2, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 832, "tie_word_embeddings": False},
    "student": {**_QWEN2, "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 800, "tie_word_embeddings": True},
}
TOKENIZERS = {"llama-teacher-othertok": OTHER_TOKENIZER_DIR}  # the rest use TOKENIZER_DIR


def cache_root() -> str:
  return os.environ.get("JAXKD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxkd"))


# Trained models shipped in the repository (made by the named script, reproducibly from its seed).
BUNDLED = {"teacher-trained": (os.path.join(ASSETS, "teacher"), "python scripts/train_teacher.py")}


def resolve(path: str, *, seed: int = 0) -> str:
  """`tiny:NAME` -> a folder holding that model (built if missing); any other path unchanged."""
  if not path.startswith("tiny:"):
    return path
  name = path[len("tiny:"):]
  if name in BUNDLED:
    folder, script = BUNDLED[name]
    if not os.path.exists(os.path.join(folder, "config.json")):
      raise FileNotFoundError(f"the bundled model {path} is missing from {folder}; recreate it with `{script}`")
    return folder
  if name not in TINY_CONFIGS:
    known = [*("tiny:" + n for n in TINY_CONFIGS), *("tiny:" + n for n in BUNDLED)]
    raise ValueError(f"unknown tiny model {path!r}; known: {', '.join(known)}")
  hf, tok_dir = TINY_CONFIGS[name], TOKENIZERS.get(name, TOKENIZER_DIR)
  with open(os.path.join(tok_dir, "tokenizer.json"), "rb") as f:
    tok_hash = hashlib.sha256(f.read()).hexdigest()
  key = hashlib.sha256(json.dumps([hf, tok_hash, seed], sort_keys=True).encode()).hexdigest()[:10]
  folder = os.path.join(cache_root(), "tiny", f"{name}-{key}")
  if not os.path.exists(os.path.join(folder, "config.json")):
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with open(folder + ".lock", "w") as lock:  # several processes (test workers, hosts) may ask at once
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not os.path.exists(os.path.join(folder, "config.json")):
        _build(folder, hf, seed, tok_dir)
  return folder


def _build(folder: str, hf: dict, seed: int, tok_dir: str) -> None:
  # Imported here: building is rare and pulls in the model code.
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

  from jaxkd import models  # pylint: disable=import-outside-toplevel

  cfg = models.config_from_hf(hf)
  model = models.Transformer(cfg, rngs=nnx.Rngs(seed))
  tokenizer = AutoTokenizer.from_pretrained(tok_dir)
  models.save_pretrained(model, folder, tokenizer=tokenizer)
