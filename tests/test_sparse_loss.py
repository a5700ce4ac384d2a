"""The KD loss against a teacher known by its stored top-k (the offline teacher's signal).

The reference is float64 NumPy written from the definitions (`losses.MISSING_MASS`): the teacher's k log-probs at
temperature 1, p^(1/tau) renormalised, the rest of the vocabulary as one more category ("bucket") or dropped
("renormalize"), ids past the vocabulary dropped. `losses.sparse_divergence`, the unfused objective
(`losses.distill_sums`) and the fused chunked one (`fused_loss.fused_distill_sums`) are each compared with it, values
and gradients. Shapes are awkward on purpose: 37 tokens in chunks of 8, a student head wider (53) than the vocabulary
(50), stored ids at and past the vocabulary.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import losses
from jaxkd.fused_loss import fused_distill_sums

N, D, W, VOCAB, K = 37, 16, 53, 50, 6


def np_divergence(p, q, kind, beta=0.5, skew=0.1):
  """float64 divergence between two distributions [..., C] (zero entries allowed in p and q alike)."""
  def kl(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.sum(np.where(a > 0, a * (np.log(a) - np.log(b)), 0.0), axis=-1)
  if kind == "forward_kl":
    return kl(p, q)
  if kind == "reverse_kl":
    return kl(q, p)
  if kind == "tvd":
    return 0.5 * np.abs(p - q).sum(-1)
  if kind == "jsd":
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)
  return kl(p, skew * p + (1 - skew) * q)  # skew_kl


def np_sparse(z_NxV, idx_NxK, lp_NxK, *, kind, tau, missing, vocab=VOCAB, beta=0.5, skew=0.1):
  z = np.asarray(z_NxV, np.float64)[:, :vocab] / tau
  logq = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
  out = []
  for i in range(z.shape[0]):
    keep = (idx_NxK[i] < vocab) & np.isfinite(lp_NxK[i])
    ids, lp = idx_NxK[i][keep], np.asarray(lp_NxK[i], np.float64)[keep]
    p = np.exp(lp / tau)
    q = np.exp(logq[i][ids])
    if missing == "bucket":
      rest_t = max(1.0 - np.exp(np.asarray(lp_NxK[i], np.float64)).sum(), 1e-20) ** (1 / tau)
      p = np.append(p, rest_t)
      q = np.append(q, 1.0 - q.sum())
    else:
      q = q / q.sum()
    out.append(np_divergence(p / p.sum(), q, kind, beta, skew))
  return np.array(out)


def make_inputs(seed, k=K):
  """Student hidden states and head; a teacher's top-k from a peaked distribution over a padded vocabulary (W
  rows), so that some stored ids are at or past VOCAB; one token with a -inf entry (fewer than k stored)."""
  rng = np.random.default_rng(seed)
  h = rng.standard_normal((N, D)).astype(np.float32)
  w = (rng.standard_normal((D, W)) * 0.6).astype(np.float32)
  zt = rng.standard_normal((N, W)) * 2.5
  zt[:, VOCAB:] -= 1.0  # padded rows: unlikely, but in some tokens' top-k
  zt[:3, VOCAB + 1] += 9.0  # and at the top of these
  logp = zt - np.log(np.exp(zt).sum(-1, keepdims=True))
  idx = np.argsort(-logp, axis=-1)[:, :k].astype(np.int32)
  lp = np.take_along_axis(logp, idx, -1).astype(np.float32)
  lp[5, -1] = -np.inf
  labels = rng.integers(0, VOCAB, N).astype(np.int32)
  mask = rng.random(N) < 0.8
  return h, w, idx, lp, labels, mask


@pytest.mark.parametrize("missing", losses.MISSING_MASS)
@pytest.mark.parametrize("kind", losses.KD_KINDS)
def test_sparse_divergence_and_its_gradient_equal_float64(kind, missing):
  h, w, idx, lp, _, _ = make_inputs(1)
  z = h @ w
  tau = 2.0
  kw = dict(kind=kind, temperature=tau, missing=missing, vocab_size=VOCAB)
  got = losses.sparse_divergence(jnp.asarray(z), jnp.asarray(idx), jnp.asarray(lp), **kw)
  want = np_sparse(z, idx, lp, kind=kind, tau=tau, missing=missing)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  # d/dz of the sum, against central differences of the float64 reference
  grad = jax.grad(lambda z: jnp.sum(losses.sparse_divergence(z, jnp.asarray(idx), jnp.asarray(lp), **kw)))(
      jnp.asarray(z))
  rows, eps = [0, 5, 11], 1e-5
  for r in rows:
    for col in (int(idx[r, 0]) % VOCAB, 7, 49, 51):
      up, down = z[r:r + 1].astype(np.float64).copy(), z[r:r + 1].astype(np.float64).copy()
      up[0, col] += eps
      down[0, col] -= eps
      fd = (np_sparse(up, idx[r:r + 1], lp[r:r + 1], kind=kind, tau=tau, missing=missing)
            - np_sparse(down, idx[r:r + 1], lp[r:r + 1], kind=kind, tau=tau, missing=missing))[0] / (2 * eps)
      np.testing.assert_allclose(grad[r, col], fd if col < VOCAB else 0.0, rtol=1e-3, atol=2e-5)


def test_the_two_ways_differ_and_bucket_sees_the_missing_mass():
  """A student that matches the teacher on the top-k renormalised has renormalize-divergence 0 but not bucket's."""
  idx = jnp.array([[0, 1]])
  lp = jnp.log(jnp.array([[0.5, 0.3]]))  # rest 0.2
  z = jnp.log(jnp.array([[5.0, 3.0, 0.01, 0.01]]))  # the student's mass is almost all on the two
  kw = dict(kind="forward_kl", temperature=1.0)
  assert float(losses.sparse_divergence(z, idx, lp, missing="renormalize", **kw)[0]) < 1e-6
  assert float(losses.sparse_divergence(z, idx, lp, missing="bucket", **kw)[0]) > 0.1


@pytest.mark.parametrize("missing", losses.MISSING_MASS)
@pytest.mark.parametrize("kind", ("forward_kl", "reverse_kl", "jsd", "tvd"))
def test_fused_and_unfused_objectives_equal_float64(kind, missing):
  h, w, idx, lp, labels, mask = make_inputs(2)
  alpha, tau = 0.7, 1.5
  kw = dict(alpha=alpha, kind=kind, temperature=tau, beta=0.5, skew=0.1, vocab_size=VOCAB, teacher_top_k=None)

  def unfused(h, w):
    return losses.distill_sums(h, w[:, :VOCAB], jnp.asarray(labels), jnp.asarray(mask), t_indices_NxK=jnp.asarray(idx),
                               t_logprobs_NxK=jnp.asarray(lp), missing=missing, **{**kw, "vocab_size": None})

  def fused(h, w):
    return fused_distill_sums(h, w, jnp.asarray(labels), jnp.asarray(mask), teacher_indices=jnp.asarray(idx),
                              teacher_logprobs=jnp.asarray(lp), missing=missing, chunk_size=8, **kw)

  z = (h.astype(np.float64) @ w.astype(np.float64))
  d = np_sparse(z, idx, lp, kind=kind, tau=tau, missing=missing)
  logq = z[:, :VOCAB] - np.log(np.exp(z[:, :VOCAB]).sum(-1, keepdims=True))
  ce = -logq[np.arange(N), labels]
  kd_sum, ce_sum = tau**2 * d[mask].sum(), ce[mask].sum()
  kl1 = np_sparse(z, idx, lp, kind="forward_kl", tau=1.0, missing=missing)[mask].sum()
  top1 = idx[np.arange(N), np.argmax(lp, -1)]
  agree = (np.argmax(z[:, :VOCAB], -1) == top1)[mask].sum()
  for fn in (unfused, fused):
    (total, aux), (dh, dw) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(jnp.asarray(h), jnp.asarray(w))
    np.testing.assert_allclose(total, alpha * kd_sum + (1 - alpha) * ce_sum, rtol=2e-5)
    np.testing.assert_allclose([aux["kd_sum"], aux["ce_sum"], aux["kl1_sum"], aux["agree_sum"]],
                               [kd_sum, ce_sum, kl1, agree], rtol=2e-5, atol=1e-5)
    assert "teacher_ce_sum" not in aux  # the label's teacher log-prob is not stored
    if fn is unfused:
      ref_dh, ref_dw = dh, dw
    else:
      np.testing.assert_allclose(dh, ref_dh, rtol=2e-4, atol=2e-6)
      np.testing.assert_allclose(dw, ref_dw, rtol=2e-4, atol=2e-6)
      assert not np.any(np.asarray(dw)[:, VOCAB:])  # the cut columns get no gradient


def test_cached_teacher_errors():
  h, w, idx, lp, labels, mask = make_inputs(3)
  args = (jnp.asarray(h), jnp.asarray(w), jnp.asarray(labels), jnp.asarray(mask))
  with pytest.raises(ValueError, match="missing='zero': use one of bucket, renormalize"):
    fused_distill_sums(*args, teacher_indices=idx, teacher_logprobs=lp, alpha=0.5, missing="zero")
  with pytest.raises(ValueError, match="already its stored top-k"):
    fused_distill_sums(*args, teacher_indices=idx, teacher_logprobs=lp, alpha=0.5, teacher_top_k=4)
  with pytest.raises(ValueError, match=r"must both be \[N, K\]"):
    fused_distill_sums(*args, teacher_indices=idx[:, :3], teacher_logprobs=lp, alpha=0.5)
  with pytest.raises(ValueError, match="teacher indices must be integers"):
    fused_distill_sums(*args, teacher_indices=lp, teacher_logprobs=lp, alpha=0.5)


def test_fused_cached_loss_under_a_mesh_equals_one_device():
  """On a (data 1, fsdp 2, tensor 4) mesh, the head split over the vocabulary and the tokens over fsdp: the same
  sums and gradients as on one device, and no array as wide as the head (the chunk logits stay split)."""
  import re  # pylint: disable=import-outside-toplevel

  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  n, d, width, vocab, k = 64, 16, 256, 250, 8
  rng = np.random.default_rng(7)
  h = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((d, width)) * 0.5, jnp.float32)
  zt = rng.standard_normal((n, width)) * 2
  logp = zt - np.log(np.exp(zt).sum(-1, keepdims=True))
  idx = np.argsort(-logp, axis=-1)[:, :k].astype(np.int32)
  lp = np.take_along_axis(logp, idx, -1).astype(np.float32)
  labels = jnp.asarray(rng.integers(0, vocab, n), jnp.int32)
  mask = jnp.asarray(rng.random(n) < 0.9)

  def step(h, w, idx, lp):
    f = lambda h, w: fused_distill_sums(h, w, labels, mask, teacher_indices=idx, teacher_logprobs=lp, alpha=0.5,
                                        kind="forward_kl", temperature=2.0, vocab_size=vocab, chunk_size=16)
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, w)

  want = jax.jit(step)(h, w, jnp.asarray(idx), jnp.asarray(lp))
  mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  tokens = NamedSharding(mesh, P(("data", "fsdp"), None))
  args = (jax.device_put(h, tokens), jax.device_put(w, NamedSharding(mesh, P(None, "tensor"))),
          jax.device_put(jnp.asarray(idx), tokens), jax.device_put(jnp.asarray(lp), tokens))
  with jax.set_mesh(mesh):
    jitted = jax.jit(step)
    got = jitted(*args)
    hlo = jitted.lower(*args).compile().as_text()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  dims = {int(x) for shape in re.findall(r"\b[a-z]+\d*\[([\d,]+)\]", hlo) for x in shape.split(",")}
  assert width // 4 in dims, "the chunk logits are split four ways"
  assert width not in dims, sorted(dims)
