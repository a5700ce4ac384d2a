"""Reading and writing the safetensors format with NumPy memory maps.

Why not the `safetensors` package: its NumPy API has no bfloat16, and its Flax API copies whole tensors
onto a device. A memory map gives zero-copy views of any dtype, so the loader can slice out exactly the
shard each device needs, and the header can be checked against the file size to name a truncated file.
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


class CheckpointError(ValueError):
  """A checkpoint file or folder is missing, damaged, or does not match its config."""


class SafetensorsFile:
  """Lazy, zero-copy access to the tensors of one .safetensors file."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f"{path} is truncated ({size} bytes): not a safetensors file; re-download it")
      (n,) = struct.unpack("<Q", head)
      if 8 + n > size:
        raise CheckpointError(f"{path} is truncated: its header needs {8 + n} bytes but the file has {size}; "
                              "re-download or re-export it")
      try:
        header = json.loads(f.read(n))
      except ValueError as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}); re-download it") from e
    self.metadata = header.pop("__metadata__", None) or {}
    self._entries = {}
    for name, info in header.items():
      if info["dtype"] not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, which jaxkd cannot read")
      begin, end = info["data_offsets"]
      dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
      if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: tensor {name} ends at byte {8 + n + end} but the file has {size} bytes; "
            "re-download or re-export it")
      if end - begin != int(np.prod(shape)) * dtype.itemsize:
        raise CheckpointError(f"{path}: tensor {name} has {end - begin} bytes, not what shape {shape} needs")
      self._entries[name] = (dtype, shape, 8 + n + begin)
    self._mmap = None

  def names(self):
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def get(self, name: str) -> np.ndarray:
    """A read-only memory-mapped view; nothing is read until it is indexed."""
    dtype, shape, offset = self._entries[name]
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    count = int(np.prod(shape))
    return self._mmap[offset:offset + count * dtype.itemsize].view(dtype).reshape(shape)


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
