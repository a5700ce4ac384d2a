"""Token-level losses for knowledge distillation: KD divergences, CE, accuracy.

Every loss here works on logits of shape ``[..., V]`` (any leading dims, e.g.
``[B, T, V]`` or ``[N, V]``) with an optional mask of the leading shape, and
returns a float32 scalar averaged over the masked tokens.

The math is always done in float32, whatever the input dtype: bf16 logits are
upcast before the softmax, because bf16 log-probabilities lose too much
precision for a KL between two close distributions.

``per_token_divergence`` is the building block; ``kd_loss`` is just
"divergence per token, then masked mean, times tau^2". A fused/chunked
implementation over the vocabulary or the sequence can reuse
``per_token_divergence`` and ``masked_sum_and_count`` per chunk and divide once
at the end, giving the same number as ``kd_loss``.

``fused_distill_sums`` (and ``fused_kd_loss``, ``fused_cross_entropy_loss``)
does exactly that from hidden states and output heads: chunk by chunk over the
tokens, with the gradient formed inside each chunk, so the full ``[N, V]``
logits of the student and the teacher never exist.
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

KD_KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl")

# ---------------------------------------------------------------------------
# Argument checks and shared preprocessing
# ---------------------------------------------------------------------------


def _concrete(x):
  """Return x as a Python float, or None when it is traced (not checkable)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return float(x)


def _check_hparams(kind, temperature, beta, skew, teacher_top_k):
  if kind not in KD_KINDS:
    raise ValueError(f"Unknown KD loss kind {kind!r}; valid kinds are {', '.join(KD_KINDS)}.")
  tau = _concrete(temperature)
  if tau is not None and not tau > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}; use 1.0 for plain softmax.")
  if kind == "jsd":
    b = _concrete(beta)
    if b is not None and not 0.0 < b < 1.0:
      raise ValueError(f"jsd needs 0 < beta < 1, got beta={beta!r}; at 0 or 1 the mixture "
                       "equals one of the two distributions and the JSD is identically 0.")
  if kind == "skew_kl":
    s = _concrete(skew)
    if s is not None and not 0.0 <= s < 1.0:
      raise ValueError(f"skew_kl needs 0 <= skew < 1, got skew={skew!r}; skew=1 makes the "
                       "mixture equal to the teacher and the loss identically 0.")
  if teacher_top_k is not None:
    if kind == "reverse_kl":
      raise ValueError("teacher_top_k cannot be used with kind='reverse_kl': the truncated "
                       "teacher has zero probability where the student has mass, so "
                       "KL(p_S || p_T) is +inf. Use forward_kl, jsd, tvd or skew_kl with "
                       "top-k, or drop teacher_top_k.")
    is_int = isinstance(teacher_top_k, numbers.Integral)
    if isinstance(teacher_top_k, bool) or not is_int:
      raise ValueError(f"teacher_top_k must be an int or None, got {teacher_top_k!r}; it "
                       "fixes the shape of the top-k selection, so it cannot be traced.")
    if teacher_top_k < 1:
      raise ValueError(f"teacher_top_k must be >= 1, got {teacher_top_k}.")


def _shared_vocab(v_a, v_b, vocab_size, names=("student", "teacher")):
  """The vocabulary both models are compared on; refuse mismatched vocab dims.

  Models often pad their embedding matrix past the tokenizer's vocabulary
  (Qwen2-7B has 152064 rows, Qwen2-1.5B 151936). The padded rows are not
  tokens; keeping them would give them probability mass that the other model
  cannot match, and zero-filling the shorter model would invent logits of 0,
  i.e. real probability mass. So we only ever cut, never pad.
  """
  if vocab_size is None:
    if v_a != v_b:
      raise ValueError(f"{names[0]} vocab dim {v_a} != {names[1]} vocab dim {v_b}. The "
                       "larger one is probably a padded embedding; pass vocab_size=<the "
                       "tokenizer's vocab size> so both are cut to the real vocabulary.")
    return v_a
  vocab_size = int(vocab_size)
  if vocab_size < 1:
    raise ValueError(f"vocab_size must be >= 1, got {vocab_size}.")
  if vocab_size > min(v_a, v_b):
    raise ValueError(f"vocab_size={vocab_size} is larger than the logits' vocab dims "
                     f"({names[0]} {v_a}, {names[1]} {v_b}); it must be <= both. Pass the "
                     "tokenizer's vocab size, not the padded embedding size.")
  return vocab_size


def _cut_vocab(logits_a, logits_b, vocab_size, names=("student", "teacher")):
  """Cut both logits to the real vocabulary (see ``_shared_vocab``)."""
  vocab = _shared_vocab(logits_a.shape[-1], logits_b.shape[-1], vocab_size, names)
  if vocab_size is None:
    return logits_a, logits_b
  return logits_a[..., :vocab], logits_b[..., :vocab]


def _one_vocab(width, vocab_size):
  """The vocabulary of a single model's logits of vocab dim ``width``."""
  if vocab_size is None:
    return width
  vocab_size = int(vocab_size)
  if not 1 <= vocab_size <= width:
    raise ValueError(
        f"vocab_size={vocab_size} must be in [1, {width}] (the logits' vocab dim); pass the tokenizer's vocab size.")
  return vocab_size


def _cut_one(logits_xV, vocab_size):
  if vocab_size is None:
    return logits_xV
  return logits_xV[..., :_one_vocab(logits_xV.shape[-1], vocab_size)]


def _check_mask(mask, leading_shape):
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.shape != tuple(leading_shape):
    raise ValueError(f"mask has shape {mask.shape} but the logits' leading shape is "
                     f"{tuple(leading_shape)}; the mask needs one entry per token "
                     "(logits.shape[:-1]).")
  return mask


def masked_sum_and_count(values_x, mask_x=None):
  """Return (sum of values over masked entries, number of masked entries).

  Both are float32 scalars. Masked-out entries are removed with ``where``
  rather than multiplied by 0, so a NaN/inf in a padding row cannot leak in.
  Chunked implementations add these up across chunks and divide once.
  """
  values_x = values_x.astype(jnp.float32)
  if mask_x is None:
    return jnp.sum(values_x), jnp.float32(values_x.size)
  keep_x = jnp.asarray(mask_x).astype(bool)
  total = jnp.sum(jnp.where(keep_x, values_x, 0.0))
  count = jnp.sum(keep_x, dtype=jnp.float32)
  return total, count


def _masked_mean(values_x, mask_x):
  total, count = masked_sum_and_count(values_x, mask_x)
  # max(1, count): an all-masked batch gives 0 instead of 0/0 = NaN.
  return total / jnp.maximum(count, 1.0)


# ---------------------------------------------------------------------------
# KD divergences
# ---------------------------------------------------------------------------


def _kth_largest(x_xV, k, vocab_split=None):
  """Value and index of the k-th entry of ``lax.top_k(x_xV, k)`` along the last dim.

  vocab_split = (S, token_axes) says x_xV is [C, V] with V split S ways over
  the "tensor" mesh axis (and C over token_axes). The selection is then done
  shard by shard: each shard's own top-k, gathered ([C, S*k], not [C, V]), and
  the top-k of those candidates. This is exact: an entry of the global top-k
  is in its shard's top-k, and both stages break ties towards the lower index
  as ``lax.top_k`` does (the candidates are laid out shard by shard). A plain
  ``lax.top_k`` on the split array would make XLA gather whole rows.
  """
  if vocab_split is None:
    val_xK, idx_xK = jax.lax.top_k(x_xV, k)
    return val_xK[..., k - 1], idx_xK[..., k - 1]
  shards, token_axes = vocab_split
  per_shard = x_xV.shape[-1] // shards

  def local(x_cxVs):
    val_cxK, idx_cxK = jax.lax.top_k(x_cxVs, min(k, per_shard))
    idx_cxK = idx_cxK + per_shard * jax.lax.axis_index("tensor")
    val_cxM = jax.lax.all_gather(val_cxK, "tensor", axis=1, tiled=True)
    idx_cxM = jax.lax.all_gather(idx_cxK, "tensor", axis=1, tiled=True)
    val_cxK, pos_cxK = jax.lax.top_k(val_cxM, k)
    idx_cxK = jnp.take_along_axis(idx_cxM, pos_cxK, axis=1)
    return val_cxK[:, k - 1], idx_cxK[:, k - 1]

  rows = token_axes or None
  return jax.shard_map(
      local,
      in_specs=P(rows, "tensor"),
      out_specs=(P(rows), P(rows)),
      axis_names={"tensor", *token_axes},
      # After the all_gather every tensor shard holds the same candidates and
      # picks the same k-th one; the checker cannot see that.
      check_vma=False)(x_xV)


def _teacher_log_probs(teacher_xV, tau, teacher_top_k, vocab_split=None):
  """Teacher log-probs at temperature tau, and where the teacher has support.

  With top-k, the teacher keeps its k largest logits and is renormalised over
  them; the rest get log-prob -inf (probability exactly 0). Later code either
  exponentiates them (exp(-inf) = 0, with a 0 derivative) or goes through the
  "double where" in ``_kl_from_logs``, so the -inf never produces a NaN value
  or gradient. ``support`` is None when every token is kept.
  """
  if teacher_top_k is None:
    logp_t_xV = jax.nn.log_softmax(teacher_xV / tau, axis=-1)
    return logp_t_xV, None
  vocab = teacher_xV.shape[-1]
  if teacher_top_k > vocab:
    raise ValueError(f"teacher_top_k={teacher_top_k} is larger than the vocab size {vocab}; "
                     "use a k <= vocab size (or None to keep the full teacher).")
  # Select on the undivided logits: dividing by tau > 0 keeps the order, and
  # rounding after the division could only create extra ties.
  # The top-k set is rebuilt from its last member (value v_k, index i_k):
  # everything above v_k, and the ties at v_k up to index i_k, since top_k
  # takes tied entries lowest index first. Unlike scattering the k indices,
  # this is elementwise, so it stays local to each shard of a split vocab.
  kth_x, kth_idx_x = _kth_largest(jax.lax.stop_gradient(teacher_xV), teacher_top_k, vocab_split)
  kth_x1, kth_idx_x1 = kth_x[..., None], kth_idx_x[..., None]
  cols_V = jnp.arange(vocab, dtype=kth_idx_x.dtype)
  support_xV = (teacher_xV > kth_x1) | ((teacher_xV == kth_x1) & (cols_V <= kth_idx_x1))
  logits_xV = jnp.where(support_xV, teacher_xV / tau, -jnp.inf)
  logp_t_xV = jax.nn.log_softmax(logits_xV, axis=-1)
  return logp_t_xV, support_xV


def _kl_from_logs(logp_xV, logq_xV, support_xV=None):
  """sum_v p (log p - log q), with 0 log 0 = 0 off p's support.

  Off the support log p = -inf. Masking only the product is not enough: its
  backward pass still forms 0 * (-inf) = NaN for d/dp. So log p is first
  replaced by a harmless 0 there ("double where"), and the product masked.
  Without a `support_xV` (teacher top-k), p's support is where log p is
  finite: logits given as -inf (masked vocabulary columns) are off it.
  """
  if support_xV is None:
    support_xV = jnp.isfinite(logp_xV)
  safe_logp_xV = jnp.where(support_xV, logp_xV, 0.0)
  term_xV = jnp.exp(safe_logp_xV) * (safe_logp_xV - logq_xV)
  return jnp.sum(jnp.where(support_xV, term_xV, 0.0), axis=-1)


def _log_mixture(weight_t, logp_t_xV, logp_s_xV):
  """log(w p_T + (1 - w) p_S), computed in log space (no underflow to log 0)."""
  if _concrete(weight_t) == 0.0:
    # log(0) = -inf would work in the forward pass, but skew=0 is just the
    # plain forward KL, so skip the mixture altogether.
    return logp_s_xV
  a_xV, b_xV = jnp.log(weight_t) + logp_t_xV, jnp.log1p(-weight_t) + logp_s_xV
  # A column off both supports (-inf in both: a masked vocabulary column) stays -inf; logaddexp's gradient
  # there is NaN, so it gets harmless inputs first (the "double where" of _kl_from_logs).
  off_xV = jnp.isneginf(a_xV) & jnp.isneginf(b_xV)
  mixed_xV = jnp.logaddexp(jnp.where(off_xV, 0.0, a_xV), jnp.where(off_xV, 0.0, b_xV))
  return jnp.where(off_xV, -jnp.inf, mixed_xV)


def per_token_divergence(student_logits, teacher_logits, *, kind: str = "forward_kl", temperature: float = 1.0,
                         beta: float = 0.5, skew: float = 0.1, teacher_top_k: Optional[int] = None,
                         vocab_size: Optional[int] = None):
  """Divergence between teacher and student distributions, one per token.

  Args:
    student_logits, teacher_logits: ``[..., V]`` arrays, same leading shape.
    kind: one of ``KD_KINDS``; see ``kd_loss``.
    temperature, beta, skew, teacher_top_k, vocab_size: as in ``kd_loss``.

  Returns:
    float32 array of shape ``[...]`` (the leading shape). No tau^2 factor and
    no masking -- ``kd_loss`` adds both.
  """
  _check_hparams(kind, temperature, beta, skew, teacher_top_k)
  if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
    raise ValueError(f"student logits {student_logits.shape} and teacher logits "
                     f"{teacher_logits.shape} must have the same leading (token) shape.")
  student_xV, teacher_xV = _cut_vocab(student_logits, teacher_logits, vocab_size)
  return _divergence(student_xV, teacher_xV, kind=kind, temperature=temperature, beta=beta, skew=skew,
                     teacher_top_k=teacher_top_k)


def _divergence(student_xV, teacher_xV, *, kind, temperature, beta, skew, teacher_top_k, vocab_split=None):
  """``per_token_divergence`` on checked, already cut logits.

  vocab_split: see ``_kth_largest``; it only changes how the teacher's top-k
  is selected when the vocab dim is split over the "tensor" mesh axis.
  """
  student_xV = student_xV.astype(jnp.float32)
  teacher_xV = teacher_xV.astype(jnp.float32)

  logp_s_xV = jax.nn.log_softmax(student_xV / temperature, axis=-1)
  logp_t_xV, support_xV = _teacher_log_probs(teacher_xV, temperature, teacher_top_k, vocab_split)

  if kind == "forward_kl":
    return _kl_from_logs(logp_t_xV, logp_s_xV, support_xV)
  if kind == "reverse_kl":
    # top-k was rejected above, so logp_t is finite everywhere.
    return _kl_from_logs(logp_s_xV, logp_t_xV)
  if kind == "tvd":
    p_t_xV = jnp.exp(logp_t_xV)  # exp(-inf) = 0 off the top-k support.
    return 0.5 * jnp.sum(jnp.abs(p_t_xV - jnp.exp(logp_s_xV)), axis=-1)
  if kind == "jsd":
    logm_xV = _log_mixture(beta, logp_t_xV, logp_s_xV)
    kl_t = _kl_from_logs(logp_t_xV, logm_xV, support_xV)
    kl_s = _kl_from_logs(logp_s_xV, logm_xV)
    return beta * kl_t + (1.0 - beta) * kl_s
  # skew_kl
  logm_xV = _log_mixture(skew, logp_t_xV, logp_s_xV)
  return _kl_from_logs(logp_t_xV, logm_xV, support_xV)


def kd_loss(student_logits, teacher_logits, mask=None, *, kind: str = "forward_kl", temperature: float = 1.0,
            beta: float = 0.5, skew: float = 0.1, vocab_size: Optional[int] = None,
            teacher_top_k: Optional[int] = None):
  """Masked-mean distillation loss, scaled by temperature^2.

  ``p_T = softmax(z_T / tau)``, ``p_S = softmax(z_S / tau)`` (in float32), and
  per token:

  * ``forward_kl``: KL(p_T || p_S)
  * ``reverse_kl``: KL(p_S || p_T)
  * ``jsd``: beta KL(p_T || m) + (1 - beta) KL(p_S || m),
    m = beta p_T + (1 - beta) p_S, with 0 < beta < 1
  * ``tvd``: 1/2 sum |p_T - p_S|
  * ``skew_kl``: KL(p_T || skew p_T + (1 - skew) p_S), with 0 <= skew < 1

  The result is ``tau^2 * sum_masked D / max(1, n_masked)``; the tau^2 keeps
  gradient magnitudes comparable across temperatures (Hinton et al., 2015).

  Args:
    student_logits, teacher_logits: ``[..., V]`` logits, any float dtype.
    mask: bool/0-1 array of the leading shape, or None for all tokens.
    vocab_size: cut both logits to their first ``vocab_size`` entries before
      the softmax. Required when the two vocab dims differ (padded
      embeddings); must be <= both dims.
    teacher_top_k: keep the teacher's k most likely tokens, renormalised;
      the student stays normalised over the whole (cut) vocabulary. Not
      allowed with ``reverse_kl`` (the divergence would be +inf).

  Returns:
    float32 scalar. Differentiable in both logits; stop the teacher's
    gradient yourself if it is not frozen by other means.
  """
  d_x = per_token_divergence(student_logits, teacher_logits, kind=kind, temperature=temperature, beta=beta, skew=skew,
                             teacher_top_k=teacher_top_k, vocab_size=vocab_size)
  mask_x = _check_mask(mask, d_x.shape)
  return (temperature**2) * _masked_mean(d_x, mask_x)


# ---------------------------------------------------------------------------
# Supervised (hard-label) losses
# ---------------------------------------------------------------------------


def _label_logits(logits_xV, labels_x):
  """Gather logits at the labels; also whether each label is in [0, V)."""
  vocab = logits_xV.shape[-1]
  labels_x = jnp.asarray(labels_x)
  if labels_x.shape != logits_xV.shape[:-1]:
    raise ValueError(f"labels have shape {labels_x.shape} but logits have leading shape "
                     f"{logits_xV.shape[:-1]}; pass one integer label per token.")
  if not jnp.issubdtype(labels_x.dtype, jnp.integer):
    raise ValueError(f"labels must be integers, got dtype {labels_x.dtype}.")
  valid_x = (labels_x >= 0) & (labels_x < vocab)
  # Select with a one-hot compare instead of a gather: under jit XLA fuses it
  # into the reduction (no [..., V] one-hot is materialised), its backward is
  # a cheap select rather than a scatter, and an out-of-range label such as
  # the ignore index -100 simply matches nothing.
  vocab_ids_V = jnp.arange(vocab, dtype=labels_x.dtype)
  hit_xV = vocab_ids_V == labels_x[..., None]
  picked_x = jnp.sum(jnp.where(hit_xV, logits_xV, 0.0), axis=-1)
  return picked_x, valid_x


def cross_entropy_loss(logits, labels, mask=None, *, vocab_size: Optional[int] = None):
  """Mean over masked tokens of -log softmax(logits)[label], in float32.

  Labels outside ``[0, vocab)`` (e.g. an ignore index of -100) are fine on
  masked-out tokens; on unmasked tokens they make the loss NaN, on purpose,
  because the label cannot be checked inside ``jit`` and a silent wrong
  number would be worse.
  """
  logits_xV = _cut_one(logits, vocab_size).astype(jnp.float32)
  mask_x = _check_mask(mask, logits_xV.shape[:-1])
  picked_x, valid_x = _label_logits(logits_xV, labels)
  nll_x = jax.nn.logsumexp(logits_xV, axis=-1) - picked_x
  nll_x = jnp.where(valid_x, nll_x, jnp.nan)
  return _masked_mean(nll_x, mask_x)


def token_accuracy(logits, labels, mask=None, *, vocab_size: Optional[int] = None):
  """Fraction of masked tokens whose argmax over the (cut) vocab is the label.

  Invalid labels simply count as wrong. Returns a float32 scalar (0 when no
  token is masked in).
  """
  logits_xV = _cut_one(logits, vocab_size)
  mask_x = _check_mask(mask, logits_xV.shape[:-1])
  _, valid_x = _label_logits(logits_xV, labels)
  pred_x = jnp.argmax(logits_xV, axis=-1)
  correct_x = (pred_x == jnp.asarray(labels)) & valid_x
  return _masked_mean(correct_x.astype(jnp.float32), mask_x)


# ---------------------------------------------------------------------------
# Fused (chunked) KD + CE from hidden states
# ---------------------------------------------------------------------------
#
# The loss of a model with a 152k vocabulary is dominated by its logits: at
# 8,192 tokens one [N, V] float32 array is 5 GB, and the unfused loss and its
# gradient hold several (student and teacher logits, log-probs, the logits'
# cotangent). The fused loss walks over the tokens in chunks of C, and for each
# chunk forms the student and teacher logits [C, V], the loss, and at once its
# gradient with respect to the student logits; it then folds that gradient into
# d(hidden) [N, Ds] and d(head) [Ds, V] and drops the chunk. Only those two
# gradients are kept for the backward pass (a custom VJP), which just scales them
# by the incoming cotangent: nothing is recomputed, neither the teacher's logits
# nor the student's.
#
# The per-chunk math is `per_token_divergence`'s own body (`_divergence`) and
# the label pick of `cross_entropy_loss`, differentiated with
# `jax.value_and_grad` on the chunk's logits inside the loop, so the fused loss
# has no second copy of the divergence formulas that could drift from `kd_loss`.

# Logit given to head columns at or past vocab_size. The chunk keeps the head's
# full width and masks rather than slicing, because slicing a vocab-sharded
# array to a width the tensor axis does not divide (151646 = 2 x 75823) would
# reshard every chunk. exp(-1e30 - max) is exactly 0 in float32, so a masked
# column adds nothing to any softmax sum; unlike -inf the value stays finite, so
# the p * (log p - log q) terms and their gradients never form 0 * inf.
_MASKED_LOGIT = -1e30

# Hyperparameters that may be traced; the concrete ones are kept static (so
# that e.g. skew=0 and alpha=0 still take their exact special paths).
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
  with_labels: bool  # CE term and accuracy
  hidden_dtype: np.dtype
  head_dtype: np.dtype
  static_hparams: tuple  # ((name, Python float), ...) for the concrete ones

  def hparam(self, name, traced_hparams):
    static = dict(self.static_hparams)
    return static[name] if name in static else traced_hparams[name]


def _auto_mesh_axes():
  """{axis name: size} of the active mesh's Auto axes of size > 1 ({} if none).

  Under Auto axes GSPMD partitions the loss by itself (combining log-sum-exps
  and reductions across vocab shards); the constraints below only tell it
  which layout to keep. Explicit axes (of size > 1) are refused by
  `_check_mesh_axes`; under Manual ones (inside shard_map) each shard's loss
  is computed locally.
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


def _tensor_shards(width):
  """How many ways the vocab dim (of size width) is split over "tensor"."""
  size = _auto_mesh_axes().get("tensor", 1)
  return size if width % size == 0 else 1


def _token_axes(chunk):
  """The non-tensor mesh axes (and their total size) that split a chunk's tokens.

  Tokens are normally sharded over the data axes. Each token shard keeps its
  own partial d(head) across the loop and they are summed once at the end;
  accumulating into one replicated d(head) would all-reduce a [Ds, V] array on
  every chunk.
  """
  axes = {name: size for name, size in _auto_mesh_axes().items() if name != "tensor"}
  size = int(np.prod(list(axes.values()), dtype=np.int64))
  if size == 1 or chunk % size:
    return (), 1
  return tuple(axes), size


def _vocab_sharded(x_xV, shards, lead_axes=()):
  """Keep the last (vocab) dim split over "tensor" (and dim 0 over lead_axes)."""
  if shards == 1 and not lead_axes:
    return x_xV
  rest = [P.UNCONSTRAINED] * (x_xV.ndim - 1 - bool(lead_axes))
  spec = P(*([lead_axes] if lead_axes else []), *rest, "tensor" if shards > 1 else None)
  return jax.lax.with_sharding_constraint(x_xV, spec)


def _mask_columns(logits_CxV, vocab):
  if vocab == logits_CxV.shape[-1]:
    return logits_CxV
  col_ok_V = jnp.arange(logits_CxV.shape[-1]) < vocab
  return jnp.where(col_ok_V, logits_CxV, _MASKED_LOGIT)


def _nll(logits_CxV, labels_C, vocab):
  """Per-token -log softmax[label], NaN on labels outside [0, vocab) like CE."""
  picked_C, valid_C = _label_logits(logits_CxV, labels_C)
  valid_C = valid_C & (labels_C < vocab)
  nll_C = jax.nn.logsumexp(logits_CxV, axis=-1) - picked_C
  return jnp.where(valid_C, nll_C, jnp.nan)


def _matmul(a_CxD, b_DxV):
  return jnp.dot(a_CxD, b_DxV, preferred_element_type=jnp.float32)


def _fused_scan(spec, hp, h_s_NxDs, head_s_DsxV, h_t_NxDt, head_t_DtxV, labels_N, keep_N, with_grad):
  """Loss sums (and with_grad, their gradients) over all chunks of tokens.

  Returns (weighted_sum, aux, dh_NxDs, dW_DsxV); the gradients are None
  without with_grad.
  """
  f32 = jnp.float32
  n, c, k_chunks = spec.n_tokens, spec.chunk, spec.n_chunks
  tau = spec.hparam("temperature", hp)
  d_s = h_s_NxDs.shape[1]
  shards = _tensor_shards(spec.width)
  token_axes, n_token_shards = _token_axes(c)
  compute_dtype = jnp.result_type(h_s_NxDs.dtype, head_s_DsxV.dtype)
  if spec.with_teacher:
    alpha = spec.hparam("alpha", hp)
    w_kd, w_ce = alpha, 1.0 - alpha
  else:
    w_kd, w_ce = 0.0, 1.0

  def strided(x_Nx):
    # [N, ...] -> [C, K, ...]: chunk k holds tokens k, K + k, 2K + k, ...
    # Strided rather than contiguous so that tokens sharded over the data
    # axes stay sharded along C inside every chunk; a contiguous split would
    # put that sharding on K, the dim the loop walks over.
    x_Nx = jnp.pad(x_Nx, [(0, c * k_chunks - n)] + [(0, 0)] * (x_Nx.ndim - 1))
    return x_Nx.reshape((c, k_chunks) + x_Nx.shape[1:])

  h_s_CxKxDs = strided(h_s_NxDs)
  keep_CxK = strided(keep_N)  # the padding rows are False
  labels_CxK = strided(labels_N) if spec.with_labels else None
  h_t_CxKxDt = strided(h_t_NxDt) if spec.with_teacher else None

  def column(x_CxKx, k):
    return jax.lax.dynamic_index_in_dim(x_CxKx, k, axis=1, keepdims=False)

  def chunk_loss(zs_CxV, zt_CxV, labels_C, keep_C):
    """Weighted loss sum of one chunk, as a function of the student logits."""
    zs_CxV = _mask_columns(zs_CxV, spec.vocab)
    total, parts = 0.0, {}
    if spec.with_teacher:
      d_C = _divergence(zs_CxV, zt_CxV, kind=spec.kind, temperature=tau, beta=spec.hparam("beta", hp),
                        skew=spec.hparam("skew", hp), teacher_top_k=spec.teacher_top_k,
                        vocab_split=(shards, token_axes) if shards > 1 else None)
      parts["d_C"] = d_C
      parts["kd_sum"] = tau**2 * masked_sum_and_count(d_C, keep_C)[0]
      total = total + w_kd * parts["kd_sum"]
    if spec.with_labels:
      parts["ce_sum"] = masked_sum_and_count(_nll(zs_CxV, labels_C, spec.vocab), keep_C)[0]
      # alpha == 1 (static): CE is reported, but not differentiated.
      if not (isinstance(w_ce, float) and w_ce == 0.0):
        total = total + w_ce * parts["ce_sum"]
    return total, parts

  def body(carry, k):
    dW_TxDsxV, dh_CxKxDs, sums = carry
    keep_C = column(keep_CxK, k)
    labels_C = column(labels_CxK, k) if spec.with_labels else None
    # Zero the masked rows' hidden states: a NaN in a padding row would
    # otherwise reach dW through h^T @ dlogits even with dlogits = 0 there.
    h_s_CxDs = jnp.where(keep_C[:, None], column(h_s_CxKxDs, k), 0)
    zs_CxV = _vocab_sharded(_matmul(h_s_CxDs, head_s_DsxV), shards)
    zt_CxV = None
    if spec.with_teacher:
      h_t_CxDt = jnp.where(keep_C[:, None], column(h_t_CxKxDt, k), 0)
      zt_CxV = _vocab_sharded(_matmul(h_t_CxDt, head_t_DtxV), shards)
      zt_CxV = _mask_columns(zt_CxV, spec.vocab)

    loss_fn = functools.partial(chunk_loss, zt_CxV=zt_CxV, labels_C=labels_C, keep_C=keep_C)
    if with_grad:
      (total, parts), dz_CxV = jax.value_and_grad(loss_fn, has_aux=True)(zs_CxV)
      # The cotangent goes into the matmuls in the inputs' dtype, as in the
      # unfused backward pass; products are still accumulated in float32.
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
      new["agree_sum"] = masked_sum_and_count(pred_C == jnp.argmax(zt_CxV, axis=-1), keep_C)[0]
      static_tau = dict(spec.static_hparams).get("temperature")
      if spec.kind == "forward_kl" and static_tau == 1.0 and spec.teacher_top_k is None:
        kl1_C = parts["d_C"]
      else:
        kl1_C = _divergence(zs_cut_CxV, zt_CxV, kind="forward_kl", temperature=1.0, beta=None, skew=None,
                            teacher_top_k=None)
      new["kl1_sum"] = masked_sum_and_count(kl1_C, keep_C)[0]
      if spec.with_labels:
        new["teacher_ce_sum"] = masked_sum_and_count(_nll(zt_CxV, labels_C, spec.vocab), keep_C)[0]
    sums = {name: sums[name] + value.astype(f32) for name, value in new.items()}
    return (dW_TxDsxV, dh_CxKxDs, sums), None

  names = ["weighted"]
  names += ["ce_sum", "correct_sum"] if spec.with_labels else []
  names += ["kd_sum", "agree_sum", "kl1_sum"] if spec.with_teacher else []
  names += ["teacher_ce_sum"] if spec.with_teacher and spec.with_labels else []
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
           skew, vocab_size, teacher_top_k, chunk_size):
  """Validate, pick the static spec and call the custom-VJP core."""
  _check_mesh_axes()
  h_s_NxDs = jnp.asarray(student_hidden)
  head_s_DsxV = jnp.asarray(student_head)
  _check_hidden_and_head(h_s_NxDs, head_s_DsxV, "student")
  n, v_s = h_s_NxDs.shape[0], head_s_DsxV.shape[1]

  if (teacher_hidden is None) != (teacher_head is None):
    raise ValueError("pass both teacher_hidden and teacher_head (for KD) or neither (CE only).")
  with_teacher = teacher_hidden is not None and _concrete(alpha) != 0.0
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
  if not with_teacher:
    h_t_NxDt = head_t_DtxV = None
  else:
    # Only the wider head is cut, once, to the common width (its gradient is
    # zero-padded back by the slice's transpose); beyond that, columns are
    # masked per chunk (see _MASKED_LOGIT).
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

  is_int = isinstance(chunk_size, numbers.Integral) and not isinstance(chunk_size, bool)
  if not is_int or chunk_size < 1:
    raise ValueError(
        f"chunk_size must be a positive int, got {chunk_size!r}; it fixes the chunk shape, so it cannot be traced.")
  chunk = max(1, min(int(chunk_size), n))
  n_chunks = max(1, -(-n // chunk))

  values = dict(zip(_HPARAMS, (temperature, beta, skew, alpha)))
  static = tuple((k, _concrete(v)) for k, v in values.items() if _concrete(v) is not None)
  traced = {k: jnp.asarray(v, jnp.float32) for k, v in values.items() if _concrete(v) is None}
  spec = _FusedSpec(n_tokens=n, chunk=chunk, n_chunks=n_chunks, width=width, vocab=vocab, kind=kind,
                    teacher_top_k=teacher_top_k, with_teacher=with_teacher, with_labels=with_labels,
                    hidden_dtype=np.dtype(h_s_NxDs.dtype), head_dtype=np.dtype(head_s_DsxV.dtype),
                    static_hparams=static)
  weighted, aux = _fused_sums(spec, traced, h_s_NxDs, head_s_DsxV, h_t_NxDt, head_t_DtxV, labels_N, keep_N)
  return weighted, jax.lax.stop_gradient(aux)


def fused_distill_sums(student_hidden, student_head, labels, mask=None, teacher_hidden=None, teacher_head=None, *,
                       alpha, kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                       vocab_size: Optional[int] = None, teacher_top_k: Optional[int] = None, chunk_size: int = 1024):
  """KD + CE loss *sums* from hidden states, never building [N, V] logits.

  ``weighted_sum = alpha * tau^2 * sum_masked D + (1 - alpha) * sum_masked CE``
  with D the per-token divergence of ``kd_loss`` (same kinds, temperature,
  beta, skew, vocab cut and teacher top-k) between ``softmax(h_S @ W_S / tau)``
  and the teacher's, and CE the student's cross entropy at temperature 1 (as
  ``cross_entropy_loss``). Sums, not means: divide by the number of real
  tokens across micro-batches yourself.

  The tokens are processed ``chunk_size`` at a time; each chunk's logits, loss
  and gradient are formed and dropped in the forward pass, and the backward
  pass only scales the saved d(hidden) [N, Ds] and d(head) [Ds, Vs]. Matmuls
  accumulate in float32 and all softmax math is float32, whatever the inputs'
  dtype. Under a mesh with an Auto "tensor" axis the chunk logits stay split
  over the vocabulary (heads sharded ``P(None, "tensor")``).

  Args:
    student_hidden: ``[N, Ds]`` final (normed) hidden states, any float dtype.
    student_head: ``[Ds, Vs]`` output projection.
    labels: int ``[N]`` next-token ids; out-of-range ids (e.g. -100) are fine
      on masked-out tokens, and make the sums NaN on kept ones, as in
      ``cross_entropy_loss``.
    mask: ``[N]`` bool/0-1, or None for all tokens.
    teacher_hidden, teacher_head: ``[N, Dt]`` and ``[Dt, Vt]``, or both None.
      The teacher gets zero gradients (it is frozen).
    alpha: KD weight. Without a teacher, or with ``alpha == 0`` as a Python
      number, no teacher math is done at all and ``weighted_sum`` is the CE
      sum (alpha is then ignored).
    kind, temperature, beta, skew, vocab_size, teacher_top_k: as ``kd_loss``.
      Python numbers or traced scalars; no gradient flows to them.
    chunk_size: tokens per chunk (static). Temporary memory grows with
      chunk_size * V (about 6 float32 [chunk, V] arrays plus d(head) [Ds, V]
      in float32), matmul efficiency too; 1024 keeps a Qwen2-sized loss at
      1/8 of the unfused one's memory (scripts/bench_loss_memory.py). Under
      a mesh the chunk's rows are split over the non-tensor axes, so each
      device works on chunk_size / (their size) rows: scale it up with them.

  Returns:
    ``(weighted_sum, aux)``: a float32 scalar, differentiable in the
    student's hidden states and head, and a dict of float32 scalars without
    gradient: ``kd_sum`` (tau^2 sum D, 0 without teacher math), ``ce_sum``,
    ``count`` (masked tokens), ``correct_sum`` (student argmax == label) and,
    with teacher math, ``teacher_ce_sum`` (teacher CE on the labels),
    ``agree_sum`` (same top-1 token) and ``kl1_sum`` (KL(p_T || p_S) at
    temperature 1 over the full cut vocabulary, whatever kind/top-k).
  """
  if labels is None:
    raise ValueError("fused_distill_sums needs labels for its CE term; for KD alone use fused_kd_loss.")
  return _fused(student_hidden, student_head, labels, mask, teacher_hidden, teacher_head, alpha=alpha, kind=kind,
                temperature=temperature, beta=beta, skew=skew, vocab_size=vocab_size, teacher_top_k=teacher_top_k,
                chunk_size=chunk_size)


def fused_kd_loss(student_hidden, student_head, teacher_hidden, teacher_head, mask=None, *, kind: str = "forward_kl",
                  temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1, vocab_size: Optional[int] = None,
                  teacher_top_k: Optional[int] = None, chunk_size: int = 1024):
  """``kd_loss(student_hidden @ student_head, teacher_hidden @ teacher_head, mask, ...)``
  computed chunk by chunk, without [N, V] logits (see ``fused_distill_sums``).

  Returns a float32 scalar, differentiable in the student's hidden states and
  head; the teacher gets zero gradients.
  """
  if teacher_hidden is None or teacher_head is None:
    raise ValueError("fused_kd_loss needs teacher_hidden and teacher_head.")
  weighted, aux = _fused(student_hidden, student_head, None, mask, teacher_hidden, teacher_head, alpha=1.0, kind=kind,
                         temperature=temperature, beta=beta, skew=skew, vocab_size=vocab_size,
                         teacher_top_k=teacher_top_k, chunk_size=chunk_size)
  return weighted / jnp.maximum(aux["count"], 1.0)


def fused_cross_entropy_loss(hidden, head, labels, mask=None, *, vocab_size: Optional[int] = None,
                             chunk_size: int = 1024):
  """``cross_entropy_loss(hidden @ head, labels, mask, vocab_size=...)`` computed
  chunk by chunk, without [N, V] logits (see ``fused_distill_sums``)."""
  weighted, aux = fused_distill_sums(hidden, head, labels, mask, alpha=0.0, vocab_size=vocab_size,
                                     chunk_size=chunk_size)
  return weighted / jnp.maximum(aux["count"], 1.0)
