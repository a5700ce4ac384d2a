"""Tool-calling conversations through the encoder (jaxkd.data.encode) under the models' own tool templates.

The references are transformers' `apply_chat_template(messages, tools=..., return_assistant_tokens_mask=True)`
on `{% generation %}`-marked copies of the published Qwen2.5-Instruct and Llama-3.1-Instruct templates
(tests/data_references.py), given the messages as transformers expects them (arguments as objects, no None
values). The encoder gets the rows as datasets hold them (arguments as JSON strings, `content: null`, None
keys) and the unmarked templates, and must give the same ids and masks.
"""

import copy
import itertools
import json

import numpy as np
import pytest

from jaxkd.data import (CHAT_MESSAGES, CHAT_TOOLS_OPENAI, CHATML_TEMPLATE, TOKENIZER_DIR, default_data_config,
                        load_tokenizer, make_loader)
from jaxkd.data.encode import (CHATML_BUNDLED_TOOLS_TEMPLATE, CHATML_TOOLS_TEMPLATE, Encoder, Side,
                               resolve_template)
from jaxkd.data.formats import BAD_REASONS
from tests.data_references import LLAMA31_TEMPLATE, QWEN25_TEMPLATE


def _mark(template, replacements):
  for old, new in replacements:
    assert template.count(old) == 1, old
    template = template.replace(old, new)
  return template


# What the model writes after the generation prompt: the reply or the calls, and the end-of-turn token.
QWEN25_MARKED = _mark(QWEN25_TEMPLATE, [
    ("""(message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}""",
     """(message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" and not message.tool_calls %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- generation %}{{- message.content + '<|im_end|>' }}{%- endgeneration %}
        {{- '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- generation %}
        {%- if message.content %}
            {{- message.content }}
        {%- endif %}"""),
    ("""            {{- '\\n<tool_call>\\n{"name": "' }}""",
     """            {%- if message.content or not loop.first %}
                {{- '\\n' }}
            {%- endif %}
            {{- '<tool_call>\\n{"name": "' }}"""),
    ("""        {%- endfor %}
        {{- '<|im_end|>\\n' }}""",
     """        {%- endfor %}
        {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}"""),
])

LLAMA31_MARKED = _mark(LLAMA31_TEMPLATE, [
    ("""        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}""",
     """        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
        {%- if message.role == 'assistant' %}
            {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}
        {%- else %}
            {{- message['content'] | trim + '<|eot_id|>' }}
        {%- endif %}"""),
    ("""            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}""",
     """            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {%- generation %}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
            {{- "<|eot_id|>" }}
            {%- endgeneration %}
        {%- endif %}"""),
])

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_quotes", "description": "Stock quotes.",
        "parameters": {"type": "object", "properties": {"symbols": {"type": "array", "items": {"type": "string"}},
                                                        "ids": {"type": "array"}}, "required": ["symbols"]}}},
]


def call(name, arguments, i):
  """A call as an OpenAI export holds it: the arguments are a JSON string."""
  return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


WEATHER = {"messages": [
    {"role": "system", "content": "You can call tools.", "tool_calls": None},
    {"role": "user", "content": "Is it cold in Paris?", "name": None},
    {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Paris"}, 0)]},
    {"role": "tool", "tool_call_id": "call_0", "name": "get_weather",
     "content": '{"city": "Paris", "temp_c": -2, "sky": "snowy"}'},
    {"role": "assistant", "content": "Yes: -2 degrees and snowy.", "tool_calls": None},
], "tools": json.dumps(TOOLS)}
QUOTES = {"messages": [
    {"role": "user", "content": "Quote AAPL and MSFT."},
    {"role": "assistant", "content": "", "tool_calls": [call("get_quotes", {"symbols": ["AAPL", "MSFT"], "ids": []}, 0)]},
    {"role": "tool", "tool_call_id": "call_0", "content": "AAPL 190, MSFT 410"},
    {"role": "assistant", "content": "AAPL is at 190 and MSFT at 410."},
], "tools": TOOLS}
PARALLEL = {"messages": [  # two calls in one turn, with text: Qwen2.5 renders them, Llama 3.1 refuses
    {"role": "user", "content": "Weather in Oslo and Lima?"},
    {"role": "assistant", "content": "Let me look both up.",
     "tool_calls": [call("get_weather", {"city": "Oslo"}, 0), call("get_weather", {"city": "Lima"}, 1)]},
    {"role": "tool", "tool_call_id": "call_0", "content": "Oslo: 1 degree"},
    {"role": "tool", "tool_call_id": "call_1", "content": "Lima: 22 degrees"},
    {"role": "assistant", "content": "Oslo is at 1 degree, Lima at 22."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
], "tools": TOOLS}
NO_TOOLS = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], "tools": []}


def as_transformers_takes_it(row):
  """The messages and tools as apply_chat_template renders them right: None keys dropped (it does that
  itself too) and the arguments as objects (it does not parse strings)."""
  messages = []
  for m in copy.deepcopy(row["messages"]):
    m = {k: v for k, v in m.items() if v is not None}
    for c in m.get("tool_calls", ()):
      c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    messages.append(m)
  tools = row["tools"]
  return messages, json.loads(tools) if isinstance(tools, str) else tools


@pytest.fixture(scope="module")
def llama_tok():
  """The bundled tokenizer with Llama 3's header and turn tokens as special tokens."""
  t = load_tokenizer(TOKENIZER_DIR)
  t.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": [
      "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]})
  return t


def encode(tok, template, rows):
  return Encoder(Side(tok, template)).encode(rows, "messages", list(range(len(rows))))


def row_tokens(enc, i):
  a, b = enc.offsets[i], enc.offsets[i + 1]
  return enc.ids[a:b].tolist(), enc.mask[a:b].tolist()


def trained_runs(tok, ids, mask):
  return [tok.decode([ids[i] for i in g]) for t, g in itertools.groupby(range(len(ids)), key=lambda i: mask[i]) if t]


CASES = [("qwen", WEATHER), ("qwen", QUOTES), ("qwen", PARALLEL), ("qwen", NO_TOOLS),
         ("llama", WEATHER), ("llama", QUOTES), ("llama", NO_TOOLS)]


@pytest.mark.parametrize("family, row", CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_masks_equal_transformers_on_the_generation_marked_template(family, row, tok, llama_tok):
  tokenizer, template, marked = ((tok, QWEN25_TEMPLATE, QWEN25_MARKED) if family == "qwen"
                                 else (llama_tok, LLAMA31_TEMPLATE, LLAMA31_MARKED))
  messages, tools = as_transformers_takes_it(row)
  text = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False)
  assert tokenizer.apply_chat_template(messages, tools=tools, chat_template=marked, tokenize=False) == text
  ref = tokenizer.apply_chat_template(messages, tools=tools, chat_template=marked, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
  assert sum(ref["assistant_masks"]) > 0
  for tmpl in (template, marked):  # by the turn renders, and by the template's own markers
    enc = encode(tokenizer, tmpl, [row])
    assert enc.status.tolist() == [0], enc.problems
    ids, mask = row_tokens(enc, 0)
    assert ids == list(ref["input_ids"])
    assert mask == list(ref["assistant_masks"])


def test_calls_and_answers_are_trained_tool_results_never(tok, llama_tok):
  # Written out by hand from the templates: what the model must write, and nothing the tools answered.
  ids, mask = row_tokens(encode(tok, QWEN25_TEMPLATE, [PARALLEL]), 0)
  assert trained_runs(tok, ids, mask) == [
      'Let me look both up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
      '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call><|im_end|>',
      "Oslo is at 1 degree, Lima at 22.<|im_end|>", "You are welcome.<|im_end|>"]
  ids, mask = row_tokens(encode(llama_tok, LLAMA31_TEMPLATE, [QUOTES]), 0)
  assert trained_runs(llama_tok, ids, mask) == [
      '{"name": "get_quotes", "parameters": {"symbols": ["AAPL", "MSFT"], "ids": []}}<|eot_id|>',
      "AAPL is at 190 and MSFT at 410.<|eot_id|>"]
  # Arguments given as a JSON string are parsed before rendering: transformers would quote them again.
  messages, tools = as_transformers_takes_it(QUOTES)
  messages[1]["tool_calls"][0]["function"]["arguments"] = QUOTES["messages"][1]["tool_calls"][0]["function"]["arguments"]
  double = llama_tok.apply_chat_template(messages, tools=tools, chat_template=LLAMA31_TEMPLATE, tokenize=False)
  assert '"parameters": "{\\"symbols\\"' in double and llama_tok.decode(ids) != double


def test_template_refusals_and_dropped_calls_are_bad_rows_with_reasons(tok, llama_tok):
  enc = encode(llama_tok, LLAMA31_TEMPLATE, [WEATHER, PARALLEL, QUOTES])
  assert [BAD_REASONS[s - 1] if s else None for s in enc.status] == [None, "template_error", None]
  assert "only supports single tool-calls" in enc.problems["template_error"]["first"][0][1]
  # A template that knows nothing of tools would train the conversation without its calls: refused.
  no_tools = dict(WEATHER, tools=None)
  enc = encode(tok, CHATML_TEMPLATE, [no_tools, dict(QUOTES, tools=None), dict(NO_TOOLS, tools=TOOLS)])
  assert [BAD_REASONS[s - 1] if s else None for s in enc.status] == ["template_error"] * 3
  details = [d for _, d in enc.problems["template_error"]["first"]]
  assert "UndefinedError" in details[0]  # content null: ChatML reads message['content']
  assert "does not render the tool calls of message 1 (get_quotes)" in details[1]
  assert "does not render the tools ['get_weather', 'get_quotes']" in details[2]


def test_a_template_that_rewrites_history_is_a_bad_row_not_a_wrong_mask(tok):
  # The system turn counts the messages after it, so each prefix render differs from the full one.
  template = ("{{- 'turns: ' + (messages | length) | string + '\\n' }}{%- for m in messages %}"
              "{{- m.role + ': ' + (m.content or (m.tool_calls | tojson)) + '<|im_end|>\\n' }}{%- endfor %}"
              "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}")
  enc = encode(tok, template, [dict(WEATHER, tools=None)])
  assert BAD_REASONS[enc.status[0] - 1] == "content_not_in_template"
  assert "tool call cannot be located" in enc.problems["content_not_in_template"]["first"][0][1]


def test_loader_keeps_null_content_calls_and_counts_refusals(llama_tok, tmp_path):
  path = tmp_path / "tools.jsonl"
  rows = [WEATHER, QUOTES, PARALLEL, NO_TOOLS]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = default_data_config()
  cfg.sources = [dict(path=str(path))]  # format detected from the columns: messages
  cfg.chat_template = LLAMA31_TEMPLATE
  loader = make_loader(cfg, tokenizer=llama_tok, seq_len=1280, batch_size=2, seed=0, cache_dir=str(tmp_path))
  assert loader.stats["skipped"] == {"template_error": 1} and loader.stats["examples"] == 3
  (skipped,) = [src["skipped"]["template_error"] for src in loader.stats["sources"]]
  assert skipped["rows"] == [2] and "only supports single tool-calls" in skipped["detail"]
  expected = set()
  for row in (WEATHER, QUOTES, NO_TOOLS):
    messages, tools = as_transformers_takes_it(row)
    expected.add(tuple(llama_tok.apply_chat_template(messages, tools=tools, chat_template=LLAMA31_TEMPLATE,
                                                     tokenize=True, return_dict=True)["input_ids"]))
  batch = next(loader)
  docs = {tuple(batch["input_ids"][r][batch["segment_ids"][r] == d].tolist())
          for r in range(2) for d in range(1, batch["segment_ids"][r].max() + 1)}
  assert docs <= expected and docs
  assert np.isfinite(batch["loss_mask"]).all()


def read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_bundled_tool_chats_under_chatml_tools_render_as_qwen25_and_mask_as_its_marked_copy(tok):
  """"chatml_tools" is Qwen2.5's tool format without its default system prompt: on the bundled tool chats
  (all with a system turn) it renders Qwen2.5's text, and the masks are the marked Qwen2.5 template's."""
  rows = read(CHAT_TOOLS_OPENAI)
  enc = encode(tok, resolve_template("chatml_tools", tok), rows)
  assert not enc.status.any(), enc.problems
  for i, row in enumerate(rows):
    messages, tools = as_transformers_takes_it(row)
    text = tok.apply_chat_template(messages, tools=tools, chat_template=CHATML_TOOLS_TEMPLATE, tokenize=False)
    assert text == tok.apply_chat_template(messages, tools=tools, chat_template=QWEN25_TEMPLATE, tokenize=False)
    ref = tok.apply_chat_template(messages, tools=tools, chat_template=QWEN25_MARKED, tokenize=True,
                                  return_dict=True, return_assistant_tokens_mask=True)
    assert row_tokens(enc, i) == (list(ref["input_ids"]), list(ref["assistant_masks"]))
  # Without tools or tool turns it is ChatML.
  for row in [r for r in read(CHAT_MESSAGES)[:300] if all(m["role"] != "tool" for m in r["messages"])]:
    assert (tok.apply_chat_template(row["messages"], chat_template=CHATML_TOOLS_TEMPLATE, tokenize=False)
            == tok.apply_chat_template(row["messages"], chat_template=CHATML_TEMPLATE, tokenize=False))


def test_bundled_tool_chats_under_chatml_bundled_tools_render_as_the_text_the_tiny_models_learnt(tok):
  """"chatml_bundled_tools" renders the OpenAI layout of the bundled tool chats as their text form (the calls
  in the reply, the tools in the system prompt) renders under ChatML, character for character, and so masks
  them alike."""
  rows = read(CHAT_TOOLS_OPENAI)
  text_form = [r for r in read(CHAT_MESSAGES) if any(m["role"] == "tool" for m in r["messages"])]
  assert len(rows) == len(text_form)
  for row, text in zip(rows, text_form):
    messages, tools = as_transformers_takes_it(row)
    ours = tok.apply_chat_template(messages, tools=tools, chat_template=CHATML_BUNDLED_TOOLS_TEMPLATE, tokenize=False)
    assert ours == tok.apply_chat_template(text["messages"], chat_template=CHATML_TEMPLATE, tokenize=False)
  ours = encode(tok, resolve_template("chatml_bundled_tools", tok), rows[:40])
  theirs = encode(tok, CHATML_TEMPLATE, text_form[:40])
  assert not ours.status.any(), ours.problems
  for i in range(40):
    assert row_tokens(ours, i) == row_tokens(theirs, i)
