"""The closing samples of a run: held-out prompts, answered greedily as transformers answers them."""

import json

import numpy as np
import torch
import transformers as tf

from jaxkd import data, generate, models, samples, tiny
from jaxkd.config_base import base_config, tiny_defaults
from jaxkd.data.sources import eval_rows

TEACHER = tiny.BUNDLED["teacher-trained"][0]


def test_held_out_prompts_are_the_first_held_out_rows_cut_before_the_reply():
  cfg = tiny_defaults(base_config()).data
  with open(data.CHAT_SHAREGPT) as f:
    rows = [json.loads(line)["conversations"] for line in f]
  held = np.flatnonzero(eval_rows(np.arange(len(rows)), cfg.eval_fraction, cfg.eval_seed))
  want = []
  for i in held[:5]:
    turns = rows[i]
    k = next(j for j, t in enumerate(turns) if t["from"] == "gpt")
    want.append(([t["value"] for t in turns[:k]], turns[k]["value"]))
  got = data.held_out_prompts(cfg, 5)
  assert [([m["content"] for m in p.messages], p.reference) for p in got] == want
  assert all(p.messages[-1]["role"] == "user" for p in got)
  cfg.eval_fraction = 0.0  # nothing held out: nothing to answer
  assert not data.held_out_prompts(cfg, 5)


def test_held_out_tool_prompts_carry_the_tools_and_the_expected_calls():
  cfg = tiny_defaults(base_config()).data
  cfg.sources = [dict(path=data.CHAT_TOOLS_OPENAI)]
  with open(data.CHAT_TOOLS_OPENAI) as f:
    rows = [json.loads(line) for line in f]
  held = np.flatnonzero(eval_rows(np.arange(len(rows)), cfg.eval_fraction, cfg.eval_seed))
  got = data.held_out_prompts(cfg, 3)
  assert len(got) == 3
  for i, p in zip(held, got):  # each held-out row's first assistant turn is a call with null content
    (call,) = rows[i]["messages"][2]["tool_calls"]
    assert [m["role"] for m in p.messages] == ["system", "user"] and p.reference == ""
    assert p.tools == rows[i]["tools"]
    assert p.calls == [{**call, "function": {**call["function"],
                                             "arguments": json.loads(call["function"]["arguments"])}}]


def test_answers_are_transformers_greedy_generations():
  cfg = tiny_defaults(base_config()).data
  tok = data.load_tokenizer(TEACHER)
  model = models.from_pretrained(TEACHER, dtype="float32")
  out = samples.answer_held_out(cfg, {"teacher": samples.Speaker(model, tok, None)}, count=3, max_new_tokens=24)
  assert len(out) == 3
  reference = tf.AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
  for row in out:
    ids = generate.encode_messages(tok, row["prompt"])
    with torch.no_grad():
      new = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                               eos_token_id=generate.eos_ids_of(tok), pad_token_id=0)[0, len(ids):]
    assert row["teacher"] == tok.decode(new, skip_special_tokens=True).strip(), row
  text = samples.format_samples(out)
  assert text.count("prompt:") == 3 and out[0]["teacher"].splitlines()[0] in text
