"""The pure train and eval steps (compiled with the shardings of `jaxkd.sharding`).

`make_train_step` returns one jitted function: the teacher's signal (jaxkd.signals: the teacher forward, under
`stop_gradient` and outside the differentiated function), student forward,
the combined loss `hidden_weight * hidden + alpha * KD + (1 - alpha) * CE`, the gradient (accumulated
over micro-batches, each normalised by the whole batch's real token count, so it equals the full-batch
gradient), and the optimizer update.
Student parameters and optimizer state are donated; the teacher's parameters are an ordinary input that
is never donated nor differentiated. With alpha = 0 no teacher forward is traced at all.

A LoRA student (jaxkd.models.lora) trains its adapters alone: they are `params["student"]`, the optimizer's
moments are theirs, and the student's base weights come in the second input beside the teacher's (`frozen`),
read and never donated, differentiated or updated. Their dropout key is `fold_in(key(seed), step)`.

Parameters travel as plain nested dicts (`nnx.to_pure_dict`); the modules are rebuilt inside the traced
function with `nnx.merge`, so the step itself is a pure function of arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxkd import fused_loss, hidden, losses, on_policy, optim, signals
from jaxkd import sharding as shd

STUDENT_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static settings of the objective (hashable: they are baked into the compiled step). Built from a run's
  config by `loss_config`, the one place: the defaults are the config's (jaxkd/config_base.py).

  loss = hidden_weight * hidden + alpha * KD + (1 - alpha) * CE, where kind="hidden" means no logit KD.
  """

  alpha: float
  kind: str  # a losses.KD_KINDS entry, or "hidden" for no logit distillation
  temperature: float
  beta: float
  skew: float
  teacher_top_k: int | None
  fused: bool
  chunk_size: int  # 0: from chunk_budget (fused_loss.chunk_for)
  chunk_budget: int  # bytes
  micro_batches: int
  hidden_weight: float
  hidden_loss: str
  hidden_layer_norm: bool
  # Known once the models and tokenizers are: the vocabulary compared, the hidden layers paired, and whether
  # the teacher reads its own tokens (hidden states then meet at aligned positions).
  vocab_size: int | None = None
  layer_pairs: tuple[tuple[int, int], ...] = ()
  cross_tokenizer: bool = False
  # The teacher is a cache of its top-k log-probs (teacher.cache), read with the batch; `missing_mass` says how
  # the rest of the vocabulary counts (losses.MISSING_MASS).
  cached: bool = False
  missing_mass: str = "bucket"

  @property
  def logit_kd(self) -> bool:
    return self.alpha > 0 and self.kind != "hidden"

  @property
  def uses_hidden(self) -> bool:
    return self.hidden_weight > 0

  @property
  def uses_teacher(self) -> bool:
    return self.logit_kd or self.uses_hidden

  def batch_keys(self) -> tuple[str, ...]:
    extra = TEACHER_KEYS if self.cross_tokenizer and self.uses_teacher else ()
    cached = CACHE_KEYS if self.cached and self.logit_kd else ()
    return STUDENT_KEYS + extra + cached


def loss_config(c, *, vocab_size: int | None = None, layer_pairs=(), cross_tokenizer: bool = False) -> LossConfig:
  """The LossConfig of run config `c` (its `distill` and `optimizer.micro_batches` keys), with the facts known
  once the models are: the vocabulary size, the hidden layer pairs, whether the tokenizers differ."""
  d = c.distill
  return LossConfig(
      alpha=float(d.alpha), kind=d.kind, temperature=float(d.temperature), beta=float(d.beta), skew=float(d.skew),
      teacher_top_k=d.teacher_top_k, fused=bool(d.fused), chunk_size=int(d.chunk_size),
      chunk_budget=int(d.chunk_budget_mib * 2**20),
      micro_batches=int(c.optimizer.micro_batches), hidden_weight=float(d.hidden.weight), hidden_loss=d.hidden.loss,
      hidden_layer_norm=bool(d.hidden.layer_norm), vocab_size=vocab_size, layer_pairs=tuple(map(tuple, layer_pairs)),
      cross_tokenizer=bool(cross_tokenizer), cached=bool(c.teacher.cache), missing_mass=d.missing_mass)


# A cached teacher's top-k at each token, [rows, seq_len, k]: int32 ids and float32 log-probs at temperature 1.
CACHE_KEYS = ("teacher_indices", "teacher_logprobs")
TEACHER_KEYS = ("teacher_input_ids", "teacher_segment_ids", "teacher_positions", "align_student", "align_teacher",
                "align_mask")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  # {"student": nested dict (a LoRA student's adapters alone), "projector": nested dict (hidden distillation,
  # widths differ)}
  params: Any
  opt_state: Any
  rng: Any = None  # with on-policy steps: the sampling key's raw data (jaxkd.on_policy), checkpointed


# ----------------------------------------------------------------------------------------------------
# The objective.


def hidden_mask(batch: dict, lc: LossConfig) -> jax.Array:
  """Positions the hidden loss averages over: trained tokens, or aligned pairs across tokenizers."""
  return batch["align_mask"] if lc.cross_tokenizer else batch["loss_mask"]


def _hidden_sum(s_out, signal: signals.TeacherSignal, projector, batch, lc: LossConfig):
  s_idx = jnp.array([p[0] for p in lc.layer_pairs])
  t_idx = jnp.array([p[1] for p in lc.layer_pairs])
  s_PxBxTxD, t_PxBxTxD = s_out.hidden_states[s_idx], signal.hidden_states[t_idx]
  if lc.cross_tokenizer:  # compare only where a student and a teacher token end at the same character
    take = jax.vmap(lambda h_BxTxD, idx_BxA: jnp.take_along_axis(h_BxTxD, idx_BxA[..., None], axis=1),
                    in_axes=(0, None))
    s_PxBxTxD = take(s_PxBxTxD, batch["align_student"])
    t_PxBxTxD = take(t_PxBxTxD, batch["align_teacher"])
  p = len(lc.layer_pairs)
  s_PxNxD = s_PxBxTxD.reshape(p, -1, s_PxBxTxD.shape[-1])
  t_PxNxD = t_PxBxTxD.reshape(p, -1, t_PxBxTxD.shape[-1])
  if projector is not None:
    s_PxNxD = projector(s_PxNxD)
  mask_N = hidden_mask(batch, lc).reshape(-1)
  return hidden.hidden_loss_sum(s_PxNxD, t_PxNxD, mask_N, loss=lc.hidden_loss, layer_norm=lc.hidden_layer_norm)


def objective(student, projector, signal: signals.TeacherSignal | None, batch: dict, lc: LossConfig, n_tokens,
              n_hidden, dropout_key=None):
  """(loss of this (micro-)batch, aux sums); `n_tokens`, `n_hidden` are the whole batch's counts, so the
  losses of micro-batches add up to the loss of the batch. `signal` is the teacher's (jaxkd.signals);
  `dropout_key` the LoRA adapters' (training only)."""
  s_out = student.forward(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                          compute_logits=False, output_hidden_states=lc.uses_hidden, dropout_key=dropout_key)
  labels_N = batch["targets"].reshape(-1).astype(jnp.int32)
  mask_N = batch["loss_mask"].reshape(-1).astype(jnp.float32)
  s_hidden_NxD = s_out.last_hidden.reshape(-1, s_out.last_hidden.shape[-1])
  t_hidden_NxD, t_head = (signal.last_hidden_NxD, signal.head_DxV) if lc.logit_kd else (None, None)
  loss_kw = dict(alpha=lc.alpha if lc.logit_kd else 0.0, kind=lc.kind if lc.logit_kd else "forward_kl",
                 temperature=lc.temperature, beta=lc.beta, skew=lc.skew, vocab_size=lc.vocab_size,
                 teacher_top_k=lc.teacher_top_k)
  cached = lc.logit_kd and signal.indices_NxK is not None
  if lc.fused:
    if cached:
      loss_kw.update(teacher_indices=signal.indices_NxK, teacher_logprobs=signal.logprobs_NxK,
                     missing=lc.missing_mass)
    token_sum, aux = fused_loss.fused_distill_sums(s_hidden_NxD, student.head_kernel(), labels_N, mask_N,
                                                    t_hidden_NxD, t_head, chunk_size=lc.chunk_size or None,
                                                    chunk_budget=lc.chunk_budget, **loss_kw)
  else:
    if cached:
      loss_kw.update(t_indices_NxK=signal.indices_NxK, t_logprobs_NxK=signal.logprobs_NxK, missing=lc.missing_mass)
    token_sum, aux = losses.distill_sums(s_hidden_NxD, student.head_kernel(), labels_N, mask_N, t_hidden_NxD,
                                         t_head, **loss_kw)
  if not lc.logit_kd:  # CE alone here; its weight is 1 - alpha (1 for SFT, where alpha = 0)
    token_sum = (1.0 - lc.alpha) * token_sum
  loss = token_sum / n_tokens
  if lc.uses_hidden:
    h_sum = _hidden_sum(s_out, signal, projector, batch, lc)
    aux = {**aux, "hidden_sum": jax.lax.stop_gradient(h_sum)}
    loss = loss + lc.hidden_weight * h_sum / (n_hidden * len(lc.layer_pairs))
  return loss, aux


def batch_counts(batch: dict, lc: LossConfig):
  n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"] > 0, dtype=jnp.float32), 1.0)
  n_hidden = jnp.maximum(jnp.sum(hidden_mask(batch, lc) > 0, dtype=jnp.float32), 1.0) if lc.uses_hidden \
      else jnp.float32(1.0)
  return n_tokens, n_hidden


def metrics_from_sums(aux, lc: LossConfig, n_hidden=None) -> dict:
  """Per-token means of the aux sums (over a step or a whole evaluation)."""
  count = jnp.maximum(aux["count"], 1.0)
  out = {"ce": aux["ce_sum"] / count, "accuracy": aux["correct_sum"] / count, "tokens": aux["count"]}
  if "kl1_sum" in aux:  # a teacher's logits were computed
    out.update(kd=aux["kd_sum"] / count, kl_t1=aux["kl1_sum"] / count, agreement=aux["agree_sum"] / count)
    if "teacher_ce_sum" in aux:  # not from a cache: the label's teacher log-prob is stored only in its top-k
      out["teacher_ce"] = aux["teacher_ce_sum"] / count
  if "hidden_sum" in aux and n_hidden is not None:
    out["hidden"] = aux["hidden_sum"] / (jnp.maximum(n_hidden, 1.0) * len(lc.layer_pairs))
  return out


def evaluate(eval_step, params, teacher_params, batches, lc: LossConfig) -> dict[str, float] | None:
  """Per-token held-out metrics over `batches` (an iterable of global batches); None if it is empty."""
  totals: dict[str, float] = {}
  for batch in batches:
    for k, v in jax.device_get(eval_step(params, teacher_params, batch)).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  if not totals:
    return None
  out = {k: float(v) for k, v in metrics_from_sums(totals, lc, totals["hidden_count"]).items()}
  out["loss"] = out["ce"]
  out["perplexity"] = float(np.exp(min(out["ce"], 50.0)))
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


def frozen_input(teacher_params, student_base):
  """The steps' second input, which they read and never change: the teacher's parameters, and for a LoRA
  student its base weights beside them ({"teacher": ..., "student": ...})."""
  return teacher_params if student_base is None else {"teacher": teacher_params, "student": student_base}


def _unfreeze(frozen, lora_seed):
  """(teacher input, the student's base weights or None) of the steps' second input (`frozen_input`)."""
  return (frozen, None) if lora_seed is None else (frozen["teacher"], frozen["student"])


def _modules(student_def, projector_def, params, student_base=None):
  student = (nnx.merge(student_def, params["student"]) if student_base is None else
             nnx.merge(student_def, student_base, params["student"]))
  projector = nnx.merge(projector_def, params["projector"]) if projector_def is not None else None
  return student, projector


def dropout_key(seed: int, step):
  """The LoRA adapters' dropout key of step `step` (0-based, TrainState.step): a function of the seed and the
  checkpointed step alone, so a resumed run draws the same masks and the checkpoint needs no key of its own."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0x4C6F5241), step)


def _signal(teacher, teacher_input, batch, lc: LossConfig):
  return teacher(teacher_input, batch, lc) if lc.uses_teacher else None


def _schedule_count(opt_state, step):
  """The count the optimizer's schedule reads this step: its own, which a skipped (non-finite) step does not
  advance, so the logged lr is the one applied; `step` where the optimizer keeps none (a constant lr)."""
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
            if isinstance(s, optax.ScaleByScheduleState)]
  return states[0].count if states else step


def make_train_step(student_def, teacher: signals.TeacherSource | None, optimizer: optax.GradientTransformation,
                    lr_schedule, lc: LossConfig, *, projector_def=None, state_shardings=None,
                    teacher_shardings=None, batch_shardings=None, lora_seed: int | None = None):
  """The jitted `train_step(state, teacher_input, batch) -> (state, metrics)`; `teacher` makes the teacher's
  signal from `teacher_input` (for `signals.OnlineTeacher`, the teacher's parameters).

  `lora_seed`: the run's seed when the student is a LoRA student (None: not); `teacher_input` is then
  `frozen_input(teacher params, the student's base weights)`, and `teacher_shardings` that of their shardings.

  A step whose loss or gradients hold NaN or Inf returns the parameters and optimizer state unchanged (the
  step counter still advances) with metrics["nonfinite"] = 1.
  """
  train_step = _train_body(student_def, teacher, optimizer, lr_schedule, lc, projector_def, lora_seed)
  return jax.jit(train_step, in_shardings=(state_shardings, teacher_shardings, batch_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))


def make_on_policy_step(student_def, teacher: signals.OnlineTeacher, optimizer: optax.GradientTransformation,
                        lr_schedule, lc: LossConfig, rollout: on_policy.Rollout, *, projector_def=None,
                        state_shardings=None, teacher_shardings=None, batch_shardings=None,
                        lora_seed: int | None = None):
  """The jitted on-policy step, `(state, teacher params, batch) -> (state, metrics)` like the train step's: the
  student (the teacher under `rollout.seq_kd`) completes the batch's prompts, then the train step runs on the
  sampled rows (jaxkd.on_policy). It draws with `state.rng` and returns the key advanced. On the student's own
  samples the loss is the divergence alone (alpha 1); under seq_kd, `lc`'s mix. `lora_seed` as make_train_step's."""
  sampled_lc = lc if rollout.seq_kd else dataclasses.replace(lc, alpha=1.0)
  train_step = _train_body(student_def, teacher, optimizer, lr_schedule, sampled_lc, projector_def, lora_seed)

  def on_policy_step(state: TrainState, frozen, batch):
    teacher_params, student_base = _unfreeze(frozen, lora_seed)
    key, sub = jax.random.split(jax.random.wrap_key_data(state.rng))
    if rollout.seq_kd:
      writer = nnx.merge(teacher.graphdef, teacher_params)
    else:
      writer = _modules(student_def, projector_def, state.params, student_base)[0]
    sampled, sample_metrics = on_policy.sample(writer, batch, sub, rollout)
    state, metrics = train_step(state.replace(rng=jax.random.key_data(key)), frozen,
                                jax.lax.stop_gradient(sampled))
    return state, {**metrics, **sample_metrics}

  return jax.jit(on_policy_step, in_shardings=(state_shardings, teacher_shardings, batch_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))


def _train_body(student_def, teacher, optimizer, lr_schedule, lc: LossConfig, projector_def, lora_seed=None):
  """The train step as a traceable function (make_train_step jits it)."""

  def loss_fn(params, student_base, signal, micro, n_tokens, n_hidden, key):
    student, projector = _modules(student_def, projector_def, params, student_base)
    return objective(student, projector, signal, micro, lc, n_tokens, n_hidden, dropout_key=key)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)  # of the trained parameters alone

  def train_step(state: TrainState, frozen, batch):
    teacher_input, student_base = _unfreeze(frozen, lora_seed)
    key = dropout_key(lora_seed, state.step) if lora_seed is not None else None
    n_tokens, n_hidden = batch_counts(batch, lc)
    if lc.micro_batches == 1:
      signal = _signal(teacher, teacher_input, batch, lc)
      (loss, aux), grads = grad_fn(state.params, student_base, signal, batch, n_tokens, n_hidden, key)
    else:
      micro = _split_micro(batch, lc.micro_batches)
      first = jax.tree.map(lambda x: x[0], micro)
      aux_shape = jax.eval_shape(lambda: loss_fn(state.params, student_base,
                                                 _signal(teacher, teacher_input, first, lc), first, n_tokens,
                                                 n_hidden, key)[1])
      zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params), jnp.float32(0),
               jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape))

      def accumulate(carry, xs):
        mb, i = xs
        signal = _signal(teacher, teacher_input, mb, lc)  # per micro-batch: only its share is ever held
        mb_key = jax.random.fold_in(key, i) if key is not None else None
        (l, a), g = grad_fn(state.params, student_base, signal, mb, n_tokens, n_hidden, mb_key)
        acc_g, acc_l, acc_a = carry
        return (jax.tree.map(lambda x, y: x + y.astype(jnp.float32), acc_g, g), acc_l + l,
                jax.tree.map(jnp.add, acc_a, a)), None

      (grads, loss, aux), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(lc.micro_batches)))
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    grad_norm = optax.tree.norm(grads)
    # Non-finite guard (optim.make_optimizer's optax.apply_if_finite): a step whose gradients hold NaN or Inf
    # changes neither the parameters nor the optimizer's moments. A NaN loss can come with finite gradients (an
    # out-of-vocabulary target's NaN is a constant), so the loss's finiteness is folded into the gradients.
    grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **metrics_from_sums(aux, lc, n_hidden), "grad_norm": grad_norm,
               "lr": lr_schedule(_schedule_count(state.opt_state, state.step)),
               "nonfinite": 1.0 - optim.last_update_finite(opt_state).astype(jnp.float32),
               "skipped_nonfinite": optim.skipped_updates(opt_state).astype(jnp.float32)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(student_def, teacher: signals.TeacherSource | None, lc: LossConfig, *, projector_def=None,
                   param_shardings=None, teacher_shardings=None, batch_shardings=None,
                   lora_seed: int | None = None):
  """The jitted `eval_step(params, teacher_input, batch) -> aux sums` (with "hidden_count"), to add up;
  `lora_seed` as make_train_step's (no dropout here: only whether `teacher_input` holds the student's base)."""

  def eval_step(params, frozen, batch):
    teacher_input, student_base = _unfreeze(frozen, lora_seed)
    student, projector = _modules(student_def, projector_def, params, student_base)
    _, n_hidden = batch_counts(batch, lc)
    signal = _signal(teacher, teacher_input, batch, lc)
    _, aux = objective(student, projector, signal, batch, lc, jnp.float32(1), n_hidden)
    return {**aux, "hidden_count": jnp.sum(hidden_mask(batch, lc) > 0, dtype=jnp.float32)}

  return jax.jit(eval_step, in_shardings=(param_shardings, teacher_shardings, batch_shardings))
