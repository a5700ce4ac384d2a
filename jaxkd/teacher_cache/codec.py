"""The bytes of one token's top-k in a jaxkd teacher cache (format version 2): its ids as an Elias-Fano set, its
log-probs as one float32 anchor and k uint8 gaps.

  ids     the k ids sorted ascending, Elias-Fano coded over [0, vocab): each id's low L = floor(log2(vocab / k)) bits
          as they are, then its high bits in unary (a one at high_i + i in k + (vocab - 1 >> L) + 1 bits), MSB
          first, padded to whole bytes: `id_bytes(k, vocab)` bytes, a fixed length that depends on k and vocab only
          (195 at k = 128 and Qwen2's 151,936 ids; fixed-width ids take ceil(log2 vocab) = 18 bits, 288 bytes).
  gaps    one uint8 per id in the same (id) order: how far below the most likely its log-prob is, in steps of
          `step` nats (capture.logprob_step), rounded, clipped at GAP_MAX steps; the most likely's gap is 0.
  anchor  a float32 log-prob such that the decoded log-prob of each id is anchor - gap * step, chosen so that the
          decoded probabilities sum to exactly the teacher's top-k mass.

Why the anchor: a loss (or a reader) that puts the mass the top-k leaves out on the other ids is very sensitive to
the top-k's sum, since that rest is small (under 1e-3 for a peaked teacher); rounding each log-prob on its own moves
the sum by more than that, and the KL from the teacher grew sixfold at k = 128 (scripts/cache_fidelity.py). With
the anchor every decoded log-prob above the clip is within `step` of the teacher's (the shared shift at most
step / 2, each value's rounding at most step / 2 beyond it), and the sum is the teacher's to float32 precision.

Why sorted ids: the set of k ids out of vocab takes about log2(C(vocab, k)) bits, fewer than k * ceil(log2 vocab);
sorted, the rank order is lost, but the gaps carry it (the decoder sorts by them; ids whose gaps round to the same
step come out in id order, which is their order to within `step`).
"""

from __future__ import annotations

import numpy as np

GAP_MAX = 255  # the largest gap a uint8 holds: log-probs more than GAP_MAX * step below the top decode at that depth


def low_bits(k: int, vocab: int) -> int:
  return max(0, (vocab // k).bit_length() - 1)


def id_bits(k: int, vocab: int) -> int:
  """Bits of one token's Elias-Fano id set before padding: k low parts and the unary high parts."""
  low = low_bits(k, vocab)
  return k * low + k + ((vocab - 1) >> low) + 1


def id_bytes(k: int, vocab: int) -> int:
  return -(-id_bits(k, vocab) // 8)


def token_bytes(k: int, vocab: int) -> int:
  """Stored bytes per trained token (before Parquet's zstd): ids, k gaps, a float32 anchor."""
  return id_bytes(k, vocab) + k + 4


def encode(indices_NxK: np.ndarray, logprobs_NxK: np.ndarray, vocab: int, step: float):
  """(ids [N, id_bytes] uint8, anchor [N] float32, gaps [N, K] uint8 in id order) of N tokens' top-k; the
  log-probs most likely first (as jax.lax.top_k gives them), ids distinct and under `vocab`."""
  n, k = indices_NxK.shape
  order_NxK = np.argsort(indices_NxK, axis=1, kind="stable")
  ids_NxK = np.take_along_axis(indices_NxK.astype(np.int64), order_NxK, 1)
  lp_NxK = np.take_along_axis(logprobs_NxK.astype(np.float64), order_NxK, 1)
  if n and (ids_NxK.min() < 0 or ids_NxK.max() >= vocab or (np.diff(ids_NxK, axis=1) == 0).any()):
    raise ValueError(f"top-k ids must be distinct and in [0, {vocab}): got {ids_NxK.min()}..{ids_NxK.max()}")
  top_N = np.max(logprobs_NxK, axis=1).astype(np.float64)
  with np.errstate(invalid="ignore"):  # -inf log-probs (k past the vocabulary) clip to GAP_MAX
    gaps_NxK = np.clip(np.round((top_N[:, None] - lp_NxK) / step), 0, GAP_MAX)
  gaps_NxK = np.nan_to_num(gaps_NxK, nan=GAP_MAX)
  # The anchor that makes sum(exp(anchor - gap * step)) the teacher's top-k mass, both sides relative to the top.
  mass_N = np.log(np.exp(lp_NxK - top_N[:, None]).sum(1))
  anchor_N = (top_N + mass_N - np.log(np.exp(-gaps_NxK * step).sum(1))).astype(np.float32)
  return _pack_ids(ids_NxK, vocab), anchor_N, gaps_NxK.astype(np.uint8)


def decode(ids_NxB: np.ndarray, anchor_N: np.ndarray, gaps_NxK: np.ndarray, vocab: int, step: float):
  """(indices [N, K] int32, log-probs [N, K] float32), most likely first; ValueError for bytes that are no
  Elias-Fano set of K ids under `vocab`."""
  n, k = gaps_NxK.shape
  ids_NxK = _unpack_ids(ids_NxB, k, vocab)
  lp_NxK = (anchor_N.astype(np.float64)[:, None] - gaps_NxK.astype(np.float64) * step).astype(np.float32)
  order_NxK = np.argsort(gaps_NxK, axis=1, kind="stable")
  return (np.take_along_axis(ids_NxK, order_NxK, 1).astype(np.int32), np.take_along_axis(lp_NxK, order_NxK, 1))


def _pack_ids(ids_NxK: np.ndarray, vocab: int) -> np.ndarray:
  n, k = ids_NxK.shape
  low = low_bits(k, vocab)
  high_bits = id_bits(k, vocab) - k * low
  shifts_L = np.arange(low - 1, -1, -1)
  lows_NxKxL = (ids_NxK[:, :, None] >> shifts_L) & 1
  highs_NxH = np.zeros((n, high_bits), np.uint8)
  np.put_along_axis(highs_NxH, (ids_NxK >> low) + np.arange(k), 1, axis=1)
  bits_NxT = np.concatenate([lows_NxKxL.reshape(n, k * low).astype(np.uint8), highs_NxH], axis=1)
  return np.packbits(bits_NxT, axis=1)


def _unpack_ids(ids_NxB: np.ndarray, k: int, vocab: int) -> np.ndarray:
  n = ids_NxB.shape[0]
  if ids_NxB.shape[1] != id_bytes(k, vocab):
    raise ValueError(f"{ids_NxB.shape[1]} id bytes a token where k={k} of {vocab} ids take {id_bytes(k, vocab)}")
  low = low_bits(k, vocab)
  bits_NxT = np.unpackbits(ids_NxB, axis=1)[:, :id_bits(k, vocab)]
  lows_NxK = (bits_NxT[:, :k * low].reshape(n, k, low).astype(np.int64) << np.arange(low - 1, -1, -1)).sum(-1)
  rows, cols = np.nonzero(bits_NxT[:, k * low:])
  if not np.array_equal(np.bincount(rows, minlength=n), np.full(n, k)):
    raise ValueError(f"an id set without exactly k={k} high-part ones")
  ids_NxK = ((cols.reshape(n, k) - np.arange(k)) << low) | lows_NxK
  if n and ids_NxK.max() >= vocab:
    raise ValueError(f"an id {ids_NxK.max()} past the vocabulary ({vocab})")
  return ids_NxK
