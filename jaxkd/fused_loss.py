"""The fused (chunked) KD + CE loss from hidden states and output heads.

The loss of a model with a 152k vocabulary is dominated by its logits: at 8,192 tokens one [N, V] float32 array is 5 GB,
and the unfused loss and its gradient hold several (student and teacher logits, log-probs, the logits' cotangent). The
fused loss walks over the tokens in chunks of C, and for each chunk forms the student and teacher logits [C, V], the
loss, and at once its gradient with respect to the student logits; it then folds that gradient into d(hidden) [N, Ds]
and d(head) [Ds, V] and drops the chunk. Only those two gradients are kept for the backward pass (a custom VJP), which
just scales them by the incoming cotangent: nothing is recomputed, neither the teacher's logits nor the student's.

The per-chunk math is `per_token_divergence`'s own body (`_divergence`) and the label pick of `cross_entropy_loss`,
differentiated with `jax.value_and_grad` on the chunk's logits inside the loop, so the fused loss has no second copy of
the divergence formulas that could drift from `kd_loss`. The one exception is a monitoring metric, not the loss: the KL
at temperature 1 is formed from row statistics (`_kl1_and_teacher_lse`), and the tests hold it to the reference. `jaxkd.losses` holds those reference definitions and the same
objective on materialised logits (`losses.distill_sums`); the tests compare the fused loss with them.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxkd import sharding as shd
# The reference's own checks and per-token math (see the module docstring).
from jaxkd.losses import (MISSING_MASS, _check_hparams, _check_mask, _concrete, _divergence, _kth_largest,
                          _label_logits, _one_vocab, _shared_vocab, _sparse_logits, masked_sum_and_count)

# The mesh axis that splits the vocabulary (the heads' columns, each chunk's logits) and those that split the
# tokens, as the rules table says; the vocab-split code below is written for one vocab axis.
(_VOCAB_AXIS,) = shd.mesh_axes_of("act_vocab")
_TOKEN_AXES = shd.mesh_axes_of("act_batch")

# Logit given to head columns at or past vocab_size. The chunk keeps the head's full width and masks rather than
# slicing, because slicing a vocab-sharded array to a width the vocab axis does not divide (151646 = 2 x 75823) would
# reshard every chunk. exp(-1e30 - max) is exactly 0 in float32, so a masked column adds nothing to any softmax sum;
# unlike -inf the value stays finite, so the p * (log p - log q) terms and their gradients never form 0 * inf.
_MASKED_LOGIT = -1e30

# Hyperparameters that may be traced; the concrete ones are kept static (so that e.g. skew=0 and alpha=0 still take
# their exact special paths).
_HPARAMS = ("temperature", "beta", "skew", "alpha")


@dataclasses.dataclass(frozen=True)
class _FusedSpec:
  """Everything static about one fused call (the custom VJP's nondiff arg)."""

  n_tokens: int
  chunk: int
  n_chunks: int
  width: int  # vocab dim of the chunk logits: the heads' common width
  vocab: int  # the real vocabulary; columns >= vocab are masked out
  kind: str
  teacher_top_k: Optional[int]
  with_teacher: bool  # KD term and teacher metrics
  cached: bool  # the teacher is its stored top-k (indices, log-probs), not hidden states and a head
  missing: str  # with `cached`: how the rest of the vocabulary counts (losses.MISSING_MASS)
  with_labels: bool  # CE term and accuracy
  hidden_dtype: np.dtype
  head_dtype: np.dtype
  static_hparams: tuple  # ((name, Python float), ...) for the concrete ones

  def hparam(self, name, traced_hparams):
    static = dict(self.static_hparams)
    return static[name] if name in static else traced_hparams[name]


# ----------------------------------------------------------------------------------------------------
# Mesh handling: the vocab axis and the token axes of the active mesh.


def _auto_mesh_axes():
  """{axis name: size} of the active mesh's Auto axes of size > 1 ({} if none).

  Under Auto axes GSPMD partitions the loss by itself (combining log-sum-exps and reductions across vocab shards); the
  constraints below only tell it which layout to keep. Explicit axes (of size > 1) are refused by `_check_mesh_axes`;
  under Manual ones (inside shard_map) each shard's loss is computed locally.
  """
  return _mesh_axes(jax.sharding.AxisType.Auto)


def _mesh_axes(axis_type):
  """{axis name: size} of the active mesh's axes of `axis_type` with size > 1 ({} without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return {}
  return {name: size for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
          if size > 1 and kind == axis_type}


def _check_mesh_axes():
  explicit = list(_mesh_axes(jax.sharding.AxisType.Explicit))
  if explicit:
    raise ValueError(
        f"the fused loss runs under a mesh with Auto axes, but the active mesh's axes {explicit} are Explicit, "
        "which jax.make_mesh makes by default; build the mesh with jaxkd.sharding.make_mesh, or "
        "jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto,) * n)")


def _vocab_shards(width):
  """How many ways the vocab dim (of size width) is split over the vocab axis."""
  size = _auto_mesh_axes().get(_VOCAB_AXIS, 1)
  return size if width % size == 0 else 1


# About this many float32 [chunk, width] arrays of a chunk are alive at once (logits of both models, the softmaxes,
# the gradient): compiled at Qwen2's 151,936 columns (scripts/bench_loss_memory.py, BENCHMARKS.md), going from 1024
# to 2048 tokens a chunk adds 5.8 of them, from 512 to 1024 7.0.
LIVE_CHUNK_ARRAYS = 6
# What one chunk may take on a device, by default (config.distill.chunk_budget_mib).
CHUNK_BUDGET_BYTES = 1 << 30


def chunk_for(width: int, budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
  """Tokens a chunk of `width`-column logits takes so that each device's share of its float32 arrays fills about
  `budget_bytes`, under the active mesh: a device holds width / (vocab shards) columns of chunk / (token shards)
  rows. Each device's rows are a multiple of 128 (of 8 below 128: a TPU tile), at least 8."""
  vocab_shards = _vocab_shards(width)
  rows = max(1, int(budget_bytes) // (LIVE_CHUNK_ARRAYS * 4 * (width // vocab_shards)))
  rows = rows // 128 * 128 if rows >= 128 else max(8, rows // 8 * 8)
  token_shards = int(np.prod([size for name, size in _auto_mesh_axes().items() if name in _TOKEN_AXES],
                             dtype=np.int64))
  return rows * token_shards


def _token_axes(chunk):
  """The active mesh's token axes (those of `act_batch`) that split a chunk's tokens, and their size.

  Tokens are normally sharded over the data axes. Each token shard keeps its own partial d(head) across the loop and
  they are summed once at the end; accumulating into one replicated d(head) would all-reduce a [Ds, V] array on every
  chunk.
  """
  axes = {name: size for name, size in _auto_mesh_axes().items() if name in _TOKEN_AXES}
  size = int(np.prod(list(axes.values()), dtype=np.int64))
  if size == 1 or chunk % size:
    return (), 1
  return tuple(axes), size


def _vocab_sharded(x_xV, shards, lead_axes=()):
  """Keep the last (vocab) dim split over the vocab axis (and dim 0 over lead_axes)."""
  if shards == 1 and not lead_axes:
    return x_xV
  rest = [P.UNCONSTRAINED] * (x_xV.ndim - 1 - bool(lead_axes))
  spec = P(*([lead_axes] if lead_axes else []), *rest, _VOCAB_AXIS if shards > 1 else None)
  return jax.lax.with_sharding_constraint(x_xV, spec)


def _split_kth_largest(x_CxV, k, shards, token_axes):
  """`losses._kth_largest` of x_CxV whose V is split `shards` ways over the vocab axis (C over token_axes).

  The selection is done shard by shard: each shard's own top-k, gathered ([C, S*k], not [C, V]), and the top-k of those
  candidates. This is exact: an entry of the global top-k is in its shard's top-k, and both stages break ties towards
  the lower index as `lax.top_k` does (the candidates are laid out shard by shard). A plain `lax.top_k` on the split
  array would make XLA gather whole rows.
  """
  per_shard = x_CxV.shape[-1] // shards

  def local(x_cxVs):
    val_cxK, idx_cxK = jax.lax.top_k(x_cxVs, min(k, per_shard))
    idx_cxK = idx_cxK + per_shard * jax.lax.axis_index(_VOCAB_AXIS)
    val_cxM = jax.lax.all_gather(val_cxK, _VOCAB_AXIS, axis=1, tiled=True)
    idx_cxM = jax.lax.all_gather(idx_cxK, _VOCAB_AXIS, axis=1, tiled=True)
    val_cxK, pos_cxK = jax.lax.top_k(val_cxM, k)
    idx_cxK = jnp.take_along_axis(idx_cxM, pos_cxK, axis=1)
    return val_cxK[:, k - 1], idx_cxK[:, k - 1]

  rows = token_axes or None
  return jax.shard_map(
      local,
      in_specs=P(rows, _VOCAB_AXIS),
      out_specs=(P(rows), P(rows)),
      axis_names={_VOCAB_AXIS, *token_axes},
      # After the all_gather every vocab shard holds the same candidates and picks the same k-th one; the checker cannot
      # see that.
      check_vma=False)(x_CxV)


# ----------------------------------------------------------------------------------------------------
# The chunked scan and its custom VJP.


def _mask_columns(logits_CxV, vocab):
  if vocab == logits_CxV.shape[-1]:
    return logits_CxV
  col_ok_V = jnp.arange(logits_CxV.shape[-1]) < vocab
  return jnp.where(col_ok_V, logits_CxV, _MASKED_LOGIT)


def _nll(logits_CxV, labels_C, vocab, lse_C=None):
  """Per-token -log softmax[label], NaN on labels outside [0, vocab) like CE; lse_C: the rows' log-sum-exp if known."""
  picked_C, valid_C = _label_logits(logits_CxV, labels_C)
  valid_C = valid_C & (labels_C < vocab)
  if lse_C is None:
    lse_C = jax.nn.logsumexp(logits_CxV, axis=-1)
  return jnp.where(valid_C, lse_C - picked_C, jnp.nan)


def _kl1_and_teacher_lse(zs_CxV, zt_CxV, lse_s_C):
  """Per-row KL(softmax(zt) || softmax(zs)) and the teacher's log-sum-exp, from one exp pass over the teacher.

  A monitoring metric, so not `_divergence` at temperature 1, which forms both log-softmaxes and the teacher's
  probabilities: three exps per (token, column) where this takes one (BENCHMARKS.md, "The chunk's metrics"). With m the
  teacher's row max and e = exp(zt - m): lse_t = m + log sum e, and KL = sum e (zt - zs) / sum e - lse_t + lse_s, the
  same quantity as `_kl_from_logs`'s (tests/test_fused_loss.py holds the two together). Masked columns (-1e30 in both)
  add 0. The max is a reduction, not a gather at the argmax, which would gather across vocab shards.
  """
  max_t_C = jnp.max(zt_CxV, axis=-1, keepdims=True)
  e_CxV = jnp.exp(zt_CxV - max_t_C)
  z_C = jnp.sum(e_CxV, axis=-1)
  lse_t_C = max_t_C[:, 0] + jnp.log(z_C)
  return jnp.sum(e_CxV * (zt_CxV - zs_CxV), axis=-1) / z_C - lse_t_C + lse_s_C, lse_t_C


def _matmul(a_CxD, b_DxV):
  return jnp.dot(a_CxD, b_DxV, preferred_element_type=jnp.float32)


def _fused_scan(spec, hp, h_s_NxDs, head_s_DsxV, h_t_NxDt, head_t_DtxV, labels_N, keep_N, with_grad):
  """Loss sums (and with_grad, their gradients) over all chunks of tokens.

  With `spec.cached`, the teacher's two arrays are its stored top-k: indices and log-probs, both [N, K].

  Returns (weighted_sum, aux, dh_NxDs, dW_DsxV); the gradients are None without with_grad.
  """
  f32 = jnp.float32
  n, c, k_chunks = spec.n_tokens, spec.chunk, spec.n_chunks
  tau = spec.hparam("temperature", hp)
  d_s = h_s_NxDs.shape[1]
  shards = _vocab_shards(spec.width)
  token_axes, n_token_shards = _token_axes(c)
  kth_largest = (functools.partial(_split_kth_largest, shards=shards, token_axes=token_axes) if shards > 1
                 else _kth_largest)
  compute_dtype = jnp.result_type(h_s_NxDs.dtype, head_s_DsxV.dtype)
  if spec.with_teacher:
    alpha = spec.hparam("alpha", hp)
    w_kd, w_ce = alpha, 1.0 - alpha
  else:
    w_kd, w_ce = 0.0, 1.0

  def strided(x_Nx):
    # [N, ...] -> [C, K, ...]: chunk k holds tokens k, K + k, 2K + k, ...
    # Strided rather than contiguous so that tokens sharded over the data axes stay sharded along C inside every chunk;
    # a contiguous split would put that sharding on K, the dim the loop walks over.
    x_Nx = jnp.pad(x_Nx, [(0, c * k_chunks - n)] + [(0, 0)] * (x_Nx.ndim - 1))
    return x_Nx.reshape((c, k_chunks) + x_Nx.shape[1:])

  h_s_CxKxDs = strided(h_s_NxDs)
  keep_CxK = strided(keep_N)  # the padding rows are False
  labels_CxK = strided(labels_N) if spec.with_labels else None
  h_t_CxKxDt = strided(h_t_NxDt) if spec.with_teacher else None
  head_t_CxKxK = strided(head_t_DtxV) if spec.cached else None  # the stored log-probs [N, K], chunked likewise

  def column(x_CxKx, k):
    return jax.lax.dynamic_index_in_dim(x_CxKx, k, axis=1, keepdims=False)

  def divergence(zs_CxV, zt, kind, temperature):
    if spec.cached:  # zt = (indices, log-probs) of the stored top-k
      s_CxK, t_CxK = _sparse_logits(zs_CxV, *zt, temperature=temperature, missing=spec.missing, vocab=spec.vocab)
      return _divergence(s_CxK, t_CxK, kind=kind, temperature=1.0, beta=spec.hparam("beta", hp),
                         skew=spec.hparam("skew", hp), teacher_top_k=None)
    return _divergence(zs_CxV, zt, kind=kind, temperature=temperature, beta=spec.hparam("beta", hp),
                       skew=spec.hparam("skew", hp), teacher_top_k=spec.teacher_top_k, kth_largest=kth_largest)

  def chunk_loss(zs_CxV, zt_CxV, labels_C, keep_C):
    """Weighted loss sum of one chunk, as a function of the student logits."""
    zs_CxV = _mask_columns(zs_CxV, spec.vocab)
    total, parts = 0.0, {}
    if spec.with_teacher:
      d_C = divergence(zs_CxV, zt_CxV, spec.kind, tau)
      parts["d_C"] = d_C
      parts["kd_sum"] = tau**2 * masked_sum_and_count(d_C, keep_C)[0]
      total = total + w_kd * parts["kd_sum"]
    if spec.with_labels:
      parts["lse_C"] = jax.nn.logsumexp(zs_CxV, axis=-1)  # also the metrics' (below)
      parts["ce_sum"] = masked_sum_and_count(_nll(zs_CxV, labels_C, spec.vocab, parts["lse_C"]), keep_C)[0]
      # alpha == 1 (static): CE is reported, but not differentiated.
      if not (isinstance(w_ce, float) and w_ce == 0.0):
        total = total + w_ce * parts["ce_sum"]
    return total, parts

  def body(carry, k):
    dW_TxDsxV, dh_CxKxDs, sums = carry
    keep_C = column(keep_CxK, k)
    labels_C = column(labels_CxK, k) if spec.with_labels else None
    # Zero the masked rows' hidden states: a NaN in a padding row would otherwise reach dW through h^T @ dlogits even
    # with dlogits = 0 there.
    h_s_CxDs = jnp.where(keep_C[:, None], column(h_s_CxKxDs, k), 0)
    zs_CxV = _vocab_sharded(_matmul(h_s_CxDs, head_s_DsxV), shards)
    zt_CxV = None
    if spec.cached:
      zt_CxV = (column(h_t_CxKxDt, k), column(head_t_CxKxK, k))  # the stored top-k of the chunk's tokens
    elif spec.with_teacher:
      h_t_CxDt = jnp.where(keep_C[:, None], column(h_t_CxKxDt, k), 0)
      zt_CxV = _vocab_sharded(_matmul(h_t_CxDt, head_t_DtxV), shards)
      zt_CxV = _mask_columns(zt_CxV, spec.vocab)

    loss_fn = functools.partial(chunk_loss, zt_CxV=zt_CxV, labels_C=labels_C, keep_C=keep_C)
    if with_grad:
      (total, parts), dz_CxV = jax.value_and_grad(loss_fn, has_aux=True)(zs_CxV)
      # The cotangent goes into the matmuls in the inputs' dtype, as in the unfused backward pass; products are still
      # accumulated in float32.
      dz_CxV = _vocab_sharded(dz_CxV.astype(compute_dtype), shards)
      dh_CxDs = jax.lax.dot_general(dz_CxV, head_s_DsxV, (((1,), (1,)), ((), ())), preferred_element_type=f32)
      # [T, C/T, *]: one group of rows per token shard (T = 1 off a mesh).
      h_s_TxCxDs = h_s_CxDs.reshape(n_token_shards, c // n_token_shards, d_s)
      dz_TxCxV = dz_CxV.reshape(n_token_shards, c // n_token_shards, spec.width)
      dW_TxDsxV = dW_TxDsxV + _vocab_sharded(
          jax.lax.dot_general(h_s_TxCxDs, dz_TxCxV,
                              (((1,), (1,)), ((0,), (0,))), preferred_element_type=f32), shards, token_axes)
      dh_CxKxDs = jax.lax.dynamic_update_index_in_dim(dh_CxKxDs, dh_CxDs, k, axis=1)
    else:
      total, parts = loss_fn(zs_CxV)

    # Monitoring metrics: not differentiated.
    new = {"weighted": total}
    zs_cut_CxV = _mask_columns(zs_CxV, spec.vocab)
    pred_C = jnp.argmax(zs_cut_CxV, axis=-1)
    if spec.with_labels:
      new["ce_sum"] = parts["ce_sum"]
      correct_C = (pred_C == labels_C) & (labels_C >= 0) & (labels_C < spec.vocab)
      new["correct_sum"] = masked_sum_and_count(correct_C, keep_C)[0]
    if spec.with_teacher:
      new["kd_sum"] = parts["kd_sum"]
      if spec.cached:
        idx_CxK, lp_CxK = zt_CxV
        top1_C = jnp.take_along_axis(idx_CxK, jnp.argmax(lp_CxK, axis=-1)[:, None], axis=-1)[:, 0]
      else:
        top1_C = jnp.argmax(zt_CxV, axis=-1)
      new["agree_sum"] = masked_sum_and_count(pred_C == top1_C, keep_C)[0]
      static_tau = dict(spec.static_hparams).get("temperature")
      lse_t_C = None
      if spec.kind == "forward_kl" and static_tau == 1.0 and spec.teacher_top_k is None:
        kl1_C = parts["d_C"]
      elif spec.cached:  # over the stored top-k, as the loss sees the teacher
        kl1_C = divergence(zs_cut_CxV, zt_CxV, "forward_kl", 1.0)
      else:
        lse_s_C = parts["lse_C"] if spec.with_labels else jax.nn.logsumexp(zs_cut_CxV, axis=-1)
        kl1_C, lse_t_C = _kl1_and_teacher_lse(zs_cut_CxV, zt_CxV, lse_s_C)
      new["kl1_sum"] = masked_sum_and_count(kl1_C, keep_C)[0]
      if spec.with_labels and not spec.cached:  # the label's teacher log-prob is stored only if in the top-k
        new["teacher_ce_sum"] = masked_sum_and_count(_nll(zt_CxV, labels_C, spec.vocab, lse_t_C), keep_C)[0]
    sums = {name: sums[name] + value.astype(f32) for name, value in new.items()}
    return (dW_TxDsxV, dh_CxKxDs, sums), None

  names = ["weighted"]
  names += ["ce_sum", "correct_sum"] if spec.with_labels else []
  names += ["kd_sum", "agree_sum", "kl1_sum"] if spec.with_teacher else []
  names += ["teacher_ce_sum"] if spec.with_teacher and spec.with_labels and not spec.cached else []
  sums0 = {name: jnp.zeros((), f32) for name in names}
  dW0 = dh0 = None
  if with_grad:
    dW0 = _vocab_sharded(jnp.zeros((n_token_shards, d_s, spec.width), f32), shards, token_axes)
    dh0 = jnp.zeros((c, k_chunks, d_s), f32)
  (dW_TxDsxV, dh_CxKxDs, sums), _ = jax.lax.scan(body, (dW0, dh0, sums0), jnp.arange(k_chunks))

  weighted = sums.pop("weighted")
  aux = dict(sums)
  aux.setdefault("kd_sum", jnp.zeros((), f32))
  aux["count"] = jnp.sum(keep_N, dtype=f32)
  if not with_grad:
    return weighted, aux, None, None
  dh_NxDs = dh_CxKxDs.reshape(c * k_chunks, d_s)[:n]
  dW_DsxV = _vocab_sharded(jnp.sum(dW_TxDsxV, axis=0), shards)
  return weighted, aux, dh_NxDs, dW_DsxV


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_sums(spec, hp, h_s_NxDs, head_s_DsxV, h_t_NxDt, head_t_DtxV, labels_N, keep_N):
  weighted, aux, _, _ = _fused_scan(spec, hp, h_s_NxDs, head_s_DsxV, h_t_NxDt, head_t_DtxV, labels_N, keep_N,
                                    with_grad=False)
  return weighted, aux


def _fused_sums_fwd(spec, hp, h_s_NxDs, head_s_DsxV, h_t_NxDt, head_t_DtxV, labels_N, keep_N):
  weighted, aux, dh_NxDs, dW_DsxV = _fused_scan(spec, hp, h_s_NxDs, head_s_DsxV, h_t_NxDt, head_t_DtxV, labels_N,
                                                keep_N, with_grad=True)
  return (weighted, aux), (dh_NxDs, dW_DsxV)


def _fused_sums_bwd(spec, residuals, cotangents):
  dh_NxDs, dW_DsxV = residuals
  g = cotangents[0]  # aux has no gradient: its cotangents are ignored
  dh_NxDs = (g * dh_NxDs).astype(spec.hidden_dtype)
  dW_DsxV = (g * dW_DsxV).astype(spec.head_dtype)
  # None = zero cotangent: hyperparameters, the frozen teacher, labels, mask.
  return None, dh_NxDs, dW_DsxV, None, None, None, None


_fused_sums.defvjp(_fused_sums_fwd, _fused_sums_bwd)


# ----------------------------------------------------------------------------------------------------
# Checks and entry points.


def _check_hidden_and_head(hidden, head, who):
  if hidden.ndim != 2 or head.ndim != 2:
    raise ValueError(f"{who} hidden states must be [tokens, width] and the head [width, vocab], "
                     f"got {hidden.shape} and {head.shape}; flatten batch and sequence first "
                     "(h.reshape(-1, h.shape[-1])).")
  if hidden.shape[1] != head.shape[0]:
    raise ValueError(f"{who} hidden width {hidden.shape[1]} != head input dim {head.shape[0]}; "
                     "pass the head as [width, vocab] (the transpose of a tied embedding).")
  if not jnp.issubdtype(hidden.dtype, jnp.floating) or not jnp.issubdtype(head.dtype, jnp.floating):
    raise ValueError(f"{who} hidden states and head must be floating point, got {hidden.dtype} "
                     f"and {head.dtype}.")


def _fused(student_hidden, student_head, labels, mask, teacher_hidden, teacher_head, *, alpha, kind, temperature, beta,
           skew, vocab_size, teacher_top_k, chunk_size, chunk_budget=CHUNK_BUDGET_BYTES, teacher_indices=None,
           teacher_logprobs=None, missing="bucket"):
  """Validate, pick the static spec and call the custom-VJP core."""
  _check_mesh_axes()
  h_s_NxDs = jnp.asarray(student_hidden)
  head_s_DsxV = jnp.asarray(student_head)
  _check_hidden_and_head(h_s_NxDs, head_s_DsxV, "student")
  n, v_s = h_s_NxDs.shape[0], head_s_DsxV.shape[1]

  if (teacher_hidden is None) != (teacher_head is None):
    raise ValueError("pass both teacher_hidden and teacher_head (for KD) or neither (CE only).")
  cached = teacher_indices is not None or teacher_logprobs is not None
  if cached:
    if teacher_hidden is not None or teacher_indices is None or teacher_logprobs is None:
      raise ValueError("a cached teacher is its top-k: pass teacher_indices and teacher_logprobs (both [N, K]), "
                       "without teacher_hidden and teacher_head.")
    if missing not in MISSING_MASS:
      raise ValueError(f"missing={missing!r}: use one of {', '.join(MISSING_MASS)}")
    if teacher_top_k is not None:
      raise ValueError("teacher_top_k selects from a full teacher; a cached teacher is already its stored top-k.")
  with_teacher = (teacher_hidden is not None or cached) and _concrete(alpha) != 0.0
  with_labels = labels is not None
  h_t_NxDt = head_t_DtxV = None
  width, vocab = v_s, _one_vocab(v_s, vocab_size)
  if teacher_hidden is not None:
    h_t_NxDt, head_t_DtxV = jnp.asarray(teacher_hidden), jnp.asarray(teacher_head)
    _check_hidden_and_head(h_t_NxDt, head_t_DtxV, "teacher")
    if h_t_NxDt.shape[0] != n:
      raise ValueError(f"teacher has {h_t_NxDt.shape[0]} tokens but the student {n}; both "
                       "hidden states must be [tokens, width] over the same tokens.")
    v_t = head_t_DtxV.shape[1]
    vocab = _shared_vocab(v_s, v_t, vocab_size)
  if cached:
    h_t_NxDt, head_t_DtxV = jnp.asarray(teacher_indices), jnp.asarray(teacher_logprobs)  # [N, K] each
    if h_t_NxDt.ndim != 2 or h_t_NxDt.shape != head_t_DtxV.shape or h_t_NxDt.shape[0] != n:
      raise ValueError(f"teacher indices {h_t_NxDt.shape} and log-probs {head_t_DtxV.shape} must both be [N, K] "
                       f"over the student's {n} tokens.")
    if not jnp.issubdtype(h_t_NxDt.dtype, jnp.integer):
      raise ValueError(f"teacher indices must be integers, got {h_t_NxDt.dtype}.")
    _check_hparams(kind, temperature, beta, skew, None)
  if not with_teacher:
    h_t_NxDt = head_t_DtxV = None
  elif not cached:
    # Only the wider head is cut, once, to the common width (its gradient is zero-padded back by the slice's transpose);
    # beyond that, columns are masked per chunk (see _MASKED_LOGIT).
    width = min(v_s, v_t)
    if v_s > width:
      head_s_DsxV = head_s_DsxV[:, :width]
    if v_t > width:
      head_t_DtxV = head_t_DtxV[:, :width]
    _check_hparams(kind, temperature, beta, skew, teacher_top_k)
    if teacher_top_k is not None and teacher_top_k > vocab:
      raise ValueError(f"teacher_top_k={teacher_top_k} is larger than the vocab size {vocab}; "
                       "use a k <= vocab size (or None to keep the full teacher).")

  labels_N = None
  if with_labels:
    labels_N = jnp.asarray(labels)
    if labels_N.shape != (n,):
      raise ValueError(f"labels have shape {labels_N.shape} but there are {n} tokens; pass "
                       "one integer label per row of the hidden states.")
    if not jnp.issubdtype(labels_N.dtype, jnp.integer):
      raise ValueError(f"labels must be integers, got dtype {labels_N.dtype}.")
  mask_N = _check_mask(mask, (n,))
  keep_N = jnp.ones((n,), bool) if mask_N is None else mask_N.astype(bool)

  if chunk_size is None:
    chunk_size = chunk_for(width, chunk_budget)
  is_int = isinstance(chunk_size, numbers.Integral) and not isinstance(chunk_size, bool)
  if not is_int or chunk_size < 1:
    raise ValueError(
        f"chunk_size must be a positive int (or None: from chunk_budget), got {chunk_size!r}; it fixes the chunk "
        "shape, so it cannot be traced.")
  chunk = max(1, min(int(chunk_size), n))
  n_chunks = max(1, -(-n // chunk))

  values = dict(zip(_HPARAMS, (temperature, beta, skew, alpha)))
  static = tuple((k, _concrete(v)) for k, v in values.items() if _concrete(v) is not None)
  traced = {k: jnp.asarray(v, jnp.float32) for k, v in values.items() if _concrete(v) is None}
  spec = _FusedSpec(n_tokens=n, chunk=chunk, n_chunks=n_chunks, width=width, vocab=vocab, kind=kind,
                    teacher_top_k=teacher_top_k, with_teacher=with_teacher, cached=with_teacher and cached,
                    missing=missing, with_labels=with_labels,
                    hidden_dtype=np.dtype(h_s_NxDs.dtype), head_dtype=np.dtype(head_s_DsxV.dtype),
                    static_hparams=static)
  weighted, aux = _fused_sums(spec, traced, h_s_NxDs, head_s_DsxV, h_t_NxDt, head_t_DtxV, labels_N, keep_N)
  return weighted, jax.lax.stop_gradient(aux)


def fused_distill_sums(student_hidden, student_head, labels, mask=None, teacher_hidden=None, teacher_head=None, *,
                       alpha, kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                       vocab_size: Optional[int] = None, teacher_top_k: Optional[int] = None,
                       chunk_size: Optional[int] = None, chunk_budget: int = CHUNK_BUDGET_BYTES,
                       teacher_indices=None, teacher_logprobs=None, missing: str = "bucket"):
  """KD + CE loss *sums* from hidden states, never building [N, V] logits.

  `weighted_sum = alpha * tau^2 * sum_masked D + (1 - alpha) * sum_masked CE` with D the per-token divergence of
  `kd_loss` (same kinds, temperature, beta, skew, vocab cut and teacher top-k) between `softmax(h_S @ W_S / tau)` and
  the teacher's, and CE the student's cross entropy at temperature 1 (as `cross_entropy_loss`). Sums, not means: divide
  by the number of real tokens across micro-batches yourself.

  The tokens are processed `chunk_size` at a time; each chunk's logits, loss and gradient are formed and dropped in the
  forward pass, and the backward pass only scales the saved d(hidden) [N, Ds] and d(head) [Ds, Vs]. Matmuls accumulate
  in float32 and all softmax math is float32, whatever the inputs' dtype. Under a mesh whose vocab axis (`act_vocab` in
  `jaxkd.sharding.LOGICAL_RULES`) is Auto, the chunk logits stay split over the vocabulary (heads sharded
  `P(None, <vocab axis>)`).

  Args:
    student_hidden: `[N, Ds]` final (normed) hidden states, any float dtype.
    student_head: `[Ds, Vs]` output projection.
    labels: int `[N]` next-token ids; out-of-range ids (e.g. -100) are fine on masked-out tokens, and make the sums NaN
      on kept ones, as in `cross_entropy_loss`.
    mask: `[N]` bool/0-1, or None for all tokens.
    teacher_hidden, teacher_head: `[N, Dt]` and `[Dt, Vt]`, or both None. The teacher gets zero gradients (it is
      frozen).
    teacher_indices, teacher_logprobs: instead of those, a teacher known by its stored top-k, int and float `[N, K]`
      (log-probs at temperature 1); the divergence is `losses.sparse_divergence`'s, `missing` says how the rest of
      the vocabulary counts (`losses.MISSING_MASS`). `teacher_ce_sum` is then not reported.
    alpha: KD weight. Without a teacher, or with `alpha == 0` as a Python number, no teacher math is done at all and
      `weighted_sum` is the CE sum (alpha is then ignored).
    kind, temperature, beta, skew, vocab_size, teacher_top_k: as `kd_loss`. Python numbers or traced scalars; no
      gradient flows to them.
    chunk_size: tokens per chunk (static). Temporary memory grows with chunk_size * V (about 6 float32 [chunk, V] arrays
      plus d(head) [Ds, V] in float32), matmul efficiency too (scripts/bench_loss_memory.py). Under a mesh the chunk's
      rows are split over the token axes, so each device works on chunk_size / (their size) rows. None: `chunk_for`
      the heads' width and `chunk_budget` bytes, so that the chunk's temporaries stay near that size on each device
      whatever the vocabulary and the token count.

  Returns:
    `(weighted_sum, aux)`: a float32 scalar, differentiable in the student's hidden states and head, and a dict of
    float32 scalars without gradient: `kd_sum` (tau^2 sum D, 0 without teacher math), `ce_sum`, `count` (masked tokens),
    `correct_sum` (student argmax == label) and, with teacher math, `teacher_ce_sum` (teacher CE on the labels),
    `agree_sum` (same top-1 token) and `kl1_sum` (KL(p_T || p_S) at temperature 1 over the full cut vocabulary, whatever
    kind/top-k).
  """
  if labels is None:
    raise ValueError("fused_distill_sums needs labels for its CE term; for KD alone use fused_kd_loss.")
  return _fused(student_hidden, student_head, labels, mask, teacher_hidden, teacher_head, alpha=alpha, kind=kind,
                temperature=temperature, beta=beta, skew=skew, vocab_size=vocab_size, teacher_top_k=teacher_top_k,
                chunk_size=chunk_size, chunk_budget=chunk_budget, teacher_indices=teacher_indices,
                teacher_logprobs=teacher_logprobs, missing=missing)


def fused_kd_loss(student_hidden, student_head, teacher_hidden, teacher_head, mask=None, *, kind: str = "forward_kl",
                  temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1, vocab_size: Optional[int] = None,
                  teacher_top_k: Optional[int] = None, chunk_size: Optional[int] = None):
  """`kd_loss(student_hidden @ student_head, teacher_hidden @ teacher_head, mask, ...)` computed chunk by chunk,
  without [N, V] logits (see `fused_distill_sums`).

  Returns a float32 scalar, differentiable in the student's hidden states and head; the teacher gets zero gradients.
  """
  if teacher_hidden is None or teacher_head is None:
    raise ValueError("fused_kd_loss needs teacher_hidden and teacher_head.")
  weighted, aux = _fused(student_hidden, student_head, None, mask, teacher_hidden, teacher_head, alpha=1.0, kind=kind,
                         temperature=temperature, beta=beta, skew=skew, vocab_size=vocab_size,
                         teacher_top_k=teacher_top_k, chunk_size=chunk_size)
  return weighted / jnp.maximum(aux["count"], 1.0)


def fused_cross_entropy_loss(hidden, head, labels, mask=None, *, vocab_size: Optional[int] = None,
                             chunk_size: Optional[int] = None):
  """`cross_entropy_loss(hidden @ head, labels, mask, vocab_size=...)` computed chunk by chunk, without [N, V] logits
  (see `fused_distill_sums`)."""
  weighted, aux = fused_distill_sums(hidden, head, labels, mask, alpha=0.0, vocab_size=vocab_size,
                                     chunk_size=chunk_size)
  return weighted / jnp.maximum(aux["count"], 1.0)
