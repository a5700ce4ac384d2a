"""Log-likelihoods of continuations after contexts, batched and sharded, as lm-evaluation-harness computes them.

A request is a (context, continuation) pair of strings, tokenised as lm-eval's `_encode_pair` does: whitespace
that ends the context moves to the front of the continuation, the two are encoded together and the continuation's
tokens are those past the context's own encoding (a merge across the boundary counts to the continuation); an
empty context is the BOS token (EOS where there is none). A request's score is the sum of its continuation
tokens' log-probabilities over the model's whole output head (transformers' logits: padded embedding rows
included), and whether each of those tokens is the head's argmax (lm-eval's `is_greedy`). A request longer than
the model is cut from the left, as lm-eval cuts it.

Rows are left-padded so that every continuation ends at the last position: the head is applied to the last C
positions only, C the batch's longest continuation rounded up to 8, which makes [B, C, V] float32 logits (a
batch of 32 rows with 8-token answers on a 152k vocabulary: 156 MB; log-softmax over the whole vocabulary at
each of those positions, unchunked, is fine at that size), never [B, T, V]. Requests with the same input (the
choices of a question that are one token each) share a row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

CONTINUATION_BUCKET = 8  # continuation lengths are padded to a multiple of this: answers are short


def bucket(n: int, minimum: int = 32) -> int:
  """`n` rounded up to a compile bucket: multiples of `minimum`, then a quarter of the power of two below `n` (at
  most 4 shapes an octave, at most 1/4 padding), so a file's rows share few compiled shapes."""
  if n <= minimum:
    return minimum
  step = max(minimum, (1 << (int(n - 1).bit_length() - 1)) // 4)
  return -(-n // step) * step


def prefix_token_id(tokenizer) -> int:
  """What stands for an empty context (lm-eval's `prefix_token_id`): BOS, or EOS when the tokenizer has none."""
  return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer, text: str) -> list[int]:
  """A text's ids as lm-eval's HF model encodes a context (`tok_encode`): the tokenizer's own special tokens
  (Llama's BOS), unless the text already starts with the prefix token's text."""
  first = prefix_token_id(tokenizer)
  starts = first is not None and text.startswith(tokenizer.decode([first]))
  return tokenizer(text, add_special_tokens=not starts)["input_ids"]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) of one request, split as lm-eval's `loglikelihood`/`_encode_pair` split it."""
  if not context:
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    first = prefix_token_id(tokenizer)
    return ([first], cont) if cont[:1] != [first] else (cont[:1], cont[1:])
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole, ctx = encode(tokenizer, context + continuation), encode(tokenizer, context)
  return ctx, whole[len(ctx):]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, state, ids_BxT, mask_BxT, targets_BxMxC, scored_BxMxC):
  """(sum of the scored targets' log-probs [B, M], every scored target the argmax [B, M]): the outputs at the last C
  positions of each row predict each of its M target rows (requests whose inputs are the same row)."""
  model = nnx.merge(graphdef, state)
  c = targets_BxMxC.shape[2]
  h_BxCxD = model.forward(ids_BxT, attention_mask=mask_BxT, compute_logits=False).last_hidden[:, -c:]
  logits_BxCxV = jnp.einsum("bcd,dv->bcv", h_BxCxD, model.head_kernel(), preferred_element_type=jnp.float32)
  rows_Bx1x1 = jnp.arange(targets_BxMxC.shape[0])[:, None, None]
  target_BxMxC = logits_BxCxV[rows_Bx1x1, jnp.arange(c)[None, None, :], targets_BxMxC]
  logp_BxMxC = target_BxMxC - jax.nn.logsumexp(logits_BxCxV, axis=-1)[:, None, :]
  greedy_BxMxC = jnp.argmax(logits_BxCxV, axis=-1)[:, None, :] == targets_BxMxC
  return (jnp.sum(jnp.where(scored_BxMxC, logp_BxMxC, 0.0), axis=-1),
          jnp.all(greedy_BxMxC | ~scored_BxMxC, axis=-1))


def score_tokens(model, pairs: list[tuple[list[int], list[int]]], *, batch_size: int = 32, mesh=None,
                 pad_to: int = 32) -> list[tuple[float, bool]]:
  """(log-likelihood, is_greedy) of each (context ids, continuation ids) pair, in order.

  Pairs whose model inputs are the same (a multiple-choice question's one-token answers, MMLU's letters) share one
  row, as lm-eval's logits cache shares them. Rows are scored `batch_size` at a time, longest first, each batch
  left-padded to a `bucket` of its longest row and filled up to `batch_size` rows (repeats of its last), so a file
  compiles a few shapes. With a `mesh`, each batch's rows are split over it (the batch is first rounded up to a
  multiple of its row shards)."""
  from jaxkd import sharding  # pylint: disable=import-outside-toplevel
  from jaxkd.data import global_batch  # pylint: disable=import-outside-toplevel

  if any(not cont for _, cont in pairs):
    raise ValueError("a continuation encodes to no tokens: nothing to score (an empty choice in the data?)")
  limit = model.cfg.max_position_embeddings
  members: dict[tuple, list[int]] = {}  # lm-eval's input (the last limit + 1 tokens but the last) -> its pairs
  for i, (ctx, cont) in enumerate(pairs):
    if len(cont) > limit:
      raise ValueError(f"a continuation of {len(cont)} tokens is longer than the model's "
                       f"max_position_embeddings={limit}: shorten the choices")
    members.setdefault(tuple((ctx + cont)[-(limit + 1):][:-1]), []).append(i)
  inputs = sorted(members, key=len, reverse=True)
  shards = sharding.batch_shards(mesh) if mesh is not None else 1
  b = -(-max(1, min(batch_size, len(inputs))) // shards) * shards
  graphdef, state = nnx.split(model)
  out = [None] * len(pairs)
  for lo in range(0, len(inputs), b):
    picked = inputs[lo:lo + b]
    t = min(bucket(len(picked[0]), pad_to), limit)
    c = min(-(-max(len(pairs[i][1]) for x in picked for i in members[x]) // CONTINUATION_BUCKET)
            * CONTINUATION_BUCKET, t)
    m = 1 << (max(len(members[x]) for x in picked) - 1).bit_length()  # a power of two: few shapes
    batch = {"ids": np.zeros((b, t), np.int32), "mask": np.zeros((b, t), np.int32),
             "targets": np.zeros((b, m, c), np.int32), "scored": np.zeros((b, m, c), bool)}
    for r in range(b):
      inp = picked[min(r, len(picked) - 1)]
      batch["ids"][r, t - len(inp):], batch["mask"][r, t - len(inp):] = inp, 1
      for j, i in enumerate(members[inp]):
        cont = pairs[i][1]
        batch["targets"][r, j, c - len(cont):], batch["scored"][r, j, c - len(cont):] = cont, True
    if mesh is not None:
      batch = global_batch(batch, mesh)
    ll, greedy = jax.device_get(_score(graphdef, state, batch["ids"], batch["mask"], batch["targets"],
                                       batch["scored"]))
    for r, inp in enumerate(picked):
      for j, i in enumerate(members[inp]):
        out[i] = (float(ll[r, j]), bool(greedy[r, j]))
  return out


def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], **kwargs) -> list[tuple[float, bool]]:
  """(log-likelihood, is_greedy) of each (context, continuation) request, in order (`score_tokens`' kwargs)."""
  return score_tokens(model, [encode_pair(tokenizer, ctx, cont) for ctx, cont in requests], **kwargs)
