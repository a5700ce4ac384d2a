"""Attention kernels: XLA against float64 NumPy on packed rows, the kernel choice, splash in interpret mode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkd import sharding
from jaxkd.models import ModelConfig, Transformer
from jaxkd.models.transformer import Attention, positions_from_segments, rope_cos_sin
from jaxkd.models import attention as attn


def _reference(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, seg_BxT, scale):
  """Float64 NumPy attention, one query at a time: keys j <= i of the same segment."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH))
  b, t, n, _ = q.shape
  group = n // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for i in range(t):
      keys = [j for j in range(i + 1) if seg_BxT[bi, j] == seg_BxT[bi, i]]
      for h in range(n):
        logits = scale * k[bi, keys, h // group] @ q[bi, i, h]
        p = np.exp(logits - logits.max())
        out[bi, i, h] = (p / p.sum()) @ v[bi, keys, h // group]
  return out


def _packed_segments(b, t):
  """Several documents per row, right padding, left padding on one row and a row without padding."""
  seg = np.zeros((b, t), np.int32)
  rng = np.random.RandomState(1)
  for r in range(b):
    start = 3 if r == 1 else 0
    end = t if r == 2 else t - 5
    cuts = np.sort(rng.choice(np.arange(start + 1, end), size=2, replace=False))
    seg[r, start:cuts[0]], seg[r, cuts[0]:cuts[1]], seg[r, cuts[1]:end] = 1, 2, 3
  return seg


def _qkv(b, t, n, k, h, dtype=jnp.float32, seed=0):
  rng = np.random.RandomState(seed)
  return tuple(jnp.asarray(rng.randn(b, t, heads, h), dtype) for heads in (n, k, k))


def test_xla_matches_float64_reference_packed_gqa():
  q, k, v = _qkv(3, 24, 6, 2, 8)
  seg = _packed_segments(3, 24)
  with jax.default_matmul_precision("highest"):
    out = jax.jit(lambda q, k, v: attn.dot_product_attention(q, k, v, seg, scale=8 ** -0.5,
                                                             implementation="xla"))(q, k, v)
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, seg, 8 ** -0.5), atol=1e-5, rtol=0)


def test_auto_on_cpu_is_xla():
  q, k, v = _qkv(2, 16, 4, 2, 8)
  seg = _packed_segments(2, 16)
  assert attn.choose_implementation("auto", backend="cpu", dtype=jnp.bfloat16, head_dim=8, q_len=16,
                                    kv_len=16).implementation == "xla"
  run = lambda impl: attn.dot_product_attention(q, k, v, seg, scale=0.3, implementation=impl)  # noqa: E731
  np.testing.assert_array_equal(np.asarray(run("auto")), np.asarray(run("xla")))


GPU = dict(backend="gpu", head_dim=128, q_len=2048, kv_len=2048, capability=(9, 0))


@pytest.mark.parametrize("kw, expected, reason", [
    (dict(dtype=jnp.bfloat16), "cudnn", ""),
    (dict(dtype=jnp.float16), "cudnn", ""),
    (dict(dtype=jnp.float32), "xla", "float32"),
    (dict(dtype=jnp.bfloat16, head_dim=160, capability=(8, 0)), "xla", "head dim 160"),
    (dict(dtype=jnp.bfloat16, head_dim=160), "cudnn", ""),  # Hopper takes up to 256
    (dict(dtype=jnp.bfloat16, head_dim=260), "xla", "head dim 260"),
    (dict(dtype=jnp.bfloat16, head_dim=100), "xla", "multiple of 8"),
    (dict(dtype=jnp.bfloat16, q_len=2047, kv_len=2047), "xla", "odd sequence length"),
    (dict(dtype=jnp.bfloat16, capability=(7, 5)), "xla", "compute capability"),
    (dict(dtype=jnp.bfloat16, cuda=False), "xla", "CUDA"),
    (dict(dtype=jnp.bfloat16, cudnn=False), "xla", "cuDNN was not found"),
])
def test_choice_on_gpu(kw, expected, reason):
  for requested in ("auto", "cudnn"):
    choice = attn.choose_implementation(requested, **{**GPU, **kw})
    assert choice.implementation == expected
    assert reason in choice.reason


def test_choice_on_tpu_and_errors():
  tpu = dict(backend="tpu", dtype=jnp.float32, head_dim=64, kv_len=2048)
  assert attn.choose_implementation("auto", q_len=2048, **tpu).implementation == "splash"
  fallback = attn.choose_implementation("splash", q_len=2048, **{**tpu, "kv_len": 2000})
  assert fallback.implementation == "xla" and "2000" in fallback.reason
  short = attn.choose_implementation("auto", q_len=200, **{**tpu, "kv_len": 200})
  assert short.implementation == "xla" and "multiple of 128" in short.reason
  assert attn.choose_implementation("xla", q_len=2048, **tpu).implementation == "xla"
  cpu = dict(backend="cpu", dtype=jnp.bfloat16, head_dim=64, q_len=256, kv_len=256)
  with pytest.raises(ValueError, match="runs on GPU only but the backend is cpu"):
    attn.choose_implementation("cudnn", **cpu)
  with pytest.raises(ValueError, match="runs on TPU only"):
    attn.choose_implementation("splash", **cpu)
  assert attn.choose_implementation("splash", interpret=True, **cpu).implementation == "splash"
  with pytest.raises(ValueError, match="expected one of auto, xla, cudnn, splash"):
    attn.choose_implementation("flash", **cpu)
  with pytest.raises(ValueError, match="attention='flash'"):
    Transformer(ModelConfig(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                            num_heads=2, num_kv_heads=1, head_dim=4, max_position_embeddings=8),
                attention="flash", rngs=nnx.Rngs(0))


def test_splash_interpret_matches_reference_under_a_mesh():
  """The TPU kernel in Pallas interpret mode, inside shard_map: rows over data, heads over tensor (4 does not
  divide the 2 key/value heads, so they are repeated); values and gradients against XLA."""
  b, t, n, kh, h = 2, 128, 4, 2, 16
  q, k, v = _qkv(b, t, n, kh, h)
  seg = _packed_segments(b, t)
  w = jnp.cos(jnp.arange(h, dtype=jnp.float32))

  def loss(impl):
    def f(q, k, v):
      out = attn.dot_product_attention(q, k, v, seg, scale=h ** -0.5, implementation=impl, interpret=True)
      return jnp.sum(out * w), out
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

  with jax.default_matmul_precision("highest"):
    (_, ref), ref_grads = loss("xla")(q, k, v)
    with jax.set_mesh(sharding.make_mesh((2, 1, 4))):
      (_, out), grads = loss("splash")(q, k, v)
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, seg, h ** -0.5), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5 * float(jnp.abs(r).max()), rtol=0)


def _kernel_against_xla(impl, dtype, atol):
  """Values and gradients of a fused kernel against the XLA path on the same (low-precision) inputs."""
  b, t, n, kh, h = 2, 256, 8, 2, 64
  q, k, v = _qkv(b, t, n, kh, h, dtype=dtype)
  seg = _packed_segments(b, t)
  choice = attn.implementation_for("auto", dtype=dtype, head_dim=h, q_len=t, kv_len=t)
  assert choice.implementation == impl, choice.reason

  def run(which):
    f = lambda q, k, v: attn.dot_product_attention(q, k, v, seg, scale=h ** -0.5,  # noqa: E731
                                                   implementation=which).astype(jnp.float32)
    out = jax.jit(f)(q, k, v)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * jnp.cos(jnp.arange(h))), argnums=(0, 1, 2)))(q, k, v)
    return out, grads

  (out, grads), (ref, ref_grads) = run(impl), run("xla")
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, seg, h ** -0.5), atol=atol, rtol=0)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=atol, rtol=0)
  for g, r in zip(grads, ref_grads):
    g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
    np.testing.assert_allclose(g, r, atol=atol * max(1.0, float(np.abs(r).max())), rtol=0)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="needs a CUDA GPU with cuDNN (tests/conftest.py defaults to CPU: JAX_PLATFORMS=cuda)")
def test_cudnn_matches_xla_on_gpu():
  _kernel_against_xla("cudnn", jnp.bfloat16, atol=3e-2)


@pytest.mark.skipif(jax.default_backend() != "tpu",
                    reason="needs a TPU (tests/conftest.py defaults to CPU: JAX_PLATFORMS=tpu)")
def test_splash_compiled_matches_xla_on_tpu():
  _kernel_against_xla("splash", jnp.bfloat16, atol=3e-2)


def _layer_against_xla(impl, interpret=False):
  """The model's attention layer in bf16 (rotary positions restarting per document, GQA, q/k/v biases, head
  dim 64) with kernel `impl` against the XLA path on the same parameters: the output, and the gradient of a
  loss with respect to every projection. (A whole random decoder would not do: there the attention's share
  of the logits is below bf16 rounding, and a kernel that ignored the documents passed.)"""
  cfg = ModelConfig(model_type="qwen2", vocab_size=8, hidden_size=256, intermediate_size=8, num_layers=1,
                    num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=512, qkv_bias=True)
  b, t = 2, 256
  seg = jnp.asarray(_packed_segments(b, t))
  cos, sin = rope_cos_sin(cfg, positions_from_segments(seg))
  x = jnp.asarray(np.random.RandomState(0).randn(b, t, cfg.hidden_size), jnp.bfloat16)
  w = jnp.asarray(np.random.RandomState(1).randn(b, t, cfg.hidden_size), jnp.float32)
  choice = attn.implementation_for(impl, dtype=jnp.bfloat16, head_dim=64, q_len=t, kv_len=t, interpret=interpret)
  assert choice.implementation == impl, choice.reason

  def run(which):
    layer = Attention(cfg, dtype=jnp.bfloat16, attention=which, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer, nnx.Param)

    def loss(p):
      out = nnx.merge(graphdef, p)(x, cos, sin, seg).astype(jnp.float32)
      return jnp.sum(out * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(out), [np.asarray(g, np.float32) for g in jax.tree.leaves(grads)]

  (out, grads), (ref, ref_grads) = run(impl), run("xla")
  rel = lambda a, r: np.linalg.norm(a - r) / np.linalg.norm(r)  # noqa: E731
  # bf16 rounding gives relative errors of 0.3% to 2% here; a kernel that ignores the documents gives 70%.
  assert rel(out, ref) < 5e-2
  for g, r in zip(grads, ref_grads):
    assert rel(g, r) < 5e-2, (g.shape, rel(g, r))


@pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"),
                    reason="needs a CUDA GPU or a TPU (tests/conftest.py defaults to CPU: JAX_PLATFORMS=cuda)")
def test_fused_kernel_in_the_attention_layer_matches_xla():
  _layer_against_xla({"gpu": "cudnn", "tpu": "splash"}[jax.default_backend()])


def test_attention_layer_kernel_check_on_cpu(monkeypatch):
  """The test above, here with the splash kernel in Pallas interpret mode inside the layer, so its harness
  and tolerances are exercised on every CI run."""
  from jaxkd.models import transformer  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(transformer, "dot_product_attention",
                      functools.partial(attn.dot_product_attention, interpret=True))
  _layer_against_xla("splash", interpret=True)
