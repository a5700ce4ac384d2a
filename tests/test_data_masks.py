"""Chat templates and trained-token masks (jaxkd.data.encode) against the rendered template.

The trained tokens of each example are decoded run by run and compared with the assistant contents (plus
the end-of-turn token) written out from the messages, and the token ids with transformers' own rendering
and tokenization. Where a template marks generations, transformers' `return_assistant_tokens_mask` is the
reference.
"""

import itertools

import numpy as np
import pytest

from jaxkd.data import CHATML_TEMPLATE, TOKENIZER_DIR, load_tokenizer
from jaxkd.data.encode import Encoder, Side, resolve_template
from jaxkd.data.formats import BAD_REASONS
from tests.data_references import GENERATION_CHATML


def encode_one(tok, messages, *, template=None, train_on="assistant", fmt="messages", row=None):
  side = Side(tok, resolve_template(template, tok))
  enc = Encoder(side, train_on=train_on).encode([row or {"messages": messages}], fmt, [0])
  a, b = enc.offsets[0], enc.offsets[1]
  return enc, enc.ids[a:b], enc.mask[a:b]


def trained_runs(tok, ids, mask):
  """Decoded text of each maximal run of trained tokens."""
  runs = []
  for is_trained, group in itertools.groupby(range(len(ids)), key=lambda i: bool(mask[i])):
    if is_trained:
      runs.append(tok.decode(ids[list(group)]))
  return runs


CONVERSATION = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "What is 518 * 54?"},
    {"role": "assistant", "content": '<tool_call>{"name": "calculator", "expression": "518 * 54"}</tool_call>'},
    {"role": "tool", "content": "27972"},
    {"role": "assistant", "content": "518 * 54 = 27972."},
    {"role": "user", "content": "And minus 2?"},
    {"role": "assistant", "content": "It is\n\n  27970."},
]


def test_assistant_mask_multi_turn_system_tool(tok):
  _, ids, mask = encode_one(tok, CONVERSATION)
  rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
  assert tok.decode(ids) == rendered
  assert ids.tolist() == tok(rendered, add_special_tokens=False)["input_ids"]
  expected = [m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant"]
  assert trained_runs(tok, ids, mask) == expected


def test_sharegpt_and_messages_give_the_same_tokens(tok):
  sharegpt = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                 "value": m["content"]} for m in CONVERSATION]}
  _, ids_a, mask_a = encode_one(tok, None, fmt="sharegpt", row=sharegpt)
  _, ids_b, mask_b = encode_one(tok, CONVERSATION)
  np.testing.assert_array_equal(ids_a, ids_b)
  np.testing.assert_array_equal(mask_a, mask_b)


def test_generation_markers_match_transformers(tok):
  _, ids, mask = encode_one(tok, CONVERSATION, template=GENERATION_CHATML)
  ref = tok.apply_chat_template(CONVERSATION, chat_template=GENERATION_CHATML, tokenize=True, return_dict=True,
                                return_assistant_tokens_mask=True)
  assert ids.tolist() == list(ref["input_ids"])
  assert mask.tolist() == list(ref["assistant_masks"])


def test_template_that_trims_content(tok):
  # Llama 3 style: the template trims each message, so contents are found by search, stripped.
  template = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n\\n' + "
              "message['content'] | trim + '<|im_end|>' }}{%- endfor %}")
  messages = [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": "\n hello there \n"}]
  _, ids, mask = encode_one(tok, messages, template=template)
  assert trained_runs(tok, ids, mask) == ["hello there<|im_end|>"]


def test_end_of_turn_after_a_space(tok):
  # Llama 2 style: "[/INST] answer </s>" -- the space and the end token are trained with the answer.
  template = ("{%- for message in messages %}{%- if message['role'] == 'user' %}"
              "{{- '[INST] ' + message['content'] + ' [/INST]' }}"
              "{%- else %}{{- ' ' + message['content'] + ' ' + eos_token }}{%- endif %}{%- endfor %}")
  messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
              {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
  _, ids, mask = encode_one(tok, messages, template=template)
  assert tok.decode(ids) == "[INST] q1 [/INST] a1 <|endoftext|>[INST] q2 [/INST] a2 <|endoftext|>"
  # The template's space before an answer merges into the answer's first token (" a1"): that token is what
  # the model must produce there, so it is trained whole.
  assert trained_runs(tok, ids, mask) == [" a1 <|endoftext|>", " a2 <|endoftext|>"]


def test_train_on_all_and_plain_text(tok):
  _, ids, mask = encode_one(tok, CONVERSATION, train_on="all")
  assert mask.all()
  text = "Once upon a time, a small cat lived near a river."
  _, ids, mask = encode_one(tok, None, fmt="text", row={"text": text})
  assert ids.tolist() == tok(text)["input_ids"] + [tok.eos_token_id]  # eos ends each document
  assert mask.all()


def test_raw_prompt_completion_trains_the_completion_only(tok):
  side = Side(tok, CHATML_TEMPLATE)
  enc = Encoder(side, chat_prompt_completion=False).encode([{"prompt": "Q: 2+2?", "completion": " A: 4"}],
                                                           "prompt_completion", [0])
  ids, mask = enc.ids, enc.mask
  assert trained_runs(tok, ids, mask) == [" A: 4<|endoftext|>"]


def test_whitespace_tokens_stay_trained_with_trimmed_offsets(tok):
  # GPT-2's post-processor trims whitespace out of offsets, which would leave whitespace-only tokens of an
  # answer outside every span; the encoder tokenizes without post-processing.
  from tokenizers import processors

  trimmed = load_tokenizer(TOKENIZER_DIR)
  trimmed.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
  messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a\n\n   \n\nb"}]
  offsets = trimmed("<|im_start|>assistant\na\n\n   \n\nb", return_offsets_mapping=True)["offset_mapping"]
  assert any(s == e for s, e in offsets)  # the trap is real for this tokenizer
  _, ids, mask = encode_one(trimmed, messages)
  assert trained_runs(trimmed, ids, mask) == ["a\n\n   \n\nb<|im_end|>"]


def test_rows_without_trainable_tokens_and_template_errors_are_bad(tok):
  raising = ("{%- for m in messages %}{%- if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}"
             "{%- endif %}{{- m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor %}")
  side = Side(tok, raising)
  rows = [{"messages": [{"role": "user", "content": "only a question"}]},
          {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "t"}]},
          {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
  enc = Encoder(side).encode(rows, "messages", [10, 11, 12])
  assert [BAD_REASONS[s - 1] if s else None for s in enc.status] == ["no_trainable_token", "template_error", None]
  assert enc.problems["template_error"]["first"][0][0] == 11
  assert "no tools here" in enc.problems["template_error"]["first"][0][1]
  assert np.diff(enc.offsets).tolist()[:2] == [0, 0]  # bad rows hold no tokens


def test_a_template_that_does_not_compile_is_a_config_error(tok):
  from jaxkd.data import DataError

  with pytest.raises(DataError, match="does not compile.*data.chat_template"):
    Side(tok, "{% for m in messages %}{{ m['content'] }")


@pytest.mark.parametrize("reply", ["a", "assistant", "start", "im"])
def test_trimmed_short_reply_is_not_found_inside_the_markup(tok, reply):
  # The template trims, so contents are located after their own markup: a reply that also occurs in the
  # markup before it ("<|im_start|>assistant") must still be the text that is trained.
  template = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n\\n' + "
              "message['content'] | trim + '<|im_end|>' }}{%- endfor %}")
  messages = [{"role": "user", "content": "Pick one.\n"}, {"role": "assistant", "content": reply}]
  _, ids, mask = encode_one(tok, messages, template=template)
  assert trained_runs(tok, ids, mask) == [reply + "<|im_end|>"]
