"""An independent NumPy encoder of DistillKit 1.0's compressed captures, for tests and scripts/cache_fidelity.py.

It follows DistillKit's compressor as its source defines it (distillkit/compression/monotonic_logprobs.py,
bitpack.py, compressor.py) with its own arithmetic: float64 least squares, bit streams built as Python integers.
It shares nothing with jaxkd's reader (jaxkd/teacher_cache/distillkit.py), so a mistake in either shows up as a
mismatch in tests/test_teacher_cache_distillkit.py.
"""

import ml_dtypes
import numpy as np

FLOATS = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def recommended(d: int) -> dict:
  """DistillKit's recommended scheme for a vocabulary of d ids, every field its yaml dump writes
  (model_dump(mode="json") of DistributionQuantizationConfig)."""
  return {"d": d, "k": 128, "exact_k": 16, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, 2, 3, 4, "sqrt"],
          "term_dtype": "float32", "residual_bins": [], "delta_encoding": False, "error_diffusion": False,
          "normalize_t": False}


def budget(d: int) -> dict:
  """DistillKit's budget scheme: 50 ids, the top one exact, a 3-term fit over the rest."""
  return {**recommended(d), "k": 50, "exact_k": 1, "polynomial_terms": [0, 1, "sqrt"]}


def token_bytes(cfg: dict) -> int:
  """Bytes one token's signal takes (ids and log-probs, before Parquet), from the scheme's definition."""
  bits = int(np.ceil(np.log2(cfg["d"])))
  values = cfg["exact_k"] * np.dtype(FLOATS[cfg["exact_dtype"]]).itemsize
  values += len(cfg["polynomial_terms"]) * np.dtype(FLOATS[cfg["term_dtype"]]).itemsize
  for b in cfg["residual_bins"]:
    values += np.dtype(FLOATS[b["scale_dtype"]]).itemsize + -(-b["element_bits"] * b["num_elements"] // 8)
  return -(-cfg["k"] * bits // 8) + values


def pack_msb(values, bits: int) -> list[int]:
  """Bytes of `values` written MSB first, `bits` each, into one bit stream padded with zeros to whole bytes."""
  acc = 0
  for v in values:
    acc = (acc << bits) | int(v)
  total = len(values) * bits
  pad = -total % 8
  return list((acc << pad).to_bytes((total + pad) // 8, "big"))


def basis(cfg, n: int, shift: int = 0) -> np.ndarray:
  t = np.linspace(0, 1, n) if cfg["normalize_t"] else np.arange(n, dtype=np.float64) + shift
  return np.stack([np.sqrt(t) if p == "sqrt" else t**p for p in cfg["polynomial_terms"]], axis=-1)


def encode_token(logprobs, indices, cfg):
  """(compressed_logprobs bytes, bytepacked_indices bytes, the float64 log-probs the bytes describe, the original
  log-probs and ids in the order stored)."""
  k, e = cfg["k"], cfg["exact_k"]
  order = np.argsort(-logprobs, kind="stable")
  logprobs, indices = logprobs[order], indices[order]
  values = logprobs.astype(np.float64)
  if cfg["delta_encoding"]:
    values = np.concatenate([values[:1], np.diff(values)]).astype(np.float32).astype(np.float64)
  out = []
  exact = values[:e].astype(FLOATS[cfg["exact_dtype"]])
  out += list(exact.tobytes())
  tail = values[e:k]
  x = basis(cfg, k - e)
  coeffs = np.linalg.lstsq(x, tail, rcond=None)[0].astype(FLOATS[cfg["term_dtype"]])
  out += list(coeffs.tobytes())
  fit = x @ coeffs.astype(np.float64)
  residual = tail - fit
  dequantized = np.zeros_like(tail)
  first = 0
  for b in cfg["residual_bins"]:
    bits, n = b["element_bits"], b["num_elements"]
    r = residual[first : first + n]
    scale = np.array(max(np.abs(r).max(), 1e-30) / 2 ** (bits - 1)).astype(FLOATS[b["scale_dtype"]])
    q = np.clip(np.round(r / float(scale)), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    out += list(scale.tobytes()) + pack_msb(q + 2 ** (bits - 1), bits)
    dequantized[first : first + n] = q * float(scale)
    first += n
  recon = np.concatenate([exact.astype(np.float64), fit + dequantized])
  if cfg["delta_encoding"]:
    recon = np.cumsum(recon)
  bits = int(np.ceil(np.log2(cfg["d"])))
  return out, pack_msb(indices[:k], bits), recon, logprobs[:k], indices[:k]
