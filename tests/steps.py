"""Helpers for tests of the train step: a tiny student and teacher, a packed batch, and the step built from them."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxkd import config_base, optim, sharding, signals, step as step_lib
from jaxkd.models import ModelConfig, Transformer

V = 61  # the tokenizer's vocabulary: both heads are wider (64 and 72 columns) and get cut to it
STUDENT = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64, qkv_bias=True,
                      tie_embeddings=True)
TEACHER = ModelConfig(model_type="llama", vocab_size=72, hidden_size=48, intermediate_size=96, num_layers=3,
                      num_heads=4, num_kv_heads=4, head_dim=12, max_position_embeddings=64)


def optimizer_config(**kw) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(dict(lr=1e-2, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1,
                                     weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0))
  c.update(kw)
  return c


def packed_batch(seed, rows=8, t=16, vocab=V, trained=0.7) -> dict:
  """Two documents per row, some padding on row 0; about `trained` of the tokens trained (1.0: all of them)."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, vocab, (rows, t)).astype(np.int32)
  seg = np.ones((rows, t), np.int32)
  seg[:, t // 2:] = 2
  seg[0, -3:] = 0
  pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])[None].repeat(rows, 0).astype(np.int32)
  targets = np.roll(ids, -1, axis=1)
  mask = (rng.rand(rows, t) < trained).astype(np.float32) * (seg > 0)
  mask[:, t // 2 - 1] = 0  # no target across the document boundary
  mask[:, -1] = 0
  return {"input_ids": ids, "targets": targets, "loss_mask": mask, "segment_ids": seg, "positions": pos}


def build_step(lc, mesh=None, steps=3):
  """(jitted train step, initial state, teacher params or None) for STUDENT (and TEACHER when lc uses one)."""
  student = Transformer(STUDENT, rngs=nnx.Rngs(0))
  teacher = Transformer(TEACHER, param_dtype=jnp.float32, rngs=nnx.Rngs(1)) if lc.uses_teacher else None
  optimizer, lr = optim.make_optimizer(optimizer_config(), steps)
  s_def, s_state = nnx.split(student)
  params = {"student": nnx.to_pure_dict(s_state)}
  t_def, t_params = (nnx.split(teacher)[0], nnx.to_pure_dict(nnx.state(teacher))) if teacher else (None, None)
  kw = {}
  if mesh is not None:
    param_sh = {"student": sharding.module_shardings(mesh, student)}
    opt_sh = sharding.opt_state_shardings(mesh, jax.eval_shape(optimizer.init, params), param_sh)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    kw = dict(state_shardings=step_lib.TrainState(step=rep, params=param_sh, opt_state=opt_sh),
              teacher_shardings=sharding.module_shardings(mesh, teacher) if teacher else None,
              batch_shardings=sharding.batch_shardings(mesh, step_lib.STUDENT_KEYS))
    params = jax.device_put(params, param_sh)
    if teacher:
      t_params = jax.device_put(t_params, kw["teacher_shardings"])
  state = step_lib.TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))
  fn = step_lib.make_train_step(s_def, signals.online(t_def), optimizer, lr, lc, **kw)
  return fn, state, t_params


def loss_config(**fields) -> step_lib.LossConfig:
  """The LossConfig a run builds from the config's defaults, at temperature 1 (plain softmax, which these
  tests' figures were made with) unless `fields` say otherwise, with `fields` changed."""
  return dataclasses.replace(step_lib.loss_config(config_base.base_config()), **{"temperature": 1.0, **fields})
