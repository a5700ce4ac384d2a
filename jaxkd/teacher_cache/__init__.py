"""The teacher's top-k log-probs, captured once (`python -m jaxkd.capture`) and read back for training without the
teacher model (`teacher.cache`).

  rows = jaxkd.teacher_cache.open(DIR)   # a sequence: rows[i] -> {"input_ids" [T], "indices" [T, k],
                                         #   "logprobs" [T, k] (float32, temperature 1), "signal_mask" [T], ...}

`store` holds jaxkd's format, `loader` the batches a run reads from it.
"""

from jaxkd.teacher_cache.store import Cache, CacheError


def open(directory: str) -> Cache:  # pylint: disable=redefined-builtin
  """The rows of the teacher cache in `directory`: `len(rows)`, `rows[i]`. At position j the signal is the
  teacher's distribution of the token after j (as a model's logits at j); `signal_mask` says where one is stored."""
  return Cache(directory)


__all__ = ["Cache", "CacheError", "open"]
