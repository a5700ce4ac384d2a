"""The on-disk tokenization cache: encoded rows of one source share, keyed by everything that made them.

The key hashes the source's content fingerprint, the rows read, both tokenizers' content, the rendered
templates and every setting that changes tokens (format, train_on, roles, end-of-turn tokens, ...), but
not seq_len or the seed: truncation, shuffling and packing happen after the cache, so a resume or a run
with another sequence length reuses it. An entry is a folder of .npy files plus meta.json, written to a
temporary name and renamed into place, so a crashed writer never leaves a half entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from jaxkd.data.encode import Encoded

CACHE_VERSION = 2  # bump when the encoding changes meaning, so old entries are ignored (2: tool calls)


def default_cache_dir() -> str:
  return os.environ.get("JAXKD_DATA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxkd", "data")


def cache_key(parts: dict) -> str:
  blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load(cache_dir: str, key: str) -> Encoded | None:
  folder = os.path.join(cache_dir, "tokenized", key)
  meta_path = os.path.join(folder, "meta.json")
  if not os.path.exists(meta_path):
    return None
  with open(meta_path) as f:
    meta = json.load(f)
  arrays = {}
  for name in Encoded.ARRAYS:
    path = os.path.join(folder, f"{name}.npy")
    # Memory-mapped: a resume touches only the rows it packs, not the whole share.
    arrays[name] = np.load(path, mmap_mode="r") if os.path.exists(path) else None
  return Encoded(**arrays, problems=meta["problems"])


def save(cache_dir: str, key: str, enc: Encoded, info: dict) -> None:
  root = os.path.join(cache_dir, "tokenized")
  os.makedirs(root, exist_ok=True)
  final = os.path.join(root, key)
  tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=root)
  try:
    for name in Encoded.ARRAYS:
      value = getattr(enc, name)
      if value is not None:
        np.save(os.path.join(tmp, f"{name}.npy"), np.ascontiguousarray(value))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump({"problems": enc.problems, "info": info}, f, indent=1, default=str)
    try:
      os.rename(tmp, final)
    except OSError:  # another process wrote the same entry first: theirs is as good as ours
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
