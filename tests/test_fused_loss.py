"""Tests for the fused (chunked) KD + CE loss in jaxkd.fused_loss.

The reference is the unfused loss on materialised logits (``kd_loss`` and
``cross_entropy_loss`` of ``h @ W``, themselves tested against float64 NumPy in
test_losses.py) and its ``jax.grad``; the aux metrics are checked against NumPy.
Shapes are tiny and deliberately awkward: N=37 tokens is not a multiple of the
chunk sizes 8 and 16, and the student head (53 columns) is wider than the
teacher's (50) and the vocabulary (50), so padding rows and cut columns are
always exercised.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxkd import fused_loss
from jaxkd.fused_loss import (
    fused_cross_entropy_loss,
    fused_distill_sums,
    fused_kd_loss,
)
from jaxkd.losses import (
    KD_KINDS,
    cross_entropy_loss,
    distill_sums,
    kd_loss,
)

N, D_S, D_T = 37, 16, 24
V_S, V_T, VOCAB = 53, 50, 50
TOL = dict(rtol=1e-5, atol=1e-6)


def make_inputs(seed, *, n=N, d_s=D_S, d_t=D_T, v_s=V_S, v_t=V_T, vocab=VOCAB, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    h_s = rng.standard_normal((n, d_s))
    w_s = rng.standard_normal((d_s, v_s)) * 0.6
    h_t = rng.standard_normal((n, d_t))
    w_t = rng.standard_normal((d_t, v_t)) * 0.6
    # Make the padded columns attractive, so that failing to cut them would
    # visibly change every number.
    w_s[:, vocab:] += 2.0
    labels = rng.integers(0, vocab, n)
    mask = rng.random(n) < 0.7
    mask[0] = True
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return cast(h_s), cast(w_s), cast(h_t), cast(w_t), jnp.asarray(labels, jnp.int32), jnp.asarray(mask)


def reference_sums(h_s, w_s, h_t, w_t, labels, mask, *, alpha, vocab_size=VOCAB, **kd_kw):
    """alpha * tau^2 sum D + (1 - alpha) sum CE from the unfused means."""
    count = jnp.maximum(jnp.sum(mask if mask is not None else jnp.ones(h_s.shape[0])), 1.0)
    zs, zt = h_s @ w_s, h_t @ w_t
    kd = kd_loss(zs, zt, mask, vocab_size=vocab_size, **kd_kw) * count
    ce = cross_entropy_loss(zs, labels, mask, vocab_size=vocab_size) * count
    return alpha * kd + (1 - alpha) * ce


def assert_close_tree(got, want, **tol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), **tol)


# ---------------------------------------------------------------------------
# Value and gradient against the unfused loss
# ---------------------------------------------------------------------------

# Compiling is most of these tests' time on CPU. Several cases go into one jit
# (one compilation each for the fused and the unfused side) and LLVM's
# expensive passes are skipped: that changes how fast the code runs, not what
# it computes. The memory test below compiles normally.
FAST = dict(compiler_options={"xla_backend_optimization_level": 0,
                              "xla_llvm_disable_expensive_passes": True})


def kd_variants(kind, mask):
    """(fused kwargs, mask) cases: tau 1 and 2, top-k, vocab cut or not, chunks."""
    top_k = None if kind == "reverse_kl" else 5
    return [
        # Masked, heads 53/50 wide cut to 47, chunk 8 (37 = 4 chunks + 3 padding rows).
        (dict(kind=kind, temperature=1.0, teacher_top_k=None, vocab_size=47, chunk_size=8), mask),
        # Unmasked, top-k, no cut (student head sliced to 50 columns), chunk 16.
        (dict(kind=kind, temperature=2.0, teacher_top_k=top_k, vocab_size=None, chunk_size=16), None),
    ]


@pytest.mark.parametrize("kind", KD_KINDS)
def test_fused_value_and_grad_match_unfused(kind):
    h_s, w_s, h_t, w_t, labels, mask = make_inputs(KD_KINDS.index(kind))
    variants = kd_variants(kind, mask)
    mix_kw = dict(kind=kind, temperature=2.0, beta=0.3, skew=0.2,
                  teacher_top_k=None if kind == "reverse_kl" else 7)
    # alpha 1 (a Python number) takes its own path: CE reported, not differentiated.
    alphas = (0.3, 1.0) if kind == "forward_kl" else (0.3,)

    def student_head(w_s, kw):
        return w_s if kw["vocab_size"] is not None else w_s[:, :V_T]

    def fused(h_s, w_s, h_t, w_t):
        out = []
        for kw, m in variants:
            f = lambda *a, kw=kw, m=m: fused_kd_loss(*a, m, **kw)  # noqa: E731
            out.append(jax.value_and_grad(f, argnums=(0, 1, 2, 3))(h_s, student_head(w_s, kw), h_t, w_t))
        # The CE + KD mix, as sums (masked, top-k, vocab cut).
        for alpha in alphas:
            f = lambda h, w, alpha=alpha: fused_distill_sums(  # noqa: E731
                h, w, labels, mask, h_t, w_t, alpha=alpha, vocab_size=VOCAB, chunk_size=8, **mix_kw)[0]
            out.append(jax.value_and_grad(f, argnums=(0, 1))(h_s, w_s))
        return out

    def unfused(h_s, w_s):
        out = []
        for kw, m in variants:
            kw = {k: v for k, v in kw.items() if k != "chunk_size"}
            f = lambda h, w, kw=kw, m=m: kd_loss(h @ w, h_t @ w_t, m, **kw)  # noqa: E731
            out.append(jax.value_and_grad(f, argnums=(0, 1))(h_s, student_head(w_s, kw)))
        for alpha in alphas:
            f = lambda h, w, alpha=alpha: reference_sums(  # noqa: E731
                h, w, h_t, w_t, labels, mask, alpha=alpha, **mix_kw)
            out.append(jax.value_and_grad(f, argnums=(0, 1))(h_s, w_s))
        return out

    got = jax.jit(fused, **FAST)(h_s, w_s, h_t, w_t)
    want = jax.jit(unfused, **FAST)(h_s, w_s)
    for i, ((value, grads), (want_value, want_grads)) in enumerate(zip(got, want)):
        assert value.dtype == jnp.float32 and value.shape == ()
        np.testing.assert_allclose(float(value), float(want_value), **TOL, err_msg=f"case {i}")
        # The mix cases are sums over ~26 tokens: absolute sizes ~26x a mean's.
        atol = TOL["atol"] if i < len(variants) else 1e-5
        for g, w in zip(grads[:2], want_grads):
            np.testing.assert_allclose(g, w, rtol=TOL["rtol"], atol=atol, err_msg=f"case {i}")
        # The teacher is frozen: exactly zero, not merely small.
        for g in grads[2:]:
            assert not np.any(np.asarray(g)), f"case {i}"


def test_fused_cross_entropy_matches_cross_entropy_loss():
    h_s, w_s, _, _, labels, mask = make_inputs(200)
    # An ignore index on masked-out tokens must be harmless.
    ignore = jnp.where(mask, labels, -100)
    cases = [  # (labels, mask, chunk)
        (labels, None, 8),
        (ignore, mask, 16),
        (ignore, jnp.zeros(N, bool), 1024),  # nothing kept: 0, not NaN
    ]

    def fused(h, w):
        return [jax.value_and_grad(lambda h, w, l=l, m=m, c=c: fused_cross_entropy_loss(  # noqa: E731
            h, w, l, m, vocab_size=VOCAB, chunk_size=c), argnums=(0, 1))(h, w) for l, m, c in cases]

    def unfused(h, w):
        return [jax.value_and_grad(lambda h, w, l=l, m=m: cross_entropy_loss(  # noqa: E731
            h @ w, l, m, vocab_size=VOCAB), argnums=(0, 1))(h, w) for l, m, _ in cases]

    got = jax.jit(fused, **FAST)(h_s, w_s)
    want = jax.jit(unfused, **FAST)(h_s, w_s)
    assert float(got[2][0]) == 0.0
    assert_close_tree(got, want, **TOL)


def test_invalid_label_on_kept_token_gives_nan_like_cross_entropy():
    h_s, w_s, _, _, labels, _ = make_inputs(3)
    labels = labels.at[4].set(VOCAB)  # a padded column: not a real token
    fused = jax.jit(lambda h, w: fused_cross_entropy_loss(h, w, labels, vocab_size=VOCAB, chunk_size=8), **FAST)
    assert np.isnan(float(fused(h_s, w_s)))  # as cross_entropy_loss (see test_losses.py)


# ---------------------------------------------------------------------------
# aux metrics against NumPy
# ---------------------------------------------------------------------------


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_aux_metrics_match_numpy():
    h_s, w_s, _, _, labels, mask = make_inputs(7)
    rng = np.random.default_rng(7)
    # A teacher that is the student plus noise, so that top-1 agreement is
    # neither 0 nor everything; and labels that are the student's argmax on
    # about half the tokens, for the same reason with accuracy.
    h_t = jnp.concatenate([h_s, jnp.asarray(rng.standard_normal((N, D_T - D_S)), jnp.float32)], axis=1)
    w_t = jnp.concatenate([w_s[:, :V_T], jnp.asarray(rng.standard_normal((D_T - D_S, V_T)), jnp.float32)])
    zs = np.asarray(h_s, np.float64) @ np.asarray(w_s, np.float64)
    zt = np.asarray(h_t, np.float64) @ np.asarray(w_t, np.float64)
    zs, zt = zs[:, :VOCAB], zt[:, :VOCAB]
    lab = np.where(rng.random(N) < 0.5, zs.argmax(-1), np.asarray(labels))
    kd_kw = dict(kind="jsd", temperature=2.0, teacher_top_k=5, vocab_size=VOCAB)

    def run(h_s, w_s, h_t, w_t):
        _, aux = fused_distill_sums(h_s, w_s, jnp.asarray(lab, jnp.int32), mask, h_t, w_t,
                                    alpha=0.5, chunk_size=16, **kd_kw)
        return aux, kd_loss(h_s @ w_s, h_t @ w_t, mask, **kd_kw)

    aux, kd_mean = jax.jit(run, **FAST)(h_s, w_s, h_t, w_t)
    m = np.asarray(mask)
    lps, lpt = np_log_softmax(zs), np_log_softmax(zt)
    rows = np.arange(N)
    want = {
        "count": m.sum(),
        "ce_sum": -lps[rows, lab][m].sum(),
        "teacher_ce_sum": -lpt[rows, lab][m].sum(),
        "correct_sum": (zs.argmax(-1) == lab)[m].sum(),
        "agree_sum": (zs.argmax(-1) == zt.argmax(-1))[m].sum(),
        # Monitoring KL: temperature 1, full teacher, whatever kind/top-k.
        "kl1_sum": (np.exp(lpt) * (lpt - lps)).sum(-1)[m].sum(),
        "kd_sum": float(kd_mean) * m.sum(),  # kd_loss is checked against NumPy elsewhere
    }
    assert 0 < want["agree_sum"] < want["count"] and 0 < want["correct_sum"] < want["count"]
    assert set(aux) == set(want)
    for name, value in want.items():
        assert aux[name].dtype == jnp.float32 and aux[name].shape == (), name
        np.testing.assert_allclose(float(aux[name]), value, rtol=2e-5, err_msg=name)


def test_aux_metrics_have_no_gradient_and_ce_only_has_no_teacher_keys():
    h_s, w_s, h_t, w_t, labels, mask = make_inputs(8)

    def aux_total(h):
        _, aux = fused_distill_sums(h, w_s, labels, mask, h_t, w_t, alpha=0.5, vocab_size=VOCAB, chunk_size=8)
        return aux["ce_sum"] + aux["kd_sum"] + aux["kl1_sum"]

    def ce_only(h):
        return fused_distill_sums(h, w_s, labels, mask, h_t, w_t, alpha=0.0, vocab_size=VOCAB, chunk_size=8)

    aux_grad, (w, aux) = jax.jit(lambda h: (jax.grad(aux_total)(h), ce_only(h)), **FAST)(h_s)
    assert not np.any(np.asarray(aux_grad))
    # alpha == 0 (a Python number): CE only, the teacher is not even looked at.
    assert set(aux) == {"ce_sum", "correct_sum", "count", "kd_sum"}
    assert float(aux["kd_sum"]) == 0.0
    np.testing.assert_allclose(float(w), float(aux["ce_sum"]), rtol=1e-6)
    np.testing.assert_allclose(float(w), float(reference_sums(h_s, w_s, h_t, w_t, labels, mask, alpha=0.0)), **TOL)
    jaxpr = jax.make_jaxpr(
        lambda h_t, w_t: fused_distill_sums(h_s, w_s, labels, mask, h_t, w_t, alpha=0.0, vocab_size=VOCAB)[0]
    )(h_t, w_t)
    used = {id(v) for eqn in jaxpr.jaxpr.eqns for v in eqn.invars}
    assert not used & {id(v) for v in jaxpr.jaxpr.invars}  # h_t, w_t: never read


def test_fused_sums_equal_the_materialised_objective():
    """losses.distill_sums (what distill.fused=False trains on) and fused_distill_sums: the same weighted sum,
    gradient and aux sums, with a teacher (skew KL, top-k, vocab cut) and without one."""
    h_s, w_s, h_t, w_t, labels, mask = make_inputs(9)
    mask = mask.astype(jnp.float32)  # as the train step passes it
    kw = dict(kind="skew_kl", temperature=2.0, beta=0.5, skew=0.2, vocab_size=VOCAB, teacher_top_k=5)
    cases = [((h_t, w_t), 0.3), ((None, None), 0.0)]

    def run(sums, **extra):
        def each(h_s, w_s):
            out = []
            for t, a in cases:
                f = lambda h, w, t=t, a=a: sums(h, w, labels, mask, *t, alpha=a, **kw, **extra)  # noqa: E731
                out.append(jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h_s, w_s))
            return out
        return jax.jit(each, **FAST)(h_s, w_s)

    got = run(fused_distill_sums, chunk_size=8)
    want = run(distill_sums)
    for i, (((value, aux), grads), ((want_value, want_aux), want_grads)) in enumerate(zip(got, want)):
        np.testing.assert_allclose(float(value), float(want_value), rtol=2e-5, err_msg=f"case {i}")
        for g, w in zip(grads, want_grads):
            np.testing.assert_allclose(g, w, rtol=TOL["rtol"], atol=1e-5, err_msg=f"case {i}")
        assert set(want_aux) <= set(aux), f"case {i}"
        for name in want_aux:
            np.testing.assert_allclose(float(aux[name]), float(want_aux[name]), rtol=2e-5, err_msg=f"{name}, case {i}")


# ---------------------------------------------------------------------------
# Hyperparameters, dtypes, masking
# ---------------------------------------------------------------------------


def test_traced_hyperparameters_under_jit_equal_static():
    h_s, w_s, h_t, w_t, labels, mask = make_inputs(9)

    def run(h, tau, beta, alpha):
        return fused_distill_sums(h, w_s, labels, mask, h_t, w_t, alpha=alpha, kind="jsd",
                                  temperature=tau, beta=beta, vocab_size=VOCAB, chunk_size=8)[0]

    def both(h, tau, beta, alpha):
        static = jax.value_and_grad(lambda h: run(h, 2.0, 0.3, 0.6))(h)  # Python floats
        traced = jax.value_and_grad(run)(h, tau, beta, alpha)  # jit arguments: traced
        return static, traced

    (static_v, static_g), (traced_v, traced_g) = jax.jit(both, **FAST)(h_s, 2.0, 0.3, 0.6)
    np.testing.assert_allclose(float(traced_v), float(static_v), **TOL)
    np.testing.assert_allclose(traced_g, static_g, **TOL)
    want = reference_sums(h_s, w_s, h_t, w_t, labels, mask, alpha=0.6, kind="jsd", temperature=2.0, beta=0.3)
    np.testing.assert_allclose(float(static_v), float(want), **TOL)  # both are the loss, not merely equal


def test_bf16_inputs():
    # bf16 hidden states and heads: the matmuls accumulate bf16 x bf16 products
    # (exact in float32) in float32 and the softmax math is float32, so the
    # value equals the float32 loss on the same (bf16-representable) numbers to
    # float32 rounding. The gradients go through the matmuls in bf16, as in the
    # unfused backward pass, and are returned in bf16: 1% of their scale.
    h_s, w_s, h_t, w_t, labels, mask = make_inputs(11, dtype=jnp.bfloat16)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    def fused(h, w):
        return [jax.value_and_grad(lambda h, w, kind=kind: fused_distill_sums(  # noqa: E731
            h, w, labels, mask, h_t, w_t, alpha=0.5, kind=kind, temperature=2.0, vocab_size=VOCAB,
            chunk_size=8)[0], argnums=(0, 1))(h, w) for kind in KD_KINDS]

    def unfused(h, w):
        return [jax.value_and_grad(lambda h, w, kind=kind: reference_sums(  # noqa: E731
            h, w, f32(h_t), f32(w_t), labels, mask, alpha=0.5, kind=kind, temperature=2.0),
            argnums=(0, 1))(h, w) for kind in KD_KINDS]

    got = jax.jit(fused, **FAST)(h_s, w_s)
    want = jax.jit(unfused, **FAST)(f32(h_s), f32(w_s))
    for kind, (value, grads), (want_value, want_grads) in zip(KD_KINDS, got, want):
        np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5, err_msg=kind)
        for g, w in zip(grads, want_grads):
            assert g.dtype == jnp.bfloat16
            np.testing.assert_allclose(f32(g), w, atol=1e-2 * float(jnp.abs(w).max()), err_msg=kind)


def test_masked_out_garbage_does_not_leak():
    h_s, w_s, h_t, w_t, labels, mask = make_inputs(12)
    mask = mask.at[5].set(False).at[20].set(False)
    bad_s = h_s.at[5].set(jnp.nan).at[20].set(jnp.inf)
    bad_t = h_t.at[5].set(jnp.inf).at[20].set(jnp.nan)
    bad_labels = labels.at[5].set(-100)

    def f(h_s, w_s, h_t, labels):
        return fused_distill_sums(h_s, w_s, labels, mask, h_t, w_t, alpha=0.5, kind="forward_kl", temperature=1.0,
                                  vocab_size=VOCAB, chunk_size=8)[0]

    step = jax.jit(jax.value_and_grad(f, argnums=(0, 1)), **FAST)
    clean = step(h_s, w_s, h_t, labels)
    dirty = step(bad_s, w_s, bad_t, bad_labels)
    assert_close_tree(dirty, clean, **TOL)
    want = reference_sums(h_s, w_s, h_t, w_t, labels, mask, alpha=0.5, kind="forward_kl", temperature=1.0)
    np.testing.assert_allclose(float(clean[0]), float(want), **TOL)  # the loss of the kept tokens, not a constant


def test_errors():
    h_s, w_s, h_t, w_t, labels, mask = make_inputs(13)
    with pytest.raises(ValueError, match="pass vocab_size"):
        fused_kd_loss(h_s, w_s, h_t, w_t)  # 53 vs 50 columns
    with pytest.raises(ValueError, match="larger than the logits' vocab dims"):
        fused_kd_loss(h_s, w_s, h_t, w_t, vocab_size=51)
    with pytest.raises(ValueError, match="teacher_top_k=60 is larger"):
        fused_kd_loss(h_s, w_s, h_t, w_t, vocab_size=VOCAB, teacher_top_k=60)
    with pytest.raises(ValueError, match="reverse_kl"):
        fused_kd_loss(h_s, w_s, h_t, w_t, vocab_size=VOCAB, kind="reverse_kl", teacher_top_k=3)
    with pytest.raises(ValueError, match="Unknown KD loss kind"):
        fused_kd_loss(h_s, w_s, h_t, w_t, vocab_size=VOCAB, kind="kl")
    with pytest.raises(ValueError, match="both teacher_hidden and teacher_head"):
        fused_distill_sums(h_s, w_s, labels, mask, h_t, None, alpha=0.5)
    # jax.make_mesh's default axis type: the vocab-split code paths are written for Auto axes.
    explicit = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(explicit), pytest.raises(ValueError, match=r"axes \['fsdp', 'tensor'\] are Explicit"):
        fused_kd_loss(h_s, w_s, h_t, w_t, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="teacher has 36 tokens"):
        fused_distill_sums(h_s, w_s, labels, mask, h_t[1:], w_t, alpha=0.5, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="hidden width 16 != head input dim 24"):
        fused_cross_entropy_loss(h_s, w_t, labels)
    with pytest.raises(ValueError, match=r"\[tokens, width\]"):
        fused_cross_entropy_loss(h_s[None], w_s, labels)
    with pytest.raises(ValueError, match="one integer label per row"):
        fused_cross_entropy_loss(h_s, w_s, labels[:-1])
    with pytest.raises(ValueError, match="mask has shape"):
        fused_cross_entropy_loss(h_s, w_s, labels, mask[:-1])
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fused_cross_entropy_loss(h_s, w_s, labels, chunk_size=0)


# ---------------------------------------------------------------------------
# The [N, V] logits never exist
# ---------------------------------------------------------------------------


def _all_avals(jaxpr):
    """Every variable's aval in a jaxpr and the jaxprs nested in its equations."""
    for var in list(jaxpr.invars) + list(jaxpr.constvars):
        yield var.aval
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield var.aval
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _all_avals(inner)


def _full_vocab_arrays(fn, *args, n_tokens, vocab):
    """Arrays in the jaxpr of fn with at least n_tokens * vocab elements."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return sorted({
        tuple(a.shape) for a in _all_avals(jaxpr)
        if hasattr(a, "shape") and np.prod(a.shape, dtype=np.int64) >= n_tokens * vocab
    })


def test_gradient_never_materialises_token_by_vocab_arrays():
    h_s, w_s, h_t, w_t, labels, mask = make_inputs(14)
    kw = dict(kind="jsd", temperature=2.0, teacher_top_k=5, vocab_size=VOCAB)

    def fused(h, w):
        return fused_distill_sums(h, w, labels, mask, h_t, w_t, alpha=0.5, chunk_size=8, **kw)[0]

    def naive(h, w):
        return reference_sums(h, w, h_t, w_t, labels, mask, alpha=0.5, **kw)

    # Any [37, 50]-sized array (or bigger: a stack of chunks counts too) is a
    # materialised logits array; the heads (16/24 x 53) and d(hidden) are smaller.
    grad = lambda f: jax.grad(f, argnums=(0, 1))  # noqa: E731
    assert _full_vocab_arrays(grad(naive), h_s, w_s, n_tokens=N, vocab=VOCAB)  # the check bites
    assert _full_vocab_arrays(grad(fused), h_s, w_s, n_tokens=N, vocab=VOCAB) == []


def _temp_bytes(fn, *shapes):
    compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_temporary_memory_is_small_and_flat_in_tokens():
    d, v, chunk = 64, 8192, 512
    S = jax.ShapeDtypeStruct

    def shapes(n):
        return (S((n, d), jnp.float32), S((d, v), jnp.float32), S((n, d), jnp.float32),
                S((d, v), jnp.float32), S((n,), jnp.int32), S((n,), jnp.bool_))

    def fused(h_s, w_s, h_t, w_t, labels, mask):
        return fused_distill_sums(h_s, w_s, labels, mask, h_t, w_t, alpha=0.5, chunk_size=chunk)[0]

    def naive(h_s, w_s, h_t, w_t, labels, mask):
        return reference_sums(h_s, w_s, jax.lax.stop_gradient(h_t), w_t, labels, mask,
                              alpha=0.5, vocab_size=None)

    naive_4k = _temp_bytes(naive, *shapes(4096))
    fused_4k = _temp_bytes(fused, *shapes(4096))
    fused_16k = _temp_bytes(fused, *shapes(16384))
    # One [4096, 8192] float32 array alone is 128 MiB; the naive loss holds several.
    assert naive_4k > 2 * 4096 * v * 4
    assert fused_4k <= naive_4k / 4, (fused_4k, naive_4k)
    assert fused_16k <= 1.25 * fused_4k, (fused_16k, fused_4k)


def test_default_chunk_keeps_temporaries_under_the_budget_whatever_the_vocabulary_and_tokens():
    """chunk_size=None takes `chunk_for` the heads' width and the byte budget: the compiled loss's temporaries, less
    what does not depend on the chunk (the heads' float32 gradient and the hidden states'), stay under the budget
    from 4k to 64k columns and from 2k to 16k tokens, where a fixed chunk of 1024 tokens takes 10 times it at 64k
    columns. (How much of the budget is used depends on how many [chunk, V] arrays XLA keeps alive: about 6 at
    Qwen2's shapes in bfloat16, `LIVE_CHUNK_ARRAYS`, fewer at these small float32 ones; BENCHMARKS.md has Qwen2's.)"""
    d, budget = 16, 32 * 2**20
    S = jax.ShapeDtypeStruct

    def temp(n, v, chunk_size):
        def fused(h_s, w_s, h_t, w_t, labels, mask):
            return fused_distill_sums(h_s, w_s, labels, mask, h_t, w_t, alpha=0.5, chunk_size=chunk_size,
                                      chunk_budget=budget)[0]
        shapes = (S((n, d), jnp.float32), S((d, v), jnp.float32), S((n, d), jnp.float32), S((d, v), jnp.float32),
                  S((n,), jnp.int32), S((n,), jnp.bool_))
        return _temp_bytes(fused, *shapes) - 4 * (2 * d * v + 2 * n * d)  # d(head) and its float32 copy, d(hidden)

    assert [fused_loss.chunk_for(v, budget) for v in (4096, 16384, 65536)] == [256, 80, 16]  # 341, 85, 21 rounded
    got = [temp(n, v, None) for v in (4096, 16384, 65536) for n in (2048, 16384)]
    assert all(t <= budget for t in got), [t / budget for t in got]
    assert temp(2048, 65536, 1024) > 10 * budget  # the check bites


def test_default_chunk_scales_with_the_token_shards_and_splits_the_vocabulary_ways():
    """Under a (data 2, fsdp 2, tensor 2) mesh each device holds a quarter of the chunk's tokens and half its
    columns: the chunk is 8 times as long for the same bytes on a device."""
    alone = fused_loss.chunk_for(65536, 2**26)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        assert fused_loss.chunk_for(65536, 2**26) == 8 * alone


# ---------------------------------------------------------------------------
# Tensor parallelism: vocab-sharded heads
# ---------------------------------------------------------------------------


def test_vocab_sharded_heads_match_and_never_gather_full_vocab():
    # V = 64 is a size used by no other dim, so any 64 in the compiled HLO is a
    # full-vocab-wide array on some device. Tokens (48 = 3 chunks of 16) are
    # also split over fsdp, as in data-parallel training. Two cases in one
    # program: the full teacher, and top-k (selected shard by shard).
    n, v = 48, 64
    h_s, w_s, h_t, w_t, labels, mask = make_inputs(15, n=n, v_s=v, v_t=v, vocab=VOCAB)

    def step(h_s, w_s, h_t, w_t):
        out = []
        for top_k in (None, 5):
            def f(h_s, w_s, top_k=top_k):
                return fused_distill_sums(
                    h_s, w_s, labels, mask, jax.lax.stop_gradient(h_t), jax.lax.stop_gradient(w_t),
                    alpha=0.5, kind="jsd", temperature=2.0, teacher_top_k=top_k, vocab_size=VOCAB,
                    chunk_size=16)
            out.append(jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h_s, w_s))
        return out

    want = jax.jit(step, **FAST)(h_s, w_s, h_t, w_t)

    mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    heads = NamedSharding(mesh, P(None, "tensor"))
    tokens = NamedSharding(mesh, P(("data", "fsdp"), None))
    args = (jax.device_put(h_s, tokens), jax.device_put(w_s, heads),
            jax.device_put(h_t, tokens), jax.device_put(w_t, heads))
    with jax.set_mesh(mesh):
        # FAST only skips LLVM passes; the SPMD partitioning checked below is unchanged.
        jitted = jax.jit(step, **FAST)
        got = jitted(*args)
        hlo = jitted.lower(*args).compile().as_text()

    assert_close_tree(got, want, rtol=1e-5, atol=1e-5)
    for (_, aux), (_, d_head) in got:
        assert d_head.sharding.spec == P(None, "tensor")  # d(head) stays split

    dims = {int(d) for shape in re.findall(r"\b[a-z]+\d*\[([\d,]+)\]", hlo) for d in shape.split(",")}
    assert v // 4 in dims  # the logits really are split four ways ...
    assert v not in dims  # ... and no array anywhere is the full vocab wide
