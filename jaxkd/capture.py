"""Capture the teacher once: its top-k log-probs at every trained token of a run's data, for training without it.

  python -m jaxkd.capture --config configs/qwen2_logit.py --config.capture.dir=/path/to/cache
  python -m jaxkd.train --config configs/qwen2_logit.py --config.teacher.cache=/path/to/cache

The rows are the run's own training stream (the same loader: formats, template, masks, packing, seed, batch size),
`capture.rows` of them (default: all a run of `steps` steps reads); the teacher runs over them jitted and sharded
over the run's mesh, and each process writes its own rows (`jaxkd.teacher_cache.store` has the format). A rerun
after a kill continues after the last finished shard and gives the same shards; SIGTERM finishes the open shard and
exits 75.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).", lock_config=False)
EXIT_PREEMPTED = 75


def _local_rows(array) -> "np.ndarray":
  """This process's rows of a global array split over its rows (replicas over other mesh axes dropped)."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  parts = {}
  for s in array.addressable_shards:
    parts.setdefault(s.index[0].start or 0, np.asarray(s.data))
  return np.concatenate([parts[k] for k in sorted(parts)])


def capture(c) -> int:
  """Captures config `c`'s teacher into `c.capture.dir`; 0 when complete, EXIT_PREEMPTED after a SIGTERM."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  from jaxkd import config_base, data, distributed, program, signals  # pylint: disable=import-outside-toplevel
  from jaxkd import sharding as shd  # pylint: disable=import-outside-toplevel
  from jaxkd import step as step_lib  # pylint: disable=import-outside-toplevel
  from jaxkd.teacher_cache import store  # pylint: disable=import-outside-toplevel

  config_base.validate(c)
  if c.aot.topology:  # compile for a TPU slice and report; capture nothing
    from jaxkd import aot  # pylint: disable=import-outside-toplevel
    return aot.report_capture(c)
  if not c.capture.dir:
    raise config_base.ConfigError("config.capture.dir is empty: name the folder the cache goes to")
  if c.teacher.cache:
    raise config_base.ConfigError("config.teacher.cache is set: a capture runs the teacher model; unset it")
  distributed.initialize(c.distributed)
  directory = os.path.abspath(c.capture.dir)
  mesh = program.make_mesh(c)
  lc = step_lib.loss_config(c)
  if not lc.logit_kd:
    raise config_base.ConfigError("a capture stores the teacher's log-probs for logit distillation: set distill.kind "
                                  "to a logit divergence and distill.alpha > 0")
  toks = program.load_tokenizers(c, lc)
  teacher = program.load_teacher(c, mesh, abstract=False)
  vocab = int(c.distill.vocab_size or len(toks.student))
  rows = int(c.capture.rows or c.steps * c.data.batch_size)
  batches = -(-rows // c.data.batch_size)
  rows = batches * c.data.batch_size
  ident = store.identity(c, toks.student, rows)
  ident.update(vocab_size=vocab, logprob_step=float(c.capture.logprob_step))  # what decoding the shards needs
  if distributed.is_main():
    os.makedirs(directory, exist_ok=True)
    if os.path.isfile(os.path.join(directory, "manifest.json")):
      stored = store.read_manifest(directory)
      differ = store.differences({k: stored.get(k) for k in ident}, ident)
      if differ:
        raise store.CacheError(f"{directory} holds a capture of another setup ({'; '.join(differ)}); use another "
                               "capture.dir, or delete it to capture afresh")
    else:
      store.write_manifest(directory, {**ident, "complete": False, "processes": jax.process_count()})
  distributed.barrier("jaxkd:capture-manifest")

  loader = data.make_loader(c.data, tokenizer=toks.student, seq_len=c.data.seq_len, batch_size=c.data.batch_size,
                            seed=c.seed, split="train", cache_dir=os.path.join(directory, ".data_cache"))
  t_def, t_state = nnx.split(teacher)
  params = nnx.to_pure_dict(t_state)
  keys = ("input_ids", "segment_ids", "positions")
  topk = jax.jit(signals.top_k_fn(t_def, c.capture.top_k, vocab, lc.chunk_size, lc.chunk_budget),
                 in_shardings=(shd.module_shardings(mesh, teacher), shd.batch_shardings(mesh, keys)))
  per_shard = c.capture.shard_batches
  shards = -(-batches // per_shard)
  done = min(distributed.gather_json(store.complete_shards(directory, jax.process_index())))
  local_rows = c.data.batch_size // jax.process_count()
  stopped = {"sigterm": False}
  previous = signal.signal(signal.SIGTERM, lambda *_: stopped.update(sigterm=True))
  bar = tqdm(total=batches, initial=min(done * per_shard, batches), unit="batch",
             disable=not (distributed.is_main() and c.progress), dynamic_ncols=True)
  start, tokens = time.time(), 0
  try:
    for _ in range(min(done * per_shard, batches)):  # the data before the first unfinished shard: no teacher
      next(loader)
    for s in range(done, shards):
      tables = []
      for b in range(s * per_shard, min((s + 1) * per_shard, batches)):
        local = next(loader)
        batch = data.global_batch({k: local[k] for k in keys}, mesh)
        with jax.set_mesh(mesh):
          idx, lp = topk(params, batch)
        first = b * c.data.batch_size + jax.process_index() * local_rows
        tables.append(store.encode_rows(local, _local_rows(idx), _local_rows(lp), first, vocab_size=vocab,
                                        step=c.capture.logprob_step))
        tokens += int(local["loss_mask"].sum()) * jax.process_count()
        bar.update(1)
        bar.set_postfix_str(f"{tokens / max(time.time() - start, 1e-9):,.0f} trained tokens/s")
      store.write_shard(store.shard_path(directory, jax.process_index(), s), tables)
      if stopped["sigterm"] and s + 1 < shards:
        print(f"SIGTERM: shard {s} written; rerun the same command to continue", file=sys.stderr)
        return EXIT_PREEMPTED
  finally:
    bar.close()
    signal.signal(signal.SIGTERM, previous)
    loader.close()
  distributed.barrier("jaxkd:capture-done")
  if distributed.is_main():
    store.write_manifest(directory, {**ident, "complete": True, "processes": jax.process_count()})
    seconds = time.time() - start
    print(f"captured {rows} rows (k={c.capture.top_k}) in {directory}: {tokens:,} trained tokens in {seconds:.1f} s "
          f"({tokens / max(seconds, 1e-9):,.0f} a second)")
  return 0


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  from jaxkd import config_base  # pylint: disable=import-outside-toplevel
  from jaxkd.teacher_cache import store  # pylint: disable=import-outside-toplevel

  try:
    return capture(_CONFIG.value)
  except (config_base.ConfigError, store.CacheError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
