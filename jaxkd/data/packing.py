"""Packing examples into fixed-length rows, and the arrays the model and the loss read from a packed row.

Rows are filled first-fit, `bins` rows at a time, in the order the examples arrive (grain's own packer
works the same way; this one is a grain iterator too, about ten times cheaper per example, which matters
for short chat turns). A packed row has segment ids (1, 2, ... per document, 0 for padding) and positions
that restart at 0 in every document, so attention within equal segment ids keeps documents apart. Targets
are the next token of the same document and the loss mask covers trained targets only: never a token of
the next document, never padding. With a teacher tokenizer both tokenizations of an example go into the
same row (each side with its own length) and the alignment pairs become flat indices into each side's row.

The iterator's state is the parent's state where the current group of rows began, how many examples of
that parent element to skip, and how many rows were already emitted: restoring it re-packs the group from
the same examples and continues with the next row.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Mapping

import grain
import numpy as np

from jaxkd.data.encode import Encoded


@dataclasses.dataclass
class Lengths:
  seq_len: int
  teacher_seq_len: int | None = None  # None: no teacher side
  max_align: int = 0


class Examples:
  """The kept rows of one encoded share, truncated to fit: example(k) for k in [0, len)."""

  def __init__(self, enc: Encoded, keep: np.ndarray, lengths: Lengths):
    # Plain ndarray views of the (possibly memory-mapped) cache: slicing a np.memmap costs more than the copy.
    self.ids, self.mask, self.offsets = (np.asarray(enc.ids), np.asarray(enc.mask), np.asarray(enc.offsets))
    if lengths.teacher_seq_len is not None:
      self.t_ids, self.t_offsets = np.asarray(enc.teacher_ids), np.asarray(enc.teacher_offsets)
      self.align, self.a_offsets = np.asarray(enc.align), np.asarray(enc.align_offsets)
    self.keep, self.lengths = np.asarray(keep, np.int64), lengths

  def __len__(self) -> int:
    return len(self.keep)

  def example(self, k: int) -> dict:
    """Kept example k: ids [L], mask [L] (trained tokens), and teacher ids [L'] with pairs [P, 2]."""
    r = int(self.keep[k])
    a, b = int(self.offsets[r]), int(self.offsets[r + 1])
    n = min(b - a, self.lengths.seq_len)
    out = {"ids": self.ids[a:a + n], "mask": self.mask[a:a + n]}
    if self.lengths.teacher_seq_len is not None:
      ta, tb = int(self.t_offsets[r]), int(self.t_offsets[r + 1])
      m = min(tb - ta, self.lengths.teacher_seq_len)
      out["teacher"] = self.t_ids[ta:ta + m]
      pairs = self.align[int(self.a_offsets[r]):int(self.a_offsets[r + 1])]
      out["align"] = pairs[(pairs[:, 0] < n) & (pairs[:, 1] < m)]  # pairs a truncation cut off go
    return out


def build_rows(groups: list[list[dict]], lengths: Lengths) -> dict:
  """Rows of documents to the trainer's arrays, [len(groups), seq_len] (see jaxkd.data.loader).

  With a teacher tokenizer, "align_pairs_dropped" [rows] counts the alignment pairs each row had no room
  for: a statistic the loader adds up for the rows it hands out, and removes from the batch.
  """
  n_rows, t = len(groups), lengths.seq_len  # R rows of T student tokens (Tt teacher tokens, A alignment pairs)
  ids_RxT = np.zeros((n_rows, t), np.int32)
  trained_RxT = np.zeros((n_rows, t), np.float32)
  seg_RxT = np.zeros((n_rows, t), np.int32)
  pos_RxT = np.zeros((n_rows, t), np.int32)
  teacher = lengths.teacher_seq_len is not None
  if teacher:
    tt, a = lengths.teacher_seq_len, lengths.max_align
    t_ids_RxTt, t_seg_RxTt, t_pos_RxTt = (np.zeros((n_rows, tt), np.int32) for _ in range(3))
    align_s_RxA, align_t_RxA = np.zeros((n_rows, a), np.int32), np.zeros((n_rows, a), np.int32)
    align_m_RxA = np.zeros((n_rows, a), np.float32)
    dropped_R = np.zeros(n_rows, np.int32)
  for r, docs in enumerate(groups):
    c = tc = na = 0
    for j, d in enumerate(docs):
      n = len(d["ids"])
      ids_RxT[r, c:c + n] = d["ids"]
      trained_RxT[r, c:c + n] = d["mask"]
      seg_RxT[r, c:c + n] = j + 1
      pos_RxT[r, c:c + n] = np.arange(n)
      if teacher:
        m = len(d["teacher"])
        t_ids_RxTt[r, tc:tc + m] = d["teacher"]
        t_seg_RxTt[r, tc:tc + m] = j + 1
        t_pos_RxTt[r, tc:tc + m] = np.arange(m)
        p = d["align"]
        k = min(len(p), a - na)
        dropped_R[r] += len(p) - k
        align_s_RxA[r, na:na + k] = p[:k, 0] + c
        align_t_RxA[r, na:na + k] = p[:k, 1] + tc
        align_m_RxA[r, na:na + k] = 1.0
        na += k
        tc += m
      c += n
  # The target of position i is token i + 1 of the same document; the last token of a document has none.
  same_RxT = np.zeros((n_rows, t), bool)
  same_RxT[:, :-1] = (seg_RxT[:, 1:] == seg_RxT[:, :-1]) & (seg_RxT[:, :-1] > 0)
  targets_RxT = np.zeros((n_rows, t), np.int32)
  loss_mask_RxT = np.zeros((n_rows, t), np.float32)
  targets_RxT[:, :-1] = np.where(same_RxT[:, :-1], ids_RxT[:, 1:], 0)
  loss_mask_RxT[:, :-1] = np.where(same_RxT[:, :-1], trained_RxT[:, 1:], 0.0)
  out = {"input_ids": ids_RxT, "targets": targets_RxT, "loss_mask": loss_mask_RxT, "segment_ids": seg_RxT,
         "positions": pos_RxT}
  if teacher:
    out.update(teacher_input_ids=t_ids_RxTt, teacher_segment_ids=t_seg_RxTt, teacher_positions=t_pos_RxTt,
               align_student=align_s_RxA, align_teacher=align_t_RxA, align_mask=align_m_RxA,
               align_pairs_dropped=dropped_R)
  return out


def empty_rows(n_rows: int, lengths: Lengths) -> dict:
  """Rows of padding only (segment 0, mask 0): what fills a short last batch or an exhausted eval share."""
  return build_rows([[] for _ in range(n_rows)], lengths)


class PackIterDataset(grain.IterDataset):
  """First-fit packing of examples into rows, `bins` rows at a time; yields one row dict per `next`.

  `expand(element)` turns a parent element into a list of examples (a block of example indices, or one
  streamed example).
  """

  def __init__(self, parent: grain.IterDataset, expand: Callable[[Any], list], lengths: Lengths, bins: int):
    super().__init__(parent)
    self.expand, self.lengths, self.bins = expand, lengths, bins

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), self)


class _PackIterator(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator, spec: PackIterDataset):
    super().__init__(parent)
    self.spec = spec
    self._reset(copy.deepcopy(parent.get_state()), 0)

  def _reset(self, parent_state, skip: int):
    self._start = (parent_state, skip)  # where the current group of rows begins
    self._element: list = []  # examples of the parent element being read
    self._element_state, self._pos = parent_state, skip  # parent state before that element; next index in it
    self._carry = None  # an example read that did not fit the previous group: it opens the next one
    self._rows: dict | None = None  # the packed group, emitted row by row
    self._emitted = 0
    self._fresh = True  # the parent element at _element_state has not been read yet

  def _next_example(self):
    """(example, (parent state, index)) where the position is before the example; StopIteration at the end."""
    while self._fresh or self._pos >= len(self._element):
      before = self._element_state if self._fresh else copy.deepcopy(self._parent.get_state())
      element = self.spec.expand(next(self._parent))  # at the end this raises and leaves the state as it was
      if not self._fresh:
        self._pos = 0
      self._element, self._element_state, self._fresh = element, before, False
    where = (self._element_state, self._pos)
    self._pos += 1
    return self._element[self._pos - 1], where

  def _pack_group(self):
    lengths, bins = self.spec.lengths, self.spec.bins
    free = np.full(bins, lengths.seq_len)
    t_free = np.full(bins, lengths.teacher_seq_len or 0)
    groups: list[list[dict]] = [[] for _ in range(bins)]
    while True:
      if self._carry is not None:
        ex, where = self._carry
        self._carry = None
      else:
        try:
          ex, where = self._next_example()
        except StopIteration:
          break
      n = len(ex["ids"])
      fits = free >= n
      if lengths.teacher_seq_len is not None:
        fits &= t_free >= len(ex["teacher"])
      r = int(np.argmax(fits))
      if not fits[r]:
        self._carry = (ex, where)  # the group is full: this example opens the next group
        break
      groups[r].append(ex)
      free[r] -= n
      if lengths.teacher_seq_len is not None:
        t_free[r] -= len(ex["teacher"])
    groups = [g for g in groups if g]
    self._rows = build_rows(groups, lengths) if groups else None
    self._count = len(groups)

  def __next__(self) -> dict:
    if self._rows is None:
      self._pack_group()
      if self._rows is None:
        raise StopIteration
    row = {k: v[self._emitted] for k, v in self._rows.items()}
    self._emitted += 1
    if self._emitted == self._count:  # group done: the next one starts at the example carried over
      # Without a carried example the parent is exhausted, and so is the next group.
      next_start = self._carry[1] if self._carry is not None else (copy.deepcopy(self._parent.get_state()), 0)
      self._start, self._rows, self._emitted = next_start, None, 0
    return row

  def get_state(self) -> dict:
    parent_state, skip = self._start
    return {"parent": parent_state, "skip": skip, "emitted": self._emitted}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._reset(state["parent"], int(state["skip"]))
    emitted = int(state["emitted"])
    if emitted:  # rebuild the group that was being emitted and drop the rows already given out
      self._pack_group()
      self._emitted = emitted
