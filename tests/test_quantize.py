"""The int8 teacher (jaxkd/models/quantize.py): the quantised linear against float64 NumPy, the trained tiny teacher's
held-out distribution against the float teacher's (and a broken quantisation failing that bound), the loader's
placement, and the keys that turn it on."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkd import checkpoint as ckpt_lib, config_base, data, models, program, sharding as shd
from jaxkd import step as step_lib
from jaxkd.models import quantize
from jaxkd.models.layers import Linear
from tests.runs import load_config

# KL(float32 teacher || int8 teacher) per held-out trained token, nats: measured 1.08e-5 (mean) and 1.13e-3 (max)
# over the tiny configs' 1,458 eval tokens (scripts/int8_teacher_fidelity.py, all 2,465 held-out tokens: 1.26e-5
# and 1.13e-3). The bounds sit a little above; a broken quantisation lands near 0.2 nats.
MEAN_KL_BOUND, MAX_KL_BOUND = 2e-5, 2e-3


def _numpy_quantized(w):
  """The format in float64 NumPy: a scale per output channel (and layer), absmax over the input axis / 127.5."""
  w = np.asarray(w, np.float64)
  s = np.abs(w).max(axis=-2, keepdims=True) / 127.5
  s = np.where(s == 0, 1.0, s)  # an all-zero channel: any scale, its values are 0
  return np.clip(np.round(w / s), -128, 127), s


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_quantized_linear_is_dequantise_then_matmul(dtype, rtol):
  rng = np.random.default_rng(0)
  linear = Linear(48, 40, axes=("embed", "mlp"), bias=True, stack=(3,), dtype=dtype, rngs=nnx.Rngs(0))
  w = rng.normal(size=(3, 48, 40)).astype(np.float32) * rng.uniform(0.01, 2.0, size=(3, 1, 40)).astype(np.float32)
  w[1, :, 7] = 0.0  # an all-zero channel must not divide by zero
  linear.kernel.set_value(jnp.asarray(w))
  linear.bias.set_value(jnp.asarray(rng.normal(size=(3, 40)).astype(np.float32)))
  q_linear = quantize.quantize_linear(linear)
  q, s = np.asarray(q_linear.kernel[...]), np.asarray(q_linear.scale[...])
  assert q.dtype == np.int8 and q.shape == (3, 48, 40) and s.dtype == np.float32 and s.shape == (3, 1, 40)

  q_ref, s_ref = _numpy_quantized(w)
  np.testing.assert_allclose(s, s_ref, rtol=1e-6)
  # They may differ by one only at a tie (each channel's absmax lands on +-127.5 exactly), where float32 rounds.
  ratio = np.asarray(w, np.float64) / s_ref
  at_tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-5
  assert np.abs(q - q_ref).max() <= 1 and not np.any((q != q_ref) & ~at_tie)
  assert np.all(np.abs(w - q * s.astype(np.float64)) <= s * (0.5 + 1e-4))  # within half a step of the weight
  assert np.all(q[1, :, 7] == 0)

  x = rng.normal(size=(2, 5, 48)).astype(np.float32)
  bias = np.asarray(linear.bias[...])
  for layer in range(3):  # as the scanned stack runs it: one layer's slice
    one = quantize.QLinear(nnx.Param(jnp.asarray(q[layer]), axes=("embed", "mlp")),
                           quantize.Scale(jnp.asarray(s[layer]), axes=(None, "mlp")),
                           nnx.Param(jnp.asarray(bias[layer]), axes=("mlp",)), dtype, jnp.float32)
    got = np.asarray(one(jnp.asarray(x)).astype(jnp.float32), np.float64)
    x_ref = np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32), np.float64)  # the input as computed
    want = x_ref @ (q[layer].astype(np.float64) * s[layer]) + bias[layer].astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


# ----------------------------------------------------------------------------------------------------
# The trained tiny teacher on held-out tokens.


@pytest.fixture(scope="module")
def held_out():
  """(teacher folder, the tiny configs' eval batches, the float32 teacher's log-probs [N, V] at their trained
  tokens, vocabulary)."""
  c = load_config("tiny_logit")
  tok = program.load_tokenizers(c, step_lib.loss_config(c)).student
  loader = data.make_loader(c.data, tokenizer=tok, seq_len=c.data.seq_len, batch_size=c.data.batch_size,
                            seed=c.seed, split="eval")
  batches = list(loader)
  loader.close()
  folder = program.model_folder(c.teacher)
  vocab = len(tok)
  return folder, batches, _log_probs(models.from_pretrained(folder), batches, vocab), vocab


def _log_probs(model, batches, vocab):
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda params, ids, seg, pos: jax.nn.log_softmax(
      nnx.merge(graphdef, params)(ids, segment_ids=seg, positions=pos)[..., :vocab], axis=-1))
  return np.concatenate([np.asarray(forward(params, b["input_ids"], b["segment_ids"], b["positions"]),
                                    np.float64)[b["loss_mask"] > 0] for b in batches])


def _kl(p_NxV, q_NxV):
  return (np.exp(p_NxV) * (p_NxV - q_NxV)).sum(1)


def test_int8_teacher_stays_within_a_small_kl_of_the_float_teacher(held_out):
  folder, batches, p, vocab = held_out
  teacher = models.from_pretrained(folder, quantize="int8")
  kernels = {path: v for path, v in nnx.to_flat_state(nnx.state(teacher, nnx.Param)) if path[-1] == "kernel"}
  int8 = {".".join(path) for path, v in kernels.items() if v[...].dtype == jnp.int8}
  assert int8 == {f"layers.{part}.{name}.kernel" for part, names in quantize.TARGETS.items() for name in names}
  assert teacher.lm_head.kernel[...].dtype == jnp.float32 and teacher.embed_tokens.embedding[...].dtype == jnp.float32
  kl = _kl(p, _log_probs(teacher, batches, vocab))
  assert len(kl) > 1000
  assert kl.mean() < MEAN_KL_BOUND and kl.max() < MAX_KL_BOUND, (kl.mean(), kl.max())
  assert kl.mean() > 1e-7  # it is quantised: not the float teacher by another name


def _scales_of_other_channels(w):
  q, s = quantize.quantize_kernel(w)
  return q, s[..., ::-1]


def _scales_of_another_layer(w):
  q, s = quantize.quantize_kernel(w)
  return q, s[::-1]


def _scaled_over_the_wrong_axis(w):  # values rounded with per-input-channel scales, stored with per-output ones
  q, s = quantize.quantize_kernel(w)
  s_in = jnp.max(jnp.abs(w), axis=-1, keepdims=True) / 127.5
  return jnp.clip(jnp.round(w / s_in), -128, 127).astype(jnp.int8), s


@pytest.mark.parametrize("broken", [_scaled_over_the_wrong_axis, _scales_of_other_channels, _scales_of_another_layer])
def test_a_broken_quantisation_fails_the_bound(held_out, monkeypatch, broken):
  folder, batches, p, vocab = held_out
  monkeypatch.setattr(quantize, "quantize_value", lambda value, axes: jax.jit(broken)(value))
  kl = _kl(p, _log_probs(models.from_pretrained(folder, quantize="int8"), batches, vocab))
  assert kl.mean() > 100 * MEAN_KL_BOUND and kl.max() > MAX_KL_BOUND


def test_loading_quantises_each_kernel_where_it_lives():
  """On 8 devices: the int8 kernel has the float kernel's sharding, its scales the sharding their logical axes give,
  and the values are `quantize_kernel` of the float weights."""
  mesh = shd.make_mesh(shd.FSDP_MESH)
  c = load_config("tiny_logit", **{"teacher.quantize": "int8"})
  with jax.set_mesh(mesh):
    float_model = models.from_pretrained(program.model_folder(c.teacher), mesh=mesh)
    int8_model = program.load_teacher(c, mesh, abstract=False)  # as a run loads it
  float_sh, int8_sh = shd.module_shardings(mesh, float_model), shd.module_shardings(mesh, int8_model)
  for part, names in quantize.TARGETS.items():
    for name in names:
      f, q = getattr(getattr(float_model.layers, part), name), getattr(getattr(int8_model.layers, part), name)
      assert q.kernel[...].sharding == f.kernel[...].sharding == float_sh["layers"][part][name]["kernel"]
      assert q.scale[...].sharding == int8_sh["layers"][part][name]["scale"]
      assert q.kernel[...].sharding.spec[1] == "fsdp" or q.scale[...].sharding.spec[2] == "fsdp"  # really split
      want_q, want_s = quantize.quantize_kernel(f.kernel[...])
      np.testing.assert_array_equal(np.asarray(q.kernel[...]), np.asarray(want_q))
      np.testing.assert_array_equal(np.asarray(q.scale[...]), np.asarray(want_s))
  with pytest.raises(ValueError, match="int8"):
    models.save_pretrained(int8_model, "/nonexistent/never-written")


def test_the_abstract_program_holds_an_int8_teacher():
  """What an ahead-of-time compile sees: the teacher's parameters are int8 kernels and float32 scales, on the
  kernels' shardings."""
  prog = program.abstract_program(load_config("tiny_logit", **{"teacher.quantize": "int8"}))
  teacher = prog.abstract_inputs()[1]
  for part, names in quantize.TARGETS.items():
    for name in names:
      p = teacher["layers"][part][name]
      assert p["kernel"].dtype == jnp.int8 and p["scale"].dtype == jnp.float32
      assert p["scale"].shape == (*p["kernel"].shape[:-2], 1, p["kernel"].shape[-1])
      assert p["kernel"].sharding == prog.teacher_shardings["layers"][part][name]["kernel"]
  assert teacher["lm_head"]["kernel"].dtype == jnp.float32


@pytest.mark.parametrize("overrides,match", [
    ({"teacher.quantize": "int4"}, r"config\.teacher\.quantize='int4': unknown; use \"int8\""),
    ({"teacher.quantize": "int8", "teacher.cache": "/some/cache"},
     r"config\.teacher\.quantize='int8': quantises the teacher model, but teacher\.cache loads none"),
])
def test_bad_quantize_keys_are_refused(overrides, match):
  with pytest.raises(config_base.ConfigError, match=match):
    config_base.validate(load_config("tiny_logit", **overrides))


def test_fsdp_gathers_the_int8_weights_not_their_dequantised_copies():
  """On 8 devices (FSDP) each matmul gathers its weight whole: the int8 teacher's are gathered as int8 and dequantised
  after, not dequantised shard by shard and gathered as floats (what XLA does unless told)."""
  c = load_config("tiny_logit", **{"teacher.quantize": "int8"})
  mesh = program.make_mesh(c)
  with jax.set_mesh(mesh):
    teacher = program.load_teacher(c, mesh, abstract=True)
  graphdef, state = nnx.split(teacher)
  params = ckpt_lib.abstract_like(nnx.to_pure_dict(state), shd.module_shardings(mesh, teacher))
  ids = jax.ShapeDtypeStruct((8, 128), jnp.int32, sharding=jax.sharding.NamedSharding(mesh, shd.BATCH_SPEC))
  forward = jax.jit(lambda params, ids: nnx.merge(graphdef, params).forward(ids, compute_logits=False).last_hidden)
  with jax.set_mesh(mesh):
    hlo = forward.lower(params, ids).compile().as_text()
  kernels = {tuple(getattr(getattr(teacher.layers, part), name).kernel.shape[-2:])
             for part, names in quantize.TARGETS.items() for name in names}
  gathered = [(dtype, tuple(int(d) for d in dims.split(",")))
              for dtype, dims in re.findall(r"= (\w+)\[([\d,]+)\][^=]*? all-gather(?:-start)?\(", hlo)]
  weights = [(dtype, dims) for dtype, dims in gathered if dims[-2:] in kernels]
  assert weights and all(dtype == "s8" for dtype, _ in weights), gathered
