"""The training and eval batch iterator: sources -> encoded examples -> grain pipeline -> packed batches.

`make_loader` reads this process's share of every source, tokenizes it once (cached on disk), drops or
truncates what does not fit, and builds a grain pipeline: shuffle per epoch from the seed, mix sources by
weight, pack first-fit into rows, batch. The pipeline's iterator state is the data position a checkpoint
stores; `set_state` on a fresh loader continues with exactly the batch that would have come next.

Each `next(loader)` is a dict of process-local NumPy arrays, all [rows, seq_len] unless noted:
  input_ids     int32    token ids (0 on padding)
  targets       int32    the next token of the same document; 0 where there is none
  loss_mask     float32  1 where `targets` is a trained token (assistant turns by default); never across a
                         document boundary, never on padding
  segment_ids   int32    1, 2, ... per packed document, 0 for padding
  positions     int32    position inside its document, from 0
and with a teacher tokenizer that differs from the student's, [rows, teacher_seq_len]:
  teacher_input_ids, teacher_segment_ids, teacher_positions   the same documents in the same rows
plus [rows, max_align]:
  align_student, align_teacher   int32 flat indices into each side's row of tokens that end at the same
                                 character of the same document; align_mask float32 1 for real pairs.
The loss is sum(loss_mask * CE(logits, targets)) / sum(loss_mask); attention stays within equal segment ids.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import weakref
from typing import Any, Mapping

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxkd import sharding as shd
from jaxkd.data import cache as cache_lib
from jaxkd.data import config as data_config
from jaxkd.data import encode as encode_lib
from jaxkd.data.encode import Encoded, Encoder, Side, resolve_template, teacher_template
from jaxkd.data.formats import BAD_REASONS, DataError
from jaxkd.data.packing import Examples, Lengths, PackIterDataset, empty_rows
from jaxkd.data.sources import (RowReader, SourceSpec, StreamingRows, content_key, eval_rows, open_reader,
                                parse_sources, process_share, source_format)
from jaxkd.data.tokenizer import load_tokenizer, same_tokenizer, tokenizer_fingerprint

STATE_VERSION = 1
EFFICIENCY_ROWS = 64  # rows packed at start to report the packing efficiency
EXAMPLE_BLOCK = 256  # example numbers per grain element on the map-style path


@dataclasses.dataclass
class SourceReport:
  label: str
  format: str
  weight: float
  rows: int = 0  # rows of this split this process read
  examples: int = 0  # kept
  tokens: int = 0  # student tokens of the kept examples after truncation (one epoch)
  trained: int = 0  # trained targets among them
  truncated: int = 0
  skipped: dict = dataclasses.field(default_factory=dict)  # reason -> {"count", "rows": first rows, "detail"}
  cache: str = "off"  # "hit", "miss" or "off"; "streaming" for streaming sources


# Loaders whose prefetch threads must stop before the interpreter tears modules down under them.
_LIVE: "weakref.WeakSet[Loader]" = weakref.WeakSet()
atexit.register(lambda: [loader.close() for loader in list(_LIVE)])


def _seed32(*parts) -> int:
  return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:4], "little")


class _StreamExamples(grain.IterDataset):
  """A grain IterDataset over a streaming source: rows read, encoded and filtered on the fly."""

  def __init__(self, make_rows, encode_row):
    super().__init__()
    self.make_rows, self.encode_row = make_rows, encode_row

  def __iter__(self):
    return _StreamExamplesIterator(self.make_rows(), self.encode_row)


class _StreamExamplesIterator(grain.DatasetIterator):
  def __init__(self, rows: StreamingRows, encode_row):
    super().__init__()
    self.rows, self.encode_row = rows, encode_row

  def __next__(self):
    while True:
      index, row = next(self.rows)
      out = self.encode_row(index, row)
      if out is not None:
        return out

  def get_state(self):
    return self.rows.get_state()

  def set_state(self, state):
    self.rows.set_state(state)


class _Concat(grain.IterDataset):
  """Parents one after another (grain's mix stops at the first exhausted parent): the eval split over
  streaming sources."""

  def __init__(self, parents):
    super().__init__(list(parents))

  def __iter__(self):
    return _ConcatIterator([p.__iter__() for p in self._parents])


class _ConcatIterator(grain.DatasetIterator):
  def __init__(self, parents):
    super().__init__(parents)
    self._current = 0

  def __next__(self):
    while self._current < len(self._parents):
      try:
        return next(self._parents[self._current])
      except StopIteration:
        self._current += 1
    raise StopIteration

  def get_state(self):
    return {"current": self._current, "parents": [p.get_state() for p in self._parents]}

  def set_state(self, state):
    self._current = int(state["current"])
    for p, s in zip(self._parents, state["parents"]):
      p.set_state(s)


class Loader:
  """Iterator of packed batches for one process; see the module docstring for the arrays it yields."""

  def __init__(self, cfg, *, tokenizer, seq_len: int, batch_size: int, seed: int, teacher_tokenizer=None,
               split: str = "train", process_index: int | None = None, process_count: int | None = None,
               cache_dir: str | None = None):
    if split not in ("train", "eval"):
      raise DataError(f"split={split!r}: use 'train' or 'eval'")
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= self.process_index < self.process_count:
      raise DataError(f"process_index {self.process_index} is not in [0, {self.process_count})")
    if batch_size % self.process_count:
      raise DataError(f"batch_size {batch_size} (global rows) is not divisible by {self.process_count} "
                      "processes; choose a multiple of the process count")
    data_config.check(cfg)
    self.cfg, self.split, self.seed = cfg, split, int(seed)
    self.rows = batch_size // self.process_count
    self._bins = int(cfg.packing_bins or self.rows)
    tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    if isinstance(teacher_tokenizer, (str, os.PathLike)):
      teacher_tokenizer = load_tokenizer(teacher_tokenizer)
    self.tokenizer = tokenizer
    self.teacher_differs = teacher_tokenizer is not None and not same_tokenizer(tokenizer, teacher_tokenizer)
    self.lengths = Lengths(
        seq_len=int(seq_len),
        teacher_seq_len=int(cfg.teacher_seq_len or seq_len) if self.teacher_differs else None,
        max_align=int(cfg.max_align or seq_len) if self.teacher_differs else 0)

    student_template = resolve_template(cfg.chat_template, tokenizer)
    end_of_turn = list(cfg.end_of_turn) if cfg.end_of_turn else None
    student = Side(tokenizer, student_template, end_of_turn=end_of_turn, add_eos=cfg.add_eos)
    teacher = None
    if self.teacher_differs:
      teacher = Side(teacher_tokenizer, teacher_template(cfg, teacher_tokenizer, student_template),
                     add_eos=cfg.add_eos, name="teacher")
    self.encoder = Encoder(student, teacher, train_on=cfg.train_on,
                           chat_prompt_completion=cfg.chat_prompt_completion,
                           role_aliases=dict(cfg.role_aliases or {}), strict=cfg.strict)
    side_key = lambda s: s and {"tokenizer": tokenizer_fingerprint(s.tok), "template": s.template,
                                "end_of_turn": s.end_of_turn, "prefix": s.prefix_ids, "suffix": s.suffix_ids}
    self._settings_key = {"student": side_key(student), "teacher": side_key(teacher), "train_on": cfg.train_on,
                          "chat_prompt_completion": cfg.chat_prompt_completion,
                          "role_aliases": dict(cfg.role_aliases or {})}
    chosen = cache_dir if cache_dir is not None else cfg.cache_dir
    self.cache_dir = cache_lib.default_cache_dir() if chosen is None else (chosen or None)

    specs = parse_sources(list(cfg.sources), default_format=cfg.format, default_eval_split=cfg.eval_split)
    if split == "eval" and not cfg.eval_fraction and not any(s.eval_split for s in specs):
      raise DataError("split='eval' but no eval data is configured: set data.eval_fraction (e.g. 0.01) or "
                      "data.eval_split (a named split such as 'test')")

    self.reports: list[SourceReport] = []
    parts, weights = [], []
    for spec in specs:
      named_eval = spec.eval_split is not None
      if split == "eval" and not named_eval and not cfg.eval_fraction:
        continue  # this source has no eval rows
      if spec.streaming:
        parts.append(self._stream_source(spec, named_eval))
      else:
        parts.append(self._map_source(spec, named_eval))
      weights.append(spec.weight)
    self._dataset = self._pipeline(parts, weights)
    self._iterator = iter(self._dataset)
    _LIVE.add(self)
    self._batches = 0  # batches returned so far
    self._exhausted = False
    self._running = {"rows": 0, "tokens": 0, "trained": 0, "align_pairs_dropped": 0}
    self._fingerprint_parts = {
        "split": split, "seed": self.seed, "rows": self.rows, "process": [self.process_index, self.process_count],
        "lengths": dataclasses.asdict(self.lengths), "shuffle": bool(cfg.shuffle), "epochs": cfg.epochs,
        "bins": self._bins, "weights": weights, "settings": hashlib.sha256(
            json.dumps(self._settings_key, sort_keys=True, default=str).encode()).hexdigest()[:16],
        "sources": [r.label for r in self.reports], "examples": [r.examples for r in self.reports]}
    self.packing_efficiency, self.align_coverage = self._measure_first_rows()

  # -- sources ----------------------------------------------------------------------------------------------

  def _encode_share(self, reader: RowReader, fmt: str, lo: int, hi: int) -> tuple[Encoded, str]:
    key = None
    if self.cache_dir:
      key = cache_lib.cache_key({"source": reader.fingerprint, "rows": [lo, hi], "format": fmt,
                                 "columns": reader.columns, **self._settings_key})
      hit = cache_lib.load(self.cache_dir, key)
      if hit is not None:
        return hit, "hit"
    chunk = max(1, int(self.cfg.encode_chunk))
    spans = [(a, min(a + chunk, hi)) for a in range(lo, hi, chunk)]
    if int(self.cfg.num_workers) > 0 and len(spans) > 1:
      ctx = multiprocessing.get_context("spawn")  # fork after the Rust tokenizer started threads can hang
      with concurrent.futures.ProcessPoolExecutor(int(self.cfg.num_workers), mp_context=ctx,
                                                  initializer=encode_lib.worker_init,
                                                  initargs=(self.encoder,)) as pool:
        futures = [pool.submit(encode_lib.worker_encode, reader.read(a, b), fmt, list(range(a, b)),
                               reader.label) for a, b in spans]
        parts = [f.result() for f in futures]
    else:
      parts = [self.encoder.encode(reader.read(a, b), fmt, list(range(a, b)), reader.label) for a, b in spans]
    enc = Encoded.concat(parts) if parts else self.encoder.encode([], fmt, [], reader.label)
    if key:
      cache_lib.save(self.cache_dir, key, enc, {"source": reader.label, "rows": [lo, hi], "format": fmt})
      return enc, "miss"
    return enc, "off"

  def _map_source(self, spec: SourceSpec, named_eval: bool):
    cfg, lengths = self.cfg, self.lengths
    read_split = spec.eval_split if (self.split == "eval" and named_eval) else spec.split
    reader = open_reader(spec, read_split, cache_dir=self.cache_dir)
    fmt = source_format(spec, reader.column_names)
    lo, hi = process_share(reader.num_rows, self.process_index, self.process_count)
    enc, cache_state = self._encode_share(reader, fmt, lo, hi)
    report = SourceReport(reader.label, fmt, spec.weight, cache=cache_state)
    row_ids = np.arange(lo, hi)
    in_split = np.ones(hi - lo, bool)
    if not named_eval and cfg.eval_fraction:
      held = eval_rows(row_ids, cfg.eval_fraction, cfg.eval_seed)
      in_split = held if self.split == "eval" else ~held
    status = np.asarray(enc.status)
    if cfg.strict and (status[in_split] != 0).any():  # a cached share from a non-strict run
      i = int(np.flatnonzero(in_split & (status != 0))[0])
      reason = BAD_REASONS[status[i] - 1]
      detail = next((d for r, d in enc.problems.get(reason, {}).get("first", []) if r == row_ids[i]), "")
      raise DataError(f"{reader.label} row {row_ids[i]}: {reason}: {detail} (data.strict=True; set it False to "
                      "skip and count such rows)")
    report.rows = int(in_split.sum())
    keep = in_split & (status == 0)

    offsets = np.asarray(enc.offsets)
    n_tokens = np.diff(offsets)
    kept_len = np.minimum(n_tokens, lengths.seq_len)
    cum = np.concatenate([[0], np.cumsum(np.asarray(enc.mask, np.int64))])
    # Trained targets left after truncation: mask[1:kept_len] (the first token is never a target).
    trained_in = cum[offsets[:-1] + kept_len] - cum[np.minimum(offsets[:-1] + 1, offsets[1:])]
    over = n_tokens > lengths.seq_len
    if lengths.teacher_seq_len is not None:
      over |= np.diff(np.asarray(enc.teacher_offsets)) > lengths.teacher_seq_len
    status = status.copy()
    if cfg.overlong == "drop":
      status[keep & over] = 1 + BAD_REASONS.index("overlong_dropped")
      keep &= ~over
    else:
      empty = keep & over & (trained_in == 0)  # a long prompt can push every trained token out of the row
      if cfg.strict and empty.any():
        raise DataError(f"{reader.label} row {row_ids[np.flatnonzero(empty)[0]]}: no trained token within "
                        f"seq_len {lengths.seq_len} (data.strict=True; raise seq_len, or set strict=False to "
                        "skip and count such rows)")
      status[empty] = 1 + BAD_REASONS.index("no_trainable_token_after_truncation")
      keep &= ~empty
      report.truncated = int((keep & over).sum())
    for code in np.unique(status[in_split & (status != 0)]):
      reason = BAD_REASONS[code - 1]
      hit_rows = row_ids[in_split & (status == code)]
      first = enc.problems.get(reason, {}).get("first", [])
      report.skipped[reason] = {"count": int(len(hit_rows)), "rows": [int(r) for r in hit_rows[:5]],
                                "detail": first[0][1] if first else ""}
    kept = np.flatnonzero(keep)
    report.examples = int(len(kept))
    report.tokens = int(kept_len[kept].sum())
    report.trained = int(trained_in[kept].sum())
    self.reports.append(report)
    if not len(kept):
      raise DataError(f"source {reader.label} has no usable {self.split} rows for process {self.process_index} "
                      f"({report.rows} rows read; skipped: {report.skipped or 'none'})")
    return Examples(enc, kept, lengths)

  def _stream_source(self, spec: SourceSpec, named_eval: bool):
    cfg, lengths, encoder = self.cfg, self.lengths, self.encoder
    read_split = spec.eval_split if (self.split == "eval" and named_eval) else spec.split
    epochs = 1 if self.split == "eval" else cfg.epochs
    kw = dict(process_index=self.process_index, process_count=self.process_count, cache_dir=self.cache_dir)
    probe = StreamingRows(spec, read_split, epochs=epochs, **kw)
    fmt = source_format(spec, probe.column_names)
    report = SourceReport(probe.label, fmt, spec.weight, cache="streaming")
    self.reports.append(report)
    want_eval = self.split == "eval"

    def encode_row(index: int, row: dict):
      # Counts here are of rows seen so far by this loader (a resume starts them again).
      # Held out by content: the row's number here is within this process's stream, so it would change
      # with the process count (map-style sources hash the global row number instead).
      if not named_eval and cfg.eval_fraction and bool(eval_rows(np.array([content_key(row)], np.uint64),
                                                                  cfg.eval_fraction, cfg.eval_seed)[0]) != want_eval:
        return None
      report.rows += 1
      enc = encoder.encode([row], fmt, [index], probe.label)
      reason = BAD_REASONS[enc.status[0] - 1] if enc.status[0] else None
      n = int(enc.offsets[1])
      over = n > lengths.seq_len or (lengths.teacher_seq_len is not None and
                                     int(enc.teacher_offsets[1]) > lengths.teacher_seq_len)
      if reason is None and over:
        if cfg.overlong == "drop":
          reason = "overlong_dropped"
        elif not enc.mask[1:lengths.seq_len].any():
          reason = "no_trainable_token_after_truncation"
      if reason is not None:
        entry = report.skipped.setdefault(reason, {"count": 0, "rows": [], "detail": ""})
        entry["count"] += 1
        if len(entry["rows"]) < 5:
          entry["rows"].append(index)
        if not entry["detail"] and reason in enc.problems:
          entry["detail"] = enc.problems[reason]["first"][0][1]
        return None
      report.truncated += int(over)
      report.examples += 1
      report.tokens += min(n, lengths.seq_len)
      report.trained += int(enc.mask[1:lengths.seq_len].sum())
      return Examples(enc, np.zeros(1, np.int64), lengths).example(0)

    ds = _StreamExamples(lambda: StreamingRows(spec, read_split, epochs=epochs, **kw), encode_row)
    if cfg.shuffle and self.split == "train":
      ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=int(cfg.shuffle_buffer),
                                                       seed=_seed32(self.seed, "stream", probe.label))
    return ds

  # -- pipeline ---------------------------------------------------------------------------------------------

  def _pipeline(self, parts, weights):
    """Example order (grain: shuffle per epoch, mix, repeat) -> first-fit packing -> batches."""
    cfg = self.cfg
    read = grain.ReadOptions(num_threads=0)  # indices are cheap: threads would only fight for the GIL
    map_parts = [p for p in parts if isinstance(p, Examples)]
    # Map-style sources flow as blocks of example numbers (grain's per-element cost is paid per block); with a
    # streaming source in the mixture, elements must be single examples for the weights to count examples.
    block = EXAMPLE_BLOCK if len(map_parts) == len(parts) else 1
    starts = np.cumsum([0] + [len(p) for p in map_parts])

    def orders(shuffle: bool):
      out = []
      for i, p in enumerate(map_parts):
        d = grain.MapDataset.range(int(starts[i]), int(starts[i + 1]))
        out.append(d.shuffle(_seed32(self.seed, i, "shuffle")) if shuffle else d)
      return out

    def expand(element):
      if isinstance(element, dict):  # one streamed example
        return [element]
      ids = np.atleast_1d(element)
      src = np.searchsorted(starts, ids, side="right") - 1
      return [map_parts[s].example(int(g - starts[s])) for s, g in zip(src, ids)]

    if self.split == "eval":
      ds = None
      if map_parts:
        ds = grain.MapDataset.concatenate(orders(False)).batch(block).to_iter_dataset(read)
      streams = [p for p in parts if not isinstance(p, Examples)]
      if streams:  # each streaming source once, after the others
        ds = _Concat(([ds] if ds is not None else []) + streams)
    elif len(map_parts) == len(parts):
      sources = orders(bool(cfg.shuffle))
      if len(sources) == 1:
        ds = sources[0].repeat(cfg.epochs)
      else:
        # Each source reshuffles on every pass over it; one epoch of the mixture is as many examples as all
        # sources hold, so with weights equal to the sizes every example is seen about once per epoch.
        ds = grain.MapDataset.mix([s.repeat(None) for s in sources], weights)
        if cfg.epochs is not None:
          ds = ds[:int(cfg.epochs) * int(starts[-1])]
      ds = ds.batch(block).to_iter_dataset(read)
    else:
      its, i_map = [], iter(orders(bool(cfg.shuffle)))
      for p in parts:
        its.append(next(i_map).repeat(None).to_iter_dataset(read) if isinstance(p, Examples) else p)
      ds = its[0] if len(its) == 1 else grain.IterDataset.mix(its, weights)
    ds = PackIterDataset(ds, expand, self.lengths, self._bins)
    rows, lengths = self.rows, self.lengths
    ds = ds.batch(rows, drop_remainder=False, batch_fn=lambda r: _stack_rows(r, rows, lengths))
    if int(cfg.prefetch) > 0:
      ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=int(cfg.prefetch))
    return ds

  def _measure_first_rows(self) -> tuple[float | None, float | None]:
    """From a throwaway iterator over the first EFFICIENCY_ROWS packed rows: the non-padding fraction and,
    with a teacher tokenizer that differs, the fraction of student tokens that have an aligned teacher token
    (the positions the hidden-state loss can use)."""
    if any(r.cache == "streaming" for r in self.reports):
      return None, None  # would read the stream twice; the running figure in `stats` covers streaming
    it = iter(self._dataset)
    used = total = aligned = 0
    while total < EFFICIENCY_ROWS * self.lengths.seq_len:
      try:
        batch = next(it)
      except StopIteration:
        break
      real = batch["segment_ids"].any(axis=1)  # count only rows that hold data (not the final padding)
      used += int((batch["segment_ids"][real] > 0).sum())
      total += int(real.sum()) * self.lengths.seq_len
      if self.teacher_differs:
        aligned += int(batch["align_mask"][real].sum())
    it.close()
    return (used / total if total else None,
            aligned / used if self.teacher_differs and used else None)

  # -- iteration and state ----------------------------------------------------------------------------------

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    limit = self.cfg.eval_batches if self.split == "eval" else None
    if limit is not None and self._batches >= int(limit):
      raise StopIteration
    if self._iterator is None:
      raise DataError("this loader was closed; make a new one (make_loader) to read more batches")
    batch = None
    if not self._exhausted:
      try:
        batch = next(self._iterator)
      except StopIteration:
        self._exhausted = True
    if batch is None:
      if limit is None:  # the data ended and no fixed eval length asks for padding batches
        raise StopIteration
      batch = empty_rows(self.rows, self.lengths)
    self._batches += 1
    # Counted for the rows handed out (not for rows packed ahead, re-packed on resume, or measured).
    self._running["align_pairs_dropped"] += int(batch.pop("align_pairs_dropped", np.zeros(0)).sum())
    seg = batch["segment_ids"]
    self._running["rows"] += int(seg.shape[0])
    self._running["tokens"] += int((seg > 0).sum())
    self._running["trained"] += int(batch["loss_mask"].sum())
    return batch

  def get_state(self) -> dict:
    """The data position as a JSON-serialisable dict, for the checkpoint."""
    if self._iterator is None:
      raise DataError("this loader was closed; its position is gone (take get_state before close)")
    state = {"version": STATE_VERSION, "setup": self._fingerprint_parts, "batches": self._batches,
             "exhausted": self._exhausted, "iterator": self._iterator.get_state()}
    return json.loads(json.dumps(state, default=_json_default))

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from `state` (from `get_state`): the next batch is the one that followed it."""
    if state.get("version") != STATE_VERSION:
      raise DataError(f"data state version {state.get('version')} is not {STATE_VERSION}: it was saved by "
                      "another version of jaxkd.data; restart the data from the beginning")
    saved = state.get("setup", {})
    now = json.loads(json.dumps(self._fingerprint_parts, default=_json_default))
    if saved != now:
      differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
      raise DataError(f"the data position was saved with a different data setup (differs in {differ}: "
                      f"{ {k: (saved.get(k), now.get(k)) for k in differ} }); resume with the same data config, "
                      "seq_len, batch size, seed and process count, or start the data from the beginning")
    self.close()
    self._iterator = iter(self._dataset)
    self._iterator.set_state(state["iterator"])
    self._batches = int(state["batches"])
    self._exhausted = bool(state["exhausted"])

  def close(self) -> None:
    """Stops the background prefetch thread (done at interpreter exit too); the loader ends there."""
    # Dropping the iterator here, while modules are alive, keeps grain's __del__ from running at teardown.
    it, self._iterator = self._iterator, None
    if it is not None:
      it.close()

  # -- reporting --------------------------------------------------------------------------------------------

  @property
  def stats(self) -> dict:
    skipped: dict[str, int] = {}
    for r in self.reports:
      for reason, entry in r.skipped.items():
        skipped[reason] = skipped.get(reason, 0) + entry["count"]
    run = self._running
    return {
        "split": self.split,
        "process": f"{self.process_index}/{self.process_count}",
        "rows_read": sum(r.rows for r in self.reports),
        "examples": sum(r.examples for r in self.reports),
        "skipped": skipped,
        "skipped_total": sum(skipped.values()),
        "truncated": sum(r.truncated for r in self.reports),
        "dropped": skipped.get("overlong_dropped", 0),
        "tokens": sum(r.tokens for r in self.reports),
        "trained_tokens": sum(r.trained for r in self.reports),
        "packing_efficiency": self.packing_efficiency,
        "packing_efficiency_running": (run["tokens"] / (run["rows"] * self.lengths.seq_len)
                                       if run["rows"] else None),
        "batches": self._batches,
        "align_pairs_dropped": run["align_pairs_dropped"],
        "align_coverage": self.align_coverage,
        "cache": {r.label: r.cache for r in self.reports},
        "teacher_tokenizer_differs": self.teacher_differs,
        "sources": [dataclasses.asdict(r) for r in self.reports],
    }

  def summary(self) -> str:
    """What a run prints at start: sources, kept and skipped rows (with the first row numbers), packing."""
    s = self.stats
    lines = [f"data ({self.split}, process {s['process']}): {s['examples']:,} examples from {s['rows_read']:,} "
             f"rows, {s['tokens']:,} tokens per epoch ({s['trained_tokens']:,} trained), rows of "
             f"{self.lengths.seq_len} tokens x {self.rows} per batch"]
    for r in self.reports:
      lines.append(f"  {r.label}: format {r.format}, weight {r.weight:g}, {r.rows:,} rows, {r.examples:,} kept, "
                   f"cache {r.cache}")
    if s["skipped_total"]:
      lines.append(f"  skipped {s['skipped_total']:,} rows:")
      for r in self.reports:
        for reason, e in r.skipped.items():
          rows = ", ".join(map(str, e["rows"])) + (", ..." if e["count"] > len(e["rows"]) else "")
          detail = f" -- e.g. {e['detail']}" if e["detail"] else ""
          lines.append(f"    {reason}: {e['count']:,} in {r.label} (rows {rows}){detail}")
    else:
      lines.append("  no rows skipped")
    lines.append(f"  overlong: {s['truncated']:,} truncated, {s['dropped']:,} dropped (data.overlong="
                 f"{self.cfg.overlong})")
    eff = s["packing_efficiency"]
    lines.append(f"  packing efficiency: {eff:.1%} non-padding (first {EFFICIENCY_ROWS} rows)" if eff is not None
                 else "  packing efficiency: measured while running (stats['packing_efficiency_running'])")
    if self.teacher_differs:
      cover = self.align_coverage
      lines.append(f"  teacher tokenizer differs: teacher rows of {self.lengths.teacher_seq_len} tokens, up to "
                   f"{self.lengths.max_align} alignment pairs per row" + (
                       "" if cover is None else f"; {cover:.0%} of student tokens end where a teacher token ends "
                       f"(first {EFFICIENCY_ROWS} rows)"))
    return "\n".join(lines)


class ImitatedProcesses:
  """debug.data_processes = k on one process: the data read as processes 0..k-1 of a k-process run would
  read it, rows concatenated in process order, which is how that run lays out its global batch (process
  0's devices come first in the mesh). A test hook that lets one process reproduce a k-process run."""

  def __init__(self, make, k: int):
    self.parts = [make(i, k) for i in range(k)]

  def __next__(self) -> dict:
    batches = [next(p) for p in self.parts]
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

  def get_state(self) -> list:
    return [p.get_state() for p in self.parts]

  def set_state(self, states: list) -> None:
    for p, s in zip(self.parts, states):
      p.set_state(s)

  def summary(self) -> str:
    return "\n".join(p.summary() for p in self.parts)


def _stack_rows(rows: list[dict], n_rows: int, lengths: Lengths) -> dict:
  """Rows to a batch; a short last batch is filled with empty rows so every batch has the same shape."""
  missing = n_rows - len(rows)
  if missing:
    pad = empty_rows(missing, lengths)
    rows = rows + [{k: v[i] for k, v in pad.items()} for i in range(missing)]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _json_default(x):
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.floating):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, bytes):
    return x.decode("latin-1")
  raise TypeError(f"cannot put {type(x).__name__} into the data state")


def make_loader(data_cfg, *, tokenizer, seq_len: int, batch_size: int, seed: int, teacher_tokenizer=None,
                split: str = "train", process_index: int | None = None, process_count: int | None = None,
                cache_dir: str | None = None) -> Loader:
  """The batch iterator for `split` of this process (see `Loader`); batch_size is the global row count."""
  return Loader(data_cfg, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                teacher_tokenizer=teacher_tokenizer, split=split, process_index=process_index,
                process_count=process_count, cache_dir=cache_dir)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh,
                 spec: PartitionSpec = shd.BATCH_SPEC) -> dict[str, jax.Array]:
  """Process-local batches to global jax.Arrays whose rows are split over `spec` (as the step's batches)."""
  sharding = NamedSharding(mesh, spec)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
