"""`generate.sample_on_device`: the decode loop inside one compiled call, checked against the model's own
distribution by a chi-square test (temperature and top-p), through the prefill and one cached step, and its stops.

The expected distributions are float64 NumPy from the model's logits on the same prefixes (a forward without a
cache), with top-p applied as its definition says: the smallest set of most likely tokens whose mass reaches p.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxkd import data, generate, models, tiny

ROWS, TEMPERATURE, TOP_P = 4000, 1.3, 0.9


@pytest.fixture(scope="module")
def model():
  """The bundled trained teacher: its next-token distributions are peaked, as a real model's are."""
  return models.from_pretrained(tiny.resolve("tiny:teacher-trained"), dtype="float32")


@pytest.fixture(scope="module")
def prompt():
  return generate.encode_prompt(data.load_tokenizer(tiny.resolve("tiny:teacher-trained")), "Name three fruits.")


def expected(model, prefix, temperature=TEMPERATURE):
  z = np.asarray(model(jnp.asarray([prefix]))[0, -1], np.float64) / temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  keep = np.cumsum(p[order]) - p[order] < TOP_P  # the first always stays
  q = np.zeros_like(p)
  q[order[keep]] = p[order[keep]]
  return q / q.sum()


def chi_square(counts, probs):
  """p-value of the counts under probs, bins with expected count < 5 pooled; counts off the support fail."""
  n = counts.sum()
  assert counts[probs == 0].sum() == 0, "a token outside the top-p set was sampled"
  big = probs * n >= 5
  obs = np.append(counts[big], counts[~big & (probs > 0)].sum())
  exp = np.append(probs[big] * n, probs[~big & (probs > 0)].sum() * n)
  keep = exp > 0
  return stats.chisquare(obs[keep], exp[keep]).pvalue


def test_samples_follow_the_models_distribution_with_temperature_and_top_p(model, prompt):
  ids = jnp.asarray([prompt] * ROWS, jnp.int32)
  run = jax.jit(lambda ids, key: generate.sample_on_device(model, ids, jnp.ones_like(ids), key, max_new_tokens=2,
                                                           temperature=TEMPERATURE, top_p=TOP_P))
  tokens, lengths = jax.device_get(run(ids, jax.random.key(0)))
  assert (lengths == 2).all()
  v = model.cfg.vocab_size
  first = expected(model, prompt)
  assert 3 <= (first > 0).sum() < v  # top-p really cuts, and leaves a choice
  assert chi_square(np.bincount(tokens[:, 0], minlength=v), first) > 1e-3
  # The second token, through the KV cache, given the most frequent first one.
  t = int(np.bincount(tokens[:, 0]).argmax())
  rows = tokens[tokens[:, 0] == t]
  assert len(rows) > 500
  assert chi_square(np.bincount(rows[:, 1], minlength=v), expected(model, prompt + [t])) > 1e-3
  # The test can fail: the same counts against the distribution at another temperature.
  counts = np.bincount(tokens[:, 0], minlength=v)
  other = expected(model, prompt, temperature=1.0)
  assert (counts[other == 0].sum() > 0) or chi_square(counts, other) < 1e-6


def test_rows_stop_at_an_end_id_or_the_length_limit(model, prompt):
  greedy = np.asarray(model(jnp.asarray([prompt]))[0, -1]).argmax()
  n = len(prompt)
  prompts = jnp.asarray([prompt, [0, 0] + prompt[2:]], jnp.int32)  # the second row: a shorter, left-padded prompt
  mask = jnp.asarray([[1] * n, [0, 0] + [1] * (n - 2)], jnp.int32)
  tokens, lengths = jax.device_get(jax.jit(lambda i, m, k: generate.sample_on_device(
      model, i, m, k, max_new_tokens=6, eos_ids=(int(greedy),)))(prompts, mask, jax.random.key(0)))
  assert lengths[0] == 1 and tokens[0, 0] == greedy and not tokens[0, 1:].any()  # the end id is kept
  assert lengths[1] == 6 or tokens[1, lengths[1] - 1] == greedy
  assert not tokens[1, lengths[1]:].any()
