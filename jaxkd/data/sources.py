"""Where rows come from: Hugging Face `datasets` (hub names, local files, streaming) and TFDS array_record.

A source is one dict of the `data.sources` list. Map-style sources (everything but streaming) give random
access to rows: each process reads only its contiguous share `[lo, hi)` of a split, and the held-out rows
of an `eval_fraction` split are picked by a hash of the row number, so train and eval never overlap and do
not depend on the training seed. Streaming sources are read in order, split between processes by
`datasets.distributed.split_dataset_by_node`, and resume from the reader's own `state_dict`.

Every source also has a fingerprint of its content (file bytes, the hub revision's fingerprint, the TFDS
dataset info), so the tokenization cache is keyed by what was read, not by where it came from.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import hashlib
import json
import os
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np

from jaxkd.data.formats import FORMATS, DataError, detect_format

SOURCE_KEYS = ("path", "tfds", "name", "data_dir", "split", "eval_split", "format", "weight", "streaming",
               "columns")
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv",
             ".txt": "text"}


@dataclasses.dataclass
class SourceSpec:
  """One entry of `data.sources`, checked and with defaults filled in."""

  label: str
  path: Any = None  # file, glob, list of files, {split: files}, a folder, or a hub dataset name
  tfds: str | None = None  # TFDS dataset name, or the folder of a prepared TFDS dataset
  name: str | None = None  # HF dataset config name
  data_dir: str | None = None  # TFDS data dir
  split: str = "train"
  eval_split: str | None = None
  format: str = "auto"
  weight: float = 1.0
  streaming: bool = False
  columns: dict = dataclasses.field(default_factory=dict)  # {canonical name: column in this source}


def parse_sources(sources: Sequence[Mapping[str, Any]], *, default_format: str,
                  default_eval_split: str | None) -> list[SourceSpec]:
  if not sources:
    raise DataError("data.sources is empty: add at least one source, e.g. [{'path': 'train.jsonl'}]")
  specs = []
  for i, raw in enumerate(sources):
    raw = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)  # a ConfigDict entry, too
    unknown = set(raw) - set(SOURCE_KEYS)
    if unknown:
      raise DataError(f"data.sources[{i}] has unknown keys {sorted(unknown)}; allowed: {SOURCE_KEYS}")
    if (raw.get("path") is None) == (raw.get("tfds") is None):
      raise DataError(f"data.sources[{i}] needs exactly one of 'path' (HF datasets) or 'tfds' (TFDS name)")
    fmt = raw.get("format") or default_format
    if fmt != "auto" and fmt not in FORMATS:
      raise DataError(f"data.sources[{i}].format={fmt!r}: use 'auto' or one of {FORMATS}")
    weight = float(raw.get("weight", 1.0))
    if not weight > 0:
      raise DataError(f"data.sources[{i}].weight={weight}: weights must be positive")
    where = raw.get("tfds") or raw.get("path")
    label = f"tfds:{where}" if raw.get("tfds") else (where if isinstance(where, str) else f"source {i}")
    if raw.get("split"):
      label += f"[{raw['split']}]"
    specs.append(SourceSpec(
        label=label, path=raw.get("path"), tfds=raw.get("tfds"), name=raw.get("name"),
        data_dir=raw.get("data_dir"), split=raw.get("split") or "train",
        eval_split=raw.get("eval_split", default_eval_split), format=fmt, weight=weight,
        streaming=bool(raw.get("streaming", False)), columns=dict(raw.get("columns") or {})))
  return specs


# ---------------------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------------------


def _file_digest(path: str, memo_dir: str | None) -> str:
  """blake2b of a file's bytes, memoised on disk by (path, size, mtime) so a resume does not re-read it."""
  st = os.stat(path)
  memo = None
  if memo_dir:
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = os.path.join(memo_dir, "file_digests", key)
    if os.path.exists(memo):
      with open(memo) as f:
        return f.read().strip()
  h = hashlib.blake2b(digest_size=20)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  digest = h.hexdigest()
  if memo:
    os.makedirs(os.path.dirname(memo), exist_ok=True)
    tmp = f"{memo}.{os.getpid()}"
    with open(tmp, "w") as f:
      f.write(digest)
    os.replace(tmp, memo)
  return digest


def _local_files(path) -> list[str] | None:
  """The files a local `path` (file, glob, list, folder) names, or None when it is not local."""
  items = path if isinstance(path, (list, tuple)) else [path]
  files = []
  for item in items:
    item = os.path.expanduser(str(item))
    if os.path.isdir(item):
      files += sorted(p for p in glob.glob(os.path.join(item, "**", "*"), recursive=True) if os.path.isfile(p))
    elif any(c in item for c in "*?["):
      files += sorted(glob.glob(item, recursive=True))
    elif os.path.isfile(item):
      files.append(item)
    else:
      return None
  return files


# ---------------------------------------------------------------------------------------------------------
# Map-style readers
# ---------------------------------------------------------------------------------------------------------


class RowReader(Protocol):
  """Random access to the rows of one split of one source (HFReader, TFDSReader)."""

  label: str
  num_rows: int
  column_names: list[str]
  fingerprint: str  # of the content read, for the tokenization cache
  columns: dict  # the source's column renames

  def read(self, lo: int, hi: int) -> list[dict]:
    """Rows lo..hi-1 as dicts, columns renamed to their canonical names."""


def _rename(rows: list[dict], columns: Mapping[str, str]) -> list[dict]:
  if columns:
    for row in rows:
      for canonical, actual in columns.items():
        if actual in row:
          row[canonical] = row.pop(actual)
  return rows


@contextlib.contextmanager
def _no_progress_bars():
  """Local files: datasets' "Generating train split" bar takes a second and reads as noise (a hub download
  keeps its bars, which show real progress)."""
  import datasets

  was_disabled = datasets.are_progress_bars_disabled()
  datasets.disable_progress_bars()
  try:
    yield
  finally:
    if not was_disabled:
      datasets.enable_progress_bars()


def _hf_load(spec: SourceSpec, split: str, *, streaming: bool, hf_cache: str | None):
  """`datasets.load_dataset` for a local path or a hub name, with errors that say what to do."""
  import datasets

  path = spec.path
  kw = dict(split=split, streaming=streaming, cache_dir=hf_cache)
  if isinstance(path, Mapping):  # {split: files}
    files = {k: _local_files(v) for k, v in path.items()}
    missing = [k for k, v in files.items() if not v]
    if missing:
      raise DataError(f"source {spec.label}: no files found for split(s) {missing} in {dict(path)}")
    if split not in files:
      raise DataError(f"source {spec.label} has no split {split!r}; its path names splits {sorted(files)}")
    ext = os.path.splitext(files[split][0])[1].lower()
    with _no_progress_bars():
      return (datasets.load_dataset(_builder(ext, spec), data_files=files, **kw, **_builder_kwargs(files[split])),
              files[split])
  if isinstance(path, str) and os.path.isdir(os.path.expanduser(path)):
    folder = os.path.expanduser(path)
    if any(os.path.exists(os.path.join(folder, f)) for f in ("state.json", "dataset_dict.json")):
      ds = datasets.load_from_disk(folder)  # written by save_to_disk
      if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
          raise DataError(f"source {spec.label} has no split {split!r}; it has {sorted(ds)}")
        ds = ds[split]
      return (ds.to_iterable_dataset() if streaming else ds), None
  files = _local_files(path)
  if files is not None:
    if not files:
      raise DataError(f"source {spec.label}: no files match {path!r}")
    if split != "train":
      raise DataError(f"source {spec.label}: local files form one split ('train'), not {split!r}; name splits "
                      "with path={'train': 'a.jsonl', 'test': 'b.jsonl'}")
    ext = os.path.splitext(files[0])[1].lower()
    with _no_progress_bars():
      return datasets.load_dataset(_builder(ext, spec), data_files=files, **kw, **_builder_kwargs(files)), files
  if not isinstance(path, str) or path.startswith((".", "/", "~")):
    raise DataError(f"source {spec.label}: {path!r} is neither an existing local file/folder nor a hub name")
  try:
    return datasets.load_dataset(path, spec.name, **kw), None
  except (ConnectionError, OSError, FileNotFoundError) as e:
    raise DataError(
        f"could not load dataset {path!r} from the Hugging Face hub ({type(e).__name__}: {e}). If this machine "
        f"is offline, download it where there is internet (`hf download --repo-type dataset {path}`), copy "
        "the files here and point the source's path at them.") from e


def _builder_kwargs(files: Sequence[str]) -> dict:
  """CSV cells are text: without this, type inference turns an answer "12" into an int and an empty input
  into NaN, and the rows would count as bad."""
  if os.path.splitext(files[0])[1].lower() != ".csv":
    return {}
  import csv

  import datasets

  with open(files[0], newline="", encoding="utf-8") as f:
    header = next(csv.reader(f), [])
  return {"features": datasets.Features({c: datasets.Value("string") for c in header}), "keep_default_na": False}


def _builder(ext: str, spec: SourceSpec) -> str:
  if ext not in _BUILDERS:
    raise DataError(f"source {spec.label}: cannot read {ext!r} files; use one of {sorted(_BUILDERS)}")
  return _BUILDERS[ext]


class HFReader:
  def __init__(self, spec: SourceSpec, split: str, *, cache_dir: str | None):
    self.label = spec.label if split == spec.split else f"{spec.label}({split})"
    self.columns = spec.columns
    hf_cache = os.path.join(cache_dir, "hf") if cache_dir else None
    self.ds, files = _hf_load(spec, split, streaming=False, hf_cache=hf_cache)
    self.num_rows = len(self.ds)
    self.column_names = list(self.ds.column_names)
    if files is not None:
      digests = [_file_digest(f, cache_dir) for f in files]
      self.fingerprint = hashlib.sha256(json.dumps([split, digests]).encode()).hexdigest()
    else:  # hub or save_to_disk: the datasets library's own content fingerprint
      self.fingerprint = hashlib.sha256(json.dumps([str(spec.path), spec.name, split,
                                                    self.ds._fingerprint]).encode()).hexdigest()

  def read(self, lo: int, hi: int) -> list[dict]:
    cols = self.ds[lo:hi]
    keys = list(cols)
    return _rename([dict(zip(keys, vals)) for vals in zip(*(cols[k] for k in keys))], self.columns)


class TFDSReader:
  def __init__(self, spec: SourceSpec, split: str):
    import tensorflow_datasets as tfds

    self.label = spec.label if split == spec.split else f"{spec.label}({split})"
    self.columns = spec.columns
    where = os.path.expanduser(spec.tfds)
    try:
      if os.path.isdir(where):  # a prepared dataset folder (holding dataset_info.json)
        builder = tfds.builder_from_directory(where)
      else:
        builder = tfds.builder(spec.tfds, data_dir=spec.data_dir)
      if split not in builder.info.splits:
        raise DataError(f"TFDS source {spec.tfds!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
      self.src = builder.as_data_source(split=split)
    except DataError:
      raise
    except Exception as e:
      raise DataError(
          f"could not open TFDS dataset {spec.tfds!r} (data_dir={spec.data_dir!r}) with tfds.data_source: "
          f"{type(e).__name__}: {e}. It must be prepared locally in array_record format (tfds build "
          "--file_format=array_record, or file_format='array_record' in download_and_prepare).") from e
    self.num_rows = len(self.src)
    self.column_names = list(builder.info.features.keys())
    info = json.dumps(builder.info.as_json, sort_keys=True) if hasattr(builder.info, "as_json") else ""
    self.fingerprint = hashlib.sha256(
        json.dumps([str(builder.data_dir), split, self.num_rows, info]).encode()).hexdigest()

  def read(self, lo: int, hi: int) -> list[dict]:
    rows = self.src.__getitems__(list(range(lo, hi)))
    return _rename([dict(r) for r in rows], self.columns)


def open_reader(spec: SourceSpec, split: str, *, cache_dir: str | None) -> RowReader:
  return TFDSReader(spec, split) if spec.tfds else HFReader(spec, split, cache_dir=cache_dir)


def source_format(spec: SourceSpec, column_names: Sequence[str]) -> str:
  names = [next((c for c, a in spec.columns.items() if a == n), n) for n in column_names]
  return detect_format(names) if spec.format == "auto" else spec.format


# ---------------------------------------------------------------------------------------------------------
# Shares and held-out rows
# ---------------------------------------------------------------------------------------------------------


def process_share(num_rows: int, process_index: int, process_count: int) -> tuple[int, int]:
  """The contiguous rows [lo, hi) process `process_index` reads; the shares tile [0, num_rows)."""
  return num_rows * process_index // process_count, num_rows * (process_index + 1) // process_count


def eval_rows(row_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Boolean: whether each row is held out, by a hash of (seed, row id): stable under any sharding.

  A row id is the global row number of a map-style source, or `content_key` of a streaming row (whose
  number within one process's stream depends on the process count)."""
  if fraction <= 0:
    return np.zeros(len(row_ids), bool)
  x = (np.asarray(row_ids, np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) & np.uint64(2**64 - 1)
  with np.errstate(over="ignore"):  # splitmix64: wrap-around is the point
    x = (x + np.uint64(0x9E3779B97F4A7C15))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
  return (x >> np.uint64(11)).astype(np.float64) / float(2**53) < fraction


def content_key(row: Mapping) -> int:
  """A 64-bit id of a row from its content: the same in every process, whatever the process count (and the
  same for duplicate rows, which are then held out or trained on together)."""
  blob = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode()
  return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------


class StreamingRows:
  """Rows of a streaming HF source for one process, in order, pass after pass, with an exact position."""

  def __init__(self, spec: SourceSpec, split: str, *, process_index: int, process_count: int,
               epochs: int | None, cache_dir: str | None):
    from datasets.distributed import split_dataset_by_node

    self.label = spec.label
    self.columns = spec.columns
    hf_cache = os.path.join(cache_dir, "hf") if cache_dir else None
    ds, _ = _hf_load(spec, split, streaming=True, hf_cache=hf_cache)
    self.ds = split_dataset_by_node(ds, rank=process_index, world_size=process_count)
    self.epochs = epochs
    names = self.ds.column_names
    if names is None:  # some streaming sources only know their columns after the first row
      names = list(next(iter(self.ds)).keys())
    self.column_names = list(names)
    self.epoch, self.index = 0, 0
    self._it: Iterator | None = None

  def get_state(self) -> dict:
    hf = copy.deepcopy(self.ds.state_dict()) if self._it is not None else None
    return {"epoch": self.epoch, "index": self.index, "hf": hf}

  def set_state(self, state: Mapping) -> None:
    self.epoch, self.index = int(state["epoch"]), int(state["index"])
    self._it = None
    if state.get("hf") is not None:
      self.ds.set_epoch(self.epoch)  # datasets ignores a state from another epoch than the reader's own
      self.ds.load_state_dict(state["hf"])
      self._it = iter(self.ds)

  def __next__(self) -> tuple[int, dict]:
    """(row number within this process's stream, row); the row number restarts each pass."""
    while True:
      if self.epochs is not None and self.epoch >= self.epochs:
        raise StopIteration
      if self._it is None:
        self.ds.set_epoch(self.epoch)
        self._it = iter(self.ds)
      try:
        row = next(self._it)
      except StopIteration:
        if self.index == 0:
          raise DataError(f"streaming source {self.label} has no rows for this process") from None
        self.epoch, self.index, self._it = self.epoch + 1, 0, None
        continue
      self.index += 1
      return self.index - 1, _rename([dict(row)], self.columns)[0]
