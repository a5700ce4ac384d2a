"""The bundled assets (jaxkd/assets, made by scripts/make_assets.py): reproducible, small, and useful."""

import collections
import json
import os
import subprocess
import sys

from jaxkd.data import (ASSETS_DIR, CHAT_MESSAGES, CHAT_SHAREGPT, CHAT_TOOLS_OPENAI, TOKENIZER_DIR, load_tokenizer,
                        to_example)
from jaxkd.data import synthetic
from tests.runs import ROOT


def read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_assets_regenerate_identically_and_stay_small():
  out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_assets.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr
  made = [os.path.join(ASSETS_DIR, "README.md")] + [
      os.path.join(d, f) for sub in ("data", "tokenizer", "tokenizer_other") for d, _, fs in os.walk(os.path.join(ASSETS_DIR, sub))
      for f in fs]
  assert sum(os.path.getsize(p) for p in made) < 2_000_000


def test_both_forms_hold_the_same_conversations_with_system_tool_and_multi_turn():
  sharegpt, messages = read(CHAT_SHAREGPT), read(CHAT_MESSAGES)
  assert 2000 <= len(sharegpt) == len(messages)
  for a, b in zip(sharegpt, messages):
    assert to_example(a, "sharegpt") == to_example(b, "messages")
  roles = collections.Counter(m["role"] for r in messages for m in r["messages"])
  assert roles["system"] > 100 and roles["tool"] > 100
  assert sum(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in messages) > 100


def test_answers_are_distributions_not_single_labels():
  # The same question gets several different answers: what a teacher's soft targets can express.
  answers = collections.defaultdict(collections.Counter)
  for r in read(CHAT_MESSAGES):
    m = r["messages"]
    if len(m) == 2:
      answers[m[0]["content"]][m[1]["content"]] += 1
  repeated = {q: c for q, c in answers.items() if sum(c.values()) >= 5}
  assert len(repeated) >= 20
  assert sum(len(c) > 1 for c in repeated.values()) >= 0.9 * len(repeated)


def test_tokenizer():
  tok = load_tokenizer(TOKENIZER_DIR)
  assert 512 <= len(tok) <= 1024
  assert tok.eos_token == tok.pad_token == "<|endoftext|>"
  for special in ("<|im_start|>", "<|im_end|>"):
    assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
  chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
  assert tok.apply_chat_template(chat, tokenize=False) == (
      "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n")


def test_tool_chats_in_the_openai_layout_are_the_generators_and_the_same_conversations():
  conversations = synthetic.make_conversations(synthetic.DEFAULT_SEED, synthetic.NUM_CONVERSATIONS)
  rows = read(CHAT_TOOLS_OPENAI)
  assert rows == [synthetic.openai_tool_row(t) for t in conversations if synthetic.calls_tools(t)]
  text_form = [r for r in read(CHAT_MESSAGES) if any(m["role"] == "tool" for m in r["messages"])]
  assert len(rows) == len(text_form) > 100
  names = collections.Counter()
  for row, text in zip(rows, text_form):
    assert row["tools"] == synthetic.TOOL_SCHEMAS
    ex = to_example(row, "messages")
    assert [m["role"] for m in ex.messages] == [m["role"] for m in text["messages"]]
    for openai, plain in zip(ex.messages, text["messages"]):
      if "tool_calls" in openai:  # the text form's <tool_call>{"name": ..., args}</tool_call>, as a call
        (call,) = openai["tool_calls"]
        assert "content" not in openai and call["type"] == "function"
        spec = json.loads(plain["content"].removeprefix("<tool_call>").removesuffix("</tool_call>"))
        assert {"name": call["function"]["name"], **call["function"]["arguments"]} == spec
        names[call["function"]["name"]] += 1
      elif openai["role"] == "tool":
        assert openai["content"] == plain["content"] and openai["tool_call_id"] == "call_0"
      elif openai["role"] != "system":
        assert openai == plain
  assert names["calculator"] > 50 and names["get_weather"] > 50
