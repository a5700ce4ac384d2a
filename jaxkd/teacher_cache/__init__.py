"""The teacher's top-k log-probs, captured once (`python -m jaxkd.capture`) and read back for training without the
teacher model (`teacher.cache`).

  rows = jaxkd.teacher_cache.open(DIR)   # a sequence: rows[i] -> {"input_ids" [T], "indices" [T, k],
                                         #   "logprobs" [T, k] (float32, temperature 1), "signal_mask" [T], ...}

`store` holds jaxkd's format, `distillkit` reads DistillKit 1.0's captures (a folder with a
`compression_config.yaml`), `loader` makes a run's batches of either.
"""

from jaxkd.teacher_cache.distillkit import DistillKitCapture, DistillKitError, is_capture
from jaxkd.teacher_cache.store import Cache, CacheError


def open(directory: str) -> Cache | DistillKitCapture:  # pylint: disable=redefined-builtin
  """The rows of the teacher cache in `directory` (jaxkd's, or DistillKit's): `len(rows)`, `rows[i]`. At position
  j the signal is the teacher's distribution of the token after j (as a model's logits at j); `signal_mask` says
  where one is stored."""
  return DistillKitCapture(directory) if is_capture(directory) else Cache(directory)


__all__ = ["Cache", "CacheError", "DistillKitCapture", "DistillKitError", "open"]
