"""The training batches of a run that distils from a teacher cache.

The cache holds the run's own training rows with the teacher's top-k at each trained token, in the order the run
reads them (`jaxkd.capture`). `CacheLoader` serves them as the data loader's batches plus "teacher_indices" and
"teacher_logprobs" [rows, seq_len, k], and runs the run's data loader beside it to check that every row's tokens are
the ones the run would train on: a cache of other data, tokenizer or template fails at the first row that differs,
named. Its position (the next batch and the data loader's own) goes into the checkpoint, as the data loader's does.
"""

from __future__ import annotations

import numpy as np

from jaxkd.teacher_cache.store import ROW_KEYS, Cache, CacheError, differences


def check_identity(cache: Cache, expected: dict, teacher_path: str = "") -> None:
  """Refuses a cache made from another setup than `expected` (`store.identity` of this run), naming each
  difference; the number of rows does not count (a run may read fewer). The run has no teacher model to compare,
  but a `teacher_path` it names must be the one captured."""
  stored = cache.manifest
  captured = (stored.get("teacher") or {}).get("path")
  if teacher_path and teacher_path != captured:
    raise CacheError(f"the teacher cache {cache.directory} holds the log-probs of {captured}, but this run names "
                     f"teacher.path={teacher_path!r}: capture that teacher, or leave teacher.path empty")
  skip = ("rows", "teacher", "shard_batches", "k", "vocab_size", "logprob_step")
  differ = differences({k: stored.get(k) for k in expected if k not in skip},
                       {k: v for k, v in expected.items() if k not in skip})
  if differ:
    raise CacheError(f"the teacher cache {cache.directory} was captured for another setup: {'; '.join(differ)}. "
                     "Capture it again with this config (python -m jaxkd.capture), or run with the cache's settings")
  import jax  # pylint: disable=import-outside-toplevel

  if stored.get("processes", 1) != jax.process_count():
    raise CacheError(f"the teacher cache {cache.directory} was captured by {stored.get('processes')} process(es), "
                     f"each reading its own share of the data, but this run has {jax.process_count()}: run with "
                     f"distributed.num_processes={stored.get('processes')}, or capture with this many")
  if not stored.get("complete", False):
    raise CacheError(f"the capture in {cache.directory} did not finish: rerun python -m jaxkd.capture with the "
                     "same config to complete it")


class _StreamRows:
  """Rows b * batch_size + process_index * rows + [0, rows) of a cache for batch b: one process's share, in the
  run's order; a run that needs more rows than the cache holds is refused at start."""

  def __init__(self, cache, *, batch_size: int, process_index: int, process_count: int, steps: int, what: str,
               fix: str):
    self.cache = cache
    self.rows = batch_size // process_count
    self.batch_size, self.offset = batch_size, process_index * self.rows
    needed = steps * batch_size
    if needed > len(cache):
      raise CacheError(f"this run reads {needed} rows ({steps} steps x {batch_size}) but {what} holds "
                       f"{len(cache)}: {fix.format(needed=needed)}")
    self._batch = 0

  def __iter__(self):
    return self

  def _next_rows(self) -> list[int]:
    first = self._batch * self.batch_size + self.offset
    self._batch += 1
    return list(range(first, first + self.rows))


class CacheLoader(_StreamRows):
  """Batches of one process from the cache, in the run's order, checked against the run's own data loader."""

  def __init__(self, cache: Cache, data_loader, *, batch_size: int, process_index: int, process_count: int,
               steps: int):
    super().__init__(cache, batch_size=batch_size, process_index=process_index, process_count=process_count,
                     steps=steps, what=f"the teacher cache {cache.directory}",
                     fix="capture more (capture.rows={needed}, or the run's steps) or lower steps")
    self.data = data_loader

  def __next__(self) -> dict[str, np.ndarray]:
    expected = next(self.data)
    numbers = self._next_rows()
    rows = [self.cache[r] for r in numbers]
    for i, row in enumerate(rows):
      for key in ROW_KEYS:
        if not np.array_equal(row[key], expected[key][i]):
          bad = int(np.flatnonzero(row[key] != expected[key][i])[0]) if row[key].shape == expected[key][i].shape \
              else "its length"
          raise CacheError(f"row {numbers[i]} of the teacher cache {self.cache.directory} is not the row this run "
                           f"reads there: {key} differs at position {bad}. The cache was captured from other data "
                           "(or another tokenizer, template or seed): capture it again with this config")
    out = {key: np.stack([r[key] for r in rows]) for key in ROW_KEYS}
    out["teacher_indices"] = np.stack([r["indices"] for r in rows])
    out["teacher_logprobs"] = np.stack([r["logprobs"] for r in rows])
    return out

  def get_state(self) -> dict:
    return {"cache_batch": self._batch, "data": self.data.get_state()}

  def set_state(self, state) -> None:
    self._batch = int(state["cache_batch"])
    self.data.set_state(state["data"])

  def close(self) -> None:
    self.data.close()

  def summary(self) -> str:
    m = self.cache.manifest
    return (f"{self.data.summary()}\nteacher: the cache {self.cache.directory} ({len(self.cache)} rows, top "
            f"{m['k']} log-probs of {m['teacher']['path']} at each trained token); no teacher model loaded")


class DistillKitLoader(_StreamRows):
  """Batches of one process from a DistillKit capture, whose rows are the training data: each row one document,
  its inputs the tokens that carry a signal (the last stored token is only a target), cut to `seq_len` and padded;
  every position with a signal is trained (DistillKit captures have no assistant mask)."""

  def __init__(self, capture, *, seq_len: int, batch_size: int, process_index: int, process_count: int,
               steps: int):
    super().__init__(capture, batch_size=batch_size, process_index=process_index, process_count=process_count,
                     steps=steps, what=f"the DistillKit capture {capture.folder}", fix="lower steps")
    self.seq_len = seq_len

  def _row(self, i: int) -> dict[str, np.ndarray]:
    r = self.cache[i]
    t, k = self.seq_len, self.cache.k
    n = min(int(r["signal_mask"].sum()), t)  # inputs: the positions with a signal
    out = {key: np.zeros((t,), np.int32) for key in ROW_KEYS}
    out["loss_mask"] = np.zeros((t,), np.float32)
    out["input_ids"][:n] = r["input_ids"][:n]
    out["targets"][:n] = r["input_ids"][1:n + 1]
    out["loss_mask"][:n] = 1.0
    out["segment_ids"][:n] = 1
    out["positions"][:n] = np.arange(n)
    out["teacher_indices"] = np.zeros((t, k), np.int32)
    out["teacher_logprobs"] = np.full((t, k), -np.inf, np.float32)
    out["teacher_indices"][:n] = r["indices"][:n]
    out["teacher_logprobs"][:n] = r["logprobs"][:n]
    return out

  def __next__(self) -> dict[str, np.ndarray]:
    rows = [self._row(r) for r in self._next_rows()]
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}

  def get_state(self) -> dict:
    return {"cache_batch": self._batch}

  def set_state(self, state) -> None:
    self._batch = int(state["cache_batch"])

  def close(self) -> None:
    pass

  def summary(self) -> str:
    c = self.cache.config
    return (f"data and teacher: the DistillKit capture {self.cache.folder} ({len(self.cache)} rows, top {self.cache.k} "
            f"of a vocabulary of {c.get('d')}, exact {c.get('exact_k')}), rows cut to {self.seq_len} tokens; no "
            "teacher model loaded")
