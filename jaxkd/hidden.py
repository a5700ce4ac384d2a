"""Hidden-state distillation: which layers are paired, the learned width projection, and the loss.

Hidden states are indexed as transformers' `output_hidden_states`: 0 is the embedding output, i the
output of layer i, and the last is the final layer after the final norm. A pair (s, t) pulls the
student's hidden state s toward the teacher's t, through a learned linear projection when the widths
differ. The projection trains with the student, is checkpointed with it, and is never exported.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxkd.models.layers import Linear

LOSSES = ("mse", "cosine")


def layer_map(student_layers: int, teacher_layers: int, pairs: Sequence[Sequence[int]] | None = None
              ) -> tuple[tuple[int, int], ...]:
  """Pairs of (student, teacher) hidden-state indices.

  Default: every student layer i = 1..Ls paired with teacher layer round(i * Lt / Ls), evenly spaced, so
  the student's last layer meets the teacher's last. Explicit pairs are validated against both depths.
  """
  if pairs is None or len(pairs) == 0:
    return tuple((i, int(round(i * teacher_layers / student_layers))) for i in range(1, student_layers + 1))
  out = []
  for pair in pairs:
    if len(pair) != 2:
      raise ValueError(f"distill.hidden.layer_map entry {list(pair)} must be a [student, teacher] pair")
    s, t = int(pair[0]), int(pair[1])
    if not 0 <= s <= student_layers:
      raise ValueError(f"distill.hidden.layer_map pair {list(pair)}: student index {s} is outside 0..{student_layers} "
                       f"(0 = embeddings, {student_layers} = last layer)")
    if not 0 <= t <= teacher_layers:
      raise ValueError(f"distill.hidden.layer_map pair {list(pair)}: teacher index {t} is outside 0..{teacher_layers} "
                       f"(0 = embeddings, {teacher_layers} = last layer)")
    out.append((s, t))
  return tuple(out)


class Projector(nnx.Module):
  """One Linear(student width -> teacher width) per mapped pair, stacked on a leading axis."""

  def __init__(self, num_pairs: int, student_width: int, teacher_width: int, *, rngs: nnx.Rngs):
    self.proj = Linear(student_width, teacher_width, axes=("embed", "teacher_embed"), bias=True,
                       stack=(num_pairs,), std=1.0 / np.sqrt(student_width), rngs=rngs)

  def __call__(self, h_PxNxDs):
    return jnp.einsum("pnd,pde->pne", h_PxNxDs.astype(jnp.float32), self.proj.kernel[...].astype(jnp.float32)) \
        + self.proj.bias[...].astype(jnp.float32)[:, None, :]


def _layer_norm(x):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(jnp.var(x, axis=-1, keepdims=True) + 1e-6)


def hidden_loss_sum(student_PxNxDt, teacher_PxNxDt, mask_N, *, loss: str = "mse", layer_norm: bool = False):
  """Sum over pairs and masked tokens of the per-token distance (MSE over features, or 1 - cosine).

  Inputs are the (projected) student and the teacher hidden states of the P pairs at N token positions;
  divide by (number of masked tokens) * P for the mean.
  """
  if loss not in LOSSES:
    raise ValueError(f"distill.hidden.loss={loss!r}: expected one of {LOSSES}")
  s = student_PxNxDt.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_PxNxDt.astype(jnp.float32))
  if layer_norm:
    s, t = _layer_norm(s), _layer_norm(t)
  if loss == "mse":
    d_PxN = jnp.mean(jnp.square(s - t), axis=-1)
  else:
    dot = jnp.sum(s * t, axis=-1)
    norms = jnp.sqrt(jnp.sum(s * s, axis=-1) * jnp.sum(t * t, axis=-1))
    d_PxN = 1.0 - dot / jnp.maximum(norms, 1e-8)
  keep_N = jnp.asarray(mask_N) > 0
  return jnp.sum(jnp.where(keep_N[None, :], d_PxN, 0.0))
