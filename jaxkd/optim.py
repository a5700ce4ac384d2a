"""The optax chain and learning-rate schedules, from `config.optimizer`."""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


def schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine or linear decay to `lr * min_lr_ratio` at `total_steps`."""
  lr, warmup = float(opt_cfg.lr), int(opt_cfg.warmup_steps)
  end = lr * float(opt_cfg.min_lr_ratio)
  decay_steps = max(1, total_steps - warmup)  # a run shorter than its warmup still ends on the decay
  if opt_cfg.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={opt_cfg.schedule!r}: expected one of {SCHEDULES}")
  if opt_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, warmup + decay_steps, end_value=end)
  decay = (optax.constant_schedule(lr) if opt_cfg.schedule == "constant" else
           optax.linear_schedule(lr, end, decay_steps))
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params):
  """Weight decay on matrices (kernels, embeddings, LoRA adapters) only, not on norms or biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: str(getattr(path[-1], "key", path[-1])) in ("kernel", "embedding", "lora_a", "lora_b"), params)


def make_optimizer(opt_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  lr = schedule(opt_cfg, total_steps)
  chain = []
  if opt_cfg.clip_norm and opt_cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(float(opt_cfg.clip_norm)))
  chain.append(optax.adamw(lr, b1=float(opt_cfg.b1), b2=float(opt_cfg.b2), eps=float(opt_cfg.eps),
                           weight_decay=float(opt_cfg.weight_decay), mask=decay_mask))
  return skip_nonfinite(optax.chain(*chain)), lr


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner`, but an update whose gradients hold NaN or Inf leaves the parameters and its state (the Adam
  moments, which one NaN would poison for good) as they were, and is counted: the train step needs this
  wrapper (it reads the count), and the checkpoint keeps the count with the optimizer state.

  optax's wrapper compiles to the same memory as the hand-written lax.cond it replaced (BENCHMARKS.md); its
  limit on consecutive skips is set past reach: jaxkd never gives up and applies a non-finite update."""
  return optax.apply_if_finite(inner, max_consecutive_errors=2**31 - 2)


def last_update_finite(opt_state) -> jax.Array:
  """Whether the optimizer applied the last update (False: it held NaN or Inf and was skipped)."""
  return opt_state.last_finite


def skipped_updates(opt_state) -> jax.Array:
  """How many updates this optimizer has skipped for NaN or Inf, over the whole run."""
  return opt_state.total_notfinite
