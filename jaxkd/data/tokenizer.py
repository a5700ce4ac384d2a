"""Loading tokenizers and deciding, by content, whether two of them are the same.

"The same tokenizer" means the same ids for the same text: vocabulary, merges, added tokens and the
normalisation and pre-tokenisation in front of them. Names, chat templates and a model's padded embedding
size (Qwen's 152064 rows for 151936 tokens) do not enter, so two copies of one tokenizer compare equal.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

from jaxkd.data.formats import DataError

# The parts of tokenizer.json that decide which ids a text gets.
_CONTENT_KEYS = ("normalizer", "pre_tokenizer", "model", "added_tokens")


def load_tokenizer(path: str):
  """A fast Hugging Face tokenizer from a local folder or a hub id, never running remote code."""
  from transformers import AutoTokenizer

  path = os.fspath(path)
  local = os.path.isdir(path) or path.startswith((".", "/", "~")) or os.path.exists(path)
  if local and not os.path.isdir(os.path.expanduser(path)):
    raise DataError(f"no tokenizer folder at {path!r}: point the tokenizer at a folder holding tokenizer.json "
                    "(or tokenizer_config.json and its vocabulary files)")
  try:
    tok = AutoTokenizer.from_pretrained(os.path.expanduser(path) if local else path, trust_remote_code=False)
  except (OSError, ValueError) as e:
    if local:
      raise DataError(f"could not load the tokenizer in {path!r}: {e}") from e
    raise DataError(
        f"could not load tokenizer {path!r} from the Hugging Face hub ({type(e).__name__}: {e}). If this "
        f"machine is offline, download it where there is internet (`hf download {path} --include "
        "'*.json' '*.jinja' '*.txt' '*.model'`), copy the folder here and set the tokenizer path to it.") from e
  if not getattr(tok, "is_fast", False):
    raise DataError(f"tokenizer {path!r} loaded as a slow (Python) tokenizer; the data pipeline needs a fast "
                    "one for character offsets. Add a tokenizer.json to the folder (convert it once with "
                    "transformers' AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained).")
  return tok


def _content(tok) -> dict:
  backend = getattr(tok, "backend_tokenizer", None)
  if backend is None:
    return {"vocab": sorted(tok.get_vocab().items())}
  spec = json.loads(backend.to_str())
  return {k: spec.get(k) for k in _CONTENT_KEYS}


@functools.lru_cache(maxsize=32)
def _fingerprint_of(content_json: str) -> str:
  return hashlib.sha256(content_json.encode()).hexdigest()


def tokenizer_fingerprint(tok) -> str:
  """sha256 of what decides the ids: vocabulary, merges, added tokens, normaliser, pre-tokeniser."""
  return _fingerprint_of(json.dumps(_content(tok), sort_keys=True, ensure_ascii=False))


def same_tokenizer(a, b) -> bool:
  """True when `a` and `b` give the same ids for every text (decided by content, not by name)."""
  return a is b or tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
