"""Generation with the KV cache against transformers' greedy decoding; sampling filters; the eval command."""

import numpy as np
import pytest
import torch
import transformers as tf
import jax
import jax.numpy as jnp

from jaxkd import eval as eval_lib, generate, models, tiny
from jaxkd.data import CHAT_MESSAGES
from tests import hf_models


@pytest.mark.parametrize("name", ["qwen2_tied", "stablelm_full"])
def test_cached_forward_equals_full_forward(hf_factory, name):
  model = models.from_pretrained(hf_factory(name))
  ids = np.random.RandomState(0).randint(0, hf_models.V, (2, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, :4] = 0  # left padding
  full = np.asarray(model(ids, attention_mask=mask))
  out = model.forward(ids[:, :7], attention_mask=mask[:, :7], cache=model.init_cache(2, 12))
  pieces, cache = [np.asarray(out.logits)], out.cache
  for t in range(7, 10):
    out = model.forward(ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], cache=cache)
    pieces.append(np.asarray(out.logits))
    cache = out.cache
  np.testing.assert_allclose(np.concatenate(pieces, 1)[mask > 0], full[mask > 0], atol=1e-5)


@pytest.mark.parametrize("name", ["qwen2_untied", "llama_gqa_llama3"])
def test_greedy_generation_matches_transformers(hf_factory, name):
  folder = hf_factory(name)
  prompts = [[5, 17, 33, 2, 9], [44, 3]]
  ours = generate.generate(models.from_pretrained(folder), prompts, max_new_tokens=8)
  ref_model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      ref = ref_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
    assert got == ref[0, len(prompt):].tolist()


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 200)
  draw = lambda **kw: {int(generate.sample_logits(logits, k, temperature=1.0, **kw)[0]) for k in keys}
  assert draw(top_k=2) == {0, 1}
  assert draw(top_p=0.7) == {0, 1}  # 0.5 < 0.7 <= 0.8
  assert draw(top_p=0.5) == {0}
  assert draw() == {0, 1, 2, 3}
  assert draw(top_k=5000) == {0, 1, 2, 3}  # past the vocabulary: every token stays, as in transformers
  assert int(generate.sample_logits(logits, keys[0], temperature=0.0)[0]) == 0


def test_eval_command_is_consistent():
  """With the model as its own teacher: agreement 1, KL 0, teacher loss = loss; perplexity = exp(loss)."""
  student = tiny.resolve("tiny:student")
  out = eval_lib.evaluate(student, [CHAT_MESSAGES], teacher_path=student, seq_len=128, batch_size=8)
  assert out["tokens"] > 1000
  np.testing.assert_allclose(out["perplexity"], np.exp(out["loss"]), rtol=1e-6)
  assert out["agreement"] == 1.0 and abs(out["kl_t1"]) < 1e-5
  np.testing.assert_allclose(out["teacher_ce"], out["loss"], rtol=1e-5)
  assert 0 <= out["accuracy"] <= 1
  limit = models.config_from_hf(tiny.TINY_CONFIGS["student"]).max_position_embeddings
  with pytest.raises(ValueError, match=rf"--seq_len {2 * limit} is longer than the model's "
                                       rf"max_position_embeddings={limit}"):
    eval_lib.evaluate(student, [CHAT_MESSAGES], seq_len=2 * limit, batch_size=8)
