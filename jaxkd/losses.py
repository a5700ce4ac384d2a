"""The reference definitions of the losses: KD divergences, CE, accuracy, and the training objective built on them.

Every loss here works on logits of shape `[..., V]` (any leading dims, e.g. `[B, T, V]` or `[N, V]`) with an optional
mask of the leading shape, and returns a float32 scalar averaged over the masked tokens.

The math is always done in float32, whatever the input dtype: bf16 logits are upcast before the softmax, because bf16
log-probabilities lose too much precision for a KL between two close distributions.

`per_token_divergence` is the building block; `kd_loss` is just "divergence per token, then masked mean, times tau^2". A
fused/chunked implementation over the vocabulary or the sequence can reuse `per_token_divergence` and
`masked_sum_and_count` per chunk and divide once at the end, giving the same number as `kd_loss`.

`jaxkd.fused_loss` does exactly that from hidden states and output heads: chunk by chunk over the tokens, with the
gradient formed inside each chunk, so the full `[N, V]` logits of the student and the teacher never exist. Its reference
is `distill_sums`, the training objective (KD and CE sums and the step's metrics) on materialised logits, which is also
what `distill.fused=False` trains on.
"""

from __future__ import annotations

import numbers
from typing import Optional

import jax
import jax.numpy as jnp

KD_KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl")

# ----------------------------------------------------------------------------------------------------
# Argument checks and shared preprocessing.


def _concrete(x):
  """Return x as a Python float, or None when it is traced (not checkable)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return float(x)


def hparam_problem(kind, temperature=None, beta=None, skew=None, teacher_top_k=None):
  """The first of these distillation settings that cannot work, as (name, what is wrong), or None.

  The one check of them: the config's start-of-run check names the key (`config.distill.<name>=<value>: ...`) and the
  loss functions name the argument (`<name> ...`). A None temperature, beta or skew is unknown (traced) and passes.
  """
  if temperature is not None and not temperature > 0:
    return "temperature", "must be > 0 (1.0 is plain softmax)"
  if kind == "jsd" and beta is not None and not 0.0 < beta < 1.0:
    return "beta", ("must be in (0, 1): jsd needs 0 < beta < 1, since at 0 or 1 the mixture equals one of the two "
                    "distributions and the JSD is identically 0")
  if kind == "skew_kl" and skew is not None and not 0.0 <= skew < 1.0:
    return "skew", ("must be in [0, 1): skew_kl needs 0 <= skew < 1, since skew=1 makes the mixture equal to the "
                    "teacher and the loss identically 0")
  if teacher_top_k is not None:
    if isinstance(teacher_top_k, bool) or not isinstance(teacher_top_k, numbers.Integral):
      return "teacher_top_k", ("must be an int or None: it fixes the shape of the top-k selection, so it cannot be "
                               "traced")
    if teacher_top_k < 1:
      return "teacher_top_k", "must be >= 1, or None for the whole vocabulary"
    if kind == "reverse_kl":
      return "teacher_top_k", ("cannot be used with kind='reverse_kl': the truncated teacher has zero probability "
                               "where the student has mass, so KL(p_S || p_T) is +inf. Use forward_kl, jsd, tvd or "
                               "skew_kl with top-k, or drop teacher_top_k")
  return None


def _check_hparams(kind, temperature, beta, skew, teacher_top_k):
  if kind not in KD_KINDS:
    raise ValueError(f"Unknown KD loss kind {kind!r}; valid kinds are {', '.join(KD_KINDS)}.")
  given = dict(temperature=temperature, beta=beta, skew=skew, teacher_top_k=teacher_top_k)
  problem = hparam_problem(kind, _concrete(temperature), _concrete(beta), _concrete(skew), teacher_top_k)
  if problem:
    name, what = problem
    raise ValueError(f"{name} {what} (got {name}={given[name]!r}).")


def _shared_vocab(v_a, v_b, vocab_size, names=("student", "teacher")):
  """The vocabulary both models are compared on; refuse mismatched vocab dims.

  Models often pad their embedding matrix past the tokenizer's vocabulary (Qwen2-7B has 152064 rows, Qwen2-1.5B 151936).
  The padded rows are not tokens; keeping them would give them probability mass that the other model cannot match, and
  zero-filling the shorter model would invent logits of 0, i.e. real probability mass. So we only ever cut, never pad.
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
  """Cut both logits to the real vocabulary (see `_shared_vocab`)."""
  vocab = _shared_vocab(logits_a.shape[-1], logits_b.shape[-1], vocab_size, names)
  if vocab_size is None:
    return logits_a, logits_b
  return logits_a[..., :vocab], logits_b[..., :vocab]


def _one_vocab(width, vocab_size):
  """The vocabulary of a single model's logits of vocab dim `width`."""
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

  Both are float32 scalars. Masked-out entries are removed with `where` rather than multiplied by 0, so a NaN/inf in a
  padding row cannot leak in. Chunked implementations add these up across chunks and divide once.
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


# ----------------------------------------------------------------------------------------------------
# KD divergences.


def _kth_largest(x_xV, k):
  """Value and index of the k-th entry of `lax.top_k(x_xV, k)` along the last dim."""
  val_xK, idx_xK = jax.lax.top_k(x_xV, k)
  return val_xK[..., k - 1], idx_xK[..., k - 1]


def _teacher_log_probs(teacher_xV, tau, teacher_top_k, kth_largest=_kth_largest):
  """Teacher log-probs at temperature tau, and where the teacher has support.

  With top-k, the teacher keeps its k largest logits and is renormalised over them; the rest get log-prob -inf
  (probability exactly 0). Later code either exponentiates them (exp(-inf) = 0, with a 0 derivative) or goes through the
  "double where" in `_kl_from_logs`, so the -inf never produces a NaN value or gradient. `support` is None when every
  token is kept.
  """
  if teacher_top_k is None:
    logp_t_xV = jax.nn.log_softmax(teacher_xV / tau, axis=-1)
    return logp_t_xV, None
  vocab = teacher_xV.shape[-1]
  if teacher_top_k > vocab:
    raise ValueError(f"teacher_top_k={teacher_top_k} is larger than the vocab size {vocab}; "
                     "use a k <= vocab size (or None to keep the full teacher).")
  # Select on the undivided logits: dividing by tau > 0 keeps the order, and rounding after the division could only
  # create extra ties. The top-k set is rebuilt from its last member (value v_k, index i_k): everything above v_k, and
  # the ties at v_k up to index i_k, since top_k takes tied entries lowest index first. Unlike scattering the k indices,
  # this is elementwise, so it stays local to each shard of a split vocab.
  kth_x, kth_idx_x = kth_largest(jax.lax.stop_gradient(teacher_xV), teacher_top_k)
  kth_x1, kth_idx_x1 = kth_x[..., None], kth_idx_x[..., None]
  cols_V = jnp.arange(vocab, dtype=kth_idx_x.dtype)
  support_xV = (teacher_xV > kth_x1) | ((teacher_xV == kth_x1) & (cols_V <= kth_idx_x1))
  logits_xV = jnp.where(support_xV, teacher_xV / tau, -jnp.inf)
  logp_t_xV = jax.nn.log_softmax(logits_xV, axis=-1)
  return logp_t_xV, support_xV


def _kl_from_logs(logp_xV, logq_xV, support_xV=None):
  """sum_v p (log p - log q), with 0 log 0 = 0 off p's support.

  Off the support log p = -inf. Masking only the product is not enough: its backward pass still forms 0 * (-inf) = NaN
  for d/dp. So log p is first replaced by a harmless 0 there ("double where"), and the product masked. Without a
  `support_xV` (teacher top-k), p's support is where log p is finite: logits given as -inf (masked vocabulary columns)
  are off it.
  """
  if support_xV is None:
    support_xV = jnp.isfinite(logp_xV)
  safe_logp_xV = jnp.where(support_xV, logp_xV, 0.0)
  term_xV = jnp.exp(safe_logp_xV) * (safe_logp_xV - logq_xV)
  return jnp.sum(jnp.where(support_xV, term_xV, 0.0), axis=-1)


def _log_mixture(weight_t, logp_t_xV, logp_s_xV):
  """log(w p_T + (1 - w) p_S), computed in log space (no underflow to log 0)."""
  if _concrete(weight_t) == 0.0:
    # log(0) = -inf would work in the forward pass, but skew=0 is just the plain forward KL, so skip the mixture
    # altogether.
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
    student_logits, teacher_logits: `[..., V]` arrays, same leading shape.
    kind: one of `KD_KINDS`; see `kd_loss`.
    temperature, beta, skew, teacher_top_k, vocab_size: as in `kd_loss`.

  Returns:
    float32 array of shape `[...]` (the leading shape). No tau^2 factor and no masking -- `kd_loss` adds both.
  """
  _check_hparams(kind, temperature, beta, skew, teacher_top_k)
  if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
    raise ValueError(f"student logits {student_logits.shape} and teacher logits "
                     f"{teacher_logits.shape} must have the same leading (token) shape.")
  student_xV, teacher_xV = _cut_vocab(student_logits, teacher_logits, vocab_size)
  return _divergence(student_xV, teacher_xV, kind=kind, temperature=temperature, beta=beta, skew=skew,
                     teacher_top_k=teacher_top_k)


def _divergence(student_xV, teacher_xV, *, kind, temperature, beta, skew, teacher_top_k,
                kth_largest=_kth_largest):
  """`per_token_divergence` on checked, already cut logits.

  kth_largest(x_xV, k) is how the teacher's top-k is selected (as `_kth_largest`); the fused loss passes one that works
  shard by shard where the vocab dim is split over the mesh.
  """
  student_xV = student_xV.astype(jnp.float32)
  teacher_xV = teacher_xV.astype(jnp.float32)

  logp_s_xV = jax.nn.log_softmax(student_xV / temperature, axis=-1)
  logp_t_xV, support_xV = _teacher_log_probs(teacher_xV, temperature, teacher_top_k, kth_largest)

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


# A teacher known only by its top-k: the stored log-probs (temperature 1) of its k most likely tokens. What the
# rest of the vocabulary gets, in the teacher's distribution and the student's alike:
#   "bucket":      one more category, the mass off the stored tokens (1 - sum p_k for the teacher, the student's own
#                  rest exactly): the student keeps the teacher's confidence, and KL over the k + 1 categories is the
#                  true KL with the tail pooled (a lower bound of it).
#   "renormalize": nothing; both distributions are renormalised over the k tokens (what top-k truncation of an
#                  online teacher does to the teacher; here to the student too, so no gradient says how much mass the
#                  rest should get).
MISSING_MASS = ("bucket", "renormalize")
_MASKED = -1e30  # a category that is not there (exp gives exactly 0; finite, so 0 * log terms stay 0)


def _sparse_logits(student_xW, indices_xK, logprobs_xK, *, temperature, missing, vocab):
  """The student's and the teacher's distributions over the teacher's stored tokens (plus, with "bucket", the rest
  of the vocabulary as one category), as the logits [..., K(+1)] of two small categoricals.

  `student_xW` holds the student's logits with the columns at or past `vocab` already masked or cut. A stored id
  outside [0, vocab) (a teacher's padded embedding rows) or a -inf log-prob is not a category: the teacher is
  renormalised over the real vocabulary, as the online path's vocab cut does. The teacher at temperature tau is
  p^(1/tau) renormalised; with "bucket" its rest counts as one token of probability 1 - sum p.
  """
  f32 = jnp.float32
  width = student_xW.shape[-1]
  logp_s_xW = jax.nn.log_softmax(student_xW.astype(f32) / temperature, axis=-1)
  lp_xK = logprobs_xK.astype(f32)
  valid_xK = (indices_xK >= 0) & (indices_xK < vocab) & (lp_xK > -jnp.inf)
  idx_xK = jnp.clip(indices_xK, 0, width - 1)
  s_xK = jnp.where(valid_xK, jnp.take_along_axis(logp_s_xW, idx_xK, axis=-1), _MASKED)
  t_xK = jnp.where(valid_xK, lp_xK / temperature, _MASKED)
  if missing == "renormalize":
    return s_xK, t_xK
  # The student's rest from its own distribution off the stored tokens (1 - sum would lose it to rounding when
  # small); the stored tokens are marked with a scatter, not a [.., K, W] compare.
  # A dropped entry is sent out of bounds, so that it cannot unmark a stored token whose column it was clipped to.
  lead = idx_xK.shape[:-1]
  flat_NxK = jnp.where(valid_xK, idx_xK, width).reshape(-1, idx_xK.shape[-1])
  stored_NxW = jnp.zeros((flat_NxK.shape[0], width), bool).at[
      jnp.arange(flat_NxK.shape[0])[:, None], flat_NxK].set(True, mode="drop")
  rest_s_x = jax.nn.logsumexp(jnp.where(stored_NxW.reshape(*lead, width), -jnp.inf, logp_s_xW), axis=-1)
  rest_s_x = jnp.maximum(rest_s_x, _MASKED)  # the student's whole mass on the stored tokens
  # The teacher's rest: 1 - the mass of all k stored tokens, padded ids included; floored, as a teacher whose k
  # tokens hold all its float32 mass would make the reverse KL infinite.
  rest_t_x = jnp.log(jnp.maximum(1.0 - jnp.sum(jnp.exp(lp_xK), axis=-1), 1e-20)) / temperature
  return (jnp.concatenate([s_xK, rest_s_x[..., None]], axis=-1),
          jnp.concatenate([t_xK, rest_t_x[..., None]], axis=-1))


def sparse_divergence(student_logits, teacher_indices, teacher_logprobs, *, kind: str = "forward_kl",
                      temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1, missing: str = "bucket",
                      vocab_size: Optional[int] = None):
  """Per-token divergence [...] between the student and a teacher known by its top-k (`MISSING_MASS` says how the
  rest of the vocabulary counts): `per_token_divergence`'s kinds on the small categoricals of `_sparse_logits`.

  Args:
    student_logits: `[..., V]`; cut to `vocab_size` first where given.
    teacher_indices: int `[..., K]` the stored token ids (ids outside the cut vocabulary are dropped).
    teacher_logprobs: `[..., K]` their log-probabilities at temperature 1 (-inf: no entry).
  """
  if missing not in MISSING_MASS:
    raise ValueError(f"missing={missing!r}: use one of {', '.join(MISSING_MASS)}")
  _check_hparams(kind, temperature, beta, skew, None)
  student_xV = _cut_one(student_logits, vocab_size)
  if teacher_indices.shape != teacher_logprobs.shape or teacher_indices.shape[:-1] != student_xV.shape[:-1]:
    raise ValueError(f"teacher indices {teacher_indices.shape} and log-probs {teacher_logprobs.shape} must both be "
                     f"[..., K] over the student logits' leading shape {student_xV.shape[:-1]}")
  s_xK, t_xK = _sparse_logits(student_xV, teacher_indices, teacher_logprobs, temperature=temperature,
                              missing=missing, vocab=student_xV.shape[-1])
  return _divergence(s_xK, t_xK, kind=kind, temperature=1.0, beta=beta, skew=skew, teacher_top_k=None)


def kd_loss(student_logits, teacher_logits, mask=None, *, kind: str = "forward_kl", temperature: float = 1.0,
            beta: float = 0.5, skew: float = 0.1, vocab_size: Optional[int] = None,
            teacher_top_k: Optional[int] = None):
  """Masked-mean distillation loss, scaled by temperature^2.

  `p_T = softmax(z_T / tau)`, `p_S = softmax(z_S / tau)` (in float32), and per token:

  * `forward_kl`: KL(p_T || p_S)
  * `reverse_kl`: KL(p_S || p_T)
  * `jsd`: beta KL(p_T || m) + (1 - beta) KL(p_S || m), m = beta p_T + (1 - beta) p_S, with 0 < beta < 1
  * `tvd`: 1/2 sum |p_T - p_S|
  * `skew_kl`: KL(p_T || skew p_T + (1 - skew) p_S), with 0 <= skew < 1

  The result is `tau^2 * sum_masked D / max(1, n_masked)`; the tau^2 keeps gradient magnitudes comparable across
  temperatures (Hinton et al., 2015).

  Args:
    student_logits, teacher_logits: `[..., V]` logits, any float dtype.
    mask: bool/0-1 array of the leading shape, or None for all tokens.
    vocab_size: cut both logits to their first `vocab_size` entries before the softmax. Required when the two vocab dims
      differ (padded embeddings); must be <= both dims.
    teacher_top_k: keep the teacher's k most likely tokens, renormalised; the student stays normalised over the whole
      (cut) vocabulary. Not allowed with `reverse_kl` (the divergence would be +inf).

  Returns:
    float32 scalar. Differentiable in both logits; stop the teacher's gradient yourself if it is not frozen by other
    means.
  """
  d_x = per_token_divergence(student_logits, teacher_logits, kind=kind, temperature=temperature, beta=beta, skew=skew,
                             teacher_top_k=teacher_top_k, vocab_size=vocab_size)
  mask_x = _check_mask(mask, d_x.shape)
  return (temperature**2) * _masked_mean(d_x, mask_x)


# ----------------------------------------------------------------------------------------------------
# Supervised (hard-label) losses.


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
  # Select with a one-hot compare instead of a gather: under jit XLA fuses it into the reduction (no [..., V] one-hot is
  # materialised), its backward is a cheap select rather than a scatter, and an out-of-range label such as the ignore
  # index -100 simply matches nothing.
  vocab_ids_V = jnp.arange(vocab, dtype=labels_x.dtype)
  hit_xV = vocab_ids_V == labels_x[..., None]
  picked_x = jnp.sum(jnp.where(hit_xV, logits_xV, 0.0), axis=-1)
  return picked_x, valid_x


def cross_entropy_loss(logits, labels, mask=None, *, vocab_size: Optional[int] = None):
  """Mean over masked tokens of -log softmax(logits)[label], in float32.

  Labels outside `[0, vocab)` (e.g. an ignore index of -100) are fine on masked-out tokens; on unmasked tokens they make
  the loss NaN, on purpose, because the label cannot be checked inside `jit` and a silent wrong number would be worse.
  """
  logits_xV = _cut_one(logits, vocab_size).astype(jnp.float32)
  mask_x = _check_mask(mask, logits_xV.shape[:-1])
  picked_x, valid_x = _label_logits(logits_xV, labels)
  nll_x = jax.nn.logsumexp(logits_xV, axis=-1) - picked_x
  nll_x = jnp.where(valid_x, nll_x, jnp.nan)
  return _masked_mean(nll_x, mask_x)


def token_accuracy(logits, labels, mask=None, *, vocab_size: Optional[int] = None):
  """Fraction of masked tokens whose argmax over the (cut) vocab is the label.

  Invalid labels simply count as wrong. Returns a float32 scalar (0 when no token is masked in).
  """
  logits_xV = _cut_one(logits, vocab_size)
  mask_x = _check_mask(mask, logits_xV.shape[:-1])
  _, valid_x = _label_logits(logits_xV, labels)
  pred_x = jnp.argmax(logits_xV, axis=-1)
  correct_x = (pred_x == jnp.asarray(labels)) & valid_x
  return _masked_mean(correct_x.astype(jnp.float32), mask_x)


# ----------------------------------------------------------------------------------------------------
# The training objective on materialised logits.


def _label_nll(logp_NxV, labels_N):
  """-log p[label]; NaN for a label outside [0, V), as in the fused loss (take_along_axis alone would wrap a
  negative label around to a real column and train on it)."""
  v = logp_NxV.shape[-1]
  picked_N = jnp.take_along_axis(logp_NxV, jnp.clip(labels_N, 0, v - 1)[:, None], axis=-1)[:, 0]
  return jnp.where((labels_N >= 0) & (labels_N < v), -picked_N, jnp.nan)


def distill_sums(s_hidden_NxD, s_head_DxV, labels_N, mask_N, t_hidden_NxD=None, t_head_DxV=None, *, alpha, kind,
                 temperature, beta, skew, vocab_size, teacher_top_k, t_indices_NxK=None, t_logprobs_NxK=None,
                 missing="bucket"):
  """The training objective's sums on full [N, V] logits (what `distill.fused=False` trains on).

  The reference for `jaxkd.fused_loss.fused_distill_sums`: the same arguments but `chunk_size`, and the same
  `(weighted_sum, aux)`; `weighted_sum = alpha * kd_sum + (1 - alpha) * ce_sum`, the CE sum without a teacher. A
  teacher known by its stored top-k comes as `t_indices_NxK` and `t_logprobs_NxK` (`sparse_divergence`).
  """
  s_logits_NxV = jnp.dot(s_hidden_NxD, s_head_DxV, preferred_element_type=jnp.float32)
  if vocab_size is not None:
    s_logits_NxV = s_logits_NxV[:, :vocab_size]
  logp_NxV = jax.nn.log_softmax(s_logits_NxV)
  keep_N = mask_N > 0
  ce_N = _label_nll(logp_NxV, labels_N)
  aux = {"ce_sum": jnp.sum(jnp.where(keep_N, ce_N, 0.0)), "count": jnp.sum(keep_N, dtype=jnp.float32),
         "correct_sum": jnp.sum(keep_N & (jnp.argmax(s_logits_NxV, -1) == labels_N), dtype=jnp.float32)}
  if t_indices_NxK is not None:
    kw = dict(missing=missing, vocab_size=None)
    d_N = sparse_divergence(s_logits_NxV, t_indices_NxK, t_logprobs_NxK, kind=kind, temperature=temperature,
                            beta=beta, skew=skew, **kw)
    kl1_N = sparse_divergence(s_logits_NxV, t_indices_NxK, t_logprobs_NxK, kind="forward_kl", **kw)
    top1_N = jnp.take_along_axis(t_indices_NxK, jnp.argmax(t_logprobs_NxK, -1)[:, None], axis=-1)[:, 0]
    aux.update(kd_sum=temperature ** 2 * jnp.sum(jnp.where(keep_N, d_N, 0.0)),
               kl1_sum=jnp.sum(jnp.where(keep_N, kl1_N, 0.0)),
               agree_sum=jnp.sum(keep_N & (jnp.argmax(s_logits_NxV, -1) == top1_N), dtype=jnp.float32))
    return alpha * aux["kd_sum"] + (1.0 - alpha) * aux["ce_sum"], jax.lax.stop_gradient(aux)
  if t_hidden_NxD is None:
    return aux["ce_sum"], jax.lax.stop_gradient(aux)
  t_logits_NxV = jnp.dot(t_hidden_NxD, t_head_DxV, preferred_element_type=jnp.float32)
  if vocab_size is not None:
    t_logits_NxV = t_logits_NxV[:, :vocab_size]
  d_N = per_token_divergence(s_logits_NxV, t_logits_NxV, kind=kind, temperature=temperature, beta=beta, skew=skew,
                             teacher_top_k=teacher_top_k)
  kl1_N = per_token_divergence(s_logits_NxV, t_logits_NxV, kind="forward_kl")
  t_ce_N = _label_nll(jax.nn.log_softmax(t_logits_NxV), labels_N)
  aux.update(
      kd_sum=temperature ** 2 * jnp.sum(jnp.where(keep_N, d_N, 0.0)),
      kl1_sum=jnp.sum(jnp.where(keep_N, kl1_N, 0.0)),
      teacher_ce_sum=jnp.sum(jnp.where(keep_N, t_ce_N, 0.0)),
      agree_sum=jnp.sum(keep_N & (jnp.argmax(s_logits_NxV, -1) == jnp.argmax(t_logits_NxV, -1)),
                        dtype=jnp.float32))
  total = alpha * aux["kd_sum"] + (1.0 - alpha) * aux["ce_sum"]
  return total, jax.lax.stop_gradient(aux)
