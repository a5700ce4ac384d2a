"""On-policy distillation (GKD, Agarwal et al. 2024): the student writes completions of the batch's prompts and
is trained to match the teacher on its own tokens; with `seq_kd` the teacher writes them (sequence-level KD).

On a step chosen for it (`chosen`, a share `distill.on_policy.fraction` of the steps after `start_step`, the same
on every process and on every rerun), the jitted step
  1. cuts each row's first `prompts_per_row` conversations at their first trained token (`prompts`: the turns
     before an assistant reply and the reply's header, left-padded to P = seq_len - max_new_tokens tokens);
  2. samples up to `max_new_tokens` tokens after each prompt from the current student (or the teacher) through
     the model's KV cache, the whole loop on the device (`jaxkd.generate.sample_on_device`), stopping a row at an
     end-of-turn id;
  3. builds training rows of the same length as the data's (`rows`): prompt and completion as one document, the
     prompt masked, so the loss covers the sampled tokens only (the end-of-turn token included);
  4. runs the ordinary train step on them: the teacher's forward on the sampled rows, the configured divergence.

On the student's own samples the loss is the divergence alone (alpha is taken as 1): cross-entropy on tokens the
student drew itself would reinforce whatever it wrote. Under `seq_kd` the configured mix applies: cross-entropy on
the teacher's tokens is sequence-level KD (Kim and Rush, 2016). The sampling key is part of the checkpointed
state (TrainState.rng), so a resumed run draws the same samples.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import generate
from jaxkd import sharding as shd


@dataclasses.dataclass(frozen=True)
class Rollout:
  """Static settings of the sampling (hashable: part of the compiled step). Built by `settings`."""

  max_new_tokens: int
  prompt_len: int  # P: data.seq_len - max_new_tokens, so sampled rows are as long as the data's
  prompts_per_row: int
  temperature: float
  top_p: float | None
  top_k: int | None
  eos_ids: tuple[int, ...]
  vocab_size: int
  seq_kd: bool


def settings(c, *, eos_ids, vocab_size: int) -> Rollout | None:
  """The Rollout of run config `c` (its `distill.on_policy`), None where on-policy steps are off."""
  o = c.distill.on_policy
  if not o.fraction:
    return None
  new = int(o.max_new_tokens) or min(128, int(c.data.seq_len) // 2)
  return Rollout(max_new_tokens=new, prompt_len=int(c.data.seq_len) - new,
                 prompts_per_row=int(o.prompts_per_row), temperature=float(o.temperature),
                 top_p=float(o.top_p) if o.top_p < 1.0 else None, top_k=int(o.top_k) or None,
                 eos_ids=tuple(sorted(int(i) for i in eos_ids)), vocab_size=int(vocab_size), seq_kd=bool(o.seq_kd))


def chosen(seed: int, step: int, fraction: float, start_step: int = 0) -> bool:
  """Whether step `step` (1-based) trains on sampled completions: none up to `start_step`, then a draw from (seed,
  step) alone, so every process and every rerun of the run agrees."""
  if fraction <= 0 or step <= start_step:
    return False
  return fraction >= 1 or float(np.random.default_rng([int(seed), int(step), 0x6B64]).random()) < fraction


def initial_key(seed: int) -> jax.Array:
  """The sampling key a run starts from, as raw uint32 key data (what a checkpoint can hold)."""
  return jax.random.key_data(jax.random.fold_in(jax.random.key(int(seed)), 0x6B64))


def prompts(batch: dict, prompt_len: int, per_row: int):
  """The prompts of a packed batch, each document cut before its first trained token: (ids [R, P] left-padded,
  mask [R, P], truncated [R] bool) with R = rows * per_row, document k + 1 of row r at r * per_row + k. A prompt
  longer than P keeps its last P tokens (`truncated`); a document that is absent or trains nothing gives an empty
  prompt (mask all 0), whose completion the loss ignores."""
  ids_BxT, seg_BxT, mask_BxT = batch["input_ids"], batch["segment_ids"], batch["loss_mask"] > 0
  b, t = ids_BxT.shape
  idx_T = jnp.arange(t, dtype=jnp.int32)
  seg_BxKxT = seg_BxT[:, None, :] == jnp.arange(1, per_row + 1, dtype=seg_BxT.dtype)[None, :, None]
  # The target at position e is the document's first trained token: the prompt is its tokens up to e.
  end_BxK = jnp.min(jnp.where(seg_BxKxT & mask_BxT[:, None, :], idx_T, t), axis=-1)
  start_BxK = jnp.min(jnp.where(seg_BxKxT, idx_T, t), axis=-1)
  src_BxKxP = end_BxK[..., None] + 1 - prompt_len + jnp.arange(prompt_len, dtype=jnp.int32)
  valid_BxKxP = (src_BxKxP >= start_BxK[..., None]) & (end_BxK[..., None] < t)
  gathered = jnp.take_along_axis(ids_BxT, jnp.clip(src_BxKxP, 0, t - 1).reshape(b, -1), axis=1)
  ids_RxP = jnp.where(valid_BxKxP, gathered.reshape(valid_BxKxP.shape), 0).reshape(b * per_row, prompt_len)
  truncated_R = ((end_BxK < t) & (end_BxK + 1 - start_BxK > prompt_len)).reshape(-1)
  return ids_RxP, valid_BxKxP.reshape(b * per_row, prompt_len).astype(jnp.int32), truncated_R


def rows(ids_RxP, mask_RxP, tokens_RxN, lengths_R) -> dict:
  """Training rows of prompt + completion, one document each ([R, P + N]): the prompt's real tokens and the
  completion's first `lengths` tokens in segment 1, padding in 0; the loss mask covers the completion only, and
  none of it where the prompt is empty."""
  p, n = ids_RxP.shape[1], tokens_RxN.shape[1]
  made_RxN = jnp.arange(n)[None, :] < lengths_R[:, None]
  real_RxT = jnp.concatenate([mask_RxP > 0, made_RxN], axis=1)
  ids_RxT = jnp.concatenate([ids_RxP, jnp.where(made_RxN, tokens_RxN, 0)], axis=1).astype(jnp.int32)
  segment_ids = real_RxT.astype(jnp.int32)
  # Position i predicts token i + 1: completion tokens sit at P ... P + N - 1, their targets at P - 1 ... .
  has_prompt_R = jnp.any(mask_RxP > 0, axis=1)
  trained_RxT = jnp.concatenate([jnp.zeros_like(mask_RxP[:, 1:], bool), made_RxN & has_prompt_R[:, None],
                                 jnp.zeros_like(made_RxN[:, :1])], axis=1)
  targets = jnp.concatenate([ids_RxT[:, 1:], jnp.zeros_like(ids_RxT[:, :1])], axis=1)
  positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0).astype(jnp.int32)
  out = {"input_ids": ids_RxT, "targets": targets, "loss_mask": trained_RxT.astype(jnp.float32),
         "segment_ids": segment_ids, "positions": positions}
  return {k: shd.constrain(v, ("act_batch", None)) for k, v in out.items()}


def sample(model, batch: dict, key, r: Rollout):
  """(rows for the train step, metrics): `model`'s completions of the batch's prompts (`prompts`, `rows`)."""
  ids_RxP, mask_RxP, truncated_R = prompts(batch, r.prompt_len, r.prompts_per_row)
  ids_RxP = shd.constrain(ids_RxP, ("act_batch", None))
  mask_RxP = shd.constrain(mask_RxP, ("act_batch", None))
  tokens_RxN, lengths_R = generate.sample_on_device(
      model, ids_RxP, mask_RxP, key, max_new_tokens=r.max_new_tokens, eos_ids=r.eos_ids, temperature=r.temperature,
      top_k=r.top_k, top_p=r.top_p, vocab_size=r.vocab_size)
  out = rows(ids_RxP, mask_RxP, tokens_RxN, lengths_R)
  has_prompt_R = jnp.any(mask_RxP > 0, axis=1)
  n_prompts = jnp.maximum(jnp.sum(has_prompt_R, dtype=jnp.float32), 1.0)
  last_R = jnp.take_along_axis(tokens_RxN, jnp.maximum(lengths_R - 1, 0)[:, None], axis=1)[:, 0]
  ended_R = (lengths_R > 0) & jnp.isin(last_R, jnp.asarray(r.eos_ids or (-1,), jnp.int32))
  metrics = {"prompts": jnp.sum(has_prompt_R, dtype=jnp.float32),
             "sampled_len": jnp.sum(jnp.where(has_prompt_R, lengths_R, 0), dtype=jnp.float32) / n_prompts,
             "sampled_ended": jnp.sum(has_prompt_R & ended_R, dtype=jnp.float32) / n_prompts,
             "prompts_truncated": jnp.sum(has_prompt_R & truncated_R, dtype=jnp.float32)}
  return out, metrics
