"""Scanned layers: the lowered train step does not grow with depth; every remat policy gives the same numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxkd import optim, signals, step as step_lib
from jaxkd.models import ModelConfig, Transformer
from jaxkd.models.transformer import REMAT_POLICIES
from tests.steps import loss_config, packed_batch


def _batch():
  return packed_batch(0, rows=2, vocab=60, trained=1.0)  # every token of a document trained


def _cfg(layers, **kw):
  base = dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=layers,
              num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64, qkv_bias=True)
  return ModelConfig(**{**base, **kw})


def _lowered_lines(layers: int) -> int:
  """Lines of the lowered StableHLO of the whole KD train step (student and teacher `layers` deep)."""
  student = nnx.eval_shape(lambda: Transformer(_cfg(layers, tie_embeddings=True), rngs=nnx.Rngs(0)))
  teacher = nnx.eval_shape(lambda: Transformer(_cfg(layers, hidden_size=48, intermediate_size=96),
                                               rngs=nnx.Rngs(1)))
  s_def, s_state = nnx.split(student)
  t_def, t_state = nnx.split(teacher)
  params = {"student": nnx.to_pure_dict(s_state)}
  optimizer = optim.skip_nonfinite(optax.adamw(1e-3))
  state = step_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                              opt_state=jax.eval_shape(optimizer.init, params))
  fn = step_lib.make_train_step(s_def, signals.online(t_def), optimizer, lambda s: 1e-3,
                                loss_config(alpha=0.5, vocab_size=60, chunk_size=16))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch())
  return len(fn.lower(state, nnx.to_pure_dict(t_state), batch).as_text().splitlines())


def test_lowered_step_does_not_grow_with_depth():
  two, eight = _lowered_lines(2), _lowered_lines(8)
  # Only the stacked parameter shapes differ (2x... vs 8x...): a layer's body appears once, in the scan.
  assert abs(eight - two) <= 0.02 * two, (two, eight)


@pytest.fixture(scope="module")
def remat_results():
  """{policy: (loss, grads)} of CE + KL to a fixed distribution through a 2-layer student.

  The parameters come from NumPy and every policy is differentiated inside one jitted function: eager
  initialisation and one compile per policy would cost most of this file's time on a small CPU.
  """
  batch = _batch()
  cfg = _cfg(2, tie_embeddings=True)
  graphdefs = {p: nnx.split(nnx.eval_shape(lambda p=p: Transformer(cfg, remat=p, rngs=nnx.Rngs(0))))
               for p in REMAT_POLICIES}
  rng = np.random.RandomState(0)
  state = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.randn(*x.shape), jnp.float32), graphdefs["none"][1])
  t_logp = jax.nn.log_softmax(jnp.asarray(2.0 * rng.randn(*batch["input_ids"].shape, cfg.vocab_size),
                                          jnp.float32))

  def loss_fn(state, graphdef):
    logits = nnx.merge(graphdef, state)(batch["input_ids"], segment_ids=batch["segment_ids"],
                                        positions=batch["positions"])
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - logp), axis=-1)
    return jnp.sum((ce + kl) * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

  def all_policies(state):
    return {p: jax.value_and_grad(loss_fn)(state, gd) for p, (gd, _) in graphdefs.items()}

  with jax.default_matmul_precision("highest"):
    return jax.device_get(jax.jit(all_policies)(state))


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_policy_matches_none(remat_results, policy):
  loss, grads = remat_results[policy]
  ref_loss, ref_grads = remat_results["none"]
  np.testing.assert_allclose(loss, ref_loss, atol=1e-6, rtol=0)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, atol=1e-6, rtol=0)
