"""Format detection and conversion (jaxkd.data.formats): every format, the TFDS/JSON spellings, bad rows.

Expected conversions are written out by hand from the format definitions, not produced by the code.
"""

import numpy as np
import pytest

from jaxkd.data.formats import BadRow, Conversation, DataError, Text, detect_format, to_example

U, A, S, T = "user", "assistant", "system", "tool"


@pytest.mark.parametrize("columns, fmt", [
    (["conversations", "id"], "sharegpt"),
    (["messages", "tools"], "messages"),
    (["instruction", "input", "output"], "alpaca"),
    (["prompt", "completion"], "prompt_completion"),
    (["text", "url"], "text"),
])
def test_detect_format(columns, fmt):
  assert detect_format(columns) == fmt


def test_detect_format_unknown_names_the_fix():
  with pytest.raises(DataError, match="format=.*columns="):
    detect_format(["question", "answer"])


def msgs(*pairs):
  return [{"role": r, "content": c} for r, c in pairs]


def test_sharegpt_all_roles():
  row = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                           {"from": "gpt", "value": "call"}, {"from": "tool", "value": "42"},
                           {"from": "gpt", "value": "it is 42"}]}
  ex = to_example(row, "sharegpt")
  assert ex == Conversation(msgs((S, "be brief"), (U, "hi"), (A, "call"), (T, "42"), (A, "it is 42")))


def test_messages_with_tools_and_content_parts():
  row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                      {"role": "assistant", "content": "c"}],
         "tools": '[{"name": "f"}]'}
  ex = to_example(row, "messages")
  assert ex == Conversation(msgs((U, "ab"), (A, "c")), tools=[{"name": "f"}])


def test_alpaca_with_and_without_input():
  ex = to_example({"instruction": "Sum", "input": "1 2", "output": "3"}, "alpaca")
  assert ex == Conversation(msgs((U, "Sum\n\n1 2"), (A, "3")))
  ex = to_example({"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca")
  assert ex == Conversation(msgs((U, "Say hi"), (A, "hi")))


def test_prompt_completion_chat_raw_and_conversational():
  row = {"prompt": "Q: 1+1? ", "completion": "2"}
  assert to_example(row, "prompt_completion") == Conversation(msgs((U, "Q: 1+1? "), (A, "2")))
  assert to_example(row, "prompt_completion", chat_prompt_completion=False) == Text("Q: 1+1? 2", train_from=8)
  row = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
         "completion": [{"role": "assistant", "content": "a"}]}
  assert to_example(row, "prompt_completion") == Conversation(msgs((S, "s"), (U, "u"), (A, "a")))


def test_text():
  assert to_example({"text": "hello world"}, "text") == Text("hello world")


def test_tfds_columnar_bytes_and_json_strings():
  # tfds.data_source decodes Sequence({from, value}) as {from: [bytes], value: [bytes]}.
  row = {"conversations": {"from": [b"human", b"gpt"], "value": [b"hi", "yo".encode()]}}
  assert to_example(row, "sharegpt") == Conversation(msgs((U, "hi"), (A, "yo")))
  row = {"messages": '[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]'}
  assert to_example(row, "messages") == Conversation(msgs((U, "x"), (A, "y")))


def test_role_aliases_extendable():
  row = {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}
  with pytest.raises(BadRow) as e:
    to_example(row, "sharegpt")
  assert e.value.reason == "unknown_role" and "'bot'" in e.value.detail
  from jaxkd.data.formats import ROLE_ALIASES
  ex = to_example(row, "sharegpt", role_aliases={**ROLE_ALIASES, "bot": "assistant"})
  assert ex.messages[1]["role"] == A


@pytest.mark.parametrize("row, fmt, reason", [
    ({"id": 1}, "sharegpt", "missing_field"),
    ({"conversations": None}, "sharegpt", "missing_field"),
    ({"conversations": []}, "sharegpt", "empty_conversation"),
    ({"conversations": {"from": np.array([], object), "value": np.array([], object)}}, "sharegpt",
     "empty_conversation"),  # an empty TFDS sequence
    ({"conversations": [{"from": "human"}]}, "sharegpt", "missing_field"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", "unknown_role"),
    ({"conversations": [{"from": "human", "value": 3}]}, "sharegpt", "non_string_content"),
    ({"messages": [{"role": "user", "content": {"a": 1}}]}, "messages", "non_string_content"),
    ({"messages": "not json"}, "messages", "non_string_content"),
    ({"instruction": "x"}, "alpaca", "missing_field"),
    ({"prompt": "x", "completion": 5}, "prompt_completion", "non_string_content"),
    ({"text": "   "}, "text", "empty_text"),
    ({"text": ["a"]}, "text", "non_string_content"),
])
def test_bad_rows_have_reasons(row, fmt, reason):
  with pytest.raises(BadRow) as e:
    to_example(row, fmt)
  assert e.value.reason == reason


def test_unknown_format_is_a_config_error():
  with pytest.raises(DataError, match="unknown data format"):
    to_example({"text": "x"}, "markdown")
