"""The data pipeline: sources, formats, chat templates and masks, packing, and the resumable loader.

    loader = make_loader(config.data, tokenizer=tok, seq_len=2048, batch_size=256, seed=0)
    print(loader.summary())
    batch = next(loader)                 # process-local NumPy arrays, see jaxkd.data.loader
    arrays = global_batch(batch, mesh)   # global jax.Arrays split over their rows
    state = loader.get_state()           # JSON-serialisable; loader.set_state(state) resumes exactly

Names are imported on first use, so tokenization worker processes (which need only jaxkd.data.encode) start
without importing JAX and grain.
"""

import importlib

_EXPORTS = {
    "ASSETS_DIR": "assets", "CHAT_MESSAGES": "assets", "CHAT_SHAREGPT": "assets", "CHAT_TOOLS_OPENAI": "assets", "TOKENIZER_DIR": "assets",
    "default_data_config": "config",
    "CHATML_TEMPLATE": "encode", "resolve_template": "encode", "teacher_template": "encode",
    "FORMATS": "formats", "BadRow": "formats", "Conversation": "formats", "DataError": "formats",
    "Text": "formats", "detect_format": "formats", "to_example": "formats",
    "ImitatedProcesses": "loader", "Loader": "loader", "global_batch": "loader", "make_loader": "loader",
    "Prompt": "prompts", "held_out_conversations": "prompts", "held_out_examples": "prompts",
    "held_out_prompts": "prompts",
    "load_tokenizer": "tokenizer", "same_tokenizer": "tokenizer", "tokenizer_fingerprint": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'jaxkd.data' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"jaxkd.data.{_EXPORTS[name]}"), name)
  globals()[name] = value
  return value


def __dir__():
  return __all__
