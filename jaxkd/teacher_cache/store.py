"""jaxkd's teacher cache on disk: Parquet shards of packed training rows with the teacher's top-k at each trained
token, and a manifest.

  DIR/manifest.json                  what was captured: teacher, tokenizer, template, data, seq_len, k, format
  DIR/shard-PPPPP-NNNNN.parquet      process P's rows of batches [N * shard_batches, (N + 1) * shard_batches)

A row is one packed row of the training stream (`jaxkd.data.loader`'s arrays, [seq_len] each) in the order the run
reads them; the teacher's signal is stored only where `loss_mask` is 1 (the tokens a run trains on), in the order of
those positions, the log-probs at temperature 1 of the k most likely tokens, in `jaxkd.teacher_cache.codec`'s
encoding (its docstring has the bytes; scripts/cache_fidelity.py measures them against DistillKit's and MaxText's):

  topk_ids      binary          n_trained * codec.id_bytes(k, vocab_size): each token's ids, an Elias-Fano set
  topk_gaps     binary          n_trained * k: each id's log-prob below the most likely, in logprob_step units
  topk_anchor   list<float32>   n_trained: the log-prob that gap 0 decodes to

The manifest records k, vocab_size and logprob_step, which decoding needs. Plain Parquet columns, so `datasets`
loads a shard as it is (`datasets.load_dataset("parquet", data_files=...)`), and zstd-compressed by Parquet.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jaxkd.teacher_cache import codec

FORMAT = "jaxkd-teacher-cache"
VERSION = 2  # 1 stored int32 ids and bfloat16 log-probs (never shipped: not read)
ROW_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
_SHARD = re.compile(r"shard-(\d{5})-(\d{5})\.parquet$")


class CacheError(ValueError):
  """A teacher cache that cannot serve this run; the message names the file, the row or the setting."""


def shard_path(directory: str, process: int, index: int) -> str:
  return os.path.join(directory, f"shard-{process:05d}-{index:05d}.parquet")


def encode_rows(batch: dict, indices_BxTxK: np.ndarray, logprobs_BxTxK: np.ndarray, first_row: int, *,
                vocab_size: int, step: float) -> pa.Table:
  """Parquet rows of one process-local batch; `first_row` numbers them in the whole stream. The top-k ids must be
  under `vocab_size`; `step` is capture.logprob_step."""
  rows = []
  for b in range(batch["input_ids"].shape[0]):
    trained_T = batch["loss_mask"][b] > 0
    ids_NxB, anchor_N, gaps_NxK = codec.encode(indices_BxTxK[b][trained_T], logprobs_BxTxK[b][trained_T],
                                               vocab_size, step)
    rows.append({"row": first_row + b, "input_ids": batch["input_ids"][b].astype(np.int32),
                 "targets": batch["targets"][b].astype(np.int32),
                 "loss_mask": batch["loss_mask"][b].astype(np.uint8),
                 "segment_ids": batch["segment_ids"][b].astype(np.int32),
                 "positions": batch["positions"][b].astype(np.int32),
                 "topk_ids": ids_NxB.tobytes(), "topk_gaps": gaps_NxK.tobytes(), "topk_anchor": anchor_N})
  return pa.Table.from_pylist(rows, schema=SCHEMA)


SIGNAL_KEYS = ("topk_ids", "topk_gaps", "topk_anchor")
SCHEMA = pa.schema([("row", pa.int64()), ("input_ids", pa.list_(pa.int32())), ("targets", pa.list_(pa.int32())),
                    ("loss_mask", pa.list_(pa.uint8())), ("segment_ids", pa.list_(pa.int32())),
                    ("positions", pa.list_(pa.int32())), ("topk_ids", pa.binary()), ("topk_gaps", pa.binary()),
                    ("topk_anchor", pa.list_(pa.float32()))])


def write_shard(path: str, tables: list[pa.Table]) -> None:
  """Written whole or not at all: a kill leaves no half shard under the final name."""
  tmp = path + ".tmp"
  pq.write_table(pa.concat_tables(tables), tmp, compression="zstd")
  os.replace(tmp, path)


def write_manifest(directory: str, manifest: dict) -> None:
  tmp = os.path.join(directory, "manifest.json.tmp")
  with open(tmp, "w") as f:
    json.dump({"format": FORMAT, "version": VERSION, **manifest}, f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(directory, "manifest.json"))


def read_manifest(directory: str) -> dict:
  path = os.path.join(directory, "manifest.json")
  if not os.path.isfile(path):
    raise CacheError(f"{directory} holds no teacher cache (no manifest.json); make one with python -m jaxkd.capture")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise CacheError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; this jaxkd "
                     f"reads {FORMAT!r} version {VERSION}")
  return manifest


def _weights_id(folder: str) -> str:
  """The teacher's weights by their files' names and sizes and config.json (hashing 15 GB would take minutes)."""
  h = hashlib.sha256()
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if name.endswith(".safetensors"):
      h.update(f"{name}:{os.path.getsize(path)};".encode())
    elif name == "config.json":
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()[:16]


def identity(c, tokenizer, rows: int, *, with_teacher: bool = True) -> dict:
  """What a cache was made from: a cache made otherwise must not serve a run (`teacher_cache.loader`). A run
  from the cache has no teacher model to describe (`with_teacher=False`)."""
  from jaxkd import data, program, workdir  # pylint: disable=import-outside-toplevel  (they import jax)

  template = data.resolve_template(c.data.chat_template, tokenizer)
  data_keys = workdir.config_dict(c)["data"]
  for key in ("encode_chunk", "prefetch", "eval_batches", "eval_fraction", "eval_split"):
    data_keys.pop(key, None)
  teacher = {"path": c.teacher.path, "dtype": c.teacher.dtype,
             "weights": _weights_id(program.model_folder(c.teacher))} if with_teacher else None
  if teacher and c.teacher.quantize:  # only when set: caches made before the key existed keep their identity
    teacher["quantize"] = c.teacher.quantize
  return {"teacher": teacher,
          "tokenizer": data.tokenizer_fingerprint(tokenizer),
          "chat_template": hashlib.sha256(str(template).encode()).hexdigest()[:16],
          "data": data_keys, "seed": c.seed, "k": c.capture.top_k, "rows": rows,
          "shard_batches": c.capture.shard_batches}


def differences(stored: dict, now: dict, prefix: str = "") -> list[str]:
  out = []
  for key in sorted(set(stored) | set(now)):
    a, b = stored.get(key), now.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += differences(a, b, f"{prefix}{key}.")
    elif json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
      out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
  return out


def complete_shards(directory: str, process: int) -> int:
  """How many shards process `process` has finished, counted from 0 without a gap."""
  n = 0
  while os.path.isfile(shard_path(directory, process, n)):
    n += 1
  return n


def decode_row(record: dict, k: int, where: str, *, vocab_size: int, step: float) -> dict:
  """A stored row as arrays: the loader's five [T] arrays, and the top-k [T, k] (float32 log-probs most likely
  first, int32 ids; ids 0 and log-probs -inf at the tokens without a signal), checked against each other."""
  out = {key: np.asarray(record[key], np.int32) for key in ROW_KEYS if key != "loss_mask"}
  out["loss_mask"] = np.asarray(record["loss_mask"], np.float32)
  t = out["input_ids"].shape[0]
  trained_T = out["loss_mask"] > 0
  n = int(trained_T.sum())
  ids = np.frombuffer(record["topk_ids"] or b"", np.uint8)
  gaps = np.frombuffer(record["topk_gaps"] or b"", np.uint8)
  anchor = np.asarray(record["topk_anchor"], np.float32)
  per_token = codec.id_bytes(k, vocab_size)
  damaged = (f"{where}: row {record['row']} is damaged: its arrays do not fit {t} tokens with {n} trained and k={k} "
             f"of {vocab_size} ids (topk_ids {ids.shape[0]} bytes, topk_gaps {gaps.shape[0]}, topk_anchor "
             f"{anchor.shape[0]} values)")
  if any(out[key].shape != (t,) for key in ROW_KEYS) or ids.shape != (n * per_token,) or gaps.shape != (n * k,) \
      or anchor.shape != (n,):
    raise CacheError(damaged)
  try:
    idx_NxK, lp_NxK = codec.decode(ids.reshape(n, per_token), anchor, gaps.reshape(n, k), vocab_size, step)
  except ValueError as e:
    raise CacheError(f"{damaged}: {e}") from None
  indices_TxK = np.zeros((t, k), np.int32)
  logprobs_TxK = np.full((t, k), -np.inf, np.float32)
  indices_TxK[trained_T] = idx_NxK
  logprobs_TxK[trained_T] = lp_NxK
  out.update(indices=indices_TxK, logprobs=logprobs_TxK, signal_mask=trained_T)
  return out


class Cache:
  """The rows of a jaxkd teacher cache in stream order: `len`, `cache[i]` -> `decode_row`'s dict."""

  def __init__(self, directory: str):
    self.directory = directory
    self.manifest = read_manifest(directory)
    self.k = int(self.manifest["k"])
    self.vocab_size, self.step = int(self.manifest["vocab_size"]), float(self.manifest["logprob_step"])
    self._where: dict[int, tuple[str, int]] = {}  # stream row -> (file, row inside it)
    self._files: dict[str, pq.ParquetFile] = {}
    for path in sorted(glob.glob(os.path.join(directory, "shard-*.parquet"))):
      if not _SHARD.search(path):
        continue
      try:
        rows = pq.read_table(path, columns=["row"]).column("row").to_pylist()
      except Exception as e:  # noqa: BLE001  (pyarrow raises several kinds for a damaged file)
        process, index = map(int, _SHARD.search(path).groups())
        per = int(self.manifest["shard_batches"])
        raise CacheError(f"{path} is damaged or truncated ({e}): it held process {process}'s rows of batches "
                         f"{index * per} to {(index + 1) * per - 1}; capture them again: delete it and rerun "
                         "python -m jaxkd.capture with the same config") from None
      for i, r in enumerate(rows):
        self._where[r] = (path, i)
    self.rows = len(self._where)
    if sorted(self._where) != list(range(self.rows)):
      missing = sorted(set(range(max(self._where, default=-1) + 1)) - set(self._where))
      raise CacheError(f"{directory}: rows {missing[:5]}{'...' if len(missing) > 5 else ''} are missing (a capture "
                       "that did not finish: rerun python -m jaxkd.capture with the same config to complete it)")

  def __len__(self) -> int:
    return self.rows

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self.rows:
      raise IndexError(f"row {i} of a cache of {self.rows}")
    path, j = self._where[i]
    table = self._table(path)
    record = {name: table.column(name)[j].as_py() for name in table.column_names}
    return decode_row(record, self.k, path, vocab_size=self.vocab_size, step=self.step)

  def _table(self, path: str) -> pa.Table:
    if path not in self._files:
      if len(self._files) > 4:  # a few open shards are enough for reading in order
        self._files.clear()
      self._files[path] = pq.read_table(path)
    return self._files[path]
