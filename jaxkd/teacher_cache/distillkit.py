"""Reads a teacher captured by DistillKit 1.0 (arcee-ai/DistillKit): its top-k log-probs, row by row, as NumPy.

A capture is a folder of Parquet files (`data_0.parquet`, `data_1.parquet`, ...) and the `compression_config.yaml`
that the capture wrote beside them. Each row holds `input_ids` (list<uint64>, T tokens) and, for each of its T - 1
signals, one byte vector in `compressed_logprobs` and one in `bytepacked_indices` (both list<list<uint8>>).
Signal j is the teacher's distribution over the token at j + 1 (vLLM's prompt log-probs, the first position, which
has none, dropped). Rows shorter than the capture's length limit end in one appended pad token, so their last
real token has a signal too; the pad stays in `input_ids` as stored.

The format, as read from DistillKit's source (commit a61c2e7; this module shares no code with it):
  distillkit/compression/config.py              DistributionQuantizationConfig: the yaml's fields and sizes
  distillkit/compression/monotonic_logprobs.py  compress/decompress_monotonic_logprobs: the logprob bytes
  distillkit/compression/bitpack.py             pack_to_bytes/unpack_from_bytes: MSB-first bit packing
  distillkit/compression/compressor.py          LogprobCompressor: sorting, index width ceil(log2 d)
  distillkit/compression/legacy.py              the legacy format (not read here; refused with a clear error)
  distillkit/sample_logits_vllm.py              the capture: yaml dump, d from the tokenizer, signal alignment
  distillkit/sample_common.py                   Parquet schema, file names, the appended pad token

One token's `compressed_logprobs`, in this order, each float little-endian:
  exact_k values in exact_dtype         the top exact_k log-probs (or their deltas, with delta_encoding)
  len(polynomial_terms) in term_dtype   least-squares coefficients of the tail over rank t = 0 .. k-exact_k-1
                                        (t / (k-exact_k-1) with normalize_t); a term is a power t**n or sqrt/exp(t)
  per residual bin: a scale in scale_dtype, then num_elements signed integers of element_bits bits, bit-packed;
                                        they quantize (tail - fit) for the first tail ranks, bin after bin
`bytepacked_indices`: the k token ids, ceil(log2 d) bits each (log2 taken in float32 as DistillKit does), packed
MSB first into a bit stream padded to whole bytes. Both are in descending order of the teacher's log-prob.

The tail is as good as the capture's fit. DistillKit fits in the log-probs' dtype, float32 from vLLM, by an SVD;
for the recommended terms over unscaled ranks (t**4 reaches 1.5e8) that solve is ill-conditioned in float32, and
its own decode misses the top-k tail by about 1 nat on average (measured with its compressor on CPU torch 2.13,
random peaked distributions; a float64 fit of the same terms misses by 0.02). This reader reproduces what was
stored; it cannot recover what the fit lost.
"""

from __future__ import annotations

import bisect
import os
import re
from typing import Any

import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

CONFIG_NAME = "compression_config.yaml"
COLUMNS = ("input_ids", "compressed_logprobs", "bytepacked_indices")
LEGACY_COLUMNS = ("packed_indices", "exact_values", "coeffs")

# Little-endian dtypes: DistillKit writes the bytes of a torch tensor's memory (x86 and ARM hosts).
_FLOATS = {
  "float16": np.dtype("<f2"),
  "bfloat16": np.dtype(ml_dtypes.bfloat16),
  "float32": np.dtype("<f4"),
  "float64": np.dtype("<f8"),
}
_SPECIAL_TERMS = {"sqrt": np.sqrt, "exp": np.exp}
# Every field of DistributionQuantizationConfig and its default (None: required). A field not named here is
# refused, not ignored: a newer DistillKit that adds one most likely changes the byte layout too.
_FIELDS = {
  "d": None,
  "k": None,
  "exact_k": None,
  "exact_dtype": "float32",
  "polynomial_terms": None,
  "term_dtype": "float32",
  "residual_bins": None,
  "delta_encoding": True,
  "error_diffusion": False,  # the encoder's choice; the bytes decode the same either way
  "normalize_t": False,
}
_REQUIRED = ("d", "k", "exact_k", "residual_bins")
_BIN_FIELDS = ("scale_dtype", "element_bits", "num_elements")


class DistillKitError(ValueError):
  """A DistillKit capture that this reader cannot read as it stands; the message says what and where."""


def is_capture(folder: str) -> bool:
  """Whether `folder` is a DistillKit capture: it holds the compression_config.yaml the capture writes."""
  return os.path.isfile(os.path.join(folder, CONFIG_NAME))


def _float_dtype(value: Any, field: str, path: str) -> np.dtype:
  if value not in _FLOATS:
    raise DistillKitError(f"{path}: {field}={value!r} is not one of {sorted(_FLOATS)}")
  return _FLOATS[value]


def _int_field(value: Any, field: str, path: str, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise DistillKitError(f"{path}: {field}={value!r} must be an integer >= {low}")
  return value


def _torch_linspace01(n: int, dtype: np.dtype) -> np.ndarray:
  """torch.linspace(0, 1, n, dtype) as its CPU kernel computes it: the first half up from 0, the second down from
  1, in steps of 1 / (n - 1); in a 16-bit dtype the step, the index and every product are rounded to it."""
  wide = dtype.itemsize >= 4
  work = np.float64 if dtype.itemsize == 8 else np.float32

  def r(x):
    return np.asarray(x, work) if wide else np.asarray(x, work).astype(dtype).astype(work)

  if n == 1:
    return np.zeros(1, work)
  i = np.arange(n, dtype=work)
  step = r(work(1) / work(n - 1))
  up, down = r(step * r(i)), r(work(1) - r(step * r(work(n - 1) - i)))
  return np.where(i < n // 2, up, down).astype(dtype)


def _promote(a: np.dtype, b: np.dtype) -> np.dtype:
  """torch's promotion of two float dtypes, which DistillKit's decoder follows: equal stays, float16 with
  bfloat16 gives float32, otherwise the wider one."""
  if a == b:
    return a
  return max(a, b, np.dtype("<f4"), key=lambda t: t.itemsize)


class _Scheme:
  """The parsed compression config: what each byte of a token's vectors means."""

  def __init__(self, raw: Any, path: str):
    if isinstance(raw, dict) and set(raw) == {"legacy_logit_compression"}:
      raise DistillKitError(f"{path}: the legacy format (legacy_logit_compression) is not supported; recapture "
                            "with logprob_compressor")
    if isinstance(raw, dict) and set(raw) == {"logprob_compressor"}:
      # The training config nests the same fields under this key; accept a file copied from it.
      raw = raw["logprob_compressor"]
    if not isinstance(raw, dict):
      raise DistillKitError(f"{path}: expected a mapping of DistributionQuantizationConfig fields, got "
                            f"{type(raw).__name__}")
    for field in _REQUIRED:
      if field not in raw:
        raise DistillKitError(f"{path}: the required field {field!r} is missing")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
      raise DistillKitError(f"{path}: unknown field(s) {unknown}: not a DistillKit 1.0 compression config (a newer "
                            "format?); this reader knows " + ", ".join(_FIELDS))
    cfg = {**_FIELDS, **raw}
    self.d = _int_field(cfg["d"], "d", path, 1)
    self.k = _int_field(cfg["k"], "k", path, 1)
    self.exact_k = _int_field(cfg["exact_k"], "exact_k", path, 0)
    if self.exact_k > self.k:
      raise DistillKitError(f"{path}: exact_k={self.exact_k} > k={self.k}")
    self.exact_dtype = _float_dtype(cfg["exact_dtype"], "exact_dtype", path)
    self.term_dtype = _float_dtype(cfg["term_dtype"], "term_dtype", path)
    for field in ("delta_encoding", "error_diffusion", "normalize_t"):
      if not isinstance(cfg[field], bool):
        raise DistillKitError(f"{path}: {field}={cfg[field]!r} must be true or false")
    self.delta_encoding = cfg["delta_encoding"]
    self.normalize_t = cfg["normalize_t"]
    terms = cfg["polynomial_terms"] or []
    if not isinstance(terms, list):
      raise DistillKitError(f"{path}: polynomial_terms={terms!r} must be a list")
    for term in terms:
      if not (term in _SPECIAL_TERMS or (isinstance(term, int) and not isinstance(term, bool) and term >= 0)):
        raise DistillKitError(f"{path}: polynomial_terms entry {term!r} is neither a power >= 0 nor one of "
                              f"{sorted(_SPECIAL_TERMS)}")
    self.terms = tuple(terms)
    bins = cfg["residual_bins"]
    if not isinstance(bins, list):
      raise DistillKitError(f"{path}: residual_bins={bins!r} must be a list")
    self.bins = []  # (scale dtype, element bits, number of elements)
    for n, b in enumerate(bins):
      where = f"residual_bins[{n}]"
      if not isinstance(b, dict) or sorted(b) != sorted(_BIN_FIELDS):
        raise DistillKitError(f"{path}: {where}={b!r} must have exactly the fields {list(_BIN_FIELDS)}")
      bits = _int_field(b["element_bits"], where + ".element_bits", path, 1)
      if bits > 64:
        raise DistillKitError(f"{path}: {where}.element_bits={bits} is over 64")
      self.bins.append((_float_dtype(b["scale_dtype"], where + ".scale_dtype", path), bits,
                        _int_field(b["num_elements"], where + ".num_elements", path, 1)))
    self.tail = self.k - self.exact_k
    if sum(n for _, _, n in self.bins) > self.tail:
      raise DistillKitError(f"{path}: residual_bins hold more elements than k - exact_k = {self.tail}")
    if self.tail and not self.terms and not self.bins:
      raise DistillKitError(f"{path}: exact_k={self.exact_k} < k={self.k} but neither polynomial_terms nor "
                            "residual_bins store the rest")
    # DistillKit takes log2 in float32; the same arithmetic gives the same width where float32 rounds d.
    self.index_bits = int(np.ceil(np.log2(np.float32(self.d))))
    if not 1 <= self.index_bits <= 31:
      raise DistillKitError(f"{path}: d={self.d} gives {self.index_bits}-bit token ids; this reader holds ids in "
                            "int32 and needs 1 to 31 bits")
    self.index_bytes = (self.k * self.index_bits + 7) // 8
    bin_bytes = sum(s.itemsize + (n * bits + 7) // 8 for s, bits, n in self.bins)
    self.logprob_bytes = (self.exact_k * self.exact_dtype.itemsize + len(self.terms) * self.term_dtype.itemsize
                          + bin_bytes)
    # The tail's basis, rank by rank, in the coefficients' dtype as DistillKit builds it with torch: the ranks in
    # that dtype first, then each term of them rounded again (it matters for 16-bit terms).
    t = _torch_linspace01(self.tail, self.term_dtype) if self.normalize_t else np.arange(self.tail, dtype=np.float64)
    t = t.astype(self.term_dtype).astype(np.float64)
    columns = [(t**p if isinstance(p, int) else _SPECIAL_TERMS[p](t)).astype(self.term_dtype) for p in self.terms]
    self.basis_TailxP = np.stack(columns, axis=-1).astype(self.term_dtype) if columns else None

  def decode_indices(self, bytes_NxB: np.ndarray) -> np.ndarray:
    bits_NxKxW = np.unpackbits(bytes_NxB, axis=-1)[:, : self.k * self.index_bits]
    bits_NxKxW = bits_NxKxW.reshape(len(bytes_NxB), self.k, self.index_bits)
    weights_W = (1 << np.arange(self.index_bits - 1, -1, -1)).astype(np.int64)
    return (bits_NxKxW.astype(np.int64) @ weights_W).astype(np.int32)

  def decode_logprobs(self, bytes_NxB: np.ndarray) -> np.ndarray:
    """[N, k] float32 log-probs from N tokens' byte vectors, with DistillKit's decoder's dtypes: its output dtype
    is exact_dtype, residuals are rounded to it, and with delta encoding the sums are too."""
    n = len(bytes_NxB)
    out = self.exact_dtype
    at = 0

    def take(count: int, dtype: np.dtype) -> np.ndarray:
      nonlocal at
      size = count * dtype.itemsize
      chunk_NxS = np.ascontiguousarray(bytes_NxB[:, at : at + size])
      at += size
      return chunk_NxS.view(dtype).reshape(n, count)

    exact_NxE = take(self.exact_k, self.exact_dtype)
    coeffs_NxP = take(len(self.terms), self.term_dtype)
    residual_NxTail = np.zeros((n, self.tail), np.float32)
    first = 0
    for scale_dtype, bits, count in self.bins:
      scale_Nx1 = take(1, scale_dtype).astype(np.float32)
      packed_NxS = bytes_NxB[:, at : at + (count * bits + 7) // 8]
      at += packed_NxS.shape[1]
      bits_NxCxW = np.unpackbits(packed_NxS, axis=-1)[:, : count * bits].reshape(n, count, bits)
      q_NxC = bits_NxCxW.astype(np.float64) @ (2.0 ** np.arange(bits - 1, -1, -1))
      # Stored as q + 2**(bits-1) for a signed q; one bit stores 0/1 and means -1/+1.
      level_NxC = q_NxC * 2 - 1 if bits == 1 else q_NxC - 2.0 ** (bits - 1)
      residual_NxTail[:, first : first + count] = level_NxC.astype(np.float32) * scale_Nx1
      first += count
    approx = _promote(self.term_dtype, out) if self.terms else out
    tail_NxTail = residual_NxTail.astype(out).astype(approx)
    if self.terms:
      # Products in the terms' dtype, summed in at least float32 (torch's CPU sum of 16-bit floats), then rounded.
      work = _promote(self.term_dtype, np.dtype("<f4"))
      terms_NxTailxP = (coeffs_NxP.astype(work)[:, None, :] * self.basis_TailxP.astype(work)).astype(self.term_dtype)
      fit_NxTail = terms_NxTailxP.astype(work).sum(-1)
      tail_NxTail = fit_NxTail.astype(self.term_dtype).astype(approx) + tail_NxTail
    if self.delta_encoding:
      joined_NxK = np.concatenate([exact_NxE.astype(np.float64), tail_NxTail.astype(np.float64)], axis=-1)
      # DistillKit sums the deltas in float32 and rounds the sums to exact_dtype; its CPU cumsum accumulates
      # wider, as here (its own decode and this one agree bit for bit on the tests' delta captures).
      return np.cumsum(joined_NxK, axis=-1).astype(np.float32).astype(out).astype(np.float32)
    return np.concatenate([exact_NxE.astype(np.float32), tail_NxTail.astype(np.float32)], axis=-1)


def _natural_key(name: str) -> list:
  # data_10.parquet after data_9.parquet: the capture numbers its files in the order it wrote them.
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class DistillKitCapture:
  """A DistillKit 1.0 capture, one row (a token sequence and its teacher signals) at a time.

  `capture[i]` is a dict of NumPy arrays for row i, counted across the Parquet files in name order:
    input_ids    [T]    int32    the tokens as stored (a short row's appended pad token included)
    indices      [T, k] int32    the teacher's top-k token ids at each position; they may include ids of the
                                 teacher's padded embedding rows, past the tokenizer's (and the student's) vocab
    logprobs     [T, k] float32  their natural-log probabilities at temperature 1, in the teacher's rank order
                                 (descending as captured; a fitted tail can be off monotone by its fit error)
    signal_mask  [T]    bool     True at j where the row holds the distribution predicting token j + 1: every
                                 position but the last, which has indices 0 and logprobs -inf

  Reading row i reads its Parquet row group; the last one read is kept, so reading in order is cheap.
  """

  def __init__(self, folder: str):
    self.folder = folder
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
      raise DistillKitError(f"{folder}: no {CONFIG_NAME}; a DistillKit capture writes one beside its Parquet files")
    with open(config_path, encoding="utf-8") as f:
      try:
        self.config = yaml.safe_load(f)
      except yaml.YAMLError as e:
        raise DistillKitError(f"{config_path}: not valid YAML: {e}") from e
    self._scheme = _Scheme(self.config, config_path)
    self.k = self._scheme.k
    self.vocab_dim = self._scheme.d
    names = sorted((n for n in os.listdir(folder) if n.endswith(".parquet")), key=_natural_key)
    if not names:
      raise DistillKitError(f"{folder}: no .parquet files beside {CONFIG_NAME}")
    self.paths = [os.path.join(folder, n) for n in names]
    self._files = [pq.ParquetFile(p) for p in self.paths]
    for path, file in zip(self.paths, self._files):
      columns = set(file.schema_arrow.names)
      if set(LEGACY_COLUMNS) <= columns:
        raise DistillKitError(f"{path}: rows in DistillKit's legacy format ({', '.join(LEGACY_COLUMNS)}) are not "
                              "supported")
      missing = [c for c in COLUMNS if c not in columns]
      if missing:
        raise DistillKitError(f"{path}: no column(s) {missing}; a DistillKit capture has {list(COLUMNS)}")
    # Row-group boundaries across all files: the first global row of each group, and where the group lives.
    self._group_starts, self._groups = [], []
    start = 0
    for f_index, file in enumerate(self._files):
      for g in range(file.metadata.num_row_groups):
        self._group_starts.append(start)
        self._groups.append((f_index, g))
        start += file.metadata.row_group(g).num_rows
    self._len = start
    self._cached = (None, None)

  def __len__(self) -> int:
    return self._len

  def _group(self, index: int) -> pa.Table:
    if self._cached[0] != index:
      f_index, g = self._groups[index]
      self._cached = (index, self._files[f_index].read_row_group(g, columns=list(COLUMNS)))
    return self._cached[1]

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    if not -self._len <= i < self._len:
      raise IndexError(f"row {i} of a capture of {self._len} rows")
    i %= self._len
    group = bisect.bisect_right(self._group_starts, i) - 1
    row = self._group(group).slice(i - self._group_starts[group], 1)
    f_index, _ = self._groups[group]
    file_row = i - self._group_starts[group] + sum(
      self._files[f_index].metadata.row_group(g).num_rows for g in range(self._groups[group][1]))
    where = f"{self.paths[f_index]} row {file_row} (capture row {i})"
    return self._decode(row, where)

  def _decode(self, row: pa.Table, where: str) -> dict[str, np.ndarray]:
    s = self._scheme
    ids_T = row.column("input_ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if len(ids_T) and ids_T.max() > np.iinfo(np.int32).max:
      raise DistillKitError(f"{where}: token id {ids_T.max()} does not fit int32")
    t = len(ids_T)
    logprob_NxB = _byte_rows(row.column("compressed_logprobs"), s.logprob_bytes, "compressed_logprobs", where)
    index_NxB = _byte_rows(row.column("bytepacked_indices"), s.index_bytes, "bytepacked_indices", where)
    for name, rows in (("compressed_logprobs", logprob_NxB), ("bytepacked_indices", index_NxB)):
      if len(rows) != max(t - 1, 0):
        raise DistillKitError(f"{where}: {len(rows)} {name} vectors for {t} input_ids; a capture stores one signal "
                              "per position but the last (len(input_ids) - 1)")
    indices_TxK = np.zeros((t, s.k), np.int32)
    logprobs_TxK = np.full((t, s.k), -np.inf, np.float32)
    signal_mask_T = np.zeros((t,), bool)
    n = len(logprob_NxB)
    if n:
      indices_TxK[:n] = s.decode_indices(index_NxB)
      with np.errstate(over="ignore", invalid="ignore"):
        logprobs_TxK[:n] = s.decode_logprobs(logprob_NxB)
      bad = np.flatnonzero(~np.isfinite(logprobs_TxK[:n]).all(-1))
      if len(bad):
        # DistillKit's fit turns a top-k the teacher left short (-inf) into NaN; corrupt bytes do the same.
        raise DistillKitError(f"{where}: the signal at position {bad[0]} decodes to non-finite log-probs "
                              f"({len(bad)} positions in the row)")
      signal_mask_T[:n] = True
    return {"input_ids": ids_T.astype(np.int32), "indices": indices_TxK, "logprobs": logprobs_TxK,
            "signal_mask": signal_mask_T}


def _byte_rows(column: pa.ChunkedArray, width: int, name: str, where: str) -> np.ndarray:
  """[N, width] uint8: one row's N byte vectors (list<list<uint8>> as DistillKit writes them, or list<binary>)."""
  inner = column.combine_chunks().flatten()
  if pa.types.is_binary(inner.type) or pa.types.is_large_binary(inner.type):
    vectors = [np.frombuffer(v, np.uint8) for v in inner.to_pylist()]
    lengths_N = np.array([len(v) for v in vectors], np.int64)
    flat = np.concatenate(vectors) if vectors else np.zeros((0,), np.uint8)
  elif pa.types.is_list(inner.type) or pa.types.is_large_list(inner.type):
    lengths_N = inner.value_lengths().to_numpy(zero_copy_only=False)
    flat = inner.flatten().to_numpy(zero_copy_only=False)
  else:
    raise DistillKitError(f"{where}: column {name} holds {column.type}, not a list of byte vectors")
  bad = np.flatnonzero(lengths_N != width)
  if len(bad):
    raise DistillKitError(f"{where}: {name} at position {bad[0]} has {lengths_N[bad[0]]} bytes; the compression "
                          f"config makes each {width} bytes (was the capture made with another config?)")
  return flat.astype(np.uint8, copy=False).reshape(len(lengths_N), width)
