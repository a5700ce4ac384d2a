"""The teacher's contribution to a step, behind one small interface.

The objective needs of the teacher only a `TeacherSignal`: its final hidden states and output head for logit
distillation (the fused loss forms the logits chunk by chunk and never holds [tokens, vocab]), and every
layer's hidden states for hidden-state distillation. A `TeacherSource` makes the signal for a batch inside the
jitted step, from whatever the step is given as the teacher's input. Today that is `OnlineTeacher`, the
teacher model run forward on the batch; a cache of the teacher's top-k log-probs read with the batch, or the
generations of a model, are other sources of the same signal.

The signal is made outside the differentiated function and under `stop_gradient`: no gradient reaches the
teacher, whatever the source.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jaxkd import fused_loss


@flax.struct.dataclass
class TeacherSignal:
  """What the objective takes of the teacher for one (micro-)batch; a field the objective does not use is None."""

  last_hidden_NxD: jax.Array | None = None  # final hidden state at each student token (logit KD)
  head_DxV: jax.Array | None = None  # the teacher's output head: logits = last_hidden @ head (logit KD)
  hidden_states: jax.Array | None = None  # [L + 1, B, T, D] every layer's output (hidden-state KD)
  indices_NxK: jax.Array | None = None  # a cached teacher: its top-k token ids at each student token (logit KD)
  logprobs_NxK: jax.Array | None = None  # and their log-probs at temperature 1


class TeacherSource(Protocol):
  def __call__(self, teacher_input: Any, batch: dict, lc) -> TeacherSignal:
    """The signal for `batch` under the loss settings `lc` (step.LossConfig), traced inside the step."""


@dataclasses.dataclass(frozen=True)
class OnlineTeacher:
  """The teacher model, run forward on the batch inside the step; its input is the teacher's parameters."""

  graphdef: Any  # nnx.GraphDef of the teacher (hashable: part of the compiled step)

  def __call__(self, params, batch: dict, lc) -> TeacherSignal:
    teacher = nnx.merge(self.graphdef, params)
    if lc.cross_tokenizer:  # the teacher reads the same documents in its own tokens
      out = teacher.forward(batch["teacher_input_ids"], segment_ids=batch["teacher_segment_ids"],
                            positions=batch["teacher_positions"], compute_logits=False,
                            output_hidden_states=lc.uses_hidden)
    else:
      out = teacher.forward(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                            compute_logits=False, output_hidden_states=lc.uses_hidden)
    signal = TeacherSignal(hidden_states=out.hidden_states if lc.uses_hidden else None)
    if lc.logit_kd:
      signal = signal.replace(last_hidden_NxD=out.last_hidden.reshape(-1, out.last_hidden.shape[-1]),
                              head_DxV=teacher.head_kernel())
    return jax.lax.stop_gradient(signal)


@dataclasses.dataclass(frozen=True)
class CachedTeacher:
  """The teacher's top-k log-probs, captured once (`python -m jaxkd.capture`) and read with the batch
  ("teacher_indices", "teacher_logprobs" [B, T, k]); no teacher model, so its input is None."""

  def __call__(self, teacher_input, batch: dict, lc) -> TeacherSignal:
    del teacher_input
    k = batch["teacher_indices"].shape[-1]
    return jax.lax.stop_gradient(TeacherSignal(indices_NxK=batch["teacher_indices"].reshape(-1, k),
                                               logprobs_NxK=batch["teacher_logprobs"].reshape(-1, k)))


def online(teacher_def) -> OnlineTeacher | None:
  """The online source of a teacher graphdef; None without a teacher."""
  return OnlineTeacher(teacher_def) if teacher_def is not None else None


def top_k_fn(teacher_def, k: int, vocab: int, chunk: int, budget: int = fused_loss.CHUNK_BUDGET_BYTES):
  """(teacher params, batch) -> the teacher's top-k (indices, log-probs) [B, T, k] at temperature 1 over the first
  `vocab` columns, `chunk` tokens at a time (0: `fused_loss.chunk_for` the head and `budget` bytes) so that no
  [tokens, vocab] array exists: what `python -m jaxkd.capture` stores for a `CachedTeacher` to read back."""
  def topk(params, batch):
    teacher = nnx.merge(teacher_def, params)
    out = teacher.forward(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                          compute_logits=False)
    b, t, d = out.last_hidden.shape
    h_NxD = out.last_hidden.reshape(-1, d)
    n = h_NxD.shape[0]
    c = min(chunk or fused_loss.chunk_for(teacher.cfg.vocab_size, budget), n)
    pad = -n % c
    h_GxCxD = jnp.pad(h_NxD, ((0, pad), (0, 0))).reshape(-1, c, d)
    head_DxV = teacher.head_kernel()

    def one(h_CxD):
      z_CxV = jnp.dot(h_CxD, head_DxV, preferred_element_type=jnp.float32)
      z_CxV = jnp.where(jnp.arange(z_CxV.shape[-1]) < vocab, z_CxV, -jnp.inf)  # padded rows are not tokens
      lp_CxK, idx_CxK = jax.lax.top_k(jax.nn.log_softmax(z_CxV, axis=-1), k)
      return idx_CxK.astype(jnp.int32), lp_CxK

    idx, lp = jax.lax.map(one, h_GxCxD)
    return idx.reshape(-1, k)[:n].reshape(b, t, k), lp.reshape(-1, k)[:n].reshape(b, t, k)

  return topk
