"""The train step: teacher untouched, accumulation = full batch, sharded = unsharded, SFT has no teacher."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxkd import optim, sharding, step as step_lib
from jaxkd.models import Transformer
from tests.steps import STUDENT, TEACHER, V, build_step, loss_config, optimizer_config, packed_batch


@functools.lru_cache(maxsize=None)  # tests that need the same run share it (and its compile)
def _run(lc, mesh=None, steps=3):
  """(student params, per-step metrics, teacher params after the steps), all on the host."""
  fn, state, t_params = build_step(lc, mesh, steps)
  history = []
  for i in range(steps):
    if mesh is not None:
      with jax.set_mesh(mesh):
        state, m = fn(state, t_params, packed_batch(i))
    else:
      state, m = fn(state, t_params, packed_batch(i))
    history.append(jax.device_get(m))
  return jax.device_get(state.params["student"]), history, jax.device_get(t_params)


LC = loss_config(alpha=0.5, temperature=2.0, vocab_size=V, chunk_size=48)  # fused, as trained


def test_fused_step_equals_materialised_step():
  fused, hf, _ = _run(LC)
  plain, hp, _ = _run(step_lib.LossConfig(**{**LC.__dict__, "fused": False}))
  for a, b in zip(hf, hp):
    for key in ("loss", "kd", "ce", "grad_norm", "agreement", "kl_t1", "teacher_ce"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), fused, plain)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("target", [-5, V + 2])
def test_invalid_target_on_a_kept_token_is_nonfinite_in_both_paths(fused, target):
  """A target outside [0, V) on a trained token makes the loss NaN, so the step is skipped, in the fused and
  the materialised objective alike (a negative one must not wrap around to a real column)."""
  fn, state, t_params = build_step(step_lib.LossConfig(**{**LC.__dict__, "fused": fused}))
  batch = packed_batch(0)
  batch["targets"][0, 0], batch["loss_mask"][0, 0] = target, 1.0
  _, m = fn(state, t_params, batch)
  assert np.isnan(float(m["ce"])) and float(m["nonfinite"]) == 1.0


def test_logged_lr_is_the_one_applied_after_a_skipped_step():
  """A skipped step leaves the optimizer (and its schedule's count) as it was: the next step applies, and
  logs, the learning rate the skipped one would have had."""
  fn, state, t_params = build_step(LC, steps=6)
  _, lr = optim.make_optimizer(optimizer_config(), 6)
  bad = packed_batch(0)
  bad["targets"][0, 0], bad["loss_mask"][0, 0] = V + 2, 1.0
  state, m = fn(state, t_params, bad)
  assert float(m["nonfinite"]) == 1.0 and int(state.step) == 1
  lrs = []
  for i in range(1, 3):
    state, m = fn(state, t_params, packed_batch(i))
    lrs.append(float(m["lr"]))
  np.testing.assert_allclose(lrs, [float(lr(0)), float(lr(1))], rtol=1e-6)
  assert float(lr(1)) != float(lr(2))  # the check above can tell the two counts apart


def test_teacher_parameters_bitwise_unchanged():
  # The arrays passed to the steps are still alive (not donated) and equal to a fresh teacher's.
  _, _, after = _run(LC)
  fresh = nnx.to_pure_dict(nnx.state(Transformer(TEACHER, param_dtype=jnp.float32, rngs=nnx.Rngs(1))))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(fresh), after)


def test_loss_is_the_weighted_mix_and_falls():
  _, hist, _ = _run(LC, steps=6)
  for m in hist:
    np.testing.assert_allclose(m["loss"], 0.5 * m["kd"] + 0.5 * m["ce"], rtol=1e-5)
  assert hist[-1]["loss"] < hist[0]["loss"]


def test_accumulation_equals_full_batch():
  full, h1, _ = _run(LC)
  accum, h4, _ = _run(step_lib.LossConfig(**{**LC.__dict__, "micro_batches": 4}))
  for a, b in zip(h1, h4):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
  # Adam divides by sqrt(v), so float summation-order differences of ~1e-7 in a near-zero gradient
  # can move a parameter by ~1e-6 after a few lr=1e-2 steps: 1e-5 is 0.1% of one step.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), full, accum)


def test_eight_devices_fsdp_and_tensor_match_one_device():
  one, h1, _ = _run(LC)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  eight, h8, _ = _run(LC, mesh=mesh)
  for a, b in zip(h1, h8):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), one, eight)


def test_sharded_step_partitions_without_replicating_activations(capfd):
  """On a (data 2, fsdp 2, tensor 2) mesh, with micro-batches, XLA finds a layout for every op: it does not
  fall back to replicating a whole tensor and slicing it ("involuntary full rematerialization", which it
  reports on stderr). The embedding lookup on an fsdp-split table did, before the table was gathered."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  fn, state, t_params = build_step(step_lib.LossConfig(**{**LC.__dict__, "micro_batches": 2}), mesh)
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)  # a cached executable is never partitioned
  try:
    capfd.readouterr()
    with jax.set_mesh(mesh):
      fn.lower(state, t_params, packed_batch(0)).compile()
    err = capfd.readouterr().err
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  assert "Involuntary full rematerialization" not in err, err[:2000]


def test_sft_compiles_no_teacher():
  lc = loss_config(alpha=0.0, vocab_size=V)
  fn, state, t_params = build_step(lc)
  assert t_params is None  # there is nothing to pass: the step cannot run a teacher
  hlo = fn.lower(state, None, packed_batch(0)).as_text()
  with_teacher, st2, tp2 = build_step(LC)
  hlo_kd = with_teacher.lower(st2, tp2, packed_batch(0)).as_text()
  # The teacher's 48-wide hidden states appear only in the distillation step.
  teacher_shape = re.compile(r"(tensor<|x)48x")
  assert teacher_shape.search(hlo_kd) and not teacher_shape.search(hlo)
  _, hist, _ = _run(lc, steps=2)
  assert "kd" not in hist[0] and math.isfinite(hist[0]["ce"])


def test_schedule_warmup_then_cosine():
  cfg = optimizer_config(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
  lr = optim.schedule(cfg, 14)
  np.testing.assert_allclose([lr(0), lr(2), lr(4)], [0.0, 0.5, 1.0], atol=1e-7)
  for s in (6, 9, 14):
    frac = (s - 4) / 10
    np.testing.assert_allclose(lr(s), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)), atol=1e-6)
  lin = optim.schedule(optimizer_config(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0), 10)
  np.testing.assert_allclose([lin(0), lin(5), lin(10)], [1.0, 0.5, 0.0], atol=1e-7)


def test_weight_decay_only_on_matrices():
  params = nnx.to_pure_dict(nnx.state(Transformer(STUDENT, rngs=nnx.Rngs(0))))
  mask = optim.decay_mask(params)
  assert mask["layers"]["self_attn"]["q_proj"]["kernel"] and not mask["layers"]["self_attn"]["q_proj"]["bias"]
  assert not mask["layers"]["input_layernorm"]["scale"] and mask["embed_tokens"]["embedding"]
