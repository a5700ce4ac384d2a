"""Generation with the KV cache against transformers' greedy decoding; sampling filters; the eval command."""

import json

import numpy as np
import pytest
import torch
import transformers as tf
import jax
import jax.numpy as jnp

from jaxkd import data, eval as eval_lib, generate, models, tiny
from jaxkd.data import CHAT_MESSAGES
from tests import hf_models
from tests.data_references import GENERATION_CHATML


@pytest.mark.parametrize("name", ["qwen2_tied", "stablelm_full", "qwen3_tied_bias"])
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


@pytest.mark.parametrize("name", ["qwen2_untied", "llama_gqa_llama3", "qwen3_untied"])
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


def _through_first(seq, out):
  """`out` up to and including the first place it holds `seq` (all of it where it does not)."""
  n = len(seq)
  ends = [i + n for i in range(len(out) - n + 1) if out[i:i + n] == list(seq)]
  return out[:ends[0]] if ends else out


def test_generation_stops_after_a_stop_sequence(hf_factory):
  model = models.from_pretrained(hf_factory("qwen2_untied"))
  prompts = [[5, 17, 33, 2, 9], [44, 3], [7, 7, 1]]
  full = generate.generate(model, prompts, max_new_tokens=12)
  two, three = tuple(full[0][5:7]), tuple(full[1][3:6])
  cut = generate.generate(model, prompts, max_new_tokens=12, stop_seqs=[two, three, tuple(range(13))])
  # Each row stops after the first of the two sequences it writes (the 13-token one cannot fit and is ignored).
  expected = [min(_through_first(two, out), _through_first(three, out), key=len) for out in full]
  assert cut == expected
  assert len(cut[0]) <= 7 < len(full[0]) and len(cut[1]) <= 6 < len(full[1])


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


def _fitting_conversations(tok, seq_len, n):
  """The first n bundled conversations whose rendering fits in seq_len tokens (none is packed or cut)."""
  out = []
  with open(CHAT_MESSAGES) as f:
    for line in f:
      messages = json.loads(line)["messages"]
      ref = tok.apply_chat_template(messages, chat_template=GENERATION_CHATML, tokenize=True, return_dict=True,
                                    return_assistant_tokens_mask=True)
      if len(ref["input_ids"]) <= seq_len:
        out.append((messages, list(ref["input_ids"]), list(ref["assistant_masks"])))
      if len(out) == n:
        return out
  raise AssertionError(f"fewer than {n} bundled conversations fit in {seq_len} tokens")


def test_eval_command_is_consistent(tmp_path):
  """The loss and accuracy are the model's on the trained tokens, computed here conversation by conversation in
  float64 from the logits; with the model as its own teacher: agreement 1, KL 0, teacher loss = loss;
  perplexity = exp(loss)."""
  student = tiny.resolve("tiny:student")
  tok = data.load_tokenizer(student)  # what eval reads the rows with (a Qwen2 folder's: not the bundled one's ids)
  chats = _fitting_conversations(tok, 128, 120)
  path = tmp_path / "held_out.jsonl"
  path.write_text("".join(json.dumps({"messages": m}) + "\n" for m, _, _ in chats))
  out = eval_lib.evaluate(student, [str(path)], teacher_path=student, seq_len=128, batch_size=8)
  assert out["tokens"] > 1000
  np.testing.assert_allclose(out["perplexity"], np.exp(out["loss"]), rtol=1e-6)
  assert out["agreement"] == 1.0 and abs(out["kl_t1"]) < 1e-5
  np.testing.assert_allclose(out["teacher_ce"], out["loss"], rtol=1e-5)
  # The reference: each conversation alone in a row, target t + 1 trained where transformers' mask says so.
  ids_BxT, seg_BxT, mask_BxT = (np.zeros((len(chats), 128), dt) for dt in (np.int32, np.int32, bool))
  for i, (_, ids, mask) in enumerate(chats):
    ids_BxT[i, :len(ids)], seg_BxT[i, :len(ids)], mask_BxT[i, :len(ids)] = ids, 1, mask
  model = models.from_pretrained(student, dtype="float32")
  logits_BxTxV = np.asarray(model(ids_BxT, segment_ids=seg_BxT), np.float64)[..., :len(tok)]
  logp_BxTxV = logits_BxTxV - logits_BxTxV.max(-1, keepdims=True)
  logp_BxTxV -= np.log(np.exp(logp_BxTxV).sum(-1, keepdims=True))
  trained = mask_BxT[:, 1:]
  targets = ids_BxT[:, 1:]
  nll = -np.take_along_axis(logp_BxTxV[:, :-1], targets[..., None], axis=-1)[..., 0]
  assert out["tokens"] == trained.sum()
  np.testing.assert_allclose(out["loss"], nll[trained].mean(), rtol=1e-5)
  np.testing.assert_allclose(out["accuracy"], (logits_BxTxV[:, :-1].argmax(-1) == targets)[trained].mean(),
                             atol=1.5 / trained.sum())  # a near tie may flip one argmax in float32
  assert 0 <= out["accuracy"] <= 1
  limit = models.config_from_hf(tiny.TINY_CONFIGS["student"]).max_position_embeddings
  with pytest.raises(ValueError, match=rf"--seq_len {2 * limit} is longer than the model's "
                                       rf"max_position_embeddings={limit}"):
    eval_lib.evaluate(student, [CHAT_MESSAGES], seq_len=2 * limit, batch_size=8)
