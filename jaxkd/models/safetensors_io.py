"""Reading and writing the safetensors format with plain file reads.

Why not the `safetensors` package: its NumPy API has no bfloat16, and its Flax API copies whole tensors
onto a device. Reading the bytes ourselves handles every dtype (via ml_dtypes), reads only the row range
a device shard needs, and checks the header against the file size so a truncated file is named.
The format is small: an 8-byte little-endian header length, a JSON header, then the raw tensor bytes.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}


class WeightsError(ValueError):
  """A model folder's weights or config.json are missing, damaged, or do not belong together (the training
  run's own checkpoints have jaxkd.checkpoint.CheckpointError)."""


class SafetensorsFile:
  """The header of one .safetensors file, checked, and reads of (row ranges of) its tensors."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise WeightsError(f"{path} is truncated ({size} bytes): not a safetensors file; re-download it")
      (n,) = struct.unpack("<Q", head)
      if 8 + n > size:
        raise WeightsError(f"{path} is truncated: its header needs {8 + n} bytes but the file has {size}; "
                              "re-download or re-export it")
      try:
        header = json.loads(f.read(n))
      except ValueError as e:
        raise WeightsError(f"{path}: the safetensors header is not valid JSON ({e}); re-download it") from e
    self.metadata = header.pop("__metadata__", None) or {}
    self._entries = {}
    for name, info in header.items():
      if info["dtype"] not in DTYPES:
        raise WeightsError(f"{path}: tensor {name} has dtype {info['dtype']}, which jaxkd cannot read")
      begin, end = info["data_offsets"]
      dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
      if 8 + n + end > size:
        raise WeightsError(
            f"{path} is truncated: tensor {name} ends at byte {8 + n + end} but the file has {size} bytes; "
            "re-download or re-export it")
      if end - begin != int(np.prod(shape)) * dtype.itemsize:
        raise WeightsError(f"{path}: tensor {name} has {end - begin} bytes, not what shape {shape} needs")
      self._entries[name] = (dtype, shape, 8 + n + begin)

  def names(self):
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
    """Reads tensor `name` (only the leading-axis range `rows`) into a fresh array.

    Plain reads rather than a memory map: mapped file pages would count in the process's resident
    memory until unmapped, doubling the apparent footprint of a load.
    """
    dtype, shape, offset = self._entries[name]
    if not shape:
      rows = slice(None)
    start, stop, step = rows.indices(shape[0]) if shape else (0, 1, 1)
    if step != 1:
      return self.read(name)[rows]
    row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
    out = np.empty((max(stop - start, 0), *shape[1:]) if shape else (), dtype)
    with open(self.path, "rb") as f:
      f.seek(offset + start * row_bytes)
      if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
        raise WeightsError(f"{self.path}: short read of tensor {name}; the file is truncated, re-download it")
    return out


def write_file(path: str, specs, arrays, metadata: dict[str, str] | None = None) -> None:
  """Writes tensors to `path`, streaming: `specs` lists (name, dtype, shape) up front (the header comes
  first), `arrays` then yields each tensor in that order, so only one needs to be in memory.

  Written through a temporary file and renamed, so a crash never leaves half a file under `path`.
  """
  header, offset = {}, 0
  for name, dtype, shape in specs:
    dtype = np.dtype(dtype)
    if dtype not in CODES:
      raise ValueError(f"cannot write tensor {name} of dtype {dtype} to safetensors")
    nbytes = int(np.prod(shape)) * dtype.itemsize
    header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = {"format": "pt", **(metadata or {})}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for (name, dtype, shape), arr in zip(specs, arrays, strict=True):
      if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise ValueError(f"tensor {name}: got {arr.dtype}{arr.shape}, header says {dtype}{tuple(shape)}")
      f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
