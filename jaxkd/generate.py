"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), under the chat template.

  python -m jaxkd.generate --model workdir/tiny_logit/export --prompt "What is 3 + 4?"

The prompt batch is left-padded and run through the model once (prefill); then one token per step is
appended to the cache, the whole loop compiled into one call on the device (`sample_on_device`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_logits(logits_BxV, key, *, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None):
  """Greedy at temperature 0, else a sample from softmax(logits / temperature) cut to top-k / top-p."""
  if temperature <= 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV.astype(jnp.float32) / temperature
  if top_k:  # a k past the vocabulary keeps every token, as in transformers
    kth = jax.lax.top_k(logits, min(int(top_k), logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample_on_device(model, ids_BxP, mask_BxP, key, *, max_new_tokens: int, eos_ids=(), temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, vocab_size: int | None = None,
                     stop_seqs: tuple[tuple[int, ...], ...] = ()):
  """Up to `max_new_tokens` new tokens for each left-padded prompt row, the whole loop on the device (traceable:
  call it under `jax.jit`; no host round trip per token): (tokens [B, N] int32, lengths [B] int32). A row stops
  after an eos id (kept), after its new tokens end with one of `stop_seqs` (token-id sequences, kept), or after N
  tokens; its slots past `lengths` hold 0. The prompt is one prefill into the model's KV cache (attention through
  the model's kernel, as in training), then one token a step through it."""
  b, p = ids_BxP.shape
  vocab = vocab_size or model.cfg.vocab_size
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  stop_seqs = tuple(tuple(x) for x in stop_seqs if 0 < len(x) <= max_new_tokens)

  def ends_with_a_stop(tokens_BxN, i):
    """Rows whose new tokens up to slot i end with a stop sequence."""
    hit = jnp.zeros((b,), bool)
    for seq in stop_seqs:
      n = len(seq)
      window = jax.lax.dynamic_slice_in_dim(tokens_BxN, jnp.maximum(i - n + 1, 0), n, axis=1)
      hit = hit | ((i + 1 >= n) & jnp.all(window == jnp.asarray(seq, jnp.int32), axis=1))
    return hit

  def next_logits(ids, mask, cache):
    out = model.forward(ids, attention_mask=mask, cache=cache)
    return out.logits[:, -1, :vocab], out.cache  # padded embedding rows are never sampled

  pick = lambda logits, k: sample_logits(logits, k, temperature=temperature, top_k=top_k, top_p=top_p)
  key, sub = jax.random.split(key)
  prefilled = model.prefill(ids_BxP, mask_BxP, p + max_new_tokens)  # through the attention kernel
  logits = jnp.dot(prefilled.last_hidden[:, -1], model.head_kernel(), preferred_element_type=jnp.float32)[:, :vocab]
  cache = prefilled.cache
  ones = jnp.ones((b, 1), jnp.int32)

  def more(carry):
    i, _, _, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def step(carry):
    i, token, cache, key, tokens_BxN, lengths, done = carry
    tokens_BxN = tokens_BxN.at[:, i].set(jnp.where(done, 0, token))
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(token, eos) | ends_with_a_stop(tokens_BxN, i)
    key, sub = jax.random.split(key)
    logits, cache = next_logits(token[:, None], ones, cache)
    return i + 1, pick(logits, sub), cache, key, tokens_BxN, lengths, done

  carry = (jnp.int32(0), pick(logits, sub), cache, key, jnp.zeros((b, max_new_tokens), jnp.int32),
           jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool))
  _, _, _, _, tokens_BxN, lengths, _ = jax.lax.while_loop(more, step, carry)
  return tokens_BxN, lengths


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_ids", "temperature", "top_k",
                                             "top_p", "vocab_size", "stop_seqs"))
def _decode(graphdef, state, ids_BxP, mask_BxP, key, **settings):
  """`sample_on_device` under one jit for the process: a call of shapes and settings seen before runs at once."""
  return sample_on_device(nnx.merge(graphdef, state), ids_BxP, mask_BxP, key, **settings)


def generate(model, prompts: list[list[int]], *, max_new_tokens: int, eos_ids=(), temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, vocab_size: int | None = None,
             pad_to: int = 1, rows: int | None = None, stop_seqs=()) -> list[list[int]]:
  """New token ids for each prompt (stopping at an eos id or after a stop sequence of ids, both kept), as lists
  (`sample_on_device`).

  Prompts are left-padded to the longest one, rounded up to a multiple of `pad_to`, and the batch is filled up to
  `rows` rows (repeating the last prompt), so that batches of similar shapes share one compiled loop."""
  b, p = max(len(prompts), rows or 0), -(-max(len(x) for x in prompts) // pad_to) * pad_to
  problem = model.cfg.too_long(p + max_new_tokens, what=f"prompt ({p}) + max_new_tokens ({max_new_tokens})",
                               name="model", fix="shorten the prompt or lower max_new_tokens")
  if problem:
    raise ValueError(problem)
  ids = np.zeros((b, p), np.int32)
  mask = np.zeros((b, p), np.int32)
  for i in range(b):  # left padding: every row's next token goes to the same slot
    x = prompts[min(i, len(prompts) - 1)]
    ids[i, p - len(x):], mask[i, p - len(x):] = x, 1
  graphdef, state = nnx.split(model)
  tokens, lengths = jax.device_get(_decode(
      graphdef, state, ids, mask, jax.random.key(seed), max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids),
      temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=vocab_size,
      stop_seqs=tuple(tuple(int(t) for t in x) for x in stop_seqs)))
  return [tokens[r, :lengths[r]].tolist() for r in range(len(prompts))]


def encode_prompt(tokenizer, text: str, *, chat: bool = True, system: str | None = None) -> list[int]:
  """Token ids of a user prompt under the tokenizer's chat template (when it has one and `chat`)."""
  if chat and getattr(tokenizer, "chat_template", None):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return encode_messages(tokenizer, messages)
  return tokenizer(text, add_special_tokens=True)["input_ids"]


def encode_messages(tokenizer, messages: list[dict], *, template: str | None = None) -> list[int]:
  """Token ids of a conversation under a chat template (None: the tokenizer's own), ending where the
  assistant's reply begins."""
  ids = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=True)
  return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def eos_ids_of(tokenizer) -> list[int]:
  """The ids that end a reply: eos plus end-of-turn specials of the chat template (<|im_end|>, <|eot_id|>)."""
  ids = set()
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>"):
    tid = tokenizer.convert_tokens_to_ids(tok)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
      ids.add(tid)
  return sorted(ids)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # JAX logs its backend search at INFO
  from jaxkd import data, models  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  model = models.from_pretrained(f.model, dtype=f.dtype)
  tokenizer = data.load_tokenizer(f.model)
  prompts = [encode_prompt(tokenizer, p, chat=f.chat, system=f.system) for p in f.prompt]
  outs = generate(model, prompts, max_new_tokens=f.max_new_tokens, eos_ids=eos_ids_of(tokenizer),
                  temperature=f.temperature, top_k=f.top_k or None, top_p=f.top_p, seed=f.seed,
                  vocab_size=len(tokenizer))
  for text, out in zip(f.prompt, outs):
    print(f"> {text}\n{tokenizer.decode(out, skip_special_tokens=True)}\n")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

  flags.DEFINE_string("model", None, "An HF model folder (e.g. workdir/RUN/export).", required=True)
  flags.DEFINE_multi_string("prompt", None, "Prompt(s); repeat the flag for a batch.", required=True)
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_bool("chat", True, "Wrap the prompt in the tokenizer's chat template.")
  flags.DEFINE_string("system", None, "Optional system message.")
  flags.DEFINE_string("dtype", "float32", "Parameter dtype: float32 or bfloat16.")
  app.run(main)
