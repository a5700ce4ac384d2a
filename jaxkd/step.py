"""The pure train and eval steps, and the shardings they are compiled with.

`make_train_step` returns one jitted function: student forward, teacher forward under `stop_gradient`,
the combined loss `alpha * KD + (1 - alpha) * CE`, the gradient (accumulated over micro-batches and
normalised by the real token count, so it equals the full-batch gradient), and the optimizer update.
Student parameters and optimizer state are donated; the teacher's parameters are an ordinary input that
is never donated nor differentiated. With alpha = 0 no teacher forward is traced at all.

Parameters travel as plain nested dicts (`nnx.to_pure_dict`); the modules are rebuilt inside the traced
function with `nnx.merge`, so the step itself is a pure function of arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxkd import losses
from jaxkd import sharding as shd

BATCH_SPEC = P(("data", "fsdp"), None)
STUDENT_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static settings of the objective (hashable: they are baked into the compiled step)."""

  alpha: float = 0.5
  kind: str = "forward_kl"
  temperature: float = 1.0
  beta: float = 0.5
  skew: float = 0.1
  teacher_top_k: int | None = None
  vocab_size: int | None = None
  fused: bool = True
  chunk_size: int = 1024
  micro_batches: int = 1

  @property
  def uses_teacher(self) -> bool:
    return self.alpha > 0


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nested dict of the student's parameters
  opt_state: Any


# ----------------------------------------------------------------------------------------------------
# The objective.


def _materialised_sums(s_hidden_NxD, s_head_DxV, labels_N, mask_N, t_hidden_NxD, t_head_DxV, lc: LossConfig):
  """Reference objective on full [N, V] logits (distill.fused=False); same outputs as the fused one."""
  s_logits_NxV = jnp.dot(s_hidden_NxD, s_head_DxV, preferred_element_type=jnp.float32)
  if lc.vocab_size is not None:
    s_logits_NxV = s_logits_NxV[:, :lc.vocab_size]
  logp_NxV = jax.nn.log_softmax(s_logits_NxV)
  keep_N = mask_N > 0
  ce_N = -jnp.take_along_axis(logp_NxV, labels_N[:, None], axis=-1)[:, 0]
  aux = {"ce_sum": jnp.sum(jnp.where(keep_N, ce_N, 0.0)), "count": jnp.sum(keep_N, dtype=jnp.float32),
         "correct_sum": jnp.sum(keep_N & (jnp.argmax(s_logits_NxV, -1) == labels_N), dtype=jnp.float32)}
  total = (1.0 - lc.alpha) * aux["ce_sum"]
  if t_hidden_NxD is not None:
    t_logits_NxV = jnp.dot(t_hidden_NxD, t_head_DxV, preferred_element_type=jnp.float32)
    if lc.vocab_size is not None:
      t_logits_NxV = t_logits_NxV[:, :lc.vocab_size]
    d_N = losses.per_token_divergence(s_logits_NxV, t_logits_NxV, kind=lc.kind, temperature=lc.temperature,
                                      beta=lc.beta, skew=lc.skew, teacher_top_k=lc.teacher_top_k)
    kl1_N = losses.per_token_divergence(s_logits_NxV, t_logits_NxV, kind="forward_kl")
    t_ce_N = -jnp.take_along_axis(jax.nn.log_softmax(t_logits_NxV), labels_N[:, None], axis=-1)[:, 0]
    aux.update(
        kd_sum=lc.temperature ** 2 * jnp.sum(jnp.where(keep_N, d_N, 0.0)),
        kl1_sum=jnp.sum(jnp.where(keep_N, kl1_N, 0.0)),
        teacher_ce_sum=jnp.sum(jnp.where(keep_N, t_ce_N, 0.0)),
        agree_sum=jnp.sum(keep_N & (jnp.argmax(s_logits_NxV, -1) == jnp.argmax(t_logits_NxV, -1)),
                          dtype=jnp.float32))
    total = total + lc.alpha * aux["kd_sum"]
  return total, jax.lax.stop_gradient(aux)


def loss_sums(student, teacher, batch: dict, lc: LossConfig):
  """(weighted loss summed over the batch's trained tokens, aux sums) for one micro-batch."""
  kw = dict(segment_ids=batch["segment_ids"], positions=batch["positions"], compute_logits=False)
  s_out = student.forward(batch["input_ids"], **kw)
  d_s = s_out.last_hidden.shape[-1]
  s_hidden_NxD = s_out.last_hidden.reshape(-1, d_s)
  labels_N = batch["targets"].reshape(-1).astype(jnp.int32)
  mask_N = batch["loss_mask"].reshape(-1).astype(jnp.float32)
  t_hidden_NxD = t_head = None
  if lc.uses_teacher:
    t_out = teacher.forward(batch["input_ids"], **kw)
    t_hidden_NxD = jax.lax.stop_gradient(t_out.last_hidden.reshape(-1, t_out.last_hidden.shape[-1]))
    t_head = jax.lax.stop_gradient(teacher.head_kernel())
  if not lc.fused:
    return _materialised_sums(s_hidden_NxD, student.head_kernel(), labels_N, mask_N, t_hidden_NxD, t_head, lc)
  return losses.fused_distill_sums(
      s_hidden_NxD, student.head_kernel(), labels_N, mask_N, t_hidden_NxD, t_head, alpha=lc.alpha,
      kind=lc.kind, temperature=lc.temperature, beta=lc.beta, skew=lc.skew, vocab_size=lc.vocab_size,
      teacher_top_k=lc.teacher_top_k, chunk_size=lc.chunk_size)


def metrics_from_sums(total, aux) -> dict:
  count = jnp.maximum(aux["count"], 1.0)
  out = {"loss": total / count, "ce": aux["ce_sum"] / count, "accuracy": aux["correct_sum"] / count,
         "tokens": aux["count"]}
  if "kd_sum" in aux:
    out.update(kd=aux["kd_sum"] / count, kl_t1=aux["kl1_sum"] / count, teacher_ce=aux["teacher_ce_sum"] / count,
               agreement=aux["agree_sum"] / count)
  return out


# ----------------------------------------------------------------------------------------------------
# Steps.


def _split_micro(batch: dict, n: int) -> dict:
  """[B, ...] -> [n, B / n, ...]; micro-batch i takes rows i, i + n, ... so every device keeps its share."""
  def one(x):
    b = x.shape[0]
    if b % n:
      raise ValueError(f"global batch {b} is not divisible by optimizer.micro_batches={n}")
    x = x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)
    return shd.constrain(x, (None, "act_batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(one, batch)


def make_train_step(student_def, teacher_def, optimizer: optax.GradientTransformation, lr_schedule,
                    lc: LossConfig, *, state_shardings=None, teacher_shardings=None, batch_shardings=None):
  """The jitted `train_step(state, teacher_params, batch) -> (state, metrics)`."""

  def loss_fn(params, teacher_params, micro):
    student = nnx.merge(student_def, params)
    teacher = nnx.merge(teacher_def, teacher_params) if lc.uses_teacher else None
    return loss_sums(student, teacher, micro, lc)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, teacher_params, batch):
    if lc.micro_batches == 1:
      (total, aux), grads = grad_fn(state.params, teacher_params, batch)
      grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    else:
      micro = _split_micro(batch, lc.micro_batches)
      first = jax.tree.map(lambda x: x[0], micro)
      aux_shape = jax.eval_shape(lambda: loss_fn(state.params, teacher_params, first)[1])
      zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params), jnp.float32(0),
               jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape))

      def accumulate(carry, mb):
        (t, a), g = grad_fn(state.params, teacher_params, mb)
        acc_g, acc_t, acc_a = carry
        return (jax.tree.map(lambda x, y: x + y.astype(jnp.float32), acc_g, g), acc_t + t,
                jax.tree.map(jnp.add, acc_a, a)), None

      (grads, total, aux), _ = jax.lax.scan(accumulate, zeros, micro)
    # Sum over tokens / real token count: the mean-loss gradient of the whole batch, however it is split.
    count = jnp.maximum(aux["count"], 1.0)
    grads = jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = metrics_from_sums(total, aux)
    metrics.update(grad_norm=grad_norm, lr=lr_schedule(state.step))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(train_step, in_shardings=(state_shardings, teacher_shardings, batch_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))


def make_eval_step(student_def, teacher_def, lc: LossConfig, *, param_shardings=None, teacher_shardings=None,
                   batch_shardings=None):
  """The jitted `eval_step(params, teacher_params, batch) -> (total, aux)` sums, for held-out metrics."""

  def eval_step(params, teacher_params, batch):
    student = nnx.merge(student_def, params)
    teacher = nnx.merge(teacher_def, teacher_params) if lc.uses_teacher else None
    return loss_sums(student, teacher, batch, lc)

  return jax.jit(eval_step, in_shardings=(param_shardings, teacher_shardings, batch_shardings))


# ----------------------------------------------------------------------------------------------------
# Shardings.


def module_shardings(mesh: Mesh, module) -> dict:
  """Nested dict of NamedShardings for a module's parameters (the layout of `nnx.to_pure_dict`)."""
  out: dict = {}
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = shd.named_sharding(mesh, var.get_metadata().get("axes"), var.shape)
  return out


def opt_state_shardings(mesh: Mesh, abstract_opt_state, param_sh: dict):
  """Optimizer moments follow their parameter's sharding (matched by key path); counters are replicated."""
  flat = {}

  def collect(node, prefix=()):
    for k, v in node.items():
      if isinstance(v, dict):
        collect(v, prefix + (k,))
      else:
        flat[prefix + (k,)] = v
  collect(param_sh)
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    keys = tuple(getattr(p, "key", None) for p in path)
    for n in range(len(keys)):
      if keys[n:] in flat:
        return flat[keys[n:]]
    return replicated
  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def batch_shardings(mesh: Mesh, keys) -> dict:
  return {k: NamedSharding(mesh, BATCH_SPEC) for k in keys}
