"""Tests for jaxkd.losses against an independent float64 NumPy reference.

The reference below is written from the textbook formulas (softmax, sum p log
p/q, ...) in float64, without log-space tricks, so that it shares no code or
numerical shortcuts with the JAX implementation.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.losses import (
    KD_KINDS,
    cross_entropy_loss,
    kd_loss,
    per_token_divergence,
    token_accuracy,
)

F32_TOL = dict(rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# float64 NumPy reference
# ---------------------------------------------------------------------------


def np_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p, q):
    # 0 log 0 = 0: entries with p = 0 contribute nothing.
    safe_p = np.where(p > 0, p, 1.0)
    return np.sum(np.where(p > 0, p * np.log(safe_p / q), 0.0), axis=-1)


def np_teacher_probs(zt, tau, top_k):
    p = np_softmax(zt / tau)
    if top_k is None:
        return p
    # Stable sort on -z: among equal logits the lower index wins, like lax.top_k.
    idx = np.argsort(-zt, axis=-1, kind="stable")[..., :top_k]
    keep = np.zeros(zt.shape, dtype=bool)
    np.put_along_axis(keep, idx, True, axis=-1)
    p = np.where(keep, p, 0.0)
    return p / p.sum(axis=-1, keepdims=True)


def np_jsd(pt, ps, beta):
    m = beta * pt + (1 - beta) * ps
    return beta * np_kl(pt, m) + (1 - beta) * np_kl(ps, m)


# kind -> divergence per token between the teacher's pt and the student's ps.
NP_DIVERGENCES = {
    "forward_kl": lambda pt, ps, beta, skew: np_kl(pt, ps),
    "reverse_kl": lambda pt, ps, beta, skew: np_kl(ps, pt),
    "jsd": lambda pt, ps, beta, skew: np_jsd(pt, ps, beta),
    "tvd": lambda pt, ps, beta, skew: 0.5 * np.abs(pt - ps).sum(axis=-1),
    "skew_kl": lambda pt, ps, beta, skew: np_kl(pt, skew * pt + (1 - skew) * ps),
}


def np_divergence(zs, zt, kind, tau=1.0, beta=0.5, skew=0.1, top_k=None, vocab_size=None):
    zs = np.asarray(zs, np.float64)
    zt = np.asarray(zt, np.float64)
    if vocab_size is not None:
        zs, zt = zs[..., :vocab_size], zt[..., :vocab_size]
    ps = np_softmax(zs / tau)
    pt = np_teacher_probs(zt, tau, top_k)
    return NP_DIVERGENCES[kind](pt, ps, beta, skew)


def np_kd_loss(zs, zt, mask=None, *, kind, tau=1.0, **kw):
    d = np_divergence(zs, zt, kind, tau=tau, **kw)
    m = np.ones(d.shape) if mask is None else np.asarray(mask, np.float64)
    return tau**2 * np.sum(d * m) / max(1.0, m.sum())


def np_cross_entropy(z, labels, mask=None, vocab_size=None):
    z = np.asarray(z, np.float64)
    if vocab_size is not None:
        z = z[..., :vocab_size]
    p = np_softmax(z)
    nll = -np.log(np.take_along_axis(p, labels[..., None], axis=-1)[..., 0])
    m = np.ones(nll.shape) if mask is None else np.asarray(mask, np.float64)
    return np.sum(nll * m) / max(1.0, m.sum())


def np_accuracy(z, labels, mask=None, vocab_size=None):
    z = np.asarray(z, np.float64)
    if vocab_size is not None:
        z = z[..., :vocab_size]
    correct = (z.argmax(axis=-1) == labels).astype(np.float64)
    m = np.ones(correct.shape) if mask is None else np.asarray(mask, np.float64)
    return np.sum(correct * m) / max(1.0, m.sum())


def random_logits(seed, lead=(3, 5), v_s=32, v_t=32, scale=2.0):
    rng = np.random.default_rng(seed)
    zs = (scale * rng.standard_normal(lead + (v_s,))).astype(np.float32)
    zt = (scale * rng.standard_normal(lead + (v_t,))).astype(np.float32)
    return zs, zt


MASK_MODES = ("none", "random", "all_zero")


def make_mask(mode, lead, seed):
    if mode == "none":
        return None
    if mode == "all_zero":
        return np.zeros(lead, dtype=bool)
    mask = np.random.default_rng(seed + 1000).random(lead) < 0.6
    mask.flat[0] = True  # never accidentally all-zero; that case is separate
    return mask


def top_ks_for(kind):
    return (None,) if kind == "reverse_kl" else (None, 1, 5)


# One case per (kind, temperature, mask mode, top-k, vocab cut), each with its
# own seed. This is the main value test for float32 inputs.
VALUE_CASES = [
    (kind, tau, mask_mode, top_k, cut)
    for kind in KD_KINDS
    for tau in (1.0, 2.0)
    for mask_mode in MASK_MODES
    for top_k in top_ks_for(kind)
    for cut in (False, True)
]


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind,tau,mask_mode,top_k,cut", VALUE_CASES)
def test_kd_loss_matches_reference(kind, tau, mask_mode, top_k, cut):
    seed = VALUE_CASES.index((kind, tau, mask_mode, top_k, cut))
    lead = (3, 5)
    # With cut=True the teacher has a padded vocab (extra rows with large
    # logits, so that keeping them would visibly change the answer).
    zs, zt = random_logits(seed, lead, v_s=29 if cut else 32, v_t=32)
    vocab_size = None
    if cut:
        zt[..., 29:] += 5.0
        vocab_size = 27  # also shorter than the student: both get cut
    mask = make_mask(mask_mode, lead, seed)
    kw = dict(temperature=tau, teacher_top_k=top_k, vocab_size=vocab_size)

    got = kd_loss(jnp.asarray(zs), jnp.asarray(zt), mask, kind=kind, **kw)
    want = np_kd_loss(zs, zt, mask, kind=kind, tau=tau, top_k=top_k, vocab_size=vocab_size)

    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), want, **F32_TOL)
    if mask_mode == "all_zero":
        assert float(got) == 0.0
    else:
        assert want > 1e-3  # the comparison is not trivially 0 == 0


@pytest.mark.parametrize("kind", KD_KINDS)
def test_per_token_divergence_matches_reference(kind):
    zs, zt = random_logits(7)
    got = per_token_divergence(
        jnp.asarray(zs), jnp.asarray(zt), kind=kind, temperature=1.5, beta=0.3, skew=0.25
    )
    want = np_divergence(zs, zt, kind, tau=1.5, beta=0.3, skew=0.25)
    assert got.shape == (3, 5) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, **F32_TOL)


@pytest.mark.parametrize("beta", (0.1, 0.5, 0.9))
def test_jsd_beta(beta):
    zs, zt = random_logits(11)
    got = kd_loss(jnp.asarray(zs), jnp.asarray(zt), kind="jsd", beta=beta)
    np.testing.assert_allclose(float(got), np_kd_loss(zs, zt, kind="jsd", beta=beta), **F32_TOL)


@pytest.mark.parametrize("skew", (0.0, 0.1, 0.7))
def test_skew_kl_skew(skew):
    zs, zt = random_logits(12)
    got = kd_loss(jnp.asarray(zs), jnp.asarray(zt), kind="skew_kl", skew=skew, teacher_top_k=3)
    want = np_kd_loss(zs, zt, kind="skew_kl", skew=skew, top_k=3)
    np.testing.assert_allclose(float(got), want, **F32_TOL)


def test_skew_zero_is_forward_kl():
    zs, zt = map(jnp.asarray, random_logits(13))
    np.testing.assert_allclose(
        float(kd_loss(zs, zt, kind="skew_kl", skew=0.0)),
        float(kd_loss(zs, zt, kind="forward_kl")),
        rtol=1e-6,
    )
    # ... and that is the forward KL (a constant would pass the comparison above).
    np.testing.assert_allclose(
        float(kd_loss(zs, zt, kind="forward_kl")), np_kd_loss(zs, zt, kind="forward_kl"), **F32_TOL
    )


@pytest.mark.parametrize("kind", KD_KINDS)
def test_bf16_inputs_are_upcast(kind):
    zs, zt = random_logits(21)
    zs_bf, zt_bf = jnp.asarray(zs, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16)
    # Reference on exactly the bf16-rounded values.
    zs_r, zt_r = np.asarray(zs_bf.astype(jnp.float32)), np.asarray(zt_bf.astype(jnp.float32))
    mask = make_mask("random", zs.shape[:-1], 21)
    for top_k in top_ks_for(kind):
        got = kd_loss(zs_bf, zt_bf, mask, kind=kind, temperature=2.0, teacher_top_k=top_k)
        assert got.dtype == jnp.float32
        want = np_kd_loss(zs_r, zt_r, mask, kind=kind, tau=2.0, top_k=top_k)
        np.testing.assert_allclose(float(got), want, **F32_TOL)


def test_arbitrary_leading_dims_and_jit():
    # [3, 5, V] logits viewed as [3, 1, 5, V] (three leading dims) under jit
    # must agree with the reference and with the eager [3, 5, V] call.
    zs, zt = random_logits(31)
    mask = make_mask("random", (3, 5), 31)
    fn = jax.jit(lambda a, b, m: kd_loss(a, b, m, kind="jsd", temperature=2.0, teacher_top_k=4))
    got = fn(
        jnp.asarray(zs[:, None]), jnp.asarray(zt[:, None]), jnp.asarray(mask[:, None])
    )
    want = np_kd_loss(zs, zt, mask, kind="jsd", tau=2.0, top_k=4)
    np.testing.assert_allclose(float(got), want, **F32_TOL)
    eager = kd_loss(
        jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(mask),
        kind="jsd", temperature=2.0, teacher_top_k=4,
    )
    np.testing.assert_allclose(float(eager), float(got), rtol=1e-6)


def test_teacher_top_k_ties_keep_lowest_index():
    # Three logits tie for 2nd place; exactly k=2 tokens are kept, the lower
    # index winning the tie (as lax.top_k and the stable numpy sort do).
    zt = np.array([[1.0, 2.0, 2.0, 2.0, 0.0]], np.float32)
    zs = np.zeros_like(zt)
    got = kd_loss(jnp.asarray(zs), jnp.asarray(zt), teacher_top_k=2)
    np.testing.assert_allclose(float(got), np.log(5.0) - np.log(2.0), **F32_TOL)
    want = np_kd_loss(zs, zt, kind="forward_kl", top_k=2)
    np.testing.assert_allclose(float(got), want, **F32_TOL)


def test_traced_temperature_and_beta_under_jit():
    # Schedules pass temperature/beta as traced values; the range checks are
    # skipped then, but the math must be the same.
    zs, zt = map(jnp.asarray, random_logits(35))
    fn = jax.jit(lambda a, b, t, be: kd_loss(a, b, kind="jsd", temperature=t, beta=be))
    np.testing.assert_allclose(
        float(fn(zs, zt, 2.0, 0.3)),
        float(kd_loss(zs, zt, kind="jsd", temperature=2.0, beta=0.3)),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        float(fn(zs, zt, 2.0, 0.3)), np_kd_loss(zs, zt, kind="jsd", tau=2.0, beta=0.3), **F32_TOL
    )


def test_mask_accepts_int_and_bool():
    zs, zt = map(jnp.asarray, random_logits(32))
    mask = make_mask("random", (3, 5), 32)
    a = kd_loss(zs, zt, jnp.asarray(mask))
    b = kd_loss(zs, zt, jnp.asarray(mask, jnp.int32))
    c = kd_loss(zs, zt, jnp.asarray(mask, jnp.float32))
    assert float(a) == float(b) == float(c)
    np.testing.assert_allclose(float(a), np_kd_loss(zs, zt, mask, kind="forward_kl"), **F32_TOL)


def test_teacher_top_k_full_vocab_is_no_top_k():
    zs, zt = map(jnp.asarray, random_logits(33))
    np.testing.assert_allclose(
        float(kd_loss(zs, zt, teacher_top_k=32)), float(kd_loss(zs, zt)), rtol=1e-6
    )
    np.testing.assert_allclose(float(kd_loss(zs, zt)), np_kd_loss(zs, zt, kind="forward_kl"), **F32_TOL)


def test_masked_out_garbage_does_not_leak():
    # Padding rows may hold anything (here inf/nan); masked out, they must not
    # change the loss.
    zs, zt = random_logits(34)
    mask = make_mask("random", (3, 5), 34)
    mask[2, :] = False
    zs_bad, zt_bad = zs.copy(), zt.copy()
    zs_bad[2] = np.nan
    zt_bad[2] = np.inf
    for kind in KD_KINDS:
        got = kd_loss(jnp.asarray(zs_bad), jnp.asarray(zt_bad), mask, kind=kind)
        np.testing.assert_allclose(float(got), np_kd_loss(zs, zt, mask, kind=kind), **F32_TOL)


# ---------------------------------------------------------------------------
# Sanity
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KD_KINDS)
def test_identical_logits_give_zero(kind):
    z = jnp.asarray(random_logits(41)[0])
    np.testing.assert_allclose(float(kd_loss(z, z, kind=kind, temperature=2.0)), 0.0, atol=1e-6)
    # ... and only they: one token's logits moved, the loss is the reference's, not 0.
    moved = z.at[1, 2, 3].add(4.0)
    want = np_kd_loss(moved, z, kind=kind, tau=2.0)
    assert want > 1e-4
    np.testing.assert_allclose(float(kd_loss(moved, z, kind=kind, temperature=2.0)), want, **F32_TOL)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_all_kinds_nonnegative(kind):
    for seed, scale in itertools.product(range(3), (0.01, 1.0, 30.0)):
        zs, zt = random_logits(50 + seed, scale=scale)
        for top_k in top_ks_for(kind):
            d = per_token_divergence(
                jnp.asarray(zs), jnp.asarray(zt), kind=kind, teacher_top_k=top_k
            )
            assert np.all(np.isfinite(np.asarray(d)))
            # Tiny negatives are float32 round-off of a true 0.
            assert np.all(np.asarray(d) >= -1e-6)
            assert np.asarray(d).max() > 0  # different logits: not all 0


def test_kd_kinds_are_the_kinds_with_a_reference():
    # KD_KINDS is what a config may choose and what the value tests here (and the fused-loss tests) are
    # parametrized over: a kind it lacked would go untested, one without a reference above would be unchecked.
    assert KD_KINDS == tuple(NP_DIVERGENCES)


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------


def fd_grad(f, x, eps=1e-6):
    """Central finite differences of a float64 scalar function."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        g[i] = (f(xp) - f(xm)) / (2 * eps)
    return g


GRAD_CASES = [(kind, top_k) for kind in KD_KINDS for top_k in top_ks_for(kind)[:2]]


@pytest.mark.parametrize("kind,top_k", GRAD_CASES)
def test_grad_matches_finite_differences(kind, top_k):
    # Same shapes as the other gradient test (3x5 tokens, vocab 29/32 cut to
    # 27) so the compiled ops are shared; the FD loop is cheap numpy anyway.
    zs, zt = random_logits(60, v_s=29, v_t=32, scale=1.5)
    mask = make_mask("random", (3, 5), 60)
    mask[1, :] = False
    kw = dict(beta=0.3, skew=0.2, vocab_size=27)
    got = jax.grad(
        lambda a: kd_loss(
            a, jnp.asarray(zt), jnp.asarray(mask),
            kind=kind, temperature=2.0, teacher_top_k=top_k, **kw,
        )
    )(jnp.asarray(zs))

    want = fd_grad(
        lambda a: np_kd_loss(a, zt, mask, kind=kind, tau=2.0, top_k=top_k, **kw),
        zs.astype(np.float64),
    )
    assert np.abs(want).max() > 1e-3
    # jax computes in float32: compare at float32 gradient precision.
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=2e-6)
    # Masked-out tokens and cut vocab columns get exactly zero gradient.
    assert np.all(np.asarray(got)[1] == 0.0)
    assert np.all(np.asarray(got)[..., 27:] == 0.0)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_no_nan_grads_topk_masked_and_extreme(kind):
    lead = (3, 5)
    for scale, mask in itertools.product(
        (1.0, 100.0),  # 100: many probabilities underflow to exactly 0 in float32
        (np.ones(lead, bool), np.zeros(lead, bool), np.arange(15).reshape(lead) % 5 < 2),
    ):
        zs, zt = random_logits(70, lead=lead, v_s=29, v_t=32, scale=scale)
        for top_k in top_ks_for(kind):
            gs, gt = jax.grad(
                lambda a, b: kd_loss(
                    a, b, jnp.asarray(mask), kind=kind, teacher_top_k=top_k, vocab_size=27
                ),
                argnums=(0, 1),
            )(jnp.asarray(zs), jnp.asarray(zt))
            assert np.all(np.isfinite(np.asarray(gs))), (scale, top_k)
            assert np.all(np.isfinite(np.asarray(gt))), (scale, top_k)
            # Padded teacher columns beyond vocab_size get no gradient.
            assert np.all(np.asarray(gt)[..., 27:] == 0.0)
            if not mask.any():
                assert np.all(np.asarray(gs) == 0.0)
            else:  # kept tokens do get one
                assert np.abs(np.asarray(gs)[mask]).max() > 0, (scale, top_k)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_minus_inf_logits_are_columns_off_the_support(kind):
    """Logits set to -inf (a common way to drop vocabulary columns) count as 0 log 0 = 0, not NaN: the value is
    the reference's and the gradient is the one of the logits without those columns (zero on them)."""
    zs, zt = random_logits(90, v_s=12, v_t=12)
    zs[..., 9:] = zt[..., 9:] = -np.inf
    loss = lambda a, b: kd_loss(a, b, kind=kind, temperature=1.5)  # noqa: E731
    got = loss(jnp.asarray(zs), jnp.asarray(zt))
    np.testing.assert_allclose(float(got), np_kd_loss(zs, zt, kind=kind, tau=1.5), **F32_TOL)
    grad = np.asarray(jax.grad(loss)(jnp.asarray(zs), jnp.asarray(zt)))
    cut = np.asarray(jax.grad(loss)(jnp.asarray(zs[..., :9]), jnp.asarray(zt[..., :9])))
    np.testing.assert_allclose(grad[..., :9], cut, **F32_TOL)
    assert np.all(grad[..., 9:] == 0.0)
    if kind == "forward_kl":  # a column only the teacher drops: p_T = 0 there, the divergence stays finite
        zt[..., 3] = -np.inf
        np.testing.assert_allclose(float(loss(jnp.asarray(zs), jnp.asarray(zt))),
                                   np_kd_loss(zs, zt, kind=kind, tau=1.5), **F32_TOL)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_error_vocab_mismatch_without_vocab_size():
    zs, zt = map(jnp.asarray, random_logits(80, v_s=30, v_t=32))
    with pytest.raises(ValueError, match=r"vocab dim 30 != teacher vocab dim 32.*vocab_size"):
        kd_loss(zs, zt)


def test_error_vocab_size_too_large():
    zs, zt = map(jnp.asarray, random_logits(81, v_s=30, v_t=32))
    with pytest.raises(ValueError, match=r"vocab_size=31 is larger"):
        kd_loss(zs, zt, vocab_size=31)
    with pytest.raises(ValueError, match=r"vocab_size=33 must be in \[1, 32\]"):
        cross_entropy_loss(zt, jnp.zeros((3, 5), jnp.int32), vocab_size=33)


def test_error_bad_kind():
    zs, zt = map(jnp.asarray, random_logits(82))
    valid = r"forward_kl, reverse_kl, jsd, tvd, skew_kl"
    with pytest.raises(ValueError, match=r"Unknown KD loss kind 'kl'.*" + valid):
        kd_loss(zs, zt, kind="kl")


@pytest.mark.parametrize("tau", (0.0, -1.0))
def test_error_bad_temperature(tau):
    zs, zt = map(jnp.asarray, random_logits(83))
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        kd_loss(zs, zt, temperature=tau)


@pytest.mark.parametrize("beta", (0.0, 1.0, -0.2, 1.5))
def test_error_bad_beta(beta):
    zs, zt = map(jnp.asarray, random_logits(84))
    with pytest.raises(ValueError, match=r"jsd needs 0 < beta < 1"):
        kd_loss(zs, zt, kind="jsd", beta=beta)


@pytest.mark.parametrize("skew", (1.0, -0.1))
def test_error_bad_skew(skew):
    zs, zt = map(jnp.asarray, random_logits(85))
    with pytest.raises(ValueError, match=r"skew_kl needs 0 <= skew < 1"):
        kd_loss(zs, zt, kind="skew_kl", skew=skew)


def test_error_topk_with_reverse_kl():
    zs, zt = map(jnp.asarray, random_logits(86))
    with pytest.raises(ValueError, match=r"teacher_top_k cannot be used with kind='reverse_kl'"):
        kd_loss(zs, zt, kind="reverse_kl", teacher_top_k=5)


def test_error_bad_top_k_and_mask_shape():
    zs, zt = map(jnp.asarray, random_logits(87))
    with pytest.raises(ValueError, match=r"teacher_top_k=40 is larger than the vocab size 32"):
        kd_loss(zs, zt, teacher_top_k=40)
    with pytest.raises(ValueError, match=r"teacher_top_k must be >= 1"):
        kd_loss(zs, zt, teacher_top_k=0)
    with pytest.raises(ValueError, match=r"mask has shape \(5,\).*\(3, 5\)"):
        kd_loss(zs, zt, jnp.ones((5,), bool))


# ---------------------------------------------------------------------------
# Cross-entropy and accuracy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mask_mode", MASK_MODES)
@pytest.mark.parametrize("cut", (False, True))
def test_cross_entropy_and_accuracy(mask_mode, cut):
    rng = np.random.default_rng(90)
    lead, v = (3, 5), 32
    z = (3.0 * rng.standard_normal(lead + (v,))).astype(np.float32)
    vocab_size = 27 if cut else None
    labels = rng.integers(0, vocab_size or v, size=lead)
    # Make some predictions right so accuracy is not trivially ~0.
    labels[:, :3] = z[:, :3, : (vocab_size or v)].argmax(-1)
    if cut:
        z[..., 27:] += 10.0  # padded columns would win argmax and CE if not cut
    mask = make_mask(mask_mode, lead, 90)

    ce = cross_entropy_loss(jnp.asarray(z), jnp.asarray(labels), mask, vocab_size=vocab_size)
    acc = token_accuracy(jnp.asarray(z), jnp.asarray(labels), mask, vocab_size=vocab_size)
    assert ce.dtype == jnp.float32 and ce.shape == () and acc.dtype == jnp.float32
    np.testing.assert_allclose(float(ce), np_cross_entropy(z, labels, mask, vocab_size), **F32_TOL)
    np.testing.assert_allclose(float(acc), np_accuracy(z, labels, mask, vocab_size), **F32_TOL)
    if mask_mode == "all_zero":
        assert float(ce) == 0.0 and float(acc) == 0.0
    else:
        assert 0.0 < float(acc) < 1.0


def test_cross_entropy_bf16_and_ignore_index():
    rng = np.random.default_rng(91)
    z = jnp.asarray(rng.standard_normal((3, 5, 32)), jnp.bfloat16)
    labels = rng.integers(0, 32, size=(3, 5))
    mask = np.ones((3, 5), bool)
    labels[0, 0], mask[0, 0] = -100, False  # ignore-index on a masked token is fine
    ce = cross_entropy_loss(z, jnp.asarray(labels), mask)
    assert ce.dtype == jnp.float32
    want = np_cross_entropy(np.asarray(z.astype(jnp.float32)), np.where(mask, labels, 0), mask)
    np.testing.assert_allclose(float(ce), want, **F32_TOL)
    # ... but an invalid label on a token that counts poisons the loss.
    assert np.isnan(float(cross_entropy_loss(z, jnp.asarray(labels))))


def test_cross_entropy_grad_is_softmax_minus_onehot():
    rng = np.random.default_rng(92)
    z = rng.standard_normal((3, 5, 32)).astype(np.float32)
    labels = rng.integers(0, 32, size=(3, 5))
    g = jax.grad(lambda a: cross_entropy_loss(a, jnp.asarray(labels)))(jnp.asarray(z))
    want = (np_softmax(z.astype(np.float64)) - np.eye(32)[labels]) / 15
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-7)
